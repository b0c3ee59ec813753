"""Run under torchrun by tests/training/test_contrastive.py: the gathered contrastive loss on each rank's share.

Usage: torchrun --nproc_per_node=2 tests/torchrun_contrastive.py OUT_DIR
Each rank takes its block of a fixed global batch (GLOBAL samples, two views, labels with one missing), computes
`global_batch_loss` (embeddings all-gathered with gradient over gloo) without labels (SimCLR) and with them
(y-aware, RBF), and writes each loss and the gradient on its own rows to OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from training.contrastive import global_batch_loss

GLOBAL, DIM, TEMPERATURE, SIGMA = 6, 8, 0.1, 10.0


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(view 1, view 2, labels) of the whole batch; the same on every rank and in the test."""
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(GLOBAL, DIM, generator=g), torch.randn(GLOBAL, DIM, generator=g)
    labels = torch.tensor([30.0, 34.0, float("nan"), 67.0, 31.0, 60.0])
    return F.normalize(first, dim=1), F.normalize(second, dim=1), labels


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    first, second, labels = global_batch()
    n = GLOBAL // world
    mine = slice(rank * n, (rank + 1) * n)
    record = {"rank": rank, "world": world}
    for kernel in ("none", "rbf"):
        z = torch.cat([first[mine], second[mine]]).requires_grad_(True)
        own = None if kernel == "none" else torch.cat([labels[mine], labels[mine]])
        loss, _, _ = global_batch_loss(z, own, temperature=TEMPERATURE, kernel="rbf", sigma=SIGMA)
        loss.backward()
        record[kernel] = {"loss": loss.item(), "grad": z.grad.tolist()}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
