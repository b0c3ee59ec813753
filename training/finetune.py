"""`openmind-eval finetune`: does pretraining help a downstream task? Pretrained encoders against scratch.

Each source (an export or a run folder) and a from-scratch twin of each architecture are fine-tuned on the same
draws of K labelled subjects, with the same recipe, step budget and seeds, then scored on held-out subjects
(`training.segmentation`: Dice; `training.classification`: balanced accuracy, AUC). The loop is deliberately
small (AdamW, poly decay, flips): it is the CPU-sized check of the learning machinery. Real fine-tuning is
nnU-Net's (README). Every run records a checksum of the encoder it started from, so a transfer that did not
happen shows in the table (a test asserts it).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from openmind_tools.errors import ConfigError
from openmind_tools.loader import MAX_PATCH_EDGE
from training.embed import Encoder, module_checksum


class Task(Protocol):
    """What a downstream task gives the loop: splits, a model, batches, a loss and scores."""

    name: str
    metrics: list[str]

    def draws(self, shots: int, seed: int) -> list[tuple[str, list[int], list[int]]]: ...
    def build(self, plan: dict, encoder_state: dict[str, torch.Tensor] | None, seed: int) -> nn.Module: ...
    def start(self, model: nn.Module, train: list[int], patch: int, device: torch.device) -> None: ...
    def batch(self, train: list[int], rng: np.random.Generator, size: int, patch: int) -> tuple[torch.Tensor, ...]: ...
    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...
    def score(self, model: nn.Module, test: list[int], patch: int, device: torch.device) -> dict[str, float]: ...


@dataclass(frozen=True)
class FinetuneSettings:
    shots: tuple[int, ...] = (4, 20)  # labelled subjects (per class, for classification); AMAES uses 20
    seeds: int = 3  # draws of the K subjects and initialisations, the same for every encoder
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1: a later call adds new draws to an earlier one's
    steps: int = 250  # optimizer steps per run, the same for pretrained and scratch
    batch_size: int = 2
    patch_size: int | None = None  # crop edge; default the first source's pretraining patch
    lr: float = 1e-3
    weight_decay: float = 3e-5

    def __post_init__(self) -> None:
        if not self.shots or any(not isinstance(k, int) or k < 1 for k in self.shots):
            raise ConfigError(f"--shots: expected positive whole numbers, got {list(self.shots)}")
        for name, low in (("seeds", 1), ("first_seed", 0), ("steps", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"--{name.replace('_', '-')}: expected a whole number >= {low}, got {value!r}")
        if self.first_seed + self.seeds > 2**31:  # torch.manual_seed takes a seed up to a 64-bit integer
            raise ConfigError(f"--first-seed + --seeds: expected at most 2**31, got {self.first_seed + self.seeds}")
        if self.patch_size is not None and not 1 <= self.patch_size <= MAX_PATCH_EDGE:
            raise ConfigError(f"--patch-size: expected 1 to {MAX_PATCH_EDGE} voxels, got {self.patch_size!r}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ConfigError(f"--{name.replace('_', '-')}: expected a finite number > 0, got {value!r}")


@dataclass
class FinetuneReport:
    task: str
    metrics: list[str]
    runs: pd.DataFrame  # one row per (encoder, shots, seed, split): its scores and where it started
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    twins: dict[str, str] = field(default_factory=dict)  # each pretrained encoder's label -> its scratch twin's

    def gains(self) -> pd.DataFrame:
        """Pretrained minus scratch, run by run on the same draw (K, seed, split): the mean gain, its std over the
        pairs and how many pairs the pretrained run won. Both arms share each draw's subjects, decoder init and
        crop order, so the paired gain leaves out what a draw does to both arms alike, which each arm's own spread
        holds. A pair with a run missing (a fine-tune stopped midway) is left out."""
        keys, rows = ["shots", "seed", "split"], []
        for encoder, twin in self.twins.items():
            pretrained, scratch = (self.runs[self.runs["encoder"] == name].set_index(keys) for name in (encoder, twin))
            paired = pretrained[self.metrics] - scratch[self.metrics].reindex(pretrained.index)
            for metric in self.metrics:
                for shots, gain in paired[metric].dropna().groupby(level="shots", sort=False):
                    rows.append({"metric": metric, "shots": shots, "encoder": encoder, "scratch": twin,
                                 "gain": gain.mean(), "std": gain.std(), "wins": int((gain > 0).sum()),
                                 "pairs": len(gain)})  # fmt: skip
        return pd.DataFrame(rows, columns=["metric", "shots", "encoder", "scratch", "gain", "std", "wins", "pairs"])

    def summary(self) -> pd.DataFrame:
        """Mean and std over seeds and splits, per encoder, K and metric."""
        long = self.runs.melt(id_vars=["encoder", "shots"], value_vars=self.metrics, var_name="metric")
        table = long.groupby(["metric", "shots", "encoder"], sort=False)["value"].agg(["mean", "std", "count"])
        return table.reset_index()

    def markdown(self) -> str:
        table = self.summary()
        encoders = list(dict.fromkeys(self.runs["encoder"]))
        lines = ["| metric | K | " + " | ".join(encoders) + " |", "|---|---:|" + "---:|" * len(encoders)]
        for (metric, shots), rows in table.groupby(["metric", "shots"], sort=False):
            cells = rows.set_index("encoder").reindex(encoders)
            lines.append(f"| {metric} | {shots} | " + " | ".join(
                f"{m:.3f} ± {s:.3f}" if np.isfinite(m) else "n/a" for m, s in zip(cells["mean"], cells["std"].fillna(0),
                                                                                   strict=True)) + " |")  # fmt: skip
        gains = self.gains()
        if len(gains):
            lines += ["", "| metric | K | encoder | gain over scratch, paired by draw | pairs won |",
                      "|---|---:|---|---:|---:|"]  # fmt: skip
            for g in gains.itertuples():
                spread = 0.0 if np.isnan(g.std) else g.std
                lines.append(f"| {g.metric} | {g.shots} | {g.encoder} | {g.gain:+.3f} ± {spread:.3f} | "
                             f"{g.wins} of {g.pairs} |")  # fmt: skip
        return "\n".join(lines)


def finetune(
    encoders: list[Encoder],
    task: Task,
    settings: FinetuneSettings,
    out: Path,
    device: torch.device,
    progress: bool = True,
    notes: list[str] | None = None,
) -> FinetuneReport:
    """Fine-tune every encoder and a scratch twin per architecture; write finetune.csv/.json/.md/.png into `out`."""
    patch = settings.patch_size or encoders[0].pretrain_patch_size
    for encoder in encoders:
        encoder.check_patch_size(patch)
    entries = _entries(encoders)
    twins = _twins(entries)
    seeds = range(settings.first_seed, settings.first_seed + settings.seeds)
    total = sum(len(task.draws(k, s)) for k in settings.shots for s in seeds) * len(entries)
    bar = tqdm(total=total, desc=f"finetune {task.name}", unit="run", disable=not progress)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for shots in settings.shots:
        for seed in seeds:
            for split, train, test in task.draws(shots, seed):
                for label, source, plan, state in entries:
                    model = task.build(plan, state, seed)
                    started = module_checksum(model.encoder)[:16]
                    start = time.perf_counter()
                    task.start(model, train, patch, device)
                    _fit(model, task, train, settings, patch, seed, device)
                    scores = task.score(model, test, patch, device)
                    rows.append({"encoder": label, "source": source, "shots": shots, "seed": seed, "split": split,
                                 "train_volumes": len(train), "test_volumes": len(test), **scores,
                                 "start_encoder": started, "seconds": time.perf_counter() - start})  # fmt: skip
                    pd.DataFrame(rows).to_csv(out / "finetune.csv", index=False)  # a killed run keeps what it finished
                    bar.update()
    bar.close()
    recorded = {**asdict(settings), "patch_size": patch, "device": device.type, "sources": [e.source for e in encoders]}
    report = FinetuneReport(task.name, task.metrics, pd.DataFrame(rows), recorded, list(notes or []), twins)
    _write(report, out)
    return report


def encoder_checksum(encoder: Encoder) -> str:
    """The checksum a run started from `encoder`'s weights records (see `finetune`)."""
    return module_checksum(encoder.net.encoder)[:16]


def _entries(encoders: list[Encoder]) -> list[tuple[str, str, dict, dict[str, torch.Tensor] | None]]:
    """(label, source, plan, encoder weights or None for scratch): each source, then one scratch per architecture."""
    names = [Path(e.source).stem.removesuffix("_encoder") for e in encoders]
    labels = [n if names.count(n) == 1 else f"{Path(e.source).parent.name}/{n}"
              for n, e in zip(names, encoders, strict=True)]  # fmt: skip
    entries = [(label, e.source, e.plan, e.net.encoder.state_dict()) for label, e in zip(labels, encoders, strict=True)]
    architectures: dict[str, tuple[str, Encoder]] = {}
    for label, encoder in zip(labels, encoders, strict=True):
        architectures.setdefault(_architecture(encoder.plan), (label, encoder))
    for label, encoder in architectures.values():
        name = "scratch" if len(architectures) == 1 else f"scratch (as {label})"
        entries.append((name, "random init", encoder.plan, None))
    return entries


def _twins(entries: list[tuple[str, str, dict, dict[str, torch.Tensor] | None]]) -> dict[str, str]:
    """Each pretrained entry's label -> the label of the scratch entry of its architecture."""
    scratch = {_architecture(plan): label for label, _, plan, state in entries if state is None}
    return {label: scratch[_architecture(plan)] for label, _, plan, state in entries if state is not None}


def _architecture(plan: dict) -> str:
    return json.dumps(plan["architecture_plans"], sort_keys=True, default=str)


def _fit(model: nn.Module, task: Task, train: list[int], settings: FinetuneSettings, patch: int, seed: int,
         device: torch.device) -> None:  # fmt: skip
    """The same loop for every encoder: AdamW, linear warm-up then nnU-Net's poly decay, gradient clipping at 12."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = max(1, settings.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(
        0.0, 1 - s / max(settings.steps, 1)) ** 0.9)  # fmt: skip
    rng = np.random.default_rng([seed, 104729])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(settings.steps):
            inputs, target = task.batch(train, rng, settings.batch_size, patch)
            loss = task.loss(model(inputs.to(device)), target.to(device))
            if not torch.isfinite(loss):
                raise ConfigError(f"fine-tuning diverged (loss {float(loss)}): lower --lr (now {settings.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
            optimizer.step()
            schedule.step()


def _write(report: FinetuneReport, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report.runs.to_csv(out / "finetune.csv", index=False)
    summary = report.summary()
    document = {"task": report.task, "settings": report.settings, "notes": report.notes,
                "summary": _records(summary), "gains": _records(report.gains())}  # fmt: skip
    (out / "finetune.json").write_text(json.dumps(document, indent=1, default=float, allow_nan=False) + "\n")
    (out / "finetune.md").write_text(report.markdown() + "\n")
    _plot(summary, out / "finetune.png", report)


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows for JSON: NaN (a std of one value, a class in no volume) as null."""
    return [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
            for row in table.to_dict(orient="records")]  # fmt: skip


def _plot(summary: pd.DataFrame, path: Path, report: FinetuneReport) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(summary["metric"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=True):
        for encoder, rows in summary[summary["metric"] == metric].groupby("encoder", sort=False):
            ax.errorbar(rows["shots"], rows["mean"], yerr=rows["std"].fillna(0), marker="o", capsize=3, label=encoder)
        ax.set(title=metric, xlabel="K labelled subjects", xticks=sorted(set(summary["shots"])))
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{report.task} fine-tuning, mean ± std over seeds and splits", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
