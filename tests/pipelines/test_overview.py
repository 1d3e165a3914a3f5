"""The overview page at /: rendered from a real SQLite store (actuals, a model's rolling
forecasts, scores, anomalies, job runs), checked against what the store holds; and served
by the real HTTP app (token, status codes, headers, a broken store)."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from datetime import timedelta
from html.parser import HTMLParser
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from forecaster.clock import FixedClock
from forecaster.config import MetricsSettings, SeriesDefaults
from forecaster.metrics import ServiceMetrics
from forecaster.store import Store
from pipelines.http import HttpApp
from pipelines.ingest import ingest_batch
from pipelines.overview import Overview, OverviewLimits
from pipelines.sources.base import Batch, raw_frame
from pipelines.svg import Chart, Line, nice_ticks, time_chart, time_ticks
from tests.pipelines.test_plot import SPIKE, _rolled
from tests.pipelines.test_predict import NOW, START, _ingest_days, trained  # noqa: F401

NEWEST = START + timedelta(days=27) - timedelta(hours=1)  # the rolled store's last point
CLOCK = FixedClock(NEWEST + timedelta(hours=3))
HOSTILE = "<script>alert('x')</script>'; DROP TABLE series;--"
TOKEN = "overview-t0ken"


class Page(HTMLParser):
    """What a test reads off the page: the tables' cell texts by class, the attributes of
    every element, the texts inside each SVG group, and all visible text."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.group_texts: dict[str, list[tuple[dict[str, str], str]]] = defaultdict(list)
        self.text: list[str] = []
        self._rows: list[list[str]] | None = None
        self._cell: list[str] | None = None
        self._group: str | None = None
        self._svg_text: tuple[dict[str, str], list[str]] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a))
        if tag == "table":
            self._rows = self.tables.setdefault(a.get("class", ""), [])
        elif tag == "tr" and self._rows is not None:
            self._rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "g":
            self._group = a.get("class")
        elif tag == "text":
            self._svg_text = (a, [])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._rows:
            self._rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._rows = None
        elif tag == "g":
            self._group = None
        elif tag == "text" and self._svg_text is not None:
            self.group_texts[self._group or ""].append(
                (self._svg_text[0], "".join(self._svg_text[1]))
            )
            self._svg_text = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._svg_text is not None:
            self._svg_text[1].append(data)

    def table(self, cls: str) -> list[dict[str, str]]:
        head, *rows = self.tables[cls]
        return [dict(zip(head, r, strict=True)) for r in rows]

    def one(self, tag: str, cls: str) -> dict[str, str]:
        (found,) = [a for t, a in self.elements if t == tag and cls in a.get("class", "").split()]
        return found

    def all_text(self) -> str:
        return "".join(self.text)

    def value_of_y(self) -> Any:
        """Pixel y -> data value, from the y axis' tick labels and their positions."""
        ticks = [
            (float(a["y"]) - 4, float(t.replace(",", ""))) for a, t in self.group_texts["y-ticks"]
        ]
        (y0, v0), (y1, v1) = ticks[0], ticks[-1]
        return lambda y: v0 + (y - y0) * (v1 - v0) / (y1 - y0)


def points(d: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in re.findall(r"(-?[\d.]+),(-?[\d.]+)", d)]


def _job_runs(store: Store) -> None:
    """Job runs as the daemon records them: predict fine, evaluate failing once."""
    at = NEWEST - timedelta(hours=2)
    for job, when, status, detail in [
        ("predict", at, "succeeded", "model v1: 2 series advanced"),
        ("evaluate", at, "failed", "RuntimeError: the store went away"),
        ("predict", at + timedelta(hours=1), "succeeded", "model v1: 2 series advanced"),
        ("evaluate", at + timedelta(hours=1), "succeeded", "model v1: 48 forecasts scored"),
    ]:
        store.claim_job_run(job, when, when)
        store.finish_job_run(
            job, when, status=status, finished_at=when + timedelta(seconds=2), detail=detail
        )


@pytest.fixture(scope="module")
def rolled(tmp_path_factory, trained):  # noqa: F811
    store = _rolled(f"sqlite:///{tmp_path_factory.mktemp('overview') / 'store.db'}", trained)
    _job_runs(store)
    yield store
    store.close()


def _page(store: Store, series: str | None = None, **kw: Any) -> tuple[int, Page]:
    status, html = Overview(store, CLOCK, **kw).page(series)
    assert "<script" not in html.lower()
    return status, Page(html)


def test_the_series_table_shows_each_series_freshness_and_accuracy(rolled):
    status, page = _page(rolled)
    assert status == 200
    rows = {r["series"]: r for r in page.table("series")}
    assert sorted(rows) == ["sine.0", "sine.1"]
    ids = [i for i, _ in rolled.series_catalogue()]
    actuals, origins = rolled.latest_actuals(ids, "v1"), rolled.newest_origins("v1", ids)
    accuracy = {(r["series"], r["model"]): r for r in rolled.series_accuracy()}
    for sid, name in rolled.series_catalogue():
        row = rows[name]
        assert row["last actual (UTC)"] == NEWEST.strftime("%Y-%m-%d %H:%M")
        assert row["age"] == "3.0 h"  # the clock is 3 h past the newest point
        assert row["value"] == f"{actuals[sid]['value']:,.2f}"
        lo, hi = actuals[sid]["yhat_lower"], actuals[sid]["yhat_upper"]
        assert row["band served for it"] == f"{lo:,.2f} .. {hi:,.2f}"
        assert row["newest origin"] == origins[sid].strftime("%Y-%m-%d %H:%M")
        assert row["MASE champion"] == f"{accuracy[(name, 'v1')]['mase']:,.2f}"
        best = min(accuracy[(name, f"seasonal_naive_{s}")]["mase"] for s in ("daily", "weekly"))
        assert row["MASE best naive"] == f"{best:,.2f}"
        assert int(row["anomalies"]) == rolled.anomaly_counts([sid])[sid]
    assert '<span class="bad">3.0 h</span>' in Overview(rolled, CLOCK).page()[1]  # stale: > 2 h


def test_the_chart_draws_the_stored_actuals_median_band_and_anomalies(rolled):
    status, page = _page(rolled, "sine.0")
    assert status == 200
    start = NEWEST - timedelta(days=OverviewLimits().days)
    obs = rolled.read_observations("sine.0", since=start)
    sid = dict((n, i) for i, n in rolled.series_catalogue())["sine.0"]
    forecast = rolled.newest_origin_forecasts("v1", [sid], range(1, 100))
    assert len(forecast) == 24 and obs.height == 5 * 24 + 1
    value = page.value_of_y()
    tol = 0.2 * abs(value(1) - value(0))  # coordinates are rounded to 0.1 px

    actual = page.one("path", "actual")
    assert int(actual["data-points"]) == obs.height
    got = [value(y) for _, y in points(actual["d"])]
    assert got == pytest.approx(obs["value"].to_list(), abs=tol)

    median = page.one("path", "median")
    assert int(median["data-points"]) == len(forecast)
    got = [value(y) for _, y in points(median["d"])]
    assert got == pytest.approx([r["yhat"] for r in forecast], abs=tol)

    band = page.one("path", "band")
    assert int(band["data-points"]) == len(forecast)
    edge = [value(y) for _, y in points(band["d"])]  # along the upper edge, back along the lower
    assert edge[:24] == pytest.approx([r["yhat_upper"] for r in forecast], abs=tol)
    assert edge[24:] == pytest.approx([r["yhat_lower"] for r in forecast][::-1], abs=tol)
    # The forecast starts right of the actuals: time runs left to right.
    assert points(median["d"])[0][0] > points(actual["d"])[-1][0]

    flagged = [
        a
        for a in rolled.list_anomalies("sine.0", limit=1000)
        if a["model"] == "v1" and a["ts"] >= start
    ]
    assert SPIKE in {a["ts"] for a in flagged}
    assert int(page.one("g", "anomalies")["data-points"]) == len(flagged)
    assert f"{SPIKE:%Y-%m-%d %H:%M} UTC: actual" in page.all_text()  # the spike's tooltip
    naive = min(
        (
            r
            for r in rolled.series_accuracy()
            if r["series"] == "sine.0" and r["model"].startswith("seasonal_naive_")
        ),
        key=lambda r: r["mase"],
    )["model"].removeprefix("seasonal_naive_")
    legend = [t for _, t in page.group_texts["legend"]]
    assert legend == [
        "actual", "median (v1)", f"{naive} seasonal naive", "80% band",
        "anomaly (bar: the band served then)",
    ]  # fmt: skip
    naive_path = page.one("path", "naive")
    assert int(naive_path["data-points"]) == 24
    assert page.group_texts["now"][0][1] == "newest origin"
    assert page.one("svg", "chart")["viewbox"] == "0 0 1160 340"  # (the parser lowercases names)


def test_accuracy_anomalies_and_job_health(rolled):
    _, page = _page(
        rolled,
        "sine.1",
        timings=lambda: [{"job": "predict", "mean_s": 0.25, "max_s": 0.5, "missed": 1}],
    )
    mine = {r["model"]: r for r in page.table("accuracy")}
    stored = {r["model"]: r for r in rolled.series_accuracy() if r["series"] == "sine.1"}
    assert set(mine) == {"v1 (champion)", "mstl", "seasonal_naive_daily", "seasonal_naive_weekly"}
    assert mine["mstl"]["band coverage"] == f"{stored['mstl']['coverage']:.1%}"
    assert mine["v1 (champion)"]["MASE"] == f"{stored['v1']['mase']:.3f}"
    assert mine["v1 (champion)"]["band coverage"] == f"{stored['v1']['coverage']:.1%}"
    assert mine["seasonal_naive_daily"]["band coverage"] == "-"
    pooled = {r["model"]: r for r in page.table("pooled")}
    assert pooled["v1 (champion)"]["series"] == "2"

    newest = rolled.list_anomalies(limit=OverviewLimits().anomalies)
    shown = page.table("anomalies")
    assert [(r["series"], r["time (UTC)"]) for r in shown] == [
        (a["series"], a["ts"].strftime("%Y-%m-%d %H:%M")) for a in newest
    ]

    jobs = {r["job"]: r for r in page.table("jobs")}
    assert jobs["evaluate"]["runs"] == "2" and jobs["evaluate"]["failed"] == "1"
    assert jobs["evaluate"]["status"] == "succeeded"
    assert jobs["evaluate"]["last failure"] == (NEWEST - timedelta(hours=2)).strftime(
        "%Y-%m-%d %H:%M"
    )
    assert jobs["evaluate"]["seconds (mean / max)"] == "2.000"  # from job_runs: no timings
    assert jobs["predict"]["failed"] == "0" and jobs["predict"]["missed"] == "1"
    assert jobs["predict"]["seconds (mean / max)"] == "0.250 / 0.500"  # the daemon's own
    assert jobs["predict"]["last run said"] == "model v1: 2 series advanced"


def test_limits_bound_what_one_request_reads(rolled):
    lim = OverviewLimits(max_series=1, days=1, max_horizon=6, anomalies=2)
    _, page = _page(rolled, limits=lim)
    assert [r["series"] for r in page.table("series")] == ["sine.0"]
    assert "showing the first 1 of 2 series" in page.all_text()
    assert int(page.one("path", "actual")["data-points"]) == 25
    assert int(page.one("path", "median")["data-points"]) == 6
    assert len(page.table("anomalies")) == 2
    # A series past the listed ones can still be opened by name.
    status, page = _page(rolled, "sine.1", limits=lim)
    assert status == 200
    assert "sine.1: actuals and the newest forecast" in page.all_text()
    # A fine series shows fewer days rather than more points.
    _, page = _page(rolled, limits=OverviewLimits(max_points=10))
    assert int(page.one("path", "actual")["data-points"]) == 11


def _store_with(sqlite_url: str, names: list[str], source: str = "test") -> Store:
    store = Store(sqlite_url)
    store.upgrade()
    hours = [START + timedelta(hours=h) for h in range(24)]
    rows = raw_frame(
        [n for n in names for _ in hours],
        [h.isoformat() for h in hours] * len(names),
        [str(float(h % 7)) for h in range(24)] * len(names),
        source,
    )
    ingest_batch(store, source, Batch(rows, {"day": 1}), SeriesDefaults(), NOW)
    return store


def test_a_hostile_series_name_is_shown_as_text(sqlite_url):
    store = _store_with(sqlite_url, [HOSTILE, 'a&b "quoted"'], source="<i>src</i>")
    store.claim_job_run("ingest:<i>src</i>", NEWEST, NEWEST)  # what it said is shown as text
    store.finish_job_run("ingest:<i>src</i>", NEWEST, status="failed", finished_at=NEWEST,
                         detail=f"ValueError: {HOSTILE}")  # fmt: skip
    for series in (None, HOSTILE):
        status, html = Overview(store, CLOCK).page(series)
        assert status == 200
        assert "<script" not in html.lower() and "alert('x')" not in html
        assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&#x27;; DROP TABLE" in html
        page = Page(html)
        assert {r["series"] for r in page.table("series")} == {HOSTILE, 'a&b "quoted"'}
        hrefs = {a["href"] for t, a in page.elements if t == "a"}
        assert f"?series={quote(HOSTILE, safe='')}#chart" in hrefs
        (job,) = page.table("jobs")
        assert (
            job["job"] == "ingest:<i>src</i>" and job["last run said"] == f"ValueError: {HOSTILE}"
        )
        assert [r["source"] for r in page.table("sources")] == ["<i>src</i>"]
        assert "<i>" not in html
    assert f"{HOSTILE}: actuals and the newest forecast" in Page(html).all_text()
    assert int(Page(html).one("path", "actual")["data-points"]) == 24
    assert {n for _, n in store.series_catalogue()} == {HOSTILE, 'a&b "quoted"'}  # intact
    status, html = Overview(store, CLOCK).page("<img src=x onerror=alert(1)>")
    assert status == 404 and "<img" not in html
    assert "No series is named &#x27;&lt;img src=x onerror=alert(1)&gt;&#x27;." in html
    store.close()


def test_an_empty_store_says_what_comes_next(sqlite_url):
    store = Store(sqlite_url)
    store.upgrade()
    status, html = Overview(store, CLOCK).page()
    assert status == 200 and "<svg" not in html
    text = Page(html).all_text()
    for said in ("No series yet", "No model yet", "Nothing scored yet", "No job has run yet"):
        assert said in text
    assert Overview(store, CLOCK).page("sine.0")[0] == 404
    store.close()


def test_without_a_model_the_chart_shows_the_actuals_only(sqlite_url):
    store = _store_with(sqlite_url, ["a"])
    status, page = _page(store)
    assert status == 200 and "No model yet" in page.all_text()
    assert int(page.one("path", "actual")["data-points"]) == 24
    assert not [a for t, a in page.elements if "median" in a.get("class", "")]
    store.close()


# -- the SVG helpers ----------------------------------------------------------------------


def test_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0.3, 9.7) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(-12, 130) == [-50, 0, 50, 100, 150]
    assert nice_ticks(0.012, 0.049) == [0.01, 0.02, 0.03, 0.04, 0.05]
    assert nice_ticks(5, 5) == [4, 4.5, 5, 5.5, 6]
    lo = START.timestamp() + 3600 * 5
    step, ticks = time_ticks(lo, lo + 5 * 86_400)
    assert step == 86_400 and len(ticks) == 5
    assert all(t % 86_400 == 0 for t in ticks) and ticks[0] > lo  # UTC midnights inside
    step, ticks = time_ticks(lo, lo + 10 * 3600)
    assert step == 2 * 3600 and all(t % 7200 == 0 for t in ticks)


def test_a_missing_value_breaks_the_line_and_nothing_draws_nothing():
    xs = [0.0, 3600.0, 7200.0, 10800.0, 14400.0]
    svg = time_chart(Chart(lines=[Line("x <&>", xs, [1.0, 2.0, None, 4.0, 5.0], "x")]))
    (d,) = re.findall(r'class="line x" data-points="4" d="([^"]+)"', svg)
    assert d.count("M") == 2 and len(points(d)) == 4
    assert "x &lt;&amp;&gt;" in svg and "<&>" not in svg  # the legend label, escaped
    assert time_chart(Chart(lines=[Line("x", [], [], "x")])) == ""


# -- served over HTTP ---------------------------------------------------------------------


@pytest.fixture
def serve():
    apps: list[HttpApp] = []

    def start(store: Store, token: str | None = None) -> HttpApp:
        metrics = ServiceMetrics(store, MetricsSettings(), CLOCK, job_ids=["predict"])
        app = HttpApp(
            host="127.0.0.1",
            port=0,
            token=token,
            metrics=metrics,
            readiness=lambda: {"database": True},
            overview=Overview(store, CLOCK).page,
        )
        app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop()


def test_the_page_is_served_at_the_root_behind_the_token(rolled, serve):
    app = serve(rolled, token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{app.url}/").status_code == 401
    assert (
        httpx.get(f"{app.url}/?series=sine.1", headers={"Authorization": "Bearer no"}).status_code
        == 401
    )
    r = httpx.get(f"{app.url}/", headers=auth)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src" not in r.headers["content-security-policy"]  # default-src 'none' holds
    assert r.headers["content-security-policy"].startswith("default-src 'none'")
    assert "sine.0: actuals and the newest forecast" in Page(r.text).all_text()
    r = httpx.get(f"{app.url}/", params={"series": "sine.1"}, headers=auth)
    assert r.status_code == 200 and "sine.1: actuals and the newest forecast" in r.text
    r = httpx.get(f"{app.url}/", params={"series": HOSTILE}, headers=auth)
    assert r.status_code == 404 and "<script" not in r.text
    for path in ("/nope", "/index.html", "/overview", "/metrics/x", "/x/"):
        r = httpx.get(f"{app.url}{path}", headers=auth)
        assert (r.status_code, r.text) == (404, "not found\n"), path
    assert httpx.get(f"{app.url}/", params={"series": "x" * 600}, headers=auth).status_code == 400
    many = "&".join(f"k{i}=1" for i in range(50))
    assert httpx.get(f"{app.url}/?{many}", headers=auth).status_code == 400
    assert httpx.get(f"{app.url}/healthz").status_code == 200  # still open


def test_a_page_that_fails_is_a_500_with_a_log_line_and_no_traceback(serve, tmp_path, caplog):
    unmigrated = Store(f"sqlite:///{tmp_path / 'empty.db'}")  # no tables: every read fails
    app = serve(unmigrated)
    with caplog.at_level(logging.ERROR, logger="pipelines.http"):
        r = httpx.get(f"{app.url}/")
    assert r.status_code == 500
    assert r.text == "the overview failed; see the service log\n"
    # Errors only: an earlier test may have configured logging at info, and the app's start
    # line is logged before the block.
    (record,) = [
        rec
        for rec in caplog.records
        if rec.name == "pipelines.http" and rec.levelno >= logging.ERROR
    ]
    assert record.exc_info is not None and "no such table" in str(record.exc_info[1])
    unmigrated.close()


def test_a_series_the_champion_was_not_trained_on_says_so(rolled):
    """A series the champion serves with its own scaler (series_scalers: it came after
    training) is shown as served by the model, not trained on it."""
    import sqlalchemy as sa

    from forecaster import schema

    (sid,) = [i for i, n in rolled.series_catalogue() if n == "sine.1"]
    vid = rolled.champion()["id"]
    rolled.save_series_scalers(
        vid, [{"series_id": sid, "center": 0.0, "scale": 1.0, "n_points": 3, "fitted_to": NEWEST}]
    )
    try:
        rows = {r["series"]: r for r in _page(rolled)[1].table("series")}
        assert rows["sine.1"]["served by"] == "model (not trained on it)"
        assert rows["sine.0"]["served by"] != "model (not trained on it)"
        # A blend (forecaster.serving) is shown by its weights, heaviest member first.
        mv = schema.model_versions
        with rolled.begin() as conn:
            metrics = conn.execute(sa.select(mv.c.metrics).where(mv.c.id == vid)).scalar_one()
            blend = {"sine.0": {"model": 0.3, "mstl": 0.7}}
            conn.execute(
                sa.update(mv).where(mv.c.id == vid).values(metrics={**metrics, "serving": blend})
            )
        st = schema.series_states
        (sid0,) = [i for i, n in rolled.series_catalogue() if n == "sine.0"]
        state = (st.c.model_version_id == vid) & (st.c.series_id == sid0)
        try:
            rows = {r["series"]: r for r in _page(rolled)[1].table("series")}
            assert rows["sine.0"]["served by"] == "mstl 0.70, model 0.30"
            # The weights predict recorded beside the state (they follow the members'
            # tracked errors) are what serves now, and what the page shows.
            with rolled.begin() as conn:
                conn.execute(
                    sa.update(st).where(state).values(weights={"model": 0.6, "naive_daily": 0.4})
                )
            rows = {r["series"]: r for r in _page(rolled)[1].table("series")}
            assert rows["sine.0"]["served by"] == "model 0.60, naive_daily 0.40"
        finally:
            with rolled.begin() as conn:
                conn.execute(sa.update(mv).where(mv.c.id == vid).values(metrics=metrics))
                conn.execute(sa.update(st).where(state).values(weights=None))
    finally:
        with rolled.begin() as conn:
            conn.execute(sa.delete(schema.series_scalers))
