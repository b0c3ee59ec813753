"""Re-read every stored sample and compare it with its manifest row; `repair` reconverts what is damaged.

Each sample is read as the loader reads it, checks included (chunk and member CRCs, sizes, shapes, finite
voxels), and its decoded arrays compared with the manifest's checksum, so each corruption shows up as one
problem naming the volume and the file. `repair` deletes the
damaged samples (and tar shards) and reruns the conversion `OUT/.run.json` recorded: the rerun checks
its journal against the store, so it converts exactly those volumes again and repacks those shards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from openmind_tools import wds_store, zarr_store
from openmind_tools.errors import ConfigError, MachineError
from openmind_tools.files import file_problem
from openmind_tools.manifest_io import ERRORS, MANIFEST, read_table
from openmind_tools.parallel import run_tasks
from openmind_tools.reads import Reader
from openmind_tools.storage import Place, transport_error
from openmind_tools.volume import VolumeRef


@dataclass(frozen=True)
class Problem:
    volume_id: str | None  # None when a whole shard is unreadable
    path: str  # the file or object (a local path, or a URL)
    store: str  # "zarr" | "wds"
    reason: str

    def __str__(self) -> str:
        return f"{self.volume_id + ': ' if self.volume_id else ''}{self.path}: {self.reason}"


def verify(
    out: str | Path | Place, progress: bool = True, client: Any = None, storage_options: dict[str, Any] | None = None
) -> list[Problem]:
    """Problems found in `out` (empty when every sample of every store matches the manifest).

    One task per Zarr volume and per tar shard, on `client` (a dask Client, as conversion uses) or here. `out` is a
    folder or an fsspec URL (with `storage_options`): the workers read the stores there themselves.
    """
    out = Place.of(out, storage_options)
    try:
        manifest, _ = read_table(out / MANIFEST)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{out / MANIFEST}: not a readable manifest ({type(e).__name__}: {e})") from None
    except Exception as e:
        if transport_error(e):
            raise MachineError(f"{out / MANIFEST}: the object store failed ({type(e).__name__}: {e})") from None
        raise
    problems: list[Problem] = []
    if "zarr_store" in manifest:
        shapes = (tuple(int(v) for v in shape) for shape in manifest["shape"])
        columns = (manifest["id"], manifest["zarr_store"], manifest["zarr_array"], shapes, manifest["checksum"])
        rows = list(zip(*columns, strict=True))
        for found in run_tasks(_check_volume, rows, client, progress=progress, what="verify zarr", out=out):
            problems += found
        for store, ids in manifest.groupby("zarr_store")["id"]:
            for folder in zarr_store.missing_groups(out / store, ids):
                reason = "no group metadata: zarr clients cannot list the volumes below"
                problems.append(Problem(None, (out / store / folder / "zarr.json").url, "zarr", reason))
    if "wds_shard" in manifest:
        absent = [c for c in wds_store.MANIFEST_COLUMNS if c not in manifest]
        if absent:
            raise ConfigError(f"{out / MANIFEST} has no column(s) {absent} (written by an older openmind-convert): "
                              "convert the corpus again")  # fmt: skip
        columns = ["id", "shape", "checksum", *wds_store.MANIFEST_COLUMNS]
        shards = [(shard, rows[columns].to_dict("records")) for shard, rows in manifest.groupby("wds_shard")]
        for found in run_tasks(_check_shard, shards, client, progress=progress, what="verify shards", unit="shard",
                               out=out):  # fmt: skip
            problems += found
    return sorted(problems, key=lambda p: (p.store, str(p.path), p.volume_id or ""))


def _check_volume(row: tuple[str, str, str, tuple[int, int, int], str], out: Place) -> list[Problem]:
    volume_id, store, array, shape, checksum = row
    root = out / store
    path = root / array
    try:
        reader = Reader(root.fs)
        zarr_store.group_attributes((path / "zarr.json").path, f"volume {volume_id}", reader)
        got = zarr_store.read_volume(root.path, volume_id, shape, reader).checksum()
    except Exception as e:  # any decode failure is a finding, not a crash
        _raise_transport(e, path)
        return [Problem(volume_id, path.url, "zarr", f"unreadable ({type(e).__name__}: {e})")]
    return [] if got == checksum else [Problem(volume_id, path.url, "zarr", f"checksum {got} != manifest {checksum}")]


def _raise_transport(error: Exception, place: Place) -> None:
    """A failed request (after the reader's retries) is the machine's, never a finding about the sample."""
    if transport_error(error):
        raise MachineError(f"{place}: the object store failed ({type(error).__name__}: {error}); rerun verify")


@dataclass(frozen=True)
class Repair:
    summary: Any  # the rerun's convert.Summary
    unrestored: list[str]  # what could not be restored, and why: its damaged copy is kept, its row too

    def __str__(self) -> str:
        return "\n".join([str(self.summary), *(f"not restored: {line}" for line in self.unrestored)])


def repair(
    out: str | Path | Place,
    problems: list[Problem],
    client: Any = None,
    progress: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> Repair:
    """Delete what `problems` name and rerun the recorded conversion; nothing is lost that cannot be rebuilt.

    A damaged Zarr volume is rebuilt from its source, so one whose source is gone (or is no regular file) is left as
    it is, damaged copy, intact tar sample and manifest row included, and named in `unrestored`; so is a shard
    whose repacking needs such a volume. A volume that fails to convert again, or any row missing from the manifest
    afterwards, is named too (its reason is in errors.parquet).
    """
    from openmind_tools.convert import RUN_FILE, STAGING_DIR, ZARR_DIR, convert
    from openmind_tools.corpus import discover
    from openmind_tools.preprocess import PreprocessSettings

    out = Place.of(out, storage_options)
    try:
        run = json.loads((out / RUN_FILE).read_bytes())
        root = run["root"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            f"{out / RUN_FILE} does not record the corpus root (written by an older converter): "
            "rerun 'openmind-convert ROOT OUT' with the original arguments instead"
        ) from None
    codec = run.get("codec", zarr_store.DEFAULT_CODEC)  # the rerun must match the folder's codec, or it is refused
    zarr_root = out / (ZARR_DIR if "zarr" in run["formats"] else STAGING_DIR)
    before, _ = read_table(out / MANIFEST)
    corpus = discover(root, storage_options=storage_options)
    sources = {image.id: image for image in corpus.images}
    unrestored, kept = [], set()
    for volume_id in sorted({p.volume_id for p in problems if p.store == "zarr" and p.volume_id is not None}):
        image = sources.get(volume_id)
        why = "the corpus no longer lists it" if image is None else next(
            (f"{path}: {problem}" for path in (image.image, image.anatomy_mask, image.deface_mask)
             if path is not None and (problem := _source_problem(Place(corpus.root.fs, path)))), None)  # fmt: skip
        if why:
            unrestored.append(f"{volume_id}: its source cannot be read again ({why}); its damaged copy is kept")
            kept.add(volume_id)
    shard_of = dict(zip(before["id"], before["wds_shard"], strict=True)) if "wds_shard" in before else {}
    shards = {(out / name).url: out / name for name in set(shard_of.values())}
    for problem in problems:
        if problem.store == "zarr" and problem.volume_id is not None and problem.volume_id not in kept:
            zarr_store.delete_volume(zarr_root, problem.volume_id)
        elif problem.store == "wds":
            needs = sorted(v for v in kept if v in shard_of and (out / shard_of[v]).url == problem.path)
            if needs:
                unrestored.append(f"{problem.path}: repacking it needs {needs[0]}, which cannot be rebuilt; kept as "
                                  "it is")  # fmt: skip
            else:
                shards.get(problem.path, Place.of(problem.path)).remove()  # the rerun repacks it from the Zarr copy
    summary = convert(root, out, settings=PreprocessSettings.from_dict(run["settings"]), formats=run["formats"],
                      modalities=run["modalities"], limit=run["limit"], shard_bytes=run["shard_bytes"], client=client,
                      progress=progress, codec=codec, storage_options=storage_options)  # fmt: skip
    after, _ = read_table(out / MANIFEST)
    lost = sorted(set(before["id"]) - set(after["id"]))
    unrestored += [f"{volume_id}: converting it again failed, so it left the manifest (the reason is in "
                   f"{out / ERRORS})" for volume_id in lost]  # fmt: skip
    return Repair(summary, sorted(dict.fromkeys(unrestored)))


def _check_shard(job: tuple[str, list[dict[str, Any]]], out: Place) -> list[Problem]:
    """Each sample of the shard read as the loader reads it (its byte span, member CRCs, arrays) and compared with
    its manifest row's checksum: every damaged one is named."""
    shard, rows = job
    place = out / shard
    reader = Reader(place.fs, attempts=1 if place.local else 4)
    problems = []
    for row in rows:
        row = SimpleNamespace(**row)
        try:
            _, span, crc32c = wds_store.locate(row, lambda _: place.path)
            ref = VolumeRef(row.id, tuple(int(v) for v in row.shape), place.path, span, crc32c)
            volume = wds_store.read(ref, reader)
        except Exception as e:  # any read or decode failure is a finding about this sample, not a crash
            _raise_transport(e, place)
            problems.append(Problem(row.id, place.url, "wds", f"unreadable ({type(e).__name__}: {e})"))
            continue
        if volume.checksum() != row.checksum:
            problems.append(Problem(row.id, place.url, "wds", "checksum differs from the manifest"))
    return problems + _tiling(place, rows)


def _source_problem(place: Place) -> str | None:
    """Why a source file cannot be read again, or None."""
    if place.local:
        return file_problem(place.path)
    return None if place.is_file() else "file not found"


def _tiling(place: Place, rows: list[dict[str, Any]]) -> list[Problem]:
    """The manifest's sample spans must cover the shard from its start with no gap, and end in tar's zero blocks:
    bytes no span names are a sample the manifest places elsewhere, or damage that `tar tf` and webdataset, which
    read the shard whole, would trip on while the loader's span reads would not."""
    path = place.url
    try:
        spans = sorted((int(r["wds_offset"]), int(r["wds_size"])) for r in rows)
        size = place.size() if _source_problem(place) is None else 0  # a FIFO would block the read
    except (OSError, TypeError, ValueError, OverflowError):
        spans, size = [], 0
    if not spans or not size or spans[-1][0] + spans[-1][1] > size:
        return []  # missing, no file, or cut short: each sample's read has already named what is wrong
    end = 0
    for offset, length in spans:
        if offset != end:
            return [Problem(None, path, "wds", f"bytes {min(end, offset)}-{max(end, offset)} belong to no sample of "
                            "the manifest, or two samples overlap (a sample placed elsewhere, or damage)")]  # fmt: skip
        end = offset + length
    tail = place.fs.cat_file(place.path, start=end, end=size)
    if len(tail) < 1024 or tail.count(0) != len(tail):
        return [Problem(None, path, "wds", f"the {len(tail)} bytes after the last sample are not tar's end-of-archive "
                        "zero blocks (bytes appended, or damage): tar tf and webdataset would fail")]  # fmt: skip
    return []
