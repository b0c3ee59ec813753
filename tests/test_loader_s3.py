"""The loader over S3-compatible object storage: a real moto server on loopback, stores uploaded with s3fs,
patches read through fsspec in DataLoader workers must equal those read from the local copy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs
import torch
from loader_helpers import PATCH, mni_volumes, write_store
from moto.server import ThreadedMotoServer

from openmind_tools import zarr_store
from openmind_tools.errors import StoreError
from openmind_tools.loader import PatchDataset, make_loader

REQUESTS: list[tuple[str, str]] = []  # (method, path) of every request the server answered


@pytest.fixture(scope="module")
def s3_options() -> Iterator[dict]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    app = server._server.app  # count every request, whichever process (a DataLoader worker) sends it

    def counted(environ: dict, start_response: object) -> object:
        REQUESTS.append((environ["REQUEST_METHOD"], environ["PATH_INFO"]))
        return app(environ, start_response)

    server._server.app = counted
    host, port = server.get_host_and_port()
    yield {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    server.stop()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, s3_options: dict) -> tuple[Path, str]:
    """The same small store on local disk and at s3://loader-test/store."""
    local = write_store(tmp_path_factory.mktemp("s3store"), mni_volumes(10, seed=2), shards=2).parent
    fs = s3fs.S3FileSystem(**s3_options)
    fs.mkdir("loader-test")
    fs.put(str(local), "loader-test/store", recursive=True)
    return local, "s3://loader-test/store"


@pytest.mark.parametrize("store", ["zarr", "wds"])
def test_patches_over_s3_equal_the_local_ones(stores: tuple[Path, str], s3_options: dict, store: str) -> None:
    local, remote = stores

    def epoch(manifest: str, **options) -> list[dict]:
        dataset = PatchDataset(manifest, PATCH, store=store, crops_per_volume=2, foreground_bias=0.5, seed=4,
                               **options)  # fmt: skip
        loader = make_loader(dataset, batch_size=4, num_workers=2)
        batches = list(loader)
        loader.close()
        return batches

    expected = epoch(str(local / "manifest.parquet"))
    got = epoch(f"{remote}/manifest.parquet", storage_options=s3_options)
    assert len(got) == len(expected) == 6  # 10 volumes padded to 12 for 2 workers, 2 crops each, batches of 4
    for a, b in zip(got, expected, strict=True):
        assert a["id"] == b["id"]
        for key in ("image", "anatomy", "deface", "valid", "origin"):
            assert torch.equal(a[key], b[key]), key


def test_missing_object_on_s3_names_the_volume_and_url(stores: tuple[Path, str], s3_options: dict) -> None:
    local, remote = stores
    dataset = PatchDataset(f"{remote}/manifest.parquet", PATCH, storage_options=s3_options)
    lost = dataset.volumes[3].id
    fs = s3fs.S3FileSystem(**s3_options)
    fs.rm(f"{remote}/store.zarr/{zarr_store.group_path(lost)}", recursive=True)
    try:
        with pytest.raises(
            StoreError, match=f"{lost}: no object s3://loader-test/store/store.zarr/{zarr_store.group_path(lost)}"
        ):
            list(make_loader(dataset, batch_size=4, num_workers=1))
    finally:  # the other tests read the same bucket
        fs.put(
            str(local / "store.zarr" / zarr_store.group_path(lost)),
            f"{remote}/store.zarr/{zarr_store.group_path(lost)}",
            recursive=True,
        )


@pytest.mark.parametrize("cache", ["simplecache", "filecache"])
@pytest.mark.parametrize("store", ["zarr", "wds"])
def test_a_caching_url_reads_no_object_twice(stores: tuple[Path, str], s3_options: dict, tmp_path: Path, store: str,
                                             cache: str) -> None:  # fmt: skip
    local, remote = stores
    # simplecache:: keeps no metadata, so DataLoader workers can share its folder; filecache:: keeps a metadata file
    # per cache that processes overwrite in turn (an entry lost, an object fetched twice), so it runs in one process
    workers = 2 if cache == "simplecache" else 0
    options = {"s3": s3_options, cache: {"cache_storage": str(tmp_path / "cache")}}
    dataset = PatchDataset(f"{cache}::{remote}/manifest.parquet", PATCH, store=store, seed=4, storage_options=options)
    loader = make_loader(dataset, batch_size=4, num_workers=workers)
    expected = make_loader(PatchDataset(local / "manifest.parquet", PATCH, store=store, seed=4), batch_size=4,
                           num_workers=workers)  # fmt: skip
    epochs = []
    for _ in range(3):
        REQUESTS.clear()
        got = list(loader)
        epochs.append(REQUESTS.copy())
        for a, b in zip(got, list(expected), strict=True):
            assert a["id"] == b["id"] and torch.equal(a["image"], b["image"])
    loader.close()
    expected.close()
    objects = {path for method, path in epochs[0] if method == "GET"}
    assert len(objects) == (40 if store == "zarr" else 2)  # 10 x (image, mask) x (chunk, metadata), or 2 shards
    assert epochs[1] == epochs[2] == []  # not one request: every byte came from the local cache
