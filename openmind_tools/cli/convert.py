"""`openmind-convert`: OpenMind (or a BIDS-like tree) -> Zarr v3 / WebDataset stores + parquet manifest.

    openmind-convert ROOT OUT [--format zarr,wds] [--workers N | --scheduler ADDRESS] [--limit N]
    openmind-convert verify OUT
    openmind-convert demo-data DIR [--cohort N]
    openmind-convert nnunet-dataset ROOT OUT

Exit status: 0 everything converted (or verified); 2 bad arguments or settings; 3 some inputs failed
(listed with reasons in OUT/errors.parquet) or verify found problems; 4 the machine failed (disk full,
I/O error, too many open files, a lost dask worker): nothing is blamed on an input, fix it and rerun.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack

from openmind_tools import zarr_store
from openmind_tools.cli.common import (
    EXIT_DATA,
    EXIT_OK,
    byte_size,
    dask_client,
    existing_dir,
    existing_location,
    non_negative_int,
    output_dir,
    output_location,
    positive_float,
    positive_int,
    run_command,
)
from openmind_tools.preprocess import PreprocessSettings

EXIT_FAILURES = EXIT_DATA


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"verify": (_verify_parser, _verify), "demo-data": (_demo_parser, _demo),
                "nnunet-dataset": (_nnunet_parser, _nnunet)}  # fmt: skip
    make_parser, run = commands.get(argv[0] if argv else "", (_convert_parser, _convert))
    rest = argv[1:] if make_parser is not _convert_parser else argv
    return run_command("openmind-convert", lambda: make_parser().parse_args(rest), run)


def _convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="openmind-convert",
        description="Convert an OpenMind download (ROOT holds openneuro_metadata.csv and OpenMind/) or a "
        "BIDS-like tree into sharded stores plus OUT/manifest.parquet and OUT/errors.parquet. Rerun the same "
        "command after a crash to resume. Other commands: 'openmind-convert verify OUT', "
        "'openmind-convert demo-data DIR', 'openmind-convert nnunet-dataset ROOT OUT'.",
        epilog="Exit status: 0 all converted, 2 bad arguments, 3 some inputs failed (see OUT/errors.parquet), "
        "4 the machine failed (disk full, I/O error): fix it and rerun the same command.",
    )
    p.add_argument("root", help="corpus root: the folder holding openneuro_metadata.csv and OpenMind/, or an fsspec "
                   "URL such as s3://bucket/openmind (workers read it there)")  # fmt: skip
    p.add_argument("out", type=output_location, help="output folder (created) or URL such as s3://bucket/converted; "
                   "rerunning into it resumes")  # fmt: skip
    _storage_options_argument(p)
    p.add_argument("--format", default="zarr,wds", help="comma-separated stores to write: zarr, wds (default both)")
    p.add_argument(
        "--workers", type=non_negative_int, default=2, help="local dask worker processes (0 = run in this process)"
    )
    p.add_argument("--scheduler", help="address of an existing dask.distributed scheduler (tcp://host:8786)")
    p.add_argument(
        "--memory-limit", type=byte_size, default="auto", help="per local worker, e.g. 6GiB (a 512^3 volume needs ~3)"
    )
    p.add_argument("--modalities", help="comma-separated modalities to convert (CSV spelling; inplainT1 accepted)")
    p.add_argument("--limit", type=positive_int, help="convert only the first N images (sorted by id): a quick trial")
    p.add_argument("--dry-run", action="store_true", help="list what would be converted, write nothing")
    p.add_argument("--shard-size", type=positive_float, default=1.0, help="WebDataset shard size in GB (default 1)")
    p.add_argument("--retry-errors", action="store_true", help="retry inputs that failed in an earlier run")
    p.add_argument("--codec", choices=sorted(zarr_store.CODECS), default=zarr_store.DEFAULT_CODEC,
                   help="blosc codec of the Zarr chunks: lz4 (default) converts fastest; lz4hc stores 0.78x its "
                        "bytes and its patches load 10-25%% faster, but it doubles the conversion time: worth it "
                        "for long pretraining runs; zstd stores 0.70x, decodes 3.3x slower: for bandwidth-bound "
                        "storage")  # fmt: skip
    p.add_argument("--spacing", type=positive_float, default=1.0, help="isotropic target spacing in mm (default 1)")
    p.add_argument("--interpolation", choices=["linear", "bspline"], default="linear", help="image resampling")
    p.add_argument("--crop", choices=["anatomy", "nonzero", "none"], default="anatomy", help="crop box source")
    p.add_argument(
        "--clip-percentiles", type=_pair, default=(0.5, 99.5), help="intensity clip inside the mask: low,high"
    )
    p.add_argument(
        "--volume-index", type=non_negative_int, help="volume to take from true 4D images (default: 4D is an error)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _storage_options_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-options", metavar="JSON|FILE",
                   help="options of the URLs' filesystem, as inline JSON or a .json/.toml file, e.g. "
                        '\'{"endpoint_url": "http://minio:9000"}\' for S3-compatible storage; keep secrets in a file '
                        "or the usual environment variables (AWS_ACCESS_KEY_ID ...): they are never printed or "
                        "recorded")  # fmt: skip


def _pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers such as 0.5,99.5, got {text!r}") from None
    return low, high


def _convert(args: argparse.Namespace) -> int:
    from openmind_tools.convert import convert
    from openmind_tools.corpus import discover
    from openmind_tools.storage import load_storage_options

    options = load_storage_options(args.storage_options)
    modalities = args.modalities.split(",") if args.modalities else None
    settings = PreprocessSettings(
        spacing=args.spacing,
        interpolation=args.interpolation,
        crop=args.crop,
        clip_percentiles=args.clip_percentiles,
        volume_index=args.volume_index,
    )
    if args.dry_run:
        corpus = discover(args.root, modalities=modalities, limit=args.limit, storage_options=options)
        for image in corpus.images:
            print(f"{image.id}\t{image.modality}\t{image.image}")
        print(f"{len(corpus.images)} images would be converted into {args.out} ({settings.digest()})")
        return EXIT_OK
    with ExitStack() as stack:
        client = stack.enter_context(dask_client(args))
        summary = convert(
            args.root,
            args.out,
            settings=settings,
            formats=args.format.split(","),
            modalities=modalities,
            limit=args.limit,
            shard_bytes=int(args.shard_size * 1e9),
            client=client,
            retry_errors=args.retry_errors,
            progress=not args.quiet,
            codec=args.codec,
            storage_options=options,
        )
    print(summary)
    return EXIT_FAILURES if summary.failed else EXIT_OK


def _verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="openmind-convert verify",
        description="Re-read every stored sample and check it against the manifest (shape, checksum). With "
        "--repair, delete what is damaged or missing and reconvert it with the settings and inputs the "
        "conversion recorded in OUT/.run.json.",
        epilog="Exit status: 0 no problem (or all repaired), 2 bad arguments, 3 problems found (or left, or a row that "
        "could not be restored: its source is gone or fails to convert; its intact copies and row are kept).",
    )
    p.add_argument("out", type=existing_location, help="a folder (or URL) written by openmind-convert")
    _storage_options_argument(p)
    p.add_argument("--repair", action="store_true", help="reconvert the damaged or missing samples, then verify again")
    p.add_argument("--workers", type=non_negative_int, default=0, help="local dask worker processes (0 = here)")
    p.add_argument("--scheduler", help="address of an existing dask.distributed scheduler (tcp://host:8786)")
    p.add_argument("--memory-limit", type=byte_size, default="auto", help="per local worker, e.g. 6GiB")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _verify(args: argparse.Namespace) -> int:
    from openmind_tools.storage import load_storage_options
    from openmind_tools.verify import repair, verify

    options = load_storage_options(args.storage_options)
    with ExitStack() as stack:
        client = stack.enter_context(dask_client(args))
        problems = verify(args.out, progress=not args.quiet, client=client, storage_options=options)
        for problem in problems:
            print(problem)
        print(f"{len(problems)} problem(s) found in {args.out}")
        unrestored: list[str] = []
        if problems and args.repair:
            result = repair(args.out, problems, client=client, progress=not args.quiet, storage_options=options)
            print(result)
            unrestored = result.unrestored
            problems = verify(args.out, progress=not args.quiet, client=client, storage_options=options)
            for problem in problems:
                print(problem)
            print(f"after repair: {len(problems)} problem(s) in {args.out}, {len(unrestored)} not restored")
    return EXIT_FAILURES if problems or unrestored else EXIT_OK


def _demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="openmind-convert demo-data",
        description="Write a small OpenMind-shaped corpus (19 images, 3 datasets, 13 modalities) built from "
        "the MNI152 template nilearn ships and a nibabel test image; or, with --cohort N, a synthetic cohort of N "
        "subjects whose age, sex and lesion load cause their anatomy (T1w, T2w, FLAIR per session, label maps as "
        "derivatives): a check of the learning machinery, not evidence about real patients.",
    )
    p.add_argument("dir", type=output_dir, help="folder to write (openneuro_metadata.csv + OpenMind/)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the synthetic variation")
    p.add_argument("--cohort", type=positive_int, metavar="N", help="write the synthetic cohort of N subjects "
                   "(about 120 makes the README's gain check)")  # fmt: skip
    p.add_argument("--spacing", type=positive_float, default=2.0, help="cohort: voxel size in mm, 0.5-4 (default 2: "
                   "CPU-sized)")  # fmt: skip
    p.add_argument("--workers", type=positive_int, default=2, help="cohort: processes (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _demo(args: argparse.Namespace) -> int:
    if args.cohort:
        from openmind_tools.cohort import write_cohort

        root = write_cohort(args.dir, subjects=args.cohort, seed=args.seed, spacing=args.spacing,
                            workers=args.workers, progress=not args.quiet)  # fmt: skip
        print(f"synthetic cohort of {args.cohort} subjects written to {root}")
        return EXIT_OK
    from openmind_tools.demo import write_demo_corpus

    root = write_demo_corpus(args.dir, seed=args.seed)
    print(f"demo corpus written to {root}")
    return EXIT_OK


def _nnunet_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="openmind-convert nnunet-dataset",
        description="Write an nnU-Net v2 raw dataset (imagesTr, labelsTr, dataset.json) of a corpus's images that "
        "have a label map, one case per subject (its first session): the input of nnUNetv2_plan_and_preprocess and "
        "of 'openmind-eval finetune --dataset'.",
    )
    p.add_argument("root", type=existing_dir, help="corpus root (openneuro_metadata.csv + OpenMind/)")
    p.add_argument("out", type=output_dir, help="folder to write DatasetXXX_NAME/ into (nnU-Net's nnUNet_raw)")
    p.add_argument("--labels", default="background,CSF,GM,WM,lesion",
                   help="class names in class order, background first (default: the synthetic cohort's)")  # fmt: skip
    p.add_argument("--label-column", default="label_path", help="CSV column naming each image's label map")
    p.add_argument("--modality", default="T1w", help="which images (CSV spelling; default T1w)")
    p.add_argument("--id", type=positive_int, default=501, help="nnU-Net dataset number, 1-999 (default 501)")
    p.add_argument("--name", default="OpenMindCohort", help="dataset name (default OpenMindCohort)")
    return p


def _nnunet(args: argparse.Namespace) -> int:
    from openmind_tools.nnunet_dataset import write_dataset

    folder = write_dataset(args.root, args.out, args.labels.split(","), label_column=args.label_column,
                           modality=args.modality, dataset_id=args.id, name=args.name)  # fmt: skip
    print(f"nnU-Net raw dataset written to {folder}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
