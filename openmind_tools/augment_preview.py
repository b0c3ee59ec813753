"""A montage of original / augmented / target slices: the look a person takes before trusting augmentation.

Volumes come from a manifest's Zarr store (already preprocessed, with their anatomy masks) or from NIfTI
files (reoriented to RAS and z-scored over nonzero voxels); each is centre-cropped or padded to one size.
"""

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from matplotlib.figure import Figure  # renders with Agg, no pyplot backend or display needed
from torch import Tensor

from openmind_tools import zarr_store
from openmind_tools.augment import AugmentSettings, GPUAugment
from openmind_tools.errors import ConfigError
from openmind_tools.manifest import resolve_manifest

_VIEWS = ("axial", "coronal", "sagittal")  # slices through the RAS array's S, A and R axes


def from_nifti(
    paths: list[Path], mask_paths: list[Path] | None, size: tuple[int, int, int]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """NIfTI volumes (z-scored) and masks (thresholded at half maximum; default: voxels above the mean)."""
    if mask_paths and len(mask_paths) != len(paths):
        raise ConfigError(f"--mask: expected one mask per volume ({len(paths)}), got {len(mask_paths)}")
    volumes = [_fit(_load(path), size) for path in paths]
    masks = [_half_max(_fit(_load(p), size)) for p in mask_paths] if mask_paths else [v > v.mean() for v in volumes]
    return [_zscore(v) for v in volumes], masks


def write_preview(
    volumes: list[np.ndarray], masks: list[np.ndarray], settings: AugmentSettings, n: int, output: Path
) -> None:
    """Augment `n` samples (volumes repeat if fewer) as one batch and draw them into `output`."""
    picks = [i % len(volumes) for i in range(n)]
    image = torch.from_numpy(np.stack([volumes[i] for i in picks]))[:, None]
    mask = torch.from_numpy(np.stack([masks[i] for i in picks]).astype(np.uint8))[:, None]
    out = GPUAugment(settings)(image, masks=(mask,))
    _render(image, mask, out.image, out.target, out.masks[0], out.affine, output)


def from_manifest(source: str, n: int, size: tuple[int, int, int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The first `n` volumes of a manifest (or query) from its Zarr store, with their anatomy masks."""
    rows, meta = resolve_manifest(source)
    if "zarr_store" not in rows or rows.empty:
        raise ConfigError(
            f"{source}: no volumes in a Zarr store to preview (convert with --format zarr, or use --nifti)"
        )
    volumes, masks = [], []
    for row in rows.head(n).itertuples():
        volume = zarr_store.read_volume(f"{meta['store_root']}/{row.zarr_store}", row.id, tuple(row.shape))
        volumes.append(_fit(volume.image.astype(np.float32), size))
        masks.append(_fit(volume.anatomy, size) > 0)
    return volumes, masks


def _load(path: Path) -> np.ndarray:
    """Read as RAS float32."""
    return np.asarray(nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float32))


def _fit(data: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """Centre crop/pad to `size`."""
    out = np.zeros(size, dtype=np.float32)
    src, dst = [], []
    for n, m in zip(data.shape[:3], size, strict=True):
        start = (n - m) // 2
        src.append(slice(max(start, 0), max(start, 0) + min(n, m)))
        dst.append(slice(max(-start, 0), max(-start, 0) + min(n, m)))
    out[tuple(dst)] = data[tuple(src)]
    return out


def _half_max(volume: np.ndarray) -> np.ndarray:
    return volume > volume.max() / 2  # binary masks and probability maps (0-1 or 0-255) alike


def _zscore(volume: np.ndarray) -> np.ndarray:
    inside = volume[volume != 0]
    return np.where(volume != 0, (volume - inside.mean()) / (inside.std() + 1e-8), 0).astype(np.float32)


def _mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    x, y, z = (n // 2 for n in volume.shape)
    return [volume[:, :, z].T, volume[:, y, :].T, volume[x, :, :].T]  # transposed so that up is A or S


def _render(
    image: Tensor, mask: Tensor, augmented: Tensor, target: Tensor, warped_mask: Tensor, affine: Tensor, output: Path
) -> None:
    n = image.shape[0]
    fig = Figure(figsize=(7.5, 7.5 * n))
    axes = fig.subplots(3 * n, 3, squeeze=False)
    for i in range(n):
        window = np.percentile(image[i, 0].numpy(), (0.5, 99.5))  # one window per sample shows intensity changes
        det = float(torch.linalg.det(affine[i, :, :3]))
        summary = f"zoom {abs(det) ** (1 / 3):.2f}{', mirrored' if det < 0 else ''}"
        rows = [
            ("original", image[i, 0], mask[i, 0]),
            (f"augmented ({summary})", augmented[i, 0], warped_mask[i, 0]),
            ("target (spatial only)", target[i, 0], warped_mask[i, 0]),
        ]
        for r, (label, volume, contour) in enumerate(rows):
            pairs = zip(_mid_slices(volume.float().numpy()), _mid_slices(contour.numpy()), strict=True)
            for c, (slice_, mask_slice) in enumerate(pairs):
                ax = axes[3 * i + r, c]
                ax.imshow(slice_, cmap="gray", origin="lower", vmin=window[0], vmax=window[1])
                if mask_slice.any():
                    ax.contour(mask_slice, levels=[0.5], colors="red", linewidths=0.6, origin="lower")
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(f"{i}: {label}", fontsize=7)
                if i == 0 and r == 0:
                    ax.set_title(_VIEWS[c], fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=80)
