"""The synthetic cohort on real files: layout, determinism across workers, label maps that match the images and the
CSV, age and sex that change the anatomy, and the converter taking it whole."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from openmind_tools import cohort
from openmind_tools.convert import convert
from openmind_tools.corpus import CSV_NAME, IMAGE_DIR, discover
from openmind_tools.demo import CSV_COLUMNS
from openmind_tools.errors import ConfigError
from openmind_tools.manifest_io import read_table
from openmind_tools.preprocess import PreprocessSettings

SUBJECTS = 4  # one per dataset: every scanner (orientation, dtype, thick slices) is written
SPACING = 3.0  # mm; a third of the default's voxels, so the file runs in seconds (one template for all tests)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cohort.write_cohort(
        tmp_path_factory.mktemp("cohort") / "two", subjects=SUBJECTS, seed=0, spacing=SPACING, workers=2
    )


@pytest.fixture(scope="module")
def table(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / CSV_NAME)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _ras(path: Path) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.load(path))


def test_the_csv_names_exactly_the_files_that_exist(root: Path, table: pd.DataFrame) -> None:
    assert (
        list(table.columns)
        == [*CSV_COLUMNS, "lesion_volume", "brain_volume", "label_path"]
        == [*CSV_COLUMNS, *cohort.GROUND_TRUTH]
    )
    named = {p for c in ("image_path", "anon_mask_path", "anat_mask_path", "label_path") for p in table[c]}
    on_disk = {str(p.relative_to(root / IMAGE_DIR)) for p in (root / IMAGE_DIR).rglob("*") if p.is_file()}
    assert on_disk == named
    pattern = re.compile(r"ds10000[1-4]/(sub-\d{3})/(ses-\d)/anat/\1_\2_(T1w|T2w|FLAIR)\.nii\.gz")
    assert all(pattern.fullmatch(p) for p in table["image_path"])
    assert table["unique_id"].is_unique and table["image_path"].is_unique
    assert all(sorted(m) == ["FLAIR", "T1w", "T2w"] for _, m in table.groupby("label_path")["modality"])
    assert table["label_path"].str.fullmatch(r"ds10000\d/derivatives/labels/sub-\d{3}/ses-\d/anat/sub-\d{3}_ses-\d_dseg"
                                             r"\.nii\.gz").all()  # fmt: skip
    assert (table.groupby([table["image_path"].str[:8], "modality"])["image_quality_score"].nunique() == 1).all()
    scanners = {}  # each dataset's own orientation, dtype and slice thickness
    for path in table.loc[table["modality"] == "T1w", "image_path"]:
        image = nib.load(root / IMAGE_DIR / path)
        zooms = tuple(float(z) for z in np.round(image.header.get_zooms(), 3))
        scanners[path[:8]] = ("".join(nib.aff2axcodes(image.affine)), str(image.get_data_dtype()), zooms)
    assert scanners == {
        "ds100001": ("RAS", "int16", (3.0, 3.0, 3.0)),
        "ds100002": ("LPS", "float32", (3.0, 3.0, 3.0)),
        "ds100003": ("LAS", "int16", (3.0, 3.0, 6.0)),
        "ds100004": ("RAS", "uint8", (3.0, 3.0, 3.0)),
    }
    assert set(table["sex"]) <= {"M", "F"} and table["age"].between(20, 110).all()
    for _, subject in table.groupby(table["image_path"].str[:16]):  # later sessions are older
        ages = subject.drop_duplicates("label_path")["age"].tolist()
        assert ages == sorted(ages) and len(set(ages)) == len(ages)


def test_same_seed_same_bytes_whatever_the_workers_and_another_seed_differs(root: Path, tmp_path: Path) -> None:
    one = cohort.write_cohort(tmp_path / "one", subjects=SUBJECTS, seed=0, spacing=SPACING, workers=1)
    assert _files(one) == _files(root)
    other = _files(cohort.write_cohort(tmp_path / "other", subjects=1, seed=1, spacing=SPACING))
    first = "OpenMind/ds100001/sub-001/ses-1/anat/sub-001_ses-1_T1w.nii.gz"
    assert other[first] != _files(root)[first]
    assert other[CSV_NAME] != _files(root)[CSV_NAME]
    # a rerun into a cohort folder with the same arguments is allowed and writes the same bytes; other ones are not
    assert _files(cohort.write_cohort(tmp_path / "other", subjects=1, seed=1, spacing=SPACING)) == other
    with pytest.raises(ConfigError, match="root: .* holds a cohort written with"):
        cohort.write_cohort(tmp_path / "other", subjects=2, seed=1, spacing=SPACING)
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="files that are not a cohort"):
        cohort.write_cohort(tmp_path / "stranger", subjects=1)


def test_label_maps_share_the_images_grid_and_give_the_csv_volumes(root: Path, table: pd.DataFrame) -> None:
    base = root / IMAGE_DIR
    for label_path, session in table.groupby("label_path"):
        raw = nib.load(base / label_path)
        assert raw.get_data_dtype() == np.uint8
        labels = np.asarray(_ras(base / label_path).dataobj)
        voxel = float(np.prod(raw.header.get_zooms()))
        counts = np.bincount(labels.ravel(), minlength=5)
        assert len(counts) == 5 and (counts[:4] > 0).all()
        assert session["brain_volume"].iloc[0] == pytest.approx(counts[2:].sum() * voxel)
        assert session["lesion_volume"].iloc[0] == pytest.approx(counts[4] * voxel)
        assert (counts[4] > 0) == (session["lesion_volume"].iloc[0] > 0)
        means = {}
        for row in session.itertuples():
            for path in (row.image_path, row.anon_mask_path, row.anat_mask_path):
                other = nib.load(base / path)
                assert other.shape == raw.shape and np.allclose(other.affine, raw.affine), path
            image = np.asarray(_ras(base / row.image_path).dataobj, np.float32)
            face = np.asarray(_ras(base / row.anon_mask_path).dataobj) == 1
            brain = np.asarray(_ras(base / row.anat_mask_path).dataobj) == 1
            assert face.any() and (image[face] == 0).all() and not (face & brain).any()
            assert (brain == (labels > 0)).all()
            assert (image[~brain & ~face] > 0).mean() > 0.5  # a head (scalp, noise) outside the brain mask
            means[row.modality] = [float(image[labels == k].mean()) if counts[k] else np.nan for k in range(5)]
        t1, t2, flair = means["T1w"], means["T2w"], means["FLAIR"]
        assert t1[3] > t1[2] > t1[1] and t2[1] > t2[2] > t2[3] and flair[2] > flair[1] and flair[3] > flair[1]
        if counts[4]:
            assert t1[4] < t1[3] and t2[4] > t2[3] and flair[4] > flair[3]


def test_age_widens_csf_shrinks_the_brain_and_adds_lesions_and_males_are_larger() -> None:
    csf, brain, lesions = [], [], []
    for index in range(3):
        subject = dataclasses.replace(cohort._draw_subject(index, seed=0), ages=(25.0, 85.0))
        young, old = cohort._labels(subject, SPACING)[0]
        assert ((young == cohort.LESION) <= (old == cohort.LESION)).all()  # lesions are kept, and grow
        csf.append([(v == cohort.CSF).sum() for v in (young, old)])
        brain.append([(v >= cohort.GM).sum() for v in (young, old)])
        lesions.append([(v == cohort.LESION).sum() for v in (young, old)])
    csf, brain, lesions = map(np.array, (csf, brain, lesions))
    assert (csf[:, 1] > 1.3 * csf[:, 0]).all() and (brain[:, 1] < brain[:, 0]).all()
    assert lesions[:, 1].mean() > 2 * lesions[:, 0].mean()
    subject = dataclasses.replace(cohort._draw_subject(0, seed=0), ages=(50.0,))
    volumes = {s: (cohort._labels(dataclasses.replace(subject, sex=s), SPACING)[0][0] >= cohort.GM).sum() for s in "MF"}
    assert volumes["M"] > 1.1 * volumes["F"]  # (1.025 / 0.975) ** 3 = 1.16
    ages = np.linspace(10, 100, 50)
    a = [cohort._atrophy(x) for x in ages]
    assert a == sorted(a) and a[0] == 0 and a[-1] == 1


def test_discover_and_convert_take_every_image_with_both_masks(root: Path, table: pd.DataFrame, tmp_path: Path) -> None:
    corpus = discover(root)
    assert len(corpus.images) == len(table) and not corpus.rejected
    assert all(i.anatomy_mask and Path(i.anatomy_mask).is_file() and i.deface_mask and Path(i.deface_mask).is_file()
               for i in corpus.images)  # fmt: skip
    assert all(Path(i.anatomy_mask).name == "fb_mask.nii.gz" and Path(i.deface_mask).name == "deface_mask.nii.gz"
               for i in corpus.images)  # fmt: skip
    summary = convert(
        root, tmp_path / "out", settings=PreprocessSettings(spacing=2.0), formats=["zarr"], progress=False
    )
    assert summary.failed == 0 and summary.converted == len(table)
    manifest, _ = read_table(tmp_path / "out" / "manifest.parquet")
    merged = manifest.merge(table, on="image_path", suffixes=("", "_csv"))
    assert len(merged) == len(table)
    for column in ("age", "sex", "lesion_volume", "brain_volume", "label_path"):
        assert (merged[column] == merged[f"{column}_csv"]).all(), column


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"subjects": 0}, "subjects: expected an integer >= 1, got 0"),
        ({"subjects": 2.5}, "subjects: expected an integer >= 1, got 2.5"),
        ({"subjects": True}, "subjects: expected an integer >= 1, got True"),
        ({"seed": -1}, "seed: expected an integer >= 0, got -1"),
        ({"spacing": 0.2}, r"spacing: expected a number of mm in \[0.5, 4\], got 0.2"),
        ({"spacing": "2"}, r"spacing: expected a number of mm in \[0.5, 4\], got '2'"),
        ({"workers": 0}, "workers: expected an integer >= 1, got 0"),
    ],
)
def test_bad_arguments_are_config_errors_naming_them(arguments: dict, name: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=name):
        cohort.write_cohort(tmp_path / "never", **arguments)
    assert not (tmp_path / "never").exists()  # refused before anything is written


def test_the_cli_writes_a_cohort_and_its_nnunet_dataset_reads_back_on_the_images_grid(
    root: Path, table: pd.DataFrame, tmp_path: Path
) -> None:
    from openmind_tools.cli.convert import main
    from openmind_tools.nnunet_dataset import read_dataset

    assert main(["demo-data", str(tmp_path / "c"), "--cohort", "1", "--spacing", "4", "--workers", "1",
                 "--quiet"]) == 0  # fmt: skip
    assert len(pd.read_csv(tmp_path / "c" / CSV_NAME)) % 3 == 0
    assert main(["nnunet-dataset", str(root), str(tmp_path / "raw"), "--id", "7"]) == 0
    folder = tmp_path / "raw" / "Dataset007_OpenMindCohort"
    described = json.loads((folder / "dataset.json").read_text())
    assert described["numTraining"] == SUBJECTS and described["labels"]["lesion"] == 4
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == sorted(
        f"{d}_sub-001.nii.gz" for d in ("ds100001", "ds100002", "ds100003", "ds100004")
    )  # one case per subject
    cases, labels = read_dataset(folder, PreprocessSettings(spacing=SPACING, crop="nonzero"))
    assert labels == ["background", "CSF", "GM", "WM", "lesion"] and len(cases) == SUBJECTS
    for case in cases:
        assert case.image.shape == case.label.shape and set(np.unique(case.label)) <= set(range(5))
        assert abs(float(case.image[case.label == 3].mean()) - float(case.image[case.label == 1].mean())) > 1  # T1w
