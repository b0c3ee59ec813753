"""Conversion from and to S3-compatible object storage on a dask cluster that shares no folder with the driver.

A real moto server on loopback holds the corpus and receives the stores; the local copy of the corpus is gone
before the conversion starts, and the workers run in their own folders, so every byte they read or write
travels through the object store. Checked: the result equals the local conversion of the same corpus, a
kill -9 of the driver resumes to the same manifest, verify and verify --repair work there, the loader reads
the result from S3, and a lost connection to the store is a machine error (exit 4) that blames no input.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import s3fs
from moto.server import ThreadedMotoServer

from openmind_tools import zarr_store
from openmind_tools.cli.convert import main
from openmind_tools.convert import convert
from openmind_tools.errors import MachineError
from openmind_tools.journal import JOURNAL_OBJECTS
from openmind_tools.loader import PatchDataset
from openmind_tools.lock import LOCKS
from openmind_tools.verify import repair, verify

LIMIT = 8  # volumes of the demo corpus converted here (the first 8 by id: three datasets, nine modalities)
_COLUMNS = ["id", "checksum", "shape", "spacing", "source_path", "wds_shard", "wds_offset", "wds_size"]


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedMotoServer]:
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    yield moto
    moto.stop()


@pytest.fixture(scope="module")
def options(server: ThreadedMotoServer) -> dict:
    host, port = server.get_host_and_port()
    return {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}


@pytest.fixture(scope="module")
def corpus_url(demo_corpus: Path, options: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo corpus at s3://convert-corpus/openmind, uploaded from a copy that is then deleted."""
    copy = tmp_path_factory.mktemp("upload") / "corpus"
    shutil.copytree(demo_corpus, copy)
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("convert-corpus")
    fs.mkdir("convert-stores")  # the output bucket: a user's to make, with its permissions
    fs.put(str(copy), "convert-corpus/openmind", recursive=True)
    shutil.rmtree(copy)
    return "s3://convert-corpus/openmind"


@pytest.fixture(scope="module")
def local_twin(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The same LIMIT volumes converted from local disk into a local folder: what S3 must reproduce."""
    out = tmp_path_factory.mktemp("local") / "out"
    convert(demo_corpus, out, limit=LIMIT, shard_bytes=3_000_000, progress=False)
    return pd.read_parquet(out / "manifest.parquet")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Two worker processes whose working and temporary folders are their own, not the driver's."""
    from dask.distributed import Client, LocalCluster

    home = tmp_path_factory.mktemp("workers")
    env = {"TMPDIR": str(home)}
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                     local_directory=str(home), env=env) as workers,
        Client(workers) as client,
    ):  # fmt: skip
        client.run(os.chdir, str(home))
        yield client


@pytest.fixture(scope="module")
def converted(corpus_url: str, options: dict, cluster: object, tmp_path_factory: pytest.TempPathFactory) -> str:
    driver = tmp_path_factory.mktemp("driver")
    before = os.getcwd()
    os.chdir(driver)
    try:
        summary = convert(corpus_url, "s3://convert-stores/run", limit=LIMIT, shard_bytes=3_000_000, client=cluster,
                          progress=False, storage_options=options)  # fmt: skip
    finally:
        os.chdir(before)
    assert summary.converted == LIMIT and not summary.failed
    assert not list(driver.iterdir())  # the driver wrote nothing on its own disk
    return "s3://convert-stores/run"


def _manifest(url: str, options: dict) -> pd.DataFrame:
    return pd.read_parquet(f"{url}/manifest.parquet", storage_options=options)


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a[_COLUMNS].reset_index(drop=True), b[_COLUMNS].reset_index(drop=True))


def test_s3_to_s3_on_a_cluster_equals_the_local_conversion(converted: str, options: dict,
                                                           local_twin: pd.DataFrame) -> None:  # fmt: skip
    manifest = _manifest(converted, options)
    _same(manifest, local_twin)
    fs = s3fs.S3FileSystem(**options)
    fs.invalidate_cache()
    objects = fs.find("convert-stores/run")
    assert "convert-stores/run/store.zarr/zarr.json" in objects and not any(f"/{LOCKS}/" in o for o in objects)
    assert {f"convert-stores/run/{s}" for s in manifest["wds_shard"]} <= set(objects)
    assert any(f"/{JOURNAL_OBJECTS}/" in o for o in objects) and not any(".partial" in o for o in objects)
    run = json.loads(fs.cat_file("convert-stores/run/.run.json"))
    assert run["root"] == "s3://convert-corpus/openmind" and "testing" not in json.dumps(run)  # no secret recorded


def test_the_loader_reads_the_result_from_s3(converted: str, options: dict) -> None:
    for store in ("zarr", "wds"):
        dataset = PatchDataset(f"{converted}/manifest.parquet", 32, store=store, storage_options=options)
        checksums = {ref.id: volume.checksum() for ref, volume in dataset.read_each()}
        manifest = _manifest(converted, options)
        assert checksums == dict(zip(manifest["id"], manifest["checksum"], strict=True)), store


def test_verify_and_repair_on_s3(corpus_url: str, options: dict, cluster: object, local_twin: pd.DataFrame) -> None:
    out = "s3://convert-stores/repair"
    convert(corpus_url, out, limit=LIMIT, shard_bytes=3_000_000, client=cluster, progress=False,
            storage_options=options)  # fmt: skip
    assert verify(out, progress=False, client=cluster, storage_options=options) == []
    fs = s3fs.S3FileSystem(**options)
    victim = _manifest(out, options).iloc[2]
    chunk = f"convert-stores/repair/store.zarr/{zarr_store.group_path(victim['id'])}/{zarr_store.CHUNKS['image']}"
    data = bytearray(fs.cat_file(chunk))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(chunk, bytes(data))
    shard = f"convert-stores/repair/{victim['wds_shard']}"
    tar = bytearray(fs.cat_file(shard))
    tar[int(victim["wds_offset"]) + int(victim["wds_size"]) // 2] ^= 0x01  # inside the victim's sample
    fs.pipe_file(shard, bytes(tar))
    problems = verify(out, progress=False, client=cluster, storage_options=options)
    assert {(p.volume_id, p.store) for p in problems} >= {(victim["id"], "zarr")}
    assert any(p.store == "wds" and p.path == f"s3://{shard}" and p.volume_id == victim["id"] for p in problems)
    result = repair(out, problems, client=cluster, progress=False, storage_options=options)
    assert result.unrestored == []
    assert verify(out, progress=False, client=cluster, storage_options=options) == []
    _same(_manifest(out, options), local_twin)


def _start_conversion(corpus_url: str, out: str, options: dict, cwd: Path) -> subprocess.Popen:
    """openmind-convert in its own process, one local worker; returns once it has journaled a batch."""
    argv = [sys.executable, "-m", "openmind_tools.cli.convert", corpus_url, out, "--storage-options",
            json.dumps(options), "--limit", str(LIMIT), "--shard-size", "0.003", "--workers", "1",
            "--quiet"]  # fmt: skip
    driver = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    fs = s3fs.S3FileSystem(**options)
    prefix = f"{out.removeprefix('s3://')}/{JOURNAL_OBJECTS}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        fs.invalidate_cache()
        if fs.find(prefix):  # a batch of finished volumes is journaled
            break
        time.sleep(0.2)
    assert driver.poll() is None, driver.communicate()[0].decode()[-2000:]
    return driver


def test_a_driver_killed_by_signal_9_resumes_to_the_uninterrupted_manifest(
    corpus_url: str, options: dict, converted: str, tmp_path: Path
) -> None:
    out = "s3://convert-stores/killed"
    driver = _start_conversion(corpus_url, out, options, tmp_path)
    os.kill(driver.pid, signal.SIGKILL)
    driver.communicate()
    fs = s3fs.S3FileSystem(**options)
    fs.invalidate_cache()
    assert len(fs.find(f"convert-stores/killed/{LOCKS}")) == 1  # the killed run's lease is left behind ...
    summary = convert(corpus_url, out, limit=LIMIT, shard_bytes=3_000_000, progress=False, storage_options=options)
    assert 1 <= summary.skipped < LIMIT  # ... and taken over at once: its owner is gone from this machine
    _same(_manifest(out, options), _manifest(converted, options))


def test_a_lost_connection_is_a_machine_error_that_blames_no_input(
    corpus_url: str, options: dict, converted: str, tmp_path: Path
) -> None:
    """The object store goes away mid-run: exit 4 naming it, no input journaled as failed; back, the rerun resumes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    own = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # moto's buckets are per process
    own.start()
    fast = {**options, "endpoint_url": f"http://127.0.0.1:{port}", "config_kwargs": {"retries": {"max_attempts": 2}}}
    out = "s3://convert-stores/lost"
    driver = _start_conversion(corpus_url, out, fast, tmp_path)
    own.stop()
    output = driver.communicate(timeout=300)[0].decode()
    assert driver.returncode == 4, output[-3000:]
    assert "object store failed" in output and "Traceback" not in output and "testing" not in output
    again = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    again.start()
    try:
        summary = convert(corpus_url, out, limit=LIMIT, shard_bytes=3_000_000, progress=False, storage_options=fast)
    finally:
        again.stop()
    assert summary.failed == 0 and summary.skipped >= 1
    _same(_manifest(out, options), _manifest(converted, options))


def test_an_unreachable_store_is_a_machine_error_before_any_work(corpus_url: str, options: dict,
                                                                capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    dead = {**options, "endpoint_url": "http://127.0.0.1:1", "config_kwargs": {"retries": {"max_attempts": 1}}}
    argv = [corpus_url, "s3://convert-stores/dead", "--storage-options", json.dumps(dead), "--workers", "0", "--quiet"]
    assert main(argv) == 4
    err = capsys.readouterr().err
    assert "s3://convert-corpus/openmind" in err and "Traceback" not in err and "testing" not in err
    with pytest.raises(MachineError, match="object store failed"):
        verify("s3://convert-stores/run", progress=False, storage_options=dead)


def test_a_missing_bucket_is_a_bad_argument(corpus_url: str, options: dict, capsys: pytest.CaptureFixture) -> None:
    assert main([corpus_url, "s3://no-such-bucket/out", "--storage-options", json.dumps(options), "--workers", "0",
                 "--quiet"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "s3://no-such-bucket/out: cannot write there" in err and "Traceback" not in err
