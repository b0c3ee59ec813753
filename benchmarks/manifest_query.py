"""Manifest load and query time at the real corpus's size (~114k rows), from the demo manifest's rows.

    .venv/bin/python benchmarks/manifest_query.py [--manifest out/manifest.parquet] [--rows 114000]

The demo rows are replicated with unique ids, spread over ~800 datasets (as OpenMind has), with varied
ages and ~0.4% unscored rows, so filters see realistic cardinalities. Without --manifest the demo corpus
is converted first (zarr only, ~15 s). Prints the median and best of --repeat runs as a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from openmind_tools.convert import convert
from openmind_tools.demo import write_demo_corpus
from openmind_tools.manifest import load_manifest, query, resolve_manifest, stats, write_manifest
from openmind_tools.manifest_io import read_table, write_table


def replicate(df: pd.DataFrame, rows: int, seed: int = 0) -> pd.DataFrame:
    """`rows` rows cycling through `df`, with unique ids, ~800 datasets, random ages and a few unscored rows."""
    rng = np.random.default_rng(seed)
    copy = np.arange(rows) // len(df)
    big = df.iloc[np.arange(rows) % len(df)].reset_index(drop=True)
    big["id"] = big["id"] + "#" + pd.Series(copy).astype(str)
    big["dataset"] = big["dataset"] + "-" + pd.Series(copy % 266).astype(str)  # 3 x 266 = 798 datasets
    big["age"] = np.where(rng.random(rows) < 0.4, np.nan, rng.integers(5, 90, rows))
    big["image_quality_score"] = np.where(rng.random(rows) < 0.004, np.nan, big["image_quality_score"])
    return big


def timed(fn: Callable[[], Any], repeat: int) -> tuple[Any, list[float]]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, times


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, pandas {pd.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", help="a converted manifest to replicate (default: convert the demo corpus)")
    p.add_argument("--rows", type=int, default=114_000, help="rows of the replicated manifest")
    p.add_argument("--repeat", type=int, default=5, help="runs per operation")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(args.manifest) if args.manifest else _demo_manifest(Path(tmp))
        df, meta = read_table(source)
        path = Path(tmp) / "big" / "manifest.parquet"
        path.parent.mkdir()
        write_table(replicate(df, args.rows), path, meta)
        big, load_times = timed(lambda: load_manifest(path), args.repeat)
        some = sorted(big["dataset"].unique())[:10]
        mae8 = query(big, preset="mae8")

        def write_mae8() -> int:
            write_manifest(mae8, Path(tmp) / "mae8.parquet", mae8.attrs["openmind"])
            return len(mae8)

        operations: dict[str, Callable[[], Any]] = {
            "query modality=T1w,FLAIR min_quality=3": lambda: query(big, modality="T1w,FLAIR", min_quality=3),
            "query preset=mae8": lambda: query(big, preset="mae8"),
            "query dataset=<10 datasets>": lambda: query(big, dataset=some),
            "query where=\"age >= 18 and sex == 'F'\"": lambda: query(big, where="age >= 18 and sex == 'F'"),
            "query mae8 + min_quality=2 + where + has_anatomy_mask": lambda: query(
                big, preset="mae8", min_quality=2, where="age >= 18 and sex == 'F'", has_anatomy_mask=True
            ),
            "query modality=T1w limit=1000": lambda: query(big, modality="T1w", limit=1000),
            "stats (counts, bytes, histograms)": lambda: stats(big).volumes,
            "resolve_manifest('mae8 min_quality=3 of FILE') (load + query)": lambda: resolve_manifest(
                f"mae8 min_quality=3 of {path}"
            )[0],
            "write the mae8 result as parquet": write_mae8,
        }
        print(f"{len(big)} rows, {big['dataset'].nunique()} datasets, {path.stat().st_size / 1e6:.1f} MB parquet")
        print(f"machine: {machine()}\n")
        print("| operation | rows out | median ms | best ms |")
        print("|---|---:|---:|---:|")
        print(f"| load_manifest | {len(big)} | {_ms(load_times)} |")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a benchmark that warns measures the wrong thing
            for name, fn in operations.items():
                result, times = timed(fn, args.repeat)
                print(f"| {name} | {len(result) if isinstance(result, pd.DataFrame) else result} | {_ms(times)} |")


def _demo_manifest(tmp: Path) -> Path:
    write_demo_corpus(tmp / "corpus")
    convert(tmp / "corpus", tmp / "out", formats=("zarr",), progress=False)
    return tmp / "out" / "manifest.parquet"


def _ms(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:.0f} | {min(times) * 1e3:.0f}"


if __name__ == "__main__":
    main()
