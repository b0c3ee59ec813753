"""How conversion, resume, retry, verify and the loader's planning grow with the corpus: 1k .. 114k volumes.

Builds an OpenMind-shaped corpus itself: one tiny real NIfTI image with its two masks, hard-linked N
times under realistic BIDS paths over ~800 datasets, and a CSV of N rows. Every step runs as the user
runs it (the openmind-convert command in a subprocess, on a dask LocalCluster of --workers). Per N:
dry-run time and memory; conversion seconds per volume beyond the preprocessing itself; the driver's
peak memory (its own VmHWM); a finished-job rerun; kill -9 mid-conversion and the volumes the rerun
converted again; one `--retry-errors` volume and the shards it rewrote; verify; PatchDataset build time
and the memory of its volume list.

    python benchmarks/scale_bench.py 1000 10000 [--workers 2] [--dir /tmp/scale]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

VOLUME = 24  # voxels a side of the tiny image: the machinery, not the preprocessing, is measured
STORED = VOLUME - 8  # the anatomy mask's box, which conversion crops to
PER_SHARD = 70  # volumes per shard, as on the real corpus at 1 GB shards


def build_corpus(root: Path, count: int) -> Path:
    """N hard links of one tiny image (+ masks) under BIDS paths over ~800 datasets, and the CSV."""
    source = root / "_source"
    source.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = (rng.random((VOLUME,) * 3) * 100 + 10).astype(np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), source / "image.nii.gz")
    mask = np.zeros((VOLUME,) * 3, np.uint8)
    mask[4 : 4 + STORED, 4 : 4 + STORED, 4 : 4 + STORED] = 1
    nib.save(nib.Nifti1Image(mask, affine), source / "fb_mask.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros_like(mask), affine), source / "deface_mask.nii.gz")
    rows = []
    for i in range(count):
        dataset, subject, session = f"ds{i % 800:06d}", f"sub-{i // 800 + 1:03d}", f"ses-{i % 3 + 1}"
        name = f"{subject}_{session}_acq-mprage{i % 4}_run-{i % 7 + 1:02d}_T1w"
        folder = f"{dataset}/{subject}/{session}/anat"
        target = root / "OpenMind" / folder
        (target / f"{name}__Data").mkdir(parents=True, exist_ok=True)
        os.link(source / "image.nii.gz", target / f"{name}.nii.gz")
        for mask_name in ("fb_mask", "deface_mask"):
            os.link(source / f"{mask_name}.nii.gz", target / f"{name}__Data" / f"{mask_name}.nii.gz")
        rows.append({"image_path": f"{folder}/{name}.nii.gz", "modality": "T1w",
                     "anon_mask_path": f"{folder}/{name}__Data/deface_mask.nii.gz",
                     "anat_mask_path": f"{folder}/{name}__Data/fb_mask.nii.gz", "image_quality_score": 1,
                     "age": 20 + i % 60, "sex": "FM"[i % 2]})  # fmt: skip
    with (root / "openneuro_metadata.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def convert_command(root: Path, out: Path, workers: int, *extra: str) -> list[str]:
    shard_gb = PER_SHARD * 3 * STORED**3 / 1e9  # a sample is ~3 bytes a voxel
    return [str(root), str(out), "--format", "zarr,wds", "--workers", str(workers), "--shard-size",
            f"{shard_gb:.6f}", "--quiet", *extra]  # fmt: skip


_DRIVER = (
    "import sys\n"
    "from openmind_tools.cli.convert import main\n"
    "code = main(sys.argv[1:])\n"
    "hwm = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024\n"
    "print('VMHWM', hwm, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def timed(args: list[str]) -> tuple[float, int]:
    """Wall seconds and the driver's own peak memory (VmHWM, bytes; not its dask workers') of openmind-convert."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _DRIVER, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 3):
        raise RuntimeError(f"openmind-convert {args}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return seconds, next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("VMHWM"))


def preprocess_seconds(root: Path, reps: int = 20) -> float:
    """One volume's preprocessing alone (the floor the machinery is measured against)."""
    from openmind_tools.preprocess import preprocess

    source = root / "_source"
    preprocess(source / "image.nii.gz", source / "fb_mask.nii.gz", source / "deface_mask.nii.gz")
    start = time.perf_counter()
    for _ in range(reps):
        preprocess(source / "image.nii.gz", source / "fb_mask.nii.gz", source / "deface_mask.nii.gz")
    return (time.perf_counter() - start) / reps


def shard_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").glob("*.tar")}


def measure(count: int, base: Path, workers: int) -> dict[str, float]:
    work = base / str(count)
    shutil.rmtree(work, ignore_errors=True)
    root = build_corpus(work / "corpus", count)
    row: dict[str, float] = {"volumes": count}
    seconds, hwm = timed([str(root), str(work / "dry"), "--dry-run"])
    row |= {"dry-run s": seconds, "dry-run MB": hwm / 1e6}

    victim = root / "OpenMind" / pd.read_csv(root / "openneuro_metadata.csv")["image_path"].iloc[count // 10]
    victim.unlink()  # one input missing in the first run: the retry below brings it back
    out = work / "out"
    seconds, hwm = timed(convert_command(root, out, workers))
    row |= {"convert s": seconds, "driver MB": hwm / 1e6}
    row["machinery ms/volume"] = 1e3 * (seconds * workers / count - preprocess_seconds(root))
    row["finished-job rerun s"] = timed(convert_command(root, out, workers))[0]
    os.link(root / "_source" / "image.nii.gz", victim)
    before = shard_stats(out)
    timed(convert_command(root, out, workers, "--retry-errors"))
    after = shard_stats(out)
    row["shards"] = len(after)
    row["shards rewritten by a retry"] = sum(after.get(name) != stat for name, stat in before.items())
    row["verify s"] = timed(["verify", str(out), "--workers", str(workers), "--quiet"])[0]

    killed = work / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, *convert_command(root, killed, workers)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    journal = killed / ".journal.jsonl"
    while proc.poll() is None and (not journal.exists() or len(journal.read_bytes().splitlines()) < count // 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    journaled = {json.loads(line)["volume"]["id"] for line in journal.read_text().splitlines()
                 if line.startswith('{"volume"')}  # fmt: skip
    volumes = killed / "store.zarr" / "volumes"
    stored = {str(p.parent.relative_to(volumes)) for p in volumes.rglob("zarr.json") if (p.parent / "image").is_dir()}
    row["converted again after kill -9"] = len(stored - journaled)
    timed(convert_command(root, killed, workers))

    for store in ("zarr", "wds"):
        code = ("import gc, time, tracemalloc; from openmind_tools.loader import PatchDataset; tracemalloc.start(); "
                f"t = time.perf_counter(); d = PatchDataset({str(out / 'manifest.parquet')!r}, 16, store={store!r}); "
                "s = time.perf_counter() - t; gc.collect(); print(s, tracemalloc.get_traced_memory()[0])")  # fmt: skip
        build, refs = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     check=True).stdout.split()  # fmt: skip
        row |= {f"PatchDataset({store}) build s": float(build),
                f"PatchDataset({store}) MB (what each worker holds)": int(refs) / 1e6}  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("counts", type=int, nargs="+", help="corpus sizes, e.g. 1000 10000 114570")
    p.add_argument("--workers", type=int, default=2, help="dask workers (default 2)")
    p.add_argument("--dir", default="/tmp/openmind_scale", help="scratch folder (deleted per N afterwards)")
    args = p.parse_args(argv)
    rows = []
    for count in args.counts:
        rows.append(measure(count, Path(args.dir), args.workers))
        print(pd.DataFrame(rows).set_index("volumes").T.to_markdown(floatfmt=".2f"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
