"""What the conversion driver holds per volume when it writes the manifest, and where it was allocated.

    .venv/bin/python benchmarks/driver_memory.py [2000 6000] [--dir /tmp/openmind_driver]

Converts two tiny OpenMind-shaped corpora (scale_bench's: hard links of one 24^3 image and its masks) in this
process, with tracemalloc on, and when `convert` builds the manifest's first row group takes a snapshot: the
Python memory held then, per volume (the difference between the two sizes over the difference in volumes), the
row group's own size per volume, and the allocations grouped by the source file that made them
(discovery: pathlib, corpus.py; manifest rows: preprocess.py's metadata, convert.py's records, wds_store.py's
sample cells, volume.py's checksums). Scale_bench's VmHWM also counts the DataFrame and parquet copies made
while writing, and malloc's own overhead.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tracemalloc
from pathlib import Path
from typing import Any

from scale_bench import PER_SHARD, STORED, build_corpus

import openmind_tools.convert as conversion
from openmind_tools.convert import MANIFEST_BATCH


def held_at_manifest(count: int, root: Path) -> dict[str, Any]:
    shutil.rmtree(root, ignore_errors=True)
    build_corpus(root / "corpus", count)
    seen: dict[str, Any] = {}
    manifest = conversion._manifest

    def spy(*args: Any) -> Any:
        frame = manifest(*args)
        if len(args[1]) == MANIFEST_BATCH and "held" not in seen:  # both sizes hold one full batch of records
            gc.collect()
            seen["held"] = tracemalloc.get_traced_memory()[0]
            seen["by_file"] = tracemalloc.take_snapshot().statistics("filename")[:8]
            seen["frame"] = int(frame.memory_usage(deep=True).sum())
        return frame

    conversion._manifest = spy
    tracemalloc.start()
    try:
        conversion.convert(root / "corpus", root / "out", formats=("zarr", "wds"), progress=False,
                           shard_bytes=PER_SHARD * 3 * STORED**3)  # fmt: skip
    finally:
        tracemalloc.stop()
        conversion._manifest = manifest
        shutil.rmtree(root, ignore_errors=True)
    return seen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("counts", type=int, nargs="*", default=[2000, 6000], help="two corpus sizes (default 2000 6000)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/openmind_driver"), help="scratch folder (deleted)")
    args = p.parse_args(argv)
    if len(args.counts) != 2 or not MANIFEST_BATCH <= args.counts[0] < args.counts[1]:
        p.error(f"give two counts, rising, each at least one row group ({MANIFEST_BATCH} volumes)")
    small, large = (held_at_manifest(n, args.dir / str(n)) for n in args.counts)
    volumes = args.counts[1] - args.counts[0]
    print(f"held when the manifest is written: {(large['held'] - small['held']) / volumes:.0f} B per volume; "
          f"one row group of {MANIFEST_BATCH}: {large['frame'] / MANIFEST_BATCH:.0f} B per row")  # fmt: skip
    print(f"allocations held at {args.counts[1]} volumes, by source file:")
    for stat in large["by_file"]:
        print(f"  {stat.traceback[0].filename}: {stat.size / args.counts[1]:.0f} B per volume ({stat.count} blocks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
