"""openmind-convert on real NIfTI: the demo corpus, hostile inputs, kill -9 + resume, verify, dask."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from scipy import ndimage

from openmind_tools import zarr_store
from openmind_tools.cli.convert import EXIT_FAILURES, main
from openmind_tools.convert import convert
from openmind_tools.corpus import CSV_NAME, discover
from openmind_tools.errors import ConfigError
from openmind_tools.journal import JOURNAL
from openmind_tools.manifest_io import read_table
from openmind_tools.verify import verify

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def test_demo_manifest_has_every_csv_column_and_one_row_per_image(demo_corpus: Path, demo_out: Path) -> None:
    source = pd.read_csv(demo_corpus / CSV_NAME)
    manifest, meta = read_table(demo_out / "manifest.parquet")
    assert len(manifest) == len(source) == 19
    assert set(source.columns) <= set(manifest.columns)
    assert manifest["id"].is_unique
    assert sorted(manifest["image_path"]) == sorted(source["image_path"])
    assert read_table(demo_out / "errors.parquet")[0].empty
    assert meta["formats"] == ["zarr", "wds"] and set(manifest["settings_hash"]) == {meta["settings_hash"]}
    # CSV values carried unchanged in meaning
    merged = manifest.merge(source, on="image_path", suffixes=("", "_src"))
    for column in ("modality", "image_quality_score", "sex", "magnetic_field_strength"):
        assert (merged[column] == merged[f"{column}_src"]).all(), column
    # source_nbytes is the image and its masks as read, counted without asking the filesystem again
    for row in merged.itertuples():
        files = [row.image_path, row.anat_mask_path, row.anon_mask_path]
        sizes = sum((demo_corpus / "OpenMind" / f).stat().st_size for f in files if isinstance(f, str) and f)
        assert row.source_nbytes == sizes, row.id


def test_stored_geometry_and_intensities_match_the_source(demo_corpus: Path, demo_out: Path) -> None:
    manifest, _ = read_table(demo_out / "manifest.parquet")
    for row in manifest[manifest["has_anatomy_mask"]].itertuples():
        src = nib.load(demo_corpus / "OpenMind" / row.image_path)
        mask = nib.load(demo_corpus / "OpenMind" / row.anat_mask_path)
        volume = zarr_store.read_volume(str(demo_out / row.zarr_store), row.id, tuple(row.shape))
        assert volume.image.shape == tuple(row.shape)
        assert list(row.original_shape) == list(src.shape)
        assert row.original_orientation == "".join(nib.aff2axcodes(src.affine))
        affine = np.asarray([list(r) for r in row.affine])
        assert "".join(nib.aff2axcodes(affine)) == "RAS"
        assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), 1.0)
        # the anatomy's centre of mass lands on the same scanner point (independent nibabel computation)
        src_com = nib.affines.apply_affine(mask.affine, ndimage.center_of_mass(np.asarray(mask.dataobj) > 0))
        out_com = nib.affines.apply_affine(affine, ndimage.center_of_mass(volume.anatomy))
        assert np.linalg.norm(src_com - out_com) < 1.5, row.id
        inside = volume.image[volume.anatomy.astype(bool)].astype(np.float64)
        assert abs(inside.mean()) < 0.05 and abs(inside.std() - 1) < 0.05, row.id
        assert row.anatomy_fraction == pytest.approx(volume.anatomy.mean())


def test_orientation_does_not_change_the_stored_arrays(tmp_path: Path) -> None:
    from openmind_tools.preprocess import preprocess

    img = nib.load(NIBABEL_DATA / "anatomical.nii")
    outputs = []
    for codes in ("LAS", "RAS", "LPS", "PIR"):
        ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.orientations.axcodes2ornt(codes))
        path = tmp_path / f"{codes}.nii.gz"
        nib.save(img.as_reoriented(ornt), path)
        outputs.append(preprocess(path))
    for other in outputs[1:]:
        np.testing.assert_array_equal(other.volume.image, outputs[0].volume.image)
        np.testing.assert_allclose(other.meta["affine"], outputs[0].meta["affine"], atol=1e-4)


def test_anisotropic_images_are_resampled_to_1mm(demo_out: Path) -> None:
    manifest, _ = read_table(demo_out / "manifest.parquet")
    row = manifest.set_index("modality").loc["inplaneT1"]
    assert list(row["original_spacing"]) == [1.0, 1.0, 3.0]
    assert list(row["spacing"]) == [1.0, 1.0, 1.0]
    mni = manifest[manifest["modality"] == "T1w"].iloc[0]
    assert abs(row["shape"][2] - mni["shape"][2]) <= 3  # same head, same extent along z


# webdataset's own tar reader leaves its file for the garbage collector to close
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_both_stores_are_readable_with_plain_libraries(demo_out: Path) -> None:
    manifest, _ = read_table(demo_out / "manifest.parquet")
    row = next(manifest.itertuples())
    plain = zarr_store.open_volume(demo_out / row.zarr_store, row.id)
    ours = zarr_store.read_volume(str(demo_out / row.zarr_store), row.id, tuple(row.shape))
    np.testing.assert_array_equal(plain["image"][:], ours.image)
    np.testing.assert_array_equal(plain["mask"][:], ours.code)
    shard = demo_out / row.wds_shard
    listing = subprocess.run(["tar", "tf", str(shard)], capture_output=True, text=True, check=True).stdout.split()
    assert f"{row.wds_key}.image.npy" in listing and f"{row.wds_key}.json" in listing
    samples = {s["__key__"]: s for s in wds.WebDataset(str(shard), shardshuffle=False).decode()}
    sample = samples[row.wds_key]
    np.testing.assert_array_equal(sample["image.npy"], ours.image)
    assert json.loads(json.dumps(sample["json"]))["id"] == row.id
    assert set(samples) == set(manifest.loc[manifest["wds_shard"] == row.wds_shard, "wds_key"])


def _hostile_corpus(root: Path) -> dict[str, str]:
    """A CSV-driven corpus with one good image and one of every bad kind; returns id -> expected reason."""
    anat = nib.load(NIBABEL_DATA / "anatomical.nii")
    data = np.asanyarray(anat.dataobj).astype(np.float32)
    base = root / "OpenMind" / "ds000999" / "sub-01" / "anat"
    base.mkdir(parents=True)
    rows, expected = [], {}

    def add(name: str, reason: str | None, anat_mask: str = "") -> Path:
        rows.append({"image_path": f"ds000999/sub-01/anat/{name}", "modality": "T1w", "anat_mask_path": anat_mask})
        if reason:
            expected[f"ds000999/sub-01/anat/{name}".removesuffix(".gz").removesuffix(".nii")] = reason
        return base / name

    nib.save(nib.Nifti1Image(data, anat.affine), add("sub-01_good_T1w.nii.gz", None))
    gz = (base / "sub-01_good_T1w.nii.gz").read_bytes()
    add("sub-01_truncated_T1w.nii.gz", "corrupt or truncated gzip").write_bytes(gz[: len(gz) // 2])
    flipped = bytearray(gz)
    flipped[len(gz) // 2] ^= 0xFF
    add("sub-01_flipped_T1w.nii.gz", "corrupt or truncated gzip").write_bytes(bytes(flipped))
    add("sub-01_empty_T1w.nii.gz", "zero-byte file").write_bytes(b"")
    add("sub-01_missing_T1w.nii.gz", "file not found")
    nan = data.copy()
    nan[5, 5, 5], nan[6, 6, 6] = np.nan, np.inf
    nib.save(nib.Nifti1Image(nan, anat.affine), add("sub-01_nan_T1w.nii.gz", "2 NaN/Inf voxels"))
    nib.save(nib.Nifti1Image(np.zeros_like(data), anat.affine), add("sub-01_zeros_T1w.nii.gz", "constant"))
    shutil.copy(NIBABEL_DATA / "example4d.nii.gz", add("sub-01_4d_T1w.nii.gz", "4D image"))
    nib.save(nib.Nifti1Image(data[..., None], anat.affine), add("sub-01_singleton_T1w.nii.gz", None))
    nib.save(nib.Nifti1Image((data > 0).astype(np.uint8)[:-1], anat.affine), base / "small_mask.nii.gz")
    add("sub-01_maskshape_T1w.nii.gz", "mask shape", "ds000999/sub-01/anat/small_mask.nii.gz")
    nib.save(nib.Nifti1Image(data, anat.affine), base / "sub-01_maskshape_T1w.nii.gz")
    shifted = anat.affine.copy()
    shifted[0, 3] += 10
    nib.save(nib.Nifti1Image((data > 0).astype(np.uint8), shifted), base / "shifted_mask.nii.gz")
    add("sub-01_maskaffine_T1w.nii.gz", "mask affine", "ds000999/sub-01/anat/shifted_mask.nii.gz")
    nib.save(nib.Nifti1Image(data, anat.affine), base / "sub-01_maskaffine_T1w.nii.gz")
    with (root / CSV_NAME).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image_path", "modality", "anat_mask_path"])
        writer.writeheader()
        writer.writerows(rows)
    return expected


def test_bad_inputs_become_error_rows_and_never_stop_the_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    expected = _hostile_corpus(tmp_path / "corpus")
    code = main([str(tmp_path / "corpus"), str(tmp_path / "out"), "--workers", "0", "--quiet"])
    assert code == EXIT_FAILURES
    summary = capsys.readouterr().out
    assert f"{len(expected)} failed" in summary and "errors.parquet" in summary
    errors = pd.read_parquet(tmp_path / "out" / "errors.parquet").set_index("id")
    assert sorted(errors.index) == sorted(expected)
    for volume_id, reason in expected.items():
        assert reason in errors.loc[volume_id, "reason"], (volume_id, errors.loc[volume_id, "reason"])
        assert errors.loc[volume_id, "source_path"].endswith(volume_id.split("/")[-1] + ".nii.gz")
    converted = pd.read_parquet(tmp_path / "out" / "manifest.parquet")["id"].str.split("/").str[-1]
    assert sorted(converted) == ["sub-01_good_T1w", "sub-01_singleton_T1w"]


def test_true_4d_converts_when_a_volume_is_chosen(tmp_path: Path) -> None:
    from openmind_tools.preprocess import PreprocessSettings, preprocess

    path = NIBABEL_DATA / "example4d.nii.gz"
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[..., 1], img.affine, img.header), tmp_path / "second.nii.gz")
    chosen = preprocess(path, settings=PreprocessSettings(volume_index=1)).volume
    expected = preprocess(tmp_path / "second.nii.gz").volume
    assert np.array_equal(chosen.image, expected.image)
    first = preprocess(path, settings=PreprocessSettings(volume_index=0)).volume
    assert first.image.shape != chosen.image.shape or not np.array_equal(first.image, chosen.image)


def test_killed_conversion_resumes_to_the_same_manifest(demo_corpus: Path, demo_out: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "openmind_tools.cli.convert", str(demo_corpus), str(out), "--workers", "0", "--quiet"]
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            journal = out / JOURNAL
            if journal.is_file() and len(journal.read_text().splitlines()) >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "conversion ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    assert not (out / "manifest.parquet").exists()
    partial = len((out / JOURNAL).read_text().splitlines())
    assert 5 <= partial < 19

    assert subprocess.run(cmd, capture_output=True).returncode == 0
    resumed, _ = read_table(out / "manifest.parquet")
    reference, _ = read_table(demo_out / "manifest.parquet")
    pd.testing.assert_frame_equal(resumed, reference)
    assert not any((out / "store.zarr" / ".tmp").glob("*"))
    assert verify(out, progress=False) == []


def test_rerunning_a_finished_conversion_does_nothing(demo_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = convert(demo_corpus, out, limit=3, progress=False)
    chunk = out / "store.zarr" / zarr_store.group_path(discover(demo_corpus).images[0].id) / zarr_store.CHUNKS["image"]
    mtime = chunk.stat().st_mtime_ns
    second = convert(demo_corpus, out, limit=3, progress=False)
    assert (first.converted, second.converted, second.skipped) == (3, 3, 3)
    assert chunk.stat().st_mtime_ns == mtime
    third = convert(demo_corpus, out, limit=5, progress=False)  # its summary adds up to the volumes it names
    assert str(third).startswith("5 volumes in the manifest, 0 failed; this run tried 2, 3 were done before;")


def test_other_settings_into_the_same_folder_are_refused(demo_corpus: Path, tmp_path: Path) -> None:
    from openmind_tools.preprocess import PreprocessSettings

    convert(demo_corpus, tmp_path / "out", limit=1, progress=False)
    with pytest.raises(ConfigError, match="use another output folder"):
        convert(demo_corpus, tmp_path / "out", PreprocessSettings(spacing=2.0), limit=1, progress=False)


def test_the_zarr_store_is_a_hierarchy_zarr_python_and_tensorstore_list_without_the_manifest(demo_out: Path) -> None:
    import tensorstore as ts
    import zarr

    manifest, _ = read_table(demo_out / "manifest.parquet")
    store = demo_out / "store.zarr"
    root = zarr.open_group(str(store), mode="r")
    assert root.attrs["store_format"] == zarr_store.STORE_FORMAT
    listed = {path.rsplit("/", 1)[0]: node for path, node in root.members(max_depth=None)
              if path.endswith("/image")}  # fmt: skip
    assert sorted(listed) == sorted(manifest["zarr_array"])
    keys = ts.KvStore.open(f"file://{store}/").result().list().result()
    arrays = sorted(k.decode().removesuffix("/image/zarr.json") for k in keys if k.endswith(b"/image/zarr.json"))
    assert arrays == sorted(manifest["zarr_array"])
    for row in manifest.itertuples():
        image = ts.open({"driver": "zarr3", "kvstore": f"file://{store}/{row.zarr_array}/image"}).result()
        ours = zarr_store.read_volume(str(store), row.id, tuple(row.shape))
        np.testing.assert_array_equal(image.read().result(), ours.image)
        np.testing.assert_array_equal(listed[row.zarr_array][:], ours.image)


def test_each_codec_stores_the_same_volumes_and_a_resume_keeps_its_codec(demo_corpus: Path, tmp_path: Path) -> None:
    sizes, volumes = {}, {}
    for codec in zarr_store.CODECS:
        out = tmp_path / codec
        convert(demo_corpus, out, limit=2, progress=False, codec=codec)
        rows = pd.read_parquet(out / "manifest.parquet")
        group = zarr_store.open_volume(out / "store.zarr", rows["id"][0])
        assert group["image"].compressors[0].cname.value == zarr_store.CODECS[codec][0]
        volumes[codec] = zarr_store.read_volume(str(out / "store.zarr"), rows["id"][0], tuple(rows["shape"][0]))
        sizes[codec] = int(rows["zarr_nbytes"].sum())
        assert list(rows["checksum"]) == list(pd.read_parquet(tmp_path / "lz4" / "manifest.parquet")["checksum"])
    assert sizes["zstd"] < sizes["lz4hc"] < sizes["lz4"]  # the trade the --codec help describes
    assert all(np.array_equal(v.image, volumes["lz4"].image) for v in volumes.values())
    with pytest.raises(ConfigError, match="'codec': 'lz4'.*'codec': 'zstd'.*use another output folder"):
        convert(demo_corpus, tmp_path / "lz4", limit=2, progress=False, codec="zstd")
    with pytest.raises(ConfigError, match="codec: expected one of"):
        convert(demo_corpus, tmp_path / "new", limit=2, progress=False, codec="gzip")


def test_verify_catches_a_single_flipped_byte(demo_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(demo_corpus, out, formats=("zarr", "wds"), limit=3, progress=False)
    assert verify(out, progress=False) == []
    manifest = pd.read_parquet(out / "manifest.parquet")
    victim = manifest.iloc[1]
    chunk = out / "store.zarr" / victim["zarr_array"] / zarr_store.CHUNKS["image"]
    shard = out / victim["wds_shard"]
    for path in (chunk, shard):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    problems = [str(p) for p in verify(out, progress=False)]
    assert any(str(chunk.parent.parent) in p or victim["id"] in p and "store.zarr" in p for p in problems)
    assert any(str(shard) in p for p in problems)
    assert main(["verify", str(out), "--quiet"]) == EXIT_FAILURES


def test_existing_dask_cluster_with_two_workers_matches_a_serial_run(
    demo_corpus: Path, demo_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`--scheduler ADDRESS` on a real LocalCluster: the tasks run in its two worker processes."""
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
        argv = [str(demo_corpus), str(tmp_path / "out"), "--scheduler", cluster.scheduler_address, "--limit", "6"]
        assert main([*argv, "--quiet"]) == 0
        tasks = client.run(lambda dask_worker: len(dask_worker.data) + dask_worker.state.executed_count)
    assert "6 volumes in the manifest, 0 failed; this run tried 6," in capsys.readouterr().out
    assert len(tasks) == 2 and all(n > 0 for n in tasks.values())  # both workers ran conversions
    parallel = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("id")
    serial = pd.read_parquet(demo_out / "manifest.parquet").set_index("id").loc[parallel.index]
    assert (parallel["checksum"] == serial["checksum"]).all()
    assert verify(tmp_path / "out", progress=False) == []


def test_plain_bids_tree_without_csv(demo_corpus: Path, tmp_path: Path) -> None:
    shutil.copytree(demo_corpus / "OpenMind" / "ds000101", tmp_path / "bids" / "ds000101")
    corpus = discover(tmp_path / "bids")
    assert len(corpus.images) == 7
    flair = next(i for i in corpus.images if i.id.endswith("ses-1_FLAIR"))
    assert flair.modality == "FLAIR" and flair.session == "ses-1"
    assert flair.anatomy_mask.endswith("/fb_mask.nii.gz") and flair.deface_mask.endswith("/deface_mask.nii.gz")
    summary = convert(tmp_path / "bids", tmp_path / "out", limit=2, progress=False)
    assert summary.converted == 2


def test_modality_filter_accepts_the_recipe_spelling(demo_corpus: Path) -> None:
    corpus = discover(demo_corpus, modalities=["inplainT1", "T2w"])
    assert sorted(i.modality for i in corpus.images) == ["T2w", "inplaneT1"]
    with pytest.raises(ConfigError, match="modalities present"):
        discover(demo_corpus, modalities=["T3w"])


def test_dry_run_writes_nothing(demo_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(demo_corpus), str(tmp_path / "out"), "--dry-run", "--limit", "4"]) == 0
    assert "4 images would be converted" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_gzip_check_covers_the_whole_stream(tmp_path: Path) -> None:
    """A gzip whose CRC does not match is refused even when its deflate stream decodes."""
    from openmind_tools.errors import InputError
    from openmind_tools.preprocess import load_nifti

    raw = gzip.compress((NIBABEL_DATA / "anatomical.nii").read_bytes())
    bad = bytearray(raw)
    bad[-8] ^= 0xFF  # the CRC32 trailer
    (tmp_path / "crc.nii.gz").write_bytes(bytes(bad))
    with pytest.raises(InputError, match="corrupt or truncated gzip"):
        load_nifti(tmp_path / "crc.nii.gz")


@pytest.mark.slow
def test_a_512_cubed_float_volume_converts_in_bounded_memory(tmp_path: Path) -> None:
    """Peak memory of one conversion beyond its imports stays under 3x the float32 volume (measured: 2.26x).

    Measured as the child's own VmHWM: ru_maxrss keeps the high-water mark across fork + exec, so it counted
    the pytest parent's memory at fork time, which made an earlier bound on it flaky.
    """
    data = np.random.default_rng(0).normal(100, 20, (512, 512, 512)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 0.5, 1.0])), tmp_path / "big.nii")
    del data
    code = (
        "from openmind_tools.preprocess import preprocess\n"
        "def hwm():\n"
        "    status = open('/proc/self/status').read()\n"
        "    return int(status.split('VmHWM:')[1].split()[0]) * 1024\n"
        "base = hwm()\n"
        f"r = preprocess({str(tmp_path / 'big.nii')!r})\n"
        "print(r.meta['shape'], base, hwm())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    shape, base, peak = done.stdout.rsplit(" ", 2)
    assert shape == "[256, 256, 256]"
    grown = int(peak) - int(base)
    assert grown < 3 * 512**3 * 4, f"peak {grown / 2**30:.2f} GiB beyond the imports for a 0.5 GiB volume"


def test_tar_only_output_grows_with_a_larger_limit(demo_corpus: Path, tmp_path: Path) -> None:
    """A wds-only run keeps its staged volumes, so a later, larger run can repack every shard."""
    small = dict(formats=("wds",), shard_bytes=30 * 10**6, progress=False)
    convert(demo_corpus, tmp_path / "grown", limit=4, **small)
    convert(demo_corpus, tmp_path / "grown", limit=8, **small)
    convert(demo_corpus, tmp_path / "direct", limit=8, **small)
    grown = pd.read_parquet(tmp_path / "grown" / "manifest.parquet")
    direct = pd.read_parquet(tmp_path / "direct" / "manifest.parquet")
    pd.testing.assert_frame_equal(grown, direct)
    assert grown["wds_shard"].nunique() > 1 and verify(tmp_path / "grown", progress=False) == []


def test_a_journal_line_cut_by_a_kill_does_not_break_the_rerun(demo_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(demo_corpus, out, limit=3, progress=False)
    reference = pd.read_parquet(out / "manifest.parquet")
    journal = out / JOURNAL
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:-1]) + lines[-1][:25])  # the last entry torn mid-write
    convert(demo_corpus, out, limit=3, progress=False)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "manifest.parquet"), reference)
    assert all(json.loads(line) for line in journal.read_text().splitlines())


def test_journal_lines_of_the_wrong_shape_are_skipped_and_their_volumes_converted_again(
    demo_corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    convert(demo_corpus, out, limit=3, progress=False)
    reference = pd.read_parquet(out / "manifest.parquet")
    journal = out / JOURNAL
    lines = journal.read_text().splitlines()
    first = json.loads(lines[0])["volume"]
    hostile = ['{"volume": 3}', '{"volume": {"id": 7}}', '[1, 2]', '{"shard": null}',
               json.dumps({"volume": {"id": first["id"], "status": "ok"}})]  # the first volume: no shape  # fmt: skip
    journal.write_text("\n".join([*lines[1:], *hostile]) + "\n")
    summary = convert(demo_corpus, out, limit=3, progress=False)
    assert summary.attempted == 1  # the volume whose only well-formed record was removed
    pd.testing.assert_frame_equal(pd.read_parquet(out / "manifest.parquet"), reference)


def _die_on_flair(image, **kwargs):  # a worker process that dies mid-task, as an OOM kill does
    from openmind_tools.convert import _convert_one

    if image.modality == "FLAIR":
        os._exit(1)
    return _convert_one(image, **kwargs)


def test_a_worker_dying_on_one_input_records_it_and_goes_on(
    demo_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dask
    from dask.distributed import Client, LocalCluster

    import openmind_tools.convert as convert_module

    monkeypatch.setattr(convert_module, "_convert_one", _die_on_flair)
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        summary = convert(demo_corpus, tmp_path / "out", formats=("zarr",), limit=4, client=client, progress=False)
    errors = pd.read_parquet(tmp_path / "out" / "errors.parquet")
    assert summary.converted == 3 and list(errors["error_type"]) == ["KilledWorker"]
    assert errors["id"].iloc[0].endswith("FLAIR") and "died" in errors["reason"].iloc[0]


def test_csv_paths_that_leave_the_image_folder_are_refused(demo_corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    shutil.copytree(demo_corpus, root)
    csv = pd.read_csv(root / CSV_NAME, keep_default_na=False)
    csv.loc[0, "image_path"] = "../../outside/sub-x_T1w.nii.gz"
    csv.to_csv(root / CSV_NAME, index=False)
    corpus = discover(root)
    assert len(corpus.images) == 18 and [r.error_type for r in corpus.rejected] == ["UnsafePath"]
    assert discover(root, limit=2).rejected == []  # a trial reports only the rows it selected


def test_a_second_conversion_into_the_same_folder_is_refused(demo_corpus: Path, tmp_path: Path) -> None:
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with (out / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another openmind-convert"):
            convert(demo_corpus, out, limit=1, progress=False)


@pytest.mark.parametrize(
    ("dtype", "reason"), [(np.complex64, "not a real scalar"), (None, "truncated voxel data")], ids=["complex", "cut"]
)
def test_complex_and_truncated_plain_nifti_are_input_errors(tmp_path: Path, dtype, reason: str) -> None:
    from openmind_tools.errors import InputError
    from openmind_tools.preprocess import preprocess

    anat = nib.load(NIBABEL_DATA / "anatomical.nii")
    path = tmp_path / "image.nii"
    if dtype is None:
        path.write_bytes((NIBABEL_DATA / "anatomical.nii").read_bytes()[:-1000])
    else:
        nib.save(nib.Nifti1Image(np.asanyarray(anat.dataobj).astype(dtype), anat.affine), path)
    with pytest.raises(InputError, match=reason):
        preprocess(path)
