"""ResEnc U-Net presets and the encoder export that nnssl / the SSL3D challenge's nnU-Net adaptation reads.

`resenc_l` is nnssl's `get_res_enc_l` (nnU-Net's ResEnc-L topology: dynamic_network_architectures
`ResidualEncoderUNet`, 6 stages, 32-64-128-256-320-320 features, 1-3-4-6-6-6 blocks), left with PyTorch's
default init as nnssl leaves it. The export is nnssl's checkpoint layout: `{"network_weights", "nnssl_adaptation_plan"}`
with the plan serialised as nnssl's `AdaptationPlan.serialize()` writes it, plus `trained_parts` (which nnssl and
nnU-Net ignore). Arrays are (B, C, D, H, W).
"""

import io
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from torch import nn

from openmind_tools.errors import ConfigError, OpenMindError
from openmind_tools.files import atomic_write

# Per preset: (features_per_stage, n_blocks_per_stage). ResEnc-L from nnssl's architecture_registry.py;
# resenc_tiny keeps the block structure but is small enough for CPU tests (a 32^3 training step ~0.1 s CPU).
_TOPOLOGY: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "resenc_l": ((32, 64, 128, 256, 320, 320), (1, 3, 4, 6, 6, 6)),
    "resenc_tiny": ((4, 8, 16, 32), (1, 1, 1, 1)),
}
# nnssl's architecture name for a dynamic_network_architectures class rebuilt from `arch_kwargs`.
_ARCH_CLASS_NAME = "ResidualEncoderUNet"
# The only classes a plan may name; a plan is data, so it never imports whatever a string says.
_CLASSES: dict[str, type[nn.Module]] = {
    f"{c.__module__}.{c.__name__}": c for c in (nn.Conv3d, nn.InstanceNorm3d, nn.LeakyReLU)
}
# What an export holds of the decoder. "trained": the objective trained it (MAE). "omitted": an encoder-only objective
# (VoCo, SimCLR, y-aware), so only the `encoder.` keys are written and a loader builds the decoder fresh (nnU-Net
# master's PretrainedTrainer loads `key_to_encoder`/`key_to_stem` alone). "nnunet_init": encoder-only, with the decoder
# drawn as nnU-Net initialises a network (`ResidualEncoderUNet.initialize`, which `get_network_from_plans` applies),
# for released nnU-Net's `-pretrained_weights`, whose `load_pretrained_weights` requires every key but the seg layers.
DECODER_CHOICES = ("trained", "omitted", "nnunet_init")
_ENCODER_PREFIX = "encoder."
_NNUNET_INIT_SEED = 0  # the "nnunet_init" decoder is drawn under this seed: one export, one file
# Top-level keys of nnssl's `Plan` and `ConfigurationPlan` dataclasses: nnssl rebuilds them with `**dict`.
_PLAN_KEYS = frozenset(
    {
        "dataset_name",
        "plans_name",
        "original_median_spacing_after_transp",
        "image_reader_writer",
        "transpose_forward",
        "transpose_backward",
        "configurations",
        "experiment_planner_used",
    }
)
_CONFIGURATION_KEYS = frozenset(
    {
        "data_identifier",
        "preprocessor_name",
        "spacing_style",
        "normalization_schemes",
        "use_mask_for_norm",
        "resampling_fn_data",
        "resampling_fn_data_kwargs",
        "resampling_fn_mask",
        "resampling_fn_mask_kwargs",
        "spacing",
        "patch_size",
    }
)


class ExportError(OpenMindError, ValueError):
    """An encoder export that would not load downstream; raised before anything is written."""


def arch_kwargs(arch_name: str) -> dict[str, Any]:
    """The `ResidualEncoderUNet` kwargs of a preset, with exactly the fields of nnssl's `DynamicArchitecturePlans`."""
    if arch_name not in _TOPOLOGY:
        raise ConfigError(f"model: expected one of {sorted(_TOPOLOGY)}, got {arch_name!r}")
    features, blocks = _TOPOLOGY[arch_name]
    n_stages = len(features)
    return {
        "n_stages": n_stages,
        "features_per_stage": list(features),
        "conv_op": nn.Conv3d,
        "kernel_sizes": [[3, 3, 3] for _ in range(n_stages)],
        "strides": [[1, 1, 1]] + [[2, 2, 2] for _ in range(n_stages - 1)],
        "n_blocks_per_stage": list(blocks),
        "n_conv_per_stage_decoder": [1] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": nn.InstanceNorm3d,
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": nn.LeakyReLU,
        "nonlin_kwargs": {"inplace": True},
    }


def resenc_l(in_channels: int = 1, num_classes: int = 1, deep_supervision: bool = False) -> ResidualEncoderUNet:
    """nnU-Net/nnssl ResEnc-L, the architecture the SSL3D challenge fine-tunes."""
    return ResidualEncoderUNet(
        in_channels, num_classes=num_classes, deep_supervision=deep_supervision, **arch_kwargs("resenc_l")
    )


def resenc_tiny(in_channels: int = 1, num_classes: int = 1, deep_supervision: bool = False) -> ResidualEncoderUNet:
    """A 4-stage ResEnc with 4-32 features: same code paths as ResEnc-L, cheap enough for CPU tests."""
    return ResidualEncoderUNet(
        in_channels, num_classes=num_classes, deep_supervision=deep_supervision, **arch_kwargs("resenc_tiny")
    )


PRESETS: dict[str, Callable[..., ResidualEncoderUNet]] = {"resenc_l": resenc_l, "resenc_tiny": resenc_tiny}


def encoder_features(encoder: ResidualEncoder, x: torch.Tensor) -> torch.Tensor:
    """Bottleneck feature map (B, C_last, d, h, w) of a ResEnc encoder (`net.encoder`), for the caller to pool.

    Takes the encoder, not the whole U-Net, so an objective that only trains the encoder (VoCo) owns no decoder
    parameters: under DDP every parameter it owns then gets a gradient and no `find_unused_parameters` is needed.
    """
    return encoder(x)[-1]


class PooledProjection(nn.Module):
    """Global-average-pooled encoder bottleneck -> an MLP projection head: what the embedding objectives train.

    `widths` are the output widths of the head's linear layers; between two layers sit BatchNorm1d (no affine,
    no running stats) and ReLU, as in VoCo's 3-layer head and SimCLR v2's. BatchNorm over the rows of a batch
    removes the component all embeddings share: with a per-embedding norm instead (LayerNorm, or nnssl's
    InstanceNorm1d on (N, C), which acts the same), SGD + VoCo's EMA teacher collapsed every embedding onto one
    direction in our CPU runs; with BatchNorm it did not.
    """

    def __init__(self, encoder: ResidualEncoder, widths: Sequence[int]) -> None:
        super().__init__()
        self.encoder = encoder
        layers: list[nn.Module] = []
        width = encoder.output_channels[-1]
        for i, out in enumerate(widths):
            if i:
                layers += [nn.BatchNorm1d(width, affine=False, track_running_stats=False), nn.ReLU(inplace=True)]
            layers.append(nn.Linear(width, out))
            width = out
        self.head = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(encoder_features(self.encoder, x).mean(dim=(2, 3, 4)))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter: the slowly-moving copy
    that VoCo v2's teacher and MoCo's key encoder are (both keep no buffers, so parameters are all there is)."""
    for slow, fast in zip(teacher.parameters(), student.parameters(), strict=True):
        slow.mul_(momentum).add_(fast.detach(), alpha=1.0 - momentum)


def reconstruction_unet(net: ResidualEncoderUNet) -> ResidualEncoderUNet:
    """`net` readied for an objective that trains the whole U-Net on one full-resolution output (MAE, Genesis).

    Without deep supervision only the last seg layer is used; freezing the others lets DDP wrap the objective
    without find_unused_parameters (they are re-initialised downstream anyway).
    """
    if net.decoder.deep_supervision:
        raise ConfigError("net: expected deep_supervision=False (the objective reconstructs one full-resolution image)")
    for layer in net.decoder.seg_layers[:-1]:
        layer.requires_grad_(False)
    return net


def nnssl_pretrain_plan(
    patch_size: Sequence[int],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    dataset_name: str = "OpenMind",
    configuration: str = "onemmiso",
) -> dict[str, Any]:
    """An nnssl `Plan` dict describing this toolkit's preprocessing (1 mm RAS, z-score inside the anatomy mask).

    Downstream adaptation reads `spacing` and `patch_size` (the patch the network saw, e.g. the VoCo crop size);
    the other fields only describe the pipeline, in the schema nnssl's `Plan.from_dict` requires.
    """
    config = {
        "data_identifier": f"openmind_tools_{configuration}",
        "preprocessor_name": "openmind_tools",
        "spacing_style": configuration,
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [True],
        "resampling_fn_data": "linear",
        "resampling_fn_data_kwargs": {},
        "resampling_fn_mask": "nearest",
        "resampling_fn_mask_kwargs": {},
        "spacing": [float(s) for s in spacing],
        "patch_size": [int(p) for p in patch_size],
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": "openmind_tools",
        "original_median_spacing_after_transp": [float(s) for s in spacing],
        "image_reader_writer": "NibabelReaderWriter",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {configuration: config},
        "experiment_planner_used": "openmind_tools",
    }


def adaptation_plan(
    net: ResidualEncoderUNet,
    arch_name: str,
    pretrain_plan: dict[str, Any],
    patch_size: Sequence[int] = (160, 160, 160),
    decoder: str = "trained",
) -> dict[str, Any]:
    """The nnssl adaptation plan `export_encoder` writes for `net`, checked but not yet proven to load."""
    if decoder not in DECODER_CHOICES:
        raise ExportError(f"decoder: expected one of {DECODER_CHOICES}, got {decoder!r}")
    _check_pretrain_plan(pretrain_plan)
    return {
        "architecture_plans": {
            "arch_class_name": _ARCH_CLASS_NAME,
            "arch_kwargs": _serialise(arch_kwargs(arch_name)),
            "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"],
        },
        "pretrain_plan": pretrain_plan,
        "pretrain_num_input_channels": int(net.encoder.stem.convs[0].conv.in_channels),
        "recommended_downstream_patchsize": [int(p) for p in patch_size],
        "key_to_encoder": net.key_to_encoder,
        "key_to_stem": net.key_to_stem,
        "keys_to_in_proj": list(net.keys_to_in_proj),
        "key_to_lpe": None,
        "trained_parts": ["encoder", "decoder"] if decoder == "trained" else ["encoder"],
    }


def export_encoder(
    net: ResidualEncoderUNet,
    arch_name: str,
    path: str | os.PathLike,
    pretrain_plan: dict[str, Any],
    patch_size: Sequence[int] = (160, 160, 160),
    decoder: str = "trained",
) -> Path:
    """Write `net`'s weights with an nnssl adaptation plan, after proving they load into a fresh preset net.

    `decoder` (one of `DECODER_CHOICES`) says whether the decoder's weights are written as trained, left out, or
    replaced by nnU-Net's own initialisation; the plan's `trained_parts` names what pretraining trained.
    `net` is the plain module (not DDP- or compile-wrapped). The check rebuilds the network from the plan alone,
    as downstream code does, loads the weights strictly and resolves every key prefix; any failure raises
    `ExportError` and leaves `path` untouched. The file is written to a temporary name and then renamed.
    """
    plan = adaptation_plan(net, arch_name, pretrain_plan, patch_size, decoder)
    try:
        weights = _export_weights(net, arch_name, decoder)
        # Rebuild from the plan as a weights_only load will return it (numpy scalars, say, would not survive).
        buffer = io.BytesIO()
        torch.save(plan, buffer)
        buffer.seek(0)
        _net_from_plan(torch.load(buffer, weights_only=True), weights)
    except (pickle.UnpicklingError, RuntimeError, KeyError, AttributeError, ValueError) as e:
        raise ExportError(f"export as {arch_name!r} would not load downstream: {e}") from e
    return _atomic_save({"network_weights": weights, "nnssl_adaptation_plan": plan}, Path(path))


def load_exported(path: str | os.PathLike) -> tuple[ResidualEncoderUNet, dict[str, Any]]:
    """Rebuild the network an `export_encoder` file describes and load its weights strictly (no unpickling).

    An export without decoder weights (an encoder-only objective's) gets a freshly initialised decoder.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    plan = checkpoint["nnssl_adaptation_plan"]
    return _net_from_plan(plan, checkpoint["network_weights"]), plan


def _export_weights(net: ResidualEncoderUNet, arch_name: str, decoder: str) -> dict[str, torch.Tensor]:
    """The state dict to write: all of it, the encoder's keys alone, or the encoder in a nnU-Net-initialised net."""
    if decoder == "omitted":
        return {k: v for k, v in _cpu_state_dict(net).items() if k.startswith(_ENCODER_PREFIX)}
    if decoder == "trained":
        return _cpu_state_dict(net)
    in_channels = int(net.encoder.stem.convs[0].conv.in_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_NNUNET_INIT_SEED)
        fresh = PRESETS[arch_name](in_channels, num_classes=net.decoder.seg_layers[-1].out_channels)
        fresh.apply(fresh.initialize)
    fresh.encoder.load_state_dict(net.encoder.state_dict(), strict=True)
    return _cpu_state_dict(fresh)


def _net_from_plan(plan: dict[str, Any], weights: dict[str, torch.Tensor]) -> ResidualEncoderUNet:
    """Build the plan's network (output channels taken from the weights), load strictly, resolve the key prefixes.

    Weights without a `decoder.` key are an encoder-only export: they load strictly into the encoder.
    """
    n_stages = plan["architecture_plans"]["arch_kwargs"]["n_stages"]
    seg = f"decoder.seg_layers.{n_stages - 2}.weight"
    net = network_from_plan(plan, num_classes=weights[seg].shape[0] if seg in weights else 1)
    if any(key.startswith("decoder.") for key in weights):
        net.load_state_dict(weights, strict=True)
    else:
        net.encoder.load_state_dict({k.removeprefix(_ENCODER_PREFIX): v for k, v in weights.items()}, strict=True)
    for key in (plan["key_to_encoder"], plan["key_to_stem"], *plan["keys_to_in_proj"]):
        net.get_submodule(key)
    return net


def network_from_plan(plan: dict[str, Any], num_classes: int = 1) -> ResidualEncoderUNet:
    """A freshly initialised network of the architecture an adaptation plan names (the random-init baseline).

    Only the classes in `_CLASSES` may be named: a plan is data, so it never imports whatever a string says.
    """
    architecture = plan["architecture_plans"]
    if architecture["arch_class_name"] != _ARCH_CLASS_NAME:
        raise ValueError(f"expected arch_class_name {_ARCH_CLASS_NAME!r}, got {architecture['arch_class_name']!r}")
    kwargs = dict(architecture["arch_kwargs"])
    for key in architecture["arch_kwargs_requiring_import"]:
        if kwargs[key] not in _CLASSES:
            raise ValueError(f"arch_kwargs[{key!r}]: expected one of {sorted(_CLASSES)}, got {kwargs[key]!r}")
        kwargs[key] = _CLASSES[kwargs[key]]
    return ResidualEncoderUNet(plan["pretrain_num_input_channels"], num_classes=num_classes, **kwargs)


def _check_pretrain_plan(pretrain_plan: dict[str, Any]) -> None:
    """nnssl rebuilds `Plan(**dict)` and reads `patch_size`/`spacing` of the first configuration: check both exist."""
    missing = _PLAN_KEYS - set(pretrain_plan)
    if missing:
        raise ExportError(f"pretrain_plan: missing keys {sorted(missing)}")
    configurations = pretrain_plan["configurations"]
    if not configurations:
        raise ExportError("pretrain_plan['configurations']: expected at least one configuration, got none")
    for name, config in configurations.items():
        missing = _CONFIGURATION_KEYS - set(config)
        if missing:
            raise ExportError(f"pretrain_plan['configurations'][{name!r}]: missing keys {sorted(missing)}")


def _cpu_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict on the CPU with one copy per shared tensor, so `torch.save` stores each once.

    dynamic_network_architectures registers every conv twice (`conv` and `all_modules.0`) and the decoder holds
    the encoder, so copying key by key would write ResEnc-L's 0.41 GB of parameters as 1.5 GB.
    """
    copies: dict[tuple, torch.Tensor] = {}
    weights = {}
    for key, value in net.state_dict().items():
        identity = (value.device, value.data_ptr(), value.dtype, value.shape, value.stride())
        if identity not in copies:
            copies[identity] = value.detach().cpu()
        weights[key] = copies[identity]
    return weights


def _serialise(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Classes become "module.Name" strings, as nnssl's `DynamicArchitecturePlans.serialize` writes them."""
    return {k: f"{v.__module__}.{v.__name__}" if isinstance(v, type) else v for k, v in kwargs.items()}


def _atomic_save(obj: dict[str, Any], path: Path) -> Path:
    """torch.save, whole or not at all (`openmind_tools.files.atomic_write`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(obj, f)
    return path
