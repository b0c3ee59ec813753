"""Host buffers handed out again once nothing references them, so a loader's arrays are written into memory
that is already mapped.

A fresh 10-20 MB array per read or batch costs a page fault per 4 KB page the first time it is written, and on
a VM that cost more than the decode (measured in benchmarks/loader_bench.py). A pool keeps the buffers it made
and hands one out again only when no array or view of it is alive (its reference count; a tensor made with
`torch.from_numpy` holds its array), so reuse never overwrites what a caller still holds: if every buffer is
held, a new one is made.
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np

_GROWTH = 1.25  # a new buffer's headroom over the request: volumes differ in size by a few percent
_LARGEST = 1 << 30  # bytes: a larger request (a damaged multi-GB object) gets its own array, never kept


class BufferPool:
    """Up to `limit` reusable buffers; `array` returns a view of a free one (or of a new one, if none fits)."""

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self._owners: list[np.ndarray] = []
        self._lock = threading.Lock()  # the loader's read threads share a worker's pool

    def array(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """An uninitialised C-contiguous array of `shape` and `dtype`, in a buffer nothing else uses."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > _LARGEST:
            return np.empty(shape, dtype)
        with self._lock:
            counts = _refcounts(self._owners)
            free = [i for i, count in enumerate(counts) if count <= _UNUSED]
            fits = [i for i in free if self._owners[i].nbytes >= nbytes]
            if fits:
                owner = self._owners[min(fits, key=lambda i: self._owners[i].nbytes)]
            else:
                owner = np.empty(max(int(nbytes * _GROWTH), 1), np.uint8)
                if len(self._owners) >= self.limit and free:  # the smallest free buffer makes room
                    del self._owners[min(free, key=lambda i: self._owners[i].nbytes)]
                if len(self._owners) < self.limit:
                    self._owners.append(owner)
            return owner[:nbytes].view(dtype).reshape(shape)  # holds a reference to `owner` while it lives


def _refcounts(owners: list[np.ndarray]) -> list[int]:
    return [sys.getrefcount(owner) for owner in owners]


# The count of a buffer that only the pool's list holds, measured through the same call (what getrefcount counts
# for a frame's own references differs between Python versions).
_UNUSED = _refcounts([np.empty(1, np.uint8)])[0]
