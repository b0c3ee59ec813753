"""What a conversion has finished: the journal.

On local disk the journal is one file appended an entry at a time. An object store has neither append nor
rename, so there the journal is whole objects, one per batch of entries, each created only if its name is free:
a run that lost its lock (`openmind_tools.lock`) cannot overwrite the entries of the run that took over. A
resumed run reads the journal back as statuses and shapes (`Journal.read`); the records themselves are streamed,
last one per volume and in id order, through a SQLite file on the driver's own disk (`latest_records`), so the
manifest is written without holding every row.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openmind_tools.errors import MachineError
from openmind_tools.lock import Lease
from openmind_tools.storage import Place

JOURNAL, JOURNAL_OBJECTS = ".journal.jsonl", ".journal"  # the local journal; the object store's
# An object store's journal is written every 64 entries or 2 s: a kill loses at most that, and 114k volumes on a
# cluster converting 10 per second leave ~6k small objects, which a resumed run reads JOURNAL_READ_AHEAD at a time
JOURNAL_BATCH, JOURNAL_SECONDS = 64, 2.0
JOURNAL_READ_AHEAD = 256  # journal objects fetched at a time by a resumed run


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
    volumes are converted again, into the same objects. Each object is created only if its name is free, and
    never after `lease` is lost: two runs never write each other's numbers.
    """

    def __init__(self, out: Place, lease: Lease | None = None) -> None:
        self.out, self.local = out, out.local
        self.lease = lease or Lease()
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
        for start in range(0, len(names), JOURNAL_READ_AHEAD):  # concurrent GETs on S3, in order
            chunk = names[start : start + JOURNAL_READ_AHEAD]
            for data in self.out.fs.cat_ranges(chunk, [None] * len(chunk), [None] * len(chunk), on_error="raise"):
                yield from data.decode(errors="replace").splitlines()

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
        self.lease.check()
        if self.buffer:
            place = self.objects / f"{self.next:08d}.jsonl"
            try:
                place.create_bytes("".join(self.buffer).encode())
            except FileExistsError:
                raise MachineError(f"{place}: written by another openmind-convert since this run read the journal; "
                                   "two runs are writing into one output, and this one stops") from None  # fmt: skip
            self.next += 1
            self.buffer = []
        self.flushed = time.monotonic()

    def __exit__(self, kind: Any, *_: Any) -> None:
        if self.local:
            self.file.close()
        elif (kind is None or issubclass(kind, (MachineError, KeyboardInterrupt))) and not self.lease.lost.is_set():
            self.flush()  # what finished stays finished, unless another run owns the output now


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
