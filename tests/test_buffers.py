"""Reused host buffers: a buffer goes out again only when nothing holds it, and what reads into it is exact."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from loader_helpers import PATCH, mni_volumes, write_store

from openmind_tools import zarr_store
from openmind_tools.batch_memory import HandBack
from openmind_tools.buffers import BufferPool
from openmind_tools.loader import PatchDataset, make_loader
from openmind_tools.reads import Reader


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def test_a_buffer_is_reused_only_once_nothing_holds_it() -> None:
    pool = BufferPool(limit=4)
    first = pool.array((10, 20), np.float16)
    where = _address(first)
    assert _address(pool.array((10, 20), np.float16)) != where  # `first` still holds its buffer
    del first
    again = pool.array((8, 20), np.float16)
    assert _address(again) == where and again.shape == (8, 20) and again.flags.c_contiguous
    view = again[2:]
    del again
    assert _address(pool.array((8, 20), np.float16)) != where  # a view holds the buffer too
    del view
    tensor = torch.from_numpy(pool.array((10, 20), np.float16))
    part = tensor[3:]
    del tensor
    assert _address(pool.array((10, 20), np.float16)) != where  # a tensor's slice holds its array
    del part
    assert _address(pool.array((10, 20), np.float16)) == where


def test_a_full_pool_makes_new_buffers_and_keeps_at_most_its_limit() -> None:
    pool = BufferPool(limit=2)
    held = [pool.array((1000,), np.uint8) for _ in range(5)]
    assert len({_address(a) for a in held}) == 5 and len(pool._owners) == 2
    held[0][:] = 7
    big = pool.array((5000,), np.uint8)  # larger than any free buffer
    assert (held[0] == 7).all() and not np.shares_memory(big, held[0])


def test_threads_never_share_a_buffer() -> None:
    pool, clashes = BufferPool(limit=3), []

    def work(value: int) -> None:
        for _ in range(200):
            array = pool.array((4096,), np.int64)
            array[:] = value
            if not (array == value).all():
                clashes.append(value)

    threads = [threading.Thread(target=work, args=(v,)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert clashes == []


@pytest.mark.parametrize("size", [100, 70_000, 300_001])  # below and above the pooled-read size
def test_local_reads_into_pooled_buffers_return_the_exact_bytes(tmp_path: Path, size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "b").write_bytes(data[::-1])
    reader = Reader.for_url(str(tmp_path))
    whole = reader.cat([str(tmp_path / "a"), str(tmp_path / "b")])
    assert [bytes(w) for w in whole] == [data, data[::-1]]
    spans = [(7, size // 2), (size - 10, 50)]  # the second runs past the end: it comes back short
    parts = reader.cat([str(tmp_path / "a")] * 2, spans)
    assert [bytes(p) for p in parts] == [data[7 : 7 + size // 2], data[size - 10 :]]
    again = reader.cat([str(tmp_path / "b")])[0]
    assert bytes(whole[0]) == data and bytes(again) == data[::-1]  # a held result is never overwritten


def test_a_hand_back_slot_is_written_again_only_once_handed_back() -> None:
    hand_back = HandBack(workers=2, slots=2)
    specs = (((2, 3), torch.float16), ((2, 3), torch.uint8))
    first, (image, masks) = hand_back.take(1, specs)
    second, _ = hand_back.take(1, specs)
    assert first == (1, 0) and second == (1, 1) and image.is_shared() and masks.dtype == torch.uint8
    none, fresh = hand_back.take(1, specs)  # both out: a fresh segment, never a wait
    assert none is None and fresh[0].data_ptr() not in {image.data_ptr()}
    assert hand_back.take(0, specs)[0] == (0, 0)  # the other worker's slots are its own
    hand_back.give_back(*first)
    again, (image_again, _) = hand_back.take(1, specs)
    assert again == first and image_again.data_ptr() == image.data_ptr()
    hand_back.restart(1)
    assert hand_back.out[1].tolist() == [0, 0] and hand_back.out[0].tolist() == [1, 0]


def _assert_own_voxels(held: list[dict], volumes: dict) -> None:
    """Each held batch still holds the crops its ids and origins name, and no two share memory."""
    assert len({b["image"].data_ptr() for b in held}) == len(held)
    for batch in held:
        for i, (volume_id, origin) in enumerate(zip(batch["id"], batch["origin"].tolist(), strict=True)):
            image = volumes[volume_id].image
            box = tuple(slice(max(o, 0), o + PATCH) for o in origin)
            inside = tuple(slice(s.start - o, s.start - o + image[box].shape[k])
                           for k, (s, o) in enumerate(zip(box, origin, strict=True)))  # fmt: skip
            assert np.array_equal(batch["image"][i, 0].numpy()[inside], image[box])
            assert int(batch["valid"][i].sum()) == image[box].size


@pytest.mark.parametrize(("store", "workers"), [("zarr", 0), ("wds", 0), ("zarr", 2), ("wds", 1)])
def test_every_held_batch_of_an_epoch_keeps_its_own_voxels(tmp_path: Path, store: str, workers: int) -> None:
    volumes = mni_volumes(9, seed=3)
    dataset = PatchDataset(write_store(tmp_path, volumes), PATCH, store=store, foreground_bias=0.5, crops_per_volume=3)
    loader = make_loader(dataset, batch_size=2, num_workers=workers)
    for held in (list(loader), list(loader)):  # every batch alive at once; the second epoch reuses the memory
        _assert_own_voxels(held, volumes)
        if workers:
            assert int(loader._hand_back.out.sum()) == 0  # every slot handed back
    loader.close()


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_broken_off_epoch_leaves_no_slot_out_and_no_batch_overwritten(tmp_path: Path, context: str) -> None:
    volumes = mni_volumes(8, seed=5)
    dataset = PatchDataset(write_store(tmp_path, volumes), PATCH, crops_per_volume=3)
    loader = make_loader(dataset, batch_size=2, num_workers=2, multiprocessing_context=context)
    assert dataset._hand_back is None  # the caller's dataset lends no slots to another DataLoader
    early = []
    for batch in loader:  # the workers have batches in flight when the epoch is broken off
        early.append(batch)
        if len(early) == 2:
            break
    held = early + list(loader) + list(loader)  # the rest of that epoch, then a whole one
    _assert_own_voxels(held, volumes)
    assert len(held) == len(loader) * 2 and int(loader._hand_back.out.sum()) == 0
    loader.close()


def test_a_demo_head_reads_the_same_through_the_pool_as_through_zarr(demo_out: Path) -> None:
    manifest = demo_out / "manifest.parquet"
    dataset = PatchDataset(manifest, 160)
    read = dataset._read_function()
    held = [(ref, read(ref)) for ref in dataset.volumes[:3]]  # all alive at once: none may overwrite another
    for ref, volume in held:
        group = zarr_store.open_volume(Path(ref.url), ref.id)
        assert np.array_equal(volume.image, group["image"][:]) and np.array_equal(volume.code, group["mask"][:])
