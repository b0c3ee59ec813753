"""Run and stage settings, read from a TOML recipe and `--key=value` overrides.

A recipe is `[run]` plus one `[[stages]]` table per stage (VoCo, then MAE); each stage names its data
as a manifest query (manifest + preset/min_quality, less the ids of its `exclude` flags tables, which are read
when the recipe loads) and its objective, whose own settings sit in the stage's `options` table. Overrides address
`run.KEY`, `stages.NAME.KEY` or `stages.NAME.options.KEY` / `stages.NAME.augment.KEY`.
An unknown key or a value of the wrong type is an error naming it, raised before any work starts. This module sits
below the objectives (they build their options with `build_dataclass` and `check_ranges`), so it leaves the
`options` table to the registry above them: `training.objectives.objective_options` checks it, and
`training.train.train` runs that on every stage before it reads a manifest or makes a folder.
"""

from __future__ import annotations

import math
import tomllib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from openmind_tools.augment import AugmentSettings
from openmind_tools.errors import ConfigError
from openmind_tools.flags import flagged_ids
from openmind_tools.loader import MAX_PATCH_EDGE


@dataclass(frozen=True)
class StageConfig:
    name: str
    objective: str  # a name in training.objectives.OBJECTIVES: "voco", "mae", "simclr", "yaware", "moco", ...
    manifest: str  # a manifest path/URL, or a query such as "mae8 of out/manifest.parquet"
    preset: str | None = None  # a named selection in manifests/ (mae8, all, ...)
    min_quality: int | None = None  # image_quality_score <= this (1 best .. 5 worst)
    exclude: str | list[str] | None = None  # flags table(s) (id, reason; a report's flags.parquet): ids left out
    store: str = "zarr"  # "zarr" | "wds"
    on_error: str = "raise"  # an unreadable volume: "raise" stops the run, "skip" replaces it (see max_skipped)
    max_skipped: float = 0.01  # with on_error="skip": the share of an interval's volumes after which it stops
    epochs: int = 1
    max_steps: int | None = None  # stop the stage early (demo, tests)
    batch_size: int = 2  # per rank
    patch_size: int = 160  # crop read from the store; augmentation warps it to out_size
    out_size: int = 160  # network input: the VoCo region or the MAE patch
    crops_per_volume: int = 1
    foreground_bias: float = 0.9  # probability a crop is centred in the anatomy mask
    num_workers: int = 2
    optimizer: str = "sgd"  # "sgd" (nesterov, momentum 0.99 as nnU-Net/nnssl) | "adamw"
    lr: float = 1e-2
    weight_decay: float = 3e-5
    warmup_steps: int = 0
    grad_clip: float = 12.0  # nnU-Net's clip norm
    init_from: str | None = None  # name of an earlier stage whose encoder weights start this one
    balance_by: str | list[str] | None = None  # manifest column(s): draw volumes inversely to their group's size
    options: dict[str, Any] = field(default_factory=dict)  # the objective's own table (training.objectives)
    augment: dict[str, Any] = field(default_factory=dict)  # openmind_tools.augment.AugmentSettings overrides

    def __post_init__(self) -> None:
        where = f"stages.{self.name}"
        check_ranges(where, self, epochs=(1, None), max_steps=(0, None), batch_size=(1, None),
                  patch_size=(1, MAX_PATCH_EDGE), out_size=(1, None), crops_per_volume=(1, None),
                  num_workers=(0, None), lr=(0, None, "open"), weight_decay=(0, None), warmup_steps=(0, None),
                  grad_clip=(0, None, "open"),
                  foreground_bias=(0, 1), max_skipped=(0, 1))  # fmt: skip
        for key, allowed in (("store", ("zarr", "wds")), ("on_error", ("raise", "skip"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{where}.{key}: expected one of {allowed}, got {getattr(self, key)!r}")
        AugmentSettings.from_dict({"out_size": self.out_size, **self.augment})  # names a misspelt key
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"stages.{self.name}.optimizer: expected 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.out_size > self.patch_size:
            raise ConfigError(f"stages.{self.name}: out_size {self.out_size} exceeds patch_size {self.patch_size}")
        if self.balance_by is not None and not (
            self.balance_columns and all(c and isinstance(c, str) for c in self.balance_columns)
        ):
            raise ConfigError(f"stages.{self.name}.balance_by: expected a column name or a list of them, "
                              f"got {self.balance_by!r}")  # fmt: skip
        if self.exclude is not None:
            if not (self.exclude_paths and all(p and isinstance(p, str) for p in self.exclude_paths)):
                raise ConfigError(f"stages.{self.name}.exclude: expected a flags file or a list of them, "
                                  f"got {self.exclude!r}")  # fmt: skip
            try:  # read now: a typo must not surface after the first stage has trained for a day
                flagged_ids(self.exclude_paths)
            except ConfigError as e:
                raise ConfigError(f"stages.{self.name}.exclude: {e}") from None

    @property
    def exclude_paths(self) -> tuple[str, ...]:
        """exclude as a tuple (empty: nothing left out)."""
        return (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude or ())

    @property
    def balance_columns(self) -> tuple[str, ...]:
        """balance_by as a tuple (empty: uniform sampling)."""
        return (self.balance_by,) if isinstance(self.balance_by, str) else tuple(self.balance_by or ())


@dataclass(frozen=True)
class RunConfig:
    out: str = "runs/demo"  # run folder: checkpoints, log.csv, loss plots, exported encoders
    model: str = "resenc_tiny"  # training.model.PRESETS: resenc_l (the recipe) or resenc_tiny (CPU)
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available
    compile: bool = False  # torch.compile the objective
    channels_last: bool = False  # channels_last_3d weights and inputs (benchmarks/gpu_check.py measures it)
    cudnn_benchmark: bool = False  # let cuDNN time its kernels for the fixed patch size (ditto)
    log_every: int = 10  # steps between log lines
    checkpoint_every: int = 200  # steps between checkpoints (one is also written at each stage end)
    stages: tuple[StageConfig, ...] = ()

    def __post_init__(self) -> None:
        from training.model import PRESETS  # here, not at import: reading a recipe needs no network code

        if self.model not in PRESETS:
            raise ConfigError(f"run.model: expected one of {sorted(PRESETS)}, got {self.model!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"run.device: expected 'auto', 'cpu' or 'cuda', got {self.device!r}")
        check_ranges("run", self, log_every=(1, None), checkpoint_every=(1, None))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_TABLES = ("options", "augment")  # stage keys that hold a table of their own


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Recipe file first, then `--run.key=value` / `--stages.NAME.key=value` overrides."""
    try:
        with Path(path).open("rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"recipe {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {path}: not valid TOML ({e})") from None
    unknown = set(raw) - {"run", "stages"}
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {sorted(unknown)}; expected [run] and [[stages]]")
    run = dict(raw.get("run", {}))
    stages: dict[str, dict[str, Any]] = {}
    for i, stage in enumerate(raw.get("stages", [])):
        name = stage.get("name")
        if not isinstance(name, str) or name in stages:
            raise ConfigError(f"{path}: [[stages]] number {i + 1} needs a unique name, got {name!r}")
        stages[name] = dict(stage)
    for item in overrides or []:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected --key=value")
        parts = key.split(".")
        if parts[0] == "run" and len(parts) == 2:
            run[parts[1]] = _parse(value)
        elif parts[0] == "stages" and len(parts) == 3 and parts[1] in stages:
            stages[parts[1]][parts[2]] = _parse(value)
        elif parts[0] == "stages" and len(parts) == 4 and parts[1] in stages and parts[2] in _TABLES:
            table = stages[parts[1]].setdefault(parts[2], {})
            if not isinstance(table, dict):
                raise ConfigError(f"override {item!r}: stages.{parts[1]}.{parts[2]} is not a table")
            table[parts[3]] = _parse(value)
        else:
            raise ConfigError(f"override {item!r}: expected run.KEY, stages.NAME.KEY or stages.NAME.TABLE.KEY with "
                              f"NAME in {list(stages)} and TABLE in {list(_TABLES)}")  # fmt: skip
    built = tuple(build_dataclass(StageConfig, s, f"stages.{name}") for name, s in stages.items())
    if not built:
        raise ConfigError(f"{path}: no [[stages]]")
    names = [s.name for s in built]
    for i, stage in enumerate(built):
        if stage.init_from is not None and stage.init_from not in names[:i]:
            raise ConfigError(f"stages.{stage.name}.init_from: {stage.init_from!r} is not an earlier stage {names[:i]}")
    return build_dataclass(RunConfig, {**run, "stages": built}, "run")


def build_dataclass(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    required = {n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING}
    if required - set(values):
        raise ConfigError(f"{where}: missing key(s) {sorted(required - set(values))}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key != "stages" and not _fits(value, hints[key]):
            raise ConfigError(f"{where}.{key}: expected {hints[key]}, got {value!r}")
    return cls(**{k: (float(v) if hints[k] is float and isinstance(v, int) else v) for k, v in values.items()})


def check_ranges(where: str, config: Any, **bounds: tuple) -> None:
    """Each named field within (low, high[, "open" | "right-open"]); None is unbounded; unset (None) fields pass."""
    for key, (low, high, *kind) in bounds.items():
        value = getattr(config, key)
        if value is None:
            continue
        open_low = kind and kind[0] == "open"
        open_high = kind and kind[0] in ("open", "right-open")
        below = value <= low if open_low else value < low
        above = high is not None and (value >= high if open_high else value > high)
        if below or above or not math.isfinite(value):  # NaN passes every comparison; inf is never meant
            left, right = "(" if open_low else "[", ")" if open_high or high is None else "]"
            raise ConfigError(f"{where}.{key}: expected a value in {left}{low}, {'inf' if high is None else high}"
                              f"{right}, got {value!r}")  # fmt: skip


def _fits(value: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(hint) or hint
    return isinstance(value, origin)


def _parse(text: str) -> Any:
    """An override value as TOML would read it (numbers, booleans, quoted or bare strings)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
