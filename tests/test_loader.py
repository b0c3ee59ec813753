"""PatchDataset / make_loader on real Zarr and tar stores: splitting under torchrun, resume, padding,
foreground bias, errors, determinism. Small MNI-derived volumes with 32^3 patches keep it fast; one test
reads 160^3 patches from the converted demo corpus."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from loader_helpers import PATCH, SETTINGS_HASH, mni_volumes, rewrite_manifest, write_store
from nibabel.testing import data_path
from torchrun_helpers import two_ranks

from openmind_tools import loader_stages, zarr_store
from openmind_tools.errors import ConfigError, StoreError
from openmind_tools.loader import PatchDataset, PatchLoader, make_loader
from openmind_tools.loader_stages import crop_volumes, read_volumes, split_by_rank, split_by_worker, wrap_to_multiple
from openmind_tools.manifest import balance_weights
from openmind_tools.reads import Reader
from openmind_tools.volume import Volume, VolumeRef

STORES = ["zarr", "wds"]


@pytest.fixture(scope="module")
def store16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 volumes in 3 tar shards (6/5/5): 4 rank x worker slots split shards in the middle."""
    return write_store(tmp_path_factory.mktemp("store16"), mni_volumes(16)).parent


@pytest.fixture(scope="module")
def store18(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """18 volumes: 4 slots need 2 volumes repeated to give every rank the same number of steps."""
    return write_store(tmp_path_factory.mktemp("store18"), mni_volumes(18, seed=1), shards=2).parent


def run_epoch(loader, epoch: int | None = None) -> list[dict]:
    if epoch is not None:
        loader.set_epoch(epoch)
    return [batch for batch in loader]


def assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a["id"] == b["id"]
        for key in ("image", "anatomy", "deface", "valid", "origin"):
            assert torch.equal(a[key], b[key]), key


def ids_of(batches: list[dict]) -> list[str]:
    return [i for batch in batches for i in batch["id"]]


# ---------------------------------------------------------------------------------------------- splitting
def test_split_stages_partition_a_padded_list() -> None:
    volumes = list(range(18))
    padded = list(wrap_to_multiple(volumes, multiple=4))
    parts = [
        list(split_by_worker(split_by_rank(padded, rank=r, world_size=2), worker=w, num_workers=2))
        for r in range(2)
        for w in range(2)
    ]
    assert [len(p) for p in parts] == [5, 5, 5, 5]
    assert sorted(i for p in parts for i in p) == sorted(volumes + [0, 1])


@pytest.mark.slow
def test_torchrun_two_ranks_two_workers_cover_each_volume_once(store16: Path, store18: Path, tmp_path: Path) -> None:
    runs = [f"{m}:{s}" for m in (store16 / "manifest.parquet", store18 / "manifest.parquet") for s in STORES]
    script = Path(__file__).with_name("torchrun_split.py")
    done = two_ranks(str(script), str(tmp_path), "2", *runs, timeout=150)
    assert done.returncode == 0, done.stderr[:6000]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for index, run in enumerate(runs):
        manifest, store = run.rsplit(":", 1)
        expected = set(pd.read_parquet(manifest)["id"])
        per_rank = [rank["runs"][index] for rank in ranks]
        for epoch in range(2):
            steps = [len(r["epochs"][epoch]) for r in per_rank]
            assert steps[0] == steps[1] == per_rank[0]["len"], (run, steps)
            counts = Counter(i for r in per_rank for batch in r["epochs"][epoch] for i in batch)
            assert set(counts) == expected, run
            reads = Counter(n // 2 for n in counts.values())  # 2 crops per volume read
            # 16 volumes fill 2 ranks x 2 workers evenly; 18 are padded to 20 by reading 2 twice
            assert reads == ({1: 16} if len(expected) == 16 else {1: 16, 2: 2}), (run, reads)
        assert per_rank[0]["epochs"][0] != per_rank[0]["epochs"][1], "set_epoch must change the order"


# ---------------------------------------------------------------------------------------------- resume
def _late_start(worker_id: int) -> None:
    if worker_id == 2:
        time.sleep(2.0)  # as a spawned worker on a busy node: the others have delivered batches by then


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # 3 on this 2-core box
@pytest.mark.parametrize("store", STORES)
def test_workers_that_start_late_still_cover_the_epoch_once(store16: Path, store: str) -> None:
    dataset = PatchDataset(store16 / "manifest.parquet", PATCH, store=store, seed=0)
    loader = make_loader(dataset, batch_size=1, num_workers=3)  # worker 2 starts after batch 0 was taken
    loader.loader.worker_init_fn = _late_start
    got = Counter(ids_of(run_epoch(loader)))
    loader.close()
    assert len(got) == 16 and len(loader) == 18 and sorted(got.values()) == [1] * 14 + [2] * 2  # 2 padded


@pytest.mark.parametrize(("store", "workers"), [("zarr", 2), ("wds", 2), ("wds", 0)])
def test_resume_continues_with_the_same_batches(store16: Path, store: str, workers: int) -> None:
    def loader():
        dataset = PatchDataset(store16 / "manifest.parquet", PATCH, store=store, crops_per_volume=2,
                               foreground_bias=0.5, seed=3)  # fmt: skip
        return make_loader(dataset, batch_size=3, num_workers=workers)

    reference = loader()
    expected = run_epoch(reference) + run_epoch(reference)
    reference.close()
    stop = 5  # not a multiple of the worker count: resumed workers take each other's turns
    first = loader()
    for seen, _ in enumerate(first, start=1):
        if seen == stop:
            break
    state = json.loads(json.dumps(first.state_dict()))  # a plain dict, as a checkpoint stores it
    first.close()
    resumed = loader()
    resumed.load_state_dict(state)
    assert_same_batches(run_epoch(resumed) + run_epoch(resumed), expected[stop:])
    resumed.close()


@pytest.mark.parametrize("store", STORES)
def test_a_resumed_epoch_reads_only_the_volumes_it_still_crops(store16: Path, store: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    read: list[int] = []  # bytes of each object read
    cat = Reader.cat
    monkeypatch.setattr(Reader, "cat", lambda self, *a: [read.append(len(b)) or b for b in cat(self, *a)])
    dataset = PatchDataset(store16 / "manifest.parquet", PATCH, store=store, seed=3, prefetch=0)
    loader = make_loader(dataset, batch_size=2)  # 16 volumes, one crop each: 8 batches
    read.clear()
    whole = sum(len(b["id"]) for b in run_epoch(loader, 0))
    per_epoch = sum(read)
    loader.load_state_dict({**loader.state_dict(), "epoch": 0, "batches": 6})
    read.clear()
    rest = run_epoch(loader)
    assert whole == 16 and len(rest) == 2
    objects = 2 if store == "zarr" else 1  # a Zarr volume: image and mask chunks (the metadata came in epoch 0)
    assert len(read) == 4 * objects  # the 4 volumes of the last 2 batches, none of the 12 skipped
    assert 0 < sum(read) < per_epoch / 2


def test_load_state_dict_names_what_differs(store16: Path) -> None:
    dataset = PatchDataset(store16 / "manifest.parquet", PATCH, seed=0)
    state = make_loader(dataset, batch_size=2).state_dict()
    other = make_loader(PatchDataset(store16 / "manifest.parquet", PATCH, seed=1), batch_size=2)
    with pytest.raises(ConfigError, match="found seed=0 instead of 1"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="found num_workers=0 instead of 2"):
        make_loader(dataset, batch_size=2, num_workers=2).load_state_dict(state)
    with pytest.raises(ConfigError, match="missing keys \\['volumes'\\]"):
        dataset.load_state_dict({k: v for k, v in state.items() if k not in ("volumes", "num_workers")})


# ---------------------------------------------------------------------------------------------- crops
@pytest.mark.parametrize("store", STORES)
def test_volume_smaller_than_patch_is_zero_padded_with_exact_valid_mask(tmp_path: Path, store: str) -> None:
    data = np.asarray(nib.load(data_path / "anatomical.nii").dataobj, dtype=np.float32)  # (33, 41, 25)
    image = ((data - data.mean()) / data.std()).astype(np.float16)
    image[image == 0] = 1  # so that "zero" can only mean padding
    volume = Volume.from_masks(image, (data > data.mean()).astype(np.uint8), np.ones_like(data, np.uint8))
    manifest = write_store(tmp_path, {"ds000001/sub-01/anat/sub-01_T1w": volume}, shards=1)
    patch = (48, 40, 32)  # padded along x and z, cropped along y
    dataset = PatchDataset(manifest, patch, store=store, crops_per_volume=6, seed=0)
    (batch,) = run_epoch(make_loader(dataset, batch_size=6, num_workers=1))  # shared-memory batches
    assert batch["image"].shape == (6, 1, *patch) and batch["image"].dtype == torch.float16
    size = np.array(patch)
    canvas = {}  # independent oracle: the volume placed on a zero canvas one patch away from each border
    for name, array in (("image", image), ("anatomy", volume.anatomy), ("deface", volume.deface),
                        ("valid", np.ones_like(volume.anatomy))):  # fmt: skip
        canvas[name] = np.pad(array, [(p, p) for p in patch])
    for i, origin in enumerate(batch["origin"].numpy()):
        assert np.all(origin >= np.minimum(0, np.array(image.shape) - size))
        box = tuple(slice(o + p, o + 2 * p) for o, p in zip(origin, patch, strict=True))
        for name in canvas:
            np.testing.assert_array_equal(batch[name][i, 0].numpy(), canvas[name][box], err_msg=name)
        assert int(batch["valid"][i].sum()) == 33 * 40 * 25
        assert float(batch["image"][i][batch["valid"][i] == 0].abs().sum()) == 0


def test_foreground_bias_centres_crops_in_the_anatomy() -> None:
    volume = max(mni_volumes(40, seed=9).values(), key=lambda v: v.image.size)  # ~45^3
    anatomy = np.zeros_like(volume.anatomy)
    inner = (slice(18, 24),) * 3  # a small region where no crop centred on it clips at the border
    anatomy[inner] = volume.anatomy[inner]
    volume = Volume.from_masks(volume.image, anatomy, volume.deface)
    ref = VolumeRef("v", volume.image.shape, "")

    def inside_rate(bias: float) -> float:
        crops = crop_volumes([(0, ref, volume, False)], patch_size=(PATCH,) * 3, crops_per_volume=2000,
                             foreground_bias=bias, seed=0, epoch=0, rank=0, worker=0)  # fmt: skip
        centres = np.array([origin + PATCH // 2 for _, _, origin, _ in crops])
        return float(anatomy[tuple(centres.T)].mean())

    uniform = inside_rate(0.0)
    assert uniform < 0.5
    assert inside_rate(1.0) == 1.0
    expected, spread = 0.7 + 0.3 * uniform, 4 * np.sqrt(0.25 / 2000)
    assert expected - spread <= inside_rate(0.7) <= expected + spread


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("store", STORES)
def test_missing_sample_raises_naming_the_volume_and_the_store(store16: Path, tmp_path: Path, store: str) -> None:
    ghost = "ds999999/sub-99/anat/sub-99_T1w"
    row = {"id": ghost, "dataset": "ds999999", "modality": "T1w", "shape": [30, 30, 30],
           "settings_hash": SETTINGS_HASH, "zarr_store": "store.zarr", "wds_shard": "shards/shard-000001.tar",
           "wds_key": ghost, "wds_offset": 2**30, "wds_size": 2048, "wds_crc32c": [0, 0, 0]}  # fmt: skip
    manifest = rewrite_manifest(store16 / "manifest.parquet", store16 / f"ghost-{store}.parquet", extra_rows=[row])
    dataset = PatchDataset(manifest, PATCH, store=store, seed=0)
    where = "store.zarr/" + zarr_store.group_path(ghost) if store == "zarr" else "shards/shard-000001.tar"
    with pytest.raises(StoreError, match=f"^volume {ghost}.*{where}") as raised:
        run_epoch(make_loader(dataset, batch_size=4, num_workers=1))
    assert "Traceback" not in str(raised.value) and "\n" not in str(raised.value)  # the worker's one line


def test_truncated_shard_names_the_lost_volumes(store16: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(store16, store)
    shard = store / "shards" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    rows = pd.read_parquet(store / "manifest.parquet")
    lost = sorted(rows.loc[rows["wds_shard"] == "shards/shard-000001.tar", "id"])[-1]
    with pytest.raises(StoreError, match=f"{lost}.*shard-000001.tar.*cut short"):
        run_epoch(make_loader(PatchDataset(store / "manifest.parquet", PATCH, store="wds"), batch_size=4))


def test_skip_policy_fills_the_slot_and_keeps_the_step_count(
    store16: Path, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    shutil.copytree(store16, store)
    lost = sorted(pd.read_parquet(store / "manifest.parquet")["id"])[5]
    shutil.rmtree(store / "store.zarr" / zarr_store.group_path(lost))
    loader = make_loader(PatchDataset(store / "manifest.parquet", PATCH, on_error="skip"), batch_size=4)
    with caplog.at_level(logging.ERROR):
        batches = run_epoch(loader)
    ids = ids_of(batches)
    assert len(ids) == 16 and lost not in ids
    assert sum(batch["skipped"] for batch in batches) == 1
    assert lost in caplog.text


@pytest.mark.parametrize("store", STORES)
def test_a_worker_whose_whole_share_is_unreadable_still_yields_its_steps(store16: Path, tmp_path: Path,
                                                                         store: str) -> None:  # fmt: skip
    copy = tmp_path / "store"
    shutil.copytree(store16, copy)
    dataset = PatchDataset(copy / "manifest.parquet", PATCH, store=store, on_error="skip", seed=4)
    order = list(loader_stages.shuffled(dataset.volumes, seed=4, epoch=0))
    share = list(loader_stages.split_by_worker(order, worker=1, num_workers=2))  # worker 1's 8 volumes
    for volume in share:  # damage every one of them, in the store being read
        if store == "zarr":
            shutil.rmtree(copy / "store.zarr" / zarr_store.group_path(volume.id))
        else:  # zero the sample's bytes in its shard
            with open(volume.url, "r+b") as shard:
                shard.seek(volume.span[0])
                shard.write(bytes(volume.span[1]))
    loader = make_loader(dataset, batch_size=4, num_workers=2)
    batches = run_epoch(loader)
    assert len(batches) == len(loader) == 4
    assert sum(batch["skipped"] for batch in batches) == 8
    assert not set(ids_of(batches)) & {v.id for v in share}
    dead = PatchDataset(copy / "manifest.parquet", PATCH, store=store, on_error="skip", seed=4)
    if store == "zarr":
        for volume in order:
            shutil.rmtree(copy / "store.zarr" / zarr_store.group_path(volume.id), ignore_errors=True)
        with pytest.raises(StoreError, match="nor any other volume of its rank"):
            run_epoch(make_loader(dead, batch_size=4))


@pytest.mark.parametrize("store", STORES)
def test_store_from_other_settings_is_refused(store16: Path, store: str) -> None:
    manifest = rewrite_manifest(store16 / "manifest.parquet", store16 / f"other-{store}.parquet",
                                change={"settings_hash": "0123456789abcdef"})  # fmt: skip
    with pytest.raises(ConfigError, match=f"settings_hash {SETTINGS_HASH}.*0123456789abcdef"):
        run_epoch(make_loader(PatchDataset(manifest, PATCH, store=store), batch_size=4))


def test_manifest_without_the_store_column_is_refused(store16: Path) -> None:
    rows = pd.read_parquet(store16 / "manifest.parquet").drop(columns=["wds_shard"])
    with pytest.raises(ConfigError, match="no column.*wds_shard"):
        PatchDataset(rows, PATCH, store="wds", root=store16)


# ---------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("store", STORES)
def test_same_seed_same_batches_other_seed_or_epoch_other_batches(store16: Path, store: str) -> None:
    def epoch(seed: int, number: int) -> list[dict]:
        dataset = PatchDataset(store16 / "manifest.parquet", PATCH, store=store, crops_per_volume=2, seed=seed,
                               foreground_bias=0.5)  # fmt: skip
        return run_epoch(make_loader(dataset, batch_size=4), number)

    first = epoch(0, 0)
    assert_same_batches(epoch(0, 0), first)
    for other in (epoch(1, 0), epoch(0, 1)):
        assert ids_of(other) != ids_of(first)
        assert sorted(ids_of(other)) == sorted(ids_of(first))


# ---------------------------------------------------------------------------------------------- retries
class FlakyFS:
    """A filesystem whose first reads fail like a dropped connection; counts every call."""

    def __init__(self, failures: int, error: type[OSError] = ConnectionResetError) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    def cat_ranges(self, paths: list[str], starts: list, ends: list, on_error: str) -> list[bytes]:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"injected failure {self.calls} for {paths}")
        return [Path(path).read_bytes() for path in paths]


def test_transient_read_errors_are_retried_missing_objects_are_not(store16: Path) -> None:
    rows = pd.read_parquet(store16 / "manifest.parquet")
    ref = VolumeRef(rows["id"][0], tuple(rows["shape"][0]), str(store16 / "store.zarr"))

    def read(fs: FlakyFS) -> Volume | StoreError:
        reader = Reader(fs, attempts=3, backoff_s=0.01)
        ((_, _, volume),) = read_volumes([(0, ref)], read=lambda r: zarr_store.read(r, reader), prefetch=1)
        return volume

    flaky = FlakyFS(failures=2)
    assert isinstance(read(flaky), Volume) and flaky.calls == 3
    gone = FlakyFS(failures=9, error=FileNotFoundError)
    error = read(gone)
    assert isinstance(error, StoreError) and ref.id in str(error) and gone.calls == 1
    down = FlakyFS(failures=9)
    error = read(down)
    assert isinstance(error, StoreError) and "ConnectionResetError" in str(error) and down.calls == 3


# ---------------------------------------------------------------------------------------------- demo corpus
def test_160_patches_from_the_converted_demo_corpus(demo_out: Path) -> None:
    manifest = demo_out / "manifest.parquet"
    rows = pd.read_parquet(manifest).set_index("id")
    t1 = rows[rows["modality"] == "T1w"]
    for store in STORES:
        dataset = PatchDataset(manifest, 160, store=store, crops_per_volume=2, foreground_bias=0.9, modality="T1w")
        loader = make_loader(dataset, batch_size=4, num_workers=2)
        batches = run_epoch(loader)
        loader.close()
        assert batches[0]["image"].shape == (4, 1, 160, 160, 160) and batches[0]["anatomy"].dtype == torch.uint8
        assert len(batches) == len(loader) and set(ids_of(batches)) == set(t1.index)
        for batch in batches:
            for i, volume_id in enumerate(batch["id"]):
                assert int(batch["valid"][i].sum()) == np.prod(np.minimum(t1.loc[volume_id, "shape"], 160))
                assert (batch["anatomy"][i].sum() > 0) == (t1.loc[volume_id, "anatomy_fraction"] > 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_arrive_on_the_device_equal_to_cpu_batches(store16: Path) -> None:
    def loader(device: str) -> PatchLoader:
        dataset = PatchDataset(store16 / "manifest.parquet", PATCH, crops_per_volume=2, seed=0)
        return make_loader(dataset, batch_size=4, num_workers=2, device=device)

    on_cpu = loader("cpu")
    expected = list(on_cpu) + list(on_cpu)  # two epochs
    on_cpu.close()
    gpu = loader("cuda")
    held = []
    for batch in gpu:  # broken off with batches in flight, then resumed: the hand-back slots are reused throughout
        held.append(batch)
        if len(held) == 2:
            break
    held += list(gpu) + list(gpu)
    assert held[0]["image"].is_cuda and int(gpu._hand_back.out.sum()) == 0
    gpu.close()
    assert_same_batches([{k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()} for b in held], expected)


@pytest.mark.parametrize("store", STORES)
def test_a_fifo_in_place_of_a_stored_object_is_a_store_error_not_a_hang(store16: Path, tmp_path: Path,
                                                                        store: str) -> None:  # fmt: skip
    copy = tmp_path / "store"
    shutil.copytree(store16, copy)
    rows = pd.read_parquet(copy / "manifest.parquet")
    first = rows.sort_values("id").iloc[0]
    chunk = copy / "store.zarr" / zarr_store.group_path(first["id"]) / zarr_store.CHUNKS["image"]
    path = copy / first["wds_shard"] if store == "wds" else chunk
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(StoreError, match="not a regular file \\(a FIFO\\)"):
        run_epoch(make_loader(PatchDataset(copy / "manifest.parquet", PATCH, store=store), batch_size=4))


# ---------------------------------------------------------------------------------------------- metadata, balance
def _with_columns(store16: Path, name: str) -> tuple[Path, pd.DataFrame]:
    rows = pd.read_parquet(store16 / "manifest.parquet").sort_values("id")
    change = {
        "age": [float("nan") if i % 5 == 0 else float("inf") if i == 3 else 20.0 + i for i in range(len(rows))],
        "sex": [None if i % 7 == 3 else "FM"[i % 2] for i in range(len(rows))],
        "dataset": ["big"] * 12 + ["mid"] * 3 + ["small"],  # one dataset of 12 volumes, one of 3, one of 1
    }
    path = rewrite_manifest(store16 / "manifest.parquet", store16 / name, change)
    return path, pd.read_parquet(path).set_index("id")


@pytest.mark.parametrize("store", STORES)
def test_batches_carry_the_requested_manifest_columns_typed(store16: Path, store: str) -> None:
    manifest, rows = _with_columns(store16, "with_columns.parquet")
    dataset = PatchDataset(manifest, PATCH, store=store, metadata=["age", "sex"], crops_per_volume=2)
    assert dataset.categories == {"age": None, "sex": ["F", "M"]}
    seen = 0
    for batch in make_loader(dataset, batch_size=3):
        age, sex = batch["metadata"]["age"], batch["metadata"]["sex"]
        assert age.dtype == torch.float32 and sex.dtype == torch.int64 and len(age) == len(batch["id"])
        for i, volume_id in enumerate(batch["id"]):
            want = rows.loc[volume_id]
            if pd.isna(want["age"]) or math.isinf(want["age"]):  # an inf age is as missing as none
                assert math.isnan(age[i])
            else:
                assert age[i].item() == want["age"]
            assert sex[i].item() == (-1 if pd.isna(want["sex"]) else ["F", "M"].index(want["sex"]))
            seen += 1
    assert seen == 32
    with pytest.raises(ConfigError, match=r"no manifest column\(s\) \['weight'\]"):
        PatchDataset(manifest, PATCH, metadata=["weight"])


def test_balanced_draws_give_each_group_an_equal_share_over_many_epochs(store16: Path) -> None:
    _, rows = _with_columns(store16, "unbalanced.parquet")
    rows = rows.reset_index().sort_values("id")
    refs = [VolumeRef(i, (1, 1, 1), None, None, None) for i in rows["id"]]
    group = dict(zip(rows["id"], rows["dataset"], strict=True))
    weights = balance_weights(rows, "dataset")
    counts: Counter = Counter()
    for epoch in range(400):
        drawn = loader_stages.balanced(refs, weights=weights, seed=5, epoch=epoch)
        assert len(drawn) == len(refs)
        counts.update(group[r.id] for r in drawn)
    shares = {g: c / (400 * len(refs)) for g, c in counts.items()}
    assert all(abs(share - 1 / 3) < 0.02 for share in shares.values()), shares  # uniform: 0.75 / 0.19 / 0.06
    again = loader_stages.balanced(refs, weights=weights, seed=5, epoch=7)
    assert again == loader_stages.balanced(refs, weights=weights, seed=5, epoch=7)
    assert again != loader_stages.balanced(refs, weights=weights, seed=5, epoch=8)


@pytest.mark.parametrize("store", STORES)
def test_balanced_epochs_split_equally_over_ranks_and_resume_mid_epoch(store16: Path, store: str) -> None:
    manifest, rows = _with_columns(store16, "unbalanced_ranks.parquet")

    def loader(rank: int, workers: int = 0):
        dataset = PatchDataset(manifest, PATCH, store=store, seed=2, balance_by="dataset", rank=rank, world_size=2)
        return make_loader(dataset, batch_size=2, num_workers=workers)

    per_rank = [[ids_of(run_epoch(loader(rank), epoch)) for epoch in range(6)] for rank in (0, 1)]
    small = 0
    for epoch in range(6):
        assert len(per_rank[0][epoch]) == len(per_rank[1][epoch]) == 8  # 16 draws per epoch, 8 per rank
        drawn = per_rank[0][epoch] + per_rank[1][epoch]
        assert len(set(drawn)) < 16  # with replacement: some volumes twice, others not at all
        small += sum(rows.loc[i, "dataset"] == "small" for i in drawn)
    assert small >= 16  # ~1/3 of 96 draws; uniform draws would give ~6
    reference = loader(0, workers=2)
    expected = run_epoch(reference) + run_epoch(reference)
    reference.close()
    first = loader(0, workers=2)
    for seen, _ in enumerate(first, start=1):
        if seen == 3:
            break
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = loader(0, workers=2)
    resumed.load_state_dict(state)
    assert_same_batches(run_epoch(resumed) + run_epoch(resumed), expected[3:])
    resumed.close()
    uniform = make_loader(PatchDataset(manifest, PATCH, store=store, seed=2, rank=0, world_size=2), batch_size=2)
    with pytest.raises(ConfigError, match="balance_by"):
        uniform.load_state_dict(state | {"num_workers": 0})
