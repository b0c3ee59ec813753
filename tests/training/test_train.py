"""The trainer end to end on the demo store: torchrun DDP on CPU, exact resume, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from torchrun_helpers import two_ranks

from training.cli import main
from training.eval_cli import main as eval_main
from training.model import load_exported

RECIPE = Path(__file__).parents[2] / "training" / "configs" / "demo.toml"


def _args(demo_out: Path, run: Path, *extra: str) -> list[str]:
    m = json.dumps(str(demo_out / "manifest.parquet"))
    return [str(RECIPE), f"--run.out={json.dumps(str(run))}", f"--stages.voco.manifest={m}",
            f"--stages.mae.manifest={m}", "--run.log_every=1", *extra]  # fmt: skip


@pytest.mark.slow
def test_torchrun_two_ranks_runs_both_stages_and_exports(demo_out: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = two_ranks("-m", "training", *_args(demo_out, run, "--stages.voco.max_steps=3", "--stages.mae.max_steps=3",
                                              "--stages.voco.num_workers=0", "--stages.mae.num_workers=0"),
                     timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("voco", "mae"):
        log = pd.read_csv(run / f"{stage}_log.csv")
        assert list(log["step"]) == [1, 2, 3] and log["loss"].notna().all()
        assert torch.isfinite(torch.tensor(log["loss"].to_numpy())).all()
        assert (run / f"{stage}_loss.png").stat().st_size > 0
        assert any((run / "tensorboard" / stage).glob("events.out.tfevents.*"))
    net, plan = load_exported(run / "mae_encoder.pt")  # strict load into a fresh ResEnc inside
    assert plan["recommended_downstream_patchsize"] == [160, 160, 160]
    mae = torch.load(run / "mae_final.pt", weights_only=True)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in mae.items())
    voco = torch.load(run / "voco_final.pt", weights_only=True)
    initial = {k: v for k, v in voco.items() if k.startswith("encoder.")}
    assert any(not torch.equal(v, mae[k]) for k, v in initial.items())  # MAE moved the VoCo start
    assert plan["trained_parts"] == ["encoder", "decoder"]  # MAE trains the whole U-Net: its export holds it
    voco_export = torch.load(run / "voco_encoder.pt", weights_only=True)  # VoCo trains the encoder alone
    assert voco_export["nnssl_adaptation_plan"]["trained_parts"] == ["encoder"]
    assert voco_export["network_weights"].keys() == initial.keys()
    assert all(torch.equal(v, initial[k]) for k, v in voco_export["network_weights"].items())


@pytest.mark.slow
def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(demo_out: Path, tmp_path: Path) -> None:
    common = [
        "--stages.voco.max_steps=30",
        "--stages.mae.max_steps=0",
        "--run.checkpoint_every=5",
        "--stages.voco.num_workers=1",
        "--stages.voco.patch_size=32",
        "--stages.voco.out_size=32",
        "--stages.voco.batch_size=2",
    ]  # fmt: skip  (the pre-48^3 demo steps)
    # Every run in a fresh process: torch's thread count (set by other tests in this one) changes the sums.
    train = [sys.executable, "-m", "training"]
    subprocess.run([*train, *_args(demo_out, tmp_path / "straight", *common)], check=True, capture_output=True)
    run = tmp_path / "killed"
    log = run / "voco_log.csv"
    with subprocess.Popen([*train, *_args(demo_out, run, *common)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:  # fmt: skip
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if log.exists() and len(log.read_text().splitlines()) > 7:  # header + 7 steps: past checkpoint 5
                break
            time.sleep(0.02)
        assert proc.poll() is None, "training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    stopped_at = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert stopped_at in (5, 10, 15, 20, 25)
    assert main([*_args(demo_out, run, *common, "--stages.voco.lr=0.1"), "--resume", str(run)]) == 2  # changed
    subprocess.run([*train, *_args(demo_out, run, *common), "--resume", str(run)], check=True, capture_output=True)
    straight = torch.load(tmp_path / "straight" / "voco_final.pt", weights_only=True)
    resumed = torch.load(run / "voco_final.pt", weights_only=True)
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
    assert list(pd.read_csv(log)["step"]) == list(range(1, 31))  # rows past the checkpoint logged once


@pytest.mark.slow
def test_the_demo_recipe_learns_visibly_and_its_run_folder_probes(demo_out: Path, tmp_path: Path) -> None:
    run = tmp_path / "demo"
    args = [a for a in _args(demo_out, run) if not a.startswith("--run.log_every")]  # the recipe's own interval
    subprocess.run([sys.executable, "-m", "training", *args], check=True, capture_output=True, timeout=900)
    for stage in ("voco", "mae"):
        loss = pd.read_csv(run / f"{stage}_log.csv")["loss"].to_numpy()
        quarter = len(loss) // 4
        first, last = loss[:quarter], loss[-quarter:]
        assert quarter >= 3 and first.mean() - last.mean() > max(first.std(), last.std()), (stage, loss)
    assert eval_main(["probe", str(run), "--manifest", str(demo_out / "manifest.parquet"), "--target", "modality",
                      "--no-progress"]) == 0  # fmt: skip
    scores = pd.read_csv(run / "mae_encoder_probe" / "probe.csv").set_index(["metric", "encoder"])["mean"]
    assert scores["balanced_accuracy", "pretrained"] > scores["balanced_accuracy", "baseline"]


CONTRASTIVE = RECIPE.with_name("demo_yaware.toml")


def _contrastive_args(demo_out: Path, run: Path, *extra: str) -> list[str]:
    m = json.dumps(str(demo_out / "manifest.parquet"))
    return [str(CONTRASTIVE), f"--run.out={json.dumps(str(run))}", f"--stages.simclr.manifest={m}",
            f"--stages.yaware.manifest={m}", *extra]  # fmt: skip


@pytest.mark.slow
def test_the_yaware_demo_stage_learns_without_collapsing(demo_out: Path, tmp_path: Path) -> None:
    run = tmp_path / "yaware"
    args = _contrastive_args(demo_out, run, "--stages.simclr.max_steps=0")  # the y-aware stage as the recipe has it
    subprocess.run([sys.executable, "-m", "training", *args], check=True, capture_output=True, timeout=900)
    log = pd.read_csv(run / "yaware_log.csv")
    loss = log["loss"].to_numpy()
    quarter = len(loss) // 4
    first, last = loss[:quarter], loss[-quarter:]
    assert quarter >= 3 and first.mean() - last.mean() > max(first.std(), last.std()), loss
    assert (log["contrast_std"] > 0.2).all() and (log["contrast_cos"] < 0.95).all(), log  # spread, not one point
    assert 0 < log["yaware_missing"].max() < 1  # the demo's ds000202 has no ages: those rows fall back to SimCLR
    net, plan = load_exported(run / "yaware_encoder.pt")  # the encoder it trained, ready for nnU-Net
    assert plan["trained_parts"] == ["encoder"]
    trained = torch.load(run / "yaware_final.pt", weights_only=True)
    assert all(torch.equal(v, trained[f"encoder.{k}"]) for k, v in net.encoder.state_dict().items())


@pytest.mark.slow
def test_torchrun_two_ranks_run_the_yaware_stage_with_balanced_draws(demo_out: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = two_ranks("-m", "training", *_contrastive_args(
        demo_out, run, "--stages.simclr.max_steps=0", "--stages.yaware.max_steps=2", "--stages.yaware.num_workers=0",
        "--run.log_every=1", "--stages.yaware.balance_by=\"dataset\""), timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    log = pd.read_csv(run / "yaware_log.csv")
    assert list(log["step"]) == [1, 2] and torch.isfinite(torch.tensor(log["loss"].to_numpy())).all()
    assert (log["contrast_std"] > 0).all()  # computed over both ranks' gathered rows
    assert (run / "yaware_encoder.pt").stat().st_size > 0


def test_bad_config_fails_before_any_work(demo_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(_args(demo_out, tmp_path / "r", "--stages.voco.epochz=3")) == 2
    assert "unknown key(s) ['epochz']" in capsys.readouterr().err
    assert main(_args(demo_out, tmp_path / "r", "--stages.mae.options.block_size=5")) == 2
    assert "stages.mae.out_size 48 is not a multiple of options.block_size 5" in capsys.readouterr().err
    empty = json.dumps(f"modality=SWI of {demo_out / 'manifest.parquet'}")  # SWI: an OpenMind modality, absent here
    assert main([*_args(demo_out, tmp_path / "r"), f"--stages.mae.manifest={empty}"]) == 2
    err = capsys.readouterr().err
    assert "stages.mae:" in err and "selects no volume" in err
    twice = tmp_path / "twice.toml"
    twice.write_text('[[stages]]\nname = "a"\nobjective = "mae"\nmanifest = "m"\n[[stages]]\nname = "a"\n')
    assert main([str(twice)]) == 2 and "needs a unique name" in capsys.readouterr().err
    twice.write_text('[[stages]]\nname = "a"\nmanifest = "m"\n')
    assert main([str(twice)]) == 2 and "missing key(s) ['objective']" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_stage_starts_from_the_encoder_of_the_stage_it_names(tmp_path: Path) -> None:
    from training.config import StageConfig
    from training.model import PRESETS
    from training.train import build_trainable

    torch.manual_seed(1)
    earlier = PRESETS["resenc_tiny"]()
    torch.save(earlier.state_dict(), tmp_path / "voco_final.pt")
    stage = StageConfig(name="mae", objective="mae", manifest="unused", out_size=32)
    torch.manual_seed(2)
    started = build_trainable("resenc_tiny", stage, torch.device("cpu"), 1, 10, init=tmp_path / "voco_final.pt").net
    fresh = build_trainable("resenc_tiny", stage, torch.device("cpu"), 1, 10).net
    for key, value in earlier.encoder.state_dict().items():
        assert torch.equal(started.encoder.state_dict()[key], value), key
    stem = "stem.convs.0.conv.weight"
    assert not torch.equal(fresh.encoder.state_dict()[stem], earlier.encoder.state_dict()[stem])
    decoder = {k: v for k, v in started.state_dict().items() if k.startswith("decoder.") and "weight" in k}
    assert any(not torch.equal(v, earlier.state_dict()[k]) for k, v in decoder.items())  # only the encoder comes over
