"""The lock and the journal on an object store (a moto S3 server on loopback), where nothing can be renamed.

Checked: a held lease refuses a second run and a finished run frees it; of two runs that both saw a stale lease,
the one that creates the next lease second is refused, even when it reads everything before the first one
writes (the race a read-back cannot close); a run whose lease another run took over stops at its next journal
write; journal objects are never overwritten; damaged or foreign lease objects do not wedge the output.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
import s3fs
from moto.server import ThreadedMotoServer

from openmind_tools import lock
from openmind_tools.errors import ConfigError, MachineError
from openmind_tools.journal import JOURNAL_OBJECTS, Journal
from openmind_tools.lock import LOCKS, exclusive
from openmind_tools.storage import Place

BUCKET = "lock-tests"


@pytest.fixture(scope="module")
def options() -> Iterator[dict]:
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    s3fs.S3FileSystem(**options).mkdir(BUCKET)
    yield options
    moto.stop()


@pytest.fixture
def out(options: dict, request: pytest.FixtureRequest) -> Place:
    return Place.of(f"s3://{BUCKET}/{request.node.name}", options)


def _lease(out: Place, number: int, **owner: object) -> None:
    (out / LOCKS / f"{number:08d}.json").write_bytes(json.dumps(owner).encode())


def _leases(out: Place) -> list[str]:
    return [p.rsplit("/", 1)[-1] for p in (out / LOCKS).find()]


def test_a_held_lease_refuses_a_second_run_and_a_finished_run_frees_it(out: Place) -> None:
    with exclusive(out):
        assert _leases(out) == ["00000000.json"]
        refused = pytest.raises(ConfigError, match=r"another openmind-convert \(host .*, pid \d+\) is writing into it")
        with refused, exclusive(out):
            pass
    assert _leases(out) == []
    with exclusive(out):  # free again at once
        pass


def test_of_two_runs_that_saw_one_stale_lease_only_the_first_to_create_the_next_goes_on(
    out: Place, monkeypatch: pytest.MonkeyPatch
) -> None:
    _lease(out, 3, host="elsewhere", pid=1, token="old", time=time.time() - 10 * lock.LOCK_STALE_S)
    real, late_saw, early_holds, release = lock._holder, threading.Event(), threading.Event(), threading.Event()

    def holder(folder: Place) -> tuple[int, dict | None]:
        seen = real(folder)
        if threading.current_thread().name == "late" and not late_saw.is_set():
            late_saw.set()  # "late" saw the stale lease 3 and now stalls until "early" holds lease 4
            early_holds.wait(30)
        return seen

    monkeypatch.setattr(lock, "_holder", holder)
    results: dict[str, object] = {}

    def run(name: str) -> None:
        try:
            with exclusive(out):
                results[name] = "held"
                early_holds.set()
                release.wait(30)
        except ConfigError as e:
            results[name] = e

    late = threading.Thread(target=run, args=("late",), name="late")
    late.start()
    assert late_saw.wait(30)
    early = threading.Thread(target=run, args=("early",), name="early")
    early.start()
    late.join(60)
    release.set()
    early.join(60)
    assert results["early"] == "held"
    assert isinstance(results["late"], ConfigError) and "at the same moment" in str(results["late"])
    assert _leases(out) == ["00000003.json"]  # the early run deleted its own lease 4 when it finished


def test_a_run_whose_lease_was_taken_over_stops_at_its_next_journal_write(
    out: Place, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lock, "LOCK_BEAT_S", 0.05)
    with exclusive(out) as lease:
        journal = Journal(out, lease)
        journal.read()
        journal.append({"volume": {"id": "a", "status": "error"}})
        journal.flush()
        # Another machine took the output over: this run's lease looked stale to it (it was cut off for 120 s)
        _lease(out, 1, host="elsewhere", pid=7, token="theirs", time=time.time())
        assert lease.lost.wait(10)
        journal.append({"volume": {"id": "b", "status": "error"}})
        with pytest.raises(MachineError, match=r"another openmind-convert \(host elsewhere, pid 7\) took this output"):
            journal.flush()
    assert [e["volume"]["id"] for e in Journal(out).entries()] == ["a"]
    assert _leases(out) == ["00000000.json", "00000001.json"]  # the lost lease is not deleted over the new one


def test_journal_objects_are_created_never_overwritten(out: Place) -> None:
    first, second = Journal(out), Journal(out)
    first.read(), second.read()  # both would write 00000000.jsonl next
    first.append({"volume": {"id": "a", "status": "error"}})
    first.flush()
    second.append({"volume": {"id": "b", "status": "error"}})
    with pytest.raises(MachineError, match=f"{JOURNAL_OBJECTS}/00000000.jsonl: written by another openmind-convert"):
        second.flush()
    assert [e["volume"]["id"] for e in Journal(out).entries()] == ["a"]


def test_a_damaged_lease_is_taken_over_and_foreign_names_are_ignored(out: Place) -> None:
    (out / LOCKS / "00000002.json").write_bytes(b"{not json")
    (out / LOCKS / "99999999.json.bak").write_bytes(b"{}")
    (out / LOCKS / "notes.txt").write_bytes(b"hello")
    with exclusive(out):
        assert "00000003.json" in _leases(out)
    assert sorted(_leases(out)) == ["00000002.json", "99999999.json.bak", "notes.txt"]


def test_a_create_retried_after_its_answer_was_lost_is_its_own(out: Place) -> None:
    place = out / "object"
    place.create_bytes(b"first")
    place.create_bytes(b"first")  # the retry of a request that landed
    with pytest.raises(FileExistsError):
        place.create_bytes(b"second")
    assert place.read_bytes() == b"first"


def test_a_journal_of_many_objects_is_read_back_in_order(out: Place, monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects are fetched a batch at a time; across batches the later entry of a volume still wins."""
    monkeypatch.setattr("openmind_tools.journal.JOURNAL_READ_AHEAD", 3)
    journal = Journal(out)
    journal.read()
    for n in range(8):  # volume "a" fails in every object but the last, where it converts
        last = {"status": "ok", "shape": [2, 3, 4]} if n == 7 else {"status": "error"}
        journal.append({"volume": {"id": "a", **last}})
        journal.append({"volume": {"id": f"v{n}", "status": "error"}})
        journal.flush()
    assert len((out / JOURNAL_OBJECTS).find()) == 8
    entries = Journal(out).read()
    assert entries.status == {"a": "ok", **{f"v{n}": "error" for n in range(8)}}
    assert entries.shapes == {"a": (2, 3, 4)}
    assert [e["volume"]["id"] for e in Journal(out).entries()][1::2] == [f"v{n}" for n in range(8)]
