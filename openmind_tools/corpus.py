"""Find the images of an OpenMind download (CSV-driven) or of a plain BIDS-like tree (no CSV).

The published layout is `ROOT/openneuro_metadata.csv` + `ROOT/OpenMind/dsXXXXXX/sub-*/[ses-*/]anat|dwi/...`.
The CSV, not a file-name pattern, says what is an image (a suffix glob finds under half of them), and
its `anon_mask_path` / `anat_mask_path` columns name the masks by role, so they are never swapped.
Without a CSV, images are the .nii/.nii.gz files under `anat/` and `dwi/` folders, the modality is the
BIDS suffix, and masks come from the sibling `X__Data/{fb_mask,deface_mask}.nii.gz` when present.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from openmind_tools.errors import ConfigError, MachineError
from openmind_tools.modalities import canonical_modalities
from openmind_tools.storage import Place, transport_error

CSV_NAME = "openneuro_metadata.csv"
IMAGE_DIR = "OpenMind"
ANATOMY_MASK, DEFACE_MASK = "fb_mask.nii.gz", "deface_mask.nii.gz"
_IMAGE_FOLDERS = ("anat", "dwi")


@dataclass(frozen=True)
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
    images: list[SourceImage]
    table: pd.DataFrame  # one row per image, indexed by id: every CSV column, unchanged
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
    images = corpus.images
    if modalities:
        wanted = set(canonical_modalities(modalities, present=sorted({i.modality for i in images})))
        images = [i for i in images if i.modality in wanted]
    images = images[:limit] if limit is not None else images
    ids = [i.id for i in images]
    everything = not modalities and limit is None
    chosen = set(ids)
    rejected = [r for r in corpus.rejected if everything or r.id in chosen]  # a trial reports its own rows
    return Corpus(root, images, corpus.table.loc[ids], rejected)


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
    table.index = pd.Index([volume_id(p) for p in table["image_path"].astype(str)], name="id")
    repeated = table.index.duplicated()
    # One pass of plain dicts of the columns read here (iterrows is slow on 114k rows; dicts of every column made
    # the driver's peak memory grow by ~1 KB a row)
    rows = table.reindex(columns=["image_path", "modality", "anat_mask_path", "anon_mask_path"]).to_dict("records")
    rejected, keep = [], np.zeros(len(rows), dtype=bool)
    for i, (vid, row, repeat) in enumerate(zip(table.index, rows, repeated, strict=True)):
        bad = _leaves(row, ("image_path", "anat_mask_path", "anon_mask_path"))
        if bad:
            rejected.append(Rejected(vid, str(row["image_path"]), "UnsafePath", f"{bad} leaves {base}"))
        elif repeat:
            rejected.append(Rejected(vid, str(row["image_path"]), "DuplicateRow", "the CSV lists this image again"))
        else:
            keep[i] = True
    images = [_image(base, vid, row) for vid, row, k in zip(table.index, rows, keep, strict=True) if k]
    table = table[keep]
    order = sorted(range(len(images)), key=lambda i: images[i].id)
    return Corpus(root, [images[i] for i in order], table.iloc[order], rejected)


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
        modality=str(row["modality"]),
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
                modality=PurePosixPath(vid).name.rsplit("_", 1)[-1],
                **_bids_entities(vid),
            )
        )
    images.sort(key=lambda i: i.id)
    table = pd.DataFrame(
        {
            "image_path": [base.relative(i.image) for i in images],
            "modality": [i.modality for i in images],
        },
        index=pd.Index([i.id for i in images], name="id"),
    )
    return Corpus(root, images, table, [])


def _bids_entities(vid: str) -> dict[str, str | None]:
    parts = vid.split("/")
    session = next((p for p in parts[1:-1] if p.startswith("ses-")), None)
    return {"dataset": parts[0], "subject": parts[1] if len(parts) > 2 else "", "session": session}


def _existing(path: str, present: set[str]) -> str | None:
    return path if path in present else None
