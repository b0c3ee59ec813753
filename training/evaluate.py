"""Does a pretrained encoder know anything? Probe it against a random-init twin and a trivial baseline.

`probe_encoder` embeds a manifest query's volumes with the encoder and with the same architecture freshly
initialised (`training.embed`), probes each target column from both (`training.probe`), and writes
probe.csv (one row per target, metric and predictor), probe.json (the same plus what was left out and the
settings) and probe.png (bars per target and metric: pretrained vs random vs baseline).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from openmind_tools.errors import ConfigError
from openmind_tools.loader import PatchDataset
from openmind_tools.manifest import resolve_manifest
from training.embed import CropPlan, Embeddings, Encoder, embed, load_encoder
from training.finetune import FinetuneReport
from training.probe import BASELINE, KINDS, METRICS, ProbeResult, probe, subject_groups

PREDICTORS = ("pretrained", "random", BASELINE)


@dataclass(frozen=True)
class ProbeReport:
    results: list[ProbeResult]
    out: Path
    encoder: str
    left_out: dict[str, Any]  # volumes that could not be embedded, and per target the rows without a value

    def table(self) -> pd.DataFrame:
        """Every target's scores: one row per (target, metric, predictor)."""
        return pd.concat([r.summary() for r in self.results], ignore_index=True)

    def markdown(self) -> str:
        """The table as a person reads it: mean ± std over folds, one column per predictor."""
        table = self.table()
        lines = [
            "| target | metric | " + " | ".join(PREDICTORS) + " | volumes | subjects | folds |",
            "|---|---|" + "---:|" * (len(PREDICTORS) + 3),
        ]
        for (target, metric), rows in table.groupby(["target", "metric"], sort=False):
            cells = {r.encoder: "-" if math.isnan(r.mean) else f"{r.mean:.3f} ± {r.std:.3f}" for r in rows.itertuples()}
            first = rows.iloc[0]
            lines.append(
                f"| {target} | {metric} | "
                + " | ".join(cells[p] for p in PREDICTORS)
                + f" | {first.n} | {first.subjects} | {rows.folds.max()} |"
            )
        return "\n".join(lines)


def parse_targets(text: str) -> list[tuple[str, str | None]]:
    """ "sex,age,magnetic_field_strength:categorical" -> [(column, kind or None = by dtype), ...]."""
    targets = []
    for item in dict.fromkeys(filter(None, (part.strip() for part in text.split(",")))):  # each once
        name, _, kind = item.partition(":")
        if kind and kind not in KINDS:
            raise ConfigError(f"--target {item!r}: expected COLUMN or COLUMN:KIND with KIND in {KINDS}")
        targets.append((name, kind or None))
    if not targets:
        raise ConfigError("--target: expected at least one manifest column, e.g. sex,age")
    return targets


def probe_encoder(
    source: str | Path,
    manifest: str | Path,
    targets: list[tuple[str, str | None]],
    *,
    out: str | Path | None = None,
    stage: str | None = None,
    store: str = "zarr",
    crops: int = 1,
    patch_size: int | None = None,
    folds: int = 5,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 2,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> ProbeReport:
    """Embed, probe every target from the encoder and its random-init twin, and write the outputs to `out`.

    `out` defaults to `<export name>_probe/` beside the export; the embedding cache to `probe_cache/` beside
    it, so a second target (or a second output folder) reuses the embeddings.
    """
    if folds < 2:
        raise ConfigError(f"folds: expected at least 2, got {folds}")
    encoder = load_encoder(source, stage)
    export = Path(encoder.source)
    out = Path(out) if out is not None else export.with_name(f"{export.stem}_probe")
    cache = Path(cache_dir) if cache_dir is not None else export.with_name("probe_cache")
    _writable_folder(out, "-o")  # before any work, not after the embeddings
    if cache.exists() and not cache.is_dir():
        raise ConfigError(f"--cache {cache}: exists and is not a folder")
    rows, meta = resolve_manifest(manifest)
    absent = [name for name, _ in targets if name not in rows.columns]
    if absent:
        raise ConfigError(f"--target: {absent} not in the manifest; its columns: {', '.join(rows.columns)}")
    plan = CropPlan(patch_size or encoder.pretrain_patch_size, crops)
    encoder.check_patch_size(plan.patch_size)
    dataset = PatchDataset(rows, plan.patch_size, store=store, root=meta.get("store_root"))
    run = _device(device)
    checksums = rows.sort_values("id")["checksum"].astype(str) if "checksum" in rows else pd.Series([], dtype=str)
    content = hashlib.sha256("\n".join(checksums).encode()).hexdigest()  # a store rewritten in place misses
    embedded: dict[str, Embeddings] = {}
    for name, model in (("pretrained", encoder), ("random", encoder.random_init(seed))):
        embedded[name] = embed(model, dataset, plan, device=run, batch_size=batch_size, cache_dir=cache,
                               content=content, progress=progress)  # fmt: skip
    ids = embedded["pretrained"].ids
    rows = rows.set_index("id", drop=False).loc[ids].reset_index(drop=True)
    groups = subject_groups(rows)
    features = {name: _aligned(found, ids) for name, found in embedded.items()}
    results = [
        probe(features, rows[name], groups, target=name, kind=kind, folds=folds, seed=seed) for name, kind in targets
    ]
    left_out = {
        "unreadable volumes": list(embedded["pretrained"].unreadable),
        "rows": {r.target: r.left_out for r in results},
        "volumes without a subject (each its own group)": int(rows["subject"].isna().sum()) if "subject" in rows
        else len(rows),
    }  # fmt: skip
    report = ProbeReport(results, out, encoder.source, left_out)
    _write(report, encoder, manifest, plan, store, folds, seed)
    return report


def _writable_folder(path: Path, flag: str) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is not a folder")
    if not path.parent.is_dir():
        raise ConfigError(f"{flag} {path}: the folder {path.parent} does not exist")
    try:
        path.mkdir(exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot create it ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {path}: not writable")


def _device(name: str) -> torch.device:
    bad = ConfigError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise bad
    try:
        device = torch.device(name)
    except RuntimeError:
        raise bad from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {name}: this machine has no such CUDA device")
    return device


def _aligned(found: Embeddings, ids: Any) -> Any:
    if list(found.ids) != list(ids):
        raise ConfigError("the encoder and its random-init twin embedded different volumes (a store changed?)")
    return found.features


def _write(
    report: ProbeReport, encoder: Encoder, manifest: Any, plan: CropPlan, store: str, folds: int, seed: int
) -> None:
    table = report.table()
    table.to_csv(report.out / "probe.csv", index=False)
    settings = {
        "encoder": encoder.source,
        "encoder_checksum": encoder.checksum,
        "manifest": str(manifest),
        "store": store,
        "patch_size": plan.patch_size,
        "crops": plan.crops,
        "folds": folds,
        "seed": seed,
    }
    records = [  # JSON has no NaN: an undefined metric is null
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
        for r in table.to_dict(orient="records")
    ]
    document = {"settings": settings, "left_out": report.left_out, "results": records}
    (report.out / "probe.json").write_text(json.dumps(document, indent=1, default=float, allow_nan=False) + "\n")
    _plot(table, report.out / "probe.png", encoder.source)


def _plot(table: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(table.groupby(["target", "metric"], sort=False))
    columns = max(len(m) for m in METRICS.values())
    lines = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.2 * lines), squeeze=False)
    colours = {"pretrained": "tab:blue", "random": "tab:orange", BASELINE: "tab:grey"}
    for ax, ((target, metric), rows) in zip(axes.flat, panels, strict=False):
        rows = rows.set_index("encoder").reindex(list(PREDICTORS))
        ax.bar(
            PREDICTORS,
            rows["mean"].fillna(0),
            yerr=rows["std"].fillna(0),
            capsize=4,
            color=[colours[p] for p in PREDICTORS],
        )
        ax.set(title=f"{target}: {metric}", ylabel=metric)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"linear probes, mean ± std over grouped folds\n{title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finetune_command(args: Any) -> FinetuneReport:
    """`openmind-eval finetune`: the task its arguments name, checked before any training, then `finetune`."""
    from openmind_tools.nnunet_dataset import read_dataset
    from openmind_tools.preprocess import PreprocessSettings
    from training.classification import ClassificationTask
    from training.finetune import FinetuneSettings, finetune
    from training.segmentation import SegmentationTask

    settings = FinetuneSettings(shots=args.shots, seeds=args.seeds, first_seed=args.first_seed, steps=args.steps,
                                batch_size=args.batch_size, patch_size=args.patch_size, lr=args.lr)  # fmt: skip
    if args.dataset and (args.target or args.bins):
        raise ConfigError("--target and --bins choose a classification target: use them with --manifest")
    if args.manifest and not args.target:
        raise ConfigError("--manifest: name the column to predict with --target")
    out = Path(args.output)
    _writable_folder(out, "-o")
    device = _device(args.device)
    encoders = [load_encoder(source) for source in args.encoders]
    patch = settings.patch_size or encoders[0].pretrain_patch_size
    for encoder in encoders:
        encoder.check_patch_size(patch)
    notes = []
    if args.dataset:
        spacing = args.spacing or float(next(iter(encoders[0].plan["pretrain_plan"]["configurations"].values()))[
            "spacing"][0])  # fmt: skip
        cases, labels = read_dataset(args.dataset, PreprocessSettings(spacing=spacing, crop="nonzero"))
        subjects = len({case.subject for case in cases})
        task: Any = SegmentationTask(cases, labels, args.test_subjects or max(1, subjects // 4))
    else:
        rows, meta = resolve_manifest(args.manifest)
        dataset = PatchDataset(rows, patch, store=args.store, root=meta.get("store_root"))
        task = ClassificationTask(dataset, rows, args.target, args.bins, folds=args.folds)
        notes = [f"left out, unreadable: {reason}" for reason in task.unreadable]
    return finetune(encoders, task, settings, out, device, progress=not args.no_progress, notes=notes)
