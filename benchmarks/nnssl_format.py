"""nnssl's own on-disk case format and patch read, rebuilt as a baseline for our stores and loader.

Modelled on MIC-DKFZ/nnssl (read at commit 70448644), written anew here, not copied:

- One case is three blosc2 NDArray files (`.b2nd`), not one array: the image `NAME.b2nd` as float32
  (C, X, Y, Z), and each mask as its own uint8 (1, X, Y, Z) array, `NAME__anat.b2nd` (anatomy) and
  `NAME__anon.b2nd` (anonymisation = deface): `nnSSLDatasetBlosc2.save_case` in
  src/nnssl/data/dataloading/dataset.py, file names from `IndependentImage.get_output_path` in
  src/nnssl/data/raw_dataset.py, mask dtype uint8 from `read_seg` in src/nnssl/imageio/*_reader_writer.py.
  nnssl also pickles a properties dict beside the image; it is metadata, not voxels, and is not written here.
- Codec: `blosc2.asarray(..., cparams={"codec": ZSTD, "clevel": 8}, mmap_mode="w+")` after
  `blosc2.set_nthreads(1)` (`save_case`). Filters and split mode are blosc2's defaults (the explicit
  SHUFFLE line is commented out in nnssl): byte shuffle at the dtype's typesize, AUTO_SPLIT.
- Blocks and chunks: `nnSSLDatasetBlosc2.comp_blosc2_params` (dataset.py), called from
  `preprocess_and_save` in src/nnssl/preprocessing/preprocessors/default_preprocessor.py with patch
  (160, 160, 160) and the image's itemsize (4) for the image and for the masks alike, so the masks get the
  image's blocks and chunks. The rule: start each spatial block axis at 2**floor(log2(patch / 2)), halve
  the axis largest relative to the patch until the block fits 80% of a 32 KiB L1; then grow the chunk by
  whole blocks along the axis least grown so far until it reaches 80% of 1.375 MiB (an L3 share per core)
  or the image. For a 1 mm head: blocks (1, 16, 16, 16), chunks (1, 80, 64, 64).
- Read: `nnSSLDatasetBlosc2.load_case` (dataset.py) opens each file with
  `blosc2.open(urlpath, mode="r", dparams={"nthreads": 1}, mmap_mode="r")`; `nnsslDataLoader3D`
  (src/nnssl/ssl_data/dataloading/data_loader_3d.py) slices the part of the patch box inside the volume
  (decoding only the chunks it touches) and `np.pad`s it with zeros. The box is drawn by
  `nnsslDataLoaderBase.get_bbox` (src/nnssl/ssl_data/dataloading/base_data_loader.py): per axis, uniform
  in [-need // 2, n + need // 2 + need % 2 - P] with need = max(0, P - n) when the initial and final patch
  sizes are equal (as in `get_plain_dataloaders`, AbstractTrainer.py), i.e. centred padding when the
  volume is smaller than the patch.

`decode_floor` is the cost a reader of our stores cannot go below, for comparison with both.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

import blosc2
import google_crc32c
import numcodecs
import numpy as np
import torch
from numcodecs import Blosc
from torch.utils.data import Dataset

from openmind_tools.buffers import BufferPool
from openmind_tools.volume import Volume, finite

PATCH = (160, 160, 160)  # the patch size preprocess_and_save plans blocks and chunks for
L1_BYTES, L3_BYTES, CACHE_FILL = 32768, 1441792, 0.8  # comp_blosc2_params' defaults (Intel 4110 caches)
CPARAMS = {"codec": blosc2.Codec.ZSTD, "clevel": 8, "nthreads": 1}
DPARAMS = {"nthreads": 1}
MASK_SUFFIXES = ("__anat", "__anon")  # anatomy, anonymisation (deface)
T = TypeVar("T")


def blosc2_partition(
    shape: tuple[int, ...], patch: tuple[int, int, int] = PATCH, itemsize: int = 4
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(blocks, chunks) for a (C, X, Y, Z) array, by nnssl's comp_blosc2_params rule (3D patches).

    Ties go where nnssl's argsort sends them: the block shrinks the last of equally large axes first,
    the chunk grows the first of equally grown axes first.
    """
    block = [shape[0], *(2 ** max(0, math.floor(math.log2(p / 2))) for p in patch)]
    while math.prod(block) * itemsize > L1_BYTES * CACHE_FILL and block != list(shape):
        axes = [a for a in range(3) if block[a + 1] not in (1, shape[a + 1])]
        if not axes:
            break
        a = max(axes, key=lambda a: (block[a + 1] / patch[a], a))
        block[a + 1] = min(2 ** max(0, math.floor(math.log2(block[a + 1] - 1))), shape[a + 1])
    chunk = list(block)
    while math.prod(chunk) * itemsize < L3_BYTES * CACHE_FILL and chunk != list(shape):
        axes = [a for a in range(3) if chunk[a + 1] != shape[a + 1]]
        if not axes:
            break
        a = min(axes, key=lambda a: (chunk[a + 1] / block[a + 1], a))
        chunk[a + 1] = min(chunk[a + 1] + block[a + 1], shape[a + 1])
    return tuple(block), tuple(chunk)


def case_paths(prefix: str | Path) -> tuple[Path, Path, Path]:
    """The image, anatomy-mask and deface-mask files of the case `prefix` (a path without `.b2nd`)."""
    prefix = str(prefix)
    return Path(prefix + ".b2nd"), *(Path(prefix + suffix + ".b2nd") for suffix in MASK_SUFFIXES)


def write_case(folder: str | Path, name: str, volume: Volume) -> int:
    """Store one case as nnssl does; returns the bytes of its three files.

    The image is widened to float32, as nnssl keeps its preprocessed images, so the bytes compare what
    nnssl would store for the same z-scored head, not a float16 variant of its format.
    """
    paths = case_paths(Path(folder) / name)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    image = volume.image.astype(np.float32)[None]
    blocks, chunks = blosc2_partition(image.shape, PATCH, image.itemsize)
    blosc2.set_nthreads(1)
    for path, array in zip(paths, (image, volume.anatomy[None], volume.deface[None]), strict=True):
        blosc2.asarray(
            np.ascontiguousarray(array),
            urlpath=str(path),
            chunks=chunks,
            blocks=blocks,
            cparams=CPARAMS,
            mmap_mode="w+",
        )
    return sum(path.stat().st_size for path in paths)


def open_case(prefix: str | Path) -> tuple[blosc2.NDArray, blosc2.NDArray, blosc2.NDArray]:
    """The case's image, anatomy and deface arrays, opened lazily (memory-mapped) as nnssl's load_case does."""
    return tuple(blosc2.open(str(p), mode="r", dparams=DPARAMS, mmap_mode="r") for p in case_paths(prefix))


class NnsslPatches(Dataset):
    """Random `patch`^3 crops read the nnssl way, returned as our loader's samples are.

    Items are dicts: image (1, P, P, P) float16; anatomy, deface, valid (1, P, P, P) uint8 (valid is 1
    inside the volume, 0 in the padding); origin (3,) int64, the crop's first voxel (negative where
    padded). The crop of item i is drawn from a generator seeded with i, so a run is reproducible; the
    box rule is nnssl's get_bbox, the read its slice-then-np.pad.
    """

    def __init__(self, folder_or_cases: str | Path | Sequence[str | Path], patch: int = 160) -> None:
        if isinstance(folder_or_cases, str | Path):
            files = Path(folder_or_cases).rglob("*.b2nd")
            prefixes = [str(f)[: -len(".b2nd")] for f in files if not f.stem.endswith(MASK_SUFFIXES)]
        else:
            prefixes = [str(p) for p in folder_or_cases]
        self.cases = sorted(prefixes)
        self.patch = patch

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image, anatomy, deface = open_case(self.cases[i])
        shape, size = image.shape[1:], self.patch
        rng = np.random.default_rng(i)
        need = [max(0, size - n) for n in shape]
        origin = [int(rng.integers(-k // 2, n + k // 2 + k % 2 - size + 1)) for n, k in zip(shape, need, strict=True)]
        box = tuple(slice(max(0, o), min(n, o + size)) for o, n in zip(origin, shape, strict=True))
        pad = ((0, 0), *((max(0, -o), max(0, o + size - n)) for o, n in zip(origin, shape, strict=True)))

        def padded(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.pad(array, pad, "constant", constant_values=0))

        inside = (slice(None), *box)
        return {
            "image": padded(image[inside]).to(torch.float16),
            "anatomy": padded(anatomy[inside]),
            "deface": padded(deface[inside]),
            "valid": padded(np.ones((1, *(s.stop - s.start for s in box)), np.uint8)),
            "origin": torch.tensor(origin, dtype=torch.int64),
        }


def cpu_ms(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    """Median CPU milliseconds of `fn` over `repeats` calls, and its last result (so an encode timed here
    need not run once more for its bytes). Process time, so other load on the box and page-cache luck do
    not count, and a multi-threaded codec would show its full cost."""
    samples = []
    for _ in range(repeats):
        start = time.process_time()
        result = fn()
        samples.append(time.process_time() - start)
    return 1e3 * statistics.median(samples), result


def decode_floor(volumes: Sequence[Volume], cname: str = "lz4", clevel: int = 5, repeats: int = 5) -> dict[str, float]:
    """Mean over `volumes` of the per-volume median CPU ms of the cheapest reads of our stores, one thread.

    decode: blosc `cname`-`clevel` (byte shuffle) decompression of the float16 image and uint8 code into
    reused buffers (no allocation or page faults, which a loader pays once); crc32c: google_crc32c over
    those compressed bytes (the check a store can afford on every read); finite: the loader's NaN/Inf check of
    the float16 image (volume.finite, its scratch array reused); copy: np.copyto of the float16 image into a
    reused buffer (the memory-bandwidth bound of any decode).
    """
    numcodecs.blosc.set_nthreads(1)
    codec = Blosc(cname, clevel, Blosc.SHUFFLE)
    totals = {"decode": 0.0, "crc32c": 0.0, "finite": 0.0, "copy": 0.0}
    pool = BufferPool(2)
    for volume in volumes:
        arrays = (volume.image, volume.mask_code)
        encoded = [codec.encode(a) for a in arrays]
        buffers = [np.empty_like(a) for a in arrays]
        reads = {
            "decode": partial(_decode_into, codec, encoded, buffers),
            "crc32c": partial(_crc32c, encoded),
            "finite": partial(finite, volume.image, pool),
            "copy": partial(np.copyto, buffers[0], volume.image),
        }
        for key, fn in reads.items():
            totals[key] += cpu_ms(fn, repeats)[0]
    return {key: total / len(volumes) for key, total in totals.items()}


def _decode_into(codec: Blosc, encoded: Sequence[bytes], buffers: Sequence[np.ndarray]) -> None:
    for blob, out in zip(encoded, buffers, strict=True):
        codec.decode(blob, out=out)


def _crc32c(encoded: Sequence[bytes]) -> None:
    for blob in encoded:
        google_crc32c.value(blob)
