import io
import json
import math
from pathlib import Path

import nibabel as nib
import nilearn.datasets
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from matplotlib.image import imread
from scipy.spatial.transform import Rotation

from openmind_tools.augment import AugmentError, AugmentSettings, GPUAugment, affine_warp
from openmind_tools.cli.augment_preview import main as preview_main

DATA = Path(nilearn.datasets.__file__).parent / "data"
T1 = DATA / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
GM = DATA / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
WM = DATA / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
OFF = {name: 0.0 for name in AugmentSettings().to_dict() if name.startswith("p_")}
INTENSITY = {f"p_{op}": 1.0 for op in ("noise", "blur", "brightness", "contrast", "low_res", "gamma")}
ALL_ON = {"p_rotation": 1.0, "p_scale": 1.0, **INTENSITY}


def only(**overrides) -> AugmentSettings:
    """Settings with every op off except the overrides."""
    return AugmentSettings(**{**OFF, **overrides})


@pytest.fixture(scope="module")
def mni() -> dict[str, np.ndarray]:
    """The MNI152 T1 at 2 mm (99 x 117 x 95, RAS), z-scored inside the head, with GM and WM masks."""
    t1, gm, wm = (np.asarray(nib.load(p).dataobj, dtype=np.float32)[::2, ::2, ::2] for p in (T1, GM, WM))
    head = t1 > 0
    t1 = np.where(head, (t1 - t1[head].mean()) / t1[head].std(), 0).astype(np.float32)
    return {"t1": t1, "gm": (gm > 127).astype(np.uint8), "wm": (wm > 127).astype(np.uint8)}


def batch(mni, size=(64, 72, 60), n=2):
    """n real crops (B, 1, *size) at different offsets, with their GM and WM masks."""
    crops = {k: [] for k in mni}
    for i in range(n):
        start = [(s - c) // 2 + 3 * i - 3 for s, c in zip(mni["t1"].shape, size, strict=True)]
        window = tuple(slice(a, a + c) for a, c in zip(start, size, strict=True))
        for k, v in mni.items():
            crops[k].append(v[window])
    image, gm, wm = (torch.from_numpy(np.stack(crops[k])[:, None].copy()) for k in ("t1", "gm", "wm"))
    return image, (gm, wm)


def centre_of_mass(volume: np.ndarray) -> np.ndarray:
    grids = np.indices(volume.shape).reshape(3, -1)
    weights = volume.reshape(-1).astype(np.float64)
    return grids @ weights / weights.sum()


def test_settings_round_trip_and_errors():
    settings = AugmentSettings(out_size=96, rotation=15, gamma=(0.8, 1.2), p_elastic=0.3, seed=7)
    assert settings.out_size == (96, 96, 96)
    assert AugmentSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    with pytest.raises(AugmentError, match="rotaton"):
        AugmentSettings.from_dict({"rotaton": 10})
    with pytest.raises(AugmentError, match="p_noise"):
        AugmentSettings(p_noise="0.1")
    with pytest.raises(AugmentError, match="p_gamma"):
        AugmentSettings(p_gamma=1.5)
    with pytest.raises(AugmentError, match="scale"):
        AugmentSettings(scale=(1.4, 0.7))
    with pytest.raises(AugmentError, match="isotropic_scale"):
        AugmentSettings(isotropic_scale=1)


def test_identity_returns_input(mni):
    image, masks = batch(mni)
    out = GPUAugment(only(out_size=tuple(image.shape[2:])))(image, masks=masks)
    torch.testing.assert_close(out.image, image, rtol=0, atol=1e-4)
    assert torch.equal(out.target, out.image)
    assert all(torch.equal(w, m) for w, m in zip(out.masks, masks, strict=True))
    torch.testing.assert_close(out.affine, torch.eye(3, 4).expand(2, 3, 4))


def test_larger_input_is_cropped_at_integer_offsets(mni):
    image, masks = batch(mni, size=(80, 90, 70), n=4)
    out = GPUAugment(only(out_size=(64, 72, 60), seed=3))(image, masks=masks)
    offsets = out.affine[:, :, 3]
    assert torch.equal(offsets, offsets.round()) and len({tuple(o.tolist()) for o in offsets}) > 1
    for b, (d, h, w) in enumerate(offsets.long().tolist()):
        window = (b, slice(None), slice(d, d + 64), slice(h, h + 72), slice(w, w + 60))
        torch.testing.assert_close(out.image[b], image[window], rtol=0, atol=1e-4)
        assert torch.equal(out.masks[0][b], masks[0][window])


def test_mirror_on_every_axis_is_a_flip(mni):
    image, masks = batch(mni)
    out = GPUAugment(only(out_size=tuple(image.shape[2:]), p_mirror=1.0))(image, masks=masks)
    assert torch.equal(out.masks[0], masks[0].flip(2, 3, 4)) and torch.equal(out.masks[1], masks[1].flip(2, 3, 4))
    torch.testing.assert_close(out.image, image.flip(2, 3, 4), rtol=0, atol=1e-4)


def test_warp_matches_scipy_affine_transform(mni):
    volume = mni["t1"]
    matrix = Rotation.from_euler("xyz", [12, -20, 7], degrees=True).as_matrix() * [1.1, 0.9, 1.2]
    affine = np.concatenate([matrix, [[3.5], [-2.0], [5.25]]], axis=1)
    out_size = (80, 96, 70)
    expected = ndi.affine_transform(volume, matrix, affine[:, 3], output_shape=out_size, order=1, mode="grid-constant")
    warped = affine_warp(
        torch.from_numpy(volume)[None, None], torch.tensor(affine, dtype=torch.float32)[None], out_size
    )
    np.testing.assert_allclose(warped[0, 0].numpy(), expected, atol=1e-4)


def test_known_rotation_moves_the_centre_of_mass(mni):
    """Left-hemisphere GM is ~20 voxels off centre, so a 25 degree axial rotation moves its centre ~8 voxels."""
    hemisphere = mni["gm"] * (np.arange(mni["gm"].shape[0]) < 45)[:, None, None]
    centre = (np.array(hemisphere.shape) - 1) / 2
    rotation = Rotation.from_euler("z", 25, degrees=True).as_matrix()  # rotates the (R, A) plane about S
    affine = np.concatenate([rotation, (centre - rotation @ centre)[:, None]], axis=1)
    warped = affine_warp(
        torch.from_numpy(hemisphere).float()[None, None],
        torch.tensor(affine, dtype=torch.float32)[None],
        hemisphere.shape,
    )
    before, after = centre_of_mass(hemisphere), centre_of_mass(warped[0, 0].numpy())
    expected = rotation.T @ (before - centre) + centre  # output j shows input R (j - c) + c
    assert np.linalg.norm(expected - before) > 5
    np.testing.assert_allclose(after, expected, atol=0.3)


def test_sampled_affine_is_what_the_warp_did(mni):
    """The returned affine maps output to input indices: the GM centre of mass must follow its inverse."""
    hemisphere = mni["gm"] * (np.arange(mni["gm"].shape[0]) < 45)[:, None, None]
    image = torch.from_numpy(np.stack([hemisphere, hemisphere]).astype(np.float32))[:, None]
    settings = only(out_size=hemisphere.shape, p_rotation=1.0, p_scale=1.0, scale=(1.0, 1.3), p_mirror=0.5, seed=5)
    out = GPUAugment(settings)(image)
    before = centre_of_mass(hemisphere)
    for b in range(2):
        linear, shift = out.affine[b, :, :3].double().numpy(), out.affine[b, :, 3].double().numpy()
        assert 1.0 <= abs(np.linalg.det(linear)) ** (1 / 3) <= 1.3
        expected = np.linalg.solve(linear, before - shift)
        np.testing.assert_allclose(centre_of_mass(out.target[b, 0].numpy()), expected, atol=0.75)


@pytest.mark.parametrize(
    "spatial",
    [dict(p_rotation=1.0, p_scale=1.0, p_mirror=0.5), dict(p_elastic=1.0, elastic=3.0)],
    ids=["affine", "elastic"],
)
def test_masks_stay_binary_and_follow_the_image(mni, spatial):
    """Warp GM and WM as nearest-neighbour masks and as trilinear image channels through the same grid."""
    image, masks = batch(mni)
    channels = torch.cat([image, masks[0].float(), masks[1].float()], dim=1)
    out = GPUAugment(only(out_size=(56, 64, 52), seed=11, **spatial))(channels, masks=masks)
    assert not torch.equal(out.target[:, 1:], channels[:, 1:, :56, :64, :52])  # something moved
    for mask, soft in zip(out.masks, out.target[:, 1:].unbind(1), strict=True):
        soft = soft[:, None]
        assert mask.dtype == torch.uint8 and set(mask.unique().tolist()) <= {0, 1}
        assert bool((mask[soft > 1 - 1e-4] == 1).all()) and bool((mask[soft < 1e-4] == 0).all())
        dice = 2 * ((soft > 0.5) & (mask == 1)).sum() / ((soft > 0.5).sum() + mask.sum())
        shifted = 2 * ((soft > 0.5) & (mask.roll(1, dims=3) == 1)).sum() / ((soft > 0.5).sum() + mask.sum())
        assert dice > 0.9 > shifted  # a one-voxel misalignment fails


def test_target_is_the_clean_warp(mni):
    image, masks = batch(mni, size=(72, 80, 68))
    spatial = dict(out_size=(64, 72, 60), p_rotation=1.0, p_scale=1.0, p_mirror=0.5, seed=2)
    clean = GPUAugment(only(**spatial))(image, masks=masks)
    assert torch.equal(clean.image, clean.target)
    torch.testing.assert_close(clean.target, affine_warp(image, clean.affine, (64, 72, 60)), rtol=0, atol=1e-5)

    noisy = GPUAugment(only(**spatial, **INTENSITY))(image, masks=masks)
    torch.testing.assert_close(noisy.target, clean.target)  # same spatial draws: intensity draws come later
    assert all((noisy.image[b] - noisy.target[b]).abs().max() > 0.05 for b in range(2))


def test_seeds_and_successive_batches_differ(mni):
    image, masks = batch(mni)
    settings = AugmentSettings(out_size=(48, 56, 48), **ALL_ON)
    first, second = GPUAugment(settings), GPUAugment(settings)
    a, b = first(image, masks=masks), second(image, masks=masks)
    assert torch.equal(a.image, b.image) and torch.equal(a.masks[0], b.masks[0])
    other = GPUAugment(AugmentSettings(out_size=(48, 56, 48), seed=1, **ALL_ON))(image, masks=masks)
    assert not torch.equal(a.affine, other.affine) and not torch.equal(a.image, other.image)
    assert not torch.equal(first(image, masks=masks).affine, a.affine)


def test_state_dict_resumes_the_next_batch(mni):
    image, masks = batch(mni)
    settings = AugmentSettings(out_size=(48, 56, 48), p_elastic=0.5, **ALL_ON)
    running = GPUAugment(settings)
    running(image, masks=masks)
    checkpoint = io.BytesIO()
    torch.save({"augment": running.state_dict()}, checkpoint)
    expected = running(image, masks=masks)
    checkpoint.seek(0)
    state = torch.load(checkpoint, weights_only=True)["augment"]  # as the trainer's checkpoints load

    resumed = GPUAugment(settings)
    resumed.load_state_dict(state)
    got = resumed(image, masks=masks)
    assert torch.equal(got.image, expected.image) and torch.equal(got.affine, expected.affine)
    assert torch.equal(got.masks[1], expected.masks[1])
    with pytest.raises(AugmentError, match="seed"):
        GPUAugment(AugmentSettings(seed=1)).load_state_dict(state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(mni, dtype):
    image, masks = batch(mni)
    settings = AugmentSettings(out_size=(48, 56, 48), **ALL_ON)
    half = GPUAugment(settings)(image.to(dtype), masks=masks)
    full = GPUAugment(settings)(image.to(dtype).float(), masks=masks)  # same values, computed the same way
    assert half.image.dtype == half.target.dtype == dtype and half.masks[0].dtype == torch.uint8
    torch.testing.assert_close(half.image, full.image.to(dtype))
    assert torch.equal(half.masks[0], full.masks[0])


def test_blur_matches_scipy_gaussian_filter(mni):
    image, _ = batch(mni)
    out = GPUAugment(only(out_size=tuple(image.shape[2:]), p_blur=1.0, blur=(0.8, 0.8)))(image)
    for b in range(2):
        expected = ndi.gaussian_filter(out.target[b, 0].numpy(), 0.8, mode="nearest", truncate=3 / 0.8)
        np.testing.assert_allclose(out.image[b, 0].numpy(), expected, atol=1e-4)


def test_low_res_matches_interpolate(mni):
    image, _ = batch(mni)
    out = GPUAugment(only(out_size=tuple(image.shape[2:]), p_low_res=1.0, low_res=(0.6, 0.6)))(image)
    coarse = [round(n * 0.6) for n in image.shape[2:]]
    down = F.interpolate(out.target, size=coarse, mode="nearest-exact")
    expected = F.interpolate(down, size=tuple(image.shape[2:]), mode="trilinear", align_corners=False)
    torch.testing.assert_close(out.image, expected, rtol=0, atol=1e-4)


def test_gamma_matches_formula(mni):
    image, _ = batch(mni)
    out = GPUAugment(only(out_size=tuple(image.shape[2:]), p_gamma=1.0, gamma=(1.3, 1.3)))(image)
    for b in range(2):
        x = out.target[b, 0].double().numpy()
        y = ((x - x.min()) / (x.max() - x.min())) ** 1.3
        expected = (y - y.mean()) / y.std(ddof=1) * x.std(ddof=1) + x.mean()
        np.testing.assert_allclose(out.image[b, 0].numpy(), expected, atol=1e-4)


def test_brightness_then_contrast_matches_formula(mni):
    image, _ = batch(mni)
    settings = only(
        out_size=tuple(image.shape[2:]), p_brightness=1.0, brightness=(1.2, 1.2), p_contrast=1.0, contrast=(0.8, 0.8)
    )
    out = GPUAugment(settings)(image)
    for b in range(2):
        y = 1.2 * out.target[b, 0].double().numpy()
        expected = np.clip((y - y.mean()) * 0.8 + y.mean(), y.min(), y.max())
        np.testing.assert_allclose(out.image[b, 0].numpy(), expected, atol=1e-5)


def test_noise_has_the_drawn_scale(mni):
    image, _ = batch(mni, n=4)
    out = GPUAugment(only(out_size=tuple(image.shape[2:]), p_noise=1.0, noise=0.1))(image)
    std = (out.image - out.target).flatten(1).std(dim=1)
    assert bool((std > 0).all() and (std < 0.1 * 1.01).all()) and len(set(std.tolist())) == 4


def test_bad_inputs_name_the_problem(mni):
    image, masks = batch(mni)
    augment = GPUAugment(AugmentSettings(out_size=32))
    with pytest.raises(AugmentError, match="image"):
        augment(image[:, 0])
    with pytest.raises(AugmentError, match=r"masks\[1\]"):
        augment(image, masks=(masks[0], masks[1][:, :, :-1]))


def test_preview_cli_writes_a_montage(tmp_path):
    png = tmp_path / "preview.png"
    argv = ["--nifti", str(T1), "--mask", str(GM), "-o", str(png), "--n", "2", "--in-size", "72", "--out-size", "56"]
    assert preview_main([*argv, "--all-ops", "--seed", "4"]) == 0
    pixels = imread(png)
    assert pixels.shape[0] >= 1.5 * pixels.shape[1] and pixels[..., :3].std() > 0.1  # 6 rows of 3 slices, not blank


def test_preview_cli_reads_a_manifest_query(demo_out, tmp_path, capsys):
    png = tmp_path / "preview.png"
    query = f"modality=T1w of {demo_out / 'manifest.parquet'}"
    assert preview_main([query, "-o", str(png), "--n", "2", "--in-size", "64", "--out-size", "48"]) == 0
    assert imread(png)[..., :3].std() > 0.1
    assert preview_main(["-o", str(png)]) == 2 and "either a MANIFEST or --nifti" in capsys.readouterr().err
    assert preview_main([query, "-o", str(tmp_path / "no" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_without_host_sync(mni):
    image, masks = batch(mni, size=(72, 80, 68))
    image, masks = image.cuda().bfloat16(), tuple(m.cuda() for m in masks)
    settings = AugmentSettings(out_size=(64, 72, 60), p_elastic=0.5, **ALL_ON)
    augment = GPUAugment(settings)
    augment(image, masks=masks)  # first call: lazy CUDA init and the generator
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = augment(image, masks=masks)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    again = GPUAugment(settings)
    again(image, masks=masks)
    assert torch.equal(again(image, masks=masks).image, out.image) and out.image.dtype == torch.bfloat16
    assert math.isfinite(out.image.float().abs().max().item())
