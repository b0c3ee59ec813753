"""Time GPUAugment against the per-sample CPU pipelines a user would otherwise run.

One batch is 4 crops of 192^3 (float32 z-scored MNI152 T1, plus anatomy and GM uint8 masks) augmented to
160^3 with nnU-Net's ranges, returning the augmented image, the intensity-clean target and the masks.
Each pipeline runs twice: at nnU-Net's probabilities and with every op firing on every sample (what
GPUAugment always computes, since it never branches on a random draw). Baselines: batchgeneratorsv2
(nnU-Net's transforms) and MONAI dictionary transforms, one sample at a time on one core.

    python benchmarks/augment_bench.py            # CPU rows, plus CUDA rows if a GPU is present
    python benchmarks/augment_bench.py --device cuda --no-baselines
"""

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from openmind_tools.augment import AugmentSettings, GPUAugment

NNUNET_P = dict(rotation=0.2, scale=0.2, noise=0.1, blur=0.1, brightness=0.15, contrast=0.15, low_res=0.125, gamma=0.3)
ALL_P = dict.fromkeys(NNUNET_P, 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=4, help="timed CPU batches per row, after one warmup (default: 4)")
    parser.add_argument("--cuda-reps", type=int, default=50, help="timed CUDA batches per row (default: 50)")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="add CUDA rows: auto = when a GPU is present (default: auto)",
    )
    parser.add_argument("--no-baselines", action="store_true", help="time only GPUAugment")
    parser.add_argument("--batch", type=int, default=4, help="crops per batch (default: 4)")
    parser.add_argument("--in-size", type=int, default=192, help="input crop edge, voxels (default: 192)")
    parser.add_argument("--out-size", type=int, default=160, help="augmented crop edge, voxels (default: 160)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())

    torch.manual_seed(0)  # batchgeneratorsv2 draws from the global torch and numpy generators
    np.random.seed(0)
    image, masks = _batch(args.batch, args.in_size)
    cores = os.cpu_count() or 1
    rows: list[tuple[str, str, str, tuple[float, float]]] = []  # pipeline, probabilities, where, ms
    for label, p in (("nnU-Net", NNUNET_P), ("all fire", ALL_P)):
        augment = GPUAugment(augment_settings(p, args.out_size))
        for threads in sorted({1, cores}) if label == "nnU-Net" else (1,):
            torch.set_num_threads(threads)
            where = f"CPU, {threads} thread{'s' if threads > 1 else ''}"
            rows.append(("GPUAugment", label, where, time_calls(partial(augment, image, masks), args.reps)))
        if use_cuda:
            cuda_image, cuda_masks = image.cuda(), tuple(m.cuda() for m in masks)
            cuda_augment = GPUAugment(augment_settings(p, args.out_size))
            ms = time_calls(partial(cuda_augment, cuda_image, cuda_masks), args.cuda_reps, torch.cuda.synchronize)
            rows.append(("GPUAugment", label, torch.cuda.get_device_name(), ms))
        if not args.no_baselines:
            torch.set_num_threads(1)
            for name, build in (("batchgeneratorsv2", _batchgenerators), ("MONAI", monai_pipeline)):
                pipeline = build(p, args.out_size)
                rows.append((name, label, "CPU, 1 thread", time_calls(partial(pipeline, image, masks), args.reps)))
    _print_table(rows, args)
    return 0


def _batch(batch: int, size: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The MNI152 T1 (z-scored in the head) with head and GM masks, centre-cropped/padded to size^3."""
    import nibabel as nib  # here: benchmarks/gpu_check.py imports this module where nibabel is absent
    import nilearn.datasets

    mni = Path(nilearn.datasets.__file__).parent / "data"
    t1, gm = (
        np.asarray(nib.load(mni / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz").dataobj) for k in ("t1", "gm")
    )
    head = t1 > 0
    t1 = np.where(head, (t1 - t1[head].mean()) / t1[head].std(), 0)
    volumes = []
    for volume in (t1, head, gm > 127):
        out = np.zeros((size,) * 3, dtype=np.float32)
        src = tuple(slice(max((n - size) // 2, 0), max((n - size) // 2, 0) + min(n, size)) for n in volume.shape)
        dst = tuple(slice(max((size - n) // 2, 0), max((size - n) // 2, 0) + min(n, size)) for n in volume.shape)
        out[dst] = volume[src]
        volumes.append(torch.from_numpy(out)[None, None].expand(batch, 1, -1, -1, -1).contiguous())
    image, head_mask, gm_mask = volumes
    return image, (head_mask.to(torch.uint8), gm_mask.to(torch.uint8))


def augment_settings(p: dict[str, float], out_size: int) -> AugmentSettings:
    return AugmentSettings(out_size=out_size, **{f"p_{k}": v for k, v in p.items()})


def time_calls(fn: Callable[[], object], reps: int, sync: Callable[[], None] | None = None) -> tuple[float, float]:
    """Wall and process CPU time in ms per call over `reps` calls after one warmup.

    CPU rows give the mean, the expected cost of pipelines whose work depends on which ops fire; CUDA rows
    (with `sync`) give the median. CPU time counts all threads: for one thread it is what an idle core would
    take, so it survives a shared machine.
    """
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        if sync:
            sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        if sync:
            sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    average = statistics.median if sync else statistics.mean
    return 1000 * average(wall), 1000 * average(cpu)


def _batchgenerators(p: dict[str, float], out_size: int) -> Callable:
    """nnU-Net's training transforms (nnUNetTrainer.get_training_transforms) with these ranges, per sample."""
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    spatial = ComposeTransforms(
        [
            SpatialTransform(
                (out_size,) * 3,
                patch_center_dist_from_border=0,
                random_crop=False,
                p_elastic_deform=0,
                p_rotation=p["rotation"],
                rotation=(-math.pi / 6, math.pi / 6),
                p_scaling=p["scale"],
                scaling=(0.7, 1.4),
                p_synchronize_scaling_across_axes=1,
            ),
            MirrorTransform(allowed_axes=(0, 1, 2)),
        ]
    )
    intensity = ComposeTransforms([
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=p["noise"]),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=1, benchmark=True),
                        apply_probability=p["blur"]),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=p["brightness"]),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=p["contrast"]),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=None, p_per_channel=1),
                        apply_probability=p["low_res"]),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1),
                        apply_probability=p["gamma"]),
    ])  # fmt: skip

    def run(image: torch.Tensor, masks: tuple[torch.Tensor, ...]) -> list:
        out = []
        for b in range(image.shape[0]):
            data = spatial(image=image[b].clone(), segmentation=torch.cat([m[b] for m in masks]).to(torch.int16))
            target = data["image"].clone()
            out.append((intensity(image=data["image"])["image"], target, data["segmentation"]))
        assert out[0][0].shape[-3:] == (out_size,) * 3
        return out

    return run


def monai_pipeline(p: dict[str, float], out_size: int) -> Callable:
    """The closest MONAI dictionary transforms; RandAffine fires rotation and scaling together."""
    import monai.transforms as mt

    keys = ("image", "anatomy", "gm")
    margin = 16.0  # random translation, like a random crop of the larger input
    spatial_p = 1 - (1 - p["rotation"]) * (1 - p["scale"])
    pipeline = mt.Compose([
        mt.RandAffined(keys, spatial_size=(out_size,) * 3, prob=spatial_p, rotate_range=[math.pi / 6] * 3,
                       scale_range=[(-0.3, 0.4)] * 3, translate_range=[margin] * 3,
                       mode=("bilinear", "nearest", "nearest"), padding_mode="zeros", cache_grid=True),
        *(mt.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)),
        mt.CopyItemsd("image", names="target"),
        mt.RandGaussianNoised("image", prob=p["noise"], std=0.1),
        mt.RandGaussianSmoothd("image", sigma_x=(0.5, 1), sigma_y=(0.5, 1), sigma_z=(0.5, 1), prob=p["blur"]),
        mt.RandScaleIntensityd("image", factors=0.25, prob=p["brightness"]),
        mt.RandScaleIntensityFixedMeand("image", factors=0.25, preserve_range=True, prob=p["contrast"]),
        mt.RandSimulateLowResolutiond("image", zoom_range=(0.5, 1.0), prob=p["low_res"]),
        mt.RandAdjustContrastd("image", gamma=(0.7, 1.5), retain_stats=True, prob=p["gamma"]),
    ])  # fmt: skip
    pipeline.set_random_state(0)

    def run(image: torch.Tensor, masks: tuple[torch.Tensor, ...]) -> list:
        out = [pipeline({"image": image[b], "anatomy": masks[0][b], "gm": masks[1][b]}) for b in range(image.shape[0])]
        assert out[0]["image"].shape[-3:] == (out_size,) * 3
        return out

    return run


def _print_table(rows: list[tuple[str, str, str, tuple[float, float]]], args: argparse.Namespace) -> None:
    """Ratios are of wall times against GPUAugment's row with the same probabilities."""
    ours = [(label, where, wall) for name, label, where, (wall, _) in rows if name == "GPUAugment"]
    reference = {label: wall for label, where, wall in ours if where == "CPU, 1 thread"}
    cuda = {label: wall for label, where, wall in ours if not where.startswith("CPU")}
    settings = f"batch {args.batch} x 1 x {args.in_size}^3 float32 + 2 uint8 masks -> {args.out_size}^3"
    print(f"\n{settings}; mean of {args.reps} (CPU) / median of {args.cuda_reps} (CUDA) batches after one warmup\n")
    header = "| pipeline | probabilities | device | wall ms / batch | CPU ms / batch | x GPUAugment CPU 1 thread |"
    print(header + (" x GPUAugment CUDA |" if cuda else ""))
    print("|---|---|---|---:|---:|---:|" + ("---:|" if cuda else ""))
    for name, label, where, (wall, cpu) in rows:
        line = f"| {name} | {label} | {where} | {wall:.1f} | {cpu:.1f} | {wall / reference[label]:.2f} |"
        print(line + (f" {wall / cuda[label]:.1f} |" if cuda else ""))


if __name__ == "__main__":
    raise SystemExit(main())
