"""Where a conversion reads and writes: a local folder, or a prefix under an fsspec URL (s3://, gs://, ...).

Object stores have no rename, no append and no `flock`, so everything another step or a resumed run reads back
is written as whole objects: `Place.write_bytes` and `Place.writer` replace a local file atomically (temporary
name, fsync, rename) and put an object in one request (a multipart upload becomes visible only when it
completes), so a reader sees the old object or the new one, never half. A `Place` pickles with its filesystem
and storage options, so a dask worker on another machine writes where the driver asked, with no shared disk.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from openmind_tools.errors import ConfigError, OpenMindError
from openmind_tools.files import atomic_write, file_problem

# Libraries whose exceptions mean a request to a remote store failed (fsspec backends retry them first)
_TRANSPORTS = ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "s3fs", "gcsfs", "adlfs", "azure")


@dataclass(frozen=True)
class Place:
    """A file or folder: `fs` (an fsspec filesystem) and its `path` there (an absolute path on local disk)."""

    fs: fsspec.AbstractFileSystem
    path: str

    @classmethod
    def of(cls, url: str | Path | Place, storage_options: dict[str, Any] | None = None) -> Place:
        """The place a local path or an fsspec URL (chains such as `simplecache::s3://b/p` included) names."""
        if isinstance(url, Place):
            return url
        try:
            fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
        except (ValueError, ImportError, TypeError) as e:
            raise ConfigError(f"{url}: not a usable path or URL ({type(e).__name__}: {e})") from None
        if isinstance(fs, LocalFileSystem):
            path = os.path.abspath(path)
        return cls(fs, path.rstrip("/") or "/")

    @property
    def local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def url(self) -> str:
        """What a person reads in a message, and what a manifest records: a path on local disk, else a URL."""
        return self.path if self.local else self.fs.unstrip_protocol(self.path)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Place:
        return Place(self.fs, self.path.rsplit("/", 1)[0] or "/")

    def __truediv__(self, name: str) -> Place:
        return Place(self.fs, f"{self.path.rstrip('/')}/{name.strip('/')}")

    def __str__(self) -> str:
        return self.url

    def relative(self, path: str) -> str:
        """`path` (one of this folder's, as `find` lists them) relative to this folder."""
        return path[len(self.path.rstrip("/")) + 1 :]

    def is_file(self) -> bool:
        """A regular file or an object (locally, a FIFO or device is not: reading it would hang)."""
        if self.local:
            return file_problem(self.path) is None
        try:  # not fs.isfile: s3fs's answers False when the request fails, and a lost connection is no answer
            return self.fs.info(self.path)["type"] == "file"
        except FileNotFoundError:
            return False

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def size(self) -> int:
        return int(self.fs.size(self.path))

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def write_bytes(self, data: bytes) -> None:
        """Replace the file or object with `data`, whole or not at all (a local folder on the way is made, as an
        object store needs none)."""
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with atomic_write(self.path) as f:
                f.write(data)
        else:
            self.fs.pipe_file(self.path, data)

    def create_bytes(self, data: bytes) -> None:
        """Write a new object, or raise FileExistsError if another is there already. One request on S3 (s3fs sends
        `If-None-Match: *`, which AWS S3 and MinIO honour), so of two writers exactly one creates it; fsspec's
        other filesystems check, then write. An object that holds `data` already is this write's own: a request
        retried after its answer was lost finds the object its first try created."""
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            if self.read_bytes() != data:
                raise

    @contextmanager
    def writer(self) -> Iterator[BinaryIO]:
        """A binary stream that replaces the file or object when the block ends without an error."""
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with atomic_write(self.path) as f:
                yield f
            return
        with self.fs.open(self.path, "wb") as f:  # an upload completes at close, and is dropped on an error
            yield f

    def mkdir(self) -> None:
        """Make the folder (object stores have none: a no-op there)."""
        if self.local:
            os.makedirs(self.path, exist_ok=True)

    def find(self) -> list[str]:
        """The paths of every file below (empty when the folder does not exist)."""
        try:
            return sorted(self.fs.find(self.path))
        except FileNotFoundError:
            return []

    def remove(self, recursive: bool = False) -> None:
        """Delete the file (or the folder and what it holds); nothing there is no error."""
        with suppress(FileNotFoundError):
            self.fs.rm(self.path, recursive=recursive)


def transport_error(error: BaseException) -> bool:
    """Whether `error` is a failed request (connection lost, throttled, timed out, a 5xx), not a verdict on the
    object: a missing or forbidden object, or one that is there and wrong, is not."""
    if isinstance(error, (OpenMindError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if type(error).__module__.split(".")[0] in _TRANSPORTS:
        return True
    return isinstance(error, (ConnectionError, TimeoutError)) or (isinstance(error, OSError) and error.errno is None)


def load_storage_options(text: str | None) -> dict[str, Any]:
    """`--storage-options`: inline JSON (`{"endpoint_url": ...}`) or a .json/.toml file holding it."""
    if not text:
        return {}
    source = "the argument"
    if not text.lstrip().startswith("{"):
        source = text
        try:
            text = Path(text).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--storage-options {source}: cannot read ({type(e).__name__}: {e})") from None
    try:
        options = tomllib.loads(text) if source.endswith(".toml") else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--storage-options {source}: not valid {'TOML' if source.endswith('.toml') else 'JSON'} "
                          f"({e})") from None  # fmt: skip
    if not isinstance(options, dict):
        raise ConfigError(f"--storage-options {source}: expected a JSON/TOML table of options, got "
                          f"{type(options).__name__}")  # fmt: skip
    return options
