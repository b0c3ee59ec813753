"""Convert a corpus into stores + manifest: discover -> preprocess -> write -> manifest rows, on dask.

Resumable by construction: volumes are submitted through a bounded window (`openmind_tools.parallel`),
and each finished volume (or failure) is journaled by the driver as it arrives, after its sample is in place:
appended to `OUT/.journal.jsonl` on local disk; on an object store (no append, no rename) buffered and
written as one whole object per batch under `OUT/.journal/`, so a kill loses at most a batch, which the
rerun converts again into the same objects. Tar shards are packed afterwards, each written whole and
renamed: volumes in no shard yet are cut in id order at `shard_bytes` into new shards, and a written
shard's members never change, so a retry or an added volume rewrites no shard. A killed run rerun with
the same command skips what the journal holds, so its manifest equals an uninterrupted run's;
`manifest.parquet` and `errors.parquet` are rewritten from the journal at the end: its last record per volume
goes through a SQLite file on the driver's disk into parquet row groups in id order, so the driver holds a
status and a shape per volume, never every row. With tar shards
alone, volumes are staged in a hidden `.staging.zarr` that is kept, so a later run over more inputs
(a larger --limit, --retry-errors) can pack them. ROOT and OUT may be fsspec URLs (`s3://bucket/prefix`):
workers read the inputs and write the outputs there themselves, so no machine needs a shared file system.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numcodecs
import pandas as pd
import SimpleITK as sitk

from openmind_tools import __version__, wds_store, zarr_store
from openmind_tools.corpus import Corpus, Rejected, SourceImage, discover, row_of
from openmind_tools.errors import ConfigError, InputError, MachineError
from openmind_tools.files import machine_error, remove_stale_temporaries
from openmind_tools.journal import Journal, latest_records
from openmind_tools.lock import Lease, exclusive
from openmind_tools.manifest_io import ERRORS, MANIFEST, write_batches, write_table
from openmind_tools.parallel import run_tasks
from openmind_tools.preprocess import PreprocessSettings, preprocess
from openmind_tools.reads import Reader
from openmind_tools.storage import Place, transport_error

FORMATS = ("zarr", "wds")
ZARR_DIR, STAGING_DIR, RUN_FILE = "store.zarr", ".staging.zarr", ".run.json"
MANIFEST_BATCH = 2000  # manifest rows per parquet row group, built and written at a time
_SAMPLE_JSON = ("id", "affine", "spacing", "settings_hash")  # manifest fields copied into each tar sample


@dataclass(frozen=True)
class Summary:
    converted: int  # volumes in the manifest, whichever run converted them
    failed: int  # rows of errors.parquet
    skipped: int  # already in the journal from an earlier run (converted or failed)
    attempted: int  # volumes this run converted or tried to
    source_bytes: int
    stored_bytes: dict[str, int]  # per store: zarr, wds
    seconds: float
    out: str  # the output folder or URL

    def __str__(self) -> str:
        rate = self.attempted / max(self.seconds, 1e-9)
        text = (
            f"{self.converted} volumes in the manifest, {self.failed} failed; this run tried {self.attempted}, "
            f"{self.skipped} were done before; "
            f"{self.source_bytes / 1e6:.1f} MB of NIfTI in -> "
            + ", ".join(
                f"{k} {n / 1e6:.1f} MB ({n / max(self.source_bytes, 1):.2f}x)" for k, n in self.stored_bytes.items()
            )
            + f"; {self.seconds:.1f} s, {rate:.2f} volumes/s\n"
            f"manifest: {self.out}/{MANIFEST}"
        )
        if self.failed:
            text += f"\nfailures and their reasons: {self.out}/{ERRORS}"
        return text


def convert(
    root: str | Path,
    out: str | Path,
    settings: PreprocessSettings = PreprocessSettings(),
    formats: Sequence[str] = FORMATS,
    modalities: Sequence[str] | None = None,
    limit: int | None = None,
    shard_bytes: int = 10**9,
    client: Any = None,
    retry_errors: bool = False,
    progress: bool = True,
    codec: str = zarr_store.DEFAULT_CODEC,
    storage_options: dict[str, Any] | None = None,
) -> Summary:
    """Convert `root` into `out`; `client` is a dask.distributed Client (None runs in this process).

    `root` and `out` are folders or fsspec URLs (`s3://...`; `storage_options` reach both filesystems).
    `codec` is the Zarr chunks' blosc codec (`zarr_store.CODECS`; its comment gives the measured trade-off).
    """
    start = time.perf_counter()
    formats = _check_formats(formats)
    out = Place.of(out, storage_options)
    corpus = discover(root, modalities=modalities, limit=limit, storage_options=storage_options)
    if shard_bytes < 1:
        raise ConfigError(f"shard_bytes: expected at least 1, got {shard_bytes}")
    if codec not in zarr_store.CODECS:
        raise ConfigError(f"codec: expected one of {sorted(zarr_store.CODECS)}, got {codec!r}")
    run = {"root": corpus.root.url, "modalities": list(modalities) if modalities else None, "limit": limit,
           "shard_bytes": shard_bytes, "codec": codec}  # fmt: skip
    try:
        out.mkdir()
        with exclusive(out) as lease:
            return _convert_locked(corpus, out, lease, settings, formats, shard_bytes, client, retry_errors, progress,
                                   start, run)  # fmt: skip
    except (MachineError, ConfigError):
        raise
    except Exception as e:  # the driver's own reads and writes: journal, shards, manifest
        machine = machine_error(e, f"writing into {out}") or _transport(e, f"writing into {out}")
        if machine is None and not out.local and isinstance(e, (FileNotFoundError, PermissionError)):
            raise ConfigError(f"{out}: cannot write there ({type(e).__name__}: {e}): does the bucket exist, and may "
                              "these credentials write to it?") from None  # fmt: skip
        if machine is None:
            raise
        raise machine from e


def _convert_locked(
    corpus: Corpus,
    out: Place,
    lease: Lease,
    settings: PreprocessSettings,
    formats: tuple[str, ...],
    shard_bytes: int,
    client: Any,
    retry_errors: bool,
    progress: bool,
    start: float,
    run: dict[str, Any],
) -> Summary:
    _claim(out, settings, formats, run)
    zarr_root = out / (ZARR_DIR if "zarr" in formats else STAGING_DIR)
    zarr_store.clean_partial(zarr_root)
    if out.local:  # a tar shard a kill cut off left up to --shard-size under a temporary name
        for folder in (out, out / "shards"):
            remove_stale_temporaries(folder.path)
    zarr_store.write_hierarchy(zarr_root, ())  # the store's format, which readers check first

    journal = Journal(out, lease)
    entries = journal.read()
    done = {i: st for i, st in entries.status.items() if not retry_errors or st == "ok"}  # id -> "ok" | "error"
    # Trust the store over the journal: a sample deleted (or removed by `verify --repair`) is converted again.
    present = zarr_store.stored(zarr_root, [i for i, st in done.items() if st == "ok"])
    done = {i: st for i, st in done.items() if st != "ok" or i in present}
    todo = [img for img in corpus.images if img.id not in done]
    with journal as log:
        results = run_tasks(_convert_one, todo, client, progress=progress, what="convert", on_error=_worker_died,
                            zarr_root=zarr_root, settings=settings, codec=run["codec"],
                            source=corpus.root)  # fmt: skip
        for record in results:
            if record["status"] == "machine":  # not the input's fault: nothing journaled, the rerun converts it
                raise MachineError(f"{record['reason']}; nothing was recorded against {record['id']}, and rerunning "
                                   "the same command resumes")  # fmt: skip
            done[record["id"]] = record["status"]
            if record["status"] == "ok":
                entries.shapes[record["id"]] = tuple(record["shape"])
            log.append({"volume": record})
        ok = [img.id for img in corpus.images if done[img.id] == "ok"]  # sorted by id, as the corpus is
        zarr_store.write_hierarchy(zarr_root, ok)
        shards = entries.shards
        if "wds" in formats:
            _pack_shards(out, zarr_root, [(i, entries.shapes[i]) for i in ok], shards, shard_bytes, client, progress,
                         log)  # fmt: skip

    lease.check()  # a run another has taken over leaves the manifest to it
    meta = {"settings": settings.to_dict(), "settings_hash": settings.digest(), "formats": list(formats)}
    totals = {"source_nbytes": 0, **{f"{f}_nbytes": 0 for f in formats}}
    with tempfile.TemporaryDirectory(prefix="openmind-convert-") as scratch:
        latest = latest_records(journal, Path(scratch) / "records.sqlite", {img.id for img in corpus.images})
        errors = _errors([r for r in latest.rows("error")], corpus.rejected)
        cells = _ShardCells(out, shards)

        def batches() -> Iterator[pd.DataFrame]:  # the manifest in id order, MANIFEST_BATCH rows at a time
            chunk = []
            for record in itertools.chain(latest.rows("ok"), [None]):
                if record is not None:
                    chunk.append(record)
                if chunk and (record is None or len(chunk) == MANIFEST_BATCH):
                    yield _manifest(corpus, chunk, formats, cells)
                    chunk = []

        converted = 0
        for rows in write_batches(batches, out / MANIFEST, meta, empty=_manifest(corpus, [], formats, cells)):
            converted += len(rows)
            for column in totals:
                totals[column] += int(rows[column].sum())
        latest.close()
    write_table(errors, out / ERRORS, meta)
    return Summary(
        converted=converted,
        failed=len(errors),
        skipped=len(corpus.images) - len(todo),
        attempted=len(todo),
        source_bytes=totals.pop("source_nbytes"),
        stored_bytes={column.removesuffix("_nbytes"): n for column, n in totals.items()},
        seconds=time.perf_counter() - start,
        out=out.url,
    )


def _convert_one(
    image: SourceImage, zarr_root: Place, settings: PreprocessSettings, codec: str, source: Place
) -> dict[str, Any]:
    """One volume, on a worker: read its files from `source`'s filesystem, preprocess, write, and return its journal
    record (never raises). A failure of the object store, not of the input, comes back as status "machine"."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # dask workers are the parallelism
    numcodecs.blosc.set_nthreads(1)
    try:
        result = preprocess(image.image, image.anatomy_mask, image.deface_mask, settings, fs=source.fs)
        record = {"id": image.id, "status": "ok", **result.meta, "settings_hash": settings.digest(),
                  "converter_version": __version__}  # fmt: skip
        attrs = {k: record[k] for k in _SAMPLE_JSON}
        nbytes = zarr_store.write_volume(zarr_root, image.id, result.volume, attrs, codec)
    except InputError as e:
        return _failure(image, type(e).__name__, str(e))
    except Exception as e:  # an unforeseen failure of one input must not stop a 114k-volume run
        where = f"converting {source.fs.unstrip_protocol(image.image)}"
        if (machine := machine_error(e, where) or _transport(e, where)) is not None:
            return {"id": image.id, "status": "machine", "reason": str(machine)}
        return _failure(image, type(e).__name__, f"{image.image}: {type(e).__name__}: {e}")
    return {
        **record,
        "checksum": result.volume.checksum(),
        "source_nbytes": result.source_nbytes,
        "zarr_nbytes": nbytes,
    }


def _transport(error: BaseException, doing: str) -> MachineError | None:
    """The MachineError a failed request to an object store stands for (after its retries), else None."""
    if not transport_error(error):
        return None
    return MachineError(f"{doing}: the object store failed ({type(error).__name__}: {error}); check the endpoint, "
                        "the network and the credentials, then rerun: it resumes")  # fmt: skip


def _failure(image: SourceImage, error_type: str, reason: str) -> dict[str, Any]:
    return {"id": image.id, "status": "error", "source_path": str(image.image), "error_type": error_type,
            "reason": reason}  # fmt: skip


def _pack_shards(
    out: Place,
    zarr_root: Place,
    volumes: list[tuple[str, tuple[int, int, int]]],  # (id, shape) of every converted volume, in id order
    packed: dict[str, dict[str, Any]],  # shard name -> journal entry; updated with the shards written here
    shard_bytes: int,
    client: Any,
    progress: bool,
    log: Any,
) -> None:
    """Pack converted volumes into tar shards whose members never change once a shard is written.

    A shard the journal records keeps its members (a missing file is written again with them). Volumes in
    no recorded shard are cut, in id order, at `shard_bytes` into new shards numbered after the last one,
    so a retried or added volume writes one new shard and rewrites none. A kill -9 while packing resumes
    to the shards an uninterrupted run writes: the rest is cut from the same boundary, the same way.
    """
    ok = dict(volumes)
    existing = set((out / "shards").find())  # one listing (a stat each would be a request each on S3)

    def member(volume_id: str) -> tuple[str, tuple[int, ...]]:
        return volume_id, ok[volume_id]

    jobs = []
    for name, entry in sorted(packed.items()):
        members = [v for v in entry["ids"] if v in ok]  # a smaller --limit may not convert them all
        if members and (out / name).path not in existing:
            jobs.append((name, [member(v) for v in members]))
    placed = {v for entry in packed.values() for v in entry["ids"]}
    first = 1 + max((wds_store.shard_index(name) for name in packed), default=-1)
    plan: list[list[str]] = [[]]
    size = 0
    for volume_id, shape in volumes:
        if volume_id in placed:
            continue
        nbytes = wds_store.sample_nbytes(shape)
        if plan[-1] and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(volume_id)
        size += nbytes
    for index, ids in enumerate((ids for ids in plan if ids), start=first):
        jobs.append((wds_store.shard_name(index), [member(v) for v in ids]))
    planned = set(packed) | {name for name, _ in jobs}
    for stale in existing:
        name = f"shards/{stale.rsplit('/', 1)[-1]}"
        if ".tar" in name and not name.startswith("shards/.") and name not in planned:
            (out / name).remove()
    packed_now = run_tasks(_pack_one, jobs, client, progress=progress, what="pack", unit="shard", out=out,
                           zarr_root=zarr_root)  # fmt: skip
    for name, ids, samples in packed_now:
        packed[name] = {"shard": name, "ids": ids, **{field: [getattr(s, field) for s in samples]
                                                      for field in wds_store.Sample._fields}}  # fmt: skip
        log.append(packed[name])


def _pack_one(
    job: tuple[str, list[tuple[str, tuple[int, int, int]]]], out: Place, zarr_root: Place
) -> tuple[str, list[str], list[wds_store.Sample]]:
    """One shard, on a worker: its volumes read from the Zarr copy, each with the attributes its group records (the
    manifest fields a tar sample carries), so the driver sends ids and shapes, not every row."""
    numcodecs.blosc.set_nthreads(1)
    name, members = job
    reader = Reader(zarr_root.fs)

    def sample(volume_id: str, shape: tuple[int, int, int]) -> tuple[str, Any, dict[str, Any]]:
        group = (zarr_root / zarr_store.group_path(volume_id) / "zarr.json").path
        attrs = zarr_store.group_attributes(group, f"volume {volume_id}", reader)
        return volume_id, zarr_store.read_volume(zarr_root.path, volume_id, shape, reader), {
            k: attrs[k] for k in _SAMPLE_JSON}  # fmt: skip

    sizes = wds_store.write_shard(out / name, (sample(vid, shape) for vid, shape in members))
    return name, [vid for vid, _ in members], list(sizes.values())


def _worker_died(image: SourceImage, error: Exception) -> dict[str, Any]:
    return _failure(image, type(error).__name__, f"{image.image}: the worker converting it died ({error})")


def _claim(out: Place, settings: PreprocessSettings, formats: tuple[str, ...], inputs: dict[str, Any]) -> None:
    """Refuse to resume into a folder converted with other settings or formats (it would mix them).

    `.run.json` also records the inputs (root, modalities, limit, shard size), so `repair` reruns exactly this.
    """
    run = {"settings": settings.to_dict(), "formats": list(formats), "converter_version": __version__, **inputs}
    path = out / RUN_FILE
    if path.is_file():
        previous = json.loads(path.read_bytes())
        if previous.get("converter_version") != __version__:  # another store layout: mixing would break reads
            raise ConfigError(
                f"{out} was written by converter {previous.get('converter_version')}, this is {__version__}: "
                "convert into a new output folder"
            )
        kept = ("settings", "formats", "codec")
        if any(previous.get(k) != run[k] for k in kept):
            was, now = ({k: r.get(k) for k in kept} for r in (previous, run))
            raise ConfigError(f"{out} holds a conversion with {was}; this run asks for {now}: use another output "
                              "folder")  # fmt: skip
    path.write_bytes(json.dumps(run, indent=1).encode())


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(f.strip() for f in formats if f.strip()))
    if not formats or any(f not in FORMATS for f in formats):
        raise ConfigError(f"formats: expected one or more of {FORMATS}, got {list(formats)}")
    return formats


class _ShardCells:
    """The manifest's wds_* cells of each packed volume, looked up per batch (an index per id, not a row)."""

    def __init__(self, out: Place, shards: dict[str, dict[str, Any]]) -> None:
        existing = set((out / "shards").find())
        self.shards = {name: e for name, e in shards.items() if (out / name).path in existing}
        self.where = {vid: (name, i) for name, e in self.shards.items() for i, vid in enumerate(e["ids"])}

    def __call__(self, volume_id: str) -> dict[str, Any]:
        name, i = self.where[volume_id]
        entry = self.shards[name]
        sample = wds_store.Sample(*(entry[field][i] for field in wds_store.Sample._fields))
        return wds_store.manifest_cells(name, volume_id, sample)


def _manifest(
    corpus: Corpus,
    records: list[dict[str, Any]],
    formats: tuple[str, ...],
    cells: _ShardCells,
) -> pd.DataFrame:
    ours = pd.DataFrame(records).drop(columns=["status"], errors="ignore") if records else pd.DataFrame({"id": []})
    rows = [row_of(corpus, i) for i in ours["id"]]
    images = [corpus.images[k] for k in rows]
    ours.insert(1, "dataset", [img.dataset for img in images])
    ours.insert(2, "subject", [img.subject for img in images])
    ours.insert(3, "session", [img.session for img in images])
    ours.insert(4, "source_path", [corpus.root.relative(img.image) for img in images])
    if "zarr" in formats:
        ours["zarr_store"] = ZARR_DIR
        ours["zarr_array"] = [zarr_store.group_path(i) for i in ours["id"]]
    else:
        ours = ours.drop(columns=["zarr_nbytes"], errors="ignore")
    if "wds" in formats:
        wds = pd.DataFrame([cells(i) for i in ours["id"]], index=ours.index)
        ours = pd.concat([ours.drop(columns=wds.columns, errors="ignore"), wds], axis=1)
    csv = corpus.table.iloc[rows].reset_index(drop=True)
    csv = csv.rename(columns={c: f"csv_{c}" for c in csv.columns if c in ours.columns})
    return pd.concat([ours.reset_index(drop=True), csv], axis=1).sort_values("id", ignore_index=True)


def _errors(records: list[dict[str, Any]], rejected: list[Rejected]) -> pd.DataFrame:
    columns = ["id", "source_path", "error_type", "reason"]
    rows = [{k: r[k] for k in columns} for r in records] + [asdict(r) for r in rejected]
    return pd.DataFrame(rows, columns=columns).sort_values("id", ignore_index=True)
