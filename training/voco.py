"""VoCo (volume contrast, Wu et al. CVPR 2024) as one loss module, with VoCo v2's momentum (EMA) teacher.

A region (B, 1, D, H, W) is tiled into a grid of non-overlapping base crops (2x2x2 by default, nnssl's `2x2x2`
variant) and K random crops of the same size (K=4 as in VoCo and nnssl). The target for a random crop is its
volume overlap with each base crop; the prediction is ReLU(cos) between the student's random-crop embedding and
the teacher's base-crop embeddings. Loss = nnssl's `VoCoLoss`: overlap-weighted -log(1 - |y - p|) on overlapping
pairs + mean p^2 on the others, plus the mean ReLU(cos) between the student's base-crop embeddings (paper eq. 5).
The teacher is an EMA copy of encoder + head (VoCo v2 `voco_head.py`, momentum 0.9): without a slowly-moving
target VoCo is reported not to learn on OpenMind with nnssl's settings. Embedding = global average pool of the
encoder bottleneck -> VoCo's 3-layer projection head, which keeps VoCo's BatchNorm1d (`PooledProjection`).

Trainer interface (shared with `training.mae.MAELoss`):
    objective = VoCoLoss(net, ...)               # owns net.encoder, the projection head and the frozen teacher
    loss, logs = objective(batch, generator)     # batch: "image" (B, 1, D, H, W) on device; other keys unused
    loss.backward(); optimizer.step(); objective.after_step()   # after_step: training.model.ema_update
`logs` maps names to detached 0-dim tensors. Build the optimizer from `objective.parameters()` (the teacher has
requires_grad=False and never gets a gradient), wrap `objective` itself in DDP (all its trainable parameters are
used every step), call `after_step` on the unwrapped module, and checkpoint `objective.state_dict()` so head and
teacher resume too. `generator` is a CPU `torch.Generator`: crop positions become slice bounds on the host.
"""

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from openmind_tools.errors import ConfigError
from training.config import check_ranges
from training.model import PooledProjection, ema_update


@dataclass(frozen=True)
class VoCoOptions:
    """A VoCo stage's `options` table: VoCoLoss's keyword arguments, checked when the recipe loads."""

    momentum: float = 0.9  # EMA teacher momentum (VoCo v2)
    hidden_dim: int = 2048  # projection head widths of VoCo and nnssl
    out_dim: int = 2048
    num_random: int = 4  # random crops per region (VoCo, nnssl)

    metadata: ClassVar[tuple[tuple[str, str], ...]] = ()  # (manifest column, "number" | "any")

    def __post_init__(self) -> None:
        check_ranges("options", self, momentum=(0, 1, "right-open"), hidden_dim=(1, None), out_dim=(1, None),
                     num_random=(1, None))  # fmt: skip

    def check_size(self, out_size: int) -> None:
        if out_size % 2:
            raise ConfigError(f"out_size {out_size} must be even (2x2x2 base crops)")


@dataclass(frozen=True)
class CropPlan:
    """Where the crops of one batch sit, and the overlap targets that follow from it."""

    crop_size: tuple[int, int, int]
    base_starts: torch.Tensor  # (G, 3) int64: corner of each base crop, the same for every sample
    random_starts: torch.Tensor  # (B, K, 3) int64: corner of each random crop
    overlaps: torch.Tensor  # (B, K, G) float32: share of a random crop's volume inside each base crop


def sample_crops(
    region_shape: Sequence[int],
    batch_size: int,
    generator: torch.Generator,
    grid: Sequence[int] = (2, 2, 2),
    num_random: int = 4,
) -> CropPlan:
    """Base crops tile the region by `grid`; random crops of the same size lie anywhere inside it.

    Because the base crops tile the region and every random crop lies inside it, each row of `overlaps` sums
    to 1. Deterministic for a given generator state; pure tensor math on the generator's device.
    """
    if len(region_shape) != 3 or any(s % g for s, g in zip(region_shape, grid, strict=True)):
        raise ConfigError(f"region_shape: expected 3 axes divisible by grid {tuple(grid)}, got {tuple(region_shape)}")
    crop_size = tuple(s // g for s, g in zip(region_shape, grid, strict=True))
    axes = [torch.arange(g, device=generator.device) * c for g, c in zip(grid, crop_size, strict=True)]
    base_starts = torch.cartesian_prod(*axes)
    high = torch.tensor([s - c + 1 for s, c in zip(region_shape, crop_size, strict=True)], device=generator.device)
    random_starts = (torch.rand(batch_size, num_random, 3, generator=generator, device=generator.device) * high).long()
    # Same-size boxes overlap by max(0, c - |a - b|) along each axis.
    size = torch.tensor(crop_size, device=generator.device)
    shared = (size - (random_starts[:, :, None, :] - base_starts[None, None]).abs()).clamp_min(0)
    overlaps = shared.prod(dim=-1).float() / size.prod().float()
    return CropPlan(crop_size, base_starts, random_starts, overlaps)


def extract_crops(images: torch.Tensor, starts: torch.Tensor, crop_size: Sequence[int]) -> torch.Tensor:
    """Slice crops (B * N, C, *crop_size) out of images (B, C, D, H, W) at corners `starts` (B, N, 3)."""
    cd, ch, cw = crop_size
    return torch.stack(
        [
            images[b, :, z : z + cd, y : y + ch, x : x + cw]
            for b, sample_starts in enumerate(starts.tolist())
            for z, y, x in sample_starts
        ]
    )


class VoCoLoss(nn.Module):
    """Overlap-supervised crop similarity with an EMA teacher; see the module docstring for the call shape."""

    views = 1  # augmented views of each patch it takes (training.objectives.Objective)
    trains_decoder = False  # the encoder (and its head) alone: its export omits the decoder

    def __init__(
        self,
        net: ResidualEncoderUNet,
        grid: Sequence[int] = (2, 2, 2),
        num_random: int = 4,
        momentum: float = 0.9,  # VoCo v2's teacher momentum, applied after every optimizer step
        hidden_dim: int = 2048,  # projection head widths of VoCo and nnssl
        out_dim: int = 2048,
        pred_weight: float = 1.0,  # nnssl weights both terms 1
        reg_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if len(grid) != 3 or min(grid) < 1 or grid[0] * grid[1] * grid[2] < 2:
            raise ConfigError(f"grid: expected 3 positive ints giving at least 2 base crops, got {tuple(grid)}")
        if num_random < 1:
            raise ConfigError(f"num_random: expected >= 1, got {num_random}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"momentum: expected in [0, 1), got {momentum}")
        self.grid = tuple(grid)
        self.num_random = num_random
        self.momentum = momentum
        self.pred_weight = pred_weight
        self.reg_weight = reg_weight
        self.student = PooledProjection(net.encoder, (hidden_dim, hidden_dim, out_dim))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)

    def forward(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = batch["image"]
        b = image.shape[0]
        crops = sample_crops(image.shape[2:], b, generator, self.grid, self.num_random)
        base = extract_crops(image, crops.base_starts.expand(b, -1, -1), crops.crop_size)
        random = extract_crops(image, crops.random_starts, crops.crop_size)
        # The student embeds base crops too (the regulariser needs them with a gradient); the teacher embeds the
        # same batch so its head's BatchNorm sees the same statistics, as in VoCo v2, and only its base rows are used.
        crops_all = torch.cat([base, random])
        n_base = base.shape[0]
        embeddings = self.student(crops_all).float()
        student_base = embeddings[:n_base].view(b, n_base // b, -1)
        student_random = embeddings[n_base:].view(b, self.num_random, -1)
        with torch.no_grad():
            teacher_base = self.teacher(crops_all)[:n_base].float().view(b, n_base // b, -1)
        target = crops.overlaps.to(image.device)
        prediction = _relu_cosine(student_random, teacher_base)  # (B, K, G)
        positive = -(target * torch.log(1 - (target - prediction).abs() + 1e-6)).sum() / target.sum()
        is_negative = target == 0
        negative = (prediction.square() * is_negative).sum() / is_negative.sum().clamp_min(1)
        pairs = torch.triu_indices(student_base.shape[1], student_base.shape[1], offset=1, device=image.device)
        regulariser = _relu_cosine(student_base, student_base)[:, pairs[0], pairs[1]].mean()
        loss = self.pred_weight * (positive + negative) + self.reg_weight * regulariser
        logs = {"voco_pos": positive.detach(), "voco_neg": negative.detach(), "voco_reg": regulariser.detach()}
        return loss, logs

    def after_step(self) -> None:
        """Call after each optimizer step: moves the teacher toward the student by the configured momentum."""
        ema_update(self.teacher, self.student, self.momentum)


def _relu_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ReLU of the cosine similarity of every row of a (B, N, E) with every row of b (B, M, E): (B, N, M)."""
    return torch.relu(F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2))
