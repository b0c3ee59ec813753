"""Read and write manifest tables: parquet with the conversion settings in its key-value metadata.

Writes are whole (`storage.Place.writer`), so a reader never sees half a manifest; a conversion's manifest is
written a batch of rows at a time (`write_batches`), so the driver never holds all of them. The metadata
(settings, settings hash, formats, and for a query its text and row count) travels with the rows, so a
sub-manifest written by a query still tells the loader how its stores were made.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from openmind_tools.storage import Place

META_KEY = b"openmind"
MANIFEST, ERRORS = "manifest.parquet", "errors.parquet"  # the file names inside a conversion's OUT


def write_table(df: pd.DataFrame, path: str | Path | Place, meta: dict[str, Any]) -> None:
    """Write `df` whole: a local file is renamed into place, an object appears when its upload completes."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    with Place.of(path).writer() as f:
        pq.write_table(table, f)


def write_batches(
    batches: Callable[[], Iterable[pd.DataFrame]], path: str | Path | Place, meta: dict[str, Any], empty: pd.DataFrame
) -> Iterator[pd.DataFrame]:
    """Write the frames `batches()` yields as one parquet file, a row group each, holding one frame at a time; yields
    each frame once written (`empty` is written when there is none). The file appears whole when the last is written.

    Two passes over `batches()`: the first unifies the frames' schemas (a column that is all null in one batch
    takes its type from another, integers widen to floats where a batch holds NaN), the second writes.
    """
    schemas = [pa.Schema.from_pandas(frame, preserve_index=False) for frame in batches()]
    if not schemas:
        write_table(empty, path, meta)
        yield empty
        return
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    schema = schema.with_metadata({**(schemas[0].metadata or {}), META_KEY: json.dumps(meta).encode()})
    with Place.of(path).writer() as f, pq.ParquetWriter(f, schema) as writer:
        for frame in batches():
            table = pa.Table.from_pandas(frame, preserve_index=False)
            for field in schema:
                if field.name not in table.column_names:
                    table = table.append_column(field.name, pa.nulls(len(table), field.type))
            writer.write_table(table.select(schema.names).cast(schema))
            yield frame


def read_table(
    path: str | Path | Place, storage_options: dict[str, Any] | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The rows and the project metadata of a manifest (local path or fsspec URL such as s3://...)."""
    place = Place.of(path, storage_options)
    with place.fs.open(place.path, "rb") as f:
        table = pq.read_table(f)
    raw = (table.schema.metadata or {}).get(META_KEY)
    return table.to_pandas(), json.loads(raw) if raw else {}


def whole_number(value: Any) -> int | None:
    """A manifest cell that should hold an integer, as an int (a float only if whole), else None: a hand-made or
    damaged manifest may hold strings, NaN, inf or 512.5 where the converter wrote integers."""
    try:
        number = int(value)
        return number if float(value) == number else None
    except (TypeError, ValueError, OverflowError):
        return None
