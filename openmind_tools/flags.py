"""Which volumes look wrong: robust per-modality outliers of manifest columns, and the flags table queries exclude.

A metric (head extent, source slice thickness, contrast, mask fractions, compressed bytes per voxel) is an outlier
when it lies more than `THRESHOLD` robust standard deviations (1.4826 x MAD) from its modality's median: the
modified z-score of Iglewicz & Hoaglin (1993), whose 3.5 is the usual cut. A modality with fewer than
`MIN_GROUP` volumes is compared with the whole manifest. A flags table is parquet with columns `id, reason`, one
row per (volume, reason); a reason reads `<check>: <detail>` (`high anatomy fraction: 0.93, ...`), and the check,
before the first ": ", is what the report filters by. Hand-written tables of the same two columns work too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from openmind_tools.errors import ConfigError
from openmind_tools.manifest_io import read_table, write_table

COLUMNS = ("id", "reason")
THRESHOLD = 3.5  # robust standard deviations (Iglewicz & Hoaglin's modified z-score cut)
MIN_GROUP = 20  # volumes a modality needs for a median/MAD of its own; fewer: the whole manifest is the reference
_MIN_VALUES = 5  # fewer values (say, masks in a group) give no median/MAD worth judging by
_RELATIVE_FLOOR = 0.01  # the robust scale is at least 1% of the median: 180 identical shapes and a 181 are no outlier


@dataclass(frozen=True)
class Metric:
    """One number per volume from manifest columns, NaN where it does not apply (no mask, no such column)."""

    name: str  # words of the check: "extent I-S" gives "low extent I-S: ..."
    unit: str
    high_only: bool  # a finer source spacing is no problem; a coarser one is
    values: Callable[[pd.DataFrame], np.ndarray]


@dataclass(frozen=True)
class Reference:
    """A metric's median and limits in one group (a modality, or "all modalities" for the small ones)."""

    metric: str
    group: str
    volumes: int
    median: float
    low: float | None  # None: no lower limit (high_only)
    high: float


def _axis(column: str, axis: int) -> Callable[[pd.DataFrame], np.ndarray]:
    return lambda df: _triples(df, column)[:, axis] * _triples(df, "spacing")[:, axis]


def _masked(fraction: str, has: str) -> Callable[[pd.DataFrame], np.ndarray]:
    """A mask's fraction only where there is a mask: without one it is 0 by definition, not an outlier."""
    return lambda df: np.where(_column(df, has, np.nan) == 1, _column(df, fraction, np.nan), np.nan)


def _contrast(df: pd.DataFrame) -> np.ndarray:
    mean = np.abs(_column(df, "mean", np.nan))
    return np.divide(_column(df, "std", np.nan), mean, out=np.full(len(df), np.nan), where=mean > 0)


def _bytes_per_voxel(df: pd.DataFrame) -> np.ndarray:
    return _column(df, "zarr_nbytes", np.nan) / np.prod(_triples(df, "shape"), axis=1)


METRICS = (
    Metric("extent R-L", "mm", False, _axis("shape", 0)),
    Metric("extent A-P", "mm", False, _axis("shape", 1)),
    Metric("extent I-S", "mm", False, _axis("shape", 2)),
    Metric("coarsest source spacing", "mm", True, lambda df: np.nanmax(_triples(df, "original_spacing"), axis=1)),
    Metric("contrast std/mean", "", False, _contrast),
    Metric("anatomy fraction", "", False, _masked("anatomy_fraction", "has_anatomy_mask")),
    Metric("deface fraction", "", False, _masked("deface_fraction", "has_deface_mask")),
    Metric("Zarr bytes per voxel", "B", False, _bytes_per_voxel),  # noise, empty or constant volumes stand out
)


def metric_table(df: pd.DataFrame) -> pd.DataFrame:
    """Each metric's value per row of `df` (same index), NaN where it does not apply."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame({m.name: m.values(df) for m in METRICS}, index=df.index)


@dataclass(frozen=True)
class Outliers:
    flags: pd.DataFrame  # id, reason
    references: list[Reference]  # each modality's, and the whole manifest's ("all modalities")
    values: pd.DataFrame  # metric_table of the rows judged


def outlier_flags(df: pd.DataFrame, threshold: float = THRESHOLD) -> Outliers:
    """The flags (id, reason) of the rows of `df` whose metrics are outliers, the references they were judged by
    (each modality's, and the whole manifest's, "all modalities", which judges the modalities too small for one)
    and the metrics' values."""
    if not threshold > 0 or threshold == float("inf"):
        raise ConfigError(f"threshold: expected a positive number of robust standard deviations, got {threshold}")
    values = metric_table(df)
    modality = df["modality"].astype("string").fillna("(none)").to_numpy(dtype=object)
    names, counts = np.unique(modality, return_counts=True)
    small = set(names[counts < MIN_GROUP])
    groups = [(str(n), modality == n) for n in names if n not in small]
    groups.append(("all modalities", np.isin(modality, list(small))))  # its reference is listed even if it judges none
    rows: list[tuple[int, str]] = []
    references = []
    for metric in METRICS:
        column = values[metric.name].to_numpy(dtype=float)
        whole = _reference(metric, "all modalities", column, threshold)
        for group, members in groups:
            reference = whole if group == "all modalities" else _reference(metric, group, column[members], threshold)
            if reference is None:
                continue
            references.append(reference)
            low = -np.inf if reference.low is None else reference.low
            with np.errstate(invalid="ignore"):  # NaN: the metric does not apply, never an outlier
                outside = members & ((column > reference.high) | (column < low))
            rows += [(i, _reason(metric, reference, column[i])) for i in np.flatnonzero(outside)]
    ids = df["id"].to_numpy()
    flags = pd.DataFrame([(ids[i], reason) for i, reason in sorted(rows)], columns=list(COLUMNS))
    return Outliers(flags, references, values)


def check_of(reason: str) -> str:
    """The check a reason names: the words before its first ': ' ("unreadable", "high anatomy fraction")."""
    return reason.split(": ", 1)[0]


def write_flags(flags: pd.DataFrame, path: str | Path, meta: dict[str, Any]) -> None:
    write_table(flags.loc[:, list(COLUMNS)].sort_values(list(COLUMNS), ignore_index=True), path, meta)


def read_flags(path: str | Path) -> pd.DataFrame:
    """A flags table (parquet with columns id and reason), or a ConfigError naming the file and what is wrong."""
    try:
        flags, _ = read_table(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such flags file") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"{path}: not a parquet flags table ({e})") from None
    missing = [c for c in COLUMNS if c not in flags]
    if missing:
        raise ConfigError(f"{path}: a flags table needs columns {list(COLUMNS)}; {missing[0]!r} is missing "
                          f"(columns: {', '.join(flags.columns)})")  # fmt: skip
    return flags


def flagged_ids(paths: Iterable[str | Path]) -> set[str]:
    """Every id that any of the flags tables names."""
    return {str(i) for path in paths for i in read_flags(path)["id"].dropna()}


def _reference(metric: Metric, group: str, column: np.ndarray, threshold: float) -> Reference | None:
    present = column[np.isfinite(column)]
    if len(present) < _MIN_VALUES:
        return None
    median = float(np.median(present))
    scale = max(1.4826 * float(np.median(np.abs(present - median))), _RELATIVE_FLOOR * abs(median), 1e-12)
    low = None if metric.high_only else median - threshold * scale
    return Reference(metric.name, group, len(present), median, low, median + threshold * scale)


def _reason(metric: Metric, reference: Reference, value: float) -> str:
    side, limit = ("high", reference.high) if value > reference.high else ("low", reference.low)
    unit = f" {metric.unit}" if metric.unit else ""
    return (f"{side} {metric.name}: {value:.3g}{unit}, {reference.group} median {reference.median:.3g}{unit}, "
            f"limit {limit:.3g}{unit}")  # fmt: skip


def _column(df: pd.DataFrame, name: str, missing: float) -> np.ndarray:
    if name not in df:
        return np.full(len(df), missing)
    return pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def _triples(df: pd.DataFrame, name: str) -> np.ndarray:
    """A column of 3-vectors (shape, spacing) as an (N, 3) float array, NaN rows where a cell is not 3 numbers."""
    if name not in df:
        return np.full((len(df), 3), np.nan)
    try:  # every cell 3 numbers, as the converter writes them: one stack
        out = np.stack(df[name].to_numpy()).astype(float)
        if out.shape == (len(df), 3):
            return out
    except (TypeError, ValueError):
        pass
    out = np.full((len(df), 3), np.nan)
    for i, cell in enumerate(df[name]):
        try:
            vector = np.asarray(cell, dtype=float)
        except (TypeError, ValueError):
            continue
        if vector.shape == (3,):
            out[i] = vector
    return out
