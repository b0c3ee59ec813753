"""Re-read every stored sample and compare it with its manifest row (checksum of the decoded arrays).

A flipped byte in a store either breaks the decode (blosc, npy or tar header) or changes the decoded
arrays, so each corruption shows up as one problem naming the volume and the file.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from openmind_tools import wds_store, zarr_store
from openmind_tools.manifest_io import MANIFEST, read_table


def verify(out: str | Path, progress: bool = True) -> list[str]:
    """Problems found in `out` (empty when every sample of every store matches the manifest)."""
    out = Path(out)
    manifest, _ = read_table(out / MANIFEST)
    problems: list[str] = []
    if "zarr_store" in manifest:
        for row in tqdm(manifest.itertuples(), total=len(manifest), desc="verify zarr", disable=not progress):
            root = out / row.zarr_store
            try:
                got = zarr_store.read_volume(str(root), row.id, tuple(row.shape)).checksum()
            except Exception as e:  # any decode failure is a finding, not a crash
                problems.append(f"{row.id}: {root / row.zarr_array}: unreadable ({type(e).__name__}: {e})")
                continue
            if got != row.checksum:
                problems.append(f"{row.id}: {root / row.zarr_array}: checksum {got} != manifest {row.checksum}")
    if "wds_shard" in manifest:
        problems += _verify_shards(out, manifest, progress)
    return problems


def _verify_shards(out: Path, manifest: pd.DataFrame, progress: bool) -> list[str]:
    problems = []
    for shard, rows in tqdm(manifest.groupby("wds_shard"), desc="verify shards", disable=not progress):
        expected = dict(zip(rows["id"], rows["checksum"], strict=True))
        seen = set()
        try:
            for volume_id, volume, _ in wds_store.iter_shard(out / shard):
                seen.add(volume_id)
                if volume_id not in expected:
                    problems.append(f"{out / shard}: holds {volume_id}, which the manifest places elsewhere")
                elif volume.checksum() != expected[volume_id]:
                    problems.append(f"{volume_id}: {out / shard}: checksum differs from the manifest")
        except Exception as e:
            problems.append(f"{out / shard}: unreadable ({type(e).__name__}: {e})")
        problems += [f"{vid}: missing from {out / shard}" for vid in sorted(set(expected) - seen)]
    return problems
