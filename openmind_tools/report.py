"""A quality-control report of a manifest: one static HTML page a person opens from disk, and flags.parquet.

Curating 114k volumes from hundreds of studies means looking at them (MRIQC-style visual QC): the page shows counts
by dataset x modality, storage per format, the conversion and its errors grouped by reason, the distributions of
the metrics `flags` judges with their per-modality limits, and a paged grid of every volume's thumbnail
(`thumbnails`), filterable by dataset, modality and flag. The folder holds `index.html` (the page, its CSS and
JS inlined), `data.js` (the tables, columnar, loaded by a <script> tag since file:// forbids fetch), `sprites/`
and `flags.parquet` (outliers plus volumes that could not be read), which `openmind-manifest query --exclude`
and a recipe's `exclude` leave out. Nothing is fetched at view time: it works offline and from file://.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from openmind_tools import __version__
from openmind_tools.errors import ConfigError
from openmind_tools.files import atomic_write_text, machine_error
from openmind_tools.flags import COLUMNS, METRICS, THRESHOLD, Outliers, Reference, check_of, outlier_flags, write_flags
from openmind_tools.manifest import resolve_manifest
from openmind_tools.manifest_io import ERRORS, read_table
from openmind_tools.thumbnails import SPRITES, Sheet, ThumbnailSettings, pending, plan_sheets, render_sheets

PAGE, DATA, FLAGS = "index.html", "data.js", "flags.parquet"
_BINS = 30
_SIZES = ("source_nbytes", "zarr_nbytes", "wds_nbytes")
_EXAMPLES = 5  # ids shown per error group


@dataclass(frozen=True)
class ReportSummary:
    volumes: int
    flagged: int  # volumes with at least one flag
    unreadable: int
    sheets_made: int
    sheets_skipped: int  # finished by an earlier run
    report_bytes: int  # page, data, sprites and flags
    seconds: float
    out: Path
    dry_run: bool = False

    def __str__(self) -> str:
        if self.dry_run:
            return (f"{self.volumes} volumes, {self.flagged} flagged as outliers; {self.sheets_made} thumbnail sheets "
                    f"to make, {self.sheets_skipped} already made in {self.out} (nothing written)")  # fmt: skip
        per_volume = self.report_bytes / max(self.volumes, 1)
        return (f"{self.volumes} volumes, {self.flagged} flagged ({self.unreadable} unreadable); "
                f"{self.sheets_made} thumbnail sheets made, {self.sheets_skipped} already done; report "
                f"{self.report_bytes / 1e6:.1f} MB ({per_volume / 1e3:.1f} kB per volume); {self.seconds:.1f} s\n"
                f"page: {self.out / PAGE}\nflags: {self.out / FLAGS}")  # fmt: skip


def build_report(
    manifest: Any,
    out: str | Path,
    *,
    store: str | None = None,
    threshold: float = THRESHOLD,
    settings: ThumbnailSettings = ThumbnailSettings(),
    limit: int | None = None,
    client: Any = None,
    progress: bool = True,
    retry_errors: bool = False,
    dry_run: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> ReportSummary:
    """Write the report of `manifest` (anything `resolve_manifest` takes) into the folder `out`.

    `store` is the store the thumbnails are read from (default: zarr if the manifest has it, else wds); `client` a
    dask Client (None draws here). A rerun resumes: finished thumbnail sheets are kept (`thumbnails`).
    """
    start = time.perf_counter()
    rows, meta = resolve_manifest(manifest, storage_options, limit=limit)
    source = str(manifest) if isinstance(manifest, str | Path) else meta.get("source", "a manifest DataFrame")
    if rows.empty:
        raise ConfigError(f"{source}: selects no volume, nothing to report")
    store = _store(rows, store)
    outliers = outlier_flags(rows, threshold)
    sheets = plan_sheets(rows, settings)
    out = Path(out)
    if dry_run:
        todo, _ = pending(sheets, out, retry_errors)
        return ReportSummary(len(rows), outliers.flags["id"].nunique(), 0, len(todo), len(sheets) - len(todo), 0,
                             time.perf_counter() - start, out, dry_run=True)  # fmt: skip
    root = meta.get("store_root")
    if root is None:
        raise ConfigError("the manifest records no store_root: pass a manifest file or a query of one")
    try:
        out.mkdir(parents=True, exist_ok=True)
        rendered = render_sheets(rows, sheets, out, store=store, root=root, settings=settings, client=client,
                                 progress=progress, storage_options=storage_options,
                                 retry_errors=retry_errors)  # fmt: skip
        unreadable = [(i, f"unreadable: {reason}") for i, reason in sorted(rendered.unreadable.items())]
        flags = pd.concat([outliers.flags, pd.DataFrame(unreadable, columns=list(COLUMNS))], ignore_index=True)
        write_flags(flags, out / FLAGS, {"threshold": threshold, "source": source, "store": store})
        data = _page_data(rows, meta, flags, outliers, sheets, settings, _errors(root, storage_options), source, store,
                          threshold)  # fmt: skip
        page = _page(f"QC report: {source}")
        data["sizes"] = {"sprites": _folder_bytes(out / SPRITES), "flags": (out / FLAGS).stat().st_size,
                         "page": len(page.encode())}  # fmt: skip
        data["sizes"]["data"] = len(_script(data).encode())  # a few bytes short: the number itself is not counted
        atomic_write_text(out / DATA, _script(data))
        atomic_write_text(out / PAGE, page)
    except OSError as e:  # the writes of this process, or of a worker (a full disk, an I/O error)
        if (machine := machine_error(e, f"writing the report into {out}")) is None:
            raise
        raise machine from e
    total = sum(p.stat().st_size for p in (out / PAGE, out / DATA, out / FLAGS)) + data["sizes"]["sprites"]
    return ReportSummary(len(rows), flags["id"].nunique(), len(rendered.unreadable), rendered.made, rendered.skipped,
                         total, time.perf_counter() - start, out)  # fmt: skip


def _script(data: dict[str, Any]) -> str:
    """data.js: JSON.parse of one string literal, which V8 parses faster than the same object as a JS literal."""
    return "window.REPORT = JSON.parse(" + json.dumps(json.dumps(data, separators=(",", ":"), allow_nan=False)) + ");\n"


def _store(rows: pd.DataFrame, store: str | None) -> str:
    from openmind_tools.loader import STORES

    present = [name for name, module in STORES.items() if module.MANIFEST_COLUMNS[0] in rows]
    if store is None and present:
        return present[0]
    if store not in present:
        raise ConfigError(f"store: expected one of the stores this manifest has ({', '.join(present) or 'none'}), "
                          f"got {store!r}")  # fmt: skip
    return store


def _page_data(rows: pd.DataFrame, meta: dict[str, Any], flags: pd.DataFrame, outliers: Outliers,
               sheets: list[Sheet], settings: ThumbnailSettings, errors: pd.DataFrame | None, source: Any,
               store: str, threshold: float) -> dict[str, Any]:  # fmt: skip
    """Everything the page shows, columnar (one list per column, categories as codes): 114k rows in a few MB."""
    order = [volume_id for sheet in sheets for volume_id in sheet.ids]  # the tiles' order, sheet by sheet
    at = pd.Index(rows["id"]).get_indexer(order)
    rows, values = (table.take(at).reset_index(drop=True) for table in (rows, outliers.values))
    rows = rows.assign(**{c: rows[c].fillna("(none)").astype(str) for c in ("dataset", "modality")})
    position = {volume_id: i for i, volume_id in enumerate(order)}
    datasets = rows["dataset"].value_counts().index.tolist()  # largest first
    modalities = rows["modality"].value_counts().index.tolist()
    checks = sorted({check_of(r) for r in flags["reason"]}, key=lambda c: (c != "unreadable", c))
    counts = rows.groupby(["dataset", "modality"]).size()
    sizes = [c for c in _SIZES if c in rows]
    storage = rows.groupby("modality")[sizes].sum() if sizes else pd.DataFrame(index=modalities)
    storage.insert(0, "volumes", rows.groupby("modality").size())
    return {
        "title": str(source),
        "generated": time.strftime("%Y-%m-%d %H:%M"),
        "version": __version__,
        "store": store,
        "volumes": {
            "id": rows["id"].tolist(),
            "dataset": rows["dataset"].map({d: i for i, d in enumerate(datasets)}).tolist(),
            "modality": rows["modality"].map({m: i for i, m in enumerate(modalities)}).tolist(),
            "sheet": [k for k, sheet in enumerate(sheets) for _ in sheet.ids],
            "slot": [slot for sheet in sheets for slot in range(len(sheet.ids))],
        },
        "datasets": datasets,
        "modalities": modalities,
        "sheets": [f"{SPRITES}/{sheet.name}" for sheet in sheets],
        "tile": {"width": settings.size[0], "height": settings.size[1], "columns": settings.columns},
        "checks": checks,
        "flags": [
            [position[i], checks.index(check_of(r)), r] for i, r in zip(flags["id"], flags["reason"], strict=True)
        ],
        "counts": [[datasets.index(d), modalities.index(m), int(n)] for (d, m), n in counts.items()],
        "storage": {
            "columns": ["volumes", *[c.removesuffix("_nbytes") for c in sizes]],
            "rows": [[str(m), *map(int, v)] for m, v in storage.sort_values("volumes", ascending=False).iterrows()],
        },
        "conversion": {
            "settings": meta.get("settings"),
            "settings_hash": meta.get("settings_hash"),
            "formats": meta.get("formats"),
            "query": meta.get("query"),
            "converter_versions": sorted(rows["converter_version"].dropna().astype(str).unique().tolist())
            if "converter_version" in rows
            else [],
        },
        "errors": _error_groups(errors),
        "metrics": _distributions(rows, values, flags, outliers.references),
        "threshold": threshold,
    }


def _distributions(rows: pd.DataFrame, values: pd.DataFrame, flags: pd.DataFrame,
                   references: list[Reference]) -> list[dict[str, Any]]:  # fmt: skip
    """Per metric: a histogram of all volumes and of each modality (flagged volumes counted apart), and the limits."""
    modality = rows["modality"].astype(str).to_numpy()
    limits = {(r.metric, r.group): r for r in references}
    groups = {"all": np.ones(len(rows), bool), **{m: modality == m for m in np.unique(modality)}}
    checks = flags["reason"].map(check_of)
    out = []
    for metric in METRICS:
        column = values[metric.name].to_numpy(float)
        by_this = checks.isin([f"low {metric.name}", f"high {metric.name}"])
        flagged = rows["id"].isin(set(flags.loc[by_this, "id"])).to_numpy()  # by this metric: the red in its bars
        histograms = {}
        for group, members in groups.items():
            present = members & np.isfinite(column)
            if not present.any():
                continue
            reference = limits.get((metric.name, group)) or limits.get((metric.name, "all modalities"))
            histograms[group] = _histogram(column[present], flagged[present], reference)
        out.append({"name": metric.name, "unit": metric.unit, "histograms": histograms})
    return out


def _histogram(values: np.ndarray, flagged: np.ndarray, reference: Reference | None) -> dict[str, Any]:
    """Counts in _BINS bins over the bulk of `values` and its limits; the rest is counted in the end bins."""
    low, high = np.percentile(values, (0.5, 99.5))
    if reference is not None:
        low = min(low, reference.low if reference.low is not None else low)
        high = max(high, reference.high)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, _BINS + 1)
    index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, _BINS - 1)
    counts = np.bincount(index, minlength=_BINS)
    bad = np.bincount(index[flagged], minlength=_BINS)
    result = {
        "low": float(low),
        "high": float(high),
        "counts": counts.tolist(),
        "flagged": bad.tolist(),
        "volumes": int(len(values)),
        "below": int((values < low).sum()),
        "above": int((values > high).sum()),
    }
    if reference is not None:
        result["reference"] = {"group": reference.group, "median": reference.median, "low": reference.low,
                               "high": reference.high}  # fmt: skip
    return result


def _errors(root: str, storage_options: dict[str, Any] | None) -> pd.DataFrame | None:
    """The conversion's errors table beside its manifest, or None where there is none."""
    try:
        errors, _ = read_table(f"{root.rstrip('/')}/{ERRORS}", storage_options)
    except (OSError, ValueError):
        return None
    return errors


def _error_groups(errors: pd.DataFrame | None) -> dict[str, Any] | None:
    """Conversion errors grouped by type and reason with the file's own path taken out, largest group first."""
    if errors is None:
        return None
    groups: dict[tuple[str, str], list[str]] = {}
    for row in errors.itertuples(index=False):
        reason = str(row.reason).replace(str(row.source_path), "<file>")
        reason = re.sub(r"\S*/\S*", "<path>", reason)
        groups.setdefault((str(row.error_type), reason), []).append(str(row.id))
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    return {"total": len(errors),
            "groups": [{"type": t, "reason": r, "count": len(ids), "examples": ids[:_EXAMPLES]}
                       for (t, r), ids in ordered]}  # fmt: skip


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _page(title: str) -> str:
    """The page: the template with its CSS and JS inlined (one file, nothing fetched but data.js and the sprites)."""
    files = resources.files("openmind_tools") / "report_page"
    html = (files / "report.html").read_text()
    escape = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
    return (html.replace("{{title}}", "".join(escape.get(c, c) for c in title))
            .replace("{{style}}", (files / "report.css").read_text())
            .replace("{{script}}", (files / "report.js").read_text()))  # fmt: skip
