"""MAE for a CNN as nnssl's `BaseMAETrainer` does it, with the loss restricted to anatomy outside deface regions.

Per sample, 75 % of the cubic blocks (16^3 voxels by default; nnssl's `mask_percentage`/`block_size`) are chosen
from a `torch.Generator` and zeroed in the input; the full ResEnc U-Net (num_classes=1) reconstructs the volume.
The target is the spatially augmented but intensity-clean view (AMAES), and the loss is the MSE over voxels that
are masked AND inside the anatomy mask AND outside the deface mask, so defaced or empty space is never learnt.

Trainer interface (shared with `training.voco.VoCoLoss`):
    objective = MAELoss(net, ...)                # owns the whole net
    loss, logs = objective(batch, generator)     # batch on device: "image", "target" (B, 1, D, H, W) float,
                                                 #   "anatomy", "deface" (B, 1, D, H, W) uint8 or bool
    loss.backward(); optimizer.step(); objective.after_step()   # after_step does nothing for MAE
`logs` maps names to detached 0-dim tensors. As for VoCo: optimizer over `objective.parameters()`, DDP around
`objective` (the unused intermediate seg layers are frozen, so no `find_unused_parameters`), checkpoint
`objective.state_dict()`. `generator` may be on the CPU or the batch's device; only a (B, blocks) draw uses it.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from openmind_tools.errors import ConfigError
from training.config import check_ranges
from training.model import reconstruction_unet


@dataclass(frozen=True)
class MAEOptions:
    """An MAE stage's `options` table: MAELoss's keyword arguments, checked when the recipe loads."""

    mask_ratio: float = 0.75  # share of cubic blocks zeroed
    block_size: int = 16  # block edge in voxels

    metadata: ClassVar[tuple[tuple[str, str], ...]] = ()  # (manifest column, "number" | "any")

    def __post_init__(self) -> None:
        check_ranges("options", self, mask_ratio=(0, 1, "open"), block_size=(1, None))

    def check_size(self, out_size: int) -> None:
        if out_size % self.block_size:
            raise ConfigError(f"out_size {out_size} is not a multiple of options.block_size {self.block_size}")


def block_mask(
    batch_size: int,
    spatial_shape: Sequence[int],
    generator: torch.Generator,
    block_size: int = 16,
    ratio: float = 0.75,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B, 1, D, H, W) bool, True where masked: exactly floor(ratio * n_blocks) blocks per sample, as nnssl.

    The block choice is drawn on the generator's device at block resolution, then expanded on `device`.
    """
    if any(s % block_size for s in spatial_shape):
        raise ConfigError(f"spatial_shape: expected multiples of block_size {block_size}, got {tuple(spatial_shape)}")
    grid = [s // block_size for s in spatial_shape]
    n_blocks = grid[0] * grid[1] * grid[2]
    n_masked = int(ratio * n_blocks)
    order = torch.rand(batch_size, n_blocks, generator=generator, device=generator.device).argsort(dim=1)
    masked = torch.zeros(batch_size, n_blocks, dtype=torch.bool, device=generator.device)
    masked.scatter_(1, order[:, :n_masked], True)
    masked = masked.view(batch_size, 1, *grid)
    if device is not None:
        masked = masked.to(device)
    for axis in (2, 3, 4):
        masked = masked.repeat_interleave(block_size, dim=axis)
    return masked


class MAELoss(nn.Module):
    """Masked-block reconstruction MSE; see the module docstring for the call shape."""

    views = 1  # augmented views of each patch it takes (training.objectives.Objective)
    trains_decoder = True  # the whole U-Net

    def __init__(self, net: ResidualEncoderUNet, mask_ratio: float = 0.75, block_size: int = 16) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio: expected in (0, 1), got {mask_ratio}")
        if block_size < 1:
            raise ConfigError(f"block_size: expected >= 1, got {block_size}")
        self.net = reconstruction_unet(net)
        self.mask_ratio = mask_ratio
        self.block_size = block_size

    def forward(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = batch["image"]
        masked = block_mask(
            image.shape[0], image.shape[2:], generator, self.block_size, self.mask_ratio, device=image.device
        )
        reconstruction = self.net(image.masked_fill(masked, 0.0))
        weights = masked & batch["anatomy"].bool() & ~batch["deface"].bool()
        squared_error = (reconstruction.float() - batch["target"].float()).square()
        loss = (squared_error * weights).sum() / weights.sum().clamp_min(1)
        return loss, {"mae_mse": loss.detach(), "mae_loss_voxel_share": weights.float().mean()}

    def after_step(self) -> None:
        """Nothing to update after an optimizer step; present so one loop runs either objective."""
