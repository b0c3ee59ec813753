"""The manifest written a batch of rows at a time equals the one written whole, whatever the batches hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import openmind_tools.convert as conversion
from openmind_tools.manifest_io import read_table, write_batches


def test_batches_of_differing_column_types_read_back_as_one_table(tmp_path: Path) -> None:
    frames = [
        pd.DataFrame({"id": ["a", "b"], "age": [30, 41], "note": [None, None], "spacing": [[1, 1, 1], [2, 2, 2]]}),
        pd.DataFrame({"id": ["c"], "age": [np.nan], "note": ["rescanned"], "spacing": [[0.5, 0.5, 1.2]]}),
    ]
    path = tmp_path / "m.parquet"
    written = list(write_batches(lambda: iter(frames), path, {"formats": ["zarr"]}, empty=frames[0].head(0)))
    assert [len(f) for f in written] == [2, 1]
    table, meta = read_table(path)
    assert meta == {"formats": ["zarr"]}
    assert list(table["id"]) == ["a", "b", "c"] and list(table["note"])[2] == "rescanned"
    assert table["age"].tolist()[:2] == [30.0, 41.0] and np.isnan(table["age"].iloc[2])
    assert [list(s) for s in table["spacing"]] == [[1, 1, 1], [2, 2, 2], [0.5, 0.5, 1.2]]


def test_no_batch_writes_the_empty_frame(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    assert len(list(write_batches(lambda: iter(()), path, {}, empty=pd.DataFrame({"id": []})))) == 1
    assert list(read_table(path)[0].columns) == ["id"]


def test_a_conversion_written_in_small_batches_equals_the_whole(
    demo_corpus: Path, demo_out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conversion, "MANIFEST_BATCH", 3)  # 19 volumes: 7 row groups
    summary = conversion.convert(demo_corpus, tmp_path / "out", progress=False)
    batched, whole = (pd.read_parquet(p / "manifest.parquet") for p in (tmp_path / "out", demo_out))
    assert summary.converted == len(whole) and summary.source_bytes == int(whole["source_nbytes"].sum())
    pd.testing.assert_frame_equal(batched, whole)
    assert pq.ParquetFile(tmp_path / "out" / "manifest.parquet").num_row_groups == 7
