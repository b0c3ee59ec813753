"""WebDataset layout of converted volumes: the only module that knows the tar member names.

Shard `shards/shard-NNNNNN.tar` holds one sample per volume, keyed by the volume id (slashes kept, `%` and
`.` percent-encoded, so two ids never share a key): `<key>.image.npy` (X, Y, Z) float16, `<key>.mask.npy`
(X, Y, Z) uint8 mask code (bit 0 anatomy, bit 1 deface) and `<key>.json` (id, affine, spacing, and the
CRC-32C of the two arrays' members). The manifest's `wds_crc32c` holds the CRC-32C of all three members,
which a reader checks before it decodes. Members are plain .npy, so `webdataset.WebDataset(url).decode()`
and `tar tf` read them; they are uncompressed because tar shards serve sequential streaming where decode
time, not bytes, is scarce. Shards are POSIX.1-2001 (PAX) tar: no 100-byte limit on member names (OpenMind's
many-entity BIDS names exceed it), and webdataset, Python's tarfile and GNU tar read it. Nothing is
unpickled: `decode_sample` reads only these three members with `allow_pickle=False`.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from openmind_tools.errors import StoreError
from openmind_tools.files import atomic_write, file_problem
from openmind_tools.volume import Volume

MEMBERS = ("image.npy", "mask.npy", "json")


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


def write_shard(
    path: str | Path, samples: Iterable[tuple[str, Volume, dict[str, Any]]]
) -> dict[str, tuple[int, list[int]]]:
    """Write a whole shard under a temporary name and rename it; returns (bytes, member CRC-32Cs) per sample key.

    Tar headers are deterministic (mtime 0, uid 0), so a rerun writes the same bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, tuple[int, list[int]]] = {}
    with atomic_write(path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for volume_id, volume, meta in samples:
            key = sample_key(volume_id)
            arrays = (_npy(volume.image), _npy(volume.mask_code))
            crcs = [google_crc32c.value(a) for a in arrays]
            members = (*arrays, json.dumps({**meta, "crc32c": dict(zip(MEMBERS[:2], crcs, strict=True))}).encode())
            crcs.append(google_crc32c.value(members[2]))
            for ext, payload in zip(MEMBERS, members, strict=True):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode = len(payload), 0o444
                tar.addfile(info, io.BytesIO(payload))
            sizes[key] = (sum(len(m) for m in members), crcs)
    return sizes


def decode_sample(
    sample: dict[str, Any], shape: Sequence[int] | None = None, crc32c: Sequence[int] | None = None
) -> tuple[str, Volume, dict[str, Any]]:
    """Decode a raw webdataset sample (bytes per member) into (volume id, volume, json metadata).

    With the manifest's `crc32c` (one per member), every member's bytes are checked before anything is decoded.
    With the manifest's `shape`, the arrays are checked before anyone crops them: 3 axes of that shape, a
    float16 image with finite voxels and a uint8 code. A failure is a StoreError saying what is wrong.
    """
    where = f"sample {sample.get('__key__')!r} in {sample.get('__url__')}"
    missing = [m for m in MEMBERS if m not in sample]
    if missing:
        raise StoreError(f"{where}: missing members {missing}")
    for member, expected in zip(MEMBERS, () if crc32c is None else crc32c, strict=False):
        computed = google_crc32c.value(sample[member])
        if computed != int(expected):
            raise StoreError(f"{where}: damaged member {member}: its crc32c is {computed:08x}, the manifest "
                             f"records {int(expected):08x}")  # fmt: skip
    meta = json.loads(sample["json"])
    volume = Volume(_load_npy(sample["image.npy"]), _load_npy(sample["mask.npy"]))
    if shape is not None:
        for name, array, dtype in (("image", volume.image, np.float16), ("mask", volume.code, np.uint8)):
            if array.shape != tuple(shape) or array.dtype != dtype:
                raise StoreError(f"{where}: {name} is {array.dtype} {array.shape}, the manifest says {np.dtype(dtype)} "
                                 f"{tuple(shape)}")  # fmt: skip
        if not finite(volume.image):
            raise StoreError(f"{where}: the image holds NaN or Inf voxels")
    return meta["id"], volume, meta


def finite(image: np.ndarray) -> bool:
    """Whether a float16 array holds no NaN or Inf: an all-ones exponent (0x7C00) marks both. On the uint16 bits,
    4.5x faster than np.isfinite on float16 (3.6 against 16.5 ms for a 1 mm head here)."""
    return image.size == 0 or int(np.bitwise_and(image.view(np.uint16), 0x7C00).max()) != 0x7C00


def iter_shard(path: str | Path) -> Iterator[tuple[str, Volume, dict[str, Any]]]:
    """Read every sample of a local shard with tarfile alone (tests; the loader uses webdataset)."""
    for sample in raw_samples(path):
        yield decode_sample(sample)


def raw_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """The undecoded samples of a local shard, in tar order, read with tarfile alone (verify decodes each).

    A member name that occurs twice in a sample is a StoreError: one of the two would be dropped unseen.
    """
    sample: dict[str, Any] = {}
    problem = file_problem(path)  # a FIFO would block tarfile forever
    if problem:
        raise StoreError(f"{path}: {problem}")
    with tarfile.open(path, "r") as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            if sample and key != sample["__key__"]:
                yield sample
                sample = {}
            if ext in sample:
                raise StoreError(f"{path}: member {info.name!r} occurs twice")
            if not info.isfile():
                raise StoreError(f"{path}: member {info.name!r} is not a regular file")
            sample["__key__"], sample["__url__"] = key, str(path)
            sample[ext] = tar.extractfile(info).read()
    if sample:
        yield sample


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _load_npy(payload: bytes) -> np.ndarray:
    return np.load(io.BytesIO(payload), allow_pickle=False)
