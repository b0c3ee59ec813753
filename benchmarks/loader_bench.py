"""Patch loading cost: this loader (Zarr, tar shards, S3) against per-sample NIfTI and on-the-fly MONAI.

    .venv/bin/python benchmarks/loader_bench.py [--latency-ms 20] [--workdir DIR]

All rows deliver the same thing through a torch DataLoader (batches of 4 x 1 x 160^3: image float16,
anatomy/deface/valid uint8) from the same volumes (the demo corpus: 19 MNI152-derived heads, converted
once per Zarr codec), one epoch per row, one thread per worker:
- loader zarr / wds: PatchDataset + make_loader (CPU device), c = crops per volume read; the Zarr store
  written with lz4 (the default) and with lz4hc;
- nnssl's own format: the volumes as nnssl writes them (blosc2 float32, ZSTD clevel 8, its block/chunk rule;
  benchmarks/nnssl_format.py), read and cropped as nnssl's loader does;
- NIfTI per sample: the preprocessed volume saved as image.nii.gz (float32) + masks.nii.gz (uint8 code),
  read with SimpleITK and cropped, one read per patch (nnU-Net/nnssl style);
- MONAI on the fly: LoadImaged + Orientationd + Spacingd + NormalizeIntensityd + RandSpatialCropd (after
  SpatialPadd) on the source NIfTI and its masks.
Each row runs a warm-up epoch (starting persistent workers) and then measures one epoch: CPU s/patch
counts every process (main + workers, user + system), bytes read counts their read() syscalls (rchar), page
faults their minor faults (a fresh 4 KB page written for the first time).
S3 rows read the same stores from a moto server on loopback, once as is and once with `--latency-ms`
added to every request; they count bytes from the manifest. A second table gives the floor on the same
volumes: blosc decode of image + mask code into reused buffers, the CRC-32C of the stored bytes, a copy.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import fsspec
import nibabel as nib
import numpy as np
import pandas as pd
import psutil
import s3fs
import SimpleITK as sitk
import torch
from nnssl_format import NnsslPatches, decode_floor, write_case
from torch.utils.data import DataLoader, Dataset

from openmind_tools import zarr_store
from openmind_tools.convert import convert
from openmind_tools.corpus import discover
from openmind_tools.demo import write_demo_corpus
from openmind_tools.loader import PatchDataset, make_loader

PATCH, BATCH = 160, 4
STORED_BYTES_PER_VOXEL = 3  # float16 image + one uint8 mask code: what a patch holds
NOT_COUNTED: set[int] = set()  # pids of processes whose CPU the rows leave out (the S3 server)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="where to build the corpus and stores (default: a temp dir)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added to every S3 request in the S3 row")
    parser.add_argument("--shard-mb", type=int, default=64, help="tar shard size (64 MB: ~5 demo heads a shard)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # MONAI's deprecation chatter
    work = args.workdir or Path(tempfile.mkdtemp(prefix="loader_bench_"))
    try:
        rows = run(work, args.latency_ms, args.shard_mb * 2**20)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows, args.latency_ms)
    return 0


def run(work: Path, latency_ms: float, shard_bytes: int) -> list[dict[str, Any]]:
    corpus = work / "corpus"
    if not (work / "out" / "manifest.parquet").is_file():
        write_demo_corpus(corpus)
        convert(corpus, work / "out", formats=("zarr", "wds"), shard_bytes=shard_bytes, progress=False, codec="lz4")
    if not (work / "out_lz4hc" / "manifest.parquet").is_file():
        convert(corpus, work / "out_lz4hc", formats=("zarr",), codec="lz4hc", progress=False)
    manifest, lz4hc = work / "out" / "manifest.parquet", work / "out_lz4hc" / "manifest.parquet"
    table = pd.read_parquet(manifest)
    volumes = [
        zarr_store.read_volume(str(work / "out" / r.zarr_store), r.id, tuple(r.shape)) for r in table.itertuples()
    ]
    nifti = export_nifti(table, volumes, work)
    nnssl = export_nnssl(table, volumes, work)
    _warm_page_cache([work / "out", work / "out_lz4hc", work / "nifti", work / "nnssl", corpus])
    floors = {cname: decode_floor(volumes, *zarr_store.CODECS[cname]) for cname in ("lz4", "lz4hc")}
    rows = []
    for name, path, store in (("zarr lz4", manifest, "zarr"), ("zarr lz4hc", lz4hc, "zarr"), ("wds", manifest, "wds")):
        # the pipeline alone: no DataLoader worker, no shared memory
        dataset = PatchDataset(path, PATCH, store=store, crops_per_volume=1, foreground_bias=0.9, prefetch=0)
        rows.append(ours(f"loader {name}, c=1, in-process", dataset, 0))
    for workers in (1, 2):
        for name, path, store, crops in (("zarr lz4", manifest, "zarr", 1), ("zarr lz4", manifest, "zarr", 2),
                                         ("zarr lz4hc", lz4hc, "zarr", 1), ("wds", manifest, "wds", 1),
                                         ("wds", manifest, "wds", 2)):  # fmt: skip
            dataset = PatchDataset(path, PATCH, store=store, crops_per_volume=crops, foreground_bias=0.9)
            rows.append(ours(f"loader {name}, c={crops}", dataset, workers))
        rows.append(baseline("nnssl format (blosc2 zstd-8)", NnsslPatches(nnssl), workers))
        rows.append(baseline("NIfTI per sample (SimpleITK)", NiftiPatches(nifti), workers))
        rows.append(
            baseline("MONAI on the fly (source NIfTI)", MonaiPatches(discover(corpus).images), workers, warm=False)
        )
    rows += s3_rows(work / "out", table, latency_ms)
    print_floor(floors, rows)
    return rows


# ---------------------------------------------------------------------------------------------- measuring
class Counters:
    """CPU seconds (user + system) of this process and of its live children, their bytes read (rchar) and minor
    page faults; the S3 server (`NOT_COUNTED`) is a child too, but it stands in for remote storage, so it is left
    out."""

    def __init__(self) -> None:
        self.main = self.workers = self.read = self.faults = 0.0

    @classmethod
    def now(cls) -> Counters:
        counters, me = cls(), psutil.Process()
        for process in [me, *(p for p in me.children(recursive=True) if p.pid not in NOT_COUNTED)]:
            try:
                times, io, faults = process.cpu_times(), process.io_counters(), _minor_faults(process.pid)
            except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                continue
            counters.faults += faults
            if process.pid == me.pid:
                counters.main += times.user + times.system
            else:
                counters.workers += times.user + times.system
            counters.read += io.read_chars
        return counters


def _minor_faults(pid: int) -> int:
    """Minor page faults of a live process so far: field 10 of /proc/PID/stat (after the command name)."""
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


def measure(
    name: str,
    workers: int,
    loader: Iterable[dict],
    close: Callable[[], None],
    nbytes: float | None = None,
    warm: bool = True,
) -> dict:
    """Steady state: one warm-up epoch (starts the persistent workers; skipped where a patch takes ~1 s
    anyway), then one measured epoch; the counters are read at its end, while the workers are alive."""
    for _ in loader if warm else ():
        pass
    start, wall0, patches = Counters.now(), time.perf_counter(), 0
    for batch in loader:
        patches += len(batch["image"])
        assert batch["image"].shape[1:] == (1, PATCH, PATCH, PATCH) and batch["image"].dtype == torch.float16
    wall, end = time.perf_counter() - wall0, Counters.now()
    close()
    read = nbytes if nbytes is not None else (end.read - start.read) / patches
    main, in_workers = (end.main - start.main) / patches, (end.workers - start.workers) / patches
    row = {"what": name, "workers": workers, "patches": patches, "cpu_ms": 1e3 * (main + in_workers)}
    row |= {"main_ms": 1e3 * main, "faults": (end.faults - start.faults) / patches}
    row |= {"wall_ms": 1e3 * wall / patches, "per_s": patches / wall, "read_mb": read / 1e6}
    print(f"{name:40s} {workers} workers: {row['cpu_ms']:.1f} ms CPU/patch, {row['per_s']:.1f} patches/s", flush=True)
    return row


def ours(name: str, dataset: PatchDataset, workers: int, nbytes: float | None = None) -> dict:
    loader = make_loader(dataset, batch_size=BATCH, num_workers=workers)
    return measure(name, workers, loader, loader.close, nbytes)


def baseline(name: str, dataset: Dataset, workers: int, warm: bool = True) -> dict:
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=True,
                        worker_init_fn=_one_thread, generator=torch.Generator().manual_seed(0))  # fmt: skip
    return measure(name, workers, loader, lambda: loader._iterator._shutdown_workers(), warm=warm)


def _one_thread(_: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _warm_page_cache(folders: list[Path]) -> None:
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                path.read_bytes()


# ---------------------------------------------------------------------------------------------- baselines
def export_nnssl(table: pd.DataFrame, volumes: list, work: Path) -> list[Path]:
    """The preprocessed volumes as nnssl writes its cases (three .b2nd files each): the nnssl baseline's input."""
    folder = work / "nnssl"
    names = [row.id.replace("/", "__") for row in table.itertuples()]
    if not (folder / f"{names[-1]}__anon.b2nd").is_file():  # nnssl's writes take ~3.6 s CPU per case
        for name, volume in zip(names, volumes, strict=True):
            write_case(folder, name, volume)
    return [folder / name for name in names]


def export_nifti(table: pd.DataFrame, volumes: list, work: Path) -> list[tuple[Path, Path]]:
    """The preprocessed volumes as .nii.gz (image float32, mask code uint8): the per-sample baseline's input."""
    out = []
    for row, volume in zip(table.itertuples(), volumes, strict=True):
        base = work / "nifti" / row.id.replace("/", "__")
        base.parent.mkdir(parents=True, exist_ok=True)
        affine = np.stack(row.affine).astype(float)
        image, masks = Path(f"{base}_image.nii.gz"), Path(f"{base}_masks.nii.gz")
        nib.save(nib.Nifti1Image(volume.image.astype(np.float32), affine), image)
        code = volume.mask_code
        nib.save(nib.Nifti1Image(code, affine), masks)
        out.append((image, masks))
    return out


def _random_crop(arrays: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Pad to at least the patch (image 0, valid 0 outside), then a uniform crop: the same output as ours."""
    shape = np.array(arrays["image"].shape)
    pad = [(0, max(PATCH - s, 0)) for s in shape]
    arrays = {k: np.pad(v, pad) for k, v in arrays.items()}
    start = [int(rng.integers(0, max(s - PATCH, 0) + 1)) for s in shape]
    box = tuple(slice(b, b + PATCH) for b in start)
    return {k: torch.from_numpy(np.ascontiguousarray(v[box])[None]) for k, v in arrays.items()}


class NiftiPatches(Dataset):
    def __init__(self, files: list[tuple[Path, Path]]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, masks_path = self.files[index]
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path))).astype(np.float16)
        code = sitk.GetArrayFromImage(sitk.ReadImage(str(masks_path)))
        arrays = {"image": image, "anatomy": code & 1, "deface": (code >> 1) & 1, "valid": np.ones_like(code)}
        return _random_crop(arrays, np.random.default_rng(index))


class MonaiPatches(Dataset):
    def __init__(self, images: list) -> None:
        from monai import transforms as mt

        keys = ["image", "anatomy", "deface"]
        self.items = [{"image": str(i.image), "anatomy": str(i.anatomy_mask or ""), "deface": str(i.deface_mask or "")}
                      for i in images]  # fmt: skip
        self.items = [{k: v for k, v in item.items() if v} for item in self.items]
        self.transform = mt.Compose([
            mt.LoadImaged(keys, image_only=True, allow_missing_keys=True),
            mt.EnsureChannelFirstd(keys, allow_missing_keys=True),
            mt.Orientationd(keys, axcodes="RAS", allow_missing_keys=True),
            mt.Spacingd(keys, pixdim=1.0, mode=("bilinear", "nearest", "nearest"), allow_missing_keys=True),
            mt.NormalizeIntensityd("image", nonzero=True),
            mt.SpatialPadd(keys, spatial_size=PATCH, allow_missing_keys=True),
            mt.RandSpatialCropd(keys, roi_size=PATCH, random_size=False, allow_missing_keys=True),
        ])  # fmt: skip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        out = self.transform(self.items[index])
        image = torch.as_tensor(np.asarray(out["image"]), dtype=torch.float16)
        masks = {k: torch.as_tensor(np.asarray(out[k]), dtype=torch.uint8) if k in out else torch.zeros_like(image,
                 dtype=torch.uint8) for k in ("anatomy", "deface")}  # fmt: skip
        return {"image": image, **masks, "valid": torch.ones_like(image, dtype=torch.uint8)}


# ---------------------------------------------------------------------------------------------- object storage
class SlowS3FileSystem(s3fs.S3FileSystem):
    """s3fs with a fixed delay before every request: a stand-in for a remote object store's latency."""

    protocol = ("slows3",)
    latency_s = 0.0

    async def _call_s3(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(self.latency_s)
        return await super()._call_s3(method, *args, **kwargs)


def s3_rows(out: Path, table: pd.DataFrame, latency_ms: float) -> list[dict]:
    """Zarr and tar shards over a moto server (its own process, so its CPU is not counted), 2 workers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    NOT_COUNTED.add(server.pid)
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench"}
    try:
        fs = s3fs.S3FileSystem(**options)
        for _ in range(100):
            try:
                fs.mkdir("bench")
                break
            except OSError:
                time.sleep(0.1)
        for part in ("manifest.parquet", "store.zarr", "shards"):
            fs.put(str(out / part), f"bench/{part}", recursive=True)
        fsspec.register_implementation("slows3", SlowS3FileSystem, clobber=True)
        rows = []
        for latency in (0.0, latency_ms):
            SlowS3FileSystem.latency_s = latency / 1e3
            SlowS3FileSystem.clear_instance_cache()
            for store, column in (("zarr", "zarr_nbytes"), ("wds", "wds_nbytes")):  # the lz4 store
                dataset = PatchDataset("slows3://bench/manifest.parquet", PATCH, store=store, crops_per_volume=1,
                                       foreground_bias=0.9, storage_options=options, prefetch=4)  # fmt: skip
                name = f"loader {store}, c=1, S3 +{latency:.0f} ms/request"
                rows.append(ours(name, dataset, 2, nbytes=float(table[column].mean())))
        return rows
    finally:
        server.terminate()
        server.wait()


# ---------------------------------------------------------------------------------------------- report
def print_floor(floors: dict[str, dict[str, float]], rows: list[dict]) -> None:
    """The floor per delivered patch (one crop per read), beside the in-process loader rows of the same run."""
    print("\n| per 160^3 patch, one thread, one crop per read | CPU ms |\n|---|---:|")
    for cname, floor in floors.items():
        print(f"| floor: blosc {cname} decode of image + mask code into reused buffers | {floor['decode']:.2f} |")
    print(f"| floor: CRC-32C of the stored (lz4) bytes | {floors['lz4']['crc32c']:.2f} |")
    print(f"| floor: NaN/Inf check of the float16 image | {floors['lz4']['finite']:.2f} |")
    print(f"| floor: copy of the float16 image | {floors['lz4']['copy']:.2f} |")
    for row in rows:
        if row["what"].endswith("in-process"):
            print(f"| {row['what']} (read + checks + crop + batch) | {row['cpu_ms']:.2f} |")


def print_table(rows: list[dict], latency_ms: float) -> None:
    df = pd.DataFrame(rows)
    nifti = df[df["what"].str.startswith("NIfTI")].set_index("workers")["cpu_ms"]
    patch_mb = PATCH**3 * STORED_BYTES_PER_VOXEL / 1e6
    print(f"\n{PATCH}^3 patches, batch {BATCH}; patch bytes = {patch_mb:.1f} MB (float16 image + uint8 mask "
          f"code); CPU x = NIfTI CPU / row CPU at the same worker count; S3 latency {latency_ms:.0f} ms\n")  # fmt: skip
    print("| what | workers | patches | CPU ms/patch | of which main | CPU x vs NIfTI | page faults/patch "
          "| wall ms/patch | patches/s | read MB/patch | read / patch bytes |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in df.sort_values(["workers", "what"], kind="stable").itertuples():
        ratio = f"{nifti[r.workers] / r.cpu_ms:.1f}x" if r.workers in nifti else "-"
        print(f"| {r.what} | {r.workers} | {r.patches} | {r.cpu_ms:.1f} | {r.main_ms:.1f} | {ratio} | {r.faults:.0f} "
              f"| {r.wall_ms:.1f} | {r.per_s:.1f} | {r.read_mb:.1f} | {r.read_mb / patch_mb:.2f} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
