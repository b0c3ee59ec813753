"""benchmarks/gpu_check.py in its CPU mode (what CI can run), and the synthetic store it measures on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from openmind_tools.loader import PatchDataset, make_loader
from openmind_tools.verify import verify

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from synthetic_store import write_synthetic_store  # noqa: E402


def test_the_synthetic_store_is_deterministic_openmind_shaped_and_readable(tmp_path: Path) -> None:
    a = pd.read_parquet(write_synthetic_store(5, tmp_path / "a", seed=3))
    b = pd.read_parquet(write_synthetic_store(5, tmp_path / "b", seed=3))
    c = pd.read_parquet(write_synthetic_store(5, tmp_path / "c", seed=4))
    assert list(a["checksum"]) == list(b["checksum"]) and list(a["checksum"]) != list(c["checksum"])
    shapes = np.array(a["shape"].tolist())
    assert (shapes >= [135, 165, 135]).all() and (shapes <= [175, 205, 175]).all()
    assert verify(tmp_path / "a", progress=False) == []  # both stores hold what the manifest says
    batch = next(iter(make_loader(PatchDataset(tmp_path / "a" / "manifest.parquet", 160), batch_size=2)))
    inside = batch["image"][batch["anatomy"].bool()].float()
    assert abs(float(inside.mean())) < 0.5 and 0.5 < float(inside.std()) < 1.5  # z-scored inside the anatomy
    assert 0 < float(batch["deface"].float().mean()) < 0.2


def test_the_gpu_check_runs_end_to_end_in_its_cpu_mode(tmp_path: Path) -> None:
    command = [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--device", "cpu", "--small", "--no-compile",
               "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["settings"]["model"] == "resenc_tiny"
    ours = [r for r in report["augment"] if r["pipeline"] == "GPUAugment"]
    assert len(ours) == 2 and all(r["ms/batch"] > 0 for r in ours)
    assert any(r["pipeline"].startswith("MONAI") and "ms/batch" in r for r in report["augment"])
    rows = report["train"]
    assert len(rows) == 6 and all("error" not in r for r in rows), rows
    assert all(r["loss finite"] and r["ms/step"] > 0 and 0 <= r["data stall"] < 1 for r in rows)
    assert {r["objective"] for r in rows} == {"mae", "voco"}
    assert {r["settings"] for r in rows} >= {"plain", "cudnn.benchmark", "channels_last_3d"}
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| GPUAugment | all fire |" in table and "| voco |" in table
