"""How the conversion driver's peak memory grows with the corpus: its own VmHWM at two corpus sizes.

    .venv/bin/python benchmarks/driver_peak.py [1000 20000] [--workers 2] [--dir /tmp/openmind_peak]

Per size: scale_bench's corpus (hard links of one tiny real image and its masks under BIDS paths over ~800
datasets, a CSV of N rows), converted into both stores by `openmind-convert` in a subprocess on a LocalCluster,
as a user runs it; prints the driver's peak (VmHWM, its dask workers not counted), the seconds, and the ratio of
the two peaks. Everything the driver holds per volume shows in that ratio, the DataFrame and parquet copies
made while writing the manifest included.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from scale_bench import build_corpus, convert_command, timed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("counts", type=int, nargs="*", default=[1000, 20000], help="corpus sizes (default 1000 20000)")
    p.add_argument("--workers", type=int, default=2, help="dask workers (default 2)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/openmind_peak"), help="scratch folder (deleted)")
    args = p.parse_args(argv)
    peaks = {}
    print("| volumes | convert s | driver peak MB |\n|---:|---:|---:|")
    for count in args.counts:
        work = args.dir / str(count)
        shutil.rmtree(work, ignore_errors=True)
        root = build_corpus(work / "corpus", count)
        seconds, peaks[count] = timed(convert_command(root, work / "out", args.workers))
        shutil.rmtree(work, ignore_errors=True)
        print(f"| {count:,} | {seconds:.1f} | {peaks[count] / 1e6:.0f} |", flush=True)
    first, last = args.counts[0], args.counts[-1]
    print(f"\npeak at {last:,} / peak at {first:,}: {peaks[last] / peaks[first]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
