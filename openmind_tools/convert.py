"""Convert a corpus into stores + manifest: discover -> preprocess -> write -> manifest rows, on dask.

Resumable by construction: volumes are submitted through a bounded window (`openmind_tools.parallel`),
and each finished volume (or failure) is appended to `OUT/.journal.jsonl` by the driver as it arrives,
after its sample was renamed into place. Tar shards are packed afterwards, each written whole and
renamed: volumes in no shard yet are cut in id order at `shard_bytes` into new shards, and a written
shard's members never change, so a retry or an added volume rewrites no shard. A killed run rerun with
the same command skips what the journal holds, so its manifest equals an uninterrupted run's;
`manifest.parquet` and `errors.parquet` are rewritten from the journal at the end. With tar shards
alone, volumes are staged in a hidden `.staging.zarr` that is kept, so a later run over more inputs
(a larger --limit, --retry-errors) can pack them.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numcodecs
import pandas as pd
import SimpleITK as sitk

from openmind_tools import __version__, wds_store, zarr_store
from openmind_tools.corpus import Corpus, Rejected, SourceImage, discover
from openmind_tools.errors import ConfigError, InputError, MachineError
from openmind_tools.files import atomic_write_text, machine_error, remove_stale_temporaries
from openmind_tools.manifest_io import ERRORS, MANIFEST, write_table
from openmind_tools.parallel import run_tasks
from openmind_tools.preprocess import PreprocessSettings, preprocess

FORMATS = ("zarr", "wds")
ZARR_DIR, STAGING_DIR, JOURNAL, RUN_FILE = "store.zarr", ".staging.zarr", ".journal.jsonl", ".run.json"
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
    out: Path

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
            f"manifest: {self.out / MANIFEST}"
        )
        if self.failed:
            text += f"\nfailures and their reasons: {self.out / ERRORS}"
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
) -> Summary:
    """Convert `root` into `out`; `client` is a dask.distributed Client (None runs in this process).

    `codec` is the Zarr chunks' blosc codec (`zarr_store.CODECS`; its comment gives the measured trade-off).
    """
    start = time.perf_counter()
    formats = _check_formats(formats)
    out = Path(out)
    corpus = discover(root, modalities=modalities, limit=limit)
    if shard_bytes < 1:
        raise ConfigError(f"shard_bytes: expected at least 1, got {shard_bytes}")
    if codec not in zarr_store.CODECS:
        raise ConfigError(f"codec: expected one of {sorted(zarr_store.CODECS)}, got {codec!r}")
    run = {"root": str(Path(root).resolve()), "modalities": list(modalities) if modalities else None, "limit": limit,
           "shard_bytes": shard_bytes, "codec": codec}  # fmt: skip
    try:
        out.mkdir(parents=True, exist_ok=True)
        with _exclusive(out):
            return _convert_locked(corpus, out, settings, formats, shard_bytes, client, retry_errors, progress, start,
                                   run)  # fmt: skip
    except MachineError:
        raise
    except OSError as e:  # the driver's own writes: journal, shards, manifest
        machine = machine_error(e, f"writing into {out}")
        if machine is None:
            raise
        raise machine from e


def _convert_locked(
    corpus: Corpus,
    out: Path,
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
    for folder in (out, out / "shards"):  # a tar shard a kill cut off left up to --shard-size under a temporary name
        remove_stale_temporaries(folder)

    journal = _read_journal(out / JOURNAL)
    done = {i: r for i, r in journal.volumes.items() if not retry_errors or r["status"] == "ok"}
    # Trust the store over the journal: a sample deleted (or removed by `verify --repair`) is converted again.
    done = {i: r for i, r in done.items() if r["status"] != "ok" or zarr_store.is_stored(zarr_root, i)}
    todo = [img for img in corpus.images if img.id not in done]
    with _open_journal(out / JOURNAL) as log:
        results = run_tasks(_convert_one, todo, client, progress=progress, what="convert", on_error=_worker_died,
                            zarr_root=str(zarr_root), settings=settings, codec=run["codec"])  # fmt: skip
        for record in results:
            if record["status"] == "machine":  # not the input's fault: nothing journaled, the rerun converts it
                raise MachineError(f"{record['reason']}; nothing was recorded against {record['id']}, and rerunning "
                                   "the same command resumes")  # fmt: skip
            done[record["id"]] = record
            _append(log, {"volume": record})
        ok = sorted(i for i in (img.id for img in corpus.images) if done[i]["status"] == "ok")
        zarr_store.write_hierarchy(zarr_root, ok)
        shards = journal.shards
        if "wds" in formats:
            _pack_shards(out, zarr_root, [done[i] for i in ok], shards, shard_bytes, client, progress, log)

    records = [done[img.id] for img in corpus.images]
    manifest = _manifest(corpus, [r for r in records if r["status"] == "ok"], formats, shards, out)
    errors = _errors([r for r in records if r["status"] == "error"], corpus.rejected)
    meta = {"settings": settings.to_dict(), "settings_hash": settings.digest(), "formats": list(formats)}
    write_table(manifest, out / MANIFEST, meta)
    write_table(errors, out / ERRORS, meta)
    stored = {f: int(manifest[f"{f}_nbytes"].sum()) if len(manifest) else 0 for f in formats}
    return Summary(
        converted=len(manifest),
        failed=len(errors),
        skipped=len(corpus.images) - len(todo),
        attempted=len(todo),
        source_bytes=int(manifest["source_nbytes"].sum()) if len(manifest) else 0,
        stored_bytes=stored,
        seconds=time.perf_counter() - start,
        out=out,
    )


def _convert_one(image: SourceImage, zarr_root: str, settings: PreprocessSettings, codec: str) -> dict[str, Any]:
    """One volume, on a worker: preprocess, write, and return its journal record (never raises)."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # dask workers are the parallelism
    numcodecs.blosc.set_nthreads(1)
    try:
        result = preprocess(image.image, image.anatomy_mask, image.deface_mask, settings)
        record = {"id": image.id, "status": "ok", **result.meta, "settings_hash": settings.digest(),
                  "converter_version": __version__}  # fmt: skip
        attrs = {k: record[k] for k in _SAMPLE_JSON}
        nbytes = zarr_store.write_volume(zarr_root, image.id, result.volume, attrs, codec)
    except InputError as e:
        return _failure(image, type(e).__name__, str(e))
    except OSError as e:
        if (machine := machine_error(e, f"converting {image.image}")) is not None:
            return {"id": image.id, "status": "machine", "reason": str(machine)}
        return _failure(image, type(e).__name__, f"{image.image}: {type(e).__name__}: {e}")
    except Exception as e:  # an unforeseen failure of one input must not stop a 114k-volume run
        return _failure(image, type(e).__name__, f"{image.image}: {type(e).__name__}: {e}")
    return {
        **record,
        "checksum": result.volume.checksum(),
        "source_nbytes": sum(p.stat().st_size for p in (image.image, image.anatomy_mask, image.deface_mask) if p),
        "zarr_nbytes": nbytes,
    }


def _failure(image: SourceImage, error_type: str, reason: str) -> dict[str, Any]:
    return {"id": image.id, "status": "error", "source_path": str(image.image), "error_type": error_type,
            "reason": reason}  # fmt: skip


def _pack_shards(
    out: Path,
    zarr_root: Path,
    records: list[dict[str, Any]],
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
    ok = {r["id"]: r for r in records}

    def member(volume_id: str) -> tuple[str, tuple[int, ...], dict[str, Any]]:
        r = ok[volume_id]
        return r["id"], tuple(r["shape"]), {k: r[k] for k in _SAMPLE_JSON}

    jobs = []
    for name, entry in sorted(packed.items()):
        members = [v for v in entry["ids"] if v in ok]  # a smaller --limit may not convert them all
        if members and not (out / name).is_file():
            jobs.append((name, [member(v) for v in members]))
    placed = {v for entry in packed.values() for v in entry["ids"]}
    first = 1 + max((wds_store.shard_index(name) for name in packed), default=-1)
    plan: list[list[str]] = [[]]
    size = 0
    for record in records:
        if record["id"] in placed:
            continue
        nbytes = wds_store.sample_nbytes(record["shape"])
        if plan[-1] and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(record["id"])
        size += nbytes
    for index, ids in enumerate((ids for ids in plan if ids), start=first):
        jobs.append((wds_store.shard_name(index), [member(v) for v in ids]))
    planned = set(packed) | {name for name, _ in jobs}
    for stale in (out / "shards").glob("*.tar*") if (out / "shards").is_dir() else ():
        if f"shards/{stale.name}" not in planned:
            stale.unlink()
    packed_now = run_tasks(_pack_one, jobs, client, progress=progress, what="pack", unit="shard", out=str(out),
                           zarr_root=str(zarr_root))  # fmt: skip
    for name, ids, samples in packed_now:
        packed[name] = {"shard": name, "ids": ids, **{field: [getattr(s, field) for s in samples]
                                                      for field in wds_store.Sample._fields}}  # fmt: skip
        _append(log, packed[name])


def _pack_one(
    job: tuple[str, list[tuple[str, tuple[int, int, int], dict[str, Any]]]], out: str, zarr_root: str
) -> tuple[str, list[str], list[wds_store.Sample]]:
    numcodecs.blosc.set_nthreads(1)
    name, members = job
    samples = ((vid, zarr_store.read_volume(zarr_root, vid, shape), meta) for vid, shape, meta in members)
    sizes = wds_store.write_shard(Path(out) / name, samples)
    return name, [vid for vid, _, _ in members], list(sizes.values())


def _worker_died(image: SourceImage, error: Exception) -> dict[str, Any]:
    return _failure(image, type(error).__name__, f"{image.image}: the worker converting it died ({error})")


@dataclass
class _Journal:
    volumes: dict[str, dict[str, Any]]
    shards: dict[str, dict[str, Any]]  # shard name -> {"ids": [...], and per id each field of wds_store.Sample}


def _read_journal(path: Path) -> _Journal:
    journal = _Journal({}, {})
    if not path.is_file():
        return journal
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed run may be cut short
            continue
        if "volume" in entry:
            journal.volumes[entry["volume"]["id"]] = entry["volume"]
        elif "shard" in entry:
            journal.shards[entry["shard"]] = entry
    return journal


def _open_journal(path: Path) -> TextIO:
    """The journal for appending, after cutting off a line a killed run left unfinished (else the next
    entry would be glued to it and lost)."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    return path.open("a")


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One conversion per output folder: a second one would delete the first one's half-written arrays."""
    with (out / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{out}: another openmind-convert is writing into this folder") from None
        yield


def _append(log: Any, entry: dict[str, Any]) -> None:
    log.write(json.dumps(entry) + "\n")
    log.flush()


def _claim(out: Path, settings: PreprocessSettings, formats: tuple[str, ...], inputs: dict[str, Any]) -> None:
    """Refuse to resume into a folder converted with other settings or formats (it would mix them).

    `.run.json` also records the inputs (root, modalities, limit, shard size), so `repair` reruns exactly this.
    """
    run = {"settings": settings.to_dict(), "formats": list(formats), "converter_version": __version__, **inputs}
    path = out / RUN_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
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
    atomic_write_text(path, json.dumps(run, indent=1))


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(f.strip() for f in formats if f.strip()))
    if not formats or any(f not in FORMATS for f in formats):
        raise ConfigError(f"formats: expected one or more of {FORMATS}, got {list(formats)}")
    return formats


def _manifest(
    corpus: Corpus,
    records: list[dict[str, Any]],
    formats: tuple[str, ...],
    shards: dict[str, dict[str, Any]],
    out: Path,
) -> pd.DataFrame:
    ours = pd.DataFrame(records).drop(columns=["status"], errors="ignore") if records else pd.DataFrame({"id": []})
    images = {img.id: img for img in corpus.images}
    ours.insert(1, "dataset", [images[i].dataset for i in ours["id"]])
    ours.insert(2, "subject", [images[i].subject for i in ours["id"]])
    ours.insert(3, "session", [images[i].session for i in ours["id"]])
    ours.insert(4, "source_path", [str(images[i].image.relative_to(corpus.root)) for i in ours["id"]])
    if "zarr" in formats:
        ours["zarr_store"] = ZARR_DIR
        ours["zarr_array"] = [zarr_store.group_path(i) for i in ours["id"]]
    else:
        ours = ours.drop(columns=["zarr_nbytes"], errors="ignore")
    if "wds" in formats:
        cells = {
            vid: wds_store.manifest_cells(name, vid, wds_store.Sample(*values))
            for name, entry in shards.items()
            if (out / name).is_file()
            for vid, *values in zip(entry["ids"], *(entry[f] for f in wds_store.Sample._fields), strict=True)
        }
        wds = pd.DataFrame([cells[i] for i in ours["id"]], index=ours.index)
        ours = pd.concat([ours.drop(columns=wds.columns, errors="ignore"), wds], axis=1)
    csv = corpus.table.loc[ours["id"]].reset_index(drop=True)
    csv = csv.rename(columns={c: f"csv_{c}" for c in csv.columns if c in ours.columns})
    return pd.concat([ours.reset_index(drop=True), csv], axis=1).sort_values("id", ignore_index=True)


def _errors(records: list[dict[str, Any]], rejected: list[Rejected]) -> pd.DataFrame:
    columns = ["id", "source_path", "error_type", "reason"]
    rows = [{k: r[k] for k in columns} for r in records] + [asdict(r) for r in rejected]
    return pd.DataFrame(rows, columns=columns).sort_values("id", ignore_index=True)
