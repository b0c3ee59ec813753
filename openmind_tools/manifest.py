"""Select volumes from a manifest (modality, quality, dataset, anatomy mask, a pandas expression, a preset).

A query's result is itself a manifest: the same columns, the source's metadata (settings, hash, formats),
plus the query text, row count, source and `store_root` (the folder its relative store paths resolve
against), so the loader and trainer accept a file, a DataFrame or a query wherever they take a manifest
(`resolve_manifest`). Presets are TOML files in `manifests/`. Quality follows the OpenMind CSV:
image_quality_score 1 (best) to 5 (worst), so "min quality 3" keeps scores <= 3 and drops unscored rows.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import tomllib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from operator import index, methodcaller
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
import pyarrow as pa

from openmind_tools.errors import ConfigError
from openmind_tools.flags import flagged_ids
from openmind_tools.manifest_io import read_table, write_table
from openmind_tools.modalities import canonical_modalities

# manifests/ of a checkout (the editable install setup.sh makes), or the copy a wheel ships as openmind_tools/presets
_CHECKOUT_PRESETS = Path(__file__).resolve().parents[1] / "manifests"
PRESET_DIR = _CHECKOUT_PRESETS if _CHECKOUT_PRESETS.is_dir() else Path(__file__).resolve().parent / "presets"
QUALITY = "image_quality_score"
META = "openmind"  # key of the project metadata in DataFrame.attrs (pandas keeps attrs through filtering)
FORMATS = ("parquet", "csv", "jsonl")
REQUIRED = ("id", "dataset", "modality")
_SIZES = ("source_nbytes", "zarr_nbytes", "wds_nbytes")


class EmptyResultWarning(UserWarning):
    """A query selected no rows: usually a too strict bound or a filter that contradicts a preset."""


@dataclass(frozen=True)
class Filters:
    """One selection: a row is kept when every filter that is set holds. Strings are coerced and checked here."""

    preset: str | None = None  # a name in manifests/ or a path to a .toml file; ANDed with the fields below
    modality: tuple[str, ...] = ()  # any of these; CSV spelling or an alias (inplainT1); "T1w,FLAIR" accepted
    dataset: tuple[str, ...] = ()  # any of these
    min_quality: int | None = None  # image_quality_score <= this (1 best, 5 worst); unscored rows are dropped
    has_anatomy_mask: bool | None = None
    where: str | None = None  # pandas expression over the columns, e.g. "age >= 18 and sex == 'F'"
    exclude: tuple[str, ...] = ()  # flags tables (parquet: id, reason; openmind-manifest report): ids named go
    limit: int | None = None  # the first N rows (manifest order, by id) that pass the rest

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                object.__setattr__(self, f.name, _coerce(f.name, str(f.type), value))
        if self.min_quality is not None and not 1 <= self.min_quality <= 5:
            raise ConfigError(f"min_quality: expected 1 (best) to 5 (worst), got {self.min_quality}")
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"limit: expected a number of rows >= 0, got {self.limit}")
        # absolute, so that the query text a written manifest records selects the same rows from any folder
        object.__setattr__(self, "exclude", tuple(p if "://" in p else str(Path(p).resolve()) for p in self.exclude))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Filters:
        """Filters from keyword arguments, a dict or a parsed query string; None values are unset."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ConfigError(f"unknown filter {unknown[0]!r}; expected one of {', '.join(names)}")
        return cls(**{k: v for k, v in raw.items() if v is not None})

    def text(self) -> str:
        """The selection in the form `resolve_manifest` parses: '[preset] [key=value ...]' ('' selects all)."""
        parts = [_quote(self.preset)] if self.preset else []
        for f in fields(self)[1:]:
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = ",".join(value) or None
            if value is not None:
                parts.append(f"{f.name}={_quote(str(value).lower() if isinstance(value, bool) else str(value))}")
        return " ".join(parts)


# A preset is a selection: it may not name another preset, cut it short with a limit, nor name flags files (a
# relative path in a preset would depend on the folder it is used from).
_PRESET_KEYS = ("description", *(f.name for f in fields(Filters) if f.name not in ("preset", "limit", "exclude")))


@dataclass(frozen=True)
class Stats:
    """What a manifest holds: volumes and bytes per modality and per dataset, quality and age distributions."""

    volumes: int
    by_modality: pd.DataFrame  # index modality; columns volumes and the *_nbytes sums present
    by_dataset: pd.DataFrame  # index dataset; same columns
    quality: pd.Series  # volumes per image_quality_score, then "none" (unscored)
    ages: pd.Series  # the ages recorded (years), for a histogram

    def __str__(self) -> str:
        def show(table: pd.DataFrame) -> str:
            table = table.rename(columns=lambda c: c.removesuffix("_nbytes"))
            return table.to_string(formatters={c: _bytes for c in table.columns if c != "volumes"})

        sizes = [c for c in self.by_modality.columns if c != "volumes"]
        totals = "".join(f", {c.removesuffix('_nbytes')} {_bytes(self.by_modality[c].sum())}" for c in sizes)
        lines = [
            f"{self.volumes} volumes, {len(self.by_modality)} modalities, {len(self.by_dataset)} datasets{totals}",
            "",
            show(self.by_modality),
            "",
            show(self.by_dataset.head(20)),
        ]
        if len(self.by_dataset) > 20:
            lines.append(f"... and {len(self.by_dataset) - 20} more datasets")
        scores = "  ".join(f"{k}: {v}" for k, v in self.quality.items())
        lines += ["", f"{QUALITY} (1 best .. 5 worst): {scores}"]
        if len(self.ages):
            lines.append(
                f"age: {len(self.ages)} volumes with an age, {self.ages.min():g}-{self.ages.max():g} years "
                f"(median {self.ages.median():g})"
            )
        return "\n".join(lines)


def load_manifest(source: str | Path, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """The rows of a manifest file (local path or fsspec URL), with its metadata in `df.attrs["openmind"]`.

    The metadata gains `store_root` (the manifest's own folder, unless a query already recorded where its
    stores live), so the DataFrame can be passed on and its relative store paths still resolve.
    """
    source = str(source)
    try:
        df, meta = read_table(source, storage_options)
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such manifest") from None
    except pa.ArrowInvalid as e:
        raise ConfigError(f"{source}: not a parquet manifest ({e})") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ConfigError(f"{source}: not a manifest, column {missing[0]!r} missing (columns: {', '.join(df)})")
    repeated = df["id"][df["id"].duplicated()]
    if len(repeated):
        raise ConfigError(f"{source}: id {repeated.iloc[0]!r} appears more than once")
    meta.setdefault("store_root", _folder(source))
    df.attrs[META] = meta
    return df


def query(df: pd.DataFrame, **filters: Any) -> pd.DataFrame:
    """Rows of `df` passing `filters` (the fields of `Filters`), in manifest order; warns when none do.

    The result's attrs carry the input's metadata plus "query" (the text) and "rows".
    """
    selection = Filters.from_dict(filters)
    mask = _mask(df, selection)
    if selection.preset:
        mask &= _mask(df, load_preset(selection.preset))
    out = df[mask.to_numpy()].reset_index(drop=True)
    if selection.limit is not None:
        out = out.head(selection.limit)
    base = {k: v for k, v in df.attrs.get(META, {}).items() if k not in ("query", "rows", "source")}
    out.attrs[META] = {**base, "query": selection.text(), "rows": len(out)}
    if out.empty:
        warnings.warn(
            f"query {selection.text()!r} selected none of {len(df)} volumes", EmptyResultWarning, stacklevel=2
        )
    return out


def resolve_manifest(
    source: str | Path | pd.DataFrame | Mapping[str, Any],
    storage_options: dict[str, Any] | None = None,
    **filters: Any,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Rows and metadata of whatever names a manifest, so every consumer takes a file or a query alike.

    `source` is a manifest path or URL; a DataFrame (from `load_manifest`/`query`); a query string
    "[preset] [key=value ...] of MANIFEST" (e.g. "mae8 min_quality=3 of out/manifest.parquet"; a query's
    meta["query"] + " of " + meta["source"] reproduces it); or a dict {"manifest": path, <filter>: ...}.
    `filters` add to those of the string or dict. Without any filter the file's own metadata comes back;
    with filters it also holds the new "query", "rows" and (read from a file) "source". "store_root" is
    always set, except for a DataFrame built by hand.
    """
    if isinstance(source, pd.DataFrame):
        path, df = None, source
    else:
        path, filters = _parse_source(source, filters)
        df = load_manifest(path, storage_options)
    if all(v is None for v in filters.values()):
        return df, df.attrs.get(META, {})
    out = query(df, **filters)
    if path:
        out.attrs[META]["source"] = path if "://" in path else str(Path(path).resolve())
    return out, out.attrs[META]


def write_manifest(
    df: pd.DataFrame, path: str | Path | TextIO, meta: dict[str, Any], format: str | None = None
) -> None:
    """Write rows as parquet (a manifest: columns + `meta`), CSV or JSON lines; `format` defaults by suffix.

    CSV cells holding arrays (shape, affine, ...) are written as JSON text; CSV and JSON lines carry no
    metadata, so only parquet output can stand in for a manifest.
    """
    format = format or output_format(path)
    if format == "parquet":
        if not isinstance(path, str | Path):
            raise ConfigError("parquet output needs a file name (-o FILE.parquet)")
        write_table(df, path, meta)
    elif format == "csv":
        nested = {
            c: [json.dumps(v, default=methodcaller("tolist")) if isinstance(v, np.ndarray | list) else v for v in df[c]]
            for c in df.columns
            if pd.api.types.is_object_dtype(df[c])
        }
        df.assign(**nested).to_csv(path, index=False)
    elif format == "jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        raise ConfigError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")


def output_format(path: str | Path | TextIO) -> str:
    """The format an output file name implies (.parquet, .csv, .jsonl/.json)."""
    suffix = Path(path).suffix.lower() if isinstance(path, str | Path) else ""
    found = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}.get(suffix)
    if found is None:
        raise ConfigError(f"cannot tell the format of {path}: use a .parquet, .csv or .jsonl name, or --format")
    return found


def list_presets() -> dict[str, str]:
    """Preset name -> description, for every manifests/*.toml."""
    return {p.stem: _read_preset(p).get("description", "") for p in sorted(PRESET_DIR.glob("*.toml"))}


def load_preset(name: str) -> Filters:
    """The filters of a preset: a name in manifests/ (e.g. "mae8") or a path to a .toml file."""
    path = Path(name) if name.endswith(".toml") else PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        available = ", ".join(list_presets()) or f"none in {PRESET_DIR}"
        raise ConfigError(f"unknown preset {name!r}; available: {available}")
    raw = _read_preset(path)
    raw.pop("description", None)
    try:
        return Filters(**raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def stats(df: pd.DataFrame) -> Stats:
    """Counts and bytes per modality and dataset, the quality histogram and the recorded ages."""
    sizes = [c for c in _SIZES if c in df]

    def table(by: str) -> pd.DataFrame:
        groups = df.groupby(by, dropna=False)
        out = groups[sizes].sum()
        out.insert(0, "volumes", groups.size())
        return out.sort_values(["volumes", *sizes], ascending=False)

    scores = df[QUALITY] if QUALITY in df else pd.Series(np.nan, index=df.index)
    quality = scores.value_counts()
    quality = quality.reindex(sorted({1, 2, 3, 4, 5} | set(quality.index)), fill_value=0)
    quality.index = [f"{v:g}" for v in quality.index]
    quality["none"] = scores.isna().sum()
    ages = pd.to_numeric(df["age"], errors="coerce").dropna() if "age" in df else pd.Series(dtype=float)
    return Stats(len(df), table("modality"), table("dataset"), quality, ages)


def balance_groups(df: pd.DataFrame, columns: str | tuple[str, ...] | list[str]) -> np.ndarray:
    """Each row's group (int, 0..G-1): the rows that share its values in `columns` (a missing value is a value)."""
    columns = [columns] if isinstance(columns, str) else list(columns)
    absent = [c for c in columns if c not in df]
    if not columns or absent:
        raise ConfigError(f"balance_by: no manifest column(s) {absent or columns}; the manifest has "
                          f"{sorted(df.columns)}")  # fmt: skip
    return df.groupby(columns, dropna=False, sort=True).ngroup().to_numpy()


def balance_weights(df: pd.DataFrame, columns: str | tuple[str, ...] | list[str]) -> np.ndarray:
    """A draw probability per row, inversely proportional to its group's size: every group is drawn equally often.

    OpenMind's 800 datasets differ by orders of magnitude in size, so uniform draws mostly see the largest few.
    """
    groups = balance_groups(df, columns)
    sizes = np.bincount(groups)
    return 1.0 / (sizes[groups] * len(sizes))


def balance_table(df: pd.DataFrame, columns: str | tuple[str, ...] | list[str]) -> pd.DataFrame:
    """Per group of `columns`: volumes, its share of uniform draws, its share of balanced draws, and how often
    a balanced epoch (as many draws as volumes, with replacement) reads each of its volumes on average."""
    weights = balance_weights(df, columns)
    columns = [columns] if isinstance(columns, str) else list(columns)
    table = (df.assign(_weight=weights).groupby(columns, dropna=False, sort=True)
             .agg(volumes=("_weight", "size"), balanced=("_weight", "sum")))  # fmt: skip
    table.insert(1, "uniform", table["volumes"] / len(df))
    table["reads_per_volume"] = table["balanced"] * len(df) / table["volumes"]
    return table.sort_values(["volumes"], ascending=False, kind="stable")


def plot_stats(summary: Stats, path: str | Path, title: str = "manifest") -> None:
    """A 2x2 PNG: volumes per modality, per dataset (the 20 largest), quality distribution, age histogram."""
    from matplotlib import colormaps  # only `stats --plot` pays for matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(14, 10), layout="constrained")
    (mod_ax, ds_ax), (q_ax, age_ax) = fig.subplots(2, 2)
    datasets = summary.by_dataset["volumes"]
    rest = f" (20 largest of {len(datasets)})" if len(datasets) > 20 else ""
    for ax, counts, what in ((mod_ax, summary.by_modality["volumes"], "modality"), (ds_ax, datasets[:20], "dataset")):
        bars = ax.barh([str(k) for k in counts.index][::-1], counts.to_numpy()[::-1], color="tab:blue")
        ax.bar_label(bars, fmt="{:,.0f}", padding=3)
        ax.set(title=f"volumes per {what}{rest if what == 'dataset' else ''}", xlabel="volumes")
        ax.margins(x=0.12)
    scores = pd.to_numeric(summary.quality.index.to_series(), errors="coerce")
    colors = [colormaps["RdYlGn_r"]((s - 1) / 4) if s == s else "0.6" for s in scores]  # grey: unscored
    bars = q_ax.bar(summary.quality.index, summary.quality.to_numpy(), color=colors, edgecolor="0.3")
    q_ax.bar_label(bars, fmt="{:,.0f}", padding=3)
    q_ax.set(title=f"{QUALITY} (1 best, 5 worst)", xlabel="score", ylabel="volumes")
    q_ax.margins(y=0.12)
    if len(summary.ages):
        age_ax.hist(summary.ages, bins=np.arange(0, summary.ages.max() + 5, 5), color="tab:green", edgecolor="white")
        age_ax.set(xlabel="age (years, 5-year bins)", ylabel="volumes")
    else:
        age_ax.text(0.5, 0.5, "no ages recorded", ha="center", va="center", transform=age_ax.transAxes)
    age_ax.set_title(f"age ({len(summary.ages)} of {summary.volumes} volumes have one)")
    for ax, axis in ((mod_ax, "x"), (ds_ax, "x"), (q_ax, "y"), (age_ax, "y")):
        getattr(ax, f"{axis}axis").set_major_locator(MaxNLocator(integer=True))
    stored = sum(summary.by_modality[c].sum() for c in ("zarr_nbytes", "wds_nbytes") if c in summary.by_modality)
    fig.suptitle(
        f"{title}: {summary.volumes} volumes, {len(summary.by_modality)} modalities, "
        f"{len(summary.by_dataset)} datasets, {_bytes(stored)} stored",
        fontsize=14,
    )
    fig.savefig(path, dpi=110)


def _mask(df: pd.DataFrame, f: Filters) -> pd.Series:
    mask = pd.Series(True, index=df.index)
    if f.modality:
        modality = _column(df, "modality", "modality")
        mask &= modality.isin(canonical_modalities(f.modality, present=sorted(modality.dropna().unique())))
    if f.dataset:
        present = _column(df, "dataset", "dataset").unique()
        absent = sorted(set(f.dataset) - set(present))
        if absent:
            listed = ", ".join(sorted(present)[:20]) + (", ..." if len(present) > 20 else "")
            raise ConfigError(f"dataset {absent[0]!r} is not in this manifest; its {len(present)} datasets: {listed}")
        mask &= df["dataset"].isin(f.dataset)
    if f.min_quality is not None:
        mask &= _column(df, QUALITY, "min_quality") <= f.min_quality  # NaN compares False: unscored rows go
    if f.has_anatomy_mask is not None:
        mask &= _column(df, "has_anatomy_mask", "has_anatomy_mask") == f.has_anatomy_mask
    if f.where:
        mask &= _where(df, f.where)
    if f.exclude:
        mask &= ~df["id"].isin(flagged_ids(f.exclude))
    return mask


def _column(df: pd.DataFrame, column: str, option: str) -> pd.Series:
    if column not in df:
        raise ConfigError(f"{option} needs column {column!r}, which this manifest lacks")
    return df[column]


_WHERE_CHARS = 4096  # longest --where condition read (a real one is under 200)
# Read-only Series methods a condition may call (a preset or recipe is data: it must not write files)
_CALLS = frozenset(
    {"isin", "between", "isna", "notna", "contains", "startswith", "endswith", "match", "lower", "upper"}
)


def _where(df: pd.DataFrame, expr: str) -> pd.Series:
    """Evaluate with pandas' own expression parser (python engine), which sees the columns and nothing else.

    Attribute or name lookups starting with "_" are refused first (dunders would reach Python internals),
    and so is any call but a few read-only Series methods (`id.to_csv(...)` would write a file).
    """
    columns = f"columns: {', '.join(df.columns)}"
    if len(expr) > _WHERE_CHARS:  # the parsers recurse per nesting level: 20,000 `not`s exhaust their memory
        raise ConfigError(f"where: a condition of {len(expr)} characters; at most {_WHERE_CHARS} are read")
    try:
        tree = ast.parse(re.sub(r"`[^`]*`", "column", expr), mode="eval")
    except SyntaxError as e:
        raise ConfigError(f"where {expr!r}: invalid expression ({e.msg}); {columns}") from None
    except (MemoryError, RecursionError):
        raise ConfigError(f"where: the condition nests too deeply ({len(expr)} characters)") from None
    for node in ast.walk(tree):
        name = getattr(node, "attr", None) or getattr(node, "id", "")
        if name.startswith("_"):
            raise ConfigError(f"where {expr!r}: names starting with '_' are not allowed; {columns}")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Attribute) and node.func.attr in _CALLS):
            raise ConfigError(f"where {expr!r}: only the calls {sorted(_CALLS)} are allowed; {columns}")
    try:
        result = df.eval(expr, engine="python", local_dict={}, global_dict={})
    except Exception as e:  # pandas raises NameError, KeyError, TypeError, ValueError... for a bad expression
        raise ConfigError(f"where {expr!r}: {type(e).__name__}: {e}; {columns}") from None
    if not (isinstance(result, pd.Series) and pd.api.types.is_bool_dtype(result)):
        got = getattr(result, "dtype", type(result).__name__)
        raise ConfigError(f"where {expr!r}: expected a true/false condition per row, got {got}; {columns}")
    return result.fillna(False).astype(bool)


def _parse_source(source: str | Path | Mapping[str, Any], filters: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(manifest path, filters) of a path, a query string '... of PATH' or a dict with a 'manifest' key."""
    if isinstance(source, Mapping):
        given = dict(source)
        if "manifest" not in given:
            raise ConfigError(f"manifest query {source!r}: no 'manifest' key naming the manifest file")
        path = str(given.pop("manifest"))
    elif isinstance(source, str) and " of " in f" {source}" and not os.path.exists(source):
        try:
            tokens = shlex.split(source)
        except ValueError as e:
            raise ConfigError(f"manifest query {source!r}: {e}") from None
        if len(tokens) < 2 or tokens[-2] != "of":
            raise ConfigError(f"manifest query {source!r}: expected '[preset] [key=value ...] of MANIFEST'")
        path, given = tokens[-1], {}
        for token in tokens[:-2]:
            key, eq, value = token.partition("=")
            key, value = (key, value) if eq else ("preset", token)
            if key in given:
                raise ConfigError(f"manifest query {source!r}: {key!r} given twice")
            given[key] = value
    else:
        return str(source), filters
    twice = sorted(set(given) & {k for k, v in filters.items() if v is not None})
    if twice:
        raise ConfigError(f"{twice[0]!r} given both in {source!r} and as an argument")
    return path, {**given, **filters}


def _read_preset(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    unknown = sorted(set(raw) - set(_PRESET_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; a preset may set {', '.join(_PRESET_KEYS)}")
    return raw


def _coerce(name: str, kind: str, value: Any) -> Any:
    """A filter value from Python or from text ("T1w,FLAIR", "3", "true"), or an error naming the filter."""
    try:
        if kind.startswith("tuple"):
            items = value.split(",") if isinstance(value, str) else value
            return tuple(s for s in (str(v).strip() for v in items) if s)
        if kind.startswith("bool"):
            text = str(value).lower()
            if isinstance(value, bool | np.bool_) or text in ("true", "false"):
                return text == "true"
        elif kind.startswith("int"):
            if not isinstance(value, bool):
                return int(value) if isinstance(value, str) else index(value)
        elif isinstance(value, str):
            return value
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{name}: expected {kind.removesuffix(' | None')}, got {value!r}")


def _quote(text: str) -> str:
    """Quote for shlex.split; double quotes keep a where expression's 'strings' readable."""
    if re.fullmatch(r"[\w.,/:+@%-]+", text):
        return text
    return f'"{text}"' if '"' not in text and "\\" not in text else shlex.quote(text)


def _folder(source: str) -> str:
    return source.rsplit("/", 1)[0] if "://" in source else str(Path(source).resolve().parent)


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
