"""Conversion speed and store layout, against the floor a user cannot go below.

    .venv/bin/python benchmarks/convert_bench.py [--copies 2]

1. Per-volume conversion (preprocess + Zarr write, with lz4hc and with lz4) vs the floor: SimpleITK read +
   reorient to RAS + 1 mm linear resample of the same NIfTI, one thread each.
2. Volumes/s of `convert` on a dask LocalCluster with 1 and 2 workers (cluster start excluded), on the
   demo corpus replicated `--copies` times (the "larger set").
3. Stored bytes per store vs the source .nii.gz bytes.
4. Whole-volume and 160^3-patch read time (one thread) and stored bytes for candidate Zarr layouts.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numcodecs
import numpy as np
import pandas as pd
import SimpleITK as sitk
import zarr
from zarr.codecs import BloscCodec

from openmind_tools import zarr_store
from openmind_tools.convert import convert
from openmind_tools.corpus import discover
from openmind_tools.demo import write_demo_corpus
from openmind_tools.preprocess import preprocess


def floor_seconds(path: Path) -> float:
    start = time.perf_counter()
    img = sitk.DICOMOrient(sitk.ReadImage(str(path), sitk.sitkFloat32), "RAS")
    size = [round(n * s) for n, s in zip(img.GetSize(), img.GetSpacing(), strict=True)]
    sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), [1.0] * 3, img.GetDirection())
    return time.perf_counter() - start


def ours_seconds(image, root: Path, codec: str) -> float:
    start = time.perf_counter()
    result = preprocess(image.image, image.anatomy_mask, image.deface_mask)
    zarr_store.write_volume(root, image.id, result.volume, {}, codec)
    return time.perf_counter() - start


def per_volume(corpus_root: Path, work: Path) -> str:
    """Floor and ours per volume, ours with each fast codec (the default first): the codec is most of the gap."""
    codecs = [zarr_store.DEFAULT_CODEC, *(c for c in ("lz4", "lz4hc") if c != zarr_store.DEFAULT_CODEC)]
    rows = []
    for image in discover(corpus_root).images:
        row = {"id": image.id.split("/")[-1], "floor_s": min(floor_seconds(image.image) for _ in range(2))}
        for codec in codecs:
            row[f"ours_{codec}_s"] = min(ours_seconds(image, work / "pv", codec) for _ in range(2))
        rows.append(row)
    df = pd.DataFrame(rows)
    total = "\n"
    for codec in codecs:
        df[f"ratio_{codec}"] = df[f"ours_{codec}_s"] / df["floor_s"]
        median, seconds = df[f"ratio_{codec}"].median(), df[f"ours_{codec}_s"].sum()
        total += f"{codec}: median ratio {median:.2f}x, total ours {seconds:.2f} s; "
    return df.to_markdown(index=False, floatfmt=".3f") + total + f"floor {df['floor_s'].sum():.2f} s"


def replicate(corpus_root: Path, copies: int, dest: Path) -> Path:
    """The demo corpus `copies` times over, as distinct datasets (a larger set with the same content)."""
    csv = pd.read_csv(corpus_root / "openneuro_metadata.csv", keep_default_na=False)
    frames = []
    for k in range(copies):
        for ds in sorted({p.split("/")[0] for p in csv["image_path"]}):
            shutil.copytree(corpus_root / "OpenMind" / ds, dest / "OpenMind" / f"{ds[:-1]}{k}", dirs_exist_ok=True)
        part = csv.copy()
        for column in ("image_path", "anon_mask_path", "anat_mask_path"):
            part[column] = [
                p.replace(p.split("/")[0], p.split("/")[0][:-1] + str(k), 1) if p else p for p in part[column]
            ]
        frames.append(part)
    pd.concat(frames).to_csv(dest / "openneuro_metadata.csv", index=False)
    return dest


def throughput(corpus_root: Path, work: Path) -> str:
    from dask.distributed import Client, LocalCluster

    rows = []
    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster):
            client = Client.current()
            summary = convert(corpus_root, work / f"tp{workers}", formats=("zarr",), client=client, progress=False)
        rows.append({"workers": workers, "volumes": summary.converted, "seconds": summary.seconds,
                     "volumes/s": summary.converted / summary.seconds})  # fmt: skip
    df = pd.DataFrame(rows)
    df["speed-up"] = df["volumes/s"] / df["volumes/s"].iloc[0]
    return df.to_markdown(index=False, floatfmt=".2f")


def stored_bytes(corpus_root: Path, work: Path) -> str:
    convert(corpus_root, work / "both", formats=("zarr", "wds"), progress=False)
    m = pd.read_parquet(work / "both" / "manifest.parquet")
    source = m["source_nbytes"].sum()
    rows = [
        {"store": "source .nii.gz (image + masks)", "MB": source / 1e6, "x source": 1.0},
        {
            "store": f"Zarr v3 (fp16 image + uint8 mask code, blosc {zarr_store.DEFAULT_CODEC})",
            "MB": m["zarr_nbytes"].sum() / 1e6,
        },  # fmt: skip
        {"store": "WebDataset tar (raw .npy)", "MB": m["wds_nbytes"].sum() / 1e6},
    ]
    for row in rows[1:]:
        row["x source"] = row["MB"] * 1e6 / source
    return pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f")


def layouts(corpus_root: Path, work: Path) -> str:
    """Read cost of candidate layouts for one converted head, one thread."""
    numcodecs.blosc.set_nthreads(1)
    image = next(i for i in discover(corpus_root).images if i.modality == "T1w")
    volume = preprocess(image.image, image.anatomy_mask, image.deface_mask).volume
    shape = volume.image.shape
    packed = np.stack([volume.image, volume.code.astype(np.float16)])  # store format 2's one array
    patch = tuple(slice(0, min(160, n)) for n in shape)
    lz4 = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    for codec in ("lz4", "lz4hc"):
        zarr_store.write_volume(work / codec, "v", volume, {}, codec)
    group = zarr_store.open_volume(work / "lz4", "v")
    _array(work / "v2", packed, lz4)  # read back below by its one chunk, as the v2 loader did
    sharded = _array(work / "sharded", packed, lz4, inner=(2, 64, 64, 64))
    both = (slice(None), *patch)

    def direct(codec: str):
        return lambda: zarr_store.read_volume(str(work / codec), "v", shape)

    def v2_direct():
        out = np.empty(packed.shape, np.float16)
        numcodecs.blosc.decompress((work / "v2" / "c" / "0" / "0" / "0" / "0").read_bytes(), out)
        return out

    rows = [
        _row("ours: fp16 image + u8 mask arrays, 1 chunk each, lz4, direct read (+ zarr.json)", work / "lz4",
             direct("lz4"), direct("lz4"), 4),
        _row("the same, lz4hc", work / "lz4hc", direct("lz4hc"), direct("lz4hc"), 4),
        _row("the same arrays read through zarr", work / "lz4", lambda: (group["image"][...], group["mask"][...]),
             lambda: (group["image"][patch], group["mask"][patch]), 2),
        _row("store format 2: 2ch fp16, 1 chunk, lz4, direct read", work / "v2", v2_direct, v2_direct, 1),
        _row("2ch fp16, 64^3 chunks in 1 shard, lz4, through zarr", work / "sharded", lambda: sharded[...],
             lambda: sharded[both], 1),
    ]  # fmt: skip
    df = pd.DataFrame(rows)
    df["patch ms vs ours"] = df["160^3 patch ms"] / df["160^3 patch ms"].iloc[0]
    header = f"volume {shape}, fp16 image {volume.image.nbytes / 1e6:.1f} MB\n"
    return header + df.to_markdown(index=False, floatfmt=".2f")


def _row(name: str, root: Path, read_whole, read_patch, objects: int) -> dict[str, object]:
    nbytes = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and f.name != "zarr.json")
    return {"layout": name, "stored MB": nbytes / 1e6, "whole volume ms": _ms(read_whole),
            "160^3 patch ms": _ms(read_patch), "objects / patch": objects}  # fmt: skip


def _array(path: Path, data: np.ndarray, codec: BloscCodec, inner: tuple[int, ...] | None = None) -> zarr.Array:
    if inner is None:
        array = zarr.create_array(str(path), shape=data.shape, chunks=data.shape, dtype=data.dtype, compressors=codec)
    else:  # one shard object covering the volume, holding inner chunks
        shard = tuple(-(-n // c) * c for n, c in zip(data.shape, inner, strict=True))
        array = zarr.create_array(
            str(path), shape=data.shape, chunks=inner, shards=shard, dtype=data.dtype, compressors=codec
        )
    array[...] = data
    return zarr.open_array(str(path), mode="r")


def _ms(fn, reps: int = 7) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=2, help="replications of the demo corpus for throughput")
    args = parser.parse_args()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = write_demo_corpus(work / "corpus")
        print("## Per-volume conversion vs floor (SimpleITK read + RAS + 1 mm resample), one thread\n")
        print(per_volume(corpus, work))
        print("\n## Stored bytes (demo corpus)\n")
        print(stored_bytes(corpus, work))
        print(f"\n## convert throughput on dask LocalCluster, demo corpus x{args.copies}\n")
        print(throughput(replicate(corpus, args.copies, work / "larger"), work))
        print("\n## Zarr layout candidates, one thread\n")
        print(layouts(corpus, work))


if __name__ == "__main__":
    main()
