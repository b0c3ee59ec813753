"""Run under torchrun by tests/test_loader.py: iterate PatchLoaders as a DDP trainer would, record the ids.

Usage: torchrun --nproc_per_node=2 tests/torchrun_split.py OUT_DIR NUM_WORKERS MANIFEST:STORE [...]
Every step all-reduces a counter over gloo, as DDP's gradient sync does, so a rank with fewer steps than
the others hangs here (and the test times out) instead of passing. Writes OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from openmind_tools.loader import PatchDataset, make_loader

PATCH, BATCH, CROPS, EPOCHS = 32, 3, 2, 2


def main() -> None:
    out, num_workers, runs = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    record = {"rank": rank, "world_size": dist.get_world_size(), "runs": []}
    for run in runs:
        manifest, store = run.rsplit(":", 1)
        dataset = PatchDataset(manifest, PATCH, store=store, crops_per_volume=CROPS, seed=7)
        loader = make_loader(dataset, batch_size=BATCH, num_workers=num_workers)
        epochs = []
        for epoch in range(EPOCHS):
            loader.set_epoch(epoch)
            ids = []
            for batch in loader:
                step = torch.ones(1)
                dist.all_reduce(step)
                ids.append(batch["id"])
            epochs.append(ids)
        loader.close()
        record["runs"].append({"manifest": manifest, "store": store, "len": len(loader), "epochs": epochs})
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
