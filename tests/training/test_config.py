"""Recipes checked whole before any work, and one training per run folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from openmind_tools import zarr_store
from training.cli import main
from training.config import load_config

RECIPE = Path(__file__).parents[2] / "training" / "configs" / "demo.toml"


def _args(demo_out: Path, run: Path, *extra: str) -> list[str]:
    m = json.dumps(str(demo_out / "manifest.parquet"))
    return [str(RECIPE), f"--run.out={json.dumps(str(run))}", f"--stages.voco.manifest={m}",
            f"--stages.mae.manifest={m}", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--stages.voco.epochs=-1", "stages.voco.epochs: expected a value in [1, inf)"),
        ("--run.checkpoint_every=0", "run.checkpoint_every: expected a value in [1, inf)"),
        ("--run.log_every=0", "run.log_every"),
        ("--stages.voco.batch_size=0", "stages.voco.batch_size"),
        ("--stages.voco.num_workers=-1", "stages.voco.num_workers"),
        ("--stages.voco.patch_size=0", "stages.voco.patch_size"),
        ("--stages.voco.lr=0", "stages.voco.lr: expected a value in (0, inf)"),
        ("--stages.voco.lr=nan", "stages.voco.lr: expected a value in (0, inf), got nan"),
        ("--stages.voco.options.momentum=nan", "stages.voco.options.momentum: expected a value in [0, 1)"),
        ("--stages.mae.options.block_size=inf", "stages.mae.options.block_size: expected <class 'int'>"),
        ("--stages.voco.foreground_bias=1.5", "stages.voco.foreground_bias"),
        ("--stages.mae.options.mask_ratio=1.0", "stages.mae.options.mask_ratio: expected a value in (0, 1)"),
        ("--stages.mae.options={mask_ratio=0.5, block=8}", "stages.mae.options: unknown key(s) ['block']"),
        (
            '--stages.voco.objective="byol"',
            "stages.voco.objective: expected one of ['genesis', 'mae', 'moco', 'multitask', 'regress', 'simclr', "
            "'voco', 'yaware']",
        ),
        ("--stages.voco.balance_by=[]", "stages.voco.balance_by: expected a column name"),
        ('--run.model="resenc_xl"', "run.model: expected one of ['resenc_l', 'resenc_tiny']"),
        ('--stages.mae.store="s3"', "stages.mae.store: expected one of ('zarr', 'wds')"),
        ('--stages.mae.on_error="ignore"', "stages.mae.on_error"),
        ("--stages.mae.crops_per_volume=0", "stages.mae.crops_per_volume"),
        ("--stages.mae.augment={p_rotaton=0.5}", "unknown augmentation setting(s): p_rotaton"),
        ("--stages.mae.augment={p_noise=2.0}", "p_noise: expected a probability in [0, 1]"),
        ('--stages.mae.exclude="flags.parquet"', "stages.mae.exclude: flags.parquet: no such flags file"),
        ("--stages.mae.exclude=[]", "stages.mae.exclude: expected a flags file or a list of them"),
    ],
)
def test_a_bad_value_in_any_stage_exits_2_before_any_work(demo_out: Path, tmp_path: Path, capsys, override: str,
                                                          message: str) -> None:  # fmt: skip
    run = tmp_path / "run"
    assert main(_args(demo_out, run, override)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()  # the MAE stage's mistake is found before the VoCo stage trains


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            '{column="sex"}',
            "stages.voco.options: objective 'yaware' needs numbers in column 'sex', which holds categories ['F', 'M']",
        ),
        ('{column="weight_kg"}', "stages.voco: metadata: no manifest column(s) ['weight_kg']"),
        ('{column="age", kernel="gauss"}', "stages.voco.options.kernel: expected one of ('rbf', 'exact')"),
        ("{sigma=0}", "stages.voco.options.sigma: expected a value in (0, inf)"),
    ],
)
def test_the_objectives_columns_are_checked_against_the_manifest_before_any_work(
    demo_out: Path, tmp_path: Path, capsys, options: str, message: str
) -> None:
    run = tmp_path / "run"
    assert main(_args(demo_out, run, '--stages.voco.objective="yaware"', f"--stages.voco.options={options}")) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()


def test_a_stage_with_exclude_trains_on_the_manifest_less_the_flagged_ids(demo_out: Path, tmp_path: Path) -> None:
    from training.train import _select

    rows = pd.read_parquet(demo_out / "manifest.parquet")
    flagged = rows["id"].iloc[[1, 4]].tolist()
    flags = pd.DataFrame({"id": [flagged[0], flagged[0], flagged[1]], "reason": ["high x: 1", "low y: 2", "mine: z"]})
    flags.to_parquet(tmp_path / "flags.parquet")
    cfg = load_config(RECIPE, [f"--stages.voco.manifest={json.dumps(str(demo_out / 'manifest.parquet'))}",
                               f"--stages.voco.exclude={json.dumps(str(tmp_path / 'flags.parquet'))}"])  # fmt: skip
    selected, meta = _select(cfg.stages[0])
    assert sorted(selected["id"]) == sorted(set(rows["id"]) - set(flagged))
    assert f"exclude={tmp_path / 'flags.parquet'}" in meta["query"]


def test_toml_lists_reach_the_augmentation_settings(demo_out: Path) -> None:
    cfg = load_config(RECIPE, ["--stages.mae.augment={scale=[0.9, 1.1], p_scale=0.5}"])
    assert cfg.stages[1].augment == {"scale": [0.9, 1.1], "p_scale": 0.5}


def _snapshot(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file()}  # fmt: skip


@pytest.mark.slow
def test_one_training_per_run_folder(demo_out: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    short = ["--stages.voco.max_steps=2", "--stages.mae.max_steps=2", "--stages.voco.num_workers=0",
             "--stages.mae.num_workers=0"]  # fmt: skip
    long = [sys.executable, "-m", "training", *_args(demo_out, run, "--stages.voco.max_steps=400",
                                                     "--stages.mae.max_steps=0", "--run.log_every=1")]  # fmt: skip
    with subprocess.Popen(long, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as first:
        deadline = time.monotonic() + 300
        while not (run / "voco_log.csv").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before a second could try"
        assert main(_args(demo_out, run, *short, "--overwrite")) == 2
        assert "another openmind-train is running in this folder" in capsys.readouterr().err
        first.kill()
    assert main(_args(demo_out, run, *short)) == 2  # a folder that holds a run
    err = capsys.readouterr().err
    assert "holds a run" in err and "--resume" in err and "--overwrite" in err
    stale = run / f".checkpoint.pt.{first.pid}.0123abcd.tmp"  # what a kill -9 mid-checkpoint leaves (pid dead)
    live = run / f".checkpoint.pt.{os.getpid()}.0123abcd.tmp"  # a write in flight: left alone
    mine = [run / "notes_log.csv", run / "tensorboard" / "mine" / "events.out.tfevents.1.x", run / "notes.txt"]
    for path in [stale, live, *mine]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert main(_args(demo_out, run, *short, "--overwrite")) == 0
    capsys.readouterr()
    assert list(pd.read_csv(run / "voco_log.csv")["step"]) == [2]  # no row of the killed run survives
    assert not stale.exists() and live.exists() and all(p.exists() for p in mine)  # only the run's own files went
    live.unlink()
    before = _snapshot(run)
    assert main([*_args(demo_out, run, *short, "--stages.voco.lr=0.5"), "--resume", str(run)]) == 2
    assert "these differ" in capsys.readouterr().err
    assert _snapshot(run) == before  # a refused resume changes no file
    assert main([*_args(demo_out, tmp_path / "nothing", *short), "--resume", str(tmp_path / "nothing")]) == 2
    assert not (tmp_path / "nothing").exists()


def test_a_stage_skips_unreadable_volumes_counts_them_and_stops_past_max_skipped(demo_out: Path, tmp_path: Path,
                                                                                capsys) -> None:  # fmt: skip
    store = tmp_path / "store"
    store.mkdir()
    shutil.copytree(demo_out / "store.zarr", store / "store.zarr")
    shutil.copy(demo_out / "manifest.parquet", store / "manifest.parquet")
    rows = pd.read_parquet(store / "manifest.parquet")
    lost = rows["id"].iloc[3]
    shutil.rmtree(store / "store.zarr" / zarr_store.group_path(lost))
    m = json.dumps(str(store / "manifest.parquet"))
    steps = ["--stages.voco.max_steps=5", "--stages.mae.max_steps=0", "--stages.voco.num_workers=0",
             f"--stages.voco.manifest={m}", f"--stages.mae.manifest={m}", "--run.log_every=5"]  # fmt: skip
    assert main(_args(demo_out, tmp_path / "raise", *steps)) == 3  # on_error="raise": a StoreError, exit 3
    assert lost in capsys.readouterr().err
    assert main(_args(demo_out, tmp_path / "skip", *steps, '--stages.voco.on_error="skip"',
                      "--stages.voco.max_skipped=0.1")) == 0  # fmt: skip
    assert pd.read_csv(tmp_path / "skip" / "voco_log.csv")["skipped_volumes"].sum() == 1
    capsys.readouterr()
    assert main(_args(demo_out, tmp_path / "strict", *steps, '--stages.voco.on_error="skip"',
                      "--stages.voco.max_skipped=0")) == 3  # fmt: skip
    assert "more than max_skipped=0.0" in capsys.readouterr().err
