"""The overview page in a real browser: `forecaster run --demo` on a small replay (the one
test_end_to_end's Prometheus scrapes, tests/deploy/conftest.py), then headless Chromium
(through selenium and chromedriver) opens the URL the demo printed and reads the rendered
DOM: the chart's SVG has a size and holds the actuals, the median and the band with points,
and the series table lists the demo's series. A screenshot is kept in tmp_path and, with
FORECASTER_SCREENSHOT=path, there too (docs/overview.png is made this way)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import IN_CI, require_binary, served_url
from tests.deploy.conftest import DEMO_SERIES, ROOT

pytestmark = pytest.mark.slow
FORECASTER = str(Path(sys.executable).with_name("forecaster"))
SERIES = DEMO_SERIES
SHOWN = "flights.JFK"
WINDOW = (1280, 1000)


@pytest.fixture(scope="module")
def overview_url(demo_lines) -> str:
    """`forecaster run --demo` serving after its replay (tests/deploy/conftest.py's: three
    series up to 2013-02-20, so there are forecasts, scores and anomalies to show): the
    overview URL it printed."""
    assert served_url(demo_lines, "serving").endswith("/metrics")
    return served_url(demo_lines, "overview")


def _chrome() -> Any:
    chromium = require_binary("chromium", "chromium")
    driver = require_binary("chromedriver", "chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        if IN_CI:
            pytest.fail(f"CI=true requires selenium: {exc}")
        pytest.skip(f"selenium is not installed (pip install -e '.[dev]'): {exc}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors, CSP's
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def test_the_demo_serves_the_page_fast(overview_url):
    assert overview_url.endswith("/")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        r = httpx.get(overview_url, params={"series": SHOWN}, timeout=10)
        times.append(time.perf_counter() - t0)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert min(times) < 1.0, times  # measured: ~20 ms on this store


def test_the_chart_renders_in_a_browser(overview_url, tmp_path):
    from selenium.webdriver.common.by import By

    browser = _chrome()
    try:
        browser.get(f"{overview_url}?series={SHOWN}")
        svg = browser.find_element(By.CSS_SELECTOR, "svg.chart")
        assert svg.size["width"] > 600 and svg.size["height"] > 200, svg.size
        heading = browser.find_element(By.ID, "chart").text
        assert heading == f"{SHOWN}: actuals and the newest forecast"
        for css, least in (("path.actual", 100), ("path.median", 24), ("path.band", 24)):
            el = svg.find_element(By.CSS_SELECTOR, css)
            assert int(el.get_attribute("data-points")) >= least, css
            # What the browser laid out: a path with extent, inside the chart.
            box = browser.execute_script(
                "const b = arguments[0].getBBox(); return [b.width, b.height];", el
            )
            assert box[0] > 10 and box[1] > 5, (css, box)
            assert el.size["width"] > 0 and el.location["x"] >= svg.location["x"], css
        cells = browser.find_elements(By.CSS_SELECTOR, "table.series tr td:first-child")
        assert [c.text for c in cells] == SERIES
        legend = svg.find_element(By.CSS_SELECTOR, "g.legend").text
        assert "actual" in legend and "median (v1)" in legend and "80% band" in legend
        # No script on the page, and nothing its Content-Security-Policy had to refuse.
        assert browser.execute_script("return document.scripts.length") == 0
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
        shot = tmp_path / "overview.png"
        assert browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        keep = os.environ.get("FORECASTER_SCREENSHOT")
        if keep:
            target = Path(keep) if Path(keep).is_absolute() else ROOT / keep
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(shot.read_bytes())
    finally:
        browser.quit()
