"""An auxiliary regression head on a manifest column (age, say): the supervised part of a multi-task stage.

The pooled encoder bottleneck goes through one linear layer to a scalar, trained by MSE against the column
z-scored as the options say, (y - center) / scale, so its loss is in units of the column's spread whatever the
column's unit, and weights beside a self-supervised loss in `training.multitask` mean the same on any column.
Rows without a value (NaN) are left out of the mean; a batch with none gives 0 with a zero gradient everywhere,
so DDP still sees every parameter. SSL_MRI combines such a head with a self-supervised loss in this way.

Trainer interface (training.objectives):
    objective = RegressionLoss(net, center=..., scale=..., column="age")   # owns net.encoder and the head
    loss, logs = objective(batch, generator)     # batch: "image" (B, 1, D, H, W), "metadata" {column: (B,) float32}
    loss.backward(); optimizer.step(); objective.after_step()   # after_step does nothing
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from openmind_tools.errors import ConfigError
from training.config import check_ranges
from training.model import PooledProjection


@dataclass(frozen=True)
class RegressOptions:
    """A regress stage's (or task's) `options` table, checked when the recipe loads.

    center and scale have no default: they are the column's mean and std over the stage's volumes, which the
    objective never sees (pandas on the stage's manifest gives them; the demo recipe shows the numbers).
    """

    center: float  # subtracted from the column's values
    scale: float  # then divided into them
    column: str = "age"  # a numeric manifest column; the loader puts it on every batch

    def __post_init__(self) -> None:
        check_ranges("options", self, center=(-math.inf, None), scale=(0, None, "open"))
        if not self.column:
            raise ConfigError("options.column: expected a manifest column, got ''")

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((self.column, "number"),)

    def check_size(self, out_size: int) -> None:
        """Any patch size pools to one feature vector."""


class RegressionLoss(nn.Module):
    """MSE of a linear head on the pooled bottleneck against the z-scored column; see the module docstring."""

    views = 1  # augmented views of each patch it takes (training.objectives.Objective)
    trains_decoder = False  # the encoder (and its head) alone: its export omits the decoder

    def __init__(self, net: ResidualEncoderUNet, center: float, scale: float, column: str = "age") -> None:
        super().__init__()
        self.head = PooledProjection(net.encoder, (1,))
        self.center, self.scale, self.column = center, scale, column

    def forward(
        self, batch: dict[str, Any], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        value = batch["metadata"][self.column]
        if not value.is_floating_point():
            raise ConfigError(f"options.column: {self.column!r} is categorical; regress needs a numeric column")
        target = (value.to(batch["image"].device) - self.center) / self.scale
        known = ~target.isnan()
        error = torch.where(known, self.head(batch["image"]).float().squeeze(1) - target, 0.0)
        count = known.sum().clamp_min(1)
        loss = error.square().sum() / count
        logs = {"regress_mse": loss.detach(), "regress_mae": error.detach().abs().sum() / count * self.scale,
                "regress_missing": (~known).float().mean()}  # fmt: skip
        return loss, logs

    def after_step(self) -> None:
        """Nothing to update after an optimizer step; present so one loop runs every objective."""
