"""Reading store objects: whole or by byte range, several at once, with transient errors retried here only.

Both store modules read through a `Reader`, so the retry policy wraps the filesystem once instead of
travelling through every stage. `Reader.cat` is fsspec's `cat_ranges`: on S3 its ranges are fetched
concurrently (one volume's image and mask objects cost one round trip); on local disk, one after the other.
The reader is made inside each DataLoader worker (fsspec filesystems hold sockets and event loops).
fsspec's caching URLs work as manifest and store roots: with `simplecache::s3://...` and a `cache_storage` every
worker shares, the second epoch reads no byte from object storage (a test counts requests). `filecache::` works
too, but its metadata file loses entries when several processes share the folder (an object fetched twice).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import numpy as np
from fsspec.implementations.cached import CachingFileSystem, SimpleCacheFileSystem
from fsspec.implementations.local import LocalFileSystem

from openmind_tools.buffers import BufferPool
from openmind_tools.errors import StoreError
from openmind_tools.files import file_problem

T = TypeVar("T")
Buffer = bytes | np.ndarray  # what `Reader.cat` returns per object: bytes, or a uint8 array in a pooled buffer
log = logging.getLogger(__name__)

_NO_LOCKS = {errno.EROFS, errno.EACCES, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}
# Not worth a retry: the object is not there (or not ours to read), or it is there and wrong.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, StoreError)
_POOLED_BYTES = 1 << 16  # smaller objects (metadata json) are read as bytes
_POOLED_BUFFERS = 12  # per reader (a loader worker): ~3 volumes' raw and decoded arrays at prefetch 2


class Reader:
    """Reads of store objects on `fs` (an fsspec filesystem), each retried `attempts` times with doubling waits."""

    def __init__(self, fs: fsspec.AbstractFileSystem, attempts: int = 4, backoff_s: float = 0.2) -> None:
        self.fs, self.attempts, self.backoff_s = fs, attempts, backoff_s
        # fsspec's filecache:: and blockcache:: keep metadata that concurrent threads corrupt (seen: a TypeError
        # inside fsspec on the loader's prefetch threads), so their reads take turns; simplecache:: keeps none.
        self._cached = isinstance(fs, CachingFileSystem)
        unsafe = self._cached and not isinstance(fs, SimpleCacheFileSystem)
        self._lock = threading.Lock() if unsafe else contextlib.nullcontext()
        self._unlockable = False
        self._local = isinstance(fs, LocalFileSystem)
        self.pool = BufferPool(_POOLED_BUFFERS)  # local reads, and the decoded arrays of the stores' `read`
        self.checked: set[Any] = set()  # what a store's `read` need not check again (zarr_store: the metadata)

    @classmethod
    def for_url(cls, url: str, storage_options: dict[str, Any] | None = None, **retries: Any) -> Reader:
        """A reader for the filesystem `url` lives on (chained URLs such as `simplecache::s3://...` included)."""
        return cls(fsspec.core.url_to_fs(url, **(storage_options or {}))[0], **retries)

    def cat(self, urls: Sequence[str], spans: Sequence[tuple[int, int] | None] | None = None) -> list[Buffer]:
        """The bytes of each object (or of its (offset, size) span), fetched together; a span cut short by the
        object's end comes back short, for the caller to name. On local disk a large object comes back as a
        uint8 array in one of `pool`'s buffers (valid while the caller holds it), otherwise as bytes."""
        spans = spans or [None] * len(urls)
        for url in urls:
            if problem := self.problem(url):
                raise StoreError(f"{url}: {problem}")
        if self._local:
            read = functools.partial(self._read_local, urls, spans)
            return with_retries(read, attempts=self.attempts, backoff_s=self.backoff_s, what=", ".join(urls))
        starts = [None if s is None else s[0] for s in spans]
        ends = [None if s is None else s[0] + s[1] for s in spans]
        paths = [url.rsplit("::", 1)[-1] for url in urls]  # a chained URL's last link: what its filesystem reads

        def fetch() -> list[bytes]:
            with self._lock, self._cache_locks(paths):
                try:
                    out = self.fs.cat_ranges(paths, starts, ends, on_error="return")
                    failed = next((r for r in out if isinstance(r, BaseException)), None)
                except BaseException:
                    self.forget(urls)  # a download cut off mid-way would stay in the cache as the object
                    raise
            if failed is not None:
                self.forget(urls)
                raise failed
            return out

        return with_retries(fetch, attempts=self.attempts, backoff_s=self.backoff_s, what=", ".join(urls))

    def _read_local(self, urls: Sequence[str], spans: Sequence[tuple[int, int] | None]) -> list[Buffer]:
        """Each local object read straight into a pooled buffer: fsspec's fresh bytes cost a page fault per
        4 KB page written (a third of a read's CPU here), the pool's pages are mapped already."""
        out: list[Buffer] = []
        for url, span in zip(urls, spans, strict=True):
            with open(self.fs._strip_protocol(url), "rb", buffering=0) as f:
                length = os.fstat(f.fileno()).st_size
                start, end = (0, length) if span is None else (span[0], min(span[0] + span[1], length))
                size = max(end - start, 0)
                f.seek(start)
                if size < _POOLED_BYTES:
                    out.append(f.read(size))
                    continue
                buffer, done = self.pool.array((size,), np.uint8), 0
                while done < size and (n := f.readinto(buffer[done:])):
                    done += n
                out.append(buffer[:done])
        return out

    def forget(self, urls: Sequence[str]) -> None:
        """Drop the cached copies of `urls` (after a failed or damaged read), so the next read fetches them again."""
        if not self._cached:
            return
        for url in urls:
            found = self.fs._check_file(url.rsplit("::", 1)[-1])  # fsspec's: a path, (detail, path), or None/False
            path = found[1] if isinstance(found, tuple) else found
            if path:
                with contextlib.suppress(OSError):
                    os.remove(path)

    @contextlib.contextmanager
    def _cache_locks(self, paths: Sequence[str]) -> Iterator[None]:
        """With a cache shared by several processes, hold a file lock per object while reading it: fsspec downloads
        into the cache file's final name, so another DataLoader worker would read it half-written (seen here).
        Where the cache folder takes no locks (read-only, or a file system without flock), reads go unlocked."""
        if not self._cached or self._unlockable:
            yield
            return
        folder = Path(self.fs.storage[-1]) / ".locks"
        with contextlib.ExitStack() as stack:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                for name in sorted({hashlib.sha256(p.encode()).hexdigest()[:32] for p in paths}):  # one order
                    lock = stack.enter_context(open(folder / name, "w"))
                    fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError as e:
                if e.errno not in _NO_LOCKS:
                    raise
                log.warning("%s takes no file locks (%s): cached reads go unlocked", folder, e)
                self._unlockable = True
            yield

    def problem(self, url: str) -> str | None:
        """Why a store object on local disk is no regular file (a FIFO would block the read forever), else None.

        Remote objects and absent ones pass: the read itself reports those (with its retries and its message).
        """
        if not self._local:
            return None
        problem = file_problem(self.fs._strip_protocol(url))
        return None if problem == "file not found" else problem


def with_retries(fn: Callable[[], T], *, attempts: int, backoff_s: float, what: str) -> T:
    """Call `fn`, retrying transient I/O errors (connection reset, timeout, 5xx) with doubling waits.

    A missing or corrupt object is not transient: it raises at once.
    """
    failures = 0
    while True:
        try:
            return fn()
        except _PERMANENT:
            raise
        except (OSError, TimeoutError) as e:
            failures += 1
            if failures >= attempts:
                raise
            wait = backoff_s * 2 ** (failures - 1)
            log.warning("%s: %s: %s; retry %d of %d in %.2f s", what, type(e).__name__, e, failures, attempts - 1, wait)
            time.sleep(wait)
