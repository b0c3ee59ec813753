"""Damaged stores as a hostile user makes them: every read is checked, by the loader (raise and skip) and by
`openmind-convert verify` in a subprocess: a StoreError naming the volume, never a signal or a raw error."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import pandas as pd
import pytest
import torch
from corpus_helpers import small_corpus
from loader_helpers import PATCH, mni_volumes, rewrite_manifest, write_store

from openmind_tools import wds_store, zarr_store
from openmind_tools.cli.convert import EXIT_FAILURES
from openmind_tools.convert import convert
from openmind_tools.errors import ConfigError, StoreError
from openmind_tools.loader import PatchDataset, make_loader
from openmind_tools.manifest_io import read_table, write_table
from openmind_tools.reads import Reader
from openmind_tools.volume import VolumeRef

VICTIM = 2  # the damaged volume's position in id order


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(tmp_path_factory.mktemp("pristine"), mni_volumes(6), shards=2).parent


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> Path:
    shutil.copytree(pristine, tmp_path / "store")
    return tmp_path / "store"


def _victim(store: Path) -> pd.Series:
    return pd.read_parquet(store / "manifest.parquet").sort_values("id").iloc[VICTIM]


def _chunk(store: Path) -> Path:
    return store / "store.zarr" / zarr_store.group_path(_victim(store)["id"]) / zarr_store.CHUNKS["image"]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _nan_voxel(path: Path) -> None:
    """Rewrite the chunk with one NaN voxel and a matching CRC, as another tool might write it."""
    raw = path.read_bytes()
    image = np.frombuffer(numcodecs.blosc.decompress(raw[:-4]), np.float16).copy()
    image[7] = np.nan
    body = numcodecs.blosc.compress(image, b"lz4", 5, numcodecs.blosc.SHUFFLE)
    path.write_bytes(body + google_crc32c.value(body).to_bytes(4, "little"))


ZARR_DAMAGE = {
    "flipped byte": (_flip, "damaged chunk: its crc32c"),
    "cut short": (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3]), "damaged chunk"),
    "padded with junk": (lambda p: p.write_bytes(p.read_bytes() + b"\x00junk" * 100), "damaged chunk"),
    "a few bytes": (lambda p: p.write_bytes(b"\x02\x01"), "too short to be a chunk"),
    "NaN voxels": (_nan_voxel, "NaN or Inf voxels"),
}


def _rewrite_sample(shard: Path, key: str, members: dict[str, bytes], duplicate: str | None = None) -> None:
    """Rewrite `shard` with the sample `key`'s members replaced (and one of them written twice)."""
    with tarfile.open(shard) as tar:
        entries = [(info.name, tar.extractfile(info).read()) for info in tar]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in entries:
            member_key, _, ext = name.partition(".")
            payload = members.get(ext, payload) if member_key == key else payload
            for _ in range(2 if member_key == key and ext == duplicate else 1):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    shard.write_bytes(out.getvalue())


def _respan(rows: pd.DataFrame, store: Path) -> pd.DataFrame:
    """`rows` with each sample's wds_offset / wds_size read from its shard as it is now (headers through padding)."""
    spans: dict[tuple[str, str], list[int]] = {}
    for shard in set(rows["wds_shard"]):
        with tarfile.open(store / shard) as tar:
            for info in tar:
                end = info.offset_data + -(-info.size // 512) * 512
                span = spans.setdefault((shard, info.name.partition(".")[0]), [info.offset, end])
                span[1] = end
    where = [spans[(shard, key)] for shard, key in zip(rows["wds_shard"], rows["wds_key"], strict=True)]
    return rows.assign(wds_offset=[a for a, _ in where], wds_size=[b - a for a, b in where])


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _damage_sample(store: Path, kind: str) -> None:
    """Damage the victim's tar sample. Except for a flipped byte, the manifest's checksums are made to match the
    new members, as a store built by another tool would be, so the checks after the checksum are what fires."""
    victim = _victim(store)
    shard = store / victim["wds_shard"]
    if kind == "flipped byte":
        with tarfile.open(shard) as tar:
            member = tar.getmember(f"{victim['wds_key']}.image.npy")
        data = bytearray(shard.read_bytes())
        data[member.offset_data + member.size // 2] ^= 0x01
        shard.write_bytes(bytes(data))
        return
    shape = tuple(int(s) for s in victim["shape"])
    image = np.zeros(shape, np.float16)
    change = {
        "wrong shape": {"image.npy": _npy(np.zeros(shape[::-1][:2] + (3,), np.float16))},
        "string dtype": {"image.npy": _npy(np.full(shape, "x"))},
        "NaN voxels": {
            "image.npy": _npy(np.where(np.arange(image.size).reshape(shape) == 7, np.nan, image).astype(np.float16))
        },  # fmt: skip
        "duplicate member": {},
    }[kind]
    _rewrite_sample(shard, victim["wds_key"], change, "mask.npy" if not change else None)
    with tarfile.open(shard) as tar:
        crc = [google_crc32c.value(tar.extractfile(f"{victim['wds_key']}.{m}").read()) for m in wds_store.MEMBERS]
    rows = pd.read_parquet(store / "manifest.parquet")
    rows["wds_crc32c"] = [crc if i == victim["id"] else list(c) for i, c in zip(rows["id"], rows["wds_crc32c"],
                                                                                  strict=True)]  # fmt: skip
    rows = _respan(rows, store)
    rewrite_manifest(store / "manifest.parquet", store / "manifest.parquet",
                     {c: rows[c] for c in ("wds_crc32c", "wds_offset", "wds_size")})  # fmt: skip


WDS_DAMAGE = {
    "flipped byte": "damaged member image.npy: its crc32c",
    "wrong shape": "the manifest says float16",
    "string dtype": "image is <U1",
    "NaN voxels": "NaN or Inf voxels",
    "duplicate member": "'.*mask.npy' occurs twice",
}


def _epoch(store: Path, kind: str, on_error: str) -> list[dict]:
    dataset = PatchDataset(store / "manifest.parquet", PATCH, store=kind, on_error=on_error, seed=1)
    return list(make_loader(dataset, batch_size=2))


@pytest.mark.parametrize("damage", [f"zarr {d}" for d in ZARR_DAMAGE] + [f"wds {d}" for d in WDS_DAMAGE])
def test_the_loader_names_a_damaged_volume_and_skip_keeps_the_step_count(store: Path, pristine: Path,
                                                                          damage: str) -> None:  # fmt: skip
    kind, damage = damage.split(" ", 1)
    if kind == "zarr":
        hurt, message = ZARR_DAMAGE[damage]
        hurt(_chunk(store))
    else:
        _damage_sample(store, damage)
        message = WDS_DAMAGE[damage]
    victim = _victim(store)["id"]
    with pytest.raises(StoreError, match=message) as raised:
        _epoch(store, kind, "raise")
    assert victim in str(raised.value)
    skipped = _epoch(store, kind, "skip")
    assert len(skipped) == len(_epoch(pristine, kind, "raise"))
    assert sum(batch["skipped"] for batch in skipped) == 1
    assert victim not in {i for batch in skipped for i in batch["id"]}


def test_an_older_store_is_refused_with_what_to_do(store: Path) -> None:
    root = store / "store.zarr" / "zarr.json"
    root.write_text(root.read_text().replace(zarr_store.STORE_FORMAT, "openmind-zarr/3"))
    with pytest.raises(StoreError, match="store format openmind-zarr/3.*convert the corpus again"):
        PatchDataset(store / "manifest.parquet", PATCH)
    root.unlink()  # converter 0.4 and older wrote no root metadata
    with pytest.raises(StoreError, match="no group metadata .*0.4 or older, which must be converted again"):
        PatchDataset(store / "manifest.parquet", PATCH)


def test_plain_zarr_checks_the_chunk_checksum_too(store: Path) -> None:
    victim = _victim(store)
    group = zarr_store.open_volume(store / "store.zarr", victim["id"])
    volume = zarr_store.read_volume(str(store / "store.zarr"), victim["id"], tuple(victim["shape"]))
    assert np.array_equal(group["image"][:], volume.image) and np.array_equal(group["mask"][:], volume.code)
    assert group["mask"].dtype == np.uint8 and group.attrs["store_format"] == zarr_store.STORE_FORMAT
    _flip(_chunk(store))
    with pytest.raises(ValueError, match="checksum"):
        zarr_store.open_volume(store / "store.zarr", victim["id"])["image"][:]


def test_a_huge_file_in_a_chunks_place_is_read_no_further_than_a_chunk_reaches(store: Path, monkeypatch) -> None:
    chunk, victim = _chunk(store), _victim(store)
    with chunk.open("ab") as f:
        f.truncate(chunk.stat().st_size + 200 * 2**20)  # 200 MB of zeros after the chunk (sparse on disk)
    read: list[int] = []
    cat = Reader.cat
    monkeypatch.setattr(Reader, "cat", lambda self, *a: [read.append(len(b)) or b for b in cat(self, *a)])
    with pytest.raises(StoreError, match=f"{victim['id']}.*damaged chunk"):
        zarr_store.read_volume(str(store / "store.zarr"), victim["id"], tuple(victim["shape"]))
    assert read[0] == int(np.prod(victim["shape"])) * 2 + 16 + 4 + 1  # the largest valid chunk, plus one byte


@pytest.mark.parametrize(("kind", "message"), [("zarr", "array is float16 of shape"), ("wds", "manifest says float16")])
def test_a_permuted_manifest_shape_is_named_by_the_loader(store: Path, pristine: Path, kind: str, message: str) -> None:
    rows = pd.read_parquet(store / "manifest.parquet")
    victim = _victim(store)["id"]
    shapes = [list(shape) for shape in rows["shape"]]
    at = int(np.flatnonzero(rows["id"] == victim)[0])
    shapes[at] = shapes[at][1:] + shapes[at][:1]  # same product, so the same chunk sizes and checksums
    assert shapes[at] != list(rows["shape"].iloc[at])
    rewrite_manifest(store / "manifest.parquet", store / "manifest.parquet", {"shape": shapes})
    with pytest.raises(StoreError, match=rf"{victim}.*{message}"):
        _epoch(store, kind, "raise")
    skipped = _epoch(store, kind, "skip")
    assert len(skipped) == len(_epoch(pristine, kind, "raise")) and sum(b["skipped"] for b in skipped) == 1


# ---------------------------------------------------------------------------------------------- verify
@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = small_corpus(tmp_path_factory.mktemp("corpus"), [f"sub-01_run-{i}_T1w.nii.gz" for i in range(3)])
    out = tmp_path_factory.mktemp("converted") / "out"
    convert(root, out, progress=False)
    return out


def _verify(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "openmind_tools.cli.convert", "verify", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_verify_lists_every_damaged_volume_and_exits_non_zero(converted: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    rows, meta = read_table(out / "manifest.parquet")
    rows = rows.sort_values("id").reset_index(drop=True)
    assert _verify(out).returncode == 0
    chunk = out / "store.zarr" / rows.loc[0, "zarr_array"] / zarr_store.CHUNKS["image"]
    chunk.write_bytes(chunk.read_bytes()[:100])  # cut short: blosc alone would read past the end
    second = out / "store.zarr" / rows.loc[1, "zarr_array"] / zarr_store.CHUNKS["image"]
    second.write_bytes(second.read_bytes() + b"junk")
    shape = list(rows.loc[2, "shape"])
    rows.at[2, "shape"] = [shape[1], shape[0], shape[2]]  # permuted: same bytes, same checksum
    key = rows.loc[1, "wds_key"]
    _rewrite_sample(out / rows.loc[1, "wds_shard"], key, {}, duplicate="json")
    write_table(_respan(rows, out), out / "manifest.parquet", meta)
    done = _verify(out)
    assert done.returncode == EXIT_FAILURES and "Traceback" not in done.stderr, done  # an exit, not a signal
    lines = done.stdout.splitlines()
    for volume, reason in ((0, "damaged chunk"), (1, "damaged chunk"), (2, "shape"), (1, "occurs twice")):
        assert any(wds_store.sample_key(rows.loc[volume, "id"]) in line and reason in line for line in lines), (
            volume, reason, lines)  # fmt: skip


@pytest.mark.parametrize("column", ["wds_crc32c", "wds_offset"])
def test_a_manifest_of_an_older_converter_is_refused_with_what_to_do(store: Path, column: str) -> None:
    rows, meta = read_table(store / "manifest.parquet")
    write_table(rows.drop(columns=[column]), store / "old.parquet", meta)
    with pytest.raises(ConfigError, match=f"no column.*{column}.*older openmind-convert; convert the corpus again"):
        PatchDataset(store / "old.parquet", PATCH, store="wds")


@pytest.mark.parametrize(("column", "holes"), [
    ("wds_crc32c", (None, "abc", [1, 2, -3], [1, 2, 2**32], [1.5, 2, 3])),  # a hand-made manifest, not parquet's
    ("wds_offset", (None, "abc", -512, 100, float("inf"), 512.5, 2**70)),
    ("wds_size", (None, 0, 511, 2048 + 1, 2**62, float("nan"))),
])  # fmt: skip
def test_a_malformed_sample_location_is_refused_naming_the_volume(store: Path, column: str, holes: tuple) -> None:
    rows, _ = read_table(store / "manifest.parquet")
    victim = rows["id"].iloc[VICTIM]
    for hole in holes:
        holed = rows.assign(**{column: [hole if i == VICTIM else c for i, c in enumerate(rows[column])]})
        with pytest.raises(ConfigError, match=f"volume {victim}: the manifest's .*{column}"):
            PatchDataset(holed, PATCH, store="wds", root=store)


def test_a_shard_member_that_is_not_a_file_is_named(tmp_path: Path) -> None:
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("v.image.npy")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    ref = VolumeRef("v", (1, 1, 1), str(shard), (0, 1536), (0, 0, 0))
    with pytest.raises(StoreError, match="member 'v.image.npy' is not a regular file"):
        wds_store.read(ref, Reader.for_url(str(shard)))


def test_a_chunk_blosc_cannot_decode_is_a_store_error(store: Path) -> None:
    chunk = _chunk(store)
    body = bytearray(chunk.read_bytes()[:-4])
    body[8:12] = (0).to_bytes(4, "little")  # block size 0: the sizes and the CRC still match
    chunk.write_bytes(bytes(body) + google_crc32c.value(bytes(body)).to_bytes(4, "little"))
    victim = _victim(store)
    with pytest.raises(StoreError, match=f"{victim['id']}.*blosc cannot decode it"):
        zarr_store.read_volume(str(store / "store.zarr"), victim["id"], tuple(victim["shape"]))


@pytest.mark.parametrize(("argument", "message"), [
    ({"store": ["zarr"]}, "store: expected one of"),
    ({"attempts": 100}, "attempts in"),
    ({"backoff_s": float("inf")}, "backoff_s in"),
])  # fmt: skip
def test_bad_loader_arguments_are_config_errors(store: Path, argument: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PatchDataset(store / "manifest.parquet", PATCH, **argument)


@pytest.mark.parametrize("argument", [{"batch_size": 0}, {"batch_size": 2.5}, {"num_workers": -1},
                                      {"prefetch_factor": 0}, {"num_workers": True}])  # fmt: skip
def test_bad_make_loader_arguments_are_config_errors(store: Path, argument: dict) -> None:
    name, value = next(iter(argument.items()))
    with pytest.raises(ConfigError, match=rf"{name}: expected an integer of at least \d, got {value!r}"):
        make_loader(PatchDataset(store / "manifest.parquet", PATCH), **{"batch_size": 2, **argument})


def test_a_device_that_is_not_there_is_a_config_error(store: Path) -> None:
    dataset = PatchDataset(store / "manifest.parquet", PATCH)
    with pytest.raises(ConfigError, match="device: expected a torch device"):
        make_loader(dataset, batch_size=2, device="gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA device"):
            make_loader(dataset, batch_size=2, device="cuda")


@pytest.mark.parametrize("shape", [[30, 0, 30], [30, 30], "abc", "123", None, [30.5, 30, 30], [30, float("nan"), 30]])
def test_a_malformed_manifest_shape_is_refused_naming_the_volume(store: Path, shape: object) -> None:
    rows, _ = read_table(store / "manifest.parquet")
    victim = rows["id"].iloc[VICTIM]
    holed = rows.assign(shape=[shape if i == VICTIM else list(c) for i, c in enumerate(rows["shape"])])
    with pytest.raises(ConfigError, match=f"volume {victim}: the manifest's shape"):
        PatchDataset(holed, PATCH, root=store)


def test_verify_names_bytes_that_belong_to_no_sample(converted: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    shard = out / pd.read_parquet(out / "manifest.parquet")["wds_shard"].iloc[0]
    shard.write_bytes(shard.read_bytes() + b"appended")  # every sample still reads: only the tail is wrong
    done = _verify(out)
    assert done.returncode == EXIT_FAILURES and "Traceback" not in done.stderr
    assert f"{shard}: the" in done.stdout and "end-of-archive" in done.stdout


def test_a_damaged_cached_copy_is_dropped_and_read_again(tmp_path: Path) -> None:
    (tmp_path / "object").write_bytes(b"x" * 4096)
    url = f"simplecache::file://{tmp_path / 'object'}"
    reader = Reader.for_url(url, {"simplecache": {"cache_storage": str(tmp_path / "cache")}})
    assert reader.cat([url]) == [b"x" * 4096]
    (cached,) = [p for p in (tmp_path / "cache").iterdir() if p.is_file()]
    cached.write_bytes(b"x" * 100)  # a download cut short, left in the cache
    assert reader.cat([url]) == [b"x" * 100]  # the cache is trusted ...
    reader.forget([url])  # ... until a check fails and the store's read forgets it
    assert reader.cat([url]) == [b"x" * 4096]
