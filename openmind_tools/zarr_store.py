"""Zarr v3 layout of converted volumes: the only module that knows it.

One group per volume at `group_path(id)`: `volumes/` then the id's folders, its last part ending in `.vol`
(`volumes/ds000101/sub-01/anat/sub-01_T1w.vol`), each part percent-encoded where it could clash (`%`, a
trailing `.vol`, `zarr.json`, a `__` prefix, dots alone, characters outside `[A-Za-z0-9._-]`). So no id can reach
another's location: `x/sub-08_T1w` and `x/sub-08_T1w/image` are two groups, and a volume's group never holds
another volume. It holds two arrays of one chunk each: `image` (X, Y, Z) float16,
the z-scored image, and `mask` (X, Y, Z) uint8, the mask code (bit 0 anatomy, bit 1 deface). Each chunk is blosc
(lz4 by default; `CODECS`), then zarr v3's `crc32c` codec (a little-endian CRC-32C of the blosc bytes appended), so
plain zarr-python and tensorstore check it too. `read` checks each chunk's CRC and its blosc header's sizes
against the chunk and the manifest's shape before it decompresses, so no damaged chunk reaches blosc, which
trusts those sizes (a chunk cut short used to end the reader with SIGSEGV). Store format 2 held the code as a
float16 second channel of one array: twice the code's bytes, and a float-to-uint8 pass over every crop that cost
more than the decode. The two objects are fetched together (`Reader.cat`: one round trip on S3), and a 160^3
patch is nearly a whole 1 mm brain, so one chunk per array beats any chunk grid. The store is a valid Zarr
hierarchy (the root, `volumes/` and every folder between have group metadata; no consolidated metadata, which
would be one 114k-entry document), so zarr-python and tensorstore list and open every volume without the
manifest; the manifest stays the index the loader uses. `read` skips zarr's per-call overhead by fetching the
chunk objects and decoding them with numcodecs, given the manifest's shape.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from openmind_tools.buffers import BufferPool
from openmind_tools.errors import ConfigError, StoreError
from openmind_tools.files import file_problem
from openmind_tools.reads import Buffer, Reader
from openmind_tools.storage import Place
from openmind_tools.volume import Volume, VolumeRef, finite

NAME = "zarr"
ARRAYS = {"image": np.dtype(np.float16), "mask": np.dtype(np.uint8)}  # the arrays of a volume's group, in order
CHUNKS = {name: f"{name}/c/0/0/0" for name in ARRAYS}  # each array's one chunk, chunk_key_encoding "default"
# --codec: (blosc cname, clevel), measured on the demo heads (benchmarks/codec_bench.py, convert_bench.py,
# loader_bench.py): lz4hc-5 stores 0.78x the bytes of lz4-5 and its patches loaded 3-9 ms (10-25%) faster at one
# worker in four runs, but its encode (283 against 15 ms) takes a conversion from 1.3-1.5x to 2.2x the SimpleITK
# floor, past the 1.3x target. So lz4 is the default (a conversion is time a user waits), lz4hc repays its encode
# after 30-90 reads and suits long pretraining runs and bandwidth-bound storage, and zstd-3 is for where bytes are
# scarcest (0.70x lz4's, at 3.3x its decode time).
CODECS = {"lz4": ("lz4", 5), "lz4hc": ("lz4hc", 5), "zstd": ("zstd", 3)}
DEFAULT_CODEC = "lz4"
# 4: a Zarr hierarchy, encoded group paths; 3: uint8 mask array; 2: crc32c after blosc. The root's and every
# volume group's attributes say which
STORE_FORMAT = "openmind-zarr/4"
MANIFEST_COLUMNS = ("zarr_store",)  # where a manifest row says its volume lives
_BLOSC_HEADER = 16  # bytes: version, flags, typesize, then uncompressed size, block size, compressed size (LE)
_METADATA_BYTES = 1 << 16  # read of an array's zarr.json (ours are ~1 KB; more reads as damaged json)


VOLUME_SUFFIX = ".vol"  # ends the name of a volume's group, and no other group's
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
_GROUP_METADATA = '{"zarr_format": 3, "node_type": "group", "attributes": %s}'


def group_path(volume_id: str) -> str:
    """Where a volume's group lives in the store: a place no other id maps to (see the module docstring)."""
    names = [_node_name(part) for part in volume_id.split("/")]
    return "/".join(["volumes", *names[:-1], names[-1] + VOLUME_SUFFIX])


def _node_name(part: str) -> str:
    """`part` as a Zarr node name that is not reserved and cannot end in VOLUME_SUFFIX; percent-encoding the
    characters that would (and `%` always) keeps the map from ids to paths one-to-one."""
    if not part:
        raise ValueError("a volume id has no empty path part")
    name = "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in part)
    if name.endswith(VOLUME_SUFFIX) or name == "zarr.json":
        cut = name.rindex(".")
        name = f"{name[:cut]}%2E{name[cut + 1 :]}"
    if name.startswith("__"):
        name = "%5F" + name[1:]
    if set(name) == {"."}:
        name = "%2E" * len(name)
    return name


def write_volume(
    root: str | Path | Place, volume_id: str, volume: Volume, attrs: dict[str, Any], codec: str = DEFAULT_CODEC
) -> int:
    """Write one volume's group so that no reader or resumed run sees half of it; returns stored bytes.

    On local disk the group is written under a temporary name, then renamed into place. An object store has no
    rename: the group is built in this process's temporary folder and its objects are uploaded chunks first and
    the group's zarr.json last, so `stored` (which needs every object) never counts a volume cut off mid-upload.
    Writing the chunks with numcodecs directly saves ~70 ms per volume of zarr's async write path; a test reads
    them back through plain zarr.
    """
    if codec not in CODECS:
        raise ConfigError(f"codec: expected one of {sorted(CODECS)}, got {codec!r}")
    root = Place.of(root)
    final = root / group_path(volume_id)
    if not root.local:
        with tempfile.TemporaryDirectory(prefix="openmind-volume-") as staging:
            nbytes = _encode_group(Path(staging), volume, attrs, codec)
            arrays = [*CHUNKS.values(), *(f"{name}/zarr.json" for name in ARRAYS)]
            root.fs.pipe({(final / n).path: Path(staging, n).read_bytes() for n in arrays})  # concurrent PUTs
            root.fs.pipe_file((final / "zarr.json").path, Path(staging, "zarr.json").read_bytes())
        return nbytes
    staging = Path(_partial_dir(root)) / uuid.uuid4().hex
    nbytes = _encode_group(staging, volume, attrs, codec)
    Path(final.path).parent.mkdir(parents=True, exist_ok=True)
    if os.path.exists(final.path):
        shutil.rmtree(final.path)
    os.replace(staging, final.path)
    return nbytes


def _encode_group(folder: Path, volume: Volume, attrs: dict[str, Any], codec: str) -> int:
    """The volume's group as files in local `folder`; returns the chunks' bytes."""
    cname, clevel = CODECS[codec]
    group = zarr.create_group(store=str(folder), attributes={**attrs, "store_format": STORE_FORMAT}, zarr_format=3)
    nbytes = 0
    for (name, dtype), data in zip(ARRAYS.items(), (volume.image, volume.mask_code), strict=True):
        data = np.ascontiguousarray(data, dtype)
        shuffle = "shuffle" if dtype.itemsize > 1 else "noshuffle"
        group.create_array(  # metadata only: the one chunk is encoded here, as zarr would, without its event loop
            name,
            shape=data.shape,
            chunks=data.shape,
            dtype=dtype,
            compressors=(
                BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle, typesize=dtype.itemsize),
                Crc32cCodec(),
            ),  # fmt: skip
            chunk_key_encoding={"name": "default", "separator": "/"},
        )
        chunk = folder / CHUNKS[name]
        chunk.parent.mkdir(parents=True)
        mode = numcodecs.blosc.SHUFFLE if dtype.itemsize > 1 else numcodecs.blosc.NOSHUFFLE
        body = numcodecs.blosc.compress(data, cname.encode(), clevel, mode)
        chunk.write_bytes(body + google_crc32c.value(body).to_bytes(4, "little"))
        nbytes += chunk.stat().st_size
    return nbytes


# ---------------------------------------------------------------------------------------------- the loader's interface
def locate(row: Any, resolve: Callable[[str], str]) -> tuple[str, None, None]:
    """(url, span, member checksums) of a manifest row's volume: the store's root; Zarr needs nothing else."""
    return resolve(row.zarr_store), None, None


def check(refs: Sequence[VolumeRef], reader: Reader, settings_hash: str | None) -> None:
    """Refuse a store of another format, or written with other settings than the manifest says: read the store's
    root metadata and the attributes of one volume per store (small GETs; checking all 114k would double the
    requests of an epoch)."""
    firsts: dict[str, VolumeRef] = {}
    for ref in refs:
        firsts.setdefault(ref.url, ref)
    for root, ref in firsts.items():
        store_format = group_attributes(f"{root}/zarr.json", f"store {root}", reader).get("store_format")
        if store_format != STORE_FORMAT:
            raise StoreError(f"store {root} has store format {store_format}; this loader reads {STORE_FORMAT}: "
                             "convert the corpus again with this openmind-convert")  # fmt: skip
        found = group_attributes(f"{root}/{group_path(ref.id)}/zarr.json", f"volume {ref.id}", reader)
        if settings_hash is not None and found.get("settings_hash") != settings_hash:
            raise ConfigError(
                f"store {root} was written with settings_hash {found.get('settings_hash')} (volume {ref.id}), but "
                f"the manifest says {settings_hash}: the store and manifest come from different conversions"
            )


def group_attributes(url: str, what: str, reader: Reader) -> dict[str, Any]:
    """The attributes of the group metadata at `url`; a StoreError naming `what` if it is missing or damaged.
    Stores of converter 0.4 and older have no root metadata, so they are named here too."""
    try:
        (raw,) = reader.cat([url], [(0, _METADATA_BYTES)])
    except FileNotFoundError:
        raise StoreError(f"{what}: no group metadata at {url} (a store of openmind-convert 0.4 or older, which "
                         "must be converted again, or not a store)") from None  # fmt: skip
    try:
        metadata = json.loads(bytes(raw))
        attributes = metadata["attributes"]
        if metadata["node_type"] != "group" or not isinstance(attributes, dict):
            raise ValueError("not a group")
    except (ValueError, KeyError, TypeError, RecursionError):
        raise StoreError(f"{what}: {url} is not zarr group metadata (damaged?)") from None
    return attributes


def read(ref: VolumeRef, reader: Reader, settings_hash: str | None = None) -> Volume:
    """Fetch the volume's chunk objects together, check them and decode them (`check` did the settings). The
    arrays' metadata come along the first time this reader reads the volume (`Reader.checked`): on S3 each object
    is a signed request that costs CPU, and the metadata of a store does not change under a run."""
    volume = read_volume(ref.url, ref.id, ref.shape, reader, metadata=ref not in reader.checked)
    reader.checked.add(ref)
    return volume


def read_volume(
    root: str, volume_id: str, shape: tuple[int, int, int], reader: Reader | None = None, metadata: bool = True
) -> Volume:
    """The volume `volume_id` of the store at `root`; `shape` is the manifest's (X, Y, Z).

    With `metadata`, both arrays' zarr.json come with the chunks (the same round trip on S3) and must agree with
    `shape`: a manifest shape permuted with the same product fits every chunk and checksum, and only the arrays'
    own shapes show it.
    """
    base = f"{str(root).rstrip('/')}/{group_path(volume_id)}"
    urls = [f"{base}/{chunk}" for chunk in CHUNKS.values()]
    urls += [f"{base}/{name}/zarr.json" for name in ARRAYS] if metadata else []
    reader = reader or Reader.for_url(base)
    # Read no more of an object than it can validly hold, plus a byte to show it holds more: a file of any size
    # in a chunk's place (a wrong copy, junk appended) costs that much memory, never the file's size.
    limits = [math.prod(shape) * dtype.itemsize + _BLOSC_HEADER + 4 + 1 for dtype in ARRAYS.values()]
    limits += [_METADATA_BYTES] * (len(urls) - len(limits))
    try:
        raws = reader.cat(urls, [(0, limit) for limit in limits])
    except FileNotFoundError as e:
        raise StoreError(f"volume {volume_id}: no object {e.filename or base}") from None
    except StoreError as e:
        raise StoreError(f"volume {volume_id}: {e}") from None
    arrays = len(ARRAYS)
    try:
        for url, raw, dtype in zip(urls[arrays:], raws[arrays:], ARRAYS.values() if metadata else (), strict=True):
            _check_metadata(raw, shape, dtype, f"volume {volume_id}: {url}")
        image, code = (
            _decoded(raw, shape, dtype, f"volume {volume_id}: {url}", reader.pool)
            for url, raw, dtype in zip(urls[:arrays], raws[:arrays], ARRAYS.values(), strict=True)
        )
        if not finite(image, reader.pool):
            raise StoreError(f"volume {volume_id}: {urls[0]}: the image holds NaN or Inf voxels")
        return Volume(image, code)
    except StoreError:
        reader.forget(urls)  # a damaged copy in a local cache (simplecache::) is fetched again next time
        raise


def _check_metadata(raw: bytes, shape: tuple[int, int, int], dtype: np.dtype, where: str) -> None:
    try:
        metadata = json.loads(bytes(raw))
        found = tuple(metadata["shape"]), metadata["data_type"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise StoreError(f"{where}: not zarr array metadata ({type(e).__name__}: {e})") from None
    if found != (tuple(shape), dtype.name):
        raise StoreError(f"{where}: the array is {found[1]} of shape {found[0]}, the manifest says {dtype.name} of "
                         f"shape {tuple(shape)}")  # fmt: skip


def _decoded(raw: Buffer, shape: tuple[int, int, int], dtype: np.dtype, where: str, pool: BufferPool) -> np.ndarray:
    body = check_chunk(raw, math.prod(shape) * dtype.itemsize, dtype.itemsize, where)  # before any allocation
    data = pool.array(shape, dtype)
    try:
        numcodecs.blosc.decompress(body, data)
    except RuntimeError as e:  # a header with the right sizes but a bad version, block size or offsets
        raise StoreError(f"{where}: blosc cannot decode it ({e})") from None
    return data


def check_chunk(raw: Buffer, nbytes: int, itemsize: int, where: str) -> bytes:
    """The blosc bytes of a stored chunk, after checking its CRC-32C and that blosc's header matches both the
    chunk's length and the `nbytes` the manifest's shape needs; anything else is a StoreError saying what."""
    if len(raw) < _BLOSC_HEADER + 4:
        raise StoreError(f"{where}: {len(raw)} bytes, too short to be a chunk (cut short?)")
    body, stored = np.frombuffer(raw, np.uint8)[:-4], int.from_bytes(raw[-4:], "little")  # a view: no copy
    computed = google_crc32c.value(body)
    if computed != stored:
        raise StoreError(f"{where}: damaged chunk: its crc32c is {computed:08x}, it records {stored:08x} (a changed "
                         "byte, or a chunk cut short or padded)")  # fmt: skip
    values, compressed = int.from_bytes(raw[4:8], "little"), int.from_bytes(raw[12:16], "little")
    if compressed != len(body):
        raise StoreError(f"{where}: blosc header says {compressed} bytes, the chunk holds {len(body)}")
    if values != nbytes:
        raise StoreError(f"{where}: holds {values // itemsize} values, the manifest's shape needs {nbytes // itemsize}")
    return body


def write_hierarchy(root: str | Path | Place, volume_ids: Iterable[str]) -> None:
    """Group metadata for the store's root (with its format), `volumes/` and every folder above the volumes' groups,
    where it is missing: what makes the store a Zarr hierarchy that zarr-python and tensorstore list. Written by
    the conversion's driver (the root's before the workers start, the folders' once the volumes are in place), so
    two workers never race on one folder's metadata."""
    root = Place.of(root)
    (root / "zarr.json").write_bytes((_GROUP_METADATA % json.dumps({"store_format": STORE_FORMAT})).encode())
    for folder in missing_groups(root, volume_ids):
        (root / folder / "zarr.json").write_bytes((_GROUP_METADATA % "{}").encode())


def missing_groups(root: str | Path | Place, volume_ids: Iterable[str]) -> list[str]:
    """The folders between the store's root and the volumes' groups that lack group metadata (a stat each on local
    disk; one listing on an object store)."""
    root = Place.of(root)
    folders = {str(Path(group_path(volume_id)).parent) for volume_id in volume_ids}
    for folder in list(folders):
        folders.update(str(parent) for parent in Path(folder).parents if str(parent) != ".")
    if root.local:
        return [folder for folder in sorted(folders) if file_problem(Path(root.path) / folder / "zarr.json")]
    present = set(root.find())
    return [folder for folder in sorted(folders) if (root / folder / "zarr.json").path not in present]


def stored(root: str | Path | Place, volume_ids: Iterable[str]) -> set[str]:
    """Which of the volumes have their group, arrays and chunks all in the store: a resumed run's check of its
    journal, so a volume whose metadata was deleted (or whose upload was cut off) is converted again. A stat per
    object on local disk; one listing of the store on an object store (a request per 1,000 objects)."""
    root = Place.of(root)
    names = ["zarr.json", *(f"{name}/zarr.json" for name in ARRAYS), *CHUNKS.values()]
    if root.local:
        return {v for v in volume_ids if all(file_problem(f"{root.path}/{group_path(v)}/{n}") is None for n in names)}
    present = set((root / "volumes").find())
    return {v for v in volume_ids if all((root / group_path(v) / n).path in present for n in names)}


def delete_volume(root: str | Path | Place, volume_id: str) -> None:
    """Remove a (damaged) volume's group so the next run converts it again."""
    (Place.of(root) / group_path(volume_id)).remove(recursive=True)


def open_volume(root: str | Path, volume_id: str) -> zarr.Group:
    """The stored group through plain zarr (for people, notebooks and tests; the loader uses `read`)."""
    return zarr.open_group(store=str(root), path=group_path(volume_id), mode="r")


def clean_partial(root: str | Path | Place) -> None:
    """Drop arrays a killed run left under their temporary names (local disk: an object store has none)."""
    root = Place.of(root)
    if root.local:
        shutil.rmtree(_partial_dir(root), ignore_errors=True)


def _partial_dir(root: Place) -> str:
    """Where volumes are written before their rename: beside the store, on its file system, but outside its
    hierarchy (zarr-python warns about a folder without metadata inside one)."""
    return f"{root.parent.path}/.{root.name}.partial"
