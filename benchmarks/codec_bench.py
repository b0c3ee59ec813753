"""Which blosc codec our stores should use: stored bytes and one-thread CPU per volume, with nnssl's format as baseline.

    .venv/bin/python benchmarks/codec_bench.py [--workdir DIR] [--repeats 5]

For each preprocessed demo head (19 MNI152-derived volumes; written to DIR/demo unless already there):
- the float16 image (byte shuffle, typesize 2) and the uint8 mask code, each encoded with blosc lz4-5,
  lz4hc-5, zstd-1 and zstd-3 (numcodecs, one thread); the code's filter is measured (noshuffle, shuffle,
  bitshuffle) and the table uses the smaller of noshuffle/shuffle (the same bytes: blosc does not shuffle
  1-byte items);
- nnssl's case format (`nnssl_format.write_case`: float32 image + two uint8 masks, blosc2 zstd-8) and a
  whole-case read of it through blosc2.open(mmap) as nnssl's loader opens it;
- the decode floor (`nnssl_format.decode_floor`): lz4-5 decode, crc32c of the stored bytes, a plain copy.
Times are CPU ms per volume (time.process_time): per volume the median of `--repeats` runs, then the mean
over volumes; decodes write into a reused buffer except nnssl's, which allocates as nnssl does. Bytes are
totals over the volumes, as a fraction of the source files (image + its two mask .nii.gz) and of the raw
float16 image + uint8 code (nnssl's row too, though it stores float32). Preprocessing and nnssl's writes
(about 4 s of CPU per head at zstd-8 with 4 KiB mask blocks) run first, two worker processes at a time;
nnssl's encode is that one contended run per case, every other timing runs alone in this process. About
130 s on 2 cores (55 of them nnssl's writes), plus 25 s to write the demo corpus into a new DIR.
Prints the machine, one markdown table, and the code's filters.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import blosc2
import numcodecs
import numpy as np
import pandas as pd
from numcodecs import Blosc

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts

from nnssl_format import cpu_ms, decode_floor, open_case, write_case  # noqa: E402

from openmind_tools.corpus import CSV_NAME, SourceImage, discover  # noqa: E402
from openmind_tools.demo import write_demo_corpus  # noqa: E402
from openmind_tools.preprocess import preprocess  # noqa: E402
from openmind_tools.volume import Volume  # noqa: E402

CODECS = (("lz4", 5), ("lz4hc", 5), ("zstd", 1), ("zstd", 3))
CODE_FILTERS = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
STORE_FILTERS = ("noshuffle", "shuffle")  # what the table may pick for the code


def machine() -> str:
    """The CPU model (platform.processor() is empty on most Linux builds), cores and codec versions."""
    model = platform.processor()
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return (
        f"{model}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), Python {platform.python_version()},"
        f" numcodecs {numcodecs.__version__}, blosc2 {blosc2.__version__}"
    )


@dataclass(frozen=True)
class Case:
    volume: Volume
    source_bytes: int  # the image's .nii.gz and its two masks' files
    nnssl_bytes: int
    nnssl_write_ms: float  # CPU of one write_case, with another running beside it


def prepare(image: SourceImage, nnssl_dir: Path, name: str) -> Case:
    """Preprocess one demo image and write it in nnssl's format (in a worker process: nnssl's writes are slow)."""
    sources = [p for p in (image.image, image.anatomy_mask, image.deface_mask) if p is not None]
    volume = preprocess(image.image, image.anatomy_mask, image.deface_mask).volume
    start = time.process_time()
    nbytes = write_case(nnssl_dir, name, volume)
    write_ms = 1e3 * (time.process_time() - start)
    return Case(volume, sum(os.path.getsize(p) for p in sources), nbytes, write_ms)


def blosc_costs(array: np.ndarray, cname: str, clevel: int, shuffle: int, repeats: int) -> dict[str, float]:
    """Stored bytes, encode and decode ms of one array; the decode writes into one reused buffer."""
    codec = Blosc(cname, clevel, shuffle)
    encode_ms, encoded = cpu_ms(partial(codec.encode, array), repeats)
    out = np.empty_like(array)
    decode_ms, _ = cpu_ms(partial(codec.decode, encoded, out=out), repeats)
    if not np.array_equal(out.view(np.uint8), array.view(np.uint8)):  # bytes: a NaN would not equal itself
        raise AssertionError(f"{cname}-{clevel} did not round-trip")
    return {"bytes": len(encoded), "encode_ms": encode_ms, "decode_ms": decode_ms}


def read_case(prefix: Path) -> None:
    """Decode a whole nnssl case (image and both masks) as its loader reaches it: open, then slice all."""
    for array in open_case(prefix):
        array[...]  # decompresses every chunk into a new array


def measure(cases: list[Case], nnssl_dir: Path, repeats: int) -> pd.DataFrame:
    """One row per (volume, part): part is "image" or "code:<filter>" per codec, or "nnssl"; one process, one thread."""
    numcodecs.blosc.set_nthreads(1)
    rows = []
    for i, case in enumerate(cases):
        for cname, clevel in CODECS:
            codec, image = f"{cname}-{clevel}", case.volume.image
            rows.append({"codec": codec, "part": "image"} | blosc_costs(image, cname, clevel, Blosc.SHUFFLE, repeats))
            for filt, shuffle in CODE_FILTERS.items():
                costs = blosc_costs(case.volume.mask_code, cname, clevel, shuffle, repeats)
                rows.append({"codec": codec, "part": f"code:{filt}"} | costs)
        decode_ms, _ = cpu_ms(partial(read_case, nnssl_dir / _name(i)), repeats)
        rows.append({"codec": "nnssl", "part": "nnssl", "bytes": case.nnssl_bytes, "encode_ms": case.nnssl_write_ms,
                     "decode_ms": decode_ms})  # fmt: skip
    return pd.DataFrame(rows)


def _name(i: int) -> str:
    return f"case{i:03d}"


def table(df: pd.DataFrame, cases: list[Case], floor: dict[str, float]) -> tuple[str, str]:
    """The markdown table (per-codec sums over volumes: bytes as totals, ms as means) and the filter lines."""
    source = sum(c.source_bytes for c in cases)
    raw = sum(c.volume.image.nbytes + c.volume.mask_code.nbytes for c in cases)
    sums = df.groupby(["codec", "part"])[["bytes", "encode_ms", "decode_ms"]].sum()
    n = len(cases)

    def row(name: str, filt: str, parts: list[tuple[str, str]]) -> dict[str, object]:
        total = sums.loc[parts].sum()
        return {"format": name, "code filter": filt, "x source .nii.gz": total["bytes"] / source,
                "x raw fp16+u8": total["bytes"] / raw, "encode ms/vol": total["encode_ms"] / n,
                "decode ms/vol": total["decode_ms"] / n}  # fmt: skip

    rows, lines = [], []
    for cname, clevel in CODECS:
        codec = f"{cname}-{clevel}"
        code = {f: sums.loc[(codec, f"code:{f}")] for f in CODE_FILTERS}
        sizes = {f: code[f]["bytes"] for f in STORE_FILTERS}
        best = min(STORE_FILTERS, key=sizes.get)  # noshuffle on a tie: blosc skips shuffling 1-byte items
        label = "either (same bytes)" if len(set(sizes.values())) == 1 else best
        rows.append(row(f"blosc {codec}: fp16 image + u8 code", label, [(codec, "image"), (codec, f"code:{best}")]))
        lines.append(
            f"- code, {codec}: "
            + ", ".join(f"{f} {c['bytes'] / 1e6:.2f} MB / {c['decode_ms'] / n:.2f} ms" for f, c in code.items())
        )
    nnssl = "nnssl b2nd: f32 image + 2 u8 masks, zstd-8 (encode: 1 run, 2 at once)"
    rows.append(row(nnssl, "shuffle (blosc2 default)", [("nnssl", "nnssl")]))
    for name, key in (("floor: lz4-5 decode, image + code", "decode"), ("floor: crc32c of lz4-5 bytes", "crc32c"),
                      ("floor: np.copyto of fp16 image", "copy")):  # fmt: skip
        rows.append({"format": name, "decode ms/vol": floor[key]})
    frame = pd.DataFrame(rows)
    md = frame.astype(object).where(frame.notna(), None).to_markdown(index=False, floatfmt=".3f", missingval="")
    return md, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keeps the demo corpus and nnssl cases (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per volume and codec (median)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        if not (work / "demo" / CSV_NAME).exists():
            write_demo_corpus(work / "demo")
        images = discover(work / "demo").images
        names = [_name(i) for i in range(len(images))]
        with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
            cases = list(pool.map(prepare, images, [work / "nnssl"] * len(images), names))
        df = measure(cases, work / "nnssl", args.repeats)
        floor = decode_floor([c.volume for c in cases], repeats=args.repeats)
    md, lines = table(df, cases, floor)
    print(f"machine: {machine()}")
    print(f"{len(cases)} volumes, mean shape {np.mean([c.volume.image.shape for c in cases], axis=0).round(1)}\n")
    print(md)
    print("\nmask code alone (MB over all volumes / decode ms per volume):\n" + lines)


if __name__ == "__main__":
    main()
