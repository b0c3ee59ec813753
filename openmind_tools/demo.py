"""A small corpus in exactly the published OpenMind layout, built from real MRI that pip packages ship.

Sources: nilearn's MNI152 2009a 1 mm T1 with its grey/white-matter maps, and nibabel's 2 mm test
anatomical. Other contrasts are synthesised from the tissue maps (T2-like: CSF bright; FLAIR-like: CSF
dark, ...), a scalp shell is added so the face region and the brain ("fb") mask differ, and images vary
in orientation (RAS/LPS/LAS), spacing (1 mm, 1x1x3 mm, 2 mm), dtype (uint8/int16/float32), file kind
(.nii/.nii.gz), session level and masks, as the real corpus does. Deterministic for a seed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, ornt_transform
from nilearn.datasets import MNI152_FILE_PATH
from scipy import ndimage

from openmind_tools.corpus import ANATOMY_MASK, CSV_NAME, DEFACE_MASK, IMAGE_DIR

CSV_COLUMNS = [
    "image_path", "modality", "anon_mask_path", "anat_mask_path", "unique_id", "image_quality_score",
    "derived_from", "is_brain_extract", "manufacturer", "model_name", "phase_encoding_direction",
    "magnetic_field_strength", "repetition_time", "echo_time", "age", "sex", "handedness", "race", "weight",
    "bmi", "health_status",
]  # fmt: skip


@dataclass(frozen=True)
class _Image:
    dataset: str
    subject: str
    session: str | None
    modality: str
    contrast: str  # which synthetic contrast (see _contrasts)
    orientation: str = "RAS"
    dtype: str = "int16"
    z_step: int = 1  # keep every z_step-th axial slice: 1 x 1 x z_step mm
    masks: bool = True
    folder: str = "anat"
    derived_from: str = ""
    ext: str = ".nii.gz"


_IMAGES = [
    _Image("ds000101", "sub-01", "ses-1", "T1w", "t1", dtype="uint8"),
    _Image("ds000101", "sub-01", "ses-1", "T2w", "t2"),
    _Image("ds000101", "sub-01", "ses-1", "FLAIR", "flair", orientation="LPS"),
    _Image("ds000101", "sub-01", "ses-2", "T1w", "t1", orientation="LAS", dtype="float32"),
    _Image("ds000101", "sub-01", "ses-2", "PDw", "pd"),
    _Image("ds000101", "sub-02", "ses-1", "T1w", "t1", orientation="LPS"),
    _Image("ds000101", "sub-02", "ses-1", "T2starw", "t2star", z_step=2),
    _Image("ds000202", "sub-01", None, "T1w", "t1", ext=".nii"),
    _Image("ds000202", "sub-01", None, "inplaneT1", "t1", z_step=3),
    _Image("ds000202", "sub-01", None, "inplaneT2", "t2", z_step=3, orientation="LAS"),
    _Image("ds000202", "sub-02", None, "T1w", "t1", dtype="float32"),
    _Image("ds000202", "sub-02", None, "angio", "angio", masks=False),
    _Image("ds000303", "sub-01", "ses-a", "MP2RAGE", "mp2rage", dtype="float32"),
    _Image("ds000303", "sub-01", "ses-a", "UNIT1", "mp2rage"),
    _Image("ds000303", "sub-01", "ses-a", "DWI", "t2", folder="dwi", z_step=2),
    _Image(
        "ds000303",
        "sub-01",
        "ses-a",
        "ADC",
        "adc",
        folder="dwi_ADC",
        z_step=2,
        dtype="float32",
        derived_from="DWI",
    ),  # fmt: skip
    _Image("ds000303", "sub-01", "ses-a", "sbref", "t2", folder="dwi", z_step=2, masks=False),
    _Image("ds000303", "sub-02", "ses-a", "FLAIR", "flair"),
]
_QUALITY = {"T1w": 1, "T2w": 2, "FLAIR": 2, "PDw": 3, "T2starw": 4, "inplaneT1": 3, "inplaneT2": 4, "angio": 5,
            "MP2RAGE": 1, "UNIT1": 2, "DWI": 3, "ADC": 3, "sbref": 5}  # fmt: skip
_SUBJECTS = {"sub-01": (34, "F", "R", 61.0), "sub-02": (67, "M", "L", 82.5)}


def write_demo_corpus(root: str | Path, seed: int = 0) -> Path:
    """Write the demo tree (`root/openneuro_metadata.csv` + `root/OpenMind/...`) and return `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    template = nib.load(MNI152_FILE_PATH)
    contrasts, brain, face = _contrasts(template)
    rows = [_write_mni_image(root, spec, contrasts, brain, face, template.affine, rng) for spec in _IMAGES]
    rows.append(_write_nibabel_anatomical(root))
    with (root / CSV_NAME).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return root


def _contrasts(template: nib.Nifti1Image) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Synthetic contrasts (float32, RAS, 1 mm) from the template and its tissue maps, plus brain and face masks."""
    data_dir = Path(MNI152_FILE_PATH).parent
    t1 = np.asarray(template.dataobj, dtype=np.float32)
    gm = np.asarray(nib.load(data_dir / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").dataobj, np.float32) / 255
    wm = np.asarray(nib.load(data_dir / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").dataobj, np.float32) / 255
    brain = ndimage.binary_fill_holes(t1 > 20)
    csf = np.clip(brain - gm - wm, 0, 1)
    head = ndimage.distance_transform_edt(~brain) < 9  # a scalp shell around the brain
    scalp = (head & ~brain).astype(np.float32)
    shape = np.array(t1.shape)
    y, z = np.indices(t1.shape)[1:]
    face = (y > 0.78 * shape[1]) & (z < 0.42 * shape[2]) & head  # anterior-inferior: what defacing removes
    contrasts = {
        "t1": t1 + 110 * scalp,
        "t2": 90 * gm + 60 * wm + 220 * csf + 70 * scalp,
        "flair": 150 * gm + 100 * wm + 15 * csf + 90 * scalp,
        "pd": 170 * gm + 140 * wm + 190 * csf + 120 * scalp,
        "t2star": 80 * gm + 110 * wm + 160 * csf + 50 * scalp,
        "mp2rage": 2.0 * (0.35 * gm + 0.8 * wm + 0.05 * csf) - 0.4 * (~head),
        "angio": 40 * gm + 30 * wm + 20 * csf + 10 * scalp,
        "adc": 0.0008 * gm + 0.0007 * wm + 0.003 * csf,
    }
    return contrasts, brain.astype(np.uint8), face.astype(np.uint8)


def _write_mni_image(root, spec, contrasts, brain, face, affine, rng) -> dict[str, object]:
    data = contrasts[spec.contrast]
    data = data * rng.uniform(0.8, 1.25) + rng.normal(0, 0.02 * float(data.max()), data.shape).astype(np.float32)
    if spec.contrast != "mp2rage":
        data = np.clip(data, 0, None)
    if spec.contrast == "angio":  # bright tubes along z, as in a time-of-flight angiogram
        x, y = np.indices(data.shape[:2])
        for cx, cy in ((90, 120), (108, 120), (98, 150)):
            data[(x - cx) ** 2 + (y - cy) ** 2 < 6] += 4 * float(data.max())
    data = data * (1 - face)  # defaced: the face region is zeroed, as in OpenMind
    shifted = affine.copy()
    shifted[:3, 3] += rng.uniform(-5, 5, 3)  # a different scanner position per image
    rel = _relpath(spec)
    path = root / IMAGE_DIR / rel
    _save(data, shifted, path, spec.orientation, spec.dtype, spec.z_step)
    anon = anat = ""
    if spec.masks:
        mask_dir = path.parent / f"{_stem(path.name)}__Data"
        _save(face, shifted, mask_dir / DEFACE_MASK, spec.orientation, "uint8", spec.z_step)
        _save(brain, shifted, mask_dir / ANATOMY_MASK, spec.orientation, "uint8", spec.z_step)
        anon = str((mask_dir / DEFACE_MASK).relative_to(root / IMAGE_DIR))
        anat = str((mask_dir / ANATOMY_MASK).relative_to(root / IMAGE_DIR))
    return _row(spec, rel, anon, anat)


def _write_nibabel_anatomical(root: Path) -> dict[str, object]:
    """A real 2 mm LAS int16 head smaller than a 160^3 patch, without masks."""
    source = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    spec = _Image("ds000303", "sub-02", "ses-a", "T1w", "", orientation="LAS", masks=False)
    rel = _relpath(spec)
    img = nib.load(source)
    (root / IMAGE_DIR / rel).parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.int16), img.affine), root / IMAGE_DIR / rel)
    return _row(spec, rel, "", "")


def _save(data: np.ndarray, affine: np.ndarray, path: Path, orientation: str, dtype: str, z_step: int) -> None:
    """Save RAS data as `orientation`, keeping every `z_step`-th slice (anisotropic spacing)."""
    if z_step > 1:
        data = data[:, :, ::z_step]
        affine = affine @ np.diag([1, 1, z_step, 1])
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img = img.as_reoriented(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(orientation))))
    values = np.asanyarray(img.dataobj)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        values = np.clip(np.round(values), info.min, info.max)
    out = nib.Nifti1Image(values.astype(dtype), img.affine)
    out.set_qform(img.affine, code=1)
    out.set_sform(img.affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, path)


def _relpath(spec: _Image) -> str:
    entities = [spec.subject] + ([spec.session] if spec.session else [])
    name = "_".join(entities + [spec.modality]) + spec.ext
    return "/".join([spec.dataset, *entities, spec.folder, name])


def _stem(name: str) -> str:
    return name.removesuffix(".gz").removesuffix(".nii")


def _row(spec: _Image, rel: str, anon: str, anat: str) -> dict[str, object]:
    age, sex, hand, weight = _SUBJECTS[spec.subject]
    return {
        "image_path": rel,
        "modality": spec.modality,
        "anon_mask_path": anon,
        "anat_mask_path": anat,
        "unique_id": f"{spec.dataset}_{spec.subject}_{spec.session or 'nosession'}_{spec.modality}",
        "image_quality_score": _QUALITY.get(spec.modality, 2),
        "derived_from": spec.derived_from,
        "is_brain_extract": False,
        "manufacturer": "Siemens" if spec.dataset != "ds000202" else "GE",
        "model_name": "Prisma" if spec.dataset != "ds000202" else "Discovery MR750",
        "phase_encoding_direction": "j-" if spec.folder.startswith("dwi") else "",
        "magnetic_field_strength": 3.0 if spec.dataset != "ds000303" else 7.0,
        "repetition_time": 2.3 if spec.modality in ("T1w", "MP2RAGE", "UNIT1") else 3.2,
        "echo_time": 0.0029 if spec.modality == "T1w" else 0.08,
        "age": age if spec.dataset != "ds000202" else "",
        "sex": sex,
        "handedness": hand,
        "race": "",
        "weight": weight if spec.dataset == "ds000101" else "",
        "bmi": "",
        "health_status": "healthy" if spec.subject == "sub-01" else "patient",
    }
