"""Training step time and data stall: the trainer's own step fed from the stores vs from memory.

    python benchmarks/train_step.py MANIFEST [--steps 50] [--model resenc_l] [--size 160] [--batch 4]
    python benchmarks/train_step.py demo/store/manifest.parquet --model resenc_tiny --size 32 --device cpu

Both rows run `training.train.train_step` (GPU augmentation + MAE forward/backward, bf16 autocast on
CUDA): "stores" takes batches from `make_loader` (workers read and crop, pinned memory, async copy),
"in memory" repeats one batch already on the device. The stall is the time the step waited for the
loader over the wall time; the goal on an H100 for ResEnc-L MAE 160^3 bs 4 is <= 3%.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from openmind_tools.augment import AugmentSettings, GPUAugment
from openmind_tools.loader import PatchDataset, make_loader
from training.config import StageConfig
from training.train import _autocast, build_trainable, train_step


def run(args: argparse.Namespace, from_stores: bool) -> dict[str, object]:
    device = torch.device(args.device)
    stage = StageConfig(name="mae", objective="mae", manifest=args.manifest, batch_size=args.batch,
                        patch_size=args.read, out_size=args.size, num_workers=args.workers)  # fmt: skip
    t = build_trainable(args.model, stage, device, world=1, schedule_steps=10**6, compile=args.compile)
    augment = GPUAugment(AugmentSettings(out_size=args.size))
    generator = torch.Generator().manual_seed(0)
    dataset = PatchDataset(args.manifest, args.read, store=args.store, foreground_bias=0.9, preset=args.preset)
    loader = make_loader(dataset, args.batch, num_workers=args.workers, device=device)
    batches = iter(_forever(loader))
    fixed = next(batches)
    wait = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:  # the clock starts after warm-up (cuDNN autotuning, worker start)
            _sync(device)
            wait, start = 0.0, time.perf_counter()
        batch = next(batches) if from_stores else fixed
        wait += loader.wait_s if from_stores else 0.0
        loss, _ = train_step(t, augment, batch, generator, _autocast(device), stage.grad_clip)
    float(loss.detach())  # waits for the last step
    elapsed = time.perf_counter() - start
    loader.close()
    source = f"stores ({args.store})" if from_stores else "in memory"
    return {"data": source, "ms/step": 1e3 * elapsed / args.steps,
            "steps/s": args.steps / elapsed, "data stall": wait / elapsed}  # fmt: skip


def _forever(loader):
    while True:
        yield from loader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("manifest", help="manifest written by openmind-convert (or a query string)")
    p.add_argument("--model", default="resenc_l", help="training.model preset")
    p.add_argument("--size", type=int, default=160, help="network input edge (MAE patch)")
    p.add_argument("--read", type=int, default=160, help="crop edge read from the store")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=50, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers")
    p.add_argument("--store", default="zarr", choices=["zarr", "wds"])
    p.add_argument("--preset", default="all", help="manifest preset to train on")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the objective")
    args = p.parse_args()
    rows = [run(args, from_stores=False), run(args, from_stores=True)]
    df = pd.DataFrame(rows)
    df["x in memory"] = df["ms/step"] / df["ms/step"].iloc[0]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{args.model} MAE {args.size}^3 batch {args.batch} on {name}, {args.workers} workers\n")
    print(df.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
