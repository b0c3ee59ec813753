"""openmind-convert against the real corpus's corners, the disk and the user: long names, colliding keys,
FIFOs, a full disk, damaged stores healed by `verify --repair`, bad arguments."""

from __future__ import annotations

import contextlib
import errno
import http.server
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from corpus_helpers import small_corpus

from openmind_tools import parallel, zarr_store
from openmind_tools.cli.common import EXIT_MACHINE, EXIT_USAGE
from openmind_tools.cli.convert import EXIT_FAILURES, main
from openmind_tools.convert import convert
from openmind_tools.errors import StoreError
from openmind_tools.loader import PatchDataset
from openmind_tools.verify import verify

LONG = "sub-01_ses-baseline_task-rest_acq-mprage" + "x" * 126 + "_rec-norm_run-01_echo-1_T1w"  # 200 bytes with .nii.gz


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # webdataset leaves its file open
def test_long_names_and_ids_that_differ_by_a_dot_convert_into_unique_tar_keys(tmp_path: Path) -> None:
    names = [f"{LONG}.nii.gz", "sub-05_acq-1.5mm_T1w.nii.gz", "sub-05_acq-1_5mm_T1w.nii.gz"]
    assert len(names[0].encode()) == 200
    root = small_corpus(tmp_path / "corpus", names)
    assert main([str(root), str(tmp_path / "out"), "--workers", "0", "--quiet"]) == 0
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert len(manifest) == 3 and manifest["wds_key"].is_unique
    shard = tmp_path / "out" / manifest["wds_shard"].iloc[0]
    samples = list(wds.WebDataset(str(shard), shardshuffle=False).decode())
    assert sorted(s["json"]["id"] for s in samples) == sorted(manifest["id"])
    listed = subprocess.run(["tar", "tf", str(shard)], capture_output=True, text=True, check=True).stdout.split()
    assert len(listed) == 9 and any(LONG in name for name in listed)
    assert verify(tmp_path / "out", progress=False) == []


def test_ids_that_nest_or_look_reserved_get_groups_no_other_id_reaches(tmp_path: Path) -> None:
    names = ["sub-08_T1w.nii.gz", "sub-08_T1w/image.nii.gz", "sub-08_T1w/mask/zarr.json.nii.gz", "x.vol.nii.gz",
             "x%2Evol.nii.gz", "__a b ü.nii.gz"]  # fmt: skip
    root = small_corpus(tmp_path / "corpus", names)
    out = tmp_path / "out"
    assert main([str(root), str(out), "--format", "zarr", "--workers", "0", "--quiet"]) == 0
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == len(names) and manifest["zarr_array"].is_unique
    paths = [Path(p) for p in manifest["zarr_array"]]
    assert not any(a in b.parents for a in paths for b in paths)  # no volume's group holds another's
    assert verify(out, progress=False) == []
    for row in manifest.itertuples():
        assert zarr_store.read_volume(str(out / "store.zarr"), row.id, tuple(row.shape)).checksum() == row.checksum
    victim = manifest[manifest["id"].str.endswith("/sub-08_T1w")].iloc[0]
    zarr_store.delete_volume(out / "store.zarr", victim["id"])
    assert {p.volume_id for p in verify(out, progress=False)} == {victim["id"]}  # the nested ones are intact
    assert convert(root, out, formats=("zarr",), progress=False).skipped == len(names) - 1
    assert verify(out, progress=False) == []


def test_a_rerun_reconverts_a_volume_whose_group_metadata_was_deleted(tmp_path: Path) -> None:
    root = small_corpus(tmp_path / "corpus", ["sub-01_T1w.nii.gz", "sub-02_T1w.nii.gz"])
    out = tmp_path / "out"
    convert(root, out, formats=("zarr",), progress=False)
    first = pd.read_parquet(out / "manifest.parquet").iloc[0]
    (out / "store.zarr" / first["zarr_array"] / "zarr.json").unlink()
    folder = out / "store.zarr" / Path(first["zarr_array"]).parent / "zarr.json"
    folder.unlink()  # zarr clients could no longer list the volumes below
    assert [(p.volume_id, Path(p.path)) for p in verify(out, progress=False)] == [
        (first["id"], out / "store.zarr" / first["zarr_array"]),
        (None, folder),
    ]
    assert convert(root, out, formats=("zarr",), progress=False).skipped == 1
    assert verify(out, progress=False) == [] and folder.is_file()


def test_a_fifo_where_a_file_should_be_is_refused_never_waited_on(tmp_path: Path) -> None:
    root = small_corpus(tmp_path / "corpus", ["sub-01_T1w.nii.gz", "sub-01_run-2_T1w.nii.gz"])
    image = root / "OpenMind" / "ds000999" / "sub-01" / "anat" / "sub-01_run-2_T1w.nii.gz"
    image.unlink()
    os.mkfifo(image)
    out = tmp_path / "out"
    assert main([str(root), str(out), "--workers", "0", "--quiet"]) == EXIT_FAILURES
    errors = pd.read_parquet(out / "errors.parquet")
    assert list(errors["reason"].str.contains("not a regular file \\(a FIFO\\)")) == [True]

    manifest = pd.read_parquet(out / "manifest.parquet")
    chunk = out / "store.zarr" / manifest["zarr_array"].iloc[0] / zarr_store.CHUNKS["image"]
    chunk.unlink()
    os.mkfifo(chunk)
    with pytest.raises(StoreError, match="not a regular file"):
        next(iter(PatchDataset(out / "manifest.parquet", 32)))
    shard = out / manifest["wds_shard"].iloc[0]
    shard.unlink()
    os.mkfifo(shard)
    done = subprocess.run([sys.executable, "-m", "openmind_tools.cli.convert", "verify", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == EXIT_FAILURES
    assert done.stdout.count("not a regular file (a FIFO)") == 2 and "Traceback" not in done.stderr


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


def test_a_full_disk_stops_the_run_blames_no_input_and_the_rerun_finishes(
    demo_corpus: Path, demo_out: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "24m")
    try:
        command = [sys.executable, "-m", "openmind_tools.cli.convert", str(demo_corpus), str(disk / "out"),
                   "--format", "zarr", "--workers", "0", "--quiet"]  # fmt: skip
        full = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert full.returncode == EXIT_MACHINE, full.stderr[-2000:]
        assert "No space left on device" in full.stderr and "free space" in full.stderr
        assert "Traceback" not in full.stderr and len(full.stderr.strip().splitlines()) == 1
        journal = (disk / "out" / ".journal.jsonl").read_text()
        assert '"status": "error"' not in journal  # nothing blamed on an input
        subprocess.run(["mount", "-o", "remount,size=400m", str(disk)], check=True)
        rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        got = pd.read_parquet(disk / "out" / "manifest.parquet")
        want = pd.read_parquet(demo_out / "manifest.parquet")
        assert list(got["id"]) == list(want["id"]) and list(got["checksum"]) == list(want["checksum"])
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_rerun_reconverts_deleted_samples_and_verify_repair_heals_damage(demo_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = {"formats": ("zarr", "wds"), "limit": 4, "shard_bytes": 30 * 2**20, "progress": False,
               "codec": "lz4hc"}  # not the default: a repair must convert with the folder's own codec  # fmt: skip
    convert(demo_corpus, out, **options)
    before = pd.read_parquet(out / "manifest.parquet")
    assert before["wds_shard"].nunique() > 1
    first, second = before.iloc[0], before.iloc[3]
    shutil.rmtree(out / "store.zarr" / first["zarr_array"])
    summary = convert(demo_corpus, out, **options)
    assert summary.skipped == 3 and verify(out, progress=False) == []  # the journal no longer trusted alone

    chunk = out / "store.zarr" / second["zarr_array"] / zarr_store.CHUNKS["image"]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    shard = out / first["wds_shard"]
    shard.write_bytes(shard.read_bytes()[:5000])  # cut short
    damaged = verify(out, progress=False)
    assert {p.volume_id for p in damaged if p.store == "zarr"} == {second["id"]}
    assert any(p.store == "wds" and Path(p.path) == shard for p in damaged)
    assert main(["verify", str(out), "--repair", "--quiet"]) == 0
    assert verify(out, progress=False) == []
    after = pd.read_parquet(out / "manifest.parquet")
    pd.testing.assert_frame_equal(after, before)
    with tarfile.open(shard) as tar:
        assert len(tar.getnames()) == 3 * (before["wds_shard"] == first["wds_shard"]).sum()


def test_repair_keeps_what_it_cannot_rebuild_and_exits_3_naming_it(demo_corpus: Path, tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(demo_corpus, corpus)
    out = tmp_path / "out"
    convert(corpus, out, formats=("zarr", "wds"), limit=4, progress=False)
    before = pd.read_parquet(out / "manifest.parquet")
    victim = before.iloc[1]
    chunk = out / "store.zarr" / victim["zarr_array"] / zarr_store.CHUNKS["image"]
    chunk.write_bytes(chunk.read_bytes()[:100])
    (corpus / victim["source_path"]).unlink()  # its source is gone: the damaged volume cannot be rebuilt
    assert main(["verify", str(out), "--repair", "--quiet"]) == EXIT_FAILURES
    printed = capsys.readouterr().out
    assert f"not restored: {victim['id']}: its source cannot be read again" in printed and "file not found" in printed
    pd.testing.assert_frame_equal(pd.read_parquet(out / "manifest.parquet"), before)  # no row lost
    assert [(p.volume_id, p.store) for p in verify(out, progress=False)] == [(victim["id"], "zarr")]  # tar intact

    other = before.iloc[2]  # a source that is there but no longer converts: named, its reason in errors.parquet
    chunk = out / "store.zarr" / other["zarr_array"] / zarr_store.CHUNKS["image"]
    chunk.write_bytes(chunk.read_bytes()[:100])
    (corpus / other["source_path"]).write_bytes(b"not a nifti")
    assert main(["verify", str(out), "--repair", "--quiet"]) == EXIT_FAILURES
    assert f"not restored: {other['id']}: converting it again failed" in capsys.readouterr().out
    assert list(pd.read_parquet(out / "errors.parquet")["id"]) == [other["id"]]


def test_bad_arguments_exit_2_naming_the_argument(demo_corpus: Path, tmp_path: Path, capsys) -> None:
    from openmind_tools.cli.manifest import main as manifest_main
    from training.cli import main as train_main

    out = str(tmp_path / "out")
    (tmp_path / "afile").write_bytes(b"\x00 not a folder, nor a recipe")
    cases = [
        (main, [str(demo_corpus), out, "--workers", "-1"], "--workers"),
        (main, [str(demo_corpus), out, "--limit", "-1"], "--limit"),
        (main, [str(demo_corpus), out, "--limit", "0"], "--limit"),
        (main, [str(demo_corpus), out, "--memory-limit", "banana"], "--memory-limit"),
        (main, [str(demo_corpus), out, "--shard-size", "0"], "--shard-size"),
        (main, [str(demo_corpus), out, "--spacing", "nan"], "--spacing"),
        (main, ["verify", str(tmp_path / "missing")], "is not a folder"),
        (main, [str(demo_corpus), out, "--scheduler", "tcp://127.0.0.1:1"], "cannot connect"),
        (main, [str(demo_corpus), str(tmp_path / "afile")], "is a file, not a folder"),
        (main, [str(demo_corpus), str(tmp_path / ("x" * 300))], "File name too long"),
        (main, ["demo-data", str(tmp_path / "afile" / "sub")], "Not a directory"),
        (train_main, [str(tmp_path / "missing.toml")], "recipe"),
        (train_main, [str(tmp_path / "afile")], "not valid TOML"),
        (manifest_main, ["query", str(tmp_path / "m.parquet"), "-o", str(tmp_path / "no" / "q.parquet")],
         "does not exist"),
        (train_main, ["export", str(tmp_path / "missing"), "-o", str(tmp_path / "e.pt")], "is not a folder"),
        (train_main, ["export", str(tmp_path), "-o", str(tmp_path / "no" / "e.pt")], "does not exist"),
        (train_main, ["export", str(tmp_path), "-o", str(tmp_path / "e.pt")], "not a run folder"),
    ]  # fmt: skip
    for command, argv, named in cases:
        assert command(argv) == EXIT_USAGE, argv
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err, (argv, err)
        assert len([line for line in err.splitlines() if ": error:" in line]) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "no").exists()


@contextlib.contextmanager
def _serve(greeting: bytes) -> Iterator[int]:
    """A port that accepts connections, sends `greeting` and then nothing more; every socket is closed on exit,
    after the accepting thread has stopped (closing under a thread mid-accept leaks the socket it returns)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn = server.accept()[0]
            except TimeoutError:
                continue
            held.append(conn)
            with contextlib.suppress(OSError):  # the probe may have hung up already
                conn.sendall(greeting)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        server.close()
        for conn in held:
            conn.close()


@pytest.fixture
def http_port() -> Iterator[int]:
    """A web server, as a dashboard port given by mistake is: it waits for a request."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_scheduler_address_that_never_answers_or_is_no_dask_is_exit_2_within_the_timeout(
    demo_corpus: Path, tmp_path: Path, http_port: int, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(parallel, "HANDSHAKE_S", 1.0)
    with _serve(b"") as silent, _serve(b"SSH-2.0-OpenSSH_9.2\r\n") as banner:
        silence = "no dask scheduler answered within 1 s"
        cases = [(silent, silence), (http_port, silence), (banner, "is not a dask scheduler")]
        for port, message in cases:
            for argv in ([str(demo_corpus), str(tmp_path / "out")], ["verify", str(tmp_path)]):
                start = time.monotonic()
                assert main([*argv, "--scheduler", f"tcp://127.0.0.1:{port}", "--quiet"]) == EXIT_USAGE
                assert time.monotonic() - start < 10
                err = capsys.readouterr().err
                assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_stored_sample_that_is_a_folder_is_a_store_error(tmp_path: Path) -> None:
    root = small_corpus(tmp_path / "corpus", ["sub-01_T1w.nii.gz"])
    convert(root, tmp_path / "out", formats=("zarr",), progress=False)
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    chunk = tmp_path / "out" / "store.zarr" / manifest["zarr_array"].iloc[0] / zarr_store.CHUNKS["image"]
    chunk.unlink()
    chunk.mkdir()
    with pytest.raises(StoreError, match="not a regular file \\(a folder\\)"):
        zarr_store.read_volume(
            str(tmp_path / "out" / "store.zarr"), manifest["id"].iloc[0], tuple(manifest["shape"].iloc[0])
        )
    assert np.all([p.volume_id == manifest["id"].iloc[0] for p in verify(tmp_path / "out", progress=False)])


def test_a_local_dask_cluster_leaves_the_environment_as_it_found_it(tmp_path: Path) -> None:
    root = small_corpus(tmp_path / "corpus", ["sub-01_T1w.nii.gz"])
    before = dict(os.environ)
    assert main([str(root), str(tmp_path / "out"), "--workers", "1", "--quiet"]) == 0
    assert dict(os.environ) == before  # dask's nannies set OMP_NUM_THREADS=1 here while the cluster ran


def test_any_other_os_error_of_a_command_is_one_line_exit_2_or_4_for_the_machine(capsys) -> None:
    from openmind_tools.cli.common import run_command

    def fail(error: OSError):
        def body(_):
            raise error

        return body

    cases = [(OSError(errno.ENAMETOOLONG, "File name too long", "runs/" + "y" * 300), EXIT_USAGE, "too long"),
             (PermissionError(errno.EACCES, "Permission denied", "/root/x"), EXIT_USAGE, "/root/x: Permission denied"),
             (OSError(errno.ENOSPC, "No space left on device", "out/x"), EXIT_MACHINE, "free space")]  # fmt: skip
    for error, code, message in cases:
        assert run_command("openmind-x", lambda: None, fail(error)) == code
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
