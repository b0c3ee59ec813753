"""Whole-or-nothing writes and the machine/input line for OSErrors."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from openmind_tools.errors import MachineError
from openmind_tools.files import atomic_write, file_problem, machine_error, remove_stale_temporaries


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="killed"), atomic_write(target) as f:
        f.write(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_machine_errors_are_told_apart_from_input_errors(tmp_path: Path) -> None:
    full = machine_error(OSError(errno.ENOSPC, "No space left on device", "/out/x"), "writing")
    assert isinstance(full, MachineError) and "free space" in str(full) and "/out/x" in str(full)
    assert "ulimit" in str(machine_error(OSError(errno.EMFILE, "Too many open files"), "reading"))
    assert machine_error(OSError(errno.EIO, "Input/output error"), "reading") is not None
    assert machine_error(FileNotFoundError(errno.ENOENT, "No such file"), "reading") is None  # the input's
    os.mkfifo(tmp_path / "fifo")
    assert file_problem(tmp_path / "fifo") == "not a regular file (a FIFO)"
    assert file_problem(tmp_path) == "not a regular file (a folder)"
    assert file_problem(tmp_path / "absent") == "file not found"


def test_temporaries_of_killed_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process that has ended: its pid names a killed writer's temporaries
    stale = tmp_path / f".checkpoint.pt.{dead.pid}.0123abcd.tmp"
    live = tmp_path / f".checkpoint.pt.{os.getpid()}.0123abcd.tmp"
    other = tmp_path / f".manifest.parquet.{dead.pid}.89abcdef.tmp"
    user = tmp_path / ".checkpoint.pt.notes.tmp"  # not a name atomic_write makes
    for path in (stale, live, other, user):
        path.write_bytes(b"x" * 1000)
    with atomic_write(tmp_path / "checkpoint.pt") as f:  # a write cleans up after its own target's killed writes
        f.write(b"new")
    assert not stale.exists() and live.exists() and other.exists() and user.exists()
    assert remove_stale_temporaries(tmp_path) == [other]  # a resume sweeps the whole folder
    assert live.exists() and user.exists()
