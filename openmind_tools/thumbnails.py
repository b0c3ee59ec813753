"""Thumbnails of stored volumes in sprite sheets: three mid-slices per volume with the anatomy-mask outline.

A tile is the sagittal, coronal and axial mid-slice of the stored (preprocessed) image, each fitted into a square
of `tile` px (superior up, anterior up in the axial view, patient right on the right), windowed to the 1st-99th
percentile of the anatomy, with the mask's outline in amber. Tiles are packed per dataset into WebP sheets of
`per_sheet` volumes, ordered by (dataset, modality, id), so a page filtered by dataset or modality loads few
sheets. A sheet's name hashes its volumes (id + checksum) and the settings, and its `.json` sidecar (which volumes
could not be read, and why) is written after the image, each atomically: a rerun skips every sheet whose sidecar
is there (a killed run resumes), and a changed manifest re-renders only the datasets that changed. Volumes are
read only through the loader (`PatchDataset.read_each`), as training reads them.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from openmind_tools.errors import ConfigError, StoreError
from openmind_tools.files import atomic_write, atomic_write_text
from openmind_tools.loader import STORES, PatchDataset
from openmind_tools.parallel import run_tasks

SPRITES = "sprites"  # folder of the sheets inside the report folder
SHEET_FORMAT = "openmind-thumbnails/1"
_OUTLINE = (255, 176, 0)  # amber: visible on grey, and no red, which the page keeps for flags


@dataclass(frozen=True)
class ThumbnailSettings:
    """How tiles look and are packed. 64 px x 3 views at WebP quality 80: ~4 kB per volume on the demo heads."""

    tile: int = 64  # px, edge of each view
    per_sheet: int = 32  # volumes per sheet: 4 x 8 tiles, 768 x 512 px (1.5 MB decoded); a page loads a few
    columns: int = 4  # tiles per sheet row
    quality: int = 80  # WebP quality

    def __post_init__(self) -> None:
        for name, low, high in (("tile", 16, 512), ("per_sheet", 1, 4096), ("columns", 1, 64), ("quality", 1, 100)):
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name}: expected an integer in [{low}, {high}], got {value!r}")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of one tile in px."""
        return 3 * self.tile, self.tile


@dataclass(frozen=True)
class Sheet:
    name: str  # file name under sprites/, e.g. ds000101-3f2a9c0d1b7e.webp
    ids: tuple[str, ...]  # its volumes, in tile order


@dataclass(frozen=True)
class Rendered:
    """Every sheet of a plan, done: which volumes could not be read (id -> reason), and how many were made now."""

    unreadable: dict[str, str]
    made: int
    skipped: int


def plan_sheets(rows: pd.DataFrame, settings: ThumbnailSettings = ThumbnailSettings()) -> list[Sheet]:
    """Sheets for `rows`, in page order: per dataset, rows sorted by (dataset, modality, id), cut every `per_sheet`."""
    ordered = rows.sort_values(["dataset", "modality", "id"], kind="stable")
    ids = ordered["id"].astype(str).tolist()
    sums = ordered["checksum"].astype(str).tolist() if "checksum" in ordered else [""] * len(ids)
    datasets = ordered["dataset"].fillna("(none)").astype(str).tolist()
    starts = [i for i in range(len(ids)) if i == 0 or datasets[i] != datasets[i - 1]] + [len(ids)]
    sheets = []
    for first, end in itertools.pairwise(starts):
        stem = re.sub(r"[^\w.-]", "_", datasets[first])[:40]
        for start in range(first, end, settings.per_sheet):
            stop = min(start + settings.per_sheet, end)
            content = json.dumps([SHEET_FORMAT, settings.__dict__, ids[start:stop], sums[start:stop]])
            sheets.append(
                Sheet(f"{stem}-{hashlib.sha256(content.encode()).hexdigest()[:12]}.webp", tuple(ids[start:stop]))
            )
    return sheets


def render_sheets(
    rows: pd.DataFrame,
    sheets: list[Sheet],
    out: str | Path,
    *,
    store: str,
    root: str,
    settings: ThumbnailSettings = ThumbnailSettings(),
    storage_options: dict[str, Any] | None = None,
    client: Any = None,
    progress: bool = True,
    retry_errors: bool = False,
) -> Rendered:
    """Make the sheets not made yet under `out`/sprites (on `client`, a dask Client, or here) and drop stale ones.

    `retry_errors` also remakes sheets that held an unreadable volume (after a repair, say).
    """
    folder = Path(out) / SPRITES
    folder.mkdir(parents=True, exist_ok=True)
    todo, unreadable = pending(sheets, out, retry_errors)
    wanted = {n for s in sheets for n in (s.name, _sidecar(s.name))}
    for stale in folder.iterdir():
        if stale.name not in wanted and not stale.name.startswith("."):
            stale.unlink()
    columns = ["id", "shape", "settings_hash", *STORES[store].MANIFEST_COLUMNS]
    by_id = rows.set_index("id", drop=False)[[c for c in columns if c in rows]]
    jobs = [(sheet, by_id.loc[list(sheet.ids)].to_dict("records")) for sheet in todo]
    died = functools.partial(_worker_died, folder=str(folder), settings=settings)
    results = run_tasks(_render_one, jobs, client, progress=progress, what="thumbnails", unit="sheet", on_error=died,
                        folder=str(folder), store=store, root=root, settings=settings,
                        storage_options=storage_options)  # fmt: skip
    for errors in results:
        unreadable.update(errors)
    return Rendered(unreadable, made=len(todo), skipped=len(sheets) - len(todo))


def pending(sheets: list[Sheet], out: str | Path, retry_errors: bool = False) -> tuple[list[Sheet], dict[str, str]]:
    """The sheets still to make under `out`, and the unreadable volumes (id -> reason) the finished ones recorded."""
    todo, unreadable = [], {}
    for sheet in sheets:
        done = _finished(Path(out) / SPRITES / sheet.name, sheet)
        if done is None or (retry_errors and done):
            todo.append(sheet)
        else:
            unreadable.update(done)
    return todo, unreadable


def tile(image: np.ndarray, anatomy: np.ndarray, settings: ThumbnailSettings = ThumbnailSettings()) -> Image.Image:
    """One volume's tile: its three mid-slices side by side, each fitted into a `settings.tile` square."""
    views = []
    centre = [s // 2 for s in image.shape]
    for axis in range(3):  # sagittal (x), coronal (y), axial (z): each rotated so superior (or anterior) is up
        views.append((np.rot90(np.take(image, centre[axis], axis)), np.rot90(np.take(anatomy, centre[axis], axis))))
    inside = np.concatenate([v[m > 0] for v, m in views])
    values = inside if inside.size >= 100 else np.concatenate([v.ravel() for v, _ in views])
    low, high = np.percentile(values.astype(np.float32), (1, 99)) if values.size else (0.0, 1.0)
    out = Image.new("RGB", settings.size)
    for k, (view, mask) in enumerate(views):
        grey = np.clip((view.astype(np.float32) - low) / max(float(high - low), 1e-6) * 255, 0, 255).astype(np.uint8)
        scale = settings.tile / max(grey.shape)
        size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
        picture = np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR).convert("RGB")).copy()
        edge = _outline(np.asarray(Image.fromarray((mask > 0).astype(np.uint8)).resize(size, Image.Resampling.NEAREST)))
        picture[edge] = _OUTLINE
        left = k * settings.tile + (settings.tile - size[0]) // 2
        out.paste(Image.fromarray(picture), (left, (settings.tile - size[1]) // 2))
    return out


def sheet_image(pictures: list[Image.Image], settings: ThumbnailSettings = ThumbnailSettings()) -> Image.Image:
    """Tiles packed row by row, `settings.columns` to a row."""
    width, height = settings.size
    image = Image.new(
        "RGB", (width * min(settings.columns, len(pictures)), height * -(-len(pictures) // settings.columns))
    )
    for slot, picture in enumerate(pictures):
        image.paste(picture, ((slot % settings.columns) * width, (slot // settings.columns) * height))
    return image


def save_sheet(folder: str | Path, sheet: Sheet, image: Image.Image, unreadable: dict[str, str],
               settings: ThumbnailSettings = ThumbnailSettings()) -> None:  # fmt: skip
    """Write the sheet's WebP, then mark it finished."""
    _write_webp(folder, sheet, image, settings)
    mark_finished(folder, sheet, unreadable)


def mark_finished(folder: str | Path, sheet: Sheet, unreadable: dict[str, str]) -> None:
    """Write the sidecar (ids, unreadable volumes) of a sheet whose WebP is in place: a rerun then skips it."""
    text = json.dumps({"ids": list(sheet.ids), "unreadable": unreadable})
    atomic_write_text(Path(folder) / _sidecar(sheet.name), text)


def _render_one(job: tuple[Sheet, list[dict[str, Any]]], folder: str, store: str, root: str,
                settings: ThumbnailSettings, storage_options: dict[str, Any] | None) -> dict[str, str]:  # fmt: skip
    """One sheet, on a worker: read its volumes, draw their tiles, write the sheet."""
    sheet, records = job
    pictures: dict[str, Image.Image] = {}
    errors: dict[str, str] = {}
    for volume_id, volume in _volumes(records, store, root, storage_options):
        if isinstance(volume, Exception):
            errors[volume_id] = str(volume)
            pictures[volume_id] = _unreadable(settings)
        else:
            pictures[volume_id] = tile(volume.image, volume.anatomy, settings)
    save_sheet(folder, sheet, sheet_image([pictures[i] for i in sheet.ids], settings), errors, settings)
    return errors


def _volumes(records: list[dict[str, Any]], store: str, root: str, storage_options: dict[str, Any] | None):
    """(id, Volume or the error that stopped its read) per record, in order, read as the loader reads them.

    One dataset over the sheet's rows; if the rows cannot make one (a malformed cell, a missing volume its store
    check reads), each row gets its own, so the error lands on the volume it belongs to.
    """

    def dataset(part: list[dict[str, Any]]) -> PatchDataset:
        return PatchDataset(pd.DataFrame(part), 1, store=store, root=root, storage_options=storage_options,
                            prefetch=2, attempts=2)  # fmt: skip

    try:
        parts = [(records, dataset(records))]
    except (ConfigError, StoreError):
        parts = []
        for record in records:
            try:
                parts.append(([record], dataset([record])))
            except (ConfigError, StoreError) as e:
                parts.append(([record], e))
    for part, made in parts:
        if isinstance(made, Exception):
            yield part[0]["id"], made
            continue
        for ref, volume in made.read_each():  # in id order: the sheet's order may differ
            yield ref.id, volume


def _worker_died(job: tuple[Sheet, list[dict[str, Any]]], error: Exception, folder: str,
                 settings: ThumbnailSettings) -> dict[str, str]:  # fmt: skip
    """A sheet that killed its worker alone (a volume too large for its memory, say): its volumes are reported
    unreadable and drawn so, with no sidecar, so that the page has its picture and the next run tries it again."""
    sheet = job[0]
    _write_webp(folder, sheet, sheet_image([_unreadable(settings)] * len(sheet.ids), settings), settings)
    return {volume_id: f"the worker drawing its thumbnail sheet died ({error})" for volume_id in sheet.ids}


def _write_webp(folder: str | Path, sheet: Sheet, image: Image.Image, settings: ThumbnailSettings) -> None:
    with atomic_write(Path(folder) / sheet.name) as f:
        image.save(f, format="WEBP", quality=settings.quality, method=4)


def _finished(path: Path, sheet: Sheet) -> dict[str, str] | None:
    """The unreadable volumes a finished sheet recorded, or None if it is not finished (no image or sidecar)."""
    try:
        done = json.loads(path.with_name(_sidecar(sheet.name)).read_text())
        if not path.is_file() or done["ids"] != list(sheet.ids):
            return None
        return {str(k): str(v) for k, v in done["unreadable"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # absent, or damaged: make it again
        return None


def _sidecar(name: str) -> str:
    return f"{name.removesuffix('.webp')}.json"


def _outline(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels with a 4-neighbour outside it (edges of the picture count as outside)."""
    inside = np.pad(mask > 0, 1)
    core = inside[1:-1, 1:-1]
    return core & ~(inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:])


def _unreadable(settings: ThumbnailSettings) -> Image.Image:
    """A dark red tile with a cross: the page names the reason beside it."""
    picture = Image.new("RGB", settings.size, (60, 0, 0))
    draw = ImageDraw.Draw(picture)
    width, height = settings.size
    draw.line([(0, 0), (width - 1, height - 1)], fill=(200, 40, 40), width=2)
    draw.line([(0, height - 1), (width - 1, 0)], fill=(200, 40, 40), width=2)
    return picture
