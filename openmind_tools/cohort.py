"""A synthetic OpenMind-layout cohort whose labels cause its pixels, so a 2-core CPU run can show that pretraining
teaches an encoder what a downstream probe uses: age (atrophy, lesions), sex (head size), dataset (scanner).
SynthSeg-style: nilearn's MNI152 2009a tissue maps -> a label map per session (0 background, 1 CSF, 2 GM, 3 WM,
4 lesion) -> T1w/T2w/FLAIR; arrays are (x, y, z) RAS on the template grid at `spacing` mm until saved (`FACTORS`).
A synthetic check of the learning machinery, not evidence about real patients.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import multiprocessing
import numbers
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, ornt_transform
from scipy import ndimage
from tqdm.auto import tqdm

from openmind_tools.corpus import ANATOMY_MASK, CSV_NAME, DEFACE_MASK, IMAGE_DIR
from openmind_tools.errors import ConfigError
from openmind_tools.files import atomic_write_text

GROUND_TRUTH = ["lesion_volume", "brain_volume", "label_path"]  # CSV columns after demo.CSV_COLUMNS; mm^3
MODALITIES = ("T1w", "T2w", "FLAIR")
MARKER = ".cohort.json"  # the arguments a cohort folder was written with; another request there is refused
BG, CSF, GM, WM, LESION, SKULL, SCALP = range(7)  # label values; SKULL and SCALP exist only inside the generator

# = Path(nilearn.datasets.MNI152_FILE_PATH).parent, found without importing nilearn.datasets (sklearn, ~3 s)
_NILEARN_DATA = Path(importlib.util.find_spec("nilearn").submodule_search_locations[0]) / "datasets" / "data"
_AGE = (20.0, 90.0)  # uniform, at the first session
_SESSIONS = (0.6, 0.3, 0.1)  # P(1, 2, 3 sessions)
_FOLLOW_UP = (1.0, 5.0)  # years between sessions, uniform
_MNI_SCALE = 0.92  # MNI152 brains are larger than native ones: GM+WM 1.73 l in the template -> 1.35 l here
_SEX_SCALE = {"M": 1.025, "F": 0.975}  # linear head/brain scale: x1.16 brain volume M/F (real adults ~x1.1)
_SCALE_SD = 0.02  # individual linear scale, normal
_WARP_MM, _WARP_GRID_MM = 2.5, 40.0  # displacement sd at control points every 40 mm, cubic-upsampled
_VENTRICLE_MM = 3.0  # at a(age) = 1: GM/WM within this of the ventricles becomes CSF
_CORTEX_MM = 1.0  # at a(age) = 1: GM within this of outer CSF/background becomes CSF
_RATE = (0.7, 1.3)  # individual atrophy rate, uniform, multiplies both widths
_LESIONS = (0.5, 20.0)  # expected lesion count = load * (0.5 + 20 a(age))
_LOAD_SIGMA = 0.7  # lesion load ~ lognormal(0, 0.7)
_LESION_MM = (2.0, 5.0)  # ellipsoid semi-axes at onset, uniform, grown by (0.7 + 0.6 a(age))
_SKULL_MM, _SCALP_MM = 4.0, 6.0  # shell around the brain mask, scaled with the head
_MEANS = {  # relative intensity of air, CSF, GM, WM, lesion, skull, scalp
    "T1w": (0.0, 0.18, 0.50, 0.80, 0.38, 0.06, 0.85),
    "T2w": (0.0, 1.00, 0.55, 0.38, 0.85, 0.05, 0.45),
    "FLAIR": (0.0, 0.10, 0.55, 0.40, 0.95, 0.05, 0.60),
}
_MEAN_JITTER = 0.06  # per dataset x modality x tissue relative sd of those means
_TEXTURE = 0.04  # within-tissue smooth (sigma 1 voxel) multiplicative texture sd
_QUALITY = {"T1w": 0, "T2w": 1, "FLAIR": 1}  # image_quality_score = the dataset's + this, 1 (best) .. 5
_TIMES = {"T1w": (2.3, 0.0029), "T2w": (3.2, 0.08), "FLAIR": (9.0, 0.09)}  # repetition, echo time (s)


@dataclass(frozen=True)
class _Scanner:
    manufacturer: str
    model: str
    field: float  # T
    orientation: str  # on-disk axis codes
    dtype: str
    z_step: int  # keep every z_step-th axial slice: spacing x spacing x z_step*spacing
    bias: float  # log bias field: a degree-2 polynomial whose 9 coefficients are N(0, bias / 3)
    noise: float  # Rician noise sd, relative to a WM T1w of 0.8
    quality: int


_SCANNERS = {
    "ds100001": _Scanner("Siemens", "Prisma", 3.0, "RAS", "int16", 1, 0.10, 0.015, 1),
    "ds100002": _Scanner("GE", "Discovery MR750", 3.0, "LPS", "float32", 1, 0.25, 0.025, 2),
    "ds100003": _Scanner("Philips", "Achieva", 1.5, "LAS", "int16", 2, 0.30, 0.035, 3),
    "ds100004": _Scanner("Siemens", "Skyra", 3.0, "RAS", "uint8", 1, 0.20, 0.020, 2),
}
_DATASETS = list(_SCANNERS)  # subject i belongs to _DATASETS[i % 4]

_ROWS = [
    ("factor", "what it changes in the image", "by how much"),
    ("---", "---", "---"),
    ("sex", "linear scale of head and brain",
     f"M x{_SEX_SCALE['M']}, F x{_SEX_SCALE['F']}, times 1 + N(0, {_SCALE_SD})"),
    ("age", f"a(age) = clip((age - 20) / 70, 0, 1) ** 1.5, times an individual rate U{_RATE}", "0 at 20, 1 at 90"),
    ("age", "ventricles widen: GM/WM within w of them become CSF", f"w = {_VENTRICLE_MM} mm x a x rate"),
    ("age", "cortex thins, sulci widen: GM within w of outer CSF becomes CSF", f"w = {_CORTEX_MM} mm x a x rate"),
    ("age", "white-matter lesions (label 4; T1w dark, T2w/FLAIR bright), kept and grown in later sessions",
     f"Poisson count, mean load x ({_LESIONS[0]} + {_LESIONS[1]} a), load ~ lognormal(0, {_LOAD_SIGMA}); "
     f"semi-axes U{_LESION_MM} mm x (0.7 + 0.6 a)"),
    ("subject", "smooth deformation", f"displacement N(0, {_WARP_MM} mm) every {_WARP_GRID_MM:.0f} mm, cubic"),
    ("dataset", "scanner: bias field (log = degree-2 polynomial, 9 coefficients N(0, b / 3)), Rician noise sd "
     "(WM T1w = 0.8), slice thickness, orientation, dtype",
     "; ".join(f"{k}: b {s.bias}, noise {s.noise}, z x{s.z_step}, {s.orientation}, {s.dtype}"
               for k, s in _SCANNERS.items())),
    ("dataset", "tissue contrast", f"each tissue mean x (1 + N(0, {_MEAN_JITTER})) per dataset and modality"),
    ("modality", "tissue means (air, CSF, GM, WM, lesion, skull, scalp)",
     "; ".join(f"{m} {v}" for m, v in _MEANS.items())),
    ("image", "texture, partial volume",
     f"texture sd {_TEXTURE} (sigma 1 voxel); blur sigma 0.5 voxel (x z_step in z)"),
]  # fmt: skip
FACTORS = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in _ROWS)  # factor -> image -> how much (quoted by the README)


def write_cohort(
    root: str | Path, subjects: int = 120, seed: int = 0, spacing: float = 2.0, workers: int = 1, progress: bool = False
) -> Path:
    """Write `root/openneuro_metadata.csv` + `root/OpenMind/...` (T1w, T2w, FLAIR per session, with both masks and
    a label map per session under `derivatives/labels`) and return `root`.

    Deterministic for (`subjects`, `seed`, `spacing`) whatever `workers` is: each subject draws from its own
    SeedSequence(seed, spawn_key=(0, index, stream)). `root` must be empty, absent, or a cohort written with the same
    three arguments (rewritten then with the same bytes, e.g. to finish an interrupted run): two cohorts never mix.
    `workers` > 1 spawns processes, so a script that calls it needs the usual `if __name__ == "__main__":` guard.
    """
    _check("subjects", subjects, 1)
    _check("seed", seed, 0)
    _check("workers", workers, 1)
    if isinstance(spacing, bool) or not isinstance(spacing, numbers.Real) or not 0.5 <= spacing <= 4.0:
        raise ConfigError(f"spacing: expected a number of mm in [0.5, 4], got {spacing!r}")
    root, spacing = Path(root), float(spacing)
    _claim(root, {"subjects": int(subjects), "seed": int(seed), "spacing": spacing})
    args = (repeat(str(root)), range(subjects), repeat(int(seed)), repeat(spacing))
    bar = functools.partial(tqdm, total=subjects, disable=not progress, desc="cohort", unit="subject")
    if workers == 1:
        rows = [row for rows in bar(map(_write_subject, *args)) for row in rows]
    else:  # spawn: the parent may hold threads (dask, torch) that fork would copy mid-lock
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = [row for rows in bar(pool.map(_write_subject, *args)) for row in rows]
    from openmind_tools import demo  # here: it imports nilearn.datasets (sklearn), 3 s more per spawned worker

    with (root / f".{CSV_NAME}.tmp").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*demo.CSV_COLUMNS, *GROUND_TRUTH])
        writer.writeheader()
        writer.writerows(rows)
    (root / f".{CSV_NAME}.tmp").replace(root / CSV_NAME)  # last: a cohort without its CSV is unfinished
    return root


def _atrophy(age: float) -> float:
    """a(age) in [0, 1]: 0 up to 20, 1 from 90, convex between (atrophy accelerates with age)."""
    return float(np.clip((age - _AGE[0]) / (_AGE[1] - _AGE[0]), 0.0, 1.0) ** 1.5)


@dataclass(frozen=True)
class _Subject:
    index: int
    seed: int
    dataset: str
    name: str  # sub-NNN, numbered within its dataset
    sex: str
    ages: tuple[float, ...]  # one per session
    scale_noise: float
    rate: float
    load: float
    handedness: str
    weight: float


def _draw_subject(index: int, seed: int) -> _Subject:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, index, 0)))
    sex = "M" if rng.random() < 0.5 else "F"
    ages = [round(float(rng.uniform(*_AGE)), 1)]
    for _ in range(rng.choice(3, p=_SESSIONS)):
        ages.append(round(ages[-1] + float(rng.uniform(*_FOLLOW_UP)), 1))
    return _Subject(
        index=index,
        seed=seed,
        dataset=_DATASETS[index % len(_DATASETS)],
        name=f"sub-{index // len(_DATASETS) + 1:03d}",
        sex=sex,
        ages=tuple(ages),
        scale_noise=float(rng.normal(0, _SCALE_SD)),
        rate=float(rng.uniform(*_RATE)),
        load=float(rng.lognormal(0, _LOAD_SIGMA)),
        handedness="L" if rng.random() < 0.1 else "R",
        weight=round(float(rng.normal(80, 10) if sex == "M" else rng.normal(66, 9)), 1),
    )


@functools.lru_cache(maxsize=2)
def _template(spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Soft one-hot maps (background, CSF, GM, WM, ventricles) of the hard MNI label map, resampled to `spacing`
    mm (float32, (5, x, y, z)), and the grid's affine."""
    image = nib.load(_NILEARN_DATA / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    t1 = np.asarray(image.dataobj, np.float32)
    gm, wm = (np.asarray(nib.load(_NILEARN_DATA / f"mni_icbm152_{t}_tal_nlin_sym_09a_converted.nii.gz").dataobj,
                         np.float32) / 255 for t in ("gm", "wm"))  # fmt: skip
    brain = ndimage.binary_fill_holes(t1 > 20)
    labels = np.argmax(np.stack([~brain, np.clip(brain - gm - wm, 0, 1), gm, wm]), axis=0)
    # ventricles: deep CSF (> 10 mm inside the brain) in a central box, in pieces of at least 200 mm^3
    x, y, z = (np.arange(n) * image.affine[i, i] + image.affine[i, 3] for i, n in enumerate(t1.shape))
    sides = (np.abs(x) <= 32, (y >= -45) & (y <= 35), (z >= -15) & (z <= 35))
    box = sides[0][:, None, None] & sides[1][None, :, None] & sides[2]
    near = tuple(slice(max(np.flatnonzero(s)[0] - 11, 0), np.flatnonzero(s)[-1] + 12) for s in sides)  # > 10 mm
    deep = np.zeros_like(brain)  # the distance transform of the box and 11 mm around it decides "> 10 mm" exactly
    deep[near] = (labels[near] == CSF) & (ndimage.distance_transform_edt(brain[near]) > 10) & box[near]
    pieces, _ = ndimage.label(deep)
    sizes = np.bincount(pieces.ravel())
    ventricles = np.isin(pieces, np.flatnonzero(sizes >= 200)) & (pieces > 0)
    shape = tuple(int((n - 1) // spacing) + 1 for n in t1.shape)
    maps = np.empty((5, *shape), np.float32)
    for k, hard in enumerate([*(labels == c for c in range(4)), ventricles]):
        smooth = ndimage.gaussian_filter(hard.astype(np.float32), max(spacing - 1, 0) / 2)  # anti-alias
        maps[k] = ndimage.affine_transform(
            smooth, np.full(3, spacing), output_shape=shape, order=1, cval=float(k == BG)
        )
    return maps, image.affine @ np.diag([spacing, spacing, spacing, 1])


def _labels(subject: _Subject, spacing: float) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """One label map (uint8, 0-4) per session, the head layers (SKULL/SCALP where set, else 0) and the face mask."""
    maps, affine = _template(spacing)
    shape = maps.shape[1:]
    rng = np.random.default_rng(np.random.SeedSequence(subject.seed, spawn_key=(0, subject.index, 1)))
    scale = _MNI_SCALE * _SEX_SCALE[subject.sex] * (1 + subject.scale_noise)
    centre = np.array(ndimage.center_of_mass(maps[GM] + maps[WM]))
    coarse = [max(2, int(np.ceil(n * spacing / _WARP_GRID_MM)) + 1) for n in shape]
    displacement = rng.normal(0, _WARP_MM / spacing, (3, *coarse))  # voxels
    # cubic upsampling is linear in the control points: one small matrix per axis instead of a 3D spline
    up = [ndimage.zoom(np.eye(c), (n / c, 1), order=3) for n, c in zip(shape, coarse, strict=True)]
    coords = np.einsum("ai,bj,ck,dijk->dabc", *up, displacement, optimize=True).astype(np.float32)
    for ax in range(3):
        index = np.arange(shape[ax], dtype=np.float32).reshape([-1 if a == ax else 1 for a in range(3)])
        coords[ax] += centre[ax] + (index - centre[ax]) / scale  # a sample of the template per voxel
    warped = np.stack([ndimage.map_coordinates(m, coords, order=1) for m in maps[CSF:]])  # CSF, GM, WM, ventricles
    base = np.argmax(np.concatenate([1 - warped[:3].sum(0, keepdims=True), warped[:3]]), axis=0).astype(np.uint8)
    ventricles = (warped[3] > 0.5) & (base == CSF)
    outer = ((base == BG) | (base == CSF)) & ~ventricles
    d_ventricles = ndimage.distance_transform_edt(~ventricles, sampling=spacing)
    # a smooth jitter in (-spacing/2, spacing/2) lets a front advance by parts of a voxel on average
    jitter = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 2.0)
    jitter = spacing / 2 * np.tanh(jitter / jitter.std())
    fronts = (d_ventricles - spacing / 2 + jitter, ndimage.distance_transform_edt(~outer, sampling=spacing)
              - spacing / 2 + jitter)  # fmt: skip
    d_head = ndimage.distance_transform_edt(base == BG, sampling=spacing)
    head = np.where(d_head > 0, np.where(d_head <= _SKULL_MM * scale, SKULL, SCALP), 0).astype(np.uint8)
    head[d_head > (_SKULL_MM + _SCALP_MM) * scale] = 0
    world = affine[:3, :3] @ coords.reshape(3, -1) + affine[:3, 3:]  # template mm (MNI) of each voxel
    face = ((world[1] > 25) & (world[2] < -5)).reshape(shape) & (d_head > 2.0)  # anterior-inferior, off the brain
    lesions = _draw_lesions(rng, subject, base, d_ventricles, spacing)
    sessions = []
    for age in subject.ages:
        a = _atrophy(age) * subject.rate
        labels = base.copy()
        for centre_k, axes, threshold in lesions:
            if threshold <= _lesion_count(subject, age):
                _paint(labels, centre_k, axes * (0.7 + 0.6 * _atrophy(age)) / spacing)
        tissue = (labels == GM) | (labels == WM)
        labels[tissue & (fronts[0] < _VENTRICLE_MM * a)] = CSF
        labels[(labels == GM) & (fronts[1] < _CORTEX_MM * a)] = CSF
        sessions.append(labels)
    return sessions, head, face


def _lesion_count(subject: _Subject, age: float) -> float:
    return subject.load * (_LESIONS[0] + _LESIONS[1] * _atrophy(age))


def _draw_lesions(rng: np.random.Generator, subject: _Subject, base: np.ndarray, d_ventricles: np.ndarray,
                  spacing: float) -> list[tuple[np.ndarray, np.ndarray, float]]:  # fmt: skip
    """(centre voxel, semi-axes mm, onset) per lesion: one present at an age where the expected count reaches its
    onset, so the count at each age is Poisson (a thinned process) and a later session keeps the earlier ones."""
    most = _lesion_count(subject, max(subject.ages))
    count = int(rng.poisson(most))
    deep = np.flatnonzero(ndimage.distance_transform_edt(base == WM, sampling=spacing) >= 3.0)
    if count == 0 or deep.size == 0:
        return []
    weights = np.exp(-d_ventricles.ravel()[deep] / 15.0)  # mostly periventricular, as white-matter lesions are
    centres = rng.choice(deep, size=count, p=weights / weights.sum())
    axes = rng.uniform(*_LESION_MM, (count, 3))
    onsets = rng.uniform(0, most, count)
    return [(np.array(np.unravel_index(c, base.shape)), ax, o) for c, ax, o in zip(centres, axes, onsets, strict=True)]


def _paint(labels: np.ndarray, centre: np.ndarray, axes: np.ndarray) -> None:
    """White matter inside the ellipsoid (semi-axes in voxels) becomes lesion."""
    lo = np.maximum(centre - np.ceil(axes).astype(int), 0)
    hi = np.minimum(centre + np.ceil(axes).astype(int) + 1, labels.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    grid = np.ogrid[box]
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, axes, strict=True)) <= 1
    region = labels[box]
    region[inside & (region == WM)] = LESION


def _intensities(labels: np.ndarray, head: np.ndarray, face: np.ndarray, means: np.ndarray, scanner: _Scanner,
                 rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    """One image (float32, RAS, same grid) from its labels: tissue means, texture, blur, bias field, Rician noise."""
    classes = np.where(head > 0, head, labels)
    texture = ndimage.gaussian_filter(rng.standard_normal(labels.shape, dtype=np.float32), 1.0)
    image = means[classes] * (1 + _TEXTURE * texture / texture.std())
    image = ndimage.gaussian_filter(image, (0.5, 0.5, 0.5 * scanner.z_step))  # partial volume, slice thickness
    coefficients = np.zeros((3, 3, 3))
    for i, j, k in np.ndindex(3, 3, 3):
        if 0 < i + j + k <= 2:
            coefficients[i, j, k] = rng.normal(0, scanner.bias / 3)
    axes = [np.linspace(-1, 1, n) for n in labels.shape]
    image *= np.exp(np.polynomial.polynomial.polygrid3d(*axes, coefficients)).astype(np.float32)
    noise = rng.normal(0, scanner.noise, (2, *labels.shape)).astype(np.float32)
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
    image[face] = 0  # defaced, as in OpenMind
    gain = rng.uniform(0.9, 1.1) * (200 if scanner.dtype == "uint8" else 1000)
    return image * np.float32(gain)


def _write_subject(root: str, index: int, seed: int, spacing: float) -> list[dict[str, object]]:
    """Write one subject's sessions (images, masks, label maps) and return their CSV rows; runs in a worker."""
    subject = _draw_subject(index, seed)
    scanner = _SCANNERS[subject.dataset]
    dataset_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, _DATASETS.index(subject.dataset))))
    means = {m: np.array(v, np.float32) * (1 + dataset_rng.normal(0, _MEAN_JITTER, 7)).astype(np.float32)
             for m, v in _MEANS.items()}  # fmt: skip
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, index, 2)))
    sessions, head, face = _labels(subject, spacing)
    _, affine = _template(spacing)
    z = (slice(None), slice(None), slice(None, None, scanner.z_step))
    voxel = spacing**3 * scanner.z_step
    base = Path(root) / IMAGE_DIR
    rows = []
    for number, (age, labels) in enumerate(zip(subject.ages, sessions, strict=True), start=1):
        session = f"ses-{number}"
        shifted = affine @ np.diag([1, 1, scanner.z_step, 1])
        shifted[:3, 3] += rng.uniform(-5, 5, 3)  # a different position in the scanner per session
        label_rel = f"{subject.dataset}/derivatives/labels/{subject.name}/{session}/anat/" \
                    f"{subject.name}_{session}_dseg.nii.gz"  # fmt: skip
        _save(labels[z], shifted, base / label_rel, scanner.orientation, "uint8")
        counts = np.bincount(labels[z].ravel(), minlength=5)
        brain_mask = (labels[z] > 0).astype(np.uint8)
        first_masks = None
        for modality in MODALITIES:
            image = _intensities(labels, head, face, means[modality], scanner, rng)
            rel = f"{subject.dataset}/{subject.name}/{session}/anat/{subject.name}_{session}_{modality}.nii.gz"
            _save(image[z], shifted, base / rel, scanner.orientation, scanner.dtype)
            masks = (base / rel).parent / f"{subject.name}_{session}_{modality}__Data"
            if first_masks is None:
                _save(face[z].astype(np.uint8), shifted, masks / DEFACE_MASK, scanner.orientation, "uint8")
                _save(brain_mask, shifted, masks / ANATOMY_MASK, scanner.orientation, "uint8")
                first_masks = masks
            else:  # the session's images share one grid, so their masks are the same bytes
                masks.mkdir(parents=True, exist_ok=True)
                for name in (DEFACE_MASK, ANATOMY_MASK):
                    shutil.copyfile(first_masks / name, masks / name)
            repetition, echo = _TIMES[modality]
            rows.append({
                "image_path": rel, "modality": modality,
                "anon_mask_path": str((masks / DEFACE_MASK).relative_to(base)),
                "anat_mask_path": str((masks / ANATOMY_MASK).relative_to(base)),
                "unique_id": f"{subject.dataset}_{subject.name}_{session}_{modality}",
                "image_quality_score": min(scanner.quality + _QUALITY[modality], 5), "derived_from": "",
                "is_brain_extract": False, "manufacturer": scanner.manufacturer, "model_name": scanner.model,
                "phase_encoding_direction": "", "magnetic_field_strength": scanner.field,
                "repetition_time": repetition, "echo_time": echo, "age": age, "sex": subject.sex,
                "handedness": subject.handedness, "race": "", "weight": subject.weight, "bmi": "",
                "health_status": "healthy", "lesion_volume": round(float(counts[LESION] * voxel), 3),
                "brain_volume": round(float(counts[GM:LESION + 1].sum() * voxel), 3), "label_path": label_rel,
            })  # fmt: skip
    return rows


def _save(data: np.ndarray, affine: np.ndarray, path: Path, orientation: str, dtype: str) -> None:
    """Save RAS `data` as `orientation` in `dtype` (integers rounded and clipped), with qform = sform = affine."""
    image = nib.Nifti1Image(np.asarray(data, np.float32), affine)
    image = image.as_reoriented(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(orientation))))
    values = np.asanyarray(image.dataobj)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        values = np.clip(np.round(values), info.min, info.max)
    else:  # quarter units, as a scanner's float output is quantised: gzip then halves the file
        values = np.round(values * 4) / 4
    out = nib.Nifti1Image(values.astype(dtype), image.affine)
    out.set_qform(image.affine, code=1)
    out.set_sform(image.affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, path)


def _check(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ConfigError(f"{name}: expected an integer >= {least}, got {value!r}")


def _claim(root: Path, arguments: dict[str, object]) -> None:
    """Refuse a non-empty `root` unless it is a cohort written with the same arguments; then record them."""
    marker = root / MARKER
    if root.exists() and not root.is_dir():
        raise ConfigError(f"root: {root} is not a folder")
    if root.is_dir() and any(root.iterdir()):
        try:
            previous = json.loads(marker.read_text())
        except (OSError, ValueError):  # no marker, or not ours
            previous = None
        if previous != arguments:
            what = f"a cohort written with {previous}" if previous else "files that are not a cohort"
            raise ConfigError(f"root: {root} holds {what}; this call asks for {arguments}: choose an empty folder")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(arguments))
