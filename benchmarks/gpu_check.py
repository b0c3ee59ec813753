"""Check and measure the GPU path in one run: augmentation, training steps from the stores, peak memory.

Data is made on the spot (benchmarks/synthetic_store.py: OpenMind-shaped volumes through the project's own
writers), so nothing needs NIfTI, SimpleITK or the network. Rows:
- augmentation, batch 4 x 1 x 192^3 -> 160^3, at nnU-Net's probabilities and with every op firing: ms per
  batch by CUDA events (median of --reps after warm-up), beside MONAI's transforms on the same device
  tensors one sample at a time (the user's alternative), when MONAI is installed;
- training: ResEnc-L MAE 160^3 batch 4 bf16 from the stores with the machine's workers vs one batch kept
  on the device (ms/step, patches/s, data stall, peak memory), then cudnn.benchmark, channels_last_3d and
  torch.compile one at a time, then VoCo at the recipe's batch.
Writes gpu_check.json and gpu_check.md into --out. `--device cpu --small` runs the same code in CI time.

    python benchmarks/gpu_check.py --out $OUT                    # on a GPU machine (gpu_check.sh wraps it)
    python benchmarks/gpu_check.py --device cpu --small --out /tmp/check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts

from augment_bench import ALL_P, NNUNET_P, augment_settings, monai_pipeline  # noqa: E402
from synthetic_store import synthetic_volume, write_synthetic_store  # noqa: E402
from train_step import run as train_row  # noqa: E402

from openmind_tools.augment import GPUAugment  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="folder for the JSON and table")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="tiny model, volumes and patches: the CPU/CI mode")
    p.add_argument("--volumes", type=int, help="synthetic volumes (default 48, --small 6)")
    p.add_argument("--reps", type=int, help="timed augmentation batches (default 20, --small 2)")
    p.add_argument("--steps", type=int, help="timed training steps per row (default 20, --small 2)")
    p.add_argument("--workers", type=int, help="DataLoader workers (default: the machine's cores - 2)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--pytest-log", help="the output of `pytest -m gpu`, whose summary line goes into the report")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu --small for the CPU mode)")
    small = args.small
    sizes = {"batch": 2 if small else 4, "in": 40 if small else 192, "out": 32 if small else 160}
    model = "resenc_tiny" if small else "resenc_l"
    reps, steps = args.reps or (2 if small else 20), args.steps or (2 if small else 20)
    workers = args.workers if args.workers is not None else (1 if small else max(1, (os.cpu_count() or 4) - 2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = {"machine": _machine(args.device), "settings": {**sizes, "model": model, "reps": reps,
                              "steps": steps, "workers": workers}}  # fmt: skip
    if args.pytest_log and Path(args.pytest_log).is_file():
        lines = [line for line in Path(args.pytest_log).read_text().splitlines() if line.strip()]
        report["pytest -m gpu"] = lines[-1] if lines else "no output"
    start = time.perf_counter()
    manifest = write_synthetic_store(args.volumes or (6 if small else 48), out / "store", small=small)
    report["store_s"] = time.perf_counter() - start
    report["augment"] = _augment_rows(args.device, sizes, reps)
    _write(report, out)  # partial results survive a later failure or timeout
    common = {"model": model, "size": sizes["out"], "read": sizes["out"], "batch": sizes["batch"], "steps": steps,
              "warmup": 2 if small else 5, "workers": workers, "device": args.device}  # fmt: skip
    rows = []
    for from_stores, extra in ((False, {}), (True, {}), (True, {"cudnn_benchmark": True}),
                               (True, {"channels_last": True}), (True, {"compile": True})):  # fmt: skip
        if extra.get("compile") and args.no_compile:
            continue
        rows.append(_guarded(partial(train_row, str(manifest), from_stores=from_stores, **common, **extra)))
        report["train"] = rows
        _write(report, out)
    voco = {**common, "read": sizes["in"] if not small else sizes["out"], "batch": 2 if small else 8}
    for from_stores in (False, True):
        rows.append(_guarded(partial(train_row, str(manifest), from_stores=from_stores, objective="voco", **voco)))
    report["train"] = rows
    report["total_s"] = time.perf_counter() - start
    _write(report, out)
    print((out / "gpu_check.md").read_text())
    return 0


def _augment_rows(device: str, sizes: dict[str, int], reps: int) -> list[dict[str, Any]]:
    """GPUAugment and MONAI on the same device tensors: ms per batch, median of `reps` after warm-up."""
    dev = torch.device(device)
    generator = np.random.default_rng(0)
    volumes = [synthetic_volume(generator, (sizes["in"],) * 3) for _ in range(sizes["batch"])]
    image = torch.stack([torch.from_numpy(v.image.astype("float32"))[None] for v in volumes]).to(dev)
    masks = tuple(torch.stack([torch.from_numpy(getattr(v, m))[None] for v in volumes]).to(dev)
                  for m in ("anatomy", "deface"))  # fmt: skip
    rows = []
    for label, probabilities in (("nnU-Net", NNUNET_P), ("all fire", ALL_P)):
        augment = GPUAugment(augment_settings(probabilities, sizes["out"]))
        rows.append({"pipeline": "GPUAugment", "probabilities": label,
                     **_timed(partial(augment, image, masks), reps, dev)})  # fmt: skip
        try:
            pipeline = monai_pipeline(probabilities, sizes["out"])
        except ImportError as e:
            rows.append({"pipeline": "MONAI", "probabilities": label, "error": f"not installed ({e})"})
            continue
        rows.append({"pipeline": "MONAI, one sample at a time", "probabilities": label,
                     **_guarded(partial(_timed, partial(pipeline, image, masks), reps, dev))})  # fmt: skip
    return rows


def _timed(fn, reps: int, device: torch.device) -> dict[str, float]:
    """Median ms per call (CUDA events on a GPU, wall clock on CPU) after 3 warm-up calls; peak memory."""
    for _ in range(3):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(reps):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        for _ in range(reps):
            begin = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - begin))
        peak = float("nan")
    return {"ms/batch": statistics.median(times), "min ms": min(times), "peak GiB": peak}


def _guarded(fn) -> dict[str, Any]:
    """A row's numbers, or the error that stopped it (the check goes on to the next row)."""
    try:
        return fn()
    except Exception as e:  # a failing configuration is a finding of this check, reported in its row
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def _machine(device: str) -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}
    if device == "cuda":
        info |= {"device": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                 "cudnn": torch.backends.cudnn.version()}  # fmt: skip
    else:
        info |= {"device": platform.processor() or platform.machine()}
    return info


def _write(report: dict[str, Any], out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(_markdown(report))


def _markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"{m['device']}, torch {m['torch']}, CUDA {m.get('cuda', '-')}, Python {m['python']}, {m['cpus']} CPUs",
             ""]  # fmt: skip
    if "pytest -m gpu" in report:
        lines += [f"`pytest -m gpu`: {report['pytest -m gpu']}", ""]
    s = report["settings"]
    lines += [f"Augmentation, batch {s['batch']} x 1 x {s['in']}^3 -> {s['out']}^3, median of {s['reps']}:", "",
              "| pipeline | probabilities | ms / batch | min ms | peak GiB |", "|---|---|---:|---:|---:|"]  # fmt: skip
    for row in report.get("augment", []):
        if "error" in row:
            lines.append(f"| {row['pipeline']} | {row['probabilities']} | {row['error']} | | |")
        else:
            lines.append(f"| {row['pipeline']} | {row['probabilities']} | {row['ms/batch']:.2f} | {row['min ms']:.2f} "
                         f"| {row['peak GiB']:.2f} |")  # fmt: skip
    lines += ["", f"Training steps, {s['model']}, {s['steps']} timed steps per row:", "",
              "| objective | data | settings | ms / step | patches / s | data stall | peak GiB | loss finite |",
              "|---|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for row in report.get("train", []):
        if "error" in row:
            lines.append(f"| | | | {row['error']} | | | | |")
        else:
            lines.append(f"| {row['objective']} | {row['data']} | {row['settings']} | {row['ms/step']:.1f} | "
                         f"{row['patches/s']:.1f} | {row['data stall']:.1%} | {row['peak GiB']:.2f} | "
                         f"{row['loss finite']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
