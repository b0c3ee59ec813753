"""`openmind-manifest`: look at a manifest and cut sub-manifests out of it (a thin shell over openmind_tools.manifest).

    openmind-manifest stats MANIFEST [--plot stats.png] [--balance-by dataset,modality]
    openmind-manifest query MANIFEST [--preset mae8] [--modality T1w,FLAIR] [--min-quality 3] [--dataset ds000101]
                                     [--where "age >= 18 and sex == 'F'"] [-o out.parquet | --format csv|jsonl]
                                     [--exclude flags.parquet]
    openmind-manifest show MANIFEST ID
    openmind-manifest presets
    openmind-manifest report MANIFEST [-o report/] [--workers N | --scheduler ADDRESS] [--limit N]

MANIFEST is a manifest path/URL or a query such as "mae8 min_quality=3 of out/manifest.parquet".
Exit status: 0 done; 1 the query selected nothing (nothing written without --allow-empty); 2 bad arguments;
3 (report) some volumes could not be read; 4 the machine failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from contextlib import nullcontext
from dataclasses import fields
from operator import methodcaller
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from openmind_tools.cli.common import (
    EXIT_DATA,
    EXIT_OK,
    byte_size,
    column_list,
    dask_client,
    existing_parent,
    non_negative_int,
    positive_float,
    positive_int,
    run_command,
)
from openmind_tools.errors import ConfigError
from openmind_tools.flags import THRESHOLD
from openmind_tools.manifest import (
    FORMATS,
    QUALITY,
    EmptyResultWarning,
    Filters,
    balance_table,
    list_presets,
    load_preset,
    output_format,
    plot_stats,
    resolve_manifest,
    stats,
    write_manifest,
)

EXIT_EMPTY = 1
STORE_NAMES = ("wds", "zarr")  # openmind_tools.loader.STORES, named here so --help needs no torch
_SHOWN_ROWS = 50  # rows printed to a terminal; -o or --format writes them all
_SOURCE_HELP = 'manifest.parquet (path or s3:// URL) or a query such as "mae8 min_quality=3 of out/manifest.parquet"'


def main(argv: list[str] | None = None) -> int:
    return run_command("openmind-manifest", lambda: _parser().parse_args(argv), lambda args: args.run(args))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="openmind-manifest",
        description="Summarise a manifest written by openmind-convert and select sub-manifests from it "
        "(by modality, quality, dataset, a pandas expression or a named preset from manifests/).",
        epilog="Exit status: 0 done, 1 the query selected nothing (see --allow-empty), 2 bad arguments.",
    )
    commands = p.add_subparsers(title="commands", required=True, metavar="COMMAND")

    s = commands.add_parser("stats", help="volumes and bytes per modality and dataset, quality and age histograms")
    s.add_argument("manifest", help=_SOURCE_HELP)
    s.add_argument("--plot", metavar="PNG", type=_figure_path,
                   help="also draw the summary as a figure into this file (.png unless it names another format: "
                        ".pdf, .svg); a folder gets manifest_stats.png")  # fmt: skip
    s.add_argument(
        "--balance-by",
        type=column_list,
        metavar="COLUMNS",
        help="comma-separated columns (e.g. dataset or dataset,modality): each group's share of an epoch's draws "
        "with uniform sampling and with a stage's balance_by (inverse group size), and the reads per volume",
    )
    s.set_defaults(run=_stats)

    q = commands.add_parser(
        "query",
        help="select volumes; write them as a manifest (parquet), CSV or JSON lines, or print a table",
        description="Select volumes. Every filter given must hold (they combine with AND, also with a preset's).",
    )
    q.add_argument("manifest", help=_SOURCE_HELP)
    q.add_argument("--preset", help="a named selection from manifests/ (see 'openmind-manifest presets') or a .toml")
    q.add_argument("--modality", help="comma-separated modalities, CSV spelling or alias (inplainT1 = inplaneT1)")
    q.add_argument(
        "--min-quality",
        type=int,
        metavar="1-5",
        help="keep image_quality_score <= this (1 best, 5 worst); volumes without a score are dropped",
    )
    q.add_argument("--dataset", help="comma-separated dataset ids, e.g. ds000101,ds000202")
    q.add_argument(
        "--has-anatomy-mask",
        action=argparse.BooleanOptionalAction,
        help="keep only volumes with (or, with --no-has-anatomy-mask, without) an anatomy mask",
    )
    q.add_argument("--where", help="pandas expression over the manifest columns, e.g. \"age >= 18 and sex == 'F'\"")
    q.add_argument(
        "--exclude",
        metavar="FLAGS",
        help="leave out the volumes a flags table names (parquet with columns id, reason, such as the flags.parquet "
        "of 'openmind-manifest report'); comma-separated for several",
    )
    q.add_argument(
        "--limit", type=non_negative_int, help="keep the first N matching volumes (by id): a quick trial subset"
    )
    q.add_argument(
        "-o",
        "--output",
        type=existing_parent,
        help="write here; the format follows the suffix (.parquet, .csv, .jsonl)",
    )
    q.add_argument(
        "--format",
        choices=FORMATS,
        help="output format, overriding the suffix; without -o, csv/jsonl go to stdout (default: a short table)",
    )
    q.add_argument("--allow-empty", action="store_true", help="write the output even when nothing matches")
    q.set_defaults(run=_query)

    v = commands.add_parser("show", help="every column of one volume, and where its stores are")
    v.add_argument("manifest", help=_SOURCE_HELP)
    v.add_argument("id", help="volume id, e.g. ds000101/sub-01/ses-1/anat/sub-01_ses-1_T1w")
    v.set_defaults(run=_show)

    r = commands.add_parser("presets", help="list the named selections in manifests/")
    r.set_defaults(run=_presets)

    c = commands.add_parser(
        "report",
        help="a quality-control report: an HTML page with counts, distributions, outlier flags and a thumbnail of "
        "every volume, plus flags.parquet for --exclude",
        description="Write a static HTML quality-control report of a manifest into a folder (open its index.html "
        "in a browser, offline too) and flags.parquet: robust per-modality outliers and volumes that cannot be read. "
        "Thumbnails are made on dask; rerunning the same command resumes.",
        epilog="Exit status: 0 done, 2 bad arguments, 3 some volumes could not be read (flagged 'unreadable'), "
        "4 the machine failed (disk full, a lost dask worker): rerun to resume.",
    )
    c.add_argument("manifest", help=_SOURCE_HELP)
    c.add_argument("-o", "--output", type=existing_parent, default="report", help="report folder (default: report)")
    c.add_argument("--store", choices=sorted(STORE_NAMES), help="store to draw thumbnails from (default: zarr if "
                   "the manifest has it, else wds)")  # fmt: skip
    c.add_argument("--threshold", type=positive_float, default=THRESHOLD,
                   help=f"flag a metric this many robust standard deviations (1.4826 x MAD) from its modality's "
                        f"median (default {THRESHOLD}, Iglewicz & Hoaglin's cut)")  # fmt: skip
    c.add_argument("--limit", type=positive_int, help="report on the first N volumes (by id) only: a quick trial")
    c.add_argument("--workers", type=non_negative_int, default=2, help="local dask worker processes (0 = here)")
    c.add_argument("--scheduler", help="address of an existing dask.distributed scheduler (tcp://host:8786)")
    c.add_argument("--memory-limit", type=byte_size, default="auto", help="per local worker, e.g. 4GiB")
    c.add_argument("--retry-errors", action="store_true", help="redraw the thumbnail sheets that held an unreadable "
                   "volume (after 'openmind-convert verify --repair', say)")  # fmt: skip
    c.add_argument("--dry-run", action="store_true", help="count the flags and the sheets to draw; write nothing")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(run=_report)
    return p


def _stats(args: argparse.Namespace) -> int:
    df, _ = resolve_manifest(args.manifest)
    summary = stats(df)
    print(summary)
    if args.balance_by:
        table = balance_table(df, args.balance_by)
        shown = table.head(_SHOWN_ROWS)
        print(f"\nbalance_by {','.join(args.balance_by)}: {len(table)} groups, each {1 / len(table):.2%} of a "
              "balanced epoch's draws")  # fmt: skip
        print(shown.to_string(formatters={"uniform": "{:.2%}".format, "balanced": "{:.2%}".format,
                                          "reads_per_volume": "{:.2f}".format}))  # fmt: skip
        if len(table) > len(shown):
            print(f"... and {len(table) - len(shown)} more groups")
    if args.plot:
        plot_stats(summary, args.plot, title=args.manifest)
        print(f"figure: {args.plot}")
    return EXIT_OK


def _figure_path(text: str) -> str:
    """Where the figure goes, as the file it will be: matplotlib would add .png to a name without a suffix, and
    write `folder.png` beside a folder."""
    path = Path(text)
    if path.is_dir():
        path = path / "manifest_stats.png"
    elif not path.suffix:
        path = path.with_name(path.name + ".png")
    elif path.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise argparse.ArgumentTypeError(f"{text}: expected a .png, .pdf or .svg file or a folder")
    return existing_parent(str(path))


def _query(args: argparse.Namespace) -> int:
    fmt = args.format or (output_format(args.output) if args.output else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyResultWarning)  # reported below, with the exit status
        df, meta = resolve_manifest(args.manifest, **{f.name: getattr(args, f.name) for f in fields(Filters)})
    described = f"{len(df)} volumes selected by {meta.get('query') or 'no filter'!r} from {args.manifest}"
    if df.empty and not args.allow_empty:
        print(f"openmind-manifest: {described}; nothing written (--allow-empty writes it)", file=sys.stderr)
        return EXIT_EMPTY
    if args.output:
        write_manifest(df, args.output, meta, fmt)
        print(f"{described} -> {args.output} ({fmt})")
    elif fmt is None:
        print(_table(df))
        print(described)
    else:
        write_manifest(df, sys.stdout, meta, fmt)
        print(described, file=sys.stderr)
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    df, meta = resolve_manifest(args.manifest)
    hits = df.index[df["id"] == args.id]
    if not len(hits):
        near = df["id"][df["id"].str.contains(args.id, regex=False)].head(5).tolist()
        raise ConfigError(
            f"no volume {args.id!r} in {args.manifest}" + (f"; ids containing it: {near}" if near else "")
        )
    row = df.loc[hits[0]]
    width = max(map(len, row.index))
    for name, value in row.items():
        print(f"{name:<{width}}  {_cell(value)}")
    root = meta.get("store_root", ".")
    for store, key in (("zarr_store", "zarr_array"), ("wds_shard", "wds_key")):
        if store in row and isinstance(row[store], str):
            print(f"{'-> ' + store:<{width}}  {root}/{row[store]} [{row[key]}]")
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from openmind_tools.report import build_report

    with nullcontext() if args.dry_run else dask_client(args) as client:
        summary = build_report(args.manifest, args.output, store=args.store, threshold=args.threshold,
                               limit=args.limit, client=client, progress=not args.quiet,
                               retry_errors=args.retry_errors, dry_run=args.dry_run)  # fmt: skip
    print(summary)
    return EXIT_DATA if summary.unreadable else EXIT_OK


def _presets(args: argparse.Namespace) -> int:
    for name, description in list_presets().items():
        print(f"{name}: {description}\n    {load_preset(name).text() or '(no filter)'}")
    return EXIT_OK


def _table(df: pd.DataFrame) -> str:
    """A few key columns of the first rows, for a terminal."""
    shown = df.head(_SHOWN_ROWS)
    table = shown.reindex(columns=["id", "modality", "dataset", QUALITY, "shape"]).rename(columns={QUALITY: "quality"})
    table["shape"] = [("x".join(map(str, s)) if isinstance(s, np.ndarray | list) else None) for s in table["shape"]]
    text = table.to_string(index=False, na_rep="-") if len(table) else "(no volumes)"
    more = len(df) - len(shown)
    return text + (f"\n... {more} more (write them all with -o FILE or --format csv)" if more else "")


def _cell(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return json.dumps(value, default=methodcaller("tolist"))
    return "-" if pd.isna(value) else str(value)
