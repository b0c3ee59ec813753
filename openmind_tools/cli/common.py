"""What every openmind-* command shares: one mapping from the project's errors to an exit status and one
line on stderr (never a traceback), and argument types that name the argument and the reason.

Exit status: 0 done, 2 bad arguments or settings (ConfigError), 3 bad data (StoreError, or inputs that
failed), 4 the machine (MachineError: disk full, I/O error, too many open files): fix it and rerun.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from openmind_tools.errors import ConfigError, MachineError, StoreError
from openmind_tools.files import machine_error

EXIT_OK, EXIT_USAGE, EXIT_DATA, EXIT_MACHINE = 0, 2, 3, 4


def run_command(prog: str, parse: Callable[[], argparse.Namespace], body: Callable[[argparse.Namespace], int]) -> int:
    """Parse, then run `body`; the project's errors become one line and their exit status."""
    try:
        args = parse()
    except SystemExit as e:  # --help (0) or a usage error argparse has already reported (2)
        return int(e.code or 0)
    try:
        return body(args)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as e:
        print(f"{prog}: store error: {e}", file=sys.stderr)
        return EXIT_DATA
    except MachineError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_MACHINE
    except BrokenPipeError:  # `... | head` closed stdout: stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as e:  # a path the user named that cannot be made or read (a file where a folder should be, a
        # name longer than the file system allows, no permission): one line, never a traceback
        if (machine := machine_error(e, prog)) is not None:
            print(f"{prog}: {machine}", file=sys.stderr)
            return EXIT_MACHINE
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE


@contextmanager
def dask_client(args: argparse.Namespace) -> Iterator[Any]:
    """The dask Client of `--scheduler`, or of a local cluster of `--workers` processes (`--memory-limit` each);
    None with --workers 0 and no scheduler: the work runs in this process."""
    if args.workers == 0 and not args.scheduler:
        yield None
        return
    from openmind_tools.parallel import dask_client as client_of

    with client_of(args.workers, args.scheduler, args.memory_limit) as client:
        yield client


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0 and v != float("inf"), "a positive number")


def byte_size(text: str) -> str:
    """A dask memory limit: "auto", a number of bytes, or a size such as 6GiB."""
    from dask.utils import parse_bytes

    if text == "auto":
        return text
    try:
        if parse_bytes(text) > 0:
            return text
    except (ValueError, TypeError):
        pass
    raise argparse.ArgumentTypeError(f"expected auto or a size such as 6GiB, got {text!r}")


def column_list(text: str) -> tuple[str, ...]:
    """Comma-separated column names, none empty."""
    columns = tuple(c.strip() for c in text.split(","))
    if not all(columns):
        raise argparse.ArgumentTypeError(f"expected comma-separated column names, got {text!r}")
    return columns


def existing_parent(text: str) -> str:
    """An output path whose folder exists (a typo must not silently create a tree elsewhere)."""
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"the folder {parent} does not exist")
    return text


def output_dir(text: str) -> str:
    """A folder to write into: absent (it is made) or a folder, never a file, and a name the file system takes."""
    try:
        if not os.path.isdir(text) and os.path.lexists(text):
            raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
        os.stat(text)
    except FileNotFoundError:
        pass
    except OSError as e:  # ENAMETOOLONG, ENOTDIR (a file on the way), EACCES
        raise argparse.ArgumentTypeError(f"{text}: {e.strerror}") from None
    return text


def existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return text


def is_url(text: str) -> bool:
    """An fsspec URL (`s3://bucket/prefix`, `simplecache::s3://...`), not a local path; file:// counts as local."""
    return ("://" in text or "::" in text) and not text.startswith("file://")


def output_location(text: str) -> str:
    """`output_dir`, or an fsspec URL (checked when it is opened, with its storage options)."""
    return text if is_url(text) else output_dir(text.removeprefix("file://"))


def existing_location(text: str) -> str:
    """`existing_dir`, or an fsspec URL (checked when it is opened, with its storage options)."""
    return text if is_url(text) else existing_dir(text.removeprefix("file://"))


def _number(text: str, kind: type, ok: Callable, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value
