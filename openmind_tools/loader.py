"""Stream fixed-size patches (with anatomy, deface and valid masks) from the stores a manifest names.

One epoch = every selected volume read once per rank group, split by rank (torchrun's RANK/WORLD_SIZE)
then by DataLoader worker, `crops_per_volume` patches per read, because a 160^3 patch is nearly a whole
1 mm head and the read + decode is the cost. PatchLoader batches are dicts: image (B, 1, P, P, P) float16,
anatomy/deface/valid (B, 1, P, P, P) uint8, origin (B, 3) int64 (the patch's first voxel in the stored
volume, negative where padded), id (list of B volume ids). `make_loader` wraps a torch DataLoader,
lends its workers shared-memory batch slots that the main process hands back (batch_memory), and copies each
batch to the device on a side CUDA stream one batch ahead. The README's loader section has the numbers.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import math
import numbers
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from time import perf_counter
from typing import Any

import numcodecs
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from openmind_tools import wds_store, zarr_store
from openmind_tools.batch_memory import HandBack, fresh_memory, pooled_memory, pooled_tensor
from openmind_tools.buffers import BufferPool
from openmind_tools.errors import ConfigError, OpenMindError, StoreError
from openmind_tools.loader_stages import (
    balanced,
    batches,
    crop_volumes,
    read_volumes,
    replace_failures,
    shuffled,
    split_by_rank,
    split_by_worker,
    unpack_masks,
    wrap_to_multiple,
)
from openmind_tools.manifest import balance_weights, resolve_manifest
from openmind_tools.manifest_io import whole_number
from openmind_tools.reads import Reader
from openmind_tools.volume import Volume, VolumeRef

# Each store module offers the same few names: NAME, MANIFEST_COLUMNS, locate (a manifest row -> where its sample
# lives), check (once per dataset, before any epoch) and read (one VolumeRef -> a checked Volume).
STORES = {store.NAME: store for store in (zarr_store, wds_store)}
ON_ERROR = ("raise", "skip")
_BATCH_BUFFERS = 12  # host buffers kept for batches: the caller's, PatchLoader's two ahead, each image + masks
STATE_FORMAT = "openmind-loader/2"  # 2: tar samples planned per volume like Zarr (no shard order, no shuffle buffer)
MAX_PATCH_EDGE = 512  # voxels: the largest crop edge a loader accepts (see _patch_size)


class PatchDataset(IterableDataset):
    """Patches from the volumes of a manifest, deterministic per seed.

    `manifest` is anything `openmind_tools.manifest.resolve_manifest` takes (a parquet path or URL, a
    DataFrame from load_manifest/query, "mae8 min_quality=3 of out/manifest.parquet"), and `filters`
    (modality=, preset=, min_quality=, where=, ...) select from it as `manifest.query` does. `root` is
    the folder relative store paths resolve against (default: the manifest's folder; needed for a
    DataFrame built by hand). `storage_options` reach fsspec, e.g. {"endpoint_url": ...} for S3-compatible
    storage (for a chained URL such as `simplecache::s3://...`, key them by protocol: {"s3": {...}}).
    `on_error="skip"` replaces an unreadable volume (see `replace_failures`) instead of stopping.
    `prefetch` is the number of volumes each worker reads ahead on threads; `attempts` and `backoff_s` are the
    tries per object read and the first wait between them. `rank`/`world_size` default to torchrun's environment.
    `metadata` names manifest columns to put on every batch as batch["metadata"][column], a (B,) tensor: a
    column whose present values are all numbers is float32 with NaN where missing; any other is categorical,
    int64 codes into `self.categories[column]` (its sorted distinct values; -1 where missing).
    `balance_by` (a column or several) draws each epoch's volumes with replacement, inversely to the size of
    their group (manifest.balance_weights): as many draws as volumes, the same on every rank, resumable.
    Iterating yields batches of the position's batch size (`make_loader` sets it; 1 by default) with the
    masks still packed in one uint8 code ("masks"; `loader_stages.unpack_masks` splits it).
    """

    def __init__(
        self,
        manifest: str | Path | pd.DataFrame | dict[str, Any],
        patch_size: int | tuple[int, int, int] = 160,
        *,
        store: str = "zarr",
        crops_per_volume: int = 1,
        foreground_bias: float = 0.0,
        seed: int = 0,
        root: str | Path | None = None,
        storage_options: dict[str, Any] | None = None,
        on_error: str = "raise",
        prefetch: int = 2,
        attempts: int = 4,  # tries per object before a transient error counts as a read failure
        backoff_s: float = 0.2,  # first wait between tries; doubles each time
        rank: int | None = None,
        world_size: int | None = None,
        metadata: Sequence[str] = (),
        balance_by: str | Sequence[str] = (),
        **filters: Any,
    ) -> None:
        super().__init__()
        self.patch_size = _patch_size(patch_size)
        if not isinstance(store, str) or store not in STORES:
            raise ConfigError(f"store: expected one of {sorted(STORES)}, got {store!r}")
        if on_error not in ON_ERROR:
            raise ConfigError(f"on_error: expected one of {ON_ERROR}, got {on_error!r}")
        if crops_per_volume < 1:
            raise ConfigError(f"crops_per_volume: expected at least 1, got {crops_per_volume}")
        if not 0.0 <= foreground_bias <= 1.0:
            raise ConfigError(f"foreground_bias: expected a probability in [0, 1], got {foreground_bias}")
        if not 1 <= attempts <= 20 or prefetch < 0 or not 0 <= backoff_s <= 60:
            raise ConfigError(f"attempts in [1, 20], prefetch >= 0, backoff_s in [0, 60] s expected, got {attempts}, "
                              f"{prefetch}, {backoff_s}")  # fmt: skip
        self.store, self.crops_per_volume, self.foreground_bias = store, crops_per_volume, foreground_bias
        self.seed, self.on_error, self.prefetch = seed, on_error, prefetch
        self.attempts, self.backoff_s = attempts, backoff_s
        self.storage_options = dict(storage_options or {})
        self.rank, self.world_size = _distributed(rank, world_size)

        rows, meta = resolve_manifest(manifest, self.storage_options, **filters)
        base = str(root) if root is not None else meta.get("store_root")
        self.settings_hash = _settings_hash(rows, meta)
        rows = rows.sort_values("id", kind="stable")  # the order of self.volumes
        self.metadata = tuple(metadata)
        self.categories, values = typed_metadata(rows, self.metadata)
        self.volumes = _volume_refs(rows, STORES[store], None if base is None else base.rstrip("/"), values)
        self.balance_by = (balance_by,) if isinstance(balance_by, str) else tuple(balance_by)
        self._weights = balance_weights(rows, self.balance_by) if self.balance_by else None
        STORES[store].check(self.volumes, self._reader(), self.settings_hash)
        # (epoch, batches already consumed, batch size) where the next iteration starts: written by the main
        # process before it iterates (set_position), read by every worker as it starts; shared memory, so
        # persistent workers see updates.
        self._position = torch.zeros(3, dtype=torch.int64).share_memory_()
        self._position[2] = 1
        self._process: tuple[int, Reader, BufferPool] | None = None  # (pid, reader, batch buffers): _per_process
        self._hand_back: HandBack | None = None  # set only on make_loader's copy (`lending`)

    # ------------------------------------------------------------------------------------------ position
    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of `epoch` (the order and crops change with it)."""
        self.set_position(epoch, 0, self.position[2])

    def set_position(self, epoch: int, batches: int, batch_size: int) -> None:
        """Start the next iteration after `batches` batches of `batch_size` of `epoch` (PatchLoader calls it)."""
        if epoch < 0 or batches < 0 or batch_size < 1:
            raise ConfigError(f"position: expected epoch >= 0, batches >= 0, batch_size >= 1, got "
                              f"{epoch}, {batches}, {batch_size}")  # fmt: skip
        self._position[0], self._position[1], self._position[2] = epoch, batches, batch_size

    @property
    def position(self) -> tuple[int, int, int]:
        """(epoch, batches consumed, batch size) where the next iteration starts."""
        epoch, batches, batch_size = (int(v) for v in self._position)
        return epoch, batches, batch_size

    def state_dict(self) -> dict[str, Any]:
        """Seed, position and everything that decides the batch sequence, as a plain JSON-able dict."""
        epoch, batches, batch_size = self.position
        return {
            "format": STATE_FORMAT,
            "seed": self.seed,
            "epoch": epoch,
            "batches": batches,
            "batch_size": batch_size,
            "store": self.store,
            "patch_size": list(self.patch_size),
            "crops_per_volume": self.crops_per_volume,
            "foreground_bias": self.foreground_bias,
            "world_size": self.world_size,
            "volumes": len(self.volumes),
            "volume_ids": _digest(v.id for v in self.volumes),
            "balance_by": list(self.balance_by),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position; refuse a state from a dataset that would yield other batches."""
        _check_state(state, self.state_dict(), position=("epoch", "batches", "batch_size"))
        self.set_position(state["epoch"], state["batches"], state["batch_size"])

    def batches_per_epoch(self, batch_size: int, num_workers: int) -> int:
        """Batches one rank yields per epoch: the same on every rank (the volume list is padded)."""
        workers = max(num_workers, 1)
        per_worker = math.ceil(len(self.volumes) / (self.world_size * workers))
        return workers * math.ceil(per_worker * self.crops_per_volume / batch_size)

    # ------------------------------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            numcodecs.blosc.set_nthreads(1)  # the DataLoader workers are the parallelism
        epoch, consumed, batch_size = self.position
        # The DataLoader asks its workers for batches round-robin, starting at worker 0, and every worker
        # has as many, so batch i of an epoch comes from worker i % W. After `consumed` batches, DataLoader
        # worker j plays the part of worker (j + consumed) % W, which made every W-th of them.
        worker = (worker + consumed) % num_workers
        skip = len(range(worker, consumed, num_workers)) * batch_size
        volumes = self.volumes
        if self._weights is not None:
            volumes = balanced(volumes, weights=self._weights, seed=self.seed, epoch=epoch)
        volumes = shuffled(volumes, seed=self.seed, epoch=epoch)
        volumes = wrap_to_multiple(volumes, multiple=self.world_size * num_workers)
        rank_volumes = list(split_by_rank(volumes, rank=self.rank, world_size=self.world_size))
        volumes = list(split_by_worker(rank_volumes, worker=worker, num_workers=num_workers))
        read = self._read_function()
        reads, partial = divmod(skip, self.crops_per_volume)

        def spares() -> Iterator[tuple[VolumeRef, Volume | StoreError]]:  # read only if all of `volumes` fail
            mine = {v.id for v in volumes}
            return self._read_in_order([v for v in rank_volumes if v.id not in mine], read)

        slots = itertools.islice(enumerate(volumes), reads, None)  # a resumed epoch reads nothing it skips
        loaded = read_volumes(slots, read=read, prefetch=self.prefetch)
        crops = crop_volumes(
            replace_failures(loaded, on_error=self.on_error, spares=spares),
            patch_size=self.patch_size,
            crops_per_volume=self.crops_per_volume,
            foreground_bias=self.foreground_bias,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            worker=worker,
        )
        yield from batches(itertools.islice(crops, partial, None), batch_size=batch_size, patch_size=self.patch_size,
                           metadata=self.metadata_types, memory=self._batch_memory(info))  # fmt: skip

    def _batch_memory(self, info: Any) -> Any:
        """Where this process writes its batches: pooled buffers in the main process, the hand-back slots that
        make_loader lent in a DataLoader worker, else fresh shared memory (a plain DataLoader's workers)."""
        if info is None:
            return functools.partial(pooled_memory, self._per_process()[1])
        if self._hand_back is None or self._hand_back.out.shape[0] != info.num_workers:
            return fresh_memory
        self._hand_back.restart(info.id)
        return functools.partial(self._hand_back.take, info.id)

    def lending(self, hand_back: HandBack | None) -> PatchDataset:
        """A shallow copy whose DataLoader workers write their batches into `hand_back`'s slots (make_loader's
        own): the caller's dataset never has one, so no other DataLoader over it sees those slots. The copy
        shares the position (shared memory) and everything else."""
        lent = copy.copy(self)
        lent._hand_back = hand_back
        return lent

    @property
    def metadata_types(self) -> tuple[tuple[str, torch.dtype], ...]:
        """(column, dtype) of each requested metadata column, as batches carry them."""
        return tuple((c, torch.float32 if self.categories[c] is None else torch.int64) for c in self.metadata)

    def read_each(self) -> Iterator[tuple[VolumeRef, Volume | StoreError]]:
        """Every selected volume once, in this process: for evaluation, not for training.

        The same stores, reads and checks as an epoch, without its shuffle, padding or split by rank and
        worker. A volume that cannot be read comes out as its StoreError, for the caller to count.
        """
        return self._read_in_order(self.volumes, self._read_function())

    def _read_in_order(self, volumes: list[VolumeRef], read: Any) -> Iterator[tuple[VolumeRef, Volume | StoreError]]:
        for _, ref, volume in read_volumes(enumerate(volumes), read=read, prefetch=self.prefetch):
            yield ref, volume

    def _reader(self) -> Reader:
        return Reader.for_url(self.volumes[0].url, self.storage_options, attempts=self.attempts,
                              backoff_s=self.backoff_s)  # fmt: skip

    def _read_function(self) -> Any:
        """The store's `read` of one VolumeRef, bound to this process's reader and the manifest's settings hash."""
        reader = self._per_process()[0]
        return functools.partial(STORES[self.store].read, reader=reader, settings_hash=self.settings_hash)

    def _per_process(self) -> tuple[Reader, BufferPool]:
        """This process's reader and batch buffers: made in it (fsspec filesystems hold sockets and event loops,
        so each DataLoader worker opens its own), then kept across epochs, so their pooled buffers stay mapped."""
        if self._process is None or self._process[0] != os.getpid():
            self._process = (os.getpid(), self._reader(), BufferPool(_BATCH_BUFFERS))
        return self._process[1:]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_process": None}  # a spawned worker makes its own


class PatchLoader:
    """A torch DataLoader over a PatchDataset that delivers batches on `device`, one batch ahead.

    While the caller works on batch i, batch i+1 is already fetched and its host-to-device copy runs on
    a side CUDA stream (from pinned memory); on CPU the same path runs without streams. `wait_s` is how
    long the last batch kept the caller waiting (the trainer logs the data-stall fraction from it).
    Iterating continues from the saved position: after a `break` or `load_state_dict`, the next
    iteration resumes mid-epoch; after a full epoch the position moves to the next epoch.
    """

    def __init__(
        self,
        dataset: PatchDataset,
        loader: DataLoader,
        batch_size: int,
        device: torch.device,
        hand_back: HandBack | None = None,
    ) -> None:
        self.dataset, self.loader, self.device, self._hand_back = dataset, loader, device, hand_back
        self.batch_size, self.num_workers = batch_size, loader.num_workers
        self._epoch, self._done, _ = dataset.position  # live progress, kept here in the main process
        dataset.set_position(self._epoch, self._done, batch_size)
        self.wait_s = 0.0
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pool = BufferPool(_BATCH_BUFFERS) if self._stream is None else None  # the masks split on the host
        self._mapped: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}  # (worker, slot) -> its tensors, here

    def __len__(self) -> int:
        return self.dataset.batches_per_epoch(self.batch_size, self.num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, done = self._epoch, self._done
        # Where the workers start. Written only here, before they are asked for anything: a worker that
        # starts late (spawn imports, a busy node) must not see the progress made meanwhile.
        self.dataset.set_position(epoch, done, self.batch_size)
        stream = iter(self.loader)
        start = perf_counter()
        try:
            pending = self._to_device(next(stream, None))
            while pending is not None:
                upcoming = self._to_device(next(stream, None))  # its copy overlaps the caller's step on `pending`
                ready = self._ready(pending)
                self.wait_s = perf_counter() - start
                done += 1
                self._done = done
                yield ready
                start = perf_counter()
                pending = upcoming
        except OpenMindError as e:  # from a worker, torch re-raises it with the worker's traceback as its message
            self.close()  # a worker failed: stop them all now, not seconds later when garbage-collected
            raise type(e)(_worker_message(e)) from None
        except Exception:
            self.close()
            raise
        self._epoch, self._done = epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch, self._done = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        live = {"epoch": self._epoch, "batches": self._done, "batch_size": self.batch_size}
        return {**self.dataset.state_dict(), **live, "num_workers": self.num_workers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved batch; the worker count and batch size must match (they decide the order)."""
        for key, ours in (("num_workers", self.num_workers), ("batch_size", self.batch_size)):
            if state.get(key) != ours:
                raise ConfigError(f"loader state: found {key}={state.get(key)!r} instead of {ours!r}")
        self.dataset.load_state_dict({k: v for k, v in state.items() if k != "num_workers"})
        self._epoch, self._done, _ = self.dataset.position

    def close(self) -> None:
        """Stop the persistent workers now (otherwise they stop when the loader is garbage-collected)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
            self.loader._iterator = None
        self._mapped.clear()  # the stopped workers' segments

    def _to_device(self, batch: dict[str, Any] | None) -> dict[str, Any] | None:
        """Start the batch's copy (and the split of its mask code) on the side stream; CPU: split here. A batch in
        a worker's hand-back slot is copied out first (on CUDA the pinned copy already is), then handed back."""
        if batch is None:
            return None
        slot = batch.pop("slot", None)
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                moved = unpack_masks(_moved(batch, self.device))  # from the pinned copy the DataLoader made
        else:
            if slot is not None:
                # Kept mapped (torch maps a segment it still holds again for free, else anew: page faults), and
                # the image copied out: its worker writes that memory again once handed back.
                self._mapped[tuple(slot)] = (batch["image"], batch["masks"])
                batch["image"] = pooled_tensor(self._pool, batch["image"].shape, torch.float16).copy_(batch["image"])
            moved = unpack_masks(batch, self._pool)
        if slot is not None:
            self._hand_back.give_back(*slot)
        return moved

    def _ready(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Make the caller's stream wait for the copy, and keep the memory alive for that stream."""
        if self._stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._stream)
            for value in [*batch.values(), *batch["metadata"].values()]:
                if torch.is_tensor(value):
                    value.record_stream(current)
        return batch


def make_loader(
    dataset: PatchDataset,
    batch_size: int,
    *,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    prefetch_factor: int = 2,
    multiprocessing_context: str | None = None,
) -> PatchLoader:
    """A PatchLoader: persistent workers (stores stay open across epochs), pinned memory on CUDA."""
    for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                               ("prefetch_factor", prefetch_factor, 1)):  # fmt: skip
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
            raise ConfigError(f"{name}: expected an integer of at least {least}, got {value!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device: expected a torch device such as 'cpu' or 'cuda:0', got {device!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device} asked for, but this torch sees no CUDA device")
    # A worker has at most prefetch_factor batches queued, one being written and one being pinned: so many slots
    # (49 MB each at 4 x 160^3) stay mapped per worker; beyond them it makes fresh segments (batch_memory).
    hand_back = HandBack(num_workers, prefetch_factor + 2) if num_workers > 0 else None
    loader = DataLoader(
        dataset.lending(hand_back),
        batch_size=None,  # the dataset batches: crops are copied straight into (shared) batch tensors
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
    )
    return PatchLoader(dataset, loader, batch_size, device, hand_back)


# ---------------------------------------------------------------------------------------------- helpers
def _moved(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors (and those of its metadata dict) copied to `device` without blocking."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else _moved(v, device) if isinstance(v, dict)
                else v) for k, v in batch.items()}  # fmt: skip


def _worker_message(error: Exception) -> str:
    """The message a DataLoader worker's error was raised with, without the traceback torch wraps around it
    ("Caught StoreError in DataLoader worker process 0. Original Traceback ...: openmind_tools.errors.StoreError:
    volume ...")."""
    text = str(error)
    marker = f"{type(error).__module__}.{type(error).__qualname__}: "
    if text.startswith("Caught ") and marker in text:
        return text[text.rindex(marker) + len(marker) :].strip()
    return text


def _patch_size(size: int | tuple[int, int, int]) -> tuple[int, int, int]:
    """A patch edge at most MAX_PATCH_EDGE: a 512^3 crop is 256 MB in float16 (a whole 0.5 mm head); a typo such as
    100000 would otherwise try to allocate petabytes."""
    sizes = (size,) * 3 if isinstance(size, int) else tuple(size)
    if len(sizes) != 3 or any(int(s) != s or not 1 <= s <= MAX_PATCH_EDGE for s in sizes):
        raise ConfigError(f"patch_size: expected a positive int up to {MAX_PATCH_EDGE} or three of them, got {size!r}")
    return tuple(int(s) for s in sizes)


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size: given, else torchrun's RANK/WORLD_SIZE, else a single process."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


def _settings_hash(rows: pd.DataFrame, meta: dict[str, Any]) -> str | None:
    """The one settings hash the rows share (and the manifest's metadata states, if it does)."""
    found = sorted(set(rows["settings_hash"].dropna())) if "settings_hash" in rows else []
    if len(found) > 1:
        raise ConfigError(f"the manifest mixes volumes converted with different settings: settings_hash {found}")
    stated = meta.get("settings_hash")
    if stated is not None and found and found[0] != stated:
        raise ConfigError(f"the manifest's rows have settings_hash {found[0]} but its metadata says {stated}")
    return stated or (found[0] if found else None)


def typed_metadata(rows: pd.DataFrame, columns: tuple[str, ...]) -> tuple[dict[str, list[str] | None], list[tuple]]:
    """The requested columns as per-row tuples of numbers, and each categorical column's categories (None:
    continuous). Typed once here, so every worker and rank puts the same codes on its batches."""
    absent = [c for c in columns if c not in rows]
    if absent:
        raise ConfigError(f"metadata: no manifest column(s) {absent}; the manifest has {sorted(rows.columns)}")
    categories: dict[str, list[str] | None] = {}
    typed = []
    for column in columns:
        raw = rows[column].where(rows[column].astype(str).str.strip() != "")  # an empty CSV cell is missing
        try:
            numbers = pd.to_numeric(raw, errors="coerce").astype("float64")
        except (TypeError, ValueError):  # cells that are lists or dicts: not numbers
            numbers = pd.Series(np.nan, index=raw.index)
        if numbers.notna().sum() == raw.notna().sum():  # every present value is a number
            categories[column] = None
            typed.append(numbers.where(np.isfinite(numbers)).to_numpy())  # an inf age is as missing as none
        else:
            names = sorted({str(v) for v in raw.dropna()})
            categories[column] = names
            codes = {name: i for i, name in enumerate(names)}
            typed.append(np.array([-1 if pd.isna(v) else codes[str(v)] for v in raw], dtype=np.int64))
    return categories, [tuple(v.item() for v in row) for row in zip(*typed, strict=True)] if typed else []


def _volume_refs(rows: pd.DataFrame, store: Any, base: str | None, metadata: list[tuple]) -> list[VolumeRef]:
    """One VolumeRef per row, where `store` (a module of STORES) says the row's sample lives."""
    absent = [c for c in ("id", "shape", *store.MANIFEST_COLUMNS) if c not in rows]
    if absent and store.MANIFEST_COLUMNS[0] in rows:
        raise ConfigError(f"the manifest has no column(s) {absent}, which this loader needs for store={store.NAME!r}: "
                          "it was written by an older openmind-convert; convert the corpus again")  # fmt: skip
    if absent:
        raise ConfigError(f"the manifest has no column(s) {absent} needed for store={store.NAME!r} "
                          f"(was it converted with formats including {store.NAME!r}?)")  # fmt: skip
    if len(rows) == 0:
        raise ConfigError("the manifest (after the query) selects no volumes")
    where = rows[store.MANIFEST_COLUMNS[0]]
    if where.isna().any():
        first = rows.loc[where.isna(), "id"].iloc[0]
        raise ConfigError(f"{int(where.isna().sum())} volume(s), e.g. {first}, have no {store.NAME} store in the "
                          "manifest")  # fmt: skip
    urls: dict[str, str] = {}  # one string per store or shard, shared by its volumes' refs

    def resolve(path: str) -> str:
        if path not in urls:
            urls[path] = _resolve(base, path)
        return urls[path]

    volumes = []
    needed = rows[["id", "shape", *store.MANIFEST_COLUMNS]]  # itertuples over every column cost 4x (measured)
    for i, row in enumerate(needed.itertuples(index=False)):
        shape = _shape(row.id, row.shape)
        url, span, crc32c = store.locate(row, resolve)
        volumes.append(VolumeRef(row.id, shape, url, span, crc32c, metadata[i] if metadata else ()))
    return volumes


def _shape(volume_id: str, value: Any) -> tuple[int, int, int]:
    """A manifest shape cell as 3 positive ints, or a ConfigError naming the volume."""
    try:
        shape = () if isinstance(value, str | bytes) else tuple(whole_number(s) for s in value)
    except TypeError:  # not a sequence
        shape = ()
    if len(shape) != 3 or None in shape or min(shape) < 1:
        raise ConfigError(f"volume {volume_id}: the manifest's shape {value!r} is not 3 positive integers")
    return shape


def _resolve(base: str | None, path: str) -> str:
    if "://" in path or path.startswith("/"):
        return path.rstrip("/")
    if base is None:
        raise ConfigError(f"store path {path!r} is relative: pass root= (the folder the manifest was written to)")
    return f"{base}/{path}".rstrip("/")


def _digest(ids: Iterator[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def _check_state(state: dict[str, Any], ours: dict[str, Any], position: tuple[str, ...]) -> None:
    if not isinstance(state, dict):
        raise ConfigError(f"loader state: expected a dict, got {type(state).__name__}")
    unknown, missing = sorted(set(state) - set(ours)), sorted(set(ours) - set(state))
    if unknown or missing:
        raise ConfigError(f"loader state: unknown keys {unknown}, missing keys {missing}")
    for key, value in ours.items():
        if key not in position and state[key] != value:
            raise ConfigError(f"loader state: found {key}={state[key]!r} instead of {value!r}")
