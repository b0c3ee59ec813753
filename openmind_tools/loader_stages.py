"""The stages of the patch loader: module-level generators that each do one step of an epoch.

A stage is `stage(src, *, ...) -> Iterator`, so it pickles for `spawn` workers and is testable with a
list: volumes -> (balanced draws) -> epoch order -> padded -> split by rank -> split by worker -> read (the
store's own `read`, a few volumes ahead on threads) -> failures replaced -> crops -> batches. Both stores
read one volume at a time by its own objects or byte span, so the plan is the same for both and a resumed
epoch reads nothing it skips. Every random draw comes from a generator seeded by (seed, epoch, rank, worker,
position); never time, pid or hash(str). A batch holds (B, 1, P, P, P) image float16 (0 outside the volume)
and a uint8 mask code (see `batches`).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from openmind_tools.batch_memory import Specs, fresh_memory, pooled_tensor
from openmind_tools.buffers import BufferPool
from openmind_tools.errors import ConfigError, StoreError
from openmind_tools.volume import Volume, VolumeRef

T = TypeVar("T")
log = logging.getLogger(__name__)

_FOREGROUND_TRIES = 64  # uniform candidate voxels drawn before falling back to listing the anatomy
# Last entropy word of a worker's generators, so the streams differ (numpy pads short seeds with zeros,
# so a bare trailing index could collide with a shorter seed).
CROP_STREAM, BALANCE_STREAM = 1, 3
MASK_BITS = {"anatomy": 0, "deface": 1, "valid": 2}  # bits of a batch's "masks" code


# ---------------------------------------------------------------------------------------------- planning
def shuffled(volumes: Iterable[VolumeRef], *, seed: int, epoch: int) -> Iterator[VolumeRef]:
    """The epoch's order, the same on every rank: a permutation of the volumes.

    Tar samples too are read by their own byte spans, so no shard is read front to back and no shuffle
    buffer is needed to mix them (it held ~512 MB per worker).
    """
    volumes = list(volumes)
    yield from (volumes[i] for i in np.random.default_rng([seed, epoch]).permutation(len(volumes)))


def balanced(volumes: Sequence[VolumeRef], *, weights: np.ndarray, seed: int, epoch: int) -> list[VolumeRef]:
    """The epoch's volumes drawn with replacement by `weights` (manifest.balance_weights): as many as there are.

    Drawn from (seed, epoch) alone, so every rank draws the same list and a resumed epoch the same again;
    returned in the volumes' own order (ids), for `shuffled` to order the epoch as usual.
    """
    rng = np.random.default_rng([seed, epoch, BALANCE_STREAM])
    drawn = np.sort(rng.choice(len(volumes), size=len(volumes), replace=True, p=weights))
    return [volumes[i] for i in drawn]


def wrap_to_multiple(volumes: Iterable[VolumeRef], *, multiple: int) -> Iterator[VolumeRef]:
    """Append the first few volumes again so the count divides evenly into `multiple` equal parts.

    Equal parts give every rank the same number of steps (an unequal count hangs DDP at the last
    all-reduce); at most `multiple - 1` volumes are read twice per epoch, and which ones changes with
    the epoch's order.
    """
    volumes = list(volumes)
    yield from volumes
    missing = -len(volumes) % multiple
    yield from (volumes[i % len(volumes)] for i in range(missing))


def split_by_rank(volumes: Iterable[T], *, rank: int, world_size: int) -> Iterator[T]:
    """This rank's contiguous block of the epoch's order."""
    yield from _block(list(volumes), rank, world_size, "rank")


def split_by_worker(volumes: Iterable[T], *, worker: int, num_workers: int) -> Iterator[T]:
    """This DataLoader worker's contiguous block of its rank's block."""
    yield from _block(list(volumes), worker, num_workers, "worker")


def _block(items: Sequence[T], part: int, parts: int, what: str) -> Sequence[T]:
    if len(items) % parts:
        raise ValueError(f"split by {what}: {len(items)} items do not divide into {parts} parts (pad first)")
    size = len(items) // parts
    return items[part * size : (part + 1) * size]


# ---------------------------------------------------------------------------------------------- reading
def read_volumes(
    slots: Iterable[tuple[int, VolumeRef]], *, read: Callable[[VolumeRef], Volume], prefetch: int
) -> Iterator[tuple[int, VolumeRef, Volume | StoreError]]:
    """Read volumes in order with `read` (a store's), `prefetch` of them ahead on threads (fetch, CRC and blosc
    drop the GIL), so object-store latency (tens of ms per GET) hides behind the crops of the volumes already
    here. A failed read comes out as a StoreError value so the next stage applies the error policy; a
    ConfigError (the store and manifest disagree on settings) stops the epoch.
    """
    pool = ThreadPoolExecutor(max(prefetch, 1), thread_name_prefix="volume-read")
    window: deque[tuple[int, VolumeRef, Future[Volume]]] = deque()
    try:
        for position, ref in slots:
            window.append((position, ref, pool.submit(read, ref)))
            if len(window) > prefetch:
                yield _resolved(*window.popleft())
        while window:
            yield _resolved(*window.popleft())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _resolved(position: int, ref: VolumeRef, future: Future[Volume]) -> tuple[int, VolumeRef, Volume | StoreError]:
    try:
        return position, ref, future.result()
    except ConfigError:
        raise
    except StoreError as e:
        return position, ref, e
    except Exception as e:
        return position, ref, StoreError(f"volume {ref.id} in {ref.url}: {type(e).__name__}: {e}")


def replace_failures(
    loaded: Iterable[tuple[int, VolumeRef, Volume | StoreError]],
    *,
    on_error: str,
    spares: Callable[[], Iterable[tuple[VolumeRef, Volume | StoreError]]] | None = None,
) -> Iterator[tuple[int, VolumeRef, Volume, bool]]:
    """Apply the read-error policy: "raise" stops with the error; "skip" logs it and fills the slot.

    Yields (position, ref, volume, replaced). A skipped slot is filled with the worker's previous good
    volume (or, before any, the next one), so every worker still yields the same number of crops and every
    rank takes the same number of steps. A worker none of whose volumes can be read fills its slots from
    `spares` (the rank's other volumes, read only then), and raises only if none of those can be read either.
    """
    last: tuple[VolumeRef, Volume] | None = None
    owed: list[int] = []  # positions that failed before any volume of this worker was read
    for position, ref, volume in loaded:
        if isinstance(volume, StoreError):
            if on_error == "raise":
                raise volume
            log.error("skipping a volume that cannot be read: %s", volume)
            if last is None:
                owed.append(position)
            else:
                yield position, *last, True
            continue
        last = (ref, volume)
        for earlier in owed:
            yield earlier, ref, volume, True
        owed.clear()
        yield position, ref, volume, False
    if owed:
        spare = next(((r, v) for r, v in (spares() if spares else ()) if not isinstance(v, StoreError)), None)
        if spare is None:
            raise StoreError(f"none of the {len(owed)} volumes this worker was given, nor any other volume of its "
                             "rank, could be read (see the log)")  # fmt: skip
        for earlier in owed:
            yield earlier, *spare, True


# ---------------------------------------------------------------------------------------------- cropping
def crop_volumes(
    loaded: Iterable[tuple[int, VolumeRef, Volume, bool]],
    *,
    patch_size: tuple[int, int, int],
    crops_per_volume: int,
    foreground_bias: float,
    seed: int,
    epoch: int,
    rank: int,
    worker: int,
) -> Iterator[tuple[VolumeRef, Volume, np.ndarray, bool]]:
    """Place `crops_per_volume` patches in each volume read (a read costs ~all of a 160^3 patch's time).

    Yields (ref, volume, origin, replaced); the voxels are copied once, by `batches`; `replaced` marks
    the first crop of a slot whose own volume could not be read (it counts the skip once). Each crop is uniform
    over all positions, or, with probability `foreground_bias`, centred on a uniformly drawn anatomy
    voxel. The generator for a volume is seeded by its slot, so a resumed run that skips slots without
    reading them still draws the same crops for the rest.
    """
    for position, ref, volume, replaced in loaded:
        rng = np.random.default_rng([seed, epoch, rank, worker, position, CROP_STREAM])
        for crop in range(crops_per_volume):
            yield ref, volume, crop_origin(volume.code, patch_size, foreground_bias, rng), replaced and crop == 0


def fixed_crops(
    loaded: Iterable[tuple[VolumeRef, Volume]],
    *,
    patch_size: tuple[int, int, int],
    fractions: Sequence[tuple[float, float, float]],
) -> Iterator[tuple[VolumeRef, Volume, np.ndarray, bool]]:
    """The same crops of every volume, for evaluation: one per fraction of the free range along each axis.

    (0.5, 0.5, 0.5) is the centre crop; a volume smaller than the patch gets it centred and padded.
    Yields (ref, volume, origin, False) as `crop_volumes` does, so `batches` copies the voxels.
    """
    size = np.array(patch_size)
    for ref, volume in loaded:
        free = np.array(volume.image.shape) - size
        for fraction in fractions:
            yield ref, volume, np.rint(np.asarray(fraction) * free).astype(np.int64), False


def crop_origin(
    code: np.ndarray, patch_size: tuple[int, int, int], foreground_bias: float, rng: np.random.Generator
) -> np.ndarray:
    """The patch's first voxel in volume coordinates; negative where the volume is smaller than the patch.

    `code` is the volume's mask code (bit 0 anatomy), read only at the sampled voxels.
    """
    shape = np.array(code.shape)
    size = np.array(patch_size)
    low, high = np.minimum(0, shape - size), np.maximum(0, shape - size)
    centre = _anatomy_voxel(code, rng) if rng.random() < foreground_bias else None
    if centre is None:
        return rng.integers(low, high + 1)
    return np.clip(centre - size // 2, low, high)


def _anatomy_voxel(code: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A uniformly drawn anatomy voxel: rejection sampling (stored volumes are cropped to the anatomy,
    so most draws hit), then the full list for a sparse mask; None if the mask is empty."""
    flat = code.reshape(-1)
    candidates = rng.integers(flat.size, size=_FOREGROUND_TRIES)
    hits = candidates[flat[candidates] & 1 != 0]
    if hits.size:
        return np.array(np.unravel_index(hits[0], code.shape))
    inside = np.flatnonzero(flat & 1)
    if inside.size == 0:
        return None
    return np.array(np.unravel_index(inside[rng.integers(inside.size)], code.shape))


def batches(
    crops: Iterable[tuple[VolumeRef, Volume, np.ndarray, bool]],
    *,
    batch_size: int,
    patch_size: tuple[int, int, int],
    metadata: Sequence[tuple[str, torch.dtype]] = (),
    memory: Callable[[Specs], tuple[Any, list[torch.Tensor]]] = fresh_memory,
) -> Iterator[dict[str, Any]]:
    """Copy each group of `batch_size` crops straight into batch tensors (the last group may be smaller).

    A batch is {"image", "masks", "origin", "id", "skipped", "metadata"}: "skipped" counts the volumes whose read
    failed and whose slots hold another volume's crops (on_error="skip"); "metadata" maps each (column, dtype) of
    `metadata` to a (B,) tensor of the crops' `VolumeRef.metadata` values. The three masks travel as one uint8
    code (bit 0 anatomy, bit 1 deface, bit 2 valid; `unpack_masks` splits it, on the device), 12 instead of 20 MB
    per 160^3 patch. In a DataLoader worker the tensors live in shared memory from the start, as torch's
    default_collate does, so every voxel is written once on its way to the main process. `memory` gives each
    batch its tensors (see batch_memory); a batch written into a worker's hand-back slot says which in "slot".
    """
    crops = iter(crops)
    while (first := next(crops, None)) is not None:
        shape = (batch_size, 1, *patch_size)
        slot, (image, masks) = memory(((shape, torch.float16), (shape, torch.uint8)))
        refs, origins, skipped = [], [], 0
        for i, (ref, volume, origin, replaced) in enumerate(itertools.chain([first], crops)):
            src, dst = _overlap(origin, patch_size, volume.image.shape)
            image_out, masks_out = image[i, 0].numpy(), masks[i, 0].numpy()
            image_out[dst] = volume.image[src]
            np.bitwise_or(volume.code[src], 1 << MASK_BITS["valid"], out=masks_out[dst])
            _zero_outside(image_out, dst)
            _zero_outside(masks_out, dst)
            refs.append(ref)
            origins.append(origin)
            skipped += replaced
            if i + 1 == batch_size:
                break
        del first, volume  # the volumes are copied: their buffers may go back to the reader's pool now
        yield {
            **({} if slot is None else {"slot": slot}),
            "image": image[: len(refs)],
            "masks": masks[: len(refs)],
            "origin": torch.from_numpy(np.stack(origins).astype(np.int64)),
            "id": [ref.id for ref in refs],
            "skipped": skipped,
            "metadata": {
                name: torch.tensor([ref.metadata[j] for ref in refs], dtype=dtype)
                for j, (name, dtype) in enumerate(metadata)
            },  # fmt: skip
        }


def unpack_masks(batch: dict[str, Any], pool: BufferPool | None = None) -> dict[str, Any]:
    """The batch with its mask code split into anatomy, deface and valid (uint8 0/1), on its device (on the
    host, into `pool`'s buffers if given)."""
    batch = dict(batch)
    masks = batch.pop("masks")
    for name, bit in MASK_BITS.items():
        out = None if pool is None else pooled_tensor(pool, masks.shape, torch.uint8)
        batch[name] = torch.bitwise_and(masks, 1 << bit, out=out).ne_(0)  # one pass writing 0/1; shifts cost 3x
    return batch


def _overlap(
    origin: np.ndarray, patch_size: tuple[int, int, int], shape: tuple[int, ...]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The part of the patch inside the volume, as (volume slices, patch slices)."""
    src = tuple(slice(max(int(o), 0), min(int(o) + p, d)) for o, p, d in zip(origin, patch_size, shape, strict=True))
    dst = tuple(slice(s.start - int(o), s.stop - int(o)) for s, o in zip(src, origin, strict=True))
    return src, dst


def _zero_outside(out: np.ndarray, box: tuple[slice, ...]) -> None:
    """Zero `out` outside `box`: only the slabs around it, so an unpadded patch costs nothing here."""
    for axis, part in enumerate(box):
        before, after = [slice(None)] * out.ndim, [slice(None)] * out.ndim
        before[axis], after[axis] = slice(0, part.start), slice(part.stop, None)
        out[tuple(before)] = 0
        out[tuple(after)] = 0
