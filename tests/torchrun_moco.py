"""Run under torchrun by tests/training/test_moco.py: MoCo's queue and loss on each rank's share of a global batch.

Usage: torchrun --nproc_per_node=2 tests/torchrun_moco.py OUT_DIR
Every rank builds the same MoCoLoss (one seed), wraps it in DDP as the loop does, and runs STEPS steps of SGD on
its block of a fixed global batch per step, calling after_step (enqueue, EMA) after each. It writes its loss per
step and the final queue and queue position to OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from training.moco import MoCoLoss
from training.model import resenc_tiny

GLOBAL, STEPS, LR = 4, 3, 0.1
OPTIONS = {"temperature": 0.2, "momentum": 0.5, "queue_size": 6, "hidden_dim": 16, "out_dim": 8}


def build() -> MoCoLoss:
    """The same module on every rank and in the test."""
    torch.manual_seed(0)
    return MoCoLoss(resenc_tiny(), **OPTIONS)


def global_views(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views (GLOBAL, 1, 16, 16, 16) of step `step`'s global batch; rank r takes rows r*n .. (r+1)*n."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL, 1, 16, 16, 16, generator=g), torch.randn(GLOBAL, 1, 16, 16, 16, generator=g)


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    objective = build()
    model = DDP(objective)
    optimizer = torch.optim.SGD([p for p in objective.parameters() if p.requires_grad], lr=LR)
    n = GLOBAL // world
    mine = slice(rank * n, (rank + 1) * n)
    losses = []
    for step in range(STEPS):
        first, second = global_views(step)
        loss, _ = model({"views": [first[mine], second[mine]]}, torch.Generator())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.after_step()
        losses.append(loss.item())
    record = {"rank": rank, "losses": losses, "queue": objective.queue.tolist(),
              "position": int(objective.queue_position)}  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()  # no rank tears gloo down while the other still talks to it (a hang at exit, 1 run in 6)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
