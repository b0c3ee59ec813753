"""The QC report: outlier flags, thumbnails that resume, --exclude, and the page itself in headless Chromium.

The report is built from a copy of the demo store's Zarr volumes with one image chunk damaged on purpose, so the
page must show that volume as flagged "unreadable" with its reason. One Chromium serves every browser test.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from openmind_tools import zarr_store
from openmind_tools.cli.common import EXIT_DATA, EXIT_OK, EXIT_USAGE
from openmind_tools.cli.manifest import STORE_NAMES, main
from openmind_tools.errors import ConfigError
from openmind_tools.flags import MIN_GROUP, outlier_flags, read_flags
from openmind_tools.loader import STORES
from openmind_tools.manifest import resolve_manifest
from openmind_tools.manifest_io import read_table, write_table
from openmind_tools.report import DATA, FLAGS, PAGE, build_report
from openmind_tools.thumbnails import SPRITES, ThumbnailSettings, plan_sheets, tile

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from report_bench import headless_chromium, open_report  # noqa: E402

DAMAGED = "ds000101/sub-01/ses-1/anat/sub-01_ses-1_T1w"


@pytest.fixture(scope="module")
def store(demo_out: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's Zarr volumes and manifest (zarr columns only), with one image chunk's middle byte flipped."""
    out = tmp_path_factory.mktemp("qc") / "store"
    shutil.copytree(demo_out / "store.zarr", out / "store.zarr")
    manifest, meta = read_table(demo_out / "manifest.parquet")
    write_table(manifest.drop(columns=[c for c in manifest if c.startswith("wds_")]), out / "manifest.parquet",
                {**meta, "formats": ["zarr"]})  # fmt: skip
    shutil.copy(demo_out / "errors.parquet", out / "errors.parquet")
    chunk = out / "store.zarr" / zarr_store.group_path(DAMAGED) / zarr_store.CHUNKS["image"]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    return out / "manifest.parquet"


@pytest.fixture(scope="module")
def report(store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("qc") / "report"
    return out, build_report(store, out, progress=False)


def _page_data(folder: Path) -> dict:
    text = (folder / DATA).read_text()
    return json.loads(json.loads(text.removeprefix("window.REPORT = JSON.parse(").removesuffix(");\n")))


# ---------------------------------------------------------------------------------------------------- flags
def test_flags_find_exactly_the_planted_outliers_judged_per_modality(store: Path) -> None:
    rows, _ = resolve_manifest(store)
    rng = np.random.default_rng(0)
    t1, flair = rows[rows["modality"] == "T1w"].iloc[0], rows[rows["modality"] == "FLAIR"].iloc[0]
    group = pd.DataFrame([t1] * 30 + [flair] * MIN_GROUP).reset_index(drop=True)
    group["id"] = [f"v{i:03d}" for i in range(len(group))]
    group["anatomy_fraction"] += rng.normal(0, 0.01, len(group))
    group["std"] = group["mean"] * rng.normal(0.3, 0.01, len(group))
    group.loc[group["modality"] == "FLAIR", "std"] *= 2  # FLAIR's own normal: an outlier if judged against T1w
    group.loc[3, "anatomy_fraction"] = 0.97  # a flipped-looking mask
    group.loc[40, "shape"] = np.array([145, 181, 60])  # a head cut short in I-S
    group.loc[7, ["has_anatomy_mask", "anatomy_fraction"]] = (False, 0.0)  # no mask: 0 by definition, no outlier
    found = outlier_flags(group).flags
    assert sorted(set(found["id"])) == ["v003", "v040"], found
    reasons = found.groupby("id")["reason"].apply(list)
    assert len(reasons["v003"]) == 1 and reasons["v003"][0].startswith("high anatomy fraction: 0.97, T1w median 0.46")
    assert any(r.startswith("low extent I-S: 60 mm, FLAIR median 155 mm") for r in reasons["v040"])


def test_a_bad_threshold_is_a_config_error(store: Path) -> None:
    rows, _ = resolve_manifest(store)
    with pytest.raises(ConfigError, match="threshold: expected a positive number"):
        outlier_flags(rows, threshold=0)


def test_a_tile_shows_superior_up_and_outlines_the_mask() -> None:
    image = np.zeros((40, 50, 60), np.float16)
    image[:, :, 45:] = 3  # a bright superior slab
    anatomy = np.zeros(image.shape, np.uint8)
    anatomy[10:30, 10:40, 10:50] = 1
    settings = ThumbnailSettings(tile=64)
    picture = np.asarray(tile(image, anatomy, settings))
    sagittal = picture[:, :64]
    rows = np.flatnonzero(sagittal[:, :, 1].max(axis=1) > 200)  # bright grey rows
    assert rows.max() < 32, "the superior slab must be at the top"
    amber = (picture[:, :, 0] == 255) & (picture[:, :, 1] == 176) & (picture[:, :, 2] == 0)
    assert amber[:, :64].any() and amber[:, 64:128].any() and amber[:, 128:].any()
    assert not amber[:2].any() and not amber[-2:].any(), "the outline follows the mask, not the tile's edge"


# ---------------------------------------------------------------------------------------------------- the report
def test_an_unreadable_volume_becomes_a_flag_with_its_reason_and_the_page_is_written(report, store: Path) -> None:
    out, summary = report
    assert summary.volumes == 19 and summary.unreadable == 1
    flags = read_flags(out / FLAGS)
    unreadable = flags[flags["reason"].str.startswith("unreadable: ")]
    assert unreadable["id"].tolist() == [DAMAGED]
    assert "damaged chunk: its crc32c" in unreadable["reason"].iloc[0]
    data = _page_data(out)
    assert sorted(data["volumes"]["id"]) == sorted(resolve_manifest(store)[0]["id"])
    assert {f"{SPRITES}/{p.name}" for p in (out / SPRITES).glob("*.webp")} == set(data["sheets"])
    page = (out / PAGE).read_text()
    assert page.count("<script") == 2 and '<script src="data.js">' in page  # CSS and JS inlined
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//|url\(\s*[\"']?https?:|@import|fetch\(", page)


def test_a_rerun_skips_finished_sheets_and_draws_only_what_is_missing(report, store: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    shutil.copytree(report[0], out)
    sheets = sorted((out / SPRITES).glob("*.webp"))
    before = {p.name: p.stat().st_mtime_ns for p in sheets}
    again = build_report(store, out, progress=False)
    assert (again.sheets_made, again.sheets_skipped, again.unreadable) == (0, len(sheets), 1)
    assert {p.name: p.stat().st_mtime_ns for p in sheets} == before
    sheets[0].with_suffix(".json").unlink()  # as a kill between the image and its sidecar leaves it
    (out / SPRITES / "stale-000000000000.webp").write_bytes(b"from an older manifest")
    again = build_report(store, out, progress=False)
    assert (again.sheets_made, again.sheets_skipped) == (1, len(sheets) - 1)
    assert sorted(p.name for p in (out / SPRITES).glob("*.webp")) == [p.name for p in sheets]
    retried = build_report(store, out, progress=False, retry_errors=True)
    assert (retried.sheets_made, retried.unreadable) == (1, 1)  # the sheet holding the damaged volume


def test_a_dry_run_counts_the_sheets_and_writes_nothing(store: Path, tmp_path: Path) -> None:
    summary = build_report(store, tmp_path / "report", dry_run=True, progress=False)
    assert (summary.volumes, summary.sheets_made, summary.sheets_skipped) == (19, 3, 0)
    assert not (tmp_path / "report").exists()


def test_the_cli_offers_every_store_of_the_loader() -> None:
    assert sorted(STORE_NAMES) == sorted(STORES)  # named in the CLI so that --help imports no torch


def test_sheets_change_only_for_the_datasets_whose_volumes_changed(store: Path) -> None:
    rows, _ = resolve_manifest(store)
    before = {s.name for s in plan_sheets(rows)}
    fewer = rows[rows["id"] != "ds000202/sub-01/anat/sub-01_T1w"]
    after = {s.name for s in plan_sheets(fewer)}
    assert len(before - after) == 1 and all(n.startswith("ds000202-") for n in before - after)


def test_the_cli_with_a_store_whose_files_are_gone_flags_every_volume_and_exits_3(store: Path, tmp_path: Path,
                                                                                  capsys) -> None:  # fmt: skip
    manifest, meta = read_table(store)
    write_table(manifest.assign(zarr_store="missing.zarr"), tmp_path / "manifest.parquet", meta)
    out = tmp_path / "report"
    argv = ["report", str(tmp_path / "manifest.parquet"), "-o", str(out), "--workers", "0", "--quiet"]
    assert main(argv) == EXIT_DATA
    assert "19 unreadable" in capsys.readouterr().out
    flags = read_flags(out / FLAGS)
    assert set(flags.loc[flags["reason"].str.startswith("unreadable: "), "id"]) == set(manifest["id"])
    assert (out / PAGE).is_file() and len(_page_data(out)["volumes"]["id"]) == 19


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "missing.parquet"], "missing.parquet: no such manifest"),
        (["report", "{m}", "--threshold", "0"], "argument --threshold: expected a positive number"),
        (["report", "{m}", "--store", "tar"], "argument --store: invalid choice"),
        (["report", "{m}", "--store", "wds"], "store: expected one of the stores this manifest has .zarr."),
        (["report", "{m}", "--limit", "0"], "argument --limit: expected a positive integer"),
        (["report", "{m}", "-o", "/no/such/folder/report"], "the folder /no/such/folder does not exist"),
        (["query", "{m}", "--exclude", "nope.parquet"], "nope.parquet: no such flags file"),
        (["query", "{m}", "--exclude", "{m}"], "a flags table needs columns \\['id', 'reason'\\]; 'reason' is missing"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv: list[str], message: str, store: Path, monkeypatch, tmp_path: Path,
                                            capsys) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)  # a report that wrongly went ahead would land here, not in the checkout
    assert main([a.format(m=store) for a in argv + ["--workers", "0"] * (argv[0] == "report")]) == EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()  # argparse's own errors come after its usage lines
    assert re.search(message, lines[-1]) and lines[-1].startswith("openmind-manifest") and "Traceback" not in lines
    assert sum(": error: " in line for line in lines) == 1, lines


def test_query_exclude_leaves_out_exactly_the_flagged_ids(report, store: Path, tmp_path: Path, capsys) -> None:
    flags = read_flags(report[0] / FLAGS)
    assert flags["id"].duplicated().any(), "the demo has volumes with several reasons"
    out = tmp_path / "kept.parquet"
    assert main(["query", str(store), "--exclude", str(report[0] / FLAGS), "-o", str(out)]) == EXIT_OK
    kept, meta = read_table(out)
    everything, _ = read_table(store)
    assert set(kept["id"]) == set(everything["id"]) - set(flags["id"]) and len(kept) < len(everything)
    assert meta["query"] == f"exclude={report[0].resolve() / FLAGS}"
    again, _ = resolve_manifest(f"{meta['query']} of {store}")  # the recorded query reproduces the file
    assert again["id"].tolist() == kept["id"].tolist()


# ---------------------------------------------------------------------------------------------------- the page
@pytest.fixture(scope="module")
def browser():
    try:
        with headless_chromium() as driver:
            yield driver
    except FileNotFoundError as e:
        pytest.fail(f"the report's browser tests need headless Chromium: {e}")


def _shown(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('.tile')].map(t => t.dataset.id)")


def _choose(driver, select_id: str, label_start: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    select = Select(driver.find_element(By.ID, select_id))
    select.select_by_visible_text(next(o.text for o in select.options if o.text.startswith(label_start)))


def test_the_page_renders_without_console_errors_and_draws_its_sprites(browser, report) -> None:
    open_report(browser, report[0])
    assert [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
    assert len(_shown(browser)) == 19
    assert browser.find_element("id", "match-count").text.startswith("19 of 19 volumes match")
    widths = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        Promise.all(window.REPORT.sheets.map(src => new Promise(ok => {
            const image = new Image(); image.onload = () => ok(image.naturalWidth); image.onerror = () => ok(0);
            image.src = src; }))).then(done);""")  # fmt: skip
    assert len(widths) == 3 and min(widths) >= 192


def test_filters_change_what_is_shown(browser, report, store: Path) -> None:
    rows, _ = resolve_manifest(store)
    open_report(browser, report[0])
    _choose(browser, "f-modality", "T1w ")
    assert sorted(_shown(browser)) == sorted(rows.loc[rows["modality"] == "T1w", "id"])
    _choose(browser, "f-dataset", "ds000202 ")
    assert sorted(_shown(browser)) == sorted(rows.loc[(rows["modality"] == "T1w") & (rows["dataset"] == "ds000202"),
                                                      "id"])  # fmt: skip
    browser.find_element("id", "f-reset").click()
    assert len(_shown(browser)) == 19
    assert browser.find_element("id", "dist-note").text.startswith("All volumes")


def test_the_unreadable_volume_is_shown_flagged_with_its_reason(browser, report) -> None:
    open_report(browser, report[0])
    _choose(browser, "f-flag", "unreadable ")
    assert _shown(browser) == [DAMAGED]
    shown = browser.find_element("css selector", ".tile.flagged")
    assert "unreadable: volume " + DAMAGED in shown.text and "damaged chunk" in shown.text
    _choose(browser, "f-flag", "not flagged ")
    flagged = set(read_flags(report[0] / FLAGS)["id"])
    assert len(_shown(browser)) == 19 - len(flagged) and not set(_shown(browser)) & flagged
