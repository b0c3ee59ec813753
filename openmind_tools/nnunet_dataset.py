"""nnU-Net's raw dataset layout, written from a corpus with label maps and read back for fine-tuning.

`DatasetXXX_NAME/` holds `imagesTr/CASE_0000.nii.gz`, `labelsTr/CASE.nii.gz` and `dataset.json` (channel names,
label names, the case count, the file ending), as nnU-Net v2's documentation defines it, so one folder feeds both
`nnUNetv2_plan_and_preprocess` and `openmind-eval finetune`'s built-in loop. The corpus names each image's label
map in a CSV column (the cohort's `label_path`, relative to `OpenMind/` as the mask columns are). A case is one
subject (its first session, by id), so held-out cases are held-out subjects; reading a dataset made elsewhere, a
case name with a BIDS `_ses-` entity belongs to the subject named before it.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openmind_tools.corpus import IMAGE_DIR, discover
from openmind_tools.errors import ConfigError, InputError
from openmind_tools.files import atomic_write, atomic_write_text
from openmind_tools.preprocess import PreprocessSettings, preprocess

FILE_ENDING = ".nii.gz"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class Case:
    id: str  # nnU-Net's case identifier
    subject: str  # who it shows: cases of one subject never sit on both sides of a split
    image: np.ndarray  # (X, Y, Z) float32, preprocessed as the stores are (RAS, spacing, crop, z-score)
    label: np.ndarray  # (X, Y, Z) uint8 classes on the image's grid


def write_dataset(
    root: str | Path,
    out: str | Path,
    labels: Sequence[str],
    *,
    label_column: str = "label_path",
    modality: str = "T1w",
    dataset_id: int = 501,
    name: str = "OpenMindCohort",
) -> Path:
    """Write the nnU-Net raw dataset of `root`'s `modality` images that have a label map; returns its folder.

    `labels` names the classes 0, 1, ... (0 is the background). Images are copied (gzip'd if plain .nii): the
    dataset is nnU-Net's to preprocess, and must not change when the corpus does.
    """
    if not 1 <= dataset_id <= 999:
        raise ConfigError(f"dataset_id: expected 1-999 (nnU-Net's three digits), got {dataset_id}")
    if not _NAME.fullmatch(name):
        raise ConfigError(f"name: expected letters, digits, '-' and '_', got {name!r}")
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ConfigError(f"labels: expected two or more distinct class names (background first), got {list(labels)}")
    corpus = discover(root)
    if label_column not in corpus.table.columns:
        raise ConfigError(f"{root}: the corpus CSV has no column {label_column!r}")
    cases: dict[str, tuple[Path, Path]] = {}
    for image, cell in zip(corpus.images, corpus.table[label_column], strict=True):  # by id: first sessions first
        case = f"{image.dataset}_{image.subject}"
        if image.modality != modality or not isinstance(cell, str) or not cell.strip() or case in cases:
            continue
        cases[case] = (Path(image.image), Path(root) / IMAGE_DIR / cell)
    if not cases:
        raise ConfigError(f"{root}: no {modality} image has a label map in column {label_column!r}")
    folder = Path(out) / f"Dataset{dataset_id:03d}_{name}"
    if folder.exists():
        shutil.rmtree(folder)  # a dataset is rebuilt whole, never merged with an older one
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    for case, (image, label) in cases.items():
        _copy_gzipped(image, folder / "imagesTr" / f"{case}_0000{FILE_ENDING}")
        _copy_gzipped(label, folder / "labelsTr" / f"{case}{FILE_ENDING}")
    description = {
        "channel_names": {"0": modality},
        "labels": {label: index for index, label in enumerate(labels)},
        "numTraining": len(cases),
        "file_ending": FILE_ENDING,
        "name": name,
        "description": f"{modality} images of {root} with the label maps its CSV names in {label_column!r}",
    }
    atomic_write_text(folder / "dataset.json", json.dumps(description, indent=1))
    return folder


def read_dataset(folder: str | Path, settings: PreprocessSettings) -> tuple[list[Case], list[str]]:
    """Every case of an nnU-Net raw dataset, preprocessed with `settings`, and the label names (class order).

    Bad input is a ConfigError naming the file: a case without its label map, a label map off its image's grid,
    a class beyond dataset.json's labels, more than one input channel.
    """
    folder = Path(folder)
    try:
        description = json.loads((folder / "dataset.json").read_text())
        labels = sorted(description["labels"], key=lambda k: int(description["labels"][k]))
        ending, channels = description["file_ending"], description["channel_names"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{folder / 'dataset.json'}: not an nnU-Net dataset description ({e})") from None
    if [int(description["labels"][k]) for k in labels] != list(range(len(labels))) or len(labels) < 2:
        raise ConfigError(f"{folder / 'dataset.json'}: labels must number the classes 0, 1, ... (found "
                          f"{description['labels']})")  # fmt: skip
    if len(channels) != 1:
        raise ConfigError(f"{folder / 'dataset.json'}: {len(channels)} input channels; fine-tuning reads one")
    images = sorted((folder / "imagesTr").glob(f"*_0000{ending}"))
    if not images:
        raise ConfigError(f"{folder / 'imagesTr'}: no case (*_0000{ending})")
    cases = []
    for image in images:
        case = image.name.removesuffix(f"_0000{ending}")
        label = folder / "labelsTr" / f"{case}{ending}"
        if not label.is_file():
            raise ConfigError(f"{label}: case {case} has no label map")
        try:
            done = preprocess(image, settings=settings, label_path=label)
        except InputError as e:
            raise ConfigError(str(e)) from None
        if int(done.label.max()) >= len(labels):
            raise ConfigError(f"{label}: holds class {int(done.label.max())}, dataset.json names {len(labels)}")
        subject = case.split("_ses-")[0]
        cases.append(Case(case, subject, done.volume.image.astype(np.float32), done.label))
    return cases, labels


def _copy_gzipped(source: Path, target: Path) -> None:
    data = source.read_bytes()
    with atomic_write(target) as f:
        f.write(data if data[:2] == b"\x1f\x8b" else gzip.compress(data, compresslevel=1))
