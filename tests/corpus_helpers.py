"""A tiny converter input in the OpenMind CSV layout, shared by the tests that convert it."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib

from openmind_tools.corpus import CSV_NAME

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def small_corpus(root: Path, names: list[str]) -> Path:
    """A CSV corpus of small real images (nibabel's 2 mm anatomical) under the given file names."""
    anat = nib.load(NIBABEL_DATA / "anatomical.nii")
    base = root / "OpenMind" / "ds000999" / "sub-01" / "anat"
    base.mkdir(parents=True)
    for name in names:  # a name may hold folders: "sub-01_T1w/image.nii.gz"
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        nib.save(anat, base / name)
    with (root / CSV_NAME).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image_path", "modality"])
        writer.writeheader()
        writer.writerows({"image_path": f"ds000999/sub-01/anat/{n}", "modality": "T1w"} for n in names)
    return root
