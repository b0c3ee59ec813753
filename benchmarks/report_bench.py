"""The QC report at the real corpus's size (114,570 volumes): build time, page load in headless Chromium, bytes.

    .venv/bin/python benchmarks/report_bench.py [--manifest demo/store/manifest.parquet] [--rows 114570]
                                                [--repeat 5] [--screenshot docs/qc_report.png]

Thumbnails are drawn for real from the source manifest's volumes (the demo store by default, as ./setup.sh builds
it), timed per volume in this process. The big manifest repeats those rows with unique ids over ~800 datasets
(manifest_query.replicate); every sheet it plans is written as the real tiles cycled into it (real WebP bytes per
tile), so `build_report` then runs whole on 114,570 rows (flags, the resume check of every sheet, the page data)
with nothing left to draw. Page load is timed in a fresh Chromium profile per run, from navigation start to the
page's first full render (`window.REPORT_READY_MS`, set after every section and the first page of tiles is drawn)
and to the load event (sprites of the first page decoded); a filter change is timed in the page.
`headless_chromium` is also what tests/test_report.py drives the page with.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Without these, Chromium on a machine with no network waits on refused connections (updates, sync, QUIC).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")  # fmt: skip


@contextlib.contextmanager
def headless_chromium(width: int = 1400, height: int = 1100) -> Iterator[Any]:
    """A selenium driver of Debian's headless Chromium in a fresh profile, logging the console (get_log("browser"))."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{' and '.join(missing)} not found: install Debian's chromium and chromium-driver "
                                "(./setup.sh does, as root: apt-get install chromium chromium-driver)")  # fmt: skip
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        try:
            yield driver
        finally:
            driver.quit()


def open_report(driver: Any, folder: str | Path, timeout_s: float = 20) -> None:
    """Load the report's page and wait until it has drawn (body[data-ready])."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get((Path(folder).resolve() / "index.html").as_uri())
    WebDriverWait(driver, timeout_s).until(lambda d: d.execute_script("return document.body.dataset.ready"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", default="demo/store/manifest.parquet", help="converted volumes to draw for real")
    p.add_argument("--rows", type=int, default=114_570, help="rows of the big manifest")
    p.add_argument("--repeat", type=int, default=5, help="page loads")
    p.add_argument("--screenshot", help="also take a screenshot of the source manifest's report into this PNG")
    args = p.parse_args()

    from manifest_query import machine, replicate

    from openmind_tools.loader import PatchDataset
    from openmind_tools.manifest_io import read_table, write_table
    from openmind_tools.report import DATA, build_report
    from openmind_tools.thumbnails import SPRITES, mark_finished, plan_sheets, save_sheet, sheet_image, tile

    print(f"machine: {machine()} (other work shares its CPU)\n")
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small"
        start = time.perf_counter()
        summary = build_report(args.manifest, small, client=None, progress=False)
        print(f"report of {args.manifest}: {summary.volumes} volumes in {time.perf_counter() - start:.2f} s "
              f"(one process, torch import included)")  # fmt: skip
        sprites = sum(f.stat().st_size for f in (small / SPRITES).glob("*.webp"))
        print(f"thumbnails: {sprites / summary.volumes / 1e3:.2f} kB per volume (WebP, sheets of up to 32)")
        start = time.perf_counter()
        tiles = [tile(v.image, v.anatomy) for _, v in PatchDataset(args.manifest, 1).read_each()]
        print(f"read + draw one volume's tile: {(time.perf_counter() - start) / len(tiles) * 1e3:.0f} ms (1 thread)")
        if args.screenshot:
            with headless_chromium(1400, 1180) as driver:
                open_report(driver, small)
                driver.save_screenshot(args.screenshot)
            print(f"screenshot: {args.screenshot}")

        df, meta = read_table(args.manifest)
        big_path = Path(tmp) / "big" / "manifest.parquet"
        big_path.parent.mkdir()
        big = replicate(df, args.rows)
        write_table(big, big_path, meta)
        out = Path(tmp) / "big_report"
        (out / SPRITES).mkdir(parents=True)
        drawn: dict[int, Path] = {}  # sheet length -> a sheet of that many real tiles, linked under each name
        for sheet in plan_sheets(big):
            n = len(sheet.ids)
            if n not in drawn:
                save_sheet(out / SPRITES, sheet, sheet_image([tiles[i % len(tiles)] for i in range(n)]), {})
                drawn[n] = out / SPRITES / sheet.name
                continue
            (out / SPRITES / sheet.name).hardlink_to(drawn[n])
            mark_finished(out / SPRITES, sheet, {})
        start = time.perf_counter()
        summary = build_report(big_path, out, client=None, progress=False)
        built = time.perf_counter() - start
        print(f"\nbig manifest: {summary.volumes} volumes, {big['dataset'].nunique()} datasets, "
              f"{summary.sheets_skipped} sheets (all already drawn), {summary.flagged} flagged")  # fmt: skip
        print(f"build_report with every sheet done (flags, resume check, page data): {built:.1f} s")
        data = (out / DATA).stat().st_size
        total = summary.report_bytes
        print(f"data.js {data / 1e6:.1f} MB ({data / summary.volumes:.0f} B per volume); report {total / 1e6:.0f} MB, "
              f"{total / summary.volumes / 1e3:.2f} kB per volume")  # fmt: skip

        ready, loaded, filtered = [], [], []
        for _ in range(args.repeat):
            with headless_chromium() as driver:
                open_report(driver, out)
                ready.append(driver.execute_script("return window.REPORT_READY_MS"))
                loaded.append(driver.execute_script("const t = performance.getEntriesByType('navigation')[0];"
                                                    "return t.loadEventEnd - t.startTime"))  # fmt: skip
                filtered.append(driver.execute_script(
                    "const s = document.getElementById('f-modality'), t0 = performance.now(); s.value = '1';"
                    "s.dispatchEvent(new Event('change')); return performance.now() - t0"))  # fmt: skip
                errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
                if errors:
                    raise SystemExit(f"console errors: {errors}")
        print("\n| page (114,570 volumes) | median ms | best ms |\n|---|---:|---:|")
        for name, times in (("first render (REPORT_READY_MS)", ready), ("load event (first page's sprites in)", loaded),
                            ("modality filter applied and page redrawn", filtered)):  # fmt: skip
            print(f"| {name} | {statistics.median(times):.0f} | {min(times):.0f} |")


if __name__ == "__main__":
    main()
