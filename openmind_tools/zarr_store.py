"""Zarr v3 layout of converted volumes: the only module that knows it.

One array per volume at `volumes/<volume id>`, shape (2, X, Y, Z) float16 in ONE chunk: channel 0 is
the z-scored image, channel 1 the mask code (bit 0 anatomy, bit 1 deface; 0..3 are exact in float16).
A 160^3 patch is nearly a whole 1 mm brain, so one object and one decode per volume beats any chunk
grid; blosc lz4 + byte shuffle decodes image and masks together in ~4.5 ms on one core, where image
and a separate uint8 mask array took ~24 ms (benchmarks/convert_bench.py has the numbers). No group
lists the volumes: the manifest is the index. Plain `zarr.open_array(store, path=...)` reads every
array; `read_volume` skips zarr's per-call overhead by fetching the one chunk object and decoding it
with numcodecs, given the shape the manifest recorded.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec

from openmind_tools.errors import StoreError
from openmind_tools.files import file_problem, unreadable_object
from openmind_tools.volume import Volume

CHUNK_KEY = "c/0/0/0/0"  # the only chunk of a (2, X, Y, Z) array with chunk_key_encoding "default"
_BLOSC = {"cname": "lz4", "clevel": 5}  # with byte shuffle; measured in benchmarks/convert_bench.py
_COMPRESSOR = BloscCodec(**_BLOSC, shuffle="shuffle", typesize=2)


def array_path(volume_id: str) -> str:
    return f"volumes/{volume_id}"


def pack(volume: Volume) -> np.ndarray:
    """The stored (2, X, Y, Z) float16 array: image, then mask code."""
    out = np.empty((2, *volume.image.shape), np.float16)  # C order: the chunk's byte order
    out[0], out[1] = volume.image, volume.code
    return out


def unpack(data: np.ndarray) -> Volume:
    return Volume(data[0], data[1])


def write_volume(root: str | Path, volume_id: str, volume: Volume, attrs: dict[str, Any]) -> int:
    """Write one packed volume under a temporary name, then rename it into place; returns stored bytes.

    A reader (or a resumed run) never sees a half-written array: either the rename happened or not.
    Writing the chunk with numcodecs directly saves ~70 ms per volume of zarr's async write path; a
    test reads it back through plain zarr.
    """
    root = Path(root)
    final = root / array_path(volume_id)
    tmp = root / ".tmp" / uuid.uuid4().hex
    data = pack(volume)
    zarr.create_array(  # metadata only: the one chunk is encoded here, as zarr would, without its event loop
        store=str(tmp),
        shape=data.shape,
        chunks=data.shape,
        dtype="float16",
        compressors=_COMPRESSOR,
        chunk_key_encoding={"name": "default", "separator": "/"},
        attributes=attrs,
        zarr_format=3,
    )
    chunk = tmp / CHUNK_KEY
    chunk.parent.mkdir(parents=True)
    chunk.write_bytes(
        numcodecs.blosc.compress(data, _BLOSC["cname"].encode(), _BLOSC["clevel"], numcodecs.blosc.SHUFFLE)
    )
    nbytes = chunk.stat().st_size
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return nbytes


def read_volume(
    root: str, volume_id: str, shape: tuple[int, int, int], fs: fsspec.AbstractFileSystem | None = None
) -> Volume:
    """Fetch and decode the volume's one chunk object; `shape` is the manifest's (X, Y, Z)."""
    url = f"{str(root).rstrip('/')}/{array_path(volume_id)}/{CHUNK_KEY}"
    fs = fs or fsspec.core.url_to_fs(url)[0]
    if problem := unreadable_object(fs, url):
        raise StoreError(f"volume {volume_id}: {url}: {problem}")
    try:
        raw = fs.cat_file(url)
    except FileNotFoundError:
        raise StoreError(f"volume {volume_id}: no chunk at {url}") from None
    data = np.empty((2, *shape), np.float16)  # writable, so torch can wrap crops of it without a copy
    nbytes = int.from_bytes(raw[4:8], "little") if len(raw) >= 16 else -2  # blosc header: uncompressed size
    if nbytes != data.nbytes:
        raise StoreError(
            f"volume {volume_id}: {url} holds {nbytes // 2} values, the manifest shape {shape} needs {data.size}"
        )
    numcodecs.blosc.decompress(raw, data)
    return unpack(data)


def is_stored(root: str | Path, volume_id: str) -> bool:
    """Whether the volume's chunk is on local disk (a stat, no read): a rerun's check of its journal."""
    return file_problem(Path(root) / array_path(volume_id) / CHUNK_KEY) is None


def delete_volume(root: str | Path, volume_id: str) -> None:
    """Remove a (damaged) volume's array so the next run converts it again."""
    shutil.rmtree(Path(root) / array_path(volume_id), ignore_errors=True)


def open_volume(root: str | Path, volume_id: str) -> zarr.Array:
    """The stored array through plain zarr (for people, notebooks and tests; the loader uses read_volume)."""
    return zarr.open_array(store=str(root), path=array_path(volume_id), mode="r")


def clean_partial(root: str | Path) -> None:
    """Drop arrays a killed run left under their temporary names."""
    shutil.rmtree(Path(root) / ".tmp", ignore_errors=True)
