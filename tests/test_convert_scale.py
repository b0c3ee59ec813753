"""The corners that grow with the corpus: shard membership under retries, the driver's window, verify on dask."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from openmind_tools import wds_store, zarr_store
from openmind_tools.convert import convert
from openmind_tools.corpus import CSV_NAME
from openmind_tools.parallel import run_tasks
from openmind_tools.verify import verify


def _shard_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted((out / "shards").glob("*.tar"))}


def test_a_retried_volume_goes_to_a_new_shard_and_rewrites_none(demo_corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.symlink_to(demo_corpus)
    images = pd.read_csv(demo_corpus / CSV_NAME)["image_path"]
    victim = demo_corpus / "OpenMind" / sorted(images)[2]  # an early id: a cumulative cut would shift every shard
    hidden = tmp_path / "hidden.nii.gz"
    victim.rename(hidden)
    out = tmp_path / "out"
    try:
        first = convert(root, out, formats=("wds",), shard_bytes=40 * 2**20, progress=False)
    finally:
        hidden.rename(victim)
    assert first.failed == 1
    before = _shard_stats(out)
    assert len(before) >= 4
    again = convert(root, out, formats=("wds",), shard_bytes=40 * 2**20, retry_errors=True, progress=False)
    assert again.failed == 0 and again.converted == 19
    after = _shard_stats(out)
    assert {name: after[name] for name in before} == before  # no shard rewritten
    assert len(after) == len(before) + 1  # the retried volume's own new shard
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert manifest["wds_shard"].map(wds_store.shard_index).max() == len(after) - 1
    assert verify(out, progress=False) == []


def _slow(item: int, seconds: float) -> int:
    time.sleep(seconds)
    return item


def test_the_driver_submits_through_a_bounded_window() -> None:
    from dask.distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        seen, stop = [], threading.Event()

        def watch() -> None:
            while not stop.is_set():
                seen.append(len(cluster.scheduler.tasks))
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            results = list(run_tasks(_slow, list(range(24)), client, progress=False, what="t", window=3,
                                     seconds=0.05))  # fmt: skip
        finally:
            stop.set()
            watcher.join()
    assert sorted(results) == list(range(24))
    assert max(seen) <= 2 * 3  # a window of 3 (released tasks leave the scheduler a moment later); 24 before


def test_verify_on_a_dask_cluster_finds_what_the_serial_one_finds(demo_corpus: Path, tmp_path: Path) -> None:
    from dask.distributed import Client, LocalCluster

    out = tmp_path / "out"
    convert(demo_corpus, out, formats=("zarr", "wds"), limit=5, progress=False)
    manifest = pd.read_parquet(out / "manifest.parquet")
    chunk = out / "store.zarr" / manifest["zarr_array"].iloc[2] / zarr_store.CHUNKS["image"]
    chunk.write_bytes(chunk.read_bytes()[:1000])
    serial = verify(out, progress=False)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        parallel = verify(out, progress=False, client=client)
    assert [str(p) for p in parallel] == [str(p) for p in serial]
    assert [p.volume_id for p in serial] == [manifest["id"].iloc[2]]


@pytest.mark.parametrize("files", [40])
def test_the_stale_shard_sweep_is_linear(demo_corpus: Path, tmp_path: Path, monkeypatch, files: int) -> None:
    out = tmp_path / "out"
    convert(demo_corpus, out, formats=("wds",), limit=3, progress=False)
    for i in range(files):  # shard files of an earlier, larger plan
        (out / "shards" / f"shard-{900 + i:06d}.tar").write_bytes(b"")
    calls = []
    real = wds_store.shard_name
    monkeypatch.setattr(wds_store, "shard_name", lambda index: calls.append(index) or real(index))
    convert(demo_corpus, out, formats=("wds",), limit=3, progress=False)
    assert len(calls) <= 4  # the names of the plan, once each, not once per file on disk
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == ["shard-000000.tar"]
