"""openmind-eval finetune: the pretrained encoder is what a run starts from, scratch is not; bad inputs exit 2.

CI-sized (a few steps on small volumes): these tests check the machinery, never a gain.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from nilearn.datasets import MNI152_FILE_PATH

from training.classification import EncoderClassifier
from training.embed import load_encoder
from training.eval_cli import main
from training.finetune import FinetuneReport, encoder_checksum
from training.model import export_encoder, nnssl_pretrain_plan, resenc_tiny
from training.segmentation import dice, dice_ce_loss

LABELS = ["background", "GM", "WM"]


def _tissue(name: str) -> np.ndarray:
    path = Path(MNI152_FILE_PATH).parent / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)[::4, ::4, ::4]  # 4 mm: ~50 voxels a side


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An nnU-Net raw dataset of 6 subjects: the MNI head at 4 mm, shifted and noisy, GM/WM as labels."""
    folder = tmp_path_factory.mktemp("nnunet") / "Dataset990_Tiny"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    t1 = np.asarray(nib.load(MNI152_FILE_PATH).dataobj, dtype=np.float32)[::4, ::4, ::4]
    label = np.where(_tissue("wm") > 127, 2, np.where(_tissue("gm") > 127, 1, 0)).astype(np.uint8)
    rng = np.random.default_rng(0)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    for i in range(6):
        shift = tuple(int(s) for s in rng.integers(-2, 3, 3))
        image = np.roll(t1, shift, (0, 1, 2)) * rng.uniform(0.8, 1.2) + rng.normal(0, 5, t1.shape)
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / "imagesTr" / f"sub-{i:02d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(np.roll(label, shift, (0, 1, 2)), affine), folder / "labelsTr" / f"sub-{i:02d}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1w"}, "numTraining": 6,
                                                      "labels": {n: i for i, n in enumerate(LABELS)},
                                                      "file_ending": ".nii.gz"}))  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("export") / "tiny_encoder.pt"
    return export_encoder(resenc_tiny(), "resenc_tiny", path, nnssl_pretrain_plan((16, 16, 16), spacing=(4, 4, 4)))


def test_segmentation_runs_start_from_the_export_and_scratch_does_not(
    dataset: Path, export: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ft"
    argv = ["finetune", str(export), "--dataset", str(dataset), "-o", str(out), "--shots", "1,2", "--seeds", "1",
            "--steps", "3", "--test-subjects", "2", "--patch-size", "32", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    runs = pd.read_csv(out / "finetune.csv")
    assert sorted(set(runs["encoder"])) == ["scratch", "tiny"] and len(runs) == 2 * 2
    pretrained = runs[runs["encoder"] == "tiny"]
    assert set(pretrained["start_encoder"]) == {encoder_checksum(load_encoder(export))}  # the weights transferred
    assert encoder_checksum(load_encoder(export)) not in set(runs.loc[runs["encoder"] == "scratch", "start_encoder"])
    assert runs[["dice_GM", "dice_WM", "mean_dice"]].apply(lambda c: c.between(0, 1)).all().all()
    assert list(runs.groupby("shots")["train_volumes"].first()) == [1, 2]
    summary = json.loads((out / "finetune.json").read_text())["summary"]
    assert {(r["metric"], r["shots"], r["encoder"]) for r in summary} >= {("mean_dice", 2, "tiny")}
    assert "| mean_dice | 2 |" in (out / "finetune.md").read_text() and (out / "finetune.png").stat().st_size > 5000
    gains = {(g["metric"], g["shots"]): g for g in json.loads((out / "finetune.json").read_text())["gains"]}
    by_arm = runs.set_index(["encoder", "shots"])["mean_dice"]
    assert gains["mean_dice", 2]["gain"] == pytest.approx(by_arm["tiny", 2] - by_arm["scratch", 2])
    assert gains["mean_dice", 2]["pairs"] == 1 and gains["mean_dice", 2]["scratch"] == "scratch"


def test_gains_pair_each_pretrained_run_with_the_scratch_run_of_its_draw() -> None:
    runs = pd.DataFrame({"encoder": ["mae", "scratch"] * 3 + ["mae"], "shots": [4] * 6 + [20],
                         "seed": [0, 0, 1, 1, 2, 2, 0], "split": "held-out",
                         "mean_dice": [0.60, 0.55, 0.50, 0.52, 0.70, 0.61, 0.9]})  # fmt: skip
    report = FinetuneReport("segmentation", ["mean_dice"], runs, {}, twins={"mae": "scratch"})
    gain = report.gains().set_index("shots").loc[4]  # K = 20 has no scratch run yet: no pair
    assert list(report.gains()["shots"]) == [4] and (gain["wins"], gain["pairs"]) == (2, 3)
    assert gain["gain"] == pytest.approx((0.05 - 0.02 + 0.09) / 3) and gain["std"] == pytest.approx(0.0557, abs=1e-4)
    assert "| mean_dice | 4 | mae | +0.040 ± 0.056 | 2 of 3 |" in report.markdown()


def test_first_seed_adds_new_seeds_that_equal_the_same_seeds_of_a_longer_run(
    dataset: Path, export: Path, tmp_path: Path
) -> None:
    base = [str(export), "--dataset", str(dataset), "--shots", "2", "--steps", "2", "--test-subjects", "2",
            "--patch-size", "32", "--no-progress"]  # fmt: skip
    assert main(["finetune", *base, "-o", str(tmp_path / "both"), "--seeds", "2"]) == 0
    assert main(["finetune", *base, "-o", str(tmp_path / "later"), "--seeds", "1", "--first-seed", "1"]) == 0
    both, later = (pd.read_csv(tmp_path / name / "finetune.csv") for name in ("both", "later"))
    assert list(both["seed"]) == [0, 0, 1, 1] and list(later["seed"]) == [1, 1]
    columns = ["encoder", "seed", "train_volumes", "start_encoder", "mean_dice"]
    pd.testing.assert_frame_equal(both.loc[both["seed"] == 1, columns].reset_index(drop=True), later[columns])
    assert json.loads((tmp_path / "later" / "finetune.json").read_text())["settings"]["first_seed"] == 1


def test_a_fine_tune_killed_midway_keeps_the_runs_it_finished(
    dataset: Path, export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.segmentation import SegmentationTask

    score, calls = SegmentationTask.score, []

    def dies_on_the_second(self, *args, **kwargs):  # noqa: ANN001, ANN202 - the wrapped method's signature
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return score(self, *args, **kwargs)

    monkeypatch.setattr(SegmentationTask, "score", dies_on_the_second)
    out = tmp_path / "ft"
    argv = ["finetune", str(export), "--dataset", str(dataset), "-o", str(out), "--shots", "1", "--seeds", "1",
            "--steps", "1", "--test-subjects", "2", "--patch-size", "32", "--no-progress"]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    runs = pd.read_csv(out / "finetune.csv")
    assert list(runs["encoder"]) == ["tiny"] and runs["mean_dice"].between(0, 1).all()


def test_classification_fine_tunes_the_encoder_on_a_manifest_column(demo_out: Path, export: Path,
                                                                    tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "cls"
    argv = ["finetune", str(export), "--manifest", str(demo_out / "manifest.parquet"), "--target", "age", "--bins",
            "50", "-o", str(out), "--shots", "1", "--seeds", "1", "--steps", "2", "--folds", "2", "--patch-size",
            "32", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    runs = pd.read_csv(out / "finetune.csv")
    assert set(runs["encoder"]) == {"tiny", "scratch"} and set(runs["split"]) == {"fold 0", "fold 1"}
    assert runs["balanced_accuracy"].between(0, 1).all()
    assert set(runs.loc[runs["encoder"] == "tiny", "start_encoder"]) == {encoder_checksum(load_encoder(export))}


def test_bad_inputs_exit_2_with_one_line_naming_them(
    dataset: Path, demo_out: Path, export: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shifted = tmp_path / "shifted"
    shutil.copytree(dataset, shifted)
    label = shifted / "labelsTr" / "sub-03.nii.gz"
    image = nib.load(label)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine @ np.diag([1, 1, 2, 1])), label)
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(dataset, unlabelled)
    (unlabelled / "labelsTr" / "sub-04.nii.gz").unlink()
    m = str(demo_out / "manifest.parquet")
    base = ["finetune", str(export), "-o", str(tmp_path / "o"), "--steps", "1", "--seeds", "1", "--no-progress"]
    cases = [
        ([*base, "--dataset", str(shifted)], "sub-03.nii.gz: label map affine differs"),
        ([*base, "--dataset", str(unlabelled)], "sub-04.nii.gz: case sub-04 has no label map"),
        ([*base, "--dataset", str(dataset), "--shots", "9"], "--shots 9: only 5 subjects are left for training"),
        ([*base, "--manifest", m, "--target", "sex", "--bins", "3"], "holds no numbers"),
        ([*base, "--manifest", m, "--target", "dataset", "--shots", "4", "--patch-size", "32"], "--shots 4: fold"),
        ([*base, "--manifest", f"dataset=ds000101 of {m}", "--target", "dataset"], "a classifier needs two or more"),
        ([*base, "--manifest", m], "--target"),
        ([*base, "--dataset", str(dataset), "--target", "age"], "use them with --manifest"),
        ([*base, "--dataset", str(dataset), "--shots", "0"], "--shots"),
        ([*base, "--dataset", str(dataset), "--first-seed", str(2**70)], "--first-seed + --seeds: expected at most"),
        ([*base, "--dataset", str(dataset), "--patch-size", "100000"], "--patch-size: expected 1 to 512"),
        ([*base, "--dataset", str(tmp_path)], "not an nnU-Net dataset description"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count(": error:") == 1, (argv, err)


def test_dice_and_the_loss_agree_with_a_hand_computation() -> None:
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[:2] = 1
    prediction = np.zeros_like(truth)
    prediction[:1] = 1
    prediction[3] = 2
    assert dice(prediction, truth, 3) == [pytest.approx(2 * 16 / (16 + 32)), 0.0]
    assert np.isnan(dice(np.zeros_like(truth), np.zeros_like(truth), 2)[0])  # absent from both: undefined
    target = torch.from_numpy(truth).long()[None]
    perfect = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 50
    assert float(dice_ce_loss(perfect, target)) < 1e-3  # a class absent from truth and prediction counts as matched
    assert float(dice_ce_loss(perfect.flip(1), target)) > 1.5


def test_an_export_records_the_spacing_its_stage_trained_at() -> None:
    from training.train import stage_spacing

    rows = pd.DataFrame({"spacing": [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0], [1.0, 1.0, 1.0]]})
    assert stage_spacing(rows) == (2.0, 2.0, 2.0)  # a fine-tuning reads its dataset at this spacing
    assert stage_spacing(pd.DataFrame({"id": ["a"]})) == (1.0, 1.0, 1.0)


def test_the_classifier_head_reads_its_features_standardised_by_the_training_crops() -> None:
    """Pooled InstanceNorm features barely vary next to their mean; unscaled, a short fine-tune predicts one class."""
    torch.manual_seed(0)
    model = EncoderClassifier(resenc_tiny().encoder, classes=2)
    rng = np.random.default_rng(0)
    crops = [rng.normal(size=(16, 16, 16)).astype(np.float32) * (1 + i) + i for i in range(6)]
    batch = torch.from_numpy(np.stack(crops))[:, None]
    with torch.no_grad():
        raw = model.features(batch)
        model.standardise(crops, torch.device("cpu"))
        standard = (model.features(batch) - model.center) / model.scale
        assert torch.allclose(model(batch), model.head(standard))
    assert (raw.mean(0).abs() / raw.std(0) > 3).float().mean() > 0.5  # the shared part dominates as they come
    assert torch.allclose(standard.mean(0), torch.zeros(standard.shape[1]), atol=1e-4)
    assert torch.allclose(standard.std(0, unbiased=False), torch.ones(standard.shape[1]), atol=1e-3)
