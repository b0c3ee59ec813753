"""Files that another step or a resumed run reads back: written whole or not at all, read only if regular.

`atomic_write` writes under a unique temporary name in the target folder, fsyncs, and renames over the
target (`os.replace`), so a reader, or a run resumed after kill -9 or a full disk, sees the old file or
the new one, never half; the temporary file is removed on any failure. `file_problem` names a FIFO,
device or socket where a file should be: reading one would hang or never end.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from openmind_tools.errors import MachineError

_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.tmp")  # atomic_write's temporary names
# errno -> what the user should do: failures of the machine, never of the input being converted
_MACHINE = {
    errno.ENOSPC: "the disk is full: free space",
    errno.EDQUOT: "the disk quota is exceeded: free space or raise the quota",
    errno.EIO: "an I/O error: check the disk",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.ENFILE: "the system ran out of file handles: close programs or raise fs.file-max",
    errno.EROFS: "the file system is read-only: remount it or choose another output folder",
}


@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` when the block ends without an error (and is removed if it fails).

    Opened with plain `open`, so the result gets the usual umask permissions (mkstemp would give 0600).
    """
    path = Path(path)
    remove_stale_temporaries(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # e.g. a read-only file system, where the file was never made
            tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | Path, name: str = "*") -> list[Path]:
    """Delete the temporary files `atomic_write` left in `folder` (for target `name`, or all) when its process was
    killed (kill -9, OOM, power): a checkpoint's is GBs. A temporary whose process still runs is left alone, so a
    write in flight on this machine is never touched. Returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(f".{name if name == '*' else glob.escape(name)}.*.tmp"):
        match = _TEMPORARY.fullmatch(tmp.name)
        if match is None or _alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except PermissionError:  # another user's process
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return pid > 0


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text.encode())


def file_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as a file ("file not found", "not a regular file ..."), or None if it can."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "file not found"
    except OSError as e:
        return f"cannot stat: {e.strerror}"
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        return f"not a regular file ({kind})"
    return None


def machine_error(error: BaseException, doing: str) -> MachineError | None:
    """The MachineError an OSError stands for (disk full, I/O error, ...), or None if it is not the machine's."""
    if isinstance(error, MachineError):
        return error
    if isinstance(error, OSError) and error.errno in _MACHINE:
        where = f" ({error.filename})" if error.filename else ""
        return MachineError(f"{doing}: {os.strerror(error.errno)}{where}; {_MACHINE[error.errno]} and rerun")
    return None
