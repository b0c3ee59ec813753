"""What a conversion has finished, and who is writing its output: the journal and the lock.

On local disk the journal is one file appended an entry at a time, and the lock is `flock`. An object store has
neither append, rename nor locks, so there the journal is whole objects, one per batch of entries, and the lock an
object naming its owner, refreshed by a heartbeat. A resumed run reads the journal back as statuses and shapes
(`Journal.read`); the records themselves are streamed, last one per volume and in id order, through a SQLite
file on the driver's own disk (`latest_records`), so the manifest is written without holding every row.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openmind_tools.errors import ConfigError, MachineError
from openmind_tools.storage import Place

JOURNAL, JOURNAL_OBJECTS, LOCK = ".journal.jsonl", ".journal", ".lock"  # local journal; object-store journal; lock
# An object store's journal is written every 64 entries or 2 s: a kill loses at most that, and 114k volumes on a
# cluster converting 10 per second leave ~6k small objects, read back in a minute or two by a resumed run
JOURNAL_BATCH, JOURNAL_SECONDS = 64, 2.0
LOCK_STALE_S, LOCK_BEAT_S = 120.0, 30.0  # an object store's lock: refreshed every 30 s, taken over after 120 s


@dataclass
class Entries:
    """What a resumed run needs of its journal, without the records: those are streamed into the manifest."""

    status: dict[str, str]  # volume id -> "ok" | "error", the last entry's
    shapes: dict[str, tuple[int, int, int]]  # converted volumes' shapes: shard planning
    shards: dict[str, dict[str, Any]]  # shard name -> {"ids": [...], and per id each field of wds_store.Sample}


class Journal:
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

    def read(self) -> Entries:
        entries = Entries({}, {}, {})
        for entry in self.entries():
            if "volume" in entry:
                volume = entry["volume"]
                entries.status[volume["id"]] = volume["status"]
                if volume["status"] == "ok":
                    entries.shapes[volume["id"]] = tuple(volume["shape"])
            elif "shard" in entry:
                entries.shards[entry["shard"]] = entry
        return entries

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every entry, oldest first, read a file or an object at a time."""
        for line in self._lines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run may be cut short
                continue
            if _well_formed(entry):  # a hand-edited or damaged line is skipped: its volume is converted again
                yield entry

    def _lines(self) -> Iterator[str]:
        if self.local:
            path = Path(self.out.path) / JOURNAL
            if path.is_file():
                with path.open(errors="replace") as f:
                    yield from f
            return
        names = [p for p in self.objects.find() if re.fullmatch(r"[0-9]{8}\.jsonl", p.rsplit("/", 1)[-1])]
        self.next = 1 + max((int(n.rsplit("/", 1)[-1].split(".")[0]) for n in names), default=-1)
        for name in names:
            yield from Place(self.out.fs, name).read_bytes().decode(errors="replace").splitlines()

    def __enter__(self) -> Journal:
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


def _well_formed(entry: Any) -> bool:
    """A journal entry as this module writes it: a volume's record (id, status, and an ok one's shape) or a shard's."""
    if not isinstance(entry, dict):
        return False
    if "volume" in entry:
        v = entry["volume"]
        if not (isinstance(v, dict) and isinstance(v.get("id"), str) and v.get("status") in ("ok", "error")):
            return False
        return v["status"] == "error" or (isinstance(v.get("shape"), list) and len(v["shape"]) == 3)
    return isinstance(entry.get("shard"), str) and isinstance(entry.get("ids"), list)


@contextmanager
def exclusive(out: Place) -> Iterator[None]:
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


class Records:
    """The last journal record of each volume, in id order, from a SQLite file on the driver's own disk: the
    journal arrives in completion order, and the manifest is written in id order without holding every row."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE records (id TEXT PRIMARY KEY, status TEXT, record TEXT)")

    def rows(self, status: str) -> Iterator[dict[str, Any]]:
        cursor = self.db.execute("SELECT record FROM records WHERE status = ? ORDER BY id", (status,))
        return (json.loads(text) for (text,) in cursor)

    def close(self) -> None:
        self.db.close()


def latest_records(journal: Journal, path: Path, wanted: set[str]) -> Records:
    """The journal's last record per volume of `wanted` (this run's corpus), later entries replacing earlier."""
    records = Records(path)
    rows = ((e["volume"]["id"], e["volume"]["status"], json.dumps(e["volume"])) for e in journal.entries()
            if "volume" in e and e["volume"]["id"] in wanted)  # fmt: skip
    records.db.executemany("INSERT OR REPLACE INTO records VALUES (?, ?, ?)", rows)
    records.db.commit()
    return records
