"""Frozen-encoder embeddings of every volume a manifest selects, for linear probes.

An encoder comes from an export (`*_encoder.pt`, the nnssl adaptation-plan format) or a run folder. Each
volume is read once through the project's loader (`PatchDataset.read_each`), cropped at a fixed plan (the
centre crop, optionally plus the 8 crops at the quarter points of the free range), and embedded as the
global average pool of every encoder stage, concatenated (32+64+...+320 = 1120 features for ResEnc-L),
averaged over the crops. Embeddings are cached per (encoder checksum, selected volumes, crop plan).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from tqdm.auto import tqdm

from openmind_tools.errors import ConfigError, StoreError
from openmind_tools.files import atomic_write
from openmind_tools.loader import PatchDataset
from openmind_tools.loader_stages import batches, fixed_crops, unpack_masks
from openmind_tools.volume import Volume
from training.model import load_exported, network_from_plan

CACHE_FORMAT = "openmind-embeddings/1"
_QUARTERS = tuple(itertools.product((0.25, 0.75), repeat=3))  # octant centres of the free range


@dataclass(frozen=True)
class CropPlan:
    """Where every volume is cropped: `crops` = 1 (centre) or 9 (centre + the 8 quarter points)."""

    patch_size: int
    crops: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.patch_size, int) or self.patch_size < 1:
            raise ConfigError(f"patch_size: expected a positive number of voxels, got {self.patch_size!r}")
        if self.crops not in (1, 9):
            raise ConfigError(f"crops: expected 1 (centre) or 9 (centre + 8 quarter points), got {self.crops!r}")

    @property
    def fractions(self) -> tuple[tuple[float, float, float], ...]:
        return ((0.5, 0.5, 0.5), *(_QUARTERS if self.crops == 9 else ()))


@dataclass(frozen=True)
class Encoder:
    """A network to embed with, where it came from, and a checksum of its encoder weights (the cache key)."""

    net: ResidualEncoderUNet
    plan: dict[str, Any]  # the nnssl adaptation plan
    source: str  # the export file, or "random init (seed N)"
    checksum: str  # of the architecture and the encoder weights
    pretrain_patch_size: int  # the edge of the patches it was trained on: the default probe crop
    stride: int  # total downsampling: a crop edge must be a multiple of it

    def random_init(self, seed: int) -> Encoder:
        """The same architecture, freshly initialised from `seed`: the baseline a pretrained encoder must beat."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = network_from_plan(self.plan)
        return _encoder(net, self.plan, f"random init (seed {seed})")

    def check_patch_size(self, size: int) -> None:
        if size % self.stride:
            raise ConfigError(f"--patch-size {size}: this encoder needs a multiple of its total stride {self.stride}")


@dataclass(frozen=True)
class Embeddings:
    ids: np.ndarray  # (N,) str, the volumes embedded, sorted
    features: np.ndarray  # (N, F) float32
    unreadable: tuple[str, ...]  # StoreError messages of the volumes left out


def load_encoder(source: str | Path, stage: str | None = None) -> Encoder:
    """An export file, or a run folder (its `stage`, default the last, as `STAGE_encoder.pt`)."""
    path = Path(source)
    if path.is_dir():
        path = _run_export(path, stage)
    elif stage is not None:
        raise ConfigError(f"--stage {stage!r}: only a run folder has stages; {path} is a file")
    if not path.is_file():
        raise ConfigError(f"{path}: no such encoder export or run folder")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's warnings about a foreign file's pickle protocol
            net, plan = load_exported(path)
        return _encoder(net, plan, str(path))
    except Exception as e:  # a foreign file fails in many ways (pickle, zip, struct, missing keys): all mean this
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"{path}: not an encoder export that loads ({type(e).__name__}: {reason})") from None


def _encoder(net: ResidualEncoderUNet, plan: dict[str, Any], source: str) -> Encoder:
    """An Encoder, its plan's patch size and strides read (and checked) once."""
    configurations = plan["pretrain_plan"]["configurations"]
    patch = int(next(iter(configurations.values()))["patch_size"][0])
    strides = plan["architecture_plans"]["arch_kwargs"]["strides"]
    stride = int(np.prod([int(s[0]) for s in strides]))
    if patch < 1 or stride < 1:
        raise ValueError(f"patch size {patch} and total stride {stride} must be positive")
    digest = hashlib.sha256(json.dumps(plan["architecture_plans"], sort_keys=True, default=str).encode())
    digest.update(module_checksum(net.encoder).encode())
    return Encoder(net, plan, source, digest.hexdigest(), patch, stride)


def embed(
    encoder: Encoder,
    dataset: PatchDataset,
    crops: CropPlan,
    *,
    device: torch.device,
    batch_size: int = 2,
    cache_dir: Path | None = None,
    content: str = "",
    progress: bool = True,
) -> Embeddings:
    """Embeddings of every volume of `dataset`, from `cache_dir` when this encoder, selection and plan were seen.

    `content` identifies the selected volumes' bytes (the manifest's checksums), so a store rewritten in place
    misses the cache. A result with unreadable volumes is not cached: the next call reads them again.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size: expected at least 1, got {batch_size}")
    encoder.check_patch_size(crops.patch_size)
    key = _cache_key(encoder, dataset, crops, device, content)
    path = None if cache_dir is None else Path(cache_dir) / f"{key[:24]}.npz"
    if path is not None and (cached := _read_cache(path, key, {v.id for v in dataset.volumes})) is not None:
        return cached
    found = _compute(encoder, dataset, crops, device, batch_size, progress)
    if not len(found.ids):
        raise StoreError(f"no volume could be read, e.g. {found.unreadable[0] if found.unreadable else '?'}")
    if not np.isfinite(found.features).all():
        raise ConfigError(f"{encoder.source}: the encoder gives non-finite embeddings (NaN or Inf weights?)")
    if path is not None and not found.unreadable:
        try:
            _write_cache(path, key, found)
        except OSError as e:  # a cache that cannot be written only costs time
            warnings.warn(f"embedding cache {path} not written: {e}", stacklevel=2)
    return found


def _compute(
    encoder: Encoder, dataset: PatchDataset, crops: CropPlan, device: torch.device, batch_size: int, progress: bool
) -> Embeddings:
    net = encoder.net.encoder.to(device).eval()
    unreadable: list[str] = []
    sums: dict[str, torch.Tensor] = {}

    def readable() -> Iterator[tuple[Any, Volume]]:
        for ref, volume in tqdm(
            dataset.read_each(), total=len(dataset.volumes), desc=encoder.source, unit="volume", disable=not progress
        ):
            if isinstance(volume, StoreError):
                unreadable.append(str(volume))
            else:
                yield ref, volume

    size = (crops.patch_size,) * 3
    cropped = fixed_crops(readable(), patch_size=size, fractions=crops.fractions)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        for batch in batches(cropped, batch_size=batch_size, patch_size=size):
            batch = unpack_masks(batch)
            image = batch["image"].to(device, non_blocking=True).float()
            pooled = torch.cat([stage.float().mean(dim=(2, 3, 4)) for stage in net(image)], dim=1).cpu()
            for volume_id, row in zip(batch["id"], pooled, strict=True):
                sums[volume_id] = sums[volume_id] + row if volume_id in sums else row.clone()
    ids = np.array(sorted(sums), dtype=str)
    width = sum(int(f) for f in encoder.plan["architecture_plans"]["arch_kwargs"]["features_per_stage"])
    features = (
        (torch.stack([sums[i] for i in ids]) / len(crops.fractions)).numpy() if len(ids) else np.empty((0, width))
    )
    return Embeddings(ids, features.astype(np.float32), tuple(unreadable))


def _run_export(run: Path, stage: str | None) -> Path:
    config = run / "config.json"
    try:
        stages = [s["name"] for s in json.loads(config.read_text())["stages"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{run}: not a run folder of openmind-train ({config}: {type(e).__name__}: {e})") from None
    if not stages:
        raise ConfigError(f"{config}: the run has no stages")
    name = stages[-1] if stage is None else stage
    if name not in stages:
        raise ConfigError(f"--stage: {name!r} is not one of the run's stages {stages}")
    export = run / f"{name}_encoder.pt"
    if not export.is_file():
        raise ConfigError(f"{export}: stage {name!r} of {run} has not finished (no export)")
    return export


def module_checksum(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names and bytes): which weights an embedding or a fine-tuning run started from."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _cache_key(encoder: Encoder, dataset: PatchDataset, crops: CropPlan, device: torch.device, content: str) -> str:
    """Everything that decides the numbers: weights, where each volume is read, its bytes, crops, device (bf16)."""
    where = hashlib.sha256("\n".join(f"{v.id}\t{v.url}\t{v.span}" for v in dataset.volumes).encode())
    parts = {
        "format": CACHE_FORMAT,
        "encoder": encoder.checksum,
        "volumes": where.hexdigest(),
        "content": content,
        "store": dataset.store,
        "settings_hash": dataset.settings_hash,
        "patch_size": crops.patch_size,
        "fractions": crops.fractions,
        "device": device.type,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _read_cache(path: Path, key: str, expected: set[str]) -> Embeddings | None:
    """The cached embeddings of exactly `expected`, or None if absent, for another key, damaged or incomplete."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:  # a cache file is data: never unpickled
            if str(data["key"]) != key:
                return None
            ids, features, unreadable = data["ids"].astype(str), data["features"], tuple(data["unreadable"].astype(str))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None
    if features.ndim != 2 or features.shape[0] != ids.shape[0] or not np.isfinite(features).all():
        return None
    if set(ids) != expected or len(ids) != len(expected):
        return None
    return Embeddings(ids, features.astype(np.float32), unreadable)


def _write_cache(path: Path, key: str, found: Embeddings) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        np.savez(
            f,
            key=np.array(key),
            ids=found.ids,
            features=found.features,
            unreadable=np.array(found.unreadable, dtype=str),
        )
