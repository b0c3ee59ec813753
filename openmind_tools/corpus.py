"""Find the images of an OpenMind download (CSV-driven) or of a plain BIDS-like tree (no CSV).

The published layout is `ROOT/openneuro_metadata.csv` + `ROOT/OpenMind/dsXXXXXX/sub-*/[ses-*/]anat|dwi/...`.
The CSV, not a file-name pattern, says what is an image (a suffix glob finds under half of them), and
its `anon_mask_path` / `anat_mask_path` columns name the masks by role, so they are never swapped.
Without a CSV, images are the .nii/.nii.gz files under `anat/` and `dwi/` folders, the modality is the
BIDS suffix, and masks come from the sibling `X__Data/{fb_mask,deface_mask}.nii.gz` when present.
"""

from __future__ import annotations

import bisect
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from openmind_tools.errors import ConfigError, MachineError
from openmind_tools.modalities import canonical_modalities
from openmind_tools.storage import Place, transport_error

CSV_NAME = "openneuro_metadata.csv"
IMAGE_DIR = "OpenMind"
ANATOMY_MASK, DEFACE_MASK = "fb_mask.nii.gz", "deface_mask.nii.gz"
_IMAGE_FOLDERS = ("anat", "dwi")


@dataclass(frozen=True, slots=True)  # 114k of them stay in the driver's memory for the whole run
class SourceImage:
    id: str  # relative path without extension, e.g. ds001486/sub-001/ses-T1/anat/sub-001_ses-T1_T1w
    image: str  # the file's path on the corpus's filesystem (`Corpus.root.fs`): a local path, or bucket/key
    anatomy_mask: str | None
    deface_mask: str | None
    modality: str
    dataset: str
    subject: str
    session: str | None


@dataclass(frozen=True)
class Rejected:
    """A CSV row that names no convertible image; it becomes an errors.parquet row."""

    id: str
    source_path: str
    error_type: str
    reason: str


@dataclass(frozen=True)
class Corpus:
    root: Place
    images: list[SourceImage]  # sorted by id
    table: pd.DataFrame  # every CSV column, unchanged: row k (a RangeIndex) belongs to images[k]
    rejected: list[Rejected]  # repeated rows, paths that leave the image folder


def discover(
    root: str | Path | Place,
    modalities: Sequence[str] | None = None,
    limit: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Corpus:
    """List the corpus's images, optionally only some modalities and the first `limit` (sorted by id).

    `root` is a folder or an fsspec URL (`s3://bucket/openmind`, with `storage_options`): the CSV is read and the
    tree listed through its filesystem, and the images keep their paths there for the workers to read."""
    root = root if isinstance(root, Place) else Place.of(root, storage_options)
    try:
        if not root.is_dir():
            raise ConfigError(f"{root}: not a directory")
        corpus = _from_csv(root) if (root / CSV_NAME).is_file() else _from_tree(root)
    except ConfigError:
        raise
    except Exception as e:
        if transport_error(e):
            raise MachineError(f"{root}: the object store failed while listing the corpus ({type(e).__name__}: {e}); "
                               "check the endpoint, the network and the credentials") from None  # fmt: skip
        if isinstance(e, OSError):
            raise ConfigError(f"{root}: cannot list the corpus ({type(e).__name__}: {e})") from None
        raise
    everything = not modalities and limit is None
    if everything:
        return corpus
    rows = range(len(corpus.images))
    if modalities:
        wanted = set(canonical_modalities(modalities, present=sorted({i.modality for i in corpus.images})))
        rows = [k for k in rows if corpus.images[k].modality in wanted]
    rows = rows[:limit] if limit is not None else rows
    images = [corpus.images[k] for k in rows]
    chosen = {i.id for i in images}
    rejected = [r for r in corpus.rejected if r.id in chosen]  # a trial reports its own rows
    return Corpus(root, images, corpus.table.iloc[list(rows)].reset_index(drop=True), rejected)


def row_of(corpus: Corpus, volume_id: str) -> int:
    """The position of `volume_id` in `corpus.images` and `corpus.table` (a bisection of the sorted ids, so the
    driver holds no index of 114k ids beside the images)."""
    k = bisect.bisect_left(corpus.images, volume_id, key=lambda image: image.id)
    if k == len(corpus.images) or corpus.images[k].id != volume_id:
        raise KeyError(volume_id)
    return k


def volume_id(relative_path: str) -> str:
    """Stable id of an image: its path relative to the image folder, without .nii/.nii.gz, and without empty or
    `.` parts (`a//b` and `a/./b` name the file `a/b` names, so they get its id and are refused as repeats)."""
    path = "/".join(part for part in relative_path.replace("\\", "/").split("/") if part not in ("", "."))
    for ext in (".nii.gz", ".nii"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def _from_csv(root: Place) -> Corpus:
    csv = root / CSV_NAME
    table = pd.read_csv(io.BytesIO(csv.read_bytes()), low_memory=False)
    for column in ("image_path", "modality"):
        if column not in table.columns:
            raise ConfigError(f"{csv}: required column {column!r} missing (found {list(table.columns)})")
    base = root / IMAGE_DIR if (root / IMAGE_DIR).is_dir() else root
    # The ids as plain strings, shared with the images: a string index of the table (and the hash table pandas
    # builds for a lookup by id) cost the driver ~2.6 KB a row in memory, measured at 5,000 rows
    ids = [volume_id(p) for p in table["image_path"].astype(str)]
    # One pass of plain dicts of the columns read here (iterrows is slow on 114k rows; dicts of every column made
    # the driver's peak memory grow by ~1 KB a row)
    rows = table.reindex(columns=["image_path", "modality", "anat_mask_path", "anon_mask_path"]).to_dict("records")
    rejected, keep, seen = [], [], set()
    for i, (vid, row) in enumerate(zip(ids, rows, strict=True)):
        bad = _leaves(row, ("image_path", "anat_mask_path", "anon_mask_path"))
        if bad:
            rejected.append(Rejected(vid, str(row["image_path"]), "UnsafePath", f"{bad} leaves {base}"))
        elif vid in seen:
            rejected.append(Rejected(vid, str(row["image_path"]), "DuplicateRow", "the CSV lists this image again"))
        else:
            seen.add(vid)
            keep.append(i)
    keep.sort(key=lambda i: ids[i])
    images = [_image(base, ids[i], rows[i]) for i in keep]
    return Corpus(root, images, table.iloc[keep].reset_index(drop=True), rejected)


def _leaves(row: dict, columns: tuple[str, ...]) -> str:
    """The first path cell that is absolute or climbs out with '..' (it would escape the stores too)."""
    for column in columns:
        value = row.get(column)
        if isinstance(value, str) and (value.startswith(("/", "\\")) or ".." in value.replace("\\", "/").split("/")):
            return f"{column} {value!r}"
    return ""


def _image(base: Place, vid: str, row: dict) -> SourceImage:
    def mask(column: str) -> str | None:
        value = row.get(column)
        return (base / value).path if isinstance(value, str) and value.strip() else None

    return SourceImage(
        id=vid,
        image=(base / str(row["image_path"])).path,
        anatomy_mask=mask("anat_mask_path"),
        deface_mask=mask("anon_mask_path"),
        modality=sys.intern(str(row["modality"])),
        **_bids_entities(vid),
    )


def _from_tree(root: Place) -> Corpus:
    base = root / IMAGE_DIR if (root / IMAGE_DIR).is_dir() else root
    files = base.find()  # one listing, not a stat per mask: a request each on object storage
    present = set(files)
    paths = [
        p
        for p in files
        if p.endswith((".nii", ".nii.gz"))
        and PurePosixPath(p).parent.name.split("_")[0] in _IMAGE_FOLDERS
        and not any(part.endswith("__Data") for part in PurePosixPath(base.relative(p)).parts)
    ]
    if not paths:
        raise ConfigError(f"{root}: no {CSV_NAME} and no .nii/.nii.gz images under anat/ or dwi/ folders")
    images = []
    for path in paths:
        vid = volume_id(base.relative(path))
        masks = f"{PurePosixPath(path).parent}/{PurePosixPath(vid).name}__Data"
        images.append(
            SourceImage(
                id=vid,
                image=path,
                anatomy_mask=_existing(f"{masks}/{ANATOMY_MASK}", present),
                deface_mask=_existing(f"{masks}/{DEFACE_MASK}", present),
                modality=sys.intern(PurePosixPath(vid).name.rsplit("_", 1)[-1]),
                **_bids_entities(vid),
            )
        )
    images.sort(key=lambda i: i.id)
    relative = [base.relative(i.image) for i in images]
    table = pd.DataFrame({"image_path": relative, "modality": [i.modality for i in images]})
    return Corpus(root, images, table, [])


def _bids_entities(vid: str) -> dict[str, str | None]:
    parts = vid.split("/")
    session = next((p for p in parts[1:-1] if p.startswith("ses-")), None)
    return {  # interned: one copy of each dataset, subject and session name among 114k images
        "dataset": sys.intern(parts[0]),
        "subject": sys.intern(parts[1]) if len(parts) > 2 else "",
        "session": None if session is None else sys.intern(session),
    }


def _existing(path: str, present: set[str]) -> str | None:
    return path if path in present else None
