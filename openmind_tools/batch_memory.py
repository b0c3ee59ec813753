"""Where a batch's tensors are written: memory that is mapped already, wherever the batch is made.

torch's DataLoader sends a worker's batch to the main process as a fresh shared-memory segment, and writing
fresh pages costs a page fault per 4 KB: on a 2-core VM that was a third of a 160^3 patch's CPU
(benchmarks/loader_bench.py). So a worker keeps a few segments (`slots`) and writes each again once the main
process has handed it back, in a table of flags in shared memory (`HandBack`, made by `make_loader` before the
workers start); the main process hands a slot back as soon as it has copied the batch out (to the device, or
into its own buffers). A worker whose slots are all out makes a fresh segment, as torch would, so it never waits,
and a plain DataLoader over a PatchDataset gets fresh segments throughout. In the main process a batch is written
into a `BufferPool`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from openmind_tools.buffers import BufferPool

Specs = tuple[tuple[tuple[int, ...], torch.dtype], ...]  # (shape, dtype) of each tensor of a batch
_NUMPY = {torch.float16: np.float16, torch.uint8: np.uint8}


class HandBack:
    """`slots` shared-memory batches per DataLoader worker, and the flags that say which the main process holds."""

    def __init__(self, workers: int, slots: int) -> None:
        self.out = torch.zeros((workers, slots), dtype=torch.uint8).share_memory_()  # 1: the main process has it
        self._mine: dict[int, tuple[Specs, list[torch.Tensor]]] = {}  # slot -> its tensors, in its worker only

    def __getstate__(self) -> dict:
        return {"out": self.out, "_mine": {}}  # a spawned worker makes its own segments

    def take(self, worker: int, specs: Specs) -> tuple[tuple[int, int] | None, list[torch.Tensor]]:
        """In `worker`: a free slot, marked out, and its tensors; or (None, fresh shared tensors) if none is free."""
        free = torch.nonzero(self.out[worker] == 0)
        if len(free) == 0:
            return None, [shared_tensor(shape, dtype) for shape, dtype in specs]
        slot = int(free[0, 0])
        self.out[worker, slot] = 1
        if self._mine.get(slot, (None,))[0] != specs:
            self._mine[slot] = (specs, [shared_tensor(shape, dtype) for shape, dtype in specs])
        return (worker, slot), self._mine[slot][1]

    def restart(self, worker: int) -> None:
        """In `worker`, as its iteration starts: every batch it made before is consumed, or dropped unread by the
        DataLoader's reset (which runs before any worker starts again), so all its slots are free."""
        self.out[worker] = 0

    def give_back(self, worker: int, slot: int) -> None:
        """In the main process, once the batch from `worker`'s `slot` has been copied out."""
        self.out[worker, slot] = 0


def fresh_memory(specs: Specs) -> tuple[None, list[torch.Tensor]]:
    """New tensors: in shared memory inside a DataLoader worker (as default_collate does), else plain."""
    if torch.utils.data.get_worker_info() is None:
        return None, [torch.empty(shape, dtype=dtype) for shape, dtype in specs]
    return None, [shared_tensor(shape, dtype) for shape, dtype in specs]


def pooled_memory(pool: BufferPool, specs: Specs) -> tuple[None, list[torch.Tensor]]:
    """Tensors in `pool`'s buffers: for batches made in the main process."""
    return None, [pooled_tensor(pool, shape, dtype) for shape, dtype in specs]


def shared_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in a fresh shared-memory segment, as torch's default_collate makes in a worker."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes)).view(shape)


def pooled_tensor(pool: BufferPool, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in one of `pool`'s buffers (held, so not reused, while the tensor lives)."""
    return torch.from_numpy(pool.array(tuple(shape), _NUMPY[dtype]))
