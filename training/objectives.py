"""The pretraining objectives a stage can name, and the call shape they share.

One entry per objective: its loss module and its options dataclass (the stage's `options` table, checked before
any work starts). A new objective is a loss module with the `Objective` call shape and one line in `OBJECTIVES`;
neither the recipe format nor the loop in `training.train` changes. An objective made of others (`multitask`)
has a `Composite` options type: the registry hands it `options_of` to check each part by its own entry, and builds
each part's module for it. This registry sits above the objectives' modules, and they above `training.config`
(the recipe's schema and the helpers that check an options table): nothing below imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any, Protocol, runtime_checkable

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from openmind_tools.errors import ConfigError
from training.config import StageConfig, build_dataclass
from training.contrastive import ContrastiveLoss, SimCLROptions, YAwareOptions
from training.genesis import GenesisLoss, GenesisOptions
from training.mae import MAELoss, MAEOptions
from training.moco import MoCoLoss, MoCoOptions
from training.multitask import MultitaskLoss, MultitaskOptions
from training.regress import RegressionLoss, RegressOptions
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


@runtime_checkable
class Composite(Protocol):
    """Options of an objective made of other entries: built from the stage's table with `options_of`, so every
    part is checked by its own entry; `parts()` gives each part (its objective, weight and label) and options."""

    @classmethod
    def from_table(cls, table: dict[str, Any], options_of: Callable[[str, dict[str, Any]], Options]) -> Composite: ...

    def parts(self) -> Iterable[tuple[Any, Options]]: ...


OBJECTIVES: dict[str, tuple[type[nn.Module], type]] = {
    "voco": (VoCoLoss, VoCoOptions),
    "mae": (MAELoss, MAEOptions),
    "simclr": (ContrastiveLoss, SimCLROptions),
    "yaware": (ContrastiveLoss, YAwareOptions),
    "moco": (MoCoLoss, MoCoOptions),
    "genesis": (GenesisLoss, GenesisOptions),
    "regress": (RegressionLoss, RegressOptions),
    "multitask": (MultitaskLoss, MultitaskOptions),
}


def objective_options(stage: StageConfig) -> Options:
    """The stage's options table as its objective's dataclass; a mistake is a ConfigError naming the key."""
    try:
        options = options_of(stage.objective, stage.options)
        options.check_size(stage.out_size)
    except ConfigError as e:
        raise ConfigError(f"stages.{stage.name}.{e}") from None
    return options


def options_of(objective: str, table: dict[str, Any]) -> Options:
    """`table` as `objective`'s options type (a composite's parts each as their own entry's); ConfigError else."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective: expected one of {sorted(OBJECTIVES)}, got {objective!r}")
    kind = OBJECTIVES[objective][1]
    if issubclass(kind, Composite):
        return kind.from_table(dict(table), options_of)
    return build_dataclass(kind, dict(table), "options")


def trains_decoder(objective: str, options: dict[str, Any]) -> bool:
    """Whether a stage of `objective` with this options table trains the U-Net's decoder (MAE, Genesis, a multitask
    stage with either among its parts) or the encoder alone (VoCo, SimCLR, y-aware, MoCo, regress)."""
    return _trains_decoder(objective, options_of(objective, options))


def build_objective(stage: StageConfig, net: ResidualEncoderUNet) -> nn.Module:
    """The stage's loss module around `net`."""
    return _build(stage.objective, objective_options(stage), net)


def _trains_decoder(objective: str, options: Options) -> bool:
    if isinstance(options, Composite):
        return any(_trains_decoder(part.objective, checked) for part, checked in options.parts())
    return OBJECTIVES[objective][0].trains_decoder


def _build(objective: str, options: Options, net: ResidualEncoderUNet) -> nn.Module:
    loss = OBJECTIVES[objective][0]
    if isinstance(options, Composite):
        return loss(
            [(part.label, part.weight, _build(part.objective, checked, net)) for part, checked in options.parts()]
        )
    return loss(net, **asdict(options))
