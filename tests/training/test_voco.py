"""VoCo: overlap targets against boolean volumes, EMA arithmetic, and a falling loss on a real T1 volume."""

from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.model import ema_update, resenc_tiny
from training.voco import VoCoLoss, extract_crops, sample_crops

MNI_T1 = Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def _mni_regions() -> torch.Tensor:
    """Two different z-scored 32^3 regions of the MNI152 T1 at 4 mm: (2, 1, 32, 32, 32)."""
    volume = torch.from_numpy(np.asarray(nib.load(MNI_T1).dataobj, dtype=np.float32))
    coarse = F.avg_pool3d(volume[None, None], 4)[0, 0]  # 49 x 58 x 47, the head fills most of it
    regions = [coarse[z : z + 32, y : y + 32, x : x + 32] for z, y, x in ((8, 12, 6), (9, 14, 8))]
    return torch.stack([(r - r.mean()) / r.std() for r in regions])[:, None]


@pytest.mark.parametrize(("region", "grid"), [((16, 24, 32), (2, 2, 2)), ((24, 24, 8), (3, 2, 1))])
def test_overlaps_match_boolean_volumes_and_sum_to_one(region, grid):
    plan = sample_crops(region, batch_size=3, generator=torch.Generator().manual_seed(0), grid=grid, num_random=5)
    size = plan.crop_size
    assert size == tuple(r // g for r, g in zip(region, grid, strict=True))

    def box(start) -> np.ndarray:
        inside = np.zeros(region, dtype=bool)
        inside[tuple(slice(s, s + c) for s, c in zip(start, size, strict=True))] = True
        return inside

    bases = [box(s) for s in plan.base_starts.tolist()]
    assert np.array_equal(np.sum(bases, axis=0), np.ones(region))  # base crops tile the region exactly
    for b, sample in enumerate(plan.random_starts.tolist()):
        for k, start in enumerate(sample):
            crop = box(start)
            assert crop.sum() == np.prod(size)  # the random crop lies inside the region
            expected = [(crop & base).sum() / crop.sum() for base in bases]
            np.testing.assert_allclose(plan.overlaps[b, k].numpy(), expected, rtol=1e-6)
    torch.testing.assert_close(plan.overlaps.sum(-1), torch.ones(3, 5))


def test_sampling_is_deterministic_per_seed():
    first, again, other = (
        sample_crops((32, 32, 32), 4, torch.Generator().manual_seed(seed), num_random=6) for seed in (7, 7, 8)
    )
    assert torch.equal(first.random_starts, again.random_starts)
    assert not torch.equal(first.random_starts, other.random_starts)


def test_extract_crops_slices_the_sampled_boxes():
    images = torch.arange(2 * 16 * 16 * 16, dtype=torch.float32).view(2, 1, 16, 16, 16)
    plan = sample_crops((16, 16, 16), 2, torch.Generator().manual_seed(3), num_random=3)
    crops = extract_crops(images, plan.random_starts, plan.crop_size)
    assert crops.shape == (6, 1, 8, 8, 8)
    z, y, x = plan.random_starts[1, 2].tolist()
    torch.testing.assert_close(crops[5], images[1, :, z : z + 8, y : y + 8, x : x + 8])


def test_loss_is_finite_and_only_the_student_gets_gradients():
    torch.manual_seed(0)
    objective = VoCoLoss(resenc_tiny(), hidden_dim=32, out_dim=32)
    loss, logs = objective({"image": torch.randn(2, 1, 32, 32, 32)}, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and set(logs) == {"voco_pos", "voco_neg", "voco_reg"}
    torch.testing.assert_close(loss.detach(), logs["voco_pos"] + logs["voco_neg"] + logs["voco_reg"])
    assert all(p.grad is not None for p in objective.student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in objective.teacher.parameters())


def test_ema_update_follows_the_momentum_formula():
    torch.manual_seed(0)
    objective = VoCoLoss(resenc_tiny(), hidden_dim=16, out_dim=16)
    with torch.no_grad():
        for p in objective.student.parameters():
            p.add_(torch.randn_like(p))
    teacher_before = [p.clone() for p in objective.teacher.parameters()]
    student = [p.clone() for p in objective.student.parameters()]
    assert any(not torch.equal(t, s) for t, s in zip(teacher_before, student, strict=True))

    ema_update(objective.teacher, objective.student, 0.75)
    for t_after, t_before, s in zip(objective.teacher.parameters(), teacher_before, student, strict=True):
        torch.testing.assert_close(t_after, 0.75 * t_before + 0.25 * s)
    for s_after, s in zip(objective.student.parameters(), student, strict=True):
        assert torch.equal(s_after, s)  # the student is not touched


def test_nnssl_sgd_steps_reduce_the_loss_on_a_real_volume_without_collapse():
    torch.manual_seed(0)
    objective = VoCoLoss(resenc_tiny(), hidden_dim=64, out_dim=64)
    # nnssl's optimizer (SGD, lr 1e-2, Nesterov momentum 0.99, weight decay 3e-5).
    optimizer = torch.optim.SGD(objective.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    batch = {"image": _mni_regions()}

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            loss, logs = objective(batch, torch.Generator().manual_seed(100))
        return loss.item(), logs["voco_reg"].item()

    before, _ = evaluate()
    for step in range(30):
        loss, _ = objective(batch, torch.Generator().manual_seed(step % 4))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        objective.after_step()
    after, regulariser = evaluate()
    assert after < 0.6 * before, (before, after)
    assert regulariser < 0.5  # a collapsed student puts every base crop on one direction: 1.0
