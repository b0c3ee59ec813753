"""openmind-augment-preview: draw original / augmented / target slices so a person can check the augmentation."""

import argparse
from pathlib import Path

from openmind_tools.augment import AugmentSettings
from openmind_tools.augment_preview import from_manifest, from_nifti, write_preview
from openmind_tools.cli.common import existing_parent, positive_int, run_command
from openmind_tools.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    return run_command("openmind-augment-preview", lambda: _parser().parse_args(argv), _preview)


def _preview(args: argparse.Namespace) -> int:
    if (args.manifest is None) == (args.nifti is None):
        raise ConfigError("give either a MANIFEST or --nifti FILE ...")
    in_size = (args.in_size,) * 3
    if args.manifest is not None:
        volumes, masks = from_manifest(args.manifest, args.n, in_size)
    else:
        volumes, masks = from_nifti(args.nifti, args.mask, in_size)
    settings = AugmentSettings(out_size=args.out_size, seed=args.seed)
    if args.all_ops:
        probabilities = {
            f: 1.0 for f in settings.to_dict() if f.startswith("p_") and f not in ("p_mirror", "p_elastic")
        }
        settings = AugmentSettings.from_dict({**settings.to_dict(), **probabilities})
    write_preview(volumes, masks, settings, args.n, Path(args.output))
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
        "-o",
        "--output",
        type=existing_parent,
        default="augment_preview.png",
        help="PNG to write (default: %(default)s)",
    )
    parser.add_argument(
        "--n", type=positive_int, default=4, help="samples to draw; volumes repeat if fewer (default: 4)"
    )
    parser.add_argument("--seed", type=int, default=0, help="augmentation seed (default: 0)")
    parser.add_argument(
        "--in-size",
        type=positive_int,
        default=192,
        help="centre crop/pad of each volume before augmenting, voxels per axis (default: 192)",
    )
    parser.add_argument(
        "--out-size", type=positive_int, default=160, help="augmented crop size per axis (default: 160)"
    )
    parser.add_argument(
        "--all-ops",
        action="store_true",
        help="fire rotation, scaling and every intensity op on every sample; by default the training "
        "probabilities apply and many samples show few changes",
    )
    return parser
