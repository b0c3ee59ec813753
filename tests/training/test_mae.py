"""MAE: exact block-mask ratio, zeroed input, loss restricted to anatomy outside deface, overfits one batch."""

from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.mae import MAELoss, block_mask
from training.model import resenc_tiny

MNI_T1 = Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def _mni_batch() -> dict[str, torch.Tensor]:
    """A 32^3 region of the MNI152 T1 at 4 mm, anatomy = head voxels, the first 8 slices marked defaced."""
    volume = torch.from_numpy(np.asarray(nib.load(MNI_T1).dataobj, dtype=np.float32))
    region = F.avg_pool3d(volume[None, None], 4)[0, 0, 8:40, 12:44, 6:38]
    anatomy = region > 0.1 * region.max()
    image = ((region - region[anatomy].mean()) / region[anatomy].std())[None, None]
    deface = torch.zeros_like(anatomy)
    deface[:8] = True
    return {
        "image": image,
        "target": image.clone(),
        "anatomy": anatomy[None, None].to(torch.uint8),
        "deface": deface[None, None].to(torch.uint8),
    }


def test_block_mask_masks_exactly_three_quarters_of_the_blocks_per_sample():
    mask = block_mask(4, (32, 48, 64), torch.Generator().manual_seed(0), block_size=16, ratio=0.75)
    assert mask.shape == (4, 1, 32, 48, 64) and mask.dtype == torch.bool
    blocks = mask.view(4, 2, 16, 3, 16, 4, 16).permute(0, 1, 3, 5, 2, 4, 6).reshape(4, 24, 16**3)
    assert torch.equal(blocks.all(-1), blocks.any(-1))  # every block is entirely masked or entirely kept
    assert blocks.all(-1).sum(-1).tolist() == [18] * 4  # 0.75 * 24 blocks, in every sample
    assert len({tuple(b.all(-1).tolist()) for b in blocks}) == 4  # samples draw their own blocks
    again = block_mask(4, (32, 48, 64), torch.Generator().manual_seed(0), block_size=16, ratio=0.75)
    assert torch.equal(mask, again)


def test_block_mask_rejects_shapes_that_do_not_tile():
    with pytest.raises(ValueError, match="block_size"):
        block_mask(1, (32, 32, 40), torch.Generator(), block_size=16)


def test_masked_voxels_are_zero_in_the_network_input():
    batch = _mni_batch()
    objective = MAELoss(resenc_tiny(), block_size=8)
    seen = []
    objective.net.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    objective(batch, torch.Generator().manual_seed(5))
    masked = block_mask(1, (32, 32, 32), torch.Generator().manual_seed(5), block_size=8)
    assert masked.any() and (batch["image"][masked] != 0).any()
    assert torch.equal(seen[0][masked], torch.zeros(int(masked.sum())))
    assert torch.equal(seen[0][~masked], batch["image"][~masked])


def test_loss_counts_only_masked_anatomy_outside_deface():
    torch.manual_seed(0)
    batch = _mni_batch()
    objective = MAELoss(resenc_tiny(), block_size=8)
    masked = block_mask(1, (32, 32, 32), _seed(1), block_size=8)
    counted = masked & batch["anatomy"].bool() & ~batch["deface"].bool()
    assert (masked & batch["deface"].bool()).any() and (masked & ~batch["anatomy"].bool()).any()
    with torch.no_grad():
        loss, _ = objective(batch, _seed(1))
        reconstruction = objective.net(batch["image"].masked_fill(masked, 0.0))
        torch.testing.assert_close(loss, (reconstruction - batch["target"])[counted].square().mean())

        ignored = dict(batch, target=torch.where(counted, batch["target"], batch["target"] + 100.0))
        torch.testing.assert_close(objective(ignored, _seed(1))[0], loss)
        counted_changed = dict(batch, target=torch.where(counted, batch["target"] + 1.0, batch["target"]))
        assert not torch.allclose(objective(counted_changed, _seed(1))[0], loss)


def test_loss_is_zero_not_nan_without_any_counted_voxel():
    batch = dict(_mni_batch(), anatomy=torch.zeros(1, 1, 32, 32, 32, dtype=torch.uint8))
    objective = MAELoss(resenc_tiny(), block_size=8)
    loss, _ = objective(batch, _seed(0))
    loss.backward()
    assert loss.item() == 0.0
    trainable = [p for p in objective.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)  # DDP needs every one


def test_a_few_dozen_steps_overfit_one_batch():
    torch.manual_seed(0)
    batch = _mni_batch()
    objective = MAELoss(resenc_tiny(), block_size=8)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=5e-3)
    losses = []
    for _ in range(30):
        loss, _ = objective(batch, _seed(0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        objective.after_step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3, losses


def _seed(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
