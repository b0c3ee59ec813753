"""Zarr v3 layout of converted volumes: the only module that knows it.

One array per volume at `volumes/<volume id>`, shape (2, X, Y, Z) float16 in ONE chunk: channel 0 is
the z-scored image, channel 1 the mask code (bit 0 anatomy, bit 1 deface; 0..3 are exact in float16).
The chunk is blosc, then zarr v3's `crc32c` codec (a little-endian CRC-32C of the blosc bytes appended), so
plain zarr-python and tensorstore check it too; `read_volume` checks it (0.34 ms per 3 MB chunk) and the
blosc header's sizes against the chunk and the manifest before it decompresses, so no damaged chunk
reaches blosc, which trusts those sizes (a chunk cut short used to end the reader with SIGSEGV).
A 160^3 patch is nearly a whole 1 mm brain, so one object and one decode per volume beats any chunk
grid; blosc lz4 + byte shuffle decodes image and masks together in ~4.5 ms on one core, where image
and a separate uint8 mask array took ~24 ms (benchmarks/convert_bench.py has the numbers). No group
lists the volumes: the manifest is the index. Plain `zarr.open_array(store, path=...)` reads every
array; `read_volume` skips zarr's per-call overhead by fetching the one chunk object and decoding it
with numcodecs, given the shape the manifest recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec
import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from openmind_tools.errors import StoreError
from openmind_tools.files import file_problem, unreadable_object
from openmind_tools.volume import Volume

CHUNK_KEY = "c/0/0/0/0"  # the only chunk of a (2, X, Y, Z) array with chunk_key_encoding "default"
_BLOSC = {"cname": "lz4", "clevel": 5}  # with byte shuffle; measured in benchmarks/convert_bench.py
_COMPRESSOR = BloscCodec(**_BLOSC, shuffle="shuffle", typesize=2)
STORE_FORMAT = "openmind-zarr/2"  # 2: crc32c after blosc. An array's attributes["store_format"] says which it is
_BLOSC_HEADER = 16  # bytes: version, flags, typesize, then uncompressed size, block size, compressed size (LE)


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
        compressors=(_COMPRESSOR, Crc32cCodec()),
        chunk_key_encoding={"name": "default", "separator": "/"},
        attributes={**attrs, "store_format": STORE_FORMAT},
        zarr_format=3,
    )
    chunk = tmp / CHUNK_KEY
    chunk.parent.mkdir(parents=True)
    body = numcodecs.blosc.compress(data, _BLOSC["cname"].encode(), _BLOSC["clevel"], numcodecs.blosc.SHUFFLE)
    chunk.write_bytes(body + google_crc32c.value(body).to_bytes(4, "little"))
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
    numcodecs.blosc.decompress(check_chunk(raw, data.nbytes, f"volume {volume_id}: {url}"), data)
    return unpack(data)


def check_chunk(raw: bytes, nbytes: int, where: str) -> bytes:
    """The blosc bytes of a stored chunk, after checking its CRC-32C and that blosc's header matches both the
    chunk's length and the `nbytes` the manifest's shape needs; anything else is a StoreError saying what."""
    if len(raw) < _BLOSC_HEADER + 4:
        raise StoreError(f"{where}: {len(raw)} bytes, too short to be a chunk (cut short?)")
    body, stored = raw[:-4], int.from_bytes(raw[-4:], "little")
    computed = google_crc32c.value(body)
    if computed != stored:
        raise StoreError(f"{where}: damaged chunk: its crc32c is {computed:08x}, it records {stored:08x} (a changed "
                         "byte, or a chunk cut short or padded)")  # fmt: skip
    values, compressed = int.from_bytes(body[4:8], "little"), int.from_bytes(body[12:16], "little")
    if compressed != len(body):
        raise StoreError(f"{where}: blosc header says {compressed} bytes, the chunk holds {len(body)}")
    if values != nbytes:
        raise StoreError(f"{where}: holds {values // 2} values, the manifest's shape needs {nbytes // 2}")
    return body


def stored_shape(root: str, volume_id: str, fs: fsspec.AbstractFileSystem | None = None) -> tuple[int, ...]:
    """The (X, Y, Z) the array's own metadata records (verify compares it with the manifest's)."""
    url = f"{str(root).rstrip('/')}/{array_path(volume_id)}/zarr.json"
    fs = fs or fsspec.core.url_to_fs(url)[0]
    try:
        shape = json.loads(fs.cat_file(url))["shape"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"volume {volume_id}: {url}: no readable array metadata ({type(e).__name__}: {e})") from None
    return tuple(int(v) for v in shape[1:])


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
