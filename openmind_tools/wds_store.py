"""WebDataset layout of converted volumes: the only module that knows the tar member names.

Shard `shards/shard-NNNNNN.tar` holds one sample per volume, keyed by the volume id (slashes kept, `%` and
`.` percent-encoded, so two ids never share a key): `<key>.image.npy` (X, Y, Z) float16, `<key>.mask.npy`
(X, Y, Z) uint8 mask code (bit 0 anatomy, bit 1 deface) and `<key>.json` (id, affine, spacing, and the
CRC-32C of the two arrays' members). The manifest's `wds_crc32c` holds the CRC-32C of all three members,
which a reader checks before it decodes, and `wds_offset` / `wds_size` the byte span of the sample's headers and
members in its shard: `read` fetches exactly that span (an HTTP range on S3), so a loader worker reads its own
samples only, a resumed epoch reads nothing it skips, and no sample waits for the ones before it in the shard
(webdataset's own `wids` reads indexed tar samples the same way). Members are plain .npy, so
`webdataset.WebDataset(url).decode()` and `tar tf` read them; they are uncompressed, for readers where decode
time, not bytes, is scarce (`read` views their bytes in place: no decode at all). Shards are POSIX.1-2001
(PAX) tar: no 100-byte limit on member names (OpenMind's many-entity BIDS names exceed it), and webdataset,
Python's tarfile and GNU tar read it. Nothing is unpickled: only these three members are decoded, the arrays
by numpy's .npy header parser with no object dtype.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import google_crc32c
import numpy as np

from openmind_tools.buffers import BufferPool
from openmind_tools.errors import ConfigError, StoreError
from openmind_tools.manifest_io import whole_number
from openmind_tools.reads import Buffer, Reader
from openmind_tools.storage import Place
from openmind_tools.volume import Volume, VolumeRef, finite

NAME = "wds"
MEMBERS = ("image.npy", "mask.npy", "json")
MANIFEST_COLUMNS = ("wds_shard", "wds_offset", "wds_size", "wds_crc32c")  # where a manifest row's sample lives
_NPY_HEADER_MAX = 4096  # bytes; our .npy headers are 128


class Sample(NamedTuple):
    """Where write_shard put a sample: the byte span of its tar headers and members, its members' bytes and CRCs."""

    offset: int
    size: int
    nbytes: int
    crc32c: list[int]


def shard_name(index: int) -> str:
    return f"shards/shard-{index:06d}.tar"


def shard_index(name: str) -> int:
    """The number in a `shard_name`: `shards/shard-000012.tar` -> 12."""
    return int(Path(name).name.removeprefix("shard-").removesuffix(".tar"))


def sample_key(volume_id: str) -> str:
    """webdataset splits a member name at the first dot of its basename, so a key holds no dot.

    Percent-encoding `%` and `.` keeps keys unique: `acq-1.5mm` and `acq-1_5mm` stay two keys.
    """
    return volume_id.replace("%", "%25").replace(".", "%2E")


def sample_nbytes(shape: Sequence[int]) -> int:
    """About the bytes of one sample (fp16 image + uint8 code), for planning shard sizes."""
    return 3 * int(np.prod(shape))


def write_shard(path: str | Path | Place, samples: Iterable[tuple[str, Volume, dict[str, Any]]]) -> dict[str, Sample]:
    """Write a whole shard (a local file under a temporary name, renamed; or one object, uploaded as it is packed);
    returns where each sample key went.

    Tar headers are deterministic (mtime 0, uid 0), so a rerun writes the same bytes.
    """
    place = Place.of(path)
    place.parent.mkdir()
    sizes: dict[str, Sample] = {}
    with place.writer() as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for volume_id, volume, meta in samples:
            key = sample_key(volume_id)
            arrays = (_npy(volume.image), _npy(volume.mask_code))
            crcs = [google_crc32c.value(a) for a in arrays]
            members = (*arrays, json.dumps({**meta, "crc32c": dict(zip(MEMBERS[:2], crcs, strict=True))}).encode())
            crcs.append(google_crc32c.value(members[2]))
            start = tar.offset
            for ext, payload in zip(MEMBERS, members, strict=True):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode = len(payload), 0o444
                tar.addfile(info, io.BytesIO(payload))
            sizes[key] = Sample(start, tar.offset - start, sum(len(m) for m in members), crcs)
    return sizes


def manifest_cells(shard: str, volume_id: str, sample: Sample) -> dict[str, Any]:
    """The manifest's wds_* cells of a sample that write_shard put in `shard` (its path under the output folder)."""
    return {"wds_shard": shard, "wds_key": sample_key(volume_id), "wds_offset": sample.offset,
            "wds_size": sample.size, "wds_nbytes": sample.nbytes, "wds_crc32c": sample.crc32c}  # fmt: skip


# ---------------------------------------------------------------------------------------------- the loader's interface
def locate(row: Any, resolve: Callable[[str], str]) -> tuple[str, tuple[int, int], tuple[int, int, int]]:
    """(url, span, member checksums) of a manifest row's sample; a malformed cell is a ConfigError naming it."""
    crcs = member_crcs(row.wds_crc32c)
    if crcs is None:
        raise ConfigError(f"volume {row.id}: the manifest's wds_crc32c is {row.wds_crc32c!r}, not 3 member checksums "
                          "(32-bit integers)")  # fmt: skip
    span = tuple(whole_number(v) for v in (row.wds_offset, row.wds_size))
    largest = sample_nbytes(row.shape) + 2**20  # the two arrays, with room for the json and the tar headers
    if None in span or not 0 <= span[0] < 2**48 or span[0] % 512 or span[1] % 512 or not 3 * 512 <= span[1] <= largest:
        raise ConfigError(f"volume {row.id}: the manifest's wds_offset / wds_size ({row.wds_offset!r}, "
                          f"{row.wds_size!r}) are no sample span of a tar shard")  # fmt: skip
    return resolve(row.wds_shard), span, crcs


def member_crcs(value: Any) -> tuple[int, int, int] | None:
    """A manifest cell's three member CRC-32Cs, or None if it is not three integers in [0, 2^32)."""
    try:
        crcs = tuple(value)
    except TypeError:
        return None
    ok = len(crcs) == 3 and all(isinstance(c, int | np.integer) and 0 <= c < 2**32 for c in crcs)
    return tuple(int(c) for c in crcs) if ok else None


def check(refs: Sequence[VolumeRef], reader: Reader, settings_hash: str | None) -> None:
    """Nothing to read up front: every sample's json names its settings, and `read` checks them."""


def read(ref: VolumeRef, reader: Reader, settings_hash: str | None = None) -> Volume:
    """Fetch the sample's span of its shard, check its members' CRCs, then its arrays against the manifest."""
    label = f"{ref.url} at bytes {ref.span[0]}+{ref.span[1]}"
    try:
        (raw,) = reader.cat([ref.url], [ref.span])
    except FileNotFoundError:
        raise StoreError(f"volume {ref.id}: no shard {ref.url}") from None
    except StoreError as e:
        raise StoreError(f"volume {ref.id}: {e}") from None
    try:
        if len(raw) != ref.span[1]:
            raise StoreError(f"{label}: the shard ends after {len(raw)} of the sample's bytes (cut short?)")
        volume_id, volume, meta = decode_sample(_members(raw, label), ref.shape, ref.crc32c, reader.pool)
    # besides our own checks: bytes that are no array or json of ours (a json nested 100,000 deep, a PAX header
    # with a size of 1e30, ...)
    except (StoreError, ValueError, KeyError, TypeError, OverflowError, RecursionError, MemoryError) as e:
        reader.forget([ref.url])  # a damaged copy in a local cache (simplecache::) is fetched again next time
        problem = str(e) if isinstance(e, StoreError) else f"sample {label}: {type(e).__name__}: {e}"
        raise StoreError(f"volume {ref.id}: {problem}") from None
    if volume_id != ref.id:
        raise StoreError(f"volume {ref.id}: sample {label} holds volume {volume_id}")
    found = meta.get("settings_hash")
    if settings_hash is not None and found is not None and found != settings_hash:
        raise ConfigError(f"volume {ref.id} in {label} was written with settings_hash {found}, but the manifest says "
                          f"{settings_hash}: the store and manifest come from different conversions")  # fmt: skip
    return volume


def _members(raw: Buffer, label: str) -> dict[str, Any]:
    """The members of one sample's tar span, as a raw webdataset sample (uint8 views of `raw`, not copies)."""
    view, sample = np.frombuffer(raw, np.uint8), {"__key__": None, "__url__": label}
    try:
        with tarfile.open(fileobj=_ViewFile(view), mode="r:") as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.offset_data + info.size > len(raw):
                    raise StoreError(f"sample {label}: member {info.name!r} is not a regular file within the span")
                if sample["__key__"] not in (None, key):
                    raise StoreError(f"sample {label}: member {info.name!r} belongs to another sample (a span that "
                                     "does not match the shard?)")  # fmt: skip
                if ext in sample:
                    raise StoreError(f"sample {label}: member {info.name!r} occurs twice")
                sample["__key__"], sample[ext] = key, view[info.offset_data : info.offset_data + info.size]
    except tarfile.TarError as e:
        raise StoreError(f"sample {label}: not a tar sample ({type(e).__name__}: {e})") from None
    return sample


def decode_sample(
    sample: dict[str, Any], shape: Sequence[int], crc32c: Sequence[int], pool: BufferPool | None = None
) -> tuple[str, Volume, dict[str, Any]]:
    """Decode a raw webdataset sample (bytes, or uint8 views, per member) into (volume id, volume, json metadata).

    Every member's bytes are checked against the manifest's `crc32c` (one per member) before anything is decoded,
    and the arrays against the manifest's `shape` before anyone crops them: 3 axes of that shape, a float16 image
    with finite voxels and a uint8 code. A failure is a StoreError saying what is wrong.
    """
    where = f"sample {sample.get('__key__')!r} in {sample.get('__url__')}"
    missing = [m for m in MEMBERS if m not in sample]
    if missing:
        raise StoreError(f"{where}: missing members {missing}")
    for member, expected in zip(MEMBERS, crc32c, strict=True):
        computed = google_crc32c.value(sample[member])
        if computed != int(expected):
            raise StoreError(f"{where}: damaged member {member}: its crc32c is {computed:08x}, the manifest "
                             f"records {int(expected):08x}")  # fmt: skip
    meta = json.loads(bytes(sample["json"]))  # bytes, or a uint8 view
    volume = Volume(_load_npy(sample["image.npy"]), _load_npy(sample["mask.npy"]))
    for name, array, dtype in (("image", volume.image, np.float16), ("mask", volume.code, np.uint8)):
        if array.shape != tuple(shape) or array.dtype != dtype:
            raise StoreError(f"{where}: {name} is {array.dtype} {array.shape}, the manifest says {np.dtype(dtype)} "
                             f"{tuple(shape)}")  # fmt: skip
    if not finite(volume.image, pool):
        raise StoreError(f"{where}: the image holds NaN or Inf voxels")
    return meta["id"], volume, meta


class _ViewFile(io.RawIOBase):
    """A read-only file over a uint8 array, for tarfile to parse its headers: io.BytesIO would copy the array."""

    def __init__(self, view: np.ndarray) -> None:
        super().__init__()
        self._view, self._at = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, out: Any) -> int:
        part = self._view[self._at : self._at + len(out)]
        memoryview(out).cast("B")[: len(part)] = part.data
        self._at += len(part)
        return len(part)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._at = max(0, {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: len(self._view)}[whence] + offset)
        return self._at

    def tell(self) -> int:
        return self._at


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _load_npy(payload: bytes | np.ndarray) -> np.ndarray:
    """A .npy member as an array viewing its bytes (no copy); the header is numpy's own parser's."""
    header = io.BytesIO(bytes(payload[:_NPY_HEADER_MAX]))
    version = np.lib.format.read_magic(header)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f".npy format {version} (np.save writes 1.0 or 2.0)")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(header)
    if dtype.hasobject:
        raise ValueError("an object array (would need unpickling)")
    count = math.prod(shape)  # exact: np.prod wraps around in int64
    if header.tell() + count * dtype.itemsize != len(payload):
        raise ValueError(f"{len(payload) - header.tell()} data bytes for {count} values of {dtype}")
    return np.frombuffer(payload, dtype, count, header.tell()).reshape(shape, order="F" if fortran else "C")
