"""The operator's overview page at `/`: for a user without Grafana, one server-rendered HTML
page with an inline SVG chart (no script, no build step).

It shows the series with their freshness, one series' recent actuals with the champion's
newest forecast (median and calibrated band), its best seasonal naive and its anomalies,
accuracy against the baselines (the `series_accuracy` table the evaluate job keeps), the
newest anomalies, and the health of every job (`job_runs`) and source. Everything comes
through the Store's bounded reads, mostly the ones /metrics runs at each scrape, each capped
by `OverviewLimits`. Escaping is the default: a table cell is escaped unless it is `_Html`
built here, so a series named `<script>` is shown as text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from forecaster.clock import Clock
from pipelines.svg import Band, Chart, Line, Marks, time_chart

if TYPE_CHECKING:
    from forecaster.store import Store

__all__ = ["Overview", "OverviewLimits"]

BASELINE = "seasonal_naive_"  # model keys of the baselines: seasonal_naive_daily, _weekly
NO_SERIES = (
    "No series yet: the ingest job stores the first points at its next run "
    "(<code>forecaster ingest</code> runs it now)."
)
NO_MODEL = (
    "No model yet: the first is trained once <code>retrain.min_history</code> of data is "
    "stored (<code>forecaster train</code> trains one now). Until then only actuals are drawn."
)
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;padding:12px 20px;max-width:1200px;color:#222}
h1{font-size:20px;margin:4px 0}h2{font-size:16px;margin:16px 0 6px}h3{font-size:14px;margin:6px 0 4px}
.meta{color:#555;margin:0 0 8px}.notice{background:#fff6d6;border:1px solid #e8d48a;padding:6px 10px}
table{border-collapse:collapse;font-size:13px}th,td{padding:3px 9px;border-bottom:1px solid #e4e4e4}
th{text-align:left;background:#f4f4f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.sel td{background:#eef5fc}.ok{color:#17813a}.bad{color:#c0271d;font-weight:600}
.cols{display:flex;gap:28px;flex-wrap:wrap}.caption{color:#555;font-size:12px;margin:2px 0 0}
svg.chart{max-width:100%;height:auto;display:block}code{background:#f2f2f2;padding:0 3px}
a{color:#1f5fa8;text-decoration:none}form{margin:6px 0}
"""


@dataclass(frozen=True, kw_only=True)
class OverviewLimits:
    """What one request may read and draw at most. Besides these, a request reads one row
    per series (names, watermarks) and per series and model (series_accuracy), and the
    job_runs that retention keeps (`retention.job_runs`, 30 days by default)."""

    max_series: int = 200  # rows of the series table (by name)
    days: int = 5  # of actuals drawn before the newest point
    max_points: int = 2_000  # actuals drawn: a finer series shows a shorter span
    max_horizon: int = 500  # forecast steps drawn
    anomalies: int = 12  # rows of the newest-anomalies table
    chart_anomalies: int = 500  # anomalies marked on the chart
    chart_width: int = 1160
    chart_height: int = 340


class _Html(str):
    """Markup built in this module: inserted as is. Every other value is escaped."""


def _cell(v: Any) -> str:
    return v if isinstance(v, _Html) else "-" if v is None else escape(str(v))


def _table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], *, cls: str = "", mark: int = -1
) -> _Html:
    """Columns whose header ends in a space are numeric (right-aligned); row `mark` is
    highlighted."""
    num = [h.endswith(" ") for h in headers]
    head = "".join(f"<th>{escape(h.strip())}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        tr = '<tr class="sel">' if i == mark else "<tr>"
        tds = "".join(
            f'<td class="n">{_cell(v)}</td>' if n else f"<td>{_cell(v)}</td>"
            for v, n in zip(row, num, strict=True)
        )
        body.append(f"{tr}{tds}</tr>")
    return _Html(f'<table class="{cls}"><tr>{head}</tr>{"".join(body)}</table>')


def _served_by(entry: Any) -> str:
    """A series' serving entry (forecaster.serving) in words: a member, or a blend's weights."""
    if entry is None:
        return "-"
    if isinstance(entry, str):
        return entry
    weights = sorted(entry.items(), key=lambda kv: -kv[1])
    if len(weights) == 1:
        return str(weights[0][0])
    return ", ".join(f"{m} {w:.2f}" for m, w in weights if w >= 0.005)


def _num(v: float | None, digits: int = 2) -> str | None:
    return None if v is None or not math.isfinite(v) else f"{v:,.{digits}f}"


def _pct(v: float | None) -> str | None:
    return None if v is None else f"{v:.1%}"


def _ts(ts: datetime | None) -> str | None:
    return None if ts is None else ts.strftime("%Y-%m-%d %H:%M")


def _age(d: timedelta | None) -> str | None:
    if d is None:
        return None
    s = d.total_seconds()
    sign, s = ("-" if s < 0 else ""), abs(s)
    if s < 90:
        return f"{sign}{s:.0f} s"
    if s < 5400:
        return f"{sign}{s / 60:.0f} min"
    return f"{sign}{s / 3600:.1f} h" if s < 172_800 else f"{sign}{s / 86_400:.1f} d"


def _flag(text: str | None, good: bool | None) -> _Html | str | None:
    if text is None or good is None:
        return text
    return _Html(f'<span class="{"ok" if good else "bad"}">{escape(text)}</span>')


def _notice(markup: str) -> str:
    return f'<p class="notice">{markup}</p>'


def _link(name: str) -> _Html:
    """A link selecting the series: its name URL-quoted in the href, escaped as text."""
    return _Html(f'<a href="?series={quote(name, safe="")}#chart">{escape(name)}</a>')


def geomean(values: Iterable[float]) -> float | None:
    good = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, good)) / len(good)) if good else None


class Overview:
    """Renders the page from `store`, with `clock` as "now" (simulated in a replay).

    timings, when given, returns the daemon's own per-job wall times (rows with job,
    mean_s, max_s, missed: `pipelines.daemon.job_table`); without it, durations come from
    job_runs (finished_at - started_at, by the service's clock)."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        limits: OverviewLimits | None = None,
        timings: Callable[[], Sequence[Mapping[str, Any]]] | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.limits = limits or OverviewLimits()
        self.timings = timings

    def page(self, series: str | None = None) -> tuple[int, str]:
        """(HTTP status, HTML): 200, or 404 when `series` names no stored series."""
        store, lim = self.store, self.limits
        now = self.clock.now()
        targets = sorted(store.prediction_targets(), key=lambda r: r["name"])
        champion = store.champion()
        model = f"v{champion['id']}" if champion is not None else None
        shown = targets[: lim.max_series]
        if series is None:
            selected = shown[0] if shown else None
        else:
            selected = next((t for t in targets if t["name"] == series), None)
        ids = sorted({t["id"] for t in shown} | ({selected["id"]} if selected else set()))
        accuracy = store.series_accuracy()

        parts = [self._header(now, champion, len(targets))]
        if series is not None and selected is None:
            parts.append(_notice(f"No series is named {escape(repr(series))}."))
        if not targets:
            parts.append(_notice(NO_SERIES))
        else:
            parts.append(self._series(shown, len(targets), selected, ids, accuracy, model, now))
        if selected is not None:
            parts.append(self._chart(selected, accuracy, model))
        parts.append(self._accuracy(selected, accuracy, model))
        parts.append(self._incidents())
        parts.append(self._anomalies())
        parts.append(self._jobs())
        name = escape(selected["name"]) if selected else "overview"
        html = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta http-equiv="refresh" content="60"><title>forecaster: {name}</title>'
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>"
        )
        return (404 if series is not None and selected is None else 200), html

    def _header(self, now: datetime, champion: Mapping[str, Any] | None, n_series: int) -> str:
        waiting = sum(m["stage"] == "candidate" for m in self.store.serving_models())
        who = ""
        if champion is not None:
            who = (
                f" &middot; champion <b>v{champion['id']}</b> ({escape(str(champion['kind']))}, "
                f"trained on data to {_ts(champion['trained_to']) or '-'})"
                f"{f', {waiting} candidate(s) waiting' if waiting else ''}"
            )
        return (
            f'<h1>forecaster overview</h1><p class="meta">{n_series} series{who} &middot; as of '
            f"{_ts(now)} UTC by the service's clock &middot; refreshes every minute</p>"
            + (_notice(NO_MODEL) if champion is None else "")
        )

    def _series(
        self,
        shown: list[dict[str, Any]],
        total: int,
        selected: Mapping[str, Any] | None,
        ids: list[int],
        accuracy: list[dict[str, Any]],
        model: str | None,
        now: datetime,
    ) -> str:
        store = self.store
        actuals = store.latest_actuals(ids, model)
        origins = store.newest_origins(model, ids) if model is not None else {}
        anomaly_n = store.anomaly_counts(ids)
        # What serves each series under the champion (forecaster.serving).
        champion = store.champion()
        serving = store.serving_by_series(champion, "model (not trained on it)")
        mase = {(r["series_id"], r["model"]): r["mase"] for r in accuracy}
        best_naive: dict[int, float] = {}
        for r in accuracy:
            if r["model"].startswith(BASELINE) and r["mase"] is not None:
                sid = r["series_id"]
                best_naive[sid] = min(r["mase"], best_naive.get(sid, math.inf))
        rows = []
        for t in shown:
            sid, freq = t["id"], t["freq_seconds"]
            late = timedelta(seconds=max(7200, 2 * freq))  # what the stale alerts allow
            a = actuals.get(sid, {})
            ts, origin = a.get("ts"), origins.get(sid)
            lo, hi, value = a.get("yhat_lower"), a.get("yhat_upper"), a.get("value")
            band = f"{_num(lo)} .. {_num(hi)}" if lo is not None and hi is not None else None
            inside = None if band is None or value is None else lo <= value <= hi
            age = now - ts if ts is not None else None
            behind = ts - origin if ts is not None and origin is not None else None
            best = best_naive.get(sid)
            ours = mase.get((sid, model)) if model is not None else None
            rows.append(
                [_link(t["name"]), _ts(ts), _flag(_age(age), age is not None and age <= late),
                 _num(value), _flag(band, inside), _ts(origin),
                 _flag(_age(behind), None if behind is None else behind <= late),
                 _flag(_num(ours), None if ours is None or best is None else ours <= best),
                 _num(best), escape(_served_by(serving.get(t["name"]))), anomaly_n.get(sid, 0)]
            )  # fmt: skip
        headers = ["series", "last actual (UTC)", "age ", "value ", "band served for it ",
                   "newest origin", "origin behind ", "MASE champion ", "MASE best naive ",
                   "served by", "anomalies "]  # fmt: skip
        more = (
            f'<p class="meta">showing the first {len(shown)} of {total} series by name; '
            "open another with <code>?series=NAME</code></p>"
            if total > len(shown)
            else ""
        )
        mark = next((i for i, t in enumerate(shown) if t is selected), -1)
        return f"<h2>Series</h2>{_table(headers, rows, cls='series', mark=mark)}{more}"

    def _chart(
        self, target: Mapping[str, Any], accuracy: list[dict[str, Any]], model: str | None
    ) -> str:
        store, lim = self.store, self.limits
        name, sid = target["name"], target["id"]
        heading = f'<h2 id="chart">{escape(name)}: actuals and the newest forecast</h2>'
        if target["watermark"] is None:
            return heading + _notice("No points stored for this series yet.")
        end = target["watermark"]
        span = timedelta(seconds=min(lim.days * 86_400, lim.max_points * target["freq_seconds"]))
        start = end - span
        obs = store.recent_values([sid], [(start, end)]).sort("ts")
        xs = [t.timestamp() for t in obs["ts"].to_list()]
        lines = [Line("actual", xs, obs["value"].to_list(), "actual", color="#111", width=1.4)]
        bands, marks = [], []
        steps = range(1, lim.max_horizon + 1)
        forecast = store.newest_origin_forecasts(model, [sid], steps) if model else []
        if forecast:
            fx = [r["target_ts"].timestamp() for r in forecast]
            level = forecast[0]["interval_level"]
            lo, hi = [r["yhat_lower"] for r in forecast], [r["yhat_upper"] for r in forecast]
            if any(v is not None for v in lo):
                label = f"{level:.0%} band" if level is not None else "band"
                bands.append(Band(label, fx, lo, hi, "forecast"))
            median = [r["yhat"] for r in forecast]
            lines.append(Line(f"median ({model})", fx, median, "median", color="#1f77b4", width=2))
        naive_key = _best_baseline(accuracy, sid)
        naive = store.newest_origin_forecasts(naive_key, [sid], steps)
        if naive:
            label = f"{naive_key.removeprefix(BASELINE)} seasonal naive"
            nx, ny = [r["target_ts"].timestamp() for r in naive], [r["yhat"] for r in naive]
            lines.append(Line(label, nx, ny, "naive", color="#8a8a8a", width=1.2, dashed=True))
        flagged = [
            a
            for a in store.list_anomalies(name, limit=lim.chart_anomalies)
            if a["model"] == model and a["ts"] >= start
        ]
        if flagged:
            tips = [
                f"{_ts(a['ts'])} UTC: actual {_num(a['actual'])} outside "
                f"{_num(a['yhat_lower'])} .. {_num(a['yhat_upper'])} (median {_num(a['yhat'])})"
                for a in flagged
            ]
            ax, ay = [a["ts"].timestamp() for a in flagged], [a["actual"] for a in flagged]
            lo, hi = [a["yhat_lower"] for a in flagged], [a["yhat_upper"] for a in flagged]
            marks.append(
                Marks("anomaly (bar: the band served then)", ax, ay, "anomalies", titles=tips,
                      lo=lo, hi=hi)
            )  # fmt: skip
        origin = forecast[0]["origin_ts"] if forecast else None
        chart = Chart(
            lines=lines, bands=bands, marks=marks, title=f"{name}: actuals and the newest forecast",
            now=origin.timestamp() if origin is not None else None, now_label="newest origin",
            width=lim.chart_width, height=lim.chart_height,
        )  # fmt: skip
        svg = time_chart(chart) or _notice("No values stored in this span.")
        if model is None:
            said = "No model yet: actuals only."
        elif forecast:
            said = f"{len(forecast)} steps forecast by {model} from {_ts(origin)} UTC."
        else:
            said = f"No forecasts from {model} for this series yet."
        if marks:
            said += " Red: actuals outside the band served for them (hover for the values)."
        return (
            f'{heading}{svg}<p class="caption">{obs.height} points over the last {_age(span)} '
            f"up to {_ts(end)} UTC. {escape(said)}</p>"
        )

    def _accuracy(
        self, selected: Mapping[str, Any] | None, accuracy: list[dict[str, Any]], model: str | None
    ) -> str:
        if not accuracy:
            return "<h2>Accuracy</h2>" + _notice(
                "Nothing scored yet: the evaluate job scores forecasts once their actuals arrive."
            )

        def label(m: str) -> str:
            return f"{m} (champion)" if m == model else m

        headers = ["model", "scored ", "MAE ", "MASE ", "band coverage "]
        mine = [
            [label(r["model"]), r["n_scored"], _num(r["mae"], 3), _num(r["mase"], 3),
             _pct(r["coverage"])]
            for r in accuracy
            if selected is not None and r["series_id"] == selected["id"]
        ]  # fmt: skip
        by_model: dict[str, list[dict[str, Any]]] = {}
        for r in accuracy:
            by_model.setdefault(r["model"], []).append(r)
        pooled = []
        for m, rs in sorted(by_model.items()):
            n = sum(r["n_scored"] for r in rs)
            banded = [r for r in rs if r["coverage"] is not None]
            cover_n = sum(r["n_scored"] for r in banded)
            pooled.append(
                [label(m), len(rs), n,
                 _num(sum(r["mae"] * r["n_scored"] for r in rs) / n, 3) if n else None,
                 _num(geomean(r["mase"] for r in rs if r["mase"] is not None), 3),
                 _pct(sum(r["coverage"] * r["n_scored"] for r in banded) / cover_n) if cover_n else None]
            )  # fmt: skip
        pooled_headers = ["model", "series ", "scored ", "MAE ", "MASE (geometric mean) ",
                          "band coverage "]  # fmt: skip
        name = escape(selected["name"]) if selected is not None else ""
        newest = max(accuracy, key=lambda r: r["window_end"])
        window = f"{_ts(newest['window_start'])} .. {_ts(newest['window_end'])} UTC"
        left = f"<div><h3>{name}</h3>{_table(headers, mine, cls='accuracy')}</div>" if mine else ""
        return (
            "<h2>Accuracy vs the seasonal-naive baselines</h2>"
            f'<p class="meta">Scored by the evaluate job over {window}. MASE 1 = as good as '
            "the daily seasonal naive, lower is better; coverage: the share of actuals inside "
            f'the served band.</p><div class="cols">{left}<div><h3>all series</h3>'
            f"{_table(pooled_headers, pooled, cls='pooled')}</div></div>"
        )

    def _incidents(self) -> str:
        """Fleet events, then incidents, newest first (forecaster.anomaly)."""
        store, lim = self.store, self.limits.anomalies
        parts = ["<h2>Incidents</h2>"]
        events = [
            [_ts(e["start_ts"]), _ts(e["end_ts"]), str(e["n_series"]), f"{e['peak_share']:.0%}",
             e["model"]]
            for e in store.list_fleet_events(limit=lim)
        ]  # fmt: skip
        if events:
            headers = ["fleet event start (UTC)", "end", "series ", "peak share ", "model"]
            parts.append(_table(headers, events, cls="events"))
        rows = [
            [_link(i["series"]), _ts(i["start_ts"]), _ts(i["end_ts"]), str(i["n_points"]),
             _num(i["peak_score"]),
             "-" if i["event_start"] is None else f"fleet event {_ts(i['event_start'])}",
             i["model"]]
            for i in store.list_incidents(limit=lim)
        ]  # fmt: skip
        if not rows:
            parts.append("<p>None recorded.</p>")
        else:
            headers = ["series", "start (UTC)", "end", "points ", "peak score ", "event", "model"]
            parts.append(_table(headers, rows, cls="incidents"))
        return "".join(parts)

    def _anomalies(self) -> str:
        rows = [
            [_link(a["series"]), _ts(a["ts"]), a["model"], _num(a["actual"]), _num(a["yhat"]),
             f"{_num(a['yhat_lower'])} .. {_num(a['yhat_upper'])}",
             "-" if a["score"] is None else _num(a["score"])]
            for a in self.store.list_anomalies(limit=self.limits.anomalies)
        ]  # fmt: skip
        if not rows:
            return "<h2>Newest anomalies</h2><p>None recorded.</p>"
        headers = ["series", "time (UTC)", "model", "actual ", "median ", "band ", "score "]
        return f"<h2>Newest anomalies</h2>{_table(headers, rows, cls='anomalies')}"

    def _jobs(self) -> str:
        timings = {r["job"]: r for r in self.timings()} if self.timings is not None else {}
        rows = []
        for j in _job_health(self.store.job_runs()):
            last, failure, t = j["last"], j["last_failure"], timings.get(j["job"])
            took = None
            if t is not None:
                took = f"{t['mean_s']:.3f} / {t['max_s']:.3f}"
            elif last["finished_at"] is not None:
                took = f"{(last['finished_at'] - last['started_at']).total_seconds():.3f}"
            detail = last["detail"] or ""
            rows.append(
                [j["job"], j["runs"], _flag(str(j["failed"]), j["failed"] == 0),
                 t["missed"] if t is not None else None, _ts(last["scheduled_at"]),
                 _flag(last["status"], last["status"] in ("succeeded", "skipped", "running")),
                 took, _ts(failure["scheduled_at"]) if failure else None,
                 detail if len(detail) <= 140 else detail[:137] + "..."]
            )  # fmt: skip
        headers = ["job", "runs ", "failed ", "missed ", "last fire (UTC)", "status",
                   "seconds (mean / max) ", "last failure", "last run said"]  # fmt: skip
        jobs = _table(headers, rows, cls="jobs") if rows else "<p>No job has run yet.</p>"
        rows_in, at = self.store.source_rows(), self.store.source_ingest_times()
        src = [[s, n, _ts(at.get(s))] for s, n in rows_in.items()]
        heads = ["source", "points ingested ", "last batch (wall clock, UTC)"]
        sources = _table(heads, src, cls="sources") if src else "<p>None yet.</p>"
        return f"<h2>Job health</h2>{jobs}<h2>Sources</h2>{sources}"


def _best_baseline(accuracy: list[dict[str, Any]], series_id: int) -> str:
    """The seasonal naive with the lowest MASE on the series (the daily one when unscored)."""
    rows = [
        r
        for r in accuracy
        if r["series_id"] == series_id and r["model"].startswith(BASELINE) and r["mase"] is not None
    ]
    return min(rows, key=lambda r: r["mase"])["model"] if rows else BASELINE + "daily"


def _job_health(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per job id: runs, failures (failed or abandoned), the newest run and newest failure."""
    by_job: dict[str, dict[str, Any]] = {}
    for r in runs:  # ordered by scheduled_at: later rows are newer
        j = by_job.setdefault(
            r["job_id"], {"job": r["job_id"], "runs": 0, "failed": 0, "last_failure": None}
        )
        j["runs"] += 1
        j["last"] = r
        if r["status"] in ("failed", "abandoned"):
            j["failed"] += 1
            j["last_failure"] = r
    return [by_job[k] for k in sorted(by_job)]
