"""Manifest queries on the converted demo corpus, each checked against pandas/pyarrow computed here.

The oracle reads the parquet with pyarrow directly and filters with plain pandas, so a bug in the query
engine (aliases, NaN quality, preset merging, where evaluation) cannot hide in both sides.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer

from openmind_tools import zarr_store
from openmind_tools.cli.common import EXIT_OK, EXIT_USAGE
from openmind_tools.cli.manifest import EXIT_EMPTY, main
from openmind_tools.errors import ConfigError
from openmind_tools.manifest import (
    EmptyResultWarning,
    Filters,
    load_manifest,
    query,
    resolve_manifest,
    stats,
)
from openmind_tools.manifest_io import read_table, write_table

MAE8_CSV = ["T1w", "inplaneT1", "MP2RAGE", "FLAIR", "T2w", "inplaneT2", "ADC", "DWI"]
MAE8_RECIPE = ["T1w", "inplainT1", "MP2RAGE", "FLAIR", "T2w", "inplainT2", "ADC", "DWI"]
T1_ID = "ds000101/sub-01/ses-1/anat/sub-01_ses-1_T1w"


@pytest.fixture(scope="module")
def path(demo_out: Path) -> Path:
    return demo_out / "manifest.parquet"


@pytest.fixture(scope="module")
def rows(path: Path) -> pd.DataFrame:
    """The oracle's view: the parquet as pyarrow reads it, no project code involved."""
    return pq.read_table(path).to_pandas()


@pytest.fixture(scope="module")
def manifest(path: Path) -> pd.DataFrame:
    return load_manifest(path)


def ids(df: pd.DataFrame) -> list[str]:
    return df["id"].tolist()


FILTER_CASES = {
    "modality": ({"modality": ["T1w", "FLAIR"]}, lambda d: d["modality"].isin(["T1w", "FLAIR"])),
    "modality alias": ({"modality": "inplainT1,inplainT2"}, lambda d: d["modality"].isin(["inplaneT1", "inplaneT2"])),
    "min_quality": ({"min_quality": 3}, lambda d: d["image_quality_score"] <= 3),
    "dataset": ({"dataset": ["ds000101", "ds000303"]}, lambda d: d["dataset"].isin(["ds000101", "ds000303"])),
    "where": ({"where": "age >= 18 and sex == 'F'"}, lambda d: (d["age"] >= 18) & (d["sex"] == "F")),
    "where str method": (
        {"where": "modality.str.startswith('T2') or magnetic_field_strength > 5"},
        lambda d: d["modality"].str.startswith("T2") | (d["magnetic_field_strength"] > 5),
    ),
    "has_anatomy_mask": ({"has_anatomy_mask": True}, lambda d: d["has_anatomy_mask"]),
    "no anatomy mask": ({"has_anatomy_mask": "false"}, lambda d: ~d["has_anatomy_mask"]),
    "preset mae8": ({"preset": "mae8"}, lambda d: d["modality"].isin(MAE8_CSV)),
    "preset + filters": (
        {"preset": "mae8", "min_quality": 2, "dataset": ["ds000101", "ds000303"], "where": "age < 50"},
        lambda d: (
            d["modality"].isin(MAE8_CSV)
            & (d["image_quality_score"] <= 2)
            & d["dataset"].isin(["ds000101", "ds000303"])
            & (d["age"] < 50)
        ),
    ),
}


@pytest.mark.parametrize("case", FILTER_CASES, ids=list(FILTER_CASES))
def test_filter_selects_what_pandas_selects(case: str, manifest: pd.DataFrame, rows: pd.DataFrame) -> None:
    filters, oracle = FILTER_CASES[case]
    expected = ids(rows[oracle(rows).to_numpy()])
    assert 0 < len(expected) < len(rows)  # the case really filters
    assert ids(query(manifest, **filters)) == expected


def test_limit_keeps_the_first_matching_rows_by_id(manifest: pd.DataFrame, rows: pd.DataFrame) -> None:
    t1 = rows[rows["modality"] == "T1w"]
    assert ids(query(manifest, modality="T1w", limit=2)) == ids(t1.head(2)) == sorted(t1["id"])[:2]


def test_preset_all_selects_every_row(manifest: pd.DataFrame, rows: pd.DataFrame) -> None:
    assert ids(query(manifest, preset="all")) == ids(rows)


def test_mae8_selects_the_same_rows_whichever_spelling(
    manifest: pd.DataFrame, rows: pd.DataFrame, tmp_path: Path
) -> None:
    recipe = tmp_path / "recipe_spelling.toml"
    recipe.write_text(f"modality = {json.dumps(MAE8_RECIPE)}\n")
    expected = ids(rows[rows["modality"].isin(MAE8_CSV)])
    assert {"inplaneT1", "inplaneT2"} <= set(query(manifest, preset="mae8")["modality"])
    assert ids(query(manifest, preset="mae8")) == expected
    assert ids(query(manifest, preset=str(recipe))) == expected
    assert ids(query(manifest, modality=MAE8_RECIPE)) == ids(query(manifest, modality=MAE8_CSV)) == expected


def test_min_quality_drops_unscored_rows(rows: pd.DataFrame, tmp_path: Path) -> None:
    df = rows.copy()
    df["image_quality_score"] = df["image_quality_score"].astype(float)
    df.loc[df["modality"] == "T1w", "image_quality_score"] = float("nan")
    write_table(df, tmp_path / "manifest.parquet", {})
    got = query(load_manifest(tmp_path / "manifest.parquet"), min_quality=5)
    assert ids(got) == ids(df[df["modality"] != "T1w"])
    assert stats(df).quality["none"] == (df["modality"] == "T1w").sum() > 0


def test_unknown_modality_lists_the_modalities_present(manifest: pd.DataFrame, rows: pd.DataFrame) -> None:
    with pytest.raises(ConfigError, match="'T1'") as e:
        query(manifest, modality="T1w,T1")
    assert all(m in str(e.value) for m in rows["modality"].unique())


@pytest.mark.parametrize(
    ("where", "problem"),
    [
        ("agee > 3", "agee"),
        ("age >", "invalid"),
        ("age + 1", "true/false"),
        ("sex.__class__", "'_'"),
        ("id.to_csv('x.csv') == 1", "only the calls"),
    ],
)
def test_bad_where_is_a_config_error_naming_the_columns(manifest: pd.DataFrame, where: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as e:
        query(manifest, where=where)
    assert "columns: id, dataset" in str(e.value) and "image_quality_score" in str(e.value)
    assert not Path("x.csv").exists()


def test_where_may_call_read_only_series_methods(manifest: pd.DataFrame) -> None:
    got = query(manifest, where="modality.isin(['T1w', 'FLAIR']) and dataset.str.startswith('ds0001')")
    expected = manifest[manifest["modality"].isin(["T1w", "FLAIR"]) & manifest["dataset"].str.startswith("ds0001")]
    assert list(got["id"]) == list(expected["id"]) and len(got) > 0


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"preset": "mae9"}, "unknown preset 'mae9'; available: all, mae8"),
        ({"modalities": "T1w"}, "unknown filter 'modalities'"),
        ({"min_quality": 7}, "min_quality: expected 1 .best. to 5 .worst., got 7"),
        ({"min_quality": "good"}, "min_quality: expected int"),
        ({"limit": -1}, "limit: expected a number of rows >= 0"),
        ({"has_anatomy_mask": "maybe"}, "has_anatomy_mask: expected bool"),
        ({"dataset": "ds999999"}, "dataset 'ds999999' is not in this manifest; its 3 datasets: ds000101, ds000202"),
    ],
)
def test_bad_filter_values_are_config_errors(manifest: pd.DataFrame, filters: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        query(manifest, **filters)


def test_unknown_preset_key_is_named(manifest: pd.DataFrame, tmp_path: Path) -> None:
    preset = tmp_path / "typo.toml"
    preset.write_text('modalities = ["T1w"]\n')
    with pytest.raises(
        ConfigError, match=r"typo.toml: unknown key 'modalities'; a preset may set description, modality"
    ):
        query(manifest, preset=str(preset))


def test_empty_result_warns_and_keeps_the_columns(manifest: pd.DataFrame) -> None:
    with pytest.warns(EmptyResultWarning, match="selected none of 19"):
        got = query(manifest, modality="PET")
    assert got.empty and list(got.columns) == list(manifest.columns)


@pytest.mark.parametrize("suffix", ["parquet", "csv", "jsonl"])
def test_cli_output_round_trips(suffix: str, path: Path, rows: pd.DataFrame, tmp_path: Path, capsys) -> None:
    out = tmp_path / f"t1_flair.{suffix}"
    assert main(["query", str(path), "--modality", "T1w,FLAIR", "--min-quality", "3", "-o", str(out)]) == EXIT_OK
    expected = rows[rows["modality"].isin(["T1w", "FLAIR"]) & (rows["image_quality_score"] <= 3)]
    assert f"{len(expected)} volumes selected" in capsys.readouterr().out
    if suffix == "parquet":
        back, meta = read_table(out)
        pd.testing.assert_frame_equal(back, expected.reset_index(drop=True))
        _, source_meta = read_table(path)
        assert meta == {
            **source_meta,
            "query": "modality=T1w,FLAIR min_quality=3",
            "rows": len(expected),
            "source": str(path.resolve()),
            "store_root": str(path.parent.resolve()),
        }
        assert ids(load_manifest(out)) == ids(expected)
        return
    back = pd.read_csv(out) if suffix == "csv" else pd.read_json(out, lines=True)
    assert list(back.columns) == list(rows.columns) and ids(back) == ids(expected)
    shapes = back["shape"].map(json.loads) if suffix == "csv" else back["shape"]
    assert shapes.tolist() == [s.tolist() for s in expected["shape"]]


def test_cli_csv_to_stdout(path: Path, rows: pd.DataFrame, capsys) -> None:
    argv = ["query", str(path), "--where", "age >= 18 and sex == 'F'", "--dataset", "ds000101", "--format", "csv"]
    assert main(argv) == EXIT_OK
    captured = capsys.readouterr()
    back = pd.read_csv(io.StringIO(captured.out))
    assert ids(back) == ids(rows[(rows["age"] >= 18) & (rows["sex"] == "F") & (rows["dataset"] == "ds000101")])
    assert "volumes selected" in captured.err


def test_cli_table_to_stdout_shows_key_columns(path: Path, rows: pd.DataFrame, capsys) -> None:
    assert main(["query", str(path), "--preset", "mae8"]) == EXIT_OK
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["id", "modality", "dataset", "quality", "shape"]
    mae8 = rows[rows["modality"].isin(MAE8_CSV)]
    assert all(i in out for i in mae8["id"]) and "angio" not in out
    assert f"{len(mae8)} volumes selected by 'mae8'" in out and "145x181x155" in out


def test_cli_empty_result_writes_nothing_unless_allowed(path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pet.parquet"
    assert main(["query", str(path), "--modality", "PET", "-o", str(out)]) == EXIT_EMPTY
    assert not out.exists() and "nothing written" in capsys.readouterr().err
    assert main(["query", str(path), "--modality", "PET", "-o", str(out), "--allow-empty"]) == EXIT_OK
    back, meta = read_table(out)
    assert back.empty and meta["rows"] == 0 and "id" in back.columns


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["query", "{path}", "--modality", "T1"], "unknown modality 'T1'; modalities present: ADC, DWI"),
        (["query", "{path}", "--where", "agee > 1"], "columns: id"),
        (["query", "{path}", "--preset", "nope"], "available: all, mae8"),
        (["query", "{path}", "-o", "out.txt"], "cannot tell the format"),
        (["query", "{path}", "--format", "parquet"], "parquet output needs a file name"),
        (["query", "missing.parquet"], "missing.parquet: no such manifest"),
        (["show", "{path}", "T1w"], "ids containing it: \\['ds000101/sub-01/ses-1/anat/sub-01_ses-1_T1w'"),
        (["query"], "required: manifest"),
    ],
)
def test_cli_usage_errors_exit_2_naming_the_problem(argv: list[str], message: str, path: Path, capsys) -> None:
    assert main([a.format(path=path) for a in argv]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_query_passed_as_manifest_selects_what_the_written_query_holds(
    path: Path, manifest: pd.DataFrame, tmp_path: Path, capsys
) -> None:
    written = tmp_path / "elsewhere" / "mae.parquet"
    written.parent.mkdir()
    argv = ["query", str(path), "--preset", "mae8", "--min-quality", "3", "--where", "sex == 'F'", "-o", str(written)]
    assert main(argv) == EXIT_OK
    file_rows, file_meta = resolve_manifest(written)
    assert 0 < len(file_rows) < len(manifest)
    filters = {"preset": "mae8", "min_quality": 3, "where": "sex == 'F'"}
    sources = [
        f"mae8 min_quality=3 where=\"sex == 'F'\" of {path}",
        file_meta["query"] + " of " + file_meta["source"],
        {"manifest": str(path), **filters},
        {"manifest": path, "preset": "mae8", "min_quality": "3", "where": "sex == 'F'"},
    ]
    for source in sources:
        got, meta = resolve_manifest(source)
        pd.testing.assert_frame_equal(got, file_rows)
        assert meta == file_meta
    for source in (path, manifest):
        got, meta = resolve_manifest(source, **filters)
        pd.testing.assert_frame_equal(got, file_rows)
        assert meta["store_root"] == file_meta["store_root"] == str(path.parent.resolve())


def test_store_paths_resolve_against_the_original_folder(path: Path, tmp_path: Path, capsys) -> None:
    first, second = tmp_path / "a" / "t1.parquet", tmp_path / "b" / "t1_q1.parquet"
    first.parent.mkdir()
    second.parent.mkdir()
    assert main(["query", str(path), "--modality", "T1w", "-o", str(first)]) == EXIT_OK
    assert main(["query", str(first), "--min-quality", "1", "-o", str(second)]) == EXIT_OK  # a query of a query
    df, meta = resolve_manifest(second)
    assert meta["store_root"] == str(path.parent.resolve()) and meta["source"] == str(first.resolve())
    root = Path(meta["store_root"])
    assert len(df) and all((root / r.zarr_store / r.zarr_array).is_dir() for r in df.itertuples())
    assert all((root / shard).is_file() for shard in df["wds_shard"])
    assert not (second.parent / df["zarr_store"].iloc[0]).exists()  # relative to the output it would not resolve


def test_plain_manifest_resolves_to_itself_with_its_folder(path: Path, rows: pd.DataFrame) -> None:
    df, meta = resolve_manifest(str(path))
    pd.testing.assert_frame_equal(df, rows)
    assert meta == {**read_table(path)[1], "store_root": str(path.parent.resolve())}


def test_query_string_with_the_same_filter_twice_is_refused(path: Path) -> None:
    with pytest.raises(ConfigError, match="'preset' given both"):
        resolve_manifest(f"mae8 of {path}", preset="all")
    with pytest.raises(ConfigError, match="expected '\\[preset\\] \\[key=value ...\\] of MANIFEST'"):
        resolve_manifest(f"mae8 of {path} extra")


def test_filters_from_text_equal_filters_from_python_values() -> None:
    typed = Filters(preset="mae8", modality=("T1w", "FLAIR"), min_quality=2, has_anatomy_mask=True, where="sex == 'F'")
    text = Filters(preset="mae8", modality="T1w, FLAIR", min_quality="2", has_anatomy_mask="true", where="sex == 'F'")
    assert text == typed
    assert typed.text() == "mae8 modality=T1w,FLAIR min_quality=2 has_anatomy_mask=true where=\"sex == 'F'\""


def test_s3_manifest_store_root_is_its_url(path: Path, rows: pd.DataFrame, monkeypatch) -> None:
    s3fs = pytest.importorskip("s3fs")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        fs.mkdir("corpus")
        fs.put(str(path), "corpus/out/manifest.parquet")
        df, meta = resolve_manifest("mae8 of s3://corpus/out/manifest.parquet", storage_options=options)
    finally:
        server.stop()
    assert ids(df) == ids(rows[rows["modality"].isin(MAE8_CSV)])
    assert meta["store_root"] == "s3://corpus/out" and meta["source"] == "s3://corpus/out/manifest.parquet"


def test_load_manifest_refuses_what_is_not_a_manifest(rows: pd.DataFrame, tmp_path: Path) -> None:
    write_table(rows.drop(columns=["modality"]), tmp_path / "no_modality.parquet", {})
    write_table(pd.concat([rows, rows.head(1)]), tmp_path / "repeated.parquet", {})
    (tmp_path / "text.parquet").write_text("id,modality\n")
    with pytest.raises(ConfigError, match="column 'modality' missing"):
        load_manifest(tmp_path / "no_modality.parquet")
    with pytest.raises(ConfigError, match=f"id '{rows['id'].iloc[0]}' appears more than once"):
        load_manifest(tmp_path / "repeated.parquet")
    with pytest.raises(ConfigError, match="not a parquet manifest"):
        load_manifest(tmp_path / "text.parquet")


def test_stats_counts_match_pandas(manifest: pd.DataFrame, rows: pd.DataFrame) -> None:
    summary = stats(manifest)
    assert summary.by_modality["volumes"].to_dict() == rows["modality"].value_counts().to_dict()
    assert summary.by_dataset["zarr_nbytes"].to_dict() == rows.groupby("dataset")["zarr_nbytes"].sum().to_dict()
    scores = rows["image_quality_score"].value_counts()
    assert summary.quality.to_dict() == {**{str(s): int(scores.get(s, 0)) for s in range(1, 6)}, "none": 0}
    assert sorted(summary.ages) == sorted(rows["age"].dropna())


def test_cli_stats_prints_counts_and_draws_a_png(path: Path, rows: pd.DataFrame, tmp_path: Path, capsys) -> None:
    png = tmp_path / "stats.png"
    assert main(["stats", str(path), "--plot", str(png)]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith(f"{len(rows)} volumes, {rows['modality'].nunique()} modalities, 3 datasets")
    t1_line = next(line for line in out.splitlines() if line.startswith("T1w "))
    assert t1_line.split()[1] == str((rows["modality"] == "T1w").sum())
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1540, 1100)


def test_cli_stats_plot_writes_the_file_it_prints(path: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "figures"
    folder.mkdir()
    for given, written in ((tmp_path / "stats", tmp_path / "stats.png"), (folder, folder / "manifest_stats.png"),
                           (tmp_path / "s.svg", tmp_path / "s.svg")):  # fmt: skip
        assert main(["stats", str(path), "--plot", str(given)]) == EXIT_OK
        assert f"figure: {written}\n" in capsys.readouterr().out and written.stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures", "s.svg", "stats.png"]  # nothing beside
    for bad, message in ((tmp_path / "no" / "x.png", "does not exist"), (tmp_path / "x.jpg", ".png, .pdf or .svg")):
        assert main(["stats", str(path), "--plot", str(bad)]) == 2
        assert message in capsys.readouterr().err


def test_a_where_too_long_or_nested_too_deep_is_one_config_error(path: Path, capsys) -> None:
    for where, message in (("not " * 20_000 + "age > 3", "at most 4096"), ("not " * 1000 + "age > 3", "where")):
        assert main(["query", str(path), "--where", where]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_stats_balance_by_shows_each_groups_share_before_and_after(path: Path, rows: pd.DataFrame,
                                                                       capsys) -> None:  # fmt: skip
    assert main(["stats", str(path), "--balance-by", "dataset,modality"]) == EXIT_OK
    out = capsys.readouterr().out
    groups = rows.groupby(["dataset", "modality"]).size()
    assert f"balance_by dataset,modality: {len(groups)} groups, each {1 / len(groups):.2%}" in out
    line = next(x for x in out.splitlines() if x.split()[:2] == ["ds000101", "T1w"])
    volumes, uniform, balanced, reads = line.split()[2:]
    assert int(volumes) == groups["ds000101", "T1w"]
    assert uniform == f"{groups['ds000101', 'T1w'] / len(rows):.2%}" and balanced == f"{1 / len(groups):.2%}"
    assert float(reads) == pytest.approx(len(rows) / len(groups) / groups["ds000101", "T1w"], abs=0.01)
    assert main(["stats", str(path), "--balance-by", "scanner"]) == 2
    assert "no manifest column(s) ['scanner']" in capsys.readouterr().err


def test_cli_show_prints_every_column_and_the_store_locations(path: Path, rows: pd.DataFrame, capsys) -> None:
    assert main(["show", f"modality=T1w of {path}", T1_ID]) == EXIT_OK
    out = capsys.readouterr().out
    row = rows.set_index("id").loc[T1_ID]
    assert f"checksum                  {row['checksum']}" in out
    assert f"-> zarr_store             {path.parent.resolve()}/store.zarr [{zarr_store.group_path(T1_ID)}]" in out
    assert len(out.splitlines()) == len(rows.columns) + 2


def test_cli_presets_lists_each_with_its_filters(capsys) -> None:
    assert main(["presets"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "mae8: the 8-modality MAE set" in out and f"modality={','.join(MAE8_CSV)}" in out
    assert "all: every volume" in out
