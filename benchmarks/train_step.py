"""Training step time and data stall: the trainer's own step fed from the stores vs from memory.

    python benchmarks/train_step.py MANIFEST [--steps 50] [--model resenc_l] [--size 160] [--batch 4]
    python benchmarks/train_step.py demo/store/manifest.parquet --model resenc_tiny --size 32 --read 32 --device cpu

Both rows run `training.train.train_step` (GPU augmentation + forward/backward, bf16 autocast on CUDA):
"stores" takes batches from `make_loader` (workers read and crop, pinned memory, async copy), "in memory"
repeats one batch already on the device. The stall is the time the step waited for the loader over the
wall time; the goal on an H100 for ResEnc-L MAE 160^3 bs 4 is <= 3%. Speed settings (cudnn.benchmark,
channels_last_3d, torch.compile) are flags, so benchmarks/gpu_check.py can measure each.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import pandas as pd
import torch

from openmind_tools.augment import AugmentSettings, GPUAugment
from openmind_tools.loader import PatchDataset, make_loader
from training.config import StageConfig
from training.train import _autocast, build_trainable, train_step


def run(
    manifest: str,
    *,
    from_stores: bool,
    model: str = "resenc_l",
    objective: str = "mae",
    size: int = 160,
    read: int = 160,
    batch: int = 4,
    steps: int = 50,
    warmup: int = 5,
    workers: int = 8,
    store: str = "zarr",
    preset: str = "all",
    device: str = "cuda",
    compile: bool = False,
    channels_last: bool = False,
    cudnn_benchmark: bool = False,
) -> dict[str, Any]:
    """One row: ms/step, patches/s, data stall and peak device memory of `steps` timed steps."""
    device = torch.device(device)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    head = 2048 if model == "resenc_l" else 64
    options = {"mae": {"block_size": 16 if size % 16 == 0 else 8}, "voco": {"hidden_dim": head, "out_dim": head}}
    stage = StageConfig(name=objective, objective=objective, manifest=manifest, batch_size=batch, patch_size=read,
                        out_size=size, num_workers=workers, options=options.get(objective, {}))  # fmt: skip
    t = build_trainable(model, stage, device, world=1, schedule_steps=10**6, compile=compile,
                        channels_last=channels_last)  # fmt: skip
    augment = GPUAugment(AugmentSettings(out_size=size))
    generator = torch.Generator().manual_seed(0)
    dataset = PatchDataset(manifest, read, store=store, foreground_bias=0.9, preset=preset)
    loader = make_loader(dataset, batch, num_workers=workers, device=device)
    batches = iter(_forever(loader))
    fixed = next(batches)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wait, start = 0.0, time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:  # the clock starts after warm-up (cuDNN autotuning, compilation, worker start)
            _sync(device)
            wait, start = 0.0, time.perf_counter()
        batch_now = next(batches) if from_stores else fixed
        wait += loader.wait_s if from_stores else 0.0
        loss, _ = train_step(t, augment, batch_now, generator, _autocast(device), stage.grad_clip)
    final = float(loss.detach())  # waits for the last step
    elapsed = time.perf_counter() - start
    loader.close()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    settings = ", ".join(n for n, on in (("compile", compile), ("channels_last_3d", channels_last),
                                          ("cudnn.benchmark", cudnn_benchmark)) if on) or "plain"  # fmt: skip
    data = f"stores ({store}, {workers} workers)" if from_stores else "in memory"
    return {"objective": objective, "data": data, "settings": settings, "ms/step": 1e3 * elapsed / steps,
            "patches/s": steps * batch / elapsed, "data stall": wait / elapsed, "peak GiB": peak,
            "loss finite": bool(torch.isfinite(torch.tensor(final)))}  # fmt: skip


def _forever(loader):
    while True:
        yield from loader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("manifest", help="manifest written by openmind-convert (or a query string)")
    p.add_argument("--model", default="resenc_l", help="training.model preset")
    p.add_argument("--objective", default="mae", choices=["mae", "voco"])
    p.add_argument("--size", type=int, default=160, help="network input edge (MAE patch / VoCo region)")
    p.add_argument("--read", type=int, default=160, help="crop edge read from the store")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=50, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers")
    p.add_argument("--store", default="zarr", choices=["zarr", "wds"])
    p.add_argument("--preset", default="all", help="manifest preset to train on")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the objective")
    p.add_argument("--channels-last", action="store_true", help="channels_last_3d weights and inputs")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    args = vars(p.parse_args(argv))
    manifest = args.pop("manifest")
    rows = [run(manifest, from_stores=False, **args), run(manifest, from_stores=True, **args)]
    df = pd.DataFrame(rows)
    df["x in memory"] = df["ms/step"] / df["ms/step"].iloc[0]
    name = torch.cuda.get_device_name() if args["device"] == "cuda" else "CPU"
    print(f"{args['model']} {args['objective']} {args['size']}^3 batch {args['batch']} on {name}\n")
    print(df.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
