"""Convert a corpus into stores + manifest: discover -> preprocess -> write -> manifest rows, on dask.

Resumable by construction: volumes are submitted through a bounded window (`openmind_tools.parallel`),
and each finished volume (or failure) is journaled by the driver as it arrives, after its sample is in place:
appended to `OUT/.journal.jsonl` on local disk; on an object store (no append, no rename) buffered and
written as one whole object per batch under `OUT/.journal/`, so a kill loses at most a batch, which the
rerun converts again into the same objects. Tar shards are packed afterwards, each written whole and
renamed: volumes in no shard yet are cut in id order at `shard_bytes` into new shards, and a written
shard's members never change, so a retry or an added volume rewrites no shard. A killed run rerun with
the same command skips what the journal holds, so its manifest equals an uninterrupted run's;
`manifest.parquet` and `errors.parquet` are rewritten from the journal at the end. With tar shards
alone, volumes are staged in a hidden `.staging.zarr` that is kept, so a later run over more inputs
(a larger --limit, --retry-errors) can pack them. ROOT and OUT may be fsspec URLs (`s3://bucket/prefix`):
workers read the inputs and write the outputs there themselves, so no machine needs a shared file system.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numcodecs
import pandas as pd
import SimpleITK as sitk

from openmind_tools import __version__, wds_store, zarr_store
from openmind_tools.corpus import Corpus, Rejected, SourceImage, discover
from openmind_tools.errors import ConfigError, InputError, MachineError
from openmind_tools.files import machine_error, remove_stale_temporaries
from openmind_tools.manifest_io import ERRORS, MANIFEST, write_table
from openmind_tools.parallel import run_tasks
from openmind_tools.preprocess import PreprocessSettings, preprocess
from openmind_tools.reads import Reader
from openmind_tools.storage import Place, transport_error

FORMATS = ("zarr", "wds")
ZARR_DIR, STAGING_DIR, JOURNAL, RUN_FILE = "store.zarr", ".staging.zarr", ".journal.jsonl", ".run.json"
JOURNAL_OBJECTS, LOCK = ".journal", ".lock"  # on an object store: one journal object per batch; the lock object
# An object store's journal is written every 64 entries or 2 s: a kill loses at most that, and 114k volumes on a
# cluster converting 10 per second leave ~6k small objects, read back in a minute or two by a resumed run
JOURNAL_BATCH, JOURNAL_SECONDS = 64, 2.0
LOCK_STALE_S, LOCK_BEAT_S = 120.0, 30.0  # an object store's lock: refreshed every 30 s, taken over after 120 s
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
        with _exclusive(out):
            return _convert_locked(corpus, out, settings, formats, shard_bytes, client, retry_errors, progress, start,
                                   run)  # fmt: skip
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

    journal = _Journal(out)
    entries = journal.read()
    done = {i: r for i, r in entries.volumes.items() if not retry_errors or r["status"] == "ok"}
    # Trust the store over the journal: a sample deleted (or removed by `verify --repair`) is converted again.
    present = zarr_store.stored(zarr_root, [i for i, r in done.items() if r["status"] == "ok"])
    done = {i: r for i, r in done.items() if r["status"] != "ok" or i in present}
    todo = [img for img in corpus.images if img.id not in done]
    with journal as log:
        results = run_tasks(_convert_one, todo, client, progress=progress, what="convert", on_error=_worker_died,
                            zarr_root=zarr_root, settings=settings, codec=run["codec"],
                            source=corpus.root)  # fmt: skip
        for record in results:
            if record["status"] == "machine":  # not the input's fault: nothing journaled, the rerun converts it
                raise MachineError(f"{record['reason']}; nothing was recorded against {record['id']}, and rerunning "
                                   "the same command resumes")  # fmt: skip
            done[record["id"]] = record
            log.append({"volume": record})
        ok = sorted(i for i in (img.id for img in corpus.images) if done[i]["status"] == "ok")
        zarr_store.write_hierarchy(zarr_root, ok)
        shards = entries.shards
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
        out=out.url,
    )


def _convert_one(
    image: SourceImage, zarr_root: Place, settings: PreprocessSettings, codec: str, source: Place
) -> dict[str, Any]:
    """One volume, on a worker: read its files from `source`'s filesystem, preprocess, write, and return its journal
    record (never raises). A failure of the object store, not of the input, comes back as status "machine"."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # dask workers are the parallelism
    numcodecs.blosc.set_nthreads(1)
    files = [p for p in (image.image, image.anatomy_mask, image.deface_mask) if p]
    try:
        result = preprocess(image.image, image.anatomy_mask, image.deface_mask, settings, fs=source.fs)
        record = {"id": image.id, "status": "ok", **result.meta, "settings_hash": settings.digest(),
                  "converter_version": __version__}  # fmt: skip
        attrs = {k: record[k] for k in _SAMPLE_JSON}
        nbytes = zarr_store.write_volume(zarr_root, image.id, result.volume, attrs, codec)
        source_nbytes = sum(Place(source.fs, p).size() for p in files)
    except InputError as e:
        return _failure(image, type(e).__name__, str(e))
    except Exception as e:  # an unforeseen failure of one input must not stop a 114k-volume run
        where = f"converting {source.fs.unstrip_protocol(image.image)}"
        if (machine := machine_error(e, where) or _transport(e, where)) is not None:
            return {"id": image.id, "status": "machine", "reason": str(machine)}
        return _failure(image, type(e).__name__, f"{image.image}: {type(e).__name__}: {e}")
    return {**record, "checksum": result.volume.checksum(), "source_nbytes": source_nbytes, "zarr_nbytes": nbytes}


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
    existing = set((out / "shards").find())  # one listing (a stat each would be a request each on S3)

    def member(volume_id: str) -> tuple[str, tuple[int, ...], dict[str, Any]]:
        r = ok[volume_id]
        return r["id"], tuple(r["shape"]), {k: r[k] for k in _SAMPLE_JSON}

    jobs = []
    for name, entry in sorted(packed.items()):
        members = [v for v in entry["ids"] if v in ok]  # a smaller --limit may not convert them all
        if members and (out / name).path not in existing:
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
    job: tuple[str, list[tuple[str, tuple[int, int, int], dict[str, Any]]]], out: Place, zarr_root: Place
) -> tuple[str, list[str], list[wds_store.Sample]]:
    numcodecs.blosc.set_nthreads(1)
    name, members = job
    reader = Reader(zarr_root.fs)
    samples = ((vid, zarr_store.read_volume(zarr_root.path, vid, shape, reader), meta) for vid, shape, meta in members)
    sizes = wds_store.write_shard(out / name, samples)
    return name, [vid for vid, _, _ in members], list(sizes.values())


def _worker_died(image: SourceImage, error: Exception) -> dict[str, Any]:
    return _failure(image, type(error).__name__, f"{image.image}: the worker converting it died ({error})")


@dataclass
class _Entries:
    volumes: dict[str, dict[str, Any]]
    shards: dict[str, dict[str, Any]]  # shard name -> {"ids": [...], and per id each field of wds_store.Sample}


class _Journal:
    """What this conversion finished, read back by a resumed run: later entries win.

    On local disk one file, each entry appended and flushed as it arrives (a kill -9 may cut the last line
    short: reading skips it, appending cuts it off first). An object store cannot append, so entries are
    buffered and written as whole objects, `OUT/.journal/NNNNNNNN.jsonl`, numbered after the ones found: every
    `JOURNAL_BATCH` entries, after `JOURNAL_SECONDS`, and at the end. A kill loses the unwritten batch; those
    volumes are converted again, into the same objects.
    """

    def __init__(self, out: Place) -> None:
        self.out, self.local = out, out.local
        self.objects = out / JOURNAL_OBJECTS
        self.buffer: list[str] = []
        self.flushed = time.monotonic()
        self.next = 0
        self.file: Any = None

    def read(self) -> _Entries:
        entries = _Entries({}, {})
        if self.local:
            path = self.out / JOURNAL
            texts = [path.read_bytes().decode(errors="replace")] if path.is_file() else []
        else:
            names = [p for p in self.objects.find() if p.endswith(".jsonl")]
            self.next = 1 + max((int(n.rsplit("/", 1)[-1].split(".")[0]) for n in names), default=-1)
            texts = [Place(self.out.fs, n).read_bytes().decode(errors="replace") for n in names]
        for line in (line for text in texts for line in text.splitlines()):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run may be cut short
                continue
            if "volume" in entry:
                entries.volumes[entry["volume"]["id"]] = entry["volume"]
            elif "shard" in entry:
                entries.shards[entry["shard"]] = entry
        return entries

    def __enter__(self) -> _Journal:
        if self.local:
            path = Path(self.out.path) / JOURNAL
            if path.is_file():  # cut off a line a killed run left unfinished, else the next entry is glued to it
                data = path.read_bytes()
                if data and not data.endswith(b"\n"):
                    with path.open("r+b") as f:
                        f.truncate(data.rfind(b"\n") + 1)
            self.file = path.open("a")
        return self

    def append(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry) + "\n"
        if self.local:
            self.file.write(line)
            self.file.flush()
            return
        self.buffer.append(line)
        if len(self.buffer) >= JOURNAL_BATCH or time.monotonic() - self.flushed >= JOURNAL_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            (self.objects / f"{self.next:08d}.jsonl").write_bytes("".join(self.buffer).encode())
            self.next += 1
            self.buffer = []
        self.flushed = time.monotonic()

    def __exit__(self, kind: Any, *_: Any) -> None:
        if self.local:
            self.file.close()
        elif kind is None or issubclass(kind, (MachineError, KeyboardInterrupt)):  # what finished stays finished
            self.flush()


@contextmanager
def _exclusive(out: Place) -> Iterator[None]:
    """One conversion per output: a second one would delete the first one's half-written arrays.

    Local disk: `flock` on OUT/.lock. An object store has no lock, so OUT/.lock is an object naming its owner
    (host, pid, a token) and refreshed every LOCK_BEAT_S by a thread. Another conversion is refused while it is
    younger than LOCK_STALE_S, unless its owner is a process of this machine that is gone (a killed run resumes
    at once). After writing its own lock, a run reads it back and gives way if another run's token is there:
    of two runs that start together, the one whose write came last goes on.
    """
    if out.local:
        with open(f"{out.path}/{LOCK}", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"{out}: another openmind-convert is writing into this folder") from None
            yield
        return
    place = out / LOCK
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
    held = _lock_holder(place)
    if held is not None and not _stale(held):
        raise ConfigError(f"{out}: another openmind-convert (host {held.get('host')}, pid {held.get('pid')}) is "
                          f"writing into it; if that run was killed on another machine, its lock {place} expires "
                          f"{LOCK_STALE_S:.0f} s after its last refresh")  # fmt: skip
    place.write_bytes(json.dumps({**mine, "time": time.time()}).encode())
    time.sleep(0.5)  # a run that read the old lock at the same moment has written its own by now
    if (_lock_holder(place) or {}).get("token") != mine["token"]:
        raise ConfigError(f"{out}: another openmind-convert started writing into it at the same moment")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(LOCK_BEAT_S):
            with suppress(Exception):  # a refresh lost to the network is tried again at the next beat
                place.write_bytes(json.dumps({**mine, "time": time.time()}).encode())

    heart = threading.Thread(target=beat, name="openmind-convert lock", daemon=True)
    heart.start()
    try:
        yield
    finally:
        stop.set()
        heart.join()
        place.remove()


def _lock_holder(place: Place) -> dict[str, Any] | None:
    try:
        held = json.loads(place.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:  # a damaged lock object protects nothing
        return None
    return held if isinstance(held, dict) else None


def _stale(held: dict[str, Any]) -> bool:
    try:
        age = time.time() - float(held["time"])
        pid = int(held["pid"])
    except (KeyError, TypeError, ValueError):
        return True
    if held.get("host") == socket.gethostname() and pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return age > LOCK_STALE_S


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


def _manifest(
    corpus: Corpus,
    records: list[dict[str, Any]],
    formats: tuple[str, ...],
    shards: dict[str, dict[str, Any]],
    out: Place,
) -> pd.DataFrame:
    ours = pd.DataFrame(records).drop(columns=["status"], errors="ignore") if records else pd.DataFrame({"id": []})
    images = {img.id: img for img in corpus.images}
    ours.insert(1, "dataset", [images[i].dataset for i in ours["id"]])
    ours.insert(2, "subject", [images[i].subject for i in ours["id"]])
    ours.insert(3, "session", [images[i].session for i in ours["id"]])
    ours.insert(4, "source_path", [corpus.root.relative(images[i].image) for i in ours["id"]])
    if "zarr" in formats:
        ours["zarr_store"] = ZARR_DIR
        ours["zarr_array"] = [zarr_store.group_path(i) for i in ours["id"]]
    else:
        ours = ours.drop(columns=["zarr_nbytes"], errors="ignore")
    if "wds" in formats:
        existing = set((out / "shards").find())
        cells = {
            vid: wds_store.manifest_cells(name, vid, wds_store.Sample(*values))
            for name, entry in shards.items()
            if (out / name).path in existing
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
