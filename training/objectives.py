"""The pretraining objectives a stage can name, and the call shape they share.

One entry per objective: its loss module and its options dataclass (the stage's `options` table, checked before
any work starts). A new objective is a loss module with the `Objective` call shape and one line in `OBJECTIVES`;
neither the recipe format nor the loop in `training.train` changes. This registry sits above the objectives'
modules, and they above `training.config` (the recipe's schema and the helpers that check an options table):
nothing below imports it.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Protocol

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from openmind_tools.errors import ConfigError
from training.config import StageConfig, build_dataclass
from training.contrastive import ContrastiveLoss, SimCLROptions, YAwareOptions
from training.genesis import GenesisLoss, GenesisOptions
from training.mae import MAELoss, MAEOptions
from training.moco import MoCoLoss, MoCoOptions
from training.voco import VoCoLoss, VoCoOptions


class Objective(Protocol):
    """What the loop calls. `batch` holds, on the device: "image", "target" (the intensity-clean view),
    "anatomy", "deface" of the first augmented view, "views" (all `views` augmented images) and "metadata"
    (the manifest columns the options name). `logs` maps names to detached 0-dim tensors (no host sync)."""

    views: int  # augmented views of each patch the loop makes
    trains_decoder: bool  # False: only the encoder learns, so its export leaves the untrained decoder out

    def __call__(
        self, batch: dict[str, Any], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def after_step(self) -> None:
        """Called after every optimizer step (VoCo's EMA teacher moves here, MoCo's queue takes its keys)."""


class Options(Protocol):
    """An objective's options table: its loss module's keyword arguments, validated on construction."""

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """(manifest column, "number" | "any") for each column the loader must put on each batch."""

    def check_size(self, out_size: int) -> None:
        """Raise ConfigError if the network input size does not suit the objective."""


OBJECTIVES: dict[str, tuple[type[nn.Module], type]] = {
    "voco": (VoCoLoss, VoCoOptions),
    "mae": (MAELoss, MAEOptions),
    "simclr": (ContrastiveLoss, SimCLROptions),
    "yaware": (ContrastiveLoss, YAwareOptions),
    "moco": (MoCoLoss, MoCoOptions),
    "genesis": (GenesisLoss, GenesisOptions),
}


def objective_options(stage: StageConfig) -> Options:
    """The stage's options table as its objective's dataclass; a mistake is a ConfigError naming the key."""
    if stage.objective not in OBJECTIVES:
        raise ConfigError(f"stages.{stage.name}.objective: expected one of {sorted(OBJECTIVES)}, "
                          f"got {stage.objective!r}")  # fmt: skip
    try:
        options = build_dataclass(OBJECTIVES[stage.objective][1], dict(stage.options), "options")
        options.check_size(stage.out_size)
    except ConfigError as e:
        raise ConfigError(f"stages.{stage.name}.{e}") from None
    return options


def trains_decoder(objective: str) -> bool:
    """Whether `objective` trains the U-Net's decoder (MAE, Genesis) or the encoder alone (VoCo, SimCLR, y-aware,
    MoCo)."""
    return OBJECTIVES[objective][0].trains_decoder


def build_objective(stage: StageConfig, net: ResidualEncoderUNet) -> nn.Module:
    """The stage's loss module around `net`."""
    return OBJECTIVES[stage.objective][0](net, **asdict(objective_options(stage)))
