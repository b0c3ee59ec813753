"""openmind-augment-preview: draw original / augmented / target slices so a person can check the augmentation."""

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from matplotlib.figure import Figure  # renders with Agg, no pyplot backend or display needed
from torch import Tensor

from openmind_tools import zarr_store
from openmind_tools.augment import AugmentSettings, GPUAugment
from openmind_tools.manifest import resolve_manifest

_VIEWS = ("axial", "coronal", "sagittal")  # slices through the RAS array's S, A and R axes


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (args.manifest is None) == (args.nifti is None):
        raise SystemExit("openmind-augment-preview: give either a MANIFEST or --nifti FILE ...")
    in_size = (args.in_size,) * 3
    if args.manifest is not None:
        volumes, masks = _from_manifest(args.manifest, args.n, in_size)
    else:
        if args.mask and len(args.mask) != len(args.nifti):
            raise SystemExit(f"--mask: expected one file per --nifti volume ({len(args.nifti)}), got {len(args.mask)}")
        volumes = [_fit(_load(path), in_size) for path in args.nifti]
        masks = (
            [_half_max(_fit(_load(p), in_size)) for p in args.mask] if args.mask else [v > v.mean() for v in volumes]
        )
        volumes = [_zscore(v) for v in volumes]
    picks = [i % len(volumes) for i in range(args.n)]
    image = torch.from_numpy(np.stack([volumes[i] for i in picks]))[:, None]
    mask = torch.from_numpy(np.stack([masks[i] for i in picks]).astype(np.uint8))[:, None]

    settings = AugmentSettings(out_size=args.out_size, seed=args.seed)
    if args.all_ops:
        probabilities = {
            f: 1.0 for f in settings.to_dict() if f.startswith("p_") and f not in ("p_mirror", "p_elastic")
        }
        settings = AugmentSettings.from_dict({**settings.to_dict(), **probabilities})
    out = GPUAugment(settings)(image, masks=(mask,))

    _render(image, mask, out.image, out.target, out.masks[0], out.affine, args.output)
    print(f"wrote {args.output}: {args.n} samples from {len(volumes)} volume(s), crop {in_size} -> {settings.out_size}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openmind-augment-preview",
        description="Augment a few volumes with GPUAugment and write a PNG montage: per sample, the original, "
        "the augmented input and the intensity-clean target (mid axial/coronal/sagittal slices, mask in red).",
    )
    parser.add_argument(
        "manifest",
        nargs="?",
        help="a manifest written by openmind-convert, or a query such as 'mae8 of out/manifest.parquet': "
        "its first --n volumes are read from the Zarr store (already preprocessed; anatomy mask in red)",
    )
    parser.add_argument(
        "--nifti",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="NIfTI volumes to augment (reoriented to RAS, z-scored over nonzero voxels)",
    )
    parser.add_argument(
        "--mask",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="one mask NIfTI per volume, thresholded at half its maximum, drawn as a red contour to check "
        "alignment (default: voxels above the volume's mean)",
    )
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("augment_preview.png"), help="PNG to write (default: %(default)s)"
    )
    parser.add_argument("--n", type=int, default=4, help="samples to draw; volumes repeat if fewer (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="augmentation seed (default: 0)")
    parser.add_argument(
        "--in-size",
        type=int,
        default=192,
        help="centre crop/pad of each volume before augmenting, voxels per axis (default: 192)",
    )
    parser.add_argument("--out-size", type=int, default=160, help="augmented crop size per axis (default: 160)")
    parser.add_argument(
        "--all-ops",
        action="store_true",
        help="fire rotation, scaling and every intensity op on every sample; by default the training "
        "probabilities apply and many samples show few changes",
    )
    return parser


def _from_manifest(source: str, n: int, size: tuple[int, int, int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The first `n` volumes of a manifest (or query) from its Zarr store, with their anatomy masks."""
    rows, meta = resolve_manifest(source)
    if "zarr_store" not in rows or rows.empty:
        raise SystemExit(
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
