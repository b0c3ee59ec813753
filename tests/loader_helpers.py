"""Small real stores for the loader tests: volumes cut from nilearn's MNI152 T1 at 2 mm, with the grey
matter map as anatomy and a face slab as deface, written through zarr_store / wds_store like the converter.

Small volumes (~25-45 voxels a side, patch 32) keep a torchrun run with workers to seconds on two cores.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nilearn.datasets import MNI152_FILE_PATH

from openmind_tools import wds_store, zarr_store
from openmind_tools.manifest_io import write_table
from openmind_tools.volume import Volume

SETTINGS_HASH = "loader-test-0001"
PATCH = 32


def mni_volumes(count: int, seed: int = 0) -> dict[str, Volume]:
    """`count` volumes of different shapes cut from the 2 mm MNI head; ids look like the corpus's."""
    t1 = np.asarray(nib.load(MNI152_FILE_PATH).dataobj, dtype=np.float32)[::2, ::2, ::2]
    gm_path = Path(MNI152_FILE_PATH).parent / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
    gm = np.asarray(nib.load(gm_path).dataobj, dtype=np.float32)[::2, ::2, ::2]
    head = t1 > 20
    image = np.where(head, (t1 - t1[head].mean()) / t1[head].std(), 0).astype(np.float16)
    rng = np.random.default_rng(seed)
    volumes = {}
    for i in range(count):
        size = rng.integers(25, 46, 3)
        start = [int(rng.integers(5, d - s - 5)) for d, s in zip(image.shape, size, strict=True)]
        box = tuple(slice(b, b + s) for b, s in zip(start, size, strict=True))
        deface = np.zeros(size, dtype=np.uint8)
        deface[:, -4:, :6] = 1
        volume_id = f"ds{i % 3:06d}/sub-{i:02d}/anat/sub-{i:02d}_T1w"
        volumes[volume_id] = Volume.from_masks(image[box].copy(), (gm[box] > 60).astype(np.uint8), deface)
    return volumes


def write_store(out: Path, volumes: dict[str, Volume], shards: int = 3, settings_hash: str = SETTINGS_HASH) -> Path:
    """Write `volumes` as a Zarr store and `shards` tar shards plus a manifest, as the converter lays them out."""
    out.mkdir(parents=True, exist_ok=True)
    ids = sorted(volumes)
    rows = []
    for index, part in enumerate(np.array_split(np.arange(len(ids)), shards)):
        members = [ids[i] for i in part]
        name = wds_store.shard_name(index)
        sizes = wds_store.write_shard(
            out / name, ((i, volumes[i], {"id": i, "settings_hash": settings_hash}) for i in members)
        )
        for volume_id in members:
            attrs = {"id": volume_id, "settings_hash": settings_hash}
            rows.append(
                {
                    "id": volume_id,
                    "dataset": volume_id.split("/")[0],
                    "modality": "T1w",
                    "shape": list(volumes[volume_id].image.shape),
                    "settings_hash": settings_hash,
                    "zarr_store": "store.zarr",
                    "zarr_nbytes": zarr_store.write_volume(out / "store.zarr", volume_id, volumes[volume_id], attrs),
                    **wds_store.manifest_cells(name, volume_id, sizes[wds_store.sample_key(volume_id)]),
                }
            )
    zarr_store.write_hierarchy(out / "store.zarr", ids)
    manifest = out / "manifest.parquet"
    meta = {"settings_hash": settings_hash, "settings": {}, "formats": ["zarr", "wds"]}
    write_table(pd.DataFrame(rows), manifest, meta)
    return manifest


def rewrite_manifest(manifest: Path, target: Path, change: dict | None = None, extra_rows: list | None = None) -> Path:
    """A copy of `manifest` (beside it, so store paths still resolve) with columns changed or rows added."""
    rows = pd.read_parquet(manifest)
    for column, value in (change or {}).items():
        rows[column] = value
    if extra_rows:
        rows = pd.concat([rows, pd.DataFrame(extra_rows)], ignore_index=True)
    write_table(rows, target, {"settings_hash": str(rows["settings_hash"].iloc[0]), "settings": {}, "formats": []})
    return target
