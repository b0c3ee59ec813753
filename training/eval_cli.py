"""`openmind-eval`: does a pretrained encoder know anything? Linear probes of manifest columns.

openmind-eval probe runs/NAME --manifest "mae8 of out/manifest.parquet" --target sex,age,modality
openmind-eval probe encoder.pt --manifest out/manifest.parquet --target health_status -o probe_out/

Exit status: 0 done, 2 bad arguments (or an encoder, manifest or target that cannot be used),
3 a volume could not be read (the tables are still written from the others, and the volume is named).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from openmind_tools.cli.common import (
    EXIT_DATA,
    EXIT_OK,
    non_negative_int,
    output_dir,
    positive_float,
    positive_int,
    run_command,
)


def main(argv: list[str] | None = None) -> int:
    return run_command("openmind-eval", lambda: _parser().parse_args(argv), lambda args: args.run(args))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="openmind-eval",
        description="Evaluate pretrained encoders: linear probes of frozen embeddings (probe), and few-shot "
        "fine-tuning against scratch (finetune). Full fine-tuning is nnU-Net's job (see the README).",
    )
    commands = p.add_subparsers(dest="command", required=True, metavar="probe|finetune")
    q = commands.add_parser(
        "probe",
        help="linear probes of manifest columns on frozen embeddings, vs a random-init encoder and a baseline",
        description="Embed every volume a manifest (query) selects with the encoder and with a random-init "
        "encoder of the same architecture (global average pool of each encoder stage over fixed crops), then "
        "fit linear probes of each target column, cross-validated with folds grouped by subject "
        "(dataset/subject). Categorical targets: logistic regression, balanced accuracy and macro AUC; "
        "continuous: ridge, MAE and R^2; each beside the majority-class / mean baseline. Writes probe.csv, "
        "probe.json and probe.png and prints the table.",
        epilog="Exit status: 0 done, 2 bad arguments or an unusable encoder, manifest or target, 3 some volume could "
        "not be read (left out and named; the tables are written from the others).",
    )
    q.set_defaults(run=_probe)
    q.add_argument("encoder", help="an export (*_encoder.pt, nnssl adaptation-plan format) or a run folder")
    q.add_argument(
        "--manifest",
        required=True,
        help='manifest.parquet, or a query such as "mae8 min_quality=3 of out/manifest.parquet"',
    )
    q.add_argument(
        "--target",
        required=True,
        help="comma-separated manifest columns, e.g. sex,age,modality; COLUMN:categorical or "
        "COLUMN:continuous overrides the kind (default: numbers are continuous)",
    )
    q.add_argument(
        "-o", "--output", type=output_dir, help="output folder (default: <export name>_probe/ beside the export)"
    )
    q.add_argument("--stage", help="a run folder's stage to probe (default: its last)")
    q.add_argument("--store", choices=("zarr", "wds"), default="zarr", help="which store to read (default zarr)")
    q.add_argument(
        "--crops",
        type=int,
        choices=(1, 9),
        default=1,
        help="fixed crops per volume, averaged: 1 = centre, 9 = centre + 8 quarter points (default 1)",
    )
    q.add_argument(
        "--patch-size", type=positive_int, help="crop edge in voxels (default: the encoder's pretraining patch)"
    )
    q.add_argument(
        "--folds", type=positive_int, default=5, help="cross-validation folds, at most one per subject (default 5)"
    )
    q.add_argument("--seed", type=int, default=0, help="seed of the folds and the random-init encoder (default 0)")
    q.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    q.add_argument("--batch-size", type=positive_int, default=2, help="crops per forward pass (default 2)")
    q.add_argument("--cache", help="embedding cache folder (default: probe_cache/ beside the export)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    _finetune_parser(commands)
    return p


def _finetune_parser(commands: Any) -> None:
    f = commands.add_parser(
        "finetune",
        help="few-shot fine-tuning (segmentation Dice or classification) of encoders against scratch",
        description="Fine-tune each encoder (an export or a run folder; several compare in one table) and a "
        "from-scratch twin of each architecture on the same draws of K labelled subjects, with the same recipe, "
        "steps and seeds; score on held-out subjects. Segmentation (--dataset, an nnU-Net raw dataset such as "
        "'openmind-convert nnunet-dataset' writes): the whole U-Net trains, new decoder, Dice per class. "
        "Classification (--manifest and --target): encoder + linear head unfrozen, folds grouped by subject, K "
        "subjects per class, balanced accuracy and macro AUC. A CPU-sized built-in loop; nnU-Net is the engine "
        "for real fine-tuning. Writes finetune.csv (every run), .json, .md and .png into -o.",
        epilog="Exit status: 0 done, 2 bad arguments or unusable inputs (a label map off its image's grid, a missing "
        "label, a target with one class, K larger than what exists), 3 some volume could not be read.",
    )
    f.set_defaults(run=_finetune)
    f.add_argument("encoders", nargs="+", help="exports (*_encoder.pt) or run folders (their last stage)")
    task = f.add_mutually_exclusive_group(required=True)
    task.add_argument("--dataset", help="segmentation: an nnU-Net raw dataset (imagesTr, labelsTr, dataset.json)")
    task.add_argument("--manifest", help='classification: manifest.parquet or a query ("modality=T1w of m.parquet")')
    f.add_argument("--target", help="classification: the manifest column to predict, e.g. sex or age (with --bins)")
    f.add_argument("--bins", type=_numbers, default=(), help="classification: class edges of a numeric target, "
                   "e.g. 55 makes <55 and >=55")  # fmt: skip
    f.add_argument("-o", "--output", type=output_dir, required=True, help="output folder")
    f.add_argument("--shots", type=_shots, default=(4, 20), help="labelled subjects K, comma-separated (per class "
                   "for classification; default 4,20)")  # fmt: skip
    f.add_argument("--seeds", type=positive_int, default=3, help="draws of the K subjects and inits (default 3)")
    f.add_argument("--first-seed", type=non_negative_int, default=0, help="number of the first seed (default 0): "
                   "--first-seed 3 --seeds 2 adds seeds 3 and 4 to an earlier run of seeds 0-2")  # fmt: skip
    f.add_argument("--steps", type=non_negative_int, default=250, help="optimizer steps per run (default 250)")
    f.add_argument("--batch-size", type=positive_int, default=2, help="patches per step (default 2)")
    f.add_argument("--patch-size", type=positive_int, help="crop edge in voxels (default: the encoder's pretraining "
                   "patch)")  # fmt: skip
    f.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    f.add_argument("--test-subjects", type=positive_int, help="segmentation: held-out subjects (default a quarter)")
    f.add_argument("--spacing", type=positive_float, help="segmentation: resample the dataset to this spacing in mm "
                   "(default: the spacing the encoder was pretrained at)")  # fmt: skip
    f.add_argument("--folds", type=positive_int, default=3, help="classification: grouped folds (default 3)")
    f.add_argument("--store", choices=("zarr", "wds"), default="zarr", help="classification: store to read")
    f.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")


def _numbers(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def _shots(text: str) -> tuple[int, ...]:
    values = tuple(positive_int(v) for v in text.split(","))
    return tuple(dict.fromkeys(values))


def _finetune(args: argparse.Namespace) -> int:
    from training.evaluate import finetune_command

    report = finetune_command(args)
    print(report.markdown())
    for note in report.notes:
        print(note)
    print(f"wrote {args.output}/finetune.csv, finetune.json, finetune.md, finetune.png")
    return EXIT_DATA if report.notes else EXIT_OK


def _probe(args: argparse.Namespace) -> int:

    from training.evaluate import parse_targets, probe_encoder

    targets = parse_targets(args.target)
    report = probe_encoder(
        args.encoder,
        args.manifest,
        targets,
        out=args.output,
        stage=args.stage,
        store=args.store,
        crops=args.crops,
        patch_size=args.patch_size,
        folds=args.folds,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
        cache_dir=args.cache,
        progress=not args.no_progress,
    )
    print(report.markdown())
    unreadable = report.left_out["unreadable volumes"]
    for target, reasons in report.left_out["rows"].items():
        for reason, count in reasons.items():
            print(f"{target}: {count} volume(s) left out ({reason})")
    for reason in unreadable:
        print(f"left out, unreadable: {reason}")
    print(f"wrote {report.out}/probe.csv, probe.json, probe.png")
    return EXIT_DATA if unreadable else EXIT_OK
