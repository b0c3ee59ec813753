"""openmind-eval probe on the demo store: exports and run folders, the embedding cache, bad arguments."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import training.embed
from openmind_tools import zarr_store
from openmind_tools.loader import PatchDataset
from training.embed import CropPlan, embed, load_encoder
from training.eval_cli import main
from training.evaluate import parse_targets, probe_encoder
from training.model import export_encoder, nnssl_pretrain_plan, resenc_tiny


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export of a (seeded, untrained) tiny ResEnc, as openmind-train writes it after a 32^3 stage."""
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("export") / "tiny_encoder.pt"
    return export_encoder(resenc_tiny(), "resenc_tiny", path, nnssl_pretrain_plan((32, 32, 32)))


def _scores(out: Path) -> pd.Series:
    return pd.read_csv(out / "probe.csv").set_index(["target", "metric", "encoder"])["mean"]


def test_modality_a_function_of_the_image_is_probed_well_above_chance(
    demo_out: Path, export: Path, tmp_path: Path
) -> None:
    out = tmp_path / "probe"
    report = probe_encoder(
        export,
        demo_out / "manifest.parquet",
        parse_targets("modality"),
        out=out,
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    scores = _scores(out)
    # The demo's modalities seen in >= 2 subjects are T1w and FLAIR (8 volumes); the others are counted out.
    assert report.left_out["rows"]["modality"] == {"class in < 2 subjects": 11}
    assert scores["modality", "balanced_accuracy", "baseline"] == 0.5
    for encoder in ("pretrained", "random"):
        assert scores["modality", "balanced_accuracy", encoder] >= 0.9
        assert scores["modality", "macro_auc", encoder] >= 0.9
    document = json.loads((out / "probe.json").read_text())
    assert document["settings"]["patch_size"] == 32  # the export's pretraining patch
    assert {r["encoder"] for r in document["results"]} == {"pretrained", "random", "baseline"}
    assert (out / "probe.png").stat().st_size > 10_000
    assert "| modality | balanced_accuracy |" in report.markdown()


def test_a_second_target_reuses_the_cached_embeddings(
    demo_out: Path, export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = f"modality=T1w,FLAIR of {demo_out / 'manifest.parquet'}"
    assert (
        main(
            [
                "probe",
                str(export),
                "--manifest",
                manifest,
                "--target",
                "modality",
                "-o",
                str(tmp_path / "a"),
                "--cache",
                str(tmp_path / "cache"),
                "--no-progress",
            ]
        )
        == 0
    )
    cached = sorted((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 2  # the encoder and its random-init twin

    def recompute(*args, **kwargs):
        raise AssertionError("embeddings recomputed despite the cache")

    monkeypatch.setattr(training.embed, "_compute", recompute)
    assert (
        main(
            [
                "probe",
                str(export),
                "--manifest",
                manifest,
                "--target",
                "sex,age",
                "-o",
                str(tmp_path / "b"),
                "--cache",
                str(tmp_path / "cache"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert set(_scores(tmp_path / "b").index.get_level_values("target")) == {"sex", "age"}
    cached[0].write_bytes(b"not an npz")  # a damaged cache file is recomputed, never trusted
    with pytest.raises(AssertionError, match="recomputed"):
        probe_encoder(
            export, manifest, [("sex", None)], out=tmp_path / "c", cache_dir=tmp_path / "cache", progress=False
        )


def test_embeddings_pool_every_stage_and_read_both_stores_alike(demo_out: Path, export: Path) -> None:
    encoder = load_encoder(export)
    plan = CropPlan(32, crops=9)
    found = {
        store: embed(
            encoder,
            PatchDataset(demo_out / "manifest.parquet", 32, store=store),
            plan,
            device=torch.device("cpu"),
            progress=False,
        )
        for store in ("zarr", "wds")
    }
    zarr, wds = found["zarr"], found["wds"]
    assert zarr.features.shape == (19, 4 + 8 + 16 + 32) and not zarr.unreadable
    assert list(zarr.ids) == list(wds.ids)
    np.testing.assert_allclose(zarr.features, wds.features, rtol=1e-5, atol=1e-6)
    centre = embed(
        encoder,
        PatchDataset(demo_out / "manifest.parquet", 32),
        CropPlan(32),
        device=torch.device("cpu"),
        progress=False,
    )
    assert not np.allclose(centre.features, zarr.features)  # 9 crops averaged are not the centre crop alone


def test_a_run_folder_probes_its_last_stage_export(demo_out: Path, export: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"stages": [{"name": "voco"}, {"name": "mae"}]}))
    (run / "voco_encoder.pt").write_bytes(export.read_bytes())
    assert main(["probe", str(run), "--manifest", str(demo_out / "manifest.parquet"), "--target", "sex"]) == 2
    (run / "mae_encoder.pt").write_bytes(export.read_bytes())
    assert (
        main(["probe", str(run), "--manifest", str(demo_out / "manifest.parquet"), "--target", "sex", "--no-progress"])
        == 0
    )
    assert (run / "mae_encoder_probe" / "probe.csv").is_file() and (run / "probe_cache").is_dir()
    assert (
        main(
            [
                "probe",
                str(run),
                "--stage",
                "voco",
                "--manifest",
                str(demo_out / "manifest.parquet"),
                "--target",
                "sex",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (run / "voco_encoder_probe" / "probe.json").is_file()


def test_an_unreadable_volume_is_left_out_named_and_exit_3(
    demo_out: Path, export: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shutil.copytree(demo_out / "store.zarr", tmp_path / "store.zarr")
    shutil.copy(demo_out / "manifest.parquet", tmp_path / "manifest.parquet")
    victim = pd.read_parquet(tmp_path / "manifest.parquet").iloc[4]
    chunk = tmp_path / "store.zarr" / victim["zarr_array"] / zarr_store.CHUNKS["image"]
    chunk.write_bytes(chunk.read_bytes()[:200])
    argv = ["probe", str(export), "--manifest", str(tmp_path / "manifest.parquet"), "--target", "sex", "--store",
            "zarr", "--cache", str(tmp_path / "cache"), "-o", str(tmp_path / "probe"), "--no-progress"]  # fmt: skip
    assert main(argv) == 3
    printed = capsys.readouterr().out
    assert f"left out, unreadable: volume {victim['id']}" in printed
    assert (tmp_path / "probe" / "probe.csv").is_file()


def test_bad_arguments_exit_2_with_one_line(
    demo_out: Path, export: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    m = str(demo_out / "manifest.parquet")
    junk = tmp_path / "junk_encoder.pt"
    junk.write_bytes(b"\x80\x04junk")
    cases = {
        ("probe", str(tmp_path / "missing.pt"), "--manifest", m, "--target", "sex"): "no such encoder export",
        ("probe", str(junk), "--manifest", m, "--target", "sex"): "not an encoder export that loads",
        ("probe", str(export), "--manifest", m, "--target", "sex,shoe_size"): "['shoe_size'] not in the manifest",
        ("probe", str(export), "--manifest", m, "--target", "age:ordinal"): "COLUMN:KIND",
        (
            "probe",
            str(export),
            "--manifest",
            m,
            "--target",
            "sex",
            "-o",
            str(tmp_path / "no" / "such"),
        ): "does not exist",
        ("probe", str(export), "--manifest", m, "--target", "sex", "--stage", "mae"): "only a run folder has stages",
        ("probe", str(export), "--manifest", m, "--target", "sex", "--device", "banana"): "--device",
        ("probe", str(export), "--manifest", m, "--target", "sex", "--crops", "4"): "invalid choice",
        ("probe", str(export), "--manifest", m, "--target", "sex", "--folds", "0"): "positive integer",
        ("probe", str(export), "--manifest", m, "--target", "sex", "--patch-size", "100000"): "up to 512",
        ("probe", str(export), "--manifest", m, "--target", "sex", "-o", str(junk)): "is a file, not a folder",
    }
    for argv, message in cases.items():
        assert main(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "no").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_embeddings_match_the_cpu_ones(export: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from loader_helpers import mni_volumes, write_store  # a store without the converter (no SimpleITK needed)

    manifest = write_store(tmp_path / "store", mni_volumes(6))
    encoder, plan = load_encoder(export), CropPlan(32)
    dataset = PatchDataset(manifest, 32)
    cpu = embed(encoder, dataset, plan, device=torch.device("cpu"), progress=False)
    cuda = embed(load_encoder(export), dataset, plan, device=torch.device("cuda"), progress=False)  # bf16 autocast
    assert list(cuda.ids) == list(cpu.ids)
    np.testing.assert_allclose(cuda.features, cpu.features, rtol=0.05, atol=0.05)
