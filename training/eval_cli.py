"""`openmind-eval`: does a pretrained encoder know anything? Linear probes of manifest columns.

openmind-eval probe runs/NAME --manifest "mae8 of out/manifest.parquet" --target sex,age,modality
openmind-eval probe encoder.pt --manifest out/manifest.parquet --target health_status -o probe_out/

Exit status: 0 done, 2 bad arguments (or an encoder, manifest or target that cannot be used),
3 a volume could not be read (the tables are still written from the others, and the volume is named).
"""

from __future__ import annotations

import argparse

from openmind_tools.cli.common import EXIT_DATA, EXIT_OK, output_dir, positive_int, run_command


def main(argv: list[str] | None = None) -> int:
    return run_command("openmind-eval", lambda: _parser().parse_args(argv), _probe)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="openmind-eval",
        description="Evaluate pretrained encoders without fine-tuning. Fine-tuning itself is nnU-Net's job "
        "(see the README): this tells a good run from a broken one in minutes.",
    )
    commands = p.add_subparsers(dest="command", required=True, metavar="probe")
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
    return p


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
