"""An nnU-Net plans file for an export, so released nnU-Net (2.8.1) builds exactly the exported network.

nnU-Net builds its network from a plans file (`configurations[C]["architecture"]` and `patch_size`), never from the
export's nnssl adaptation plan, so `nnUNetv2_train -pretrained_weights` loads only into a plan whose architecture
matches the export. This copies a user's plan (from `nnUNetv2_plan_experiment`) under a new name with the export's
architecture and a patch size the network divides. Preprocessing (spacing, normalisation, `data_identifier`) stays
nnU-Net's, so the data preprocessed for the user's plan is reused. The class is named in full: nnU-Net then resolves
it with `pydoc.locate`, where a short name sends it walking dynamic_network_architectures, whose Primus/DINOv2
modules import timm.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from openmind_tools.errors import ConfigError
from openmind_tools.files import atomic_write_text

NETWORK_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
# nnU-Net names a results folder TRAINER__PLANS__CONFIGURATION and splits it on "__", so a plans name must not hold it
_PLANS_NAME = re.compile(r"[A-Za-z0-9.-]+(_[A-Za-z0-9.-]+)*")


class PlansError(ConfigError):
    """A plans file that cannot carry the export (wrong configuration, patch size, channels); nothing is written."""


def load_plans(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """An nnU-Net plans file and the `dataset.json` nnU-Net keeps beside it in `nnUNet_preprocessed/DATASET/`."""
    path = Path(path)
    documents = []
    for file in (path, path.parent / "dataset.json"):
        try:
            documents.append(json.loads(file.read_text()))
        except (OSError, ValueError) as e:
            raise PlansError(f"{file}: expected nnU-Net's JSON from nnUNetv2_plan_experiment ({e})") from None
    plans, dataset = documents
    if not isinstance(plans.get("configurations"), dict) or "plans_name" not in plans:
        raise PlansError(f"{path}: not an nnU-Net plans file (no 'configurations' or 'plans_name')")
    return plans, dataset


def plans_for_export(
    plans: dict[str, Any],
    dataset: dict[str, Any],
    adaptation_plan: dict[str, Any],
    *,
    plans_name: str,
    configuration: str = "3d_fullres",
    patch_size: Sequence[int] | None = None,
) -> dict[str, Any]:
    """A copy of `plans` named `plans_name` whose `configuration` builds the export's network.

    `adaptation_plan` is the export's (`training.model.adaptation_plan`); `patch_size` defaults to its
    `recommended_downstream_patchsize` and must be a multiple of the network's total stride on every axis.
    """
    if not _PLANS_NAME.fullmatch(plans_name) or plans_name == plans["plans_name"]:
        raise PlansError(f"plans name: expected letters, digits, '.', '-' and single '_', other than the source "
                         f"plan's {plans['plans_name']!r}, got {plans_name!r}")  # fmt: skip
    if configuration not in plans["configurations"]:
        raise PlansError(f"configuration: expected one of {sorted(plans['configurations'])}, got {configuration!r}")
    if len(_resolved(plans["configurations"], configuration)["spacing"]) != 3:
        raise PlansError(f"configuration {configuration!r} is not 3D; the export is a 3D network")
    channels, pretrained = len(dataset["channel_names"]), adaptation_plan["pretrain_num_input_channels"]
    if channels != pretrained:
        raise PlansError(f"dataset.json has {channels} input channels, the export {pretrained}: released "
                         "nnU-Net loads an equal stem only (master's PretrainedTrainer repeats it)")  # fmt: skip
    architecture = adaptation_plan["architecture_plans"]
    kwargs = architecture["arch_kwargs"]
    patch = [int(p) for p in patch_size or adaptation_plan["recommended_downstream_patchsize"]]
    stride = [math.prod(int(s[axis]) for s in kwargs["strides"]) for axis in range(3)]
    if len(patch) != 3 or any(p < 1 or p % s for p, s in zip(patch, stride, strict=True)):
        raise PlansError(f"patch size: expected 3 positive multiples of the network's total stride {stride}, "
                         f"got {patch}")  # fmt: skip
    out = copy.deepcopy(plans)
    out["plans_name"] = plans_name
    out["configurations"][configuration].update(
        patch_size=patch,
        architecture={
            "network_class_name": NETWORK_CLASS,
            "arch_kwargs": copy.deepcopy(kwargs),
            "_kw_requires_import": list(architecture["arch_kwargs_requiring_import"]),
        },
    )
    return out


def write_plans(plans: dict[str, Any], folder: str | os.PathLike) -> Path:
    """Write `plans` as `folder/PLANS_NAME.json`, where `nnUNetv2_train -p PLANS_NAME` finds it (atomically)."""
    path = Path(folder) / f"{plans['plans_name']}.json"
    atomic_write_text(path, json.dumps(plans, indent=4))
    return path


def _resolved(configurations: dict[str, Any], name: str) -> dict[str, Any]:
    """A configuration with what it `inherits_from` filled in, as nnU-Net's PlansManager resolves it."""
    config = configurations[name]
    parent = config.get("inherits_from")
    return config if parent is None else {**_resolved(configurations, parent), **config}
