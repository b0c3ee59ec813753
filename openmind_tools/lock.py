"""One conversion per output: a second one would delete the first one's half-written arrays and write journal
objects under the same numbers.

Local disk: `flock` on OUT/.lock. An object store has neither locks nor a compare-and-swap of an existing object,
but S3 creates an object only if it is absent (`If-None-Match: *`, which AWS S3 and MinIO honour and s3fs sends
for `mode="create"`). So the lock is a row of leases, `OUT/.locks/NNNNNNNN.json`, each created only if absent,
and the highest number holds the output. A run takes the next number when the highest lease is stale (not
refreshed for LOCK_STALE_S) or names a process of this machine that is gone; two runs that try together create
the same number, and one of the two creates fails. A finished run deletes its lease. The holder refreshes its
lease every LOCK_BEAT_S and looks for a higher number first: one is there only when this run was cut off from the
store for longer than LOCK_STALE_S and another run took over. The lease is then lost, and the run stops at its
next journal write.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from openmind_tools.errors import ConfigError, MachineError
from openmind_tools.storage import Place

LOCK, LOCKS = ".lock", ".locks"  # the local flock file; the object store's leases
LOCK_STALE_S, LOCK_BEAT_S = 120.0, 30.0  # a lease is refreshed every 30 s and taken over after 120 s without one
_LEASE = re.compile(r"[0-9]{8}\.json")


class Lease:
    """The holder's side of the lock: `check` raises once another run has taken the output over."""

    def __init__(self) -> None:
        self.lost = threading.Event()
        self.reason = ""

    def lose(self, reason: str) -> None:
        self.reason = reason
        self.lost.set()

    def check(self) -> None:
        if self.lost.is_set():
            raise MachineError(self.reason)


@contextmanager
def exclusive(out: Place) -> Iterator[Lease]:
    """Hold `out` for this run, or raise ConfigError naming the run that holds it."""
    lease = Lease()
    if out.local:
        with open(f"{out.path}/{LOCK}", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"{out}: another openmind-convert is writing into this folder") from None
            yield lease
        return
    folder = out / LOCKS
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
    number, held = _holder(folder)
    if held is not None and not _stale(held):
        raise ConfigError(f"{out}: another openmind-convert (host {held.get('host')}, pid {held.get('pid')}) is "
                          f"writing into it; if that run was killed on another machine, its lease "
                          f"{folder}/{number:08d}.json expires {LOCK_STALE_S:.0f} s after its refresh")  # fmt: skip
    number += 1
    place = folder / f"{number:08d}.json"
    try:
        place.create_bytes(_lease_bytes(mine))
    except FileExistsError:
        raise ConfigError(f"{out}: another openmind-convert took its lock at the same moment") from None
    # A store that ignores If-None-Match, or a filesystem whose create only checks first, may have let a second
    # run overwrite this lease: by now that run has written it, and reading it back tells.
    time.sleep(0.5)
    if _other(folder, number, mine["token"]) is not None:
        raise ConfigError(f"{out}: another openmind-convert took its lock at the same moment")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(LOCK_BEAT_S):
            try:
                if (other := _other(folder, number, mine["token"])) is not None:
                    lease.lose(f"{out}: another openmind-convert (host {other.get('host')}, pid {other.get('pid')}) "
                               f"took this output over while this run could not refresh its lock for "
                               f"{LOCK_STALE_S:.0f} s; this run stops and leaves the output to it")  # fmt: skip
                    return
                place.write_bytes(_lease_bytes(mine))
            except Exception:  # noqa: BLE001 - a refresh lost to the network is tried again at the next beat
                continue

    heart = threading.Thread(target=beat, name="openmind-convert lock", daemon=True)
    heart.start()
    try:
        yield lease
    finally:
        stop.set()
        heart.join()
        if not lease.lost.is_set():
            with suppress(Exception):  # a lease left behind expires; the run's own error matters more
                place.remove()


def _lease_bytes(owner: dict[str, Any]) -> bytes:
    return json.dumps({**owner, "time": time.time()}).encode()


def _holder(folder: Place) -> tuple[int, dict[str, Any] | None]:
    """The highest lease's number (-1: none) and what it says (None: unreadable, which protects nothing)."""
    numbers = [int(name[:8]) for name in (p.rsplit("/", 1)[-1] for p in folder.find()) if _LEASE.fullmatch(name)]
    if not numbers:
        return -1, None
    number = max(numbers)
    try:
        held = json.loads((folder / f"{number:08d}.json").read_bytes())
    except (FileNotFoundError, ValueError):  # deleted by its finished run since the listing, or damaged
        return number, None
    return number, held if isinstance(held, dict) else None


def _other(folder: Place, number: int, token: str) -> dict[str, Any] | None:
    """What the lease holding `folder` says when it is not lease `number` with `token` (None: it is)."""
    now, held = _holder(folder)
    if now == number and (held or {}).get("token") == token:
        return None
    return held or {}


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
