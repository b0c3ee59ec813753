"""Map one NIfTI image (+ its anatomy and deface masks) to stored arrays and a metadata dict.

Defaults follow AMAES/nnssl pretraining practice: RAS, 1 mm isotropic (image linear, masks nearest),
crop to the anatomy-mask box, clip to the [0.5, 99.5] percentiles and z-score inside the mask, image
float16 and masks uint8. Arrays are (X, Y, Z) with X toward Right, Y toward Anterior, Z toward Superior,
and `affine` maps a stored voxel index to scanner RAS millimetres (nibabel's convention).

Gzip is decompressed here, whole, by Python's gzip module so that a truncated or corrupt file is an
error: SimpleITK's NIfTI reader returns such files silently with garbage voxels.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fsspec
import nibabel as nib
import numpy as np
import SimpleITK as sitk
from fsspec.implementations.local import LocalFileSystem

from openmind_tools.errors import ConfigError, InputError
from openmind_tools.files import file_problem
from openmind_tools.reads import with_retries
from openmind_tools.volume import Volume, mask_code

_INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}
_LPS = np.diag([-1.0, -1.0, 1.0])  # ITK's physical space is LPS, NIfTI's is RAS
_AFFINE_TOL = 1e-3  # mm: how far a mask's geometry may drift from its image's
_STAT_SAMPLES = 2**17  # fewest region voxels behind the percentiles, mean and std (see _sample)


@dataclass(frozen=True)
class PreprocessSettings:
    spacing: float = 1.0  # mm, isotropic target grid
    interpolation: str = "linear"  # image resampling; masks always nearest
    crop: str = "anatomy"  # "anatomy" (falls back to the nonzero box), "nonzero" or "none"
    clip_percentiles: tuple[float, float] = (0.5, 99.5)  # inside the normalisation region
    volume_index: int | None = None  # which volume of a true 4D image; None makes 4D an error

    def __post_init__(self) -> None:
        if self.spacing <= 0:
            raise ConfigError(f"spacing: expected a positive number of mm, got {self.spacing}")
        if self.interpolation not in _INTERPOLATORS:
            raise ConfigError(f"interpolation: expected one of {sorted(_INTERPOLATORS)}, got {self.interpolation!r}")
        if self.crop not in ("anatomy", "nonzero", "none"):
            raise ConfigError(f"crop: expected 'anatomy', 'nonzero' or 'none', got {self.crop!r}")
        lo, hi = self.clip_percentiles
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"clip_percentiles: expected 0 <= low < high <= 100, got {self.clip_percentiles}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "clip_percentiles": list(self.clip_percentiles)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSettings:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown preprocessing setting(s): {sorted(unknown)}")
        d = dict(d)
        if "clip_percentiles" in d:
            d["clip_percentiles"] = tuple(d["clip_percentiles"])
        return cls(**d)

    def digest(self) -> str:
        """Short hash recorded in every manifest row; a store is refused by a reader expecting another."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Preprocessed:
    volume: Volume
    meta: dict[str, Any]
    label: np.ndarray | None = None  # (X, Y, Z) uint8 class map on the volume's grid, when a label map was given
    source_nbytes: int = 0  # the files' sizes as read: the manifest's source_nbytes without a request more per file


def preprocess(
    image_path: str | Path,
    anatomy_path: str | Path | None = None,
    deface_path: str | Path | None = None,
    settings: PreprocessSettings = PreprocessSettings(),
    label_path: str | Path | None = None,
    fs: fsspec.AbstractFileSystem | None = None,
) -> Preprocessed:
    """Preprocess one image; raises InputError (naming the file) for anything that cannot be converted.

    `label_path` names a segmentation (integer classes 0-255 on the image's grid) that is resampled by nearest
    neighbour and cropped exactly as the masks are: a fine-tuning target on the stored volume's voxels. The paths
    are on `fs` (an fsspec filesystem such as S3's; default local disk), read whole into memory.
    """
    img, source_nbytes = load_nifti(image_path, settings.volume_index, fs)
    data = img.get_fdata(dtype=np.float32)
    shape, src_affine, zooms, src_dtype = img.shape[:3], img.affine, img.header.get_zooms()[:3], img.get_data_dtype()
    del img  # frees the file's bytes before the resampling copies: peak memory of a 512^3 volume
    _check_values(data, image_path)
    masks = {}
    for name, path in (("anatomy", anatomy_path), ("deface", deface_path)):
        if path is not None:
            masks[name], nbytes = _load_mask(path, shape, src_affine, image_path, fs)
            source_nbytes += nbytes
    label = None
    if label_path is not None:
        label, nbytes = _load_label(label_path, shape, src_affine, image_path, fs)
        source_nbytes += nbytes

    ornt = nib.orientations.io_orientation(src_affine)  # to the closest RAS axes, as nibabel's canonical
    ras_affine = src_affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    data = nib.orientations.apply_orientation(data, ornt)
    code = None  # the masks as one code: one nearest-neighbour resample for both
    if masks:
        absent = np.zeros(data.shape, np.uint8)
        code = mask_code(masks.get("anatomy", absent), masks.get("deface", absent))
        code = nib.orientations.apply_orientation(code, ornt)

    # Crop before resampling: only the box around the anatomy (or the nonzero voxels) is resampled.
    by_anatomy = settings.crop == "anatomy" and code is not None and bool((code & 1).any())

    def foreground(image: np.ndarray, code: np.ndarray) -> np.ndarray | None:
        if settings.crop == "none":
            return None
        return (code & 1).astype(bool) if by_anatomy else image != 0

    region = _output_region(foreground(data, code), data.shape, ras_affine, settings.spacing)
    image, affine = _resample(data, ras_affine, settings.spacing, _INTERPOLATORS[settings.interpolation], region)
    code = np.zeros(image.shape, np.uint8) if code is None else _nearest(code, ras_affine, settings.spacing, region)
    box = _bbox(foreground(image, code), image.shape)
    crop = tuple(slice(lo, hi) for lo, hi in box)
    image, code = image[crop], code[crop]
    if label is not None:
        label = _nearest(nib.orientations.apply_orientation(label, ornt), ras_affine, settings.spacing, region)[crop]
    affine[:3, 3] += affine[:3, :3] @ np.array([lo for lo, _ in box], dtype=np.float64)
    box = [(r0 + lo, r0 + hi) for (r0, _), (lo, hi) in zip(region, box, strict=True)]
    code = np.ascontiguousarray(code)
    anatomy, deface = code & 1, (code >> 1) & 1

    inside = anatomy.astype(bool) if anatomy.any() else None
    image, stats = _normalise(image, inside, settings.clip_percentiles)

    meta = {
        "shape": list(image.shape),
        "spacing": [settings.spacing] * 3,
        "affine": affine.round(6).tolist(),
        "original_shape": list(shape),
        "original_spacing": [round(float(z), 6) for z in zooms],
        "original_orientation": "".join(nib.aff2axcodes(src_affine)),
        "original_dtype": str(src_dtype),
        "crop_box": [int(v) for pair in box for v in pair],
        "norm_region": "anatomy" if anatomy.any() else "crop",
        **stats,
        "has_anatomy_mask": "anatomy" in masks,
        "has_deface_mask": "deface" in masks,
        "anatomy_fraction": float(anatomy.mean()),
        "deface_fraction": float(deface.mean()),
    }
    label = None if label is None else np.ascontiguousarray(label)
    return Preprocessed(Volume(image, code), meta, label, source_nbytes)


def load_nifti(
    path: str | Path, volume_index: int | None = None, fs: fsspec.AbstractFileSystem | None = None
) -> tuple[nib.Nifti1Image, int]:
    """Read a .nii/.nii.gz fully into memory, checking gzip integrity, and reduce it to one 3D volume; with the
    file's size in bytes, which on an object store would cost another request to ask for.

    On an object store (`fs`), a missing object is the input's fault (InputError); any other failure of the read is
    retried, then raised as the OSError it is: the machine's, never blamed on the input."""
    if fs is None or isinstance(fs, LocalFileSystem):
        path = Path(path)
        problem = file_problem(path)  # a FIFO would block the read forever
        if problem:
            raise InputError(f"{path}: {problem}")
        raw = path.read_bytes()
    else:
        try:
            raw = with_retries(lambda: fs.cat_file(str(path)), attempts=4, backoff_s=0.5, what=str(path))
        except (FileNotFoundError, IsADirectoryError) as e:
            raise InputError(f"{fs.unstrip_protocol(str(path))}: file not found ({type(e).__name__})") from None
    if not raw:
        raise InputError(f"{path}: zero-byte file")
    nbytes = len(raw)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise InputError(f"{path}: corrupt or truncated gzip ({e})") from None
    img = None
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            img = cls.from_bytes(raw)
            break
        except Exception:  # nibabel raises several types for a header of the other version
            continue
    if img is None:
        raise InputError(f"{path}: not a readable NIfTI-1/2 file")
    dtype = img.get_data_dtype()
    if dtype.kind not in "biuf":  # RGB (structured) and complex voxels have no single intensity
        raise InputError(f"{path}: voxel type {dtype} is not a real scalar (RGB or complex images are not converted)")
    needed = int(img.dataobj.offset) + int(np.prod(img.shape)) * dtype.itemsize
    if len(raw) < needed:
        raise InputError(f"{path}: truncated voxel data ({len(raw)} bytes, the header needs {needed})")
    return _to_3d(img, path, volume_index), nbytes


def _to_3d(img: nib.Nifti1Image, path: Path, volume_index: int | None) -> nib.Nifti1Image:
    shape = img.shape
    if len(shape) < 3:
        raise InputError(f"{path}: expected a 3D image, got shape {shape}")
    if len(shape) == 3:
        return img
    extra = shape[3:]
    if all(n == 1 for n in extra):
        return img.slicer[(...,) + (0,) * len(extra)]
    if volume_index is None:
        raise InputError(f"{path}: 4D image with shape {shape}; choose a volume with --volume-index")
    if len(extra) > 1 or not 0 <= volume_index < extra[0]:
        raise InputError(f"{path}: cannot take volume {volume_index} of an image with shape {shape}")
    return img.slicer[..., volume_index]


def _load_aligned(path: str | Path, shape: tuple[int, ...], affine: np.ndarray, image_path: str | Path,
                  what: str, fs: fsspec.AbstractFileSystem | None) -> tuple[nib.Nifti1Image, int]:  # fmt: skip
    """A mask or label map (and its file's size), refused unless it lies on its image's grid."""
    img, nbytes = load_nifti(path, fs=fs)
    if img.shape != shape:
        raise InputError(f"{path}: {what} shape {img.shape} differs from image {image_path} shape {shape}")
    if not np.allclose(img.affine, affine, atol=_AFFINE_TOL):
        raise InputError(f"{path}: {what} affine differs from that of image {image_path}")
    return img, nbytes


def _load_label(path: str | Path, shape: tuple[int, ...], affine: np.ndarray, image_path: str | Path,
                fs: fsspec.AbstractFileSystem | None) -> tuple[np.ndarray, int]:  # fmt: skip
    img, nbytes = _load_aligned(path, shape, affine, image_path, "label map", fs)
    values = img.get_fdata(dtype=np.float32)
    _check_values(values, path, allow_constant=True)
    if values.min() < 0 or values.max() > 255 or not np.array_equal(values, np.round(values)):
        raise InputError(f"{path}: a label map holds whole classes 0-255, found values in [{values.min()}, "
                         f"{values.max()}]")  # fmt: skip
    return values.astype(np.uint8), nbytes


def _load_mask(path: str | Path, shape: tuple[int, ...], affine: np.ndarray, image_path: str | Path,
               fs: fsspec.AbstractFileSystem | None) -> tuple[np.ndarray, int]:  # fmt: skip
    mask, nbytes = _load_aligned(path, shape, affine, image_path, "mask", fs)
    proxy = mask.dataobj
    if nib.is_proxy(proxy) and np.issubdtype(proxy.dtype, np.integer) and proxy.slope == 1 and proxy.inter == 0:
        return (proxy.get_unscaled() > 0).view(np.uint8), nbytes  # integer labels: no float copy of the whole mask
    values = mask.get_fdata(dtype=np.float32)
    _check_values(values, path, allow_constant=True)
    return (values > 0.5).view(np.uint8), nbytes


def _check_values(data: np.ndarray, path: str | Path, allow_constant: bool = False) -> None:
    lo, hi = data.min(), data.max()  # NaN and +-Inf show in the extremes: no extra pass when clean
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(f"{path}: {data.size - int(np.isfinite(data).sum())} NaN/Inf voxels")
    if not allow_constant and lo == hi:
        raise InputError(f"{path}: image is constant (every voxel is {float(lo)})")


def _output_region(
    foreground: np.ndarray | None, shape: tuple[int, ...], affine: np.ndarray, spacing_out: float
) -> list[tuple[int, int]]:
    """The part of the isotropic output grid that can hold foreground, with room for the interpolation kernel."""
    spacing_in = np.linalg.norm(affine[:3, :3], axis=0)
    size_out = [max(1, round(n * s / spacing_out)) for n, s in zip(shape, spacing_in, strict=True)]
    margin = 2  # native voxels: the reach of the B-spline kernel
    return [
        (max(0, int(np.floor((lo - margin) * s / spacing_out))), min(n, int(np.ceil((hi + margin) * s / spacing_out))))
        for (lo, hi), s, n in zip(_bbox(foreground, shape), spacing_in, size_out, strict=True)
    ]


def _resample(
    data: np.ndarray, affine: np.ndarray, spacing_out: float, interpolator: int, region: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Resample `region` of the isotropic output grid from an (X, Y, Z) array on `affine`'s grid."""
    spacing_in = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / spacing_in
    affine_out = affine.copy()
    affine_out[:3, :3] = direction * spacing_out
    affine_out[:3, 3] += affine_out[:3, :3] @ np.array([lo for lo, _ in region], dtype=np.float64)
    if np.allclose(spacing_in, spacing_out, atol=1e-4):
        return data[tuple(slice(lo, hi) for lo, hi in region)], affine_out
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    img.SetSpacing(spacing_in.tolist())
    img.SetOrigin((_LPS @ affine[:3, 3]).tolist())
    img.SetDirection((_LPS @ direction).ravel().tolist())
    size = [hi - lo for lo, hi in region]
    origin = (_LPS @ affine_out[:3, 3]).tolist()
    out = sitk.Resample(img, size, sitk.Transform(), interpolator, origin, [spacing_out] * 3, img.GetDirection(), 0)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0), affine_out


def _nearest(data: np.ndarray, affine: np.ndarray, spacing_out: float, region: list[tuple[int, int]]) -> np.ndarray:
    """Nearest-neighbour resampling onto `_resample`'s grid by index selection.

    The output grid keeps the input's axes and first voxel, so output index i on an axis samples input
    index round(i * spacing_out / spacing_in): no interpolator needed (SimpleITK took as long for the
    uint8 mask code as for the image). Ties round up, as ITK's nearest-neighbour interpolator does.
    """
    spacing_in = np.linalg.norm(affine[:3, :3], axis=0)
    index = [
        np.floor(np.arange(lo, hi) * spacing_out / s + 0.5).astype(np.intp)
        for (lo, hi), s in zip(region, spacing_in, strict=True)
    ]
    out = data[np.ix_(*(np.minimum(i, n - 1) for i, n in zip(index, data.shape, strict=True)))]
    for axis, (i, n) in enumerate(zip(index, data.shape, strict=True)):
        out[(slice(None),) * axis + (i >= n,)] = 0  # beyond the input's last voxel, as the resampler's default
    return out


def _bbox(mask: np.ndarray | None, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Per-axis [lo, hi) of the true voxels; the whole shape when there are none (or no mask)."""
    if mask is None or not mask.any():
        return [(0, n) for n in shape]
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return box


def _normalise(
    image: np.ndarray, region: np.ndarray | None, percentiles: tuple[float, float]
) -> tuple[np.ndarray, dict[str, float]]:
    """Clip to the region's percentiles, then z-score with the clipped region's mean and std."""
    values = _sample(image, region)
    lo, hi = (float(v) for v in np.percentile(values, percentiles))
    clipped = np.clip(values, lo, hi)
    mean, std = float(clipped.mean()), float(clipped.std())
    out = np.clip(image, lo, hi)
    out -= mean
    out /= max(std, 1e-8)
    # C order here, in the pass that converts anyway: nibabel arrays are Fortran-ordered
    return out.astype(np.float16, order="C"), {"clip_low": lo, "clip_high": hi, "mean": mean, "std": std}


def _sample(image: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    """The region's values, or a seeded uniform draw of about `_STAT_SAMPLES` of them for a large region.

    A random draw, not a regular lattice: a lattice aliases with upsampled anisotropic acquisitions
    (every 2nd slice original, the others interpolated), which biased the std by 5% in a test. 2^17 draws
    pin the [0.5, 99.5] percentiles and the moments to well under a percent of the intensity range at a
    tenth of the cost of gathering and partially sorting millions of voxels.
    """
    n = image.size if region is None else int(np.count_nonzero(region))
    if n <= 4 * _STAT_SAMPLES:
        return image.ravel() if region is None else image[region]
    rng = np.random.default_rng(0)
    draws = tuple(rng.integers(0, size, int(_STAT_SAMPLES * image.size / n)) for size in image.shape)
    return image[draws] if region is None else image[draws][region[draws]]
