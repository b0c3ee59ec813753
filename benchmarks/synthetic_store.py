"""Write N OpenMind-shaped volumes through the project's own store and manifest writers, no NIfTI read.

Shapes are those of cropped 1 mm heads (135-175 x 165-205 x 135-175 voxels; `--small` gives 24-40 for
CPU tests); the image is a smooth random field z-scored inside a smooth random anatomy blob, and the
deface mask a slab at the face. Deterministic per seed. Both stores (Zarr and tar shards) and a
manifest the loader and trainer read as they read a converted corpus. Imports neither SimpleITK nor
nibabel, so it runs where only the loader's dependencies are installed (a GPU machine, say).

    python benchmarks/synthetic_store.py 64 /tmp/synthetic [--seed 0] [--small] [--shard-mb 512]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from openmind_tools import wds_store, zarr_store
from openmind_tools.manifest_io import MANIFEST, write_table
from openmind_tools.volume import Volume

SETTINGS_HASH = "synthetic-0001"
MODALITIES = ("T1w", "T2w", "FLAIR", "inplaneT1", "inplaneT2", "MP2RAGE", "ADC", "DWI")  # the mae8 set
_FULL, _SMALL = ((135, 175), (165, 205), (135, 175)), ((24, 40), (24, 40), (24, 40))


def synthetic_volume(rng: np.random.Generator, shape: tuple[int, int, int]) -> Volume:
    """A smooth random image z-scored inside a smooth blob (anatomy), with a defaced slab at the face."""
    coarse = tuple(max(4, s // 8) for s in shape)
    zoom = [s / c for s, c in zip(shape, coarse, strict=True)]
    field = ndimage.zoom(rng.normal(size=coarse).astype(np.float32), zoom, order=1)
    field = np.pad(field, [(0, max(0, s - f)) for s, f in zip(shape, field.shape, strict=True)], mode="edge")
    field = field[: shape[0], : shape[1], : shape[2]]
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij"))
    radius = np.sqrt((grid**2).sum(0)) + 0.25 * field
    anatomy = radius < 0.8
    image = np.where(anatomy, field + 2.0 * (1 - radius), 0).astype(np.float32)
    inside = image[anatomy]
    image = np.where(anatomy, (image - inside.mean()) / max(float(inside.std()), 1e-6), 0).astype(np.float16)
    deface = np.zeros(shape, dtype=np.uint8)
    deface[:, -max(2, shape[1] // 8) :, : max(2, shape[2] // 4)] = 1  # anterior-inferior slab
    return Volume.from_masks(image, anatomy.astype(np.uint8), deface)


def write_synthetic_store(count: int, out: str | Path, *, seed: int = 0, small: bool = False,
                          shard_bytes: int = 512 * 2**20) -> Path:  # fmt: skip
    """Write `count` volumes into `out` (store.zarr, shards/, manifest.parquet); returns the manifest path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ranges = _SMALL if small else _FULL
    rows, pending, pending_bytes = [], [], 0

    def flush() -> None:
        name = wds_store.shard_name(len({r["wds_shard"] for r in rows}))
        samples = ((i, v, {"id": i, "settings_hash": SETTINGS_HASH}) for i, v, _ in pending)
        sizes = wds_store.write_shard(out / name, samples)
        for volume_id, _, row in pending:
            rows.append({**row, **wds_store.manifest_cells(name, volume_id, sizes[wds_store.sample_key(volume_id)])})
        pending.clear()

    for i in range(count):
        shape = tuple(int(rng.integers(low, high + 1)) for low, high in ranges)
        volume = synthetic_volume(rng, shape)
        dataset, subject = f"ds{i % 40:06d}", f"sub-{i // 40 + 1:02d}"
        volume_id = f"{dataset}/{subject}/anat/{subject}_run-{i:05d}_{MODALITIES[i % len(MODALITIES)]}"
        attrs = {"id": volume_id, "settings_hash": SETTINGS_HASH}
        row = {"id": volume_id, "dataset": dataset, "subject": subject, "modality": MODALITIES[i % len(MODALITIES)],
               "shape": list(shape), "settings_hash": SETTINGS_HASH, "checksum": volume.checksum(),
               "zarr_store": "store.zarr", "zarr_array": zarr_store.group_path(volume_id),
               "zarr_nbytes": zarr_store.write_volume(out / "store.zarr", volume_id, volume, attrs),
               "age": float(rng.integers(18, 90)), "sex": str(rng.choice(["F", "M"])),
               "image_quality_score": int(rng.integers(1, 6)), "has_anatomy_mask": True}  # fmt: skip
        pending.append((volume_id, volume, row))
        pending_bytes += wds_store.sample_nbytes(shape)
        if pending_bytes >= shard_bytes:
            flush()
            pending_bytes = 0
    if pending:
        flush()
    zarr_store.write_hierarchy(out / "store.zarr", [row["id"] for row in rows])
    manifest = out / MANIFEST
    meta = {"settings_hash": SETTINGS_HASH, "settings": {"synthetic": True}, "formats": ["zarr", "wds"]}
    write_table(pd.DataFrame(rows).sort_values("id", ignore_index=True), manifest, meta)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("count", type=int, help="volumes to write")
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="24-40 voxels a side (CPU tests) instead of head-sized")
    p.add_argument("--shard-mb", type=float, default=512, help="tar shard size in MB (default 512)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    manifest = write_synthetic_store(args.count, args.out, seed=args.seed, small=args.small,
                                     shard_bytes=int(args.shard_mb * 2**20))  # fmt: skip
    print(f"{args.count} synthetic volumes -> {manifest} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
