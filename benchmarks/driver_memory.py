"""What the conversion driver holds per volume when it writes the manifest, and where it was allocated.

    .venv/bin/python benchmarks/driver_memory.py [500 2000] [--dir /tmp/openmind_driver]

Converts two tiny OpenMind-shaped corpora (scale_bench's: hard links of one 24^3 image and its masks) in this
process, with tracemalloc on, and at the moment `convert` builds the manifest takes a snapshot: the Python
memory held then, per volume (the difference between the two sizes over the difference in volumes), the
manifest DataFrame's own size per volume, and the allocations grouped by the source file that made them
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


def held_at_manifest(count: int, root: Path) -> dict[str, Any]:
    shutil.rmtree(root, ignore_errors=True)
    build_corpus(root / "corpus", count)
    seen: dict[str, Any] = {}
    manifest = conversion._manifest

    def spy(*args: Any) -> Any:
        gc.collect()
        seen["held"] = tracemalloc.get_traced_memory()[0]
        seen["by_file"] = tracemalloc.take_snapshot().statistics("filename")[:8]
        frame = manifest(*args)
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
    p.add_argument("counts", type=int, nargs="*", default=[500, 2000], help="two corpus sizes (default 500 2000)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/openmind_driver"), help="scratch folder (deleted)")
    args = p.parse_args(argv)
    small, large = (held_at_manifest(n, args.dir / str(n)) for n in args.counts)
    volumes = args.counts[1] - args.counts[0]
    print(f"held when the manifest is built: {(large['held'] - small['held']) / volumes:.0f} B per volume; the "
          f"manifest DataFrame: {(large['frame'] - small['frame']) / volumes:.0f} B per volume")  # fmt: skip
    print(f"allocations held at {args.counts[1]} volumes, by source file:")
    for stat in large["by_file"]:
        print(f"  {stat.traceback[0].filename}: {stat.size / args.counts[1]:.0f} B per volume ({stat.count} blocks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
