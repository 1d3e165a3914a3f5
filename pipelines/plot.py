"""The plot job: one series' recent actuals, a model's latest forecast (median and band), the
weekly seasonal naive beside it and the anomalies, drawn to a PNG.

Everything comes through the Store's read methods (the latest_forecasts view, anomalies,
observations), so the picture shows what an analyst's SQL would. Matplotlib is used through
`Figure` and the Agg canvas directly: no pyplot, no global figure state, no display needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import matplotlib.dates as mdates
import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from forecaster.errors import UnknownSeriesError
from forecaster.store import Store

WEEKLY_NAIVE = "seasonal_naive_weekly"
SIZE_IN = (12.0, 5.0)
DPI = 100


@dataclass
class PlotSummary:
    series: str
    path: Path | None = None
    days: int = 14
    model: str | None = None  # the model drawn; None when there is no champion
    points: int = 0  # actuals drawn (missing points leave gaps and are not counted)
    forecast_rows: int = 0  # rows of the model's latest forecasts inside the plot
    anomalies: int = 0  # the model's anomalies inside the plot
    origin: datetime | None = None  # the newest forecast origin, drawn as "now"
    other_models: tuple[str, ...] = ()  # models that do have forecasts, for the hint

    def line(self) -> str:
        head = f"{self.series}: {self.points} actuals over the last {self.days} days"
        where = f" -> {self.path}" if self.path else ""
        if self.forecast_rows:
            origin = self.origin.strftime("%Y-%m-%d %H:%M") if self.origin else "-"
            return (
                f"{head}, {self.forecast_rows} forecast rows from {self.model} (newest origin "
                f"{origin} UTC), {self.anomalies} anomalies{where}"
            )
        if self.model is None:
            why = "no champion model to draw: `forecaster train` registers one"
        elif self.other_models:
            why = f"no forecasts from {self.model} (forecasts exist from {', '.join(self.other_models)})"
        else:
            why = f"no forecasts from {self.model} yet: run `forecaster predict`"
        return f"{head}{where}; {why}"


def plot_series(
    store: Store, series_name: str, path: Path | str, *, days: int = 14, model: str | None = None
) -> PlotSummary:
    """Draw `series_name` to the PNG at `path` (parent folders created); see series_figure."""
    fig, summary = series_figure(store, series_name, days=days, model=model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Always PNG, whatever the suffix: the size is then exactly SIZE_IN * DPI pixels.
    FigureCanvasAgg(fig).print_figure(path, dpi=DPI, format="png")
    summary.path = path
    return summary


def series_figure(
    store: Store, series_name: str, *, days: int = 14, model: str | None = None
) -> tuple[Figure, PlotSummary]:
    """The figure and its summary. `model` is "v<id>" (or just the id), a seasonal_naive_*
    baseline, or None for the champion. The window is the `days` before the newest actual,
    plus the forecast horizon after it."""
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    if series_name not in {r["name"] for r in store.list_series()}:
        raise UnknownSeriesError(series_name)
    if model is None:
        champion = store.champion()
        model = None if champion is None else f"v{champion['id']}"
    elif model.isdigit():
        model = f"v{model}"

    obs = store.read_observations(series_name).sort("ts")
    start = (obs["ts"].max() - timedelta(days=days)) if obs.height else None
    if start is not None:
        obs = obs.filter(pl.col("ts") > start)
    rows = [
        r for r in store.latest_forecasts(series_name) if start is None or r["target_ts"] > start
    ]
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    drawn = sorted(by_model.get(model, []), key=lambda r: r["target_ts"]) if model else []
    naive = (
        sorted(by_model.get(WEEKLY_NAIVE, []), key=lambda r: r["target_ts"])
        if model != WEEKLY_NAIVE
        else []
    )
    # Newest first; generous, since a time can carry one anomaly per model that served it.
    anomalies = [
        a
        for a in store.list_anomalies(series_name, limit=max(10_000, 10 * obs.height))
        if a["model"] == model and (start is None or a["ts"] > start)
    ]

    summary = PlotSummary(
        series=series_name,
        days=days,
        model=model,
        points=int(obs["value"].is_not_null().sum()),
        forecast_rows=len(drawn),
        anomalies=len(anomalies),
        origin=max((r["origin_ts"] for r in drawn), default=None),
        other_models=tuple(sorted(m for m in by_model if m != model)),
    )
    return _draw(series_name, obs, drawn, naive, anomalies, summary), summary


def _naive_utc(values: list[datetime]) -> np.ndarray:
    """Aware datetimes -> datetime64 in UTC, the one time type the axis sees."""
    return np.array(
        [v.astimezone(UTC).replace(tzinfo=None) for v in values], dtype="datetime64[us]"
    )


def _floats(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=float)


def _draw(
    series_name: str,
    obs: pl.DataFrame,
    drawn: list[dict[str, Any]],
    naive: list[dict[str, Any]],
    anomalies: list[dict[str, Any]],
    summary: PlotSummary,
) -> Figure:
    fig = Figure(figsize=SIZE_IN, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ts = obs["ts"].dt.replace_time_zone(None).to_numpy()
    ax.plot(ts, obs["value"].to_numpy(), color="black", lw=1.2, label="actual", zorder=3)

    if drawn:
        t = _naive_utc([r["target_ts"] for r in drawn])
        level = next((r["interval_level"] for r in drawn if r["interval_level"] is not None), None)
        lower, upper = _floats(drawn, "yhat_lower"), _floats(drawn, "yhat_upper")
        banded = not np.isnan(lower).all()  # the seasonal-naive baselines store no band
        if banded:
            ax.fill_between(
                t,
                lower,
                upper,
                color="tab:blue",
                alpha=0.22,
                lw=0,
                label=f"{level:.0%} band" if level is not None else "band",
                zorder=1,
            )
        ax.plot(
            t,
            _floats(drawn, "yhat"),
            color="tab:blue",
            lw=1.6,
            label=f"{'forecast median' if banded else 'forecast'} ({summary.model})",
            zorder=2,
        )
    if naive:
        ax.plot(
            _naive_utc([r["target_ts"] for r in naive]),
            _floats(naive, "yhat"),
            color="tab:gray",
            lw=0.9,
            ls="--",
            label="weekly seasonal naive",
            zorder=2,
        )
    if anomalies:
        ax.scatter(
            _naive_utc([a["ts"] for a in anomalies]),
            [a["actual"] for a in anomalies],
            s=36,
            color="tab:red",
            edgecolors="white",
            linewidths=0.6,
            label="anomaly",
            zorder=4,
        )
    if summary.origin is not None:
        now = _naive_utc([summary.origin])[0]
        ax.axvline(now, color="tab:green", lw=1, ls=":", label="now (newest origin)", zorder=2)

    locator = mdates.AutoDateLocator(tz=UTC, minticks=5, maxticks=12)
    ax.xaxis.set_major_locator(locator)
    # Month on every day tick and no offset: the concise default labels days by number alone
    # and names the last tick's month, so a December fortnight read as January.
    ax.xaxis.set_major_formatter(
        mdates.ConciseDateFormatter(
            locator,
            tz=UTC,
            formats=["%Y", "%b", "%b %d", "%H:%M", "%H:%M", "%S.%f"],
            zero_formats=["", "%Y", "%b %d", "%b %d", "%H:%M", "%H:%M"],
            show_offset=False,
        )
    )
    ax.margins(x=0.01)
    ax.set_xlabel(_span(ts, drawn + naive))
    ax.set_ylabel("value")
    ax.grid(True, alpha=0.3)
    ax.set_title(_title(series_name, summary), loc="left")
    # Below the axes, so it never covers the newest data or the forecast.
    fig.legend(loc="outside lower center", ncols=6, frameon=False, fontsize="small")
    return fig


def _span(ts: np.ndarray, drawn: list[dict[str, Any]]) -> str:
    """The axis label, with the years the ticks leave out: first actual to last target."""
    times = list(ts) + list(_naive_utc([r["target_ts"] for r in drawn]))
    if not times:
        return "time (UTC)"
    lo, hi = (
        np.datetime_as_string(x, unit="m").replace("T", " ") for x in (min(times), max(times))
    )
    return f"time (UTC), {lo} .. {hi}"


def _title(series_name: str, summary: PlotSummary) -> str:
    if summary.forecast_rows and summary.origin is not None:
        return (
            f"{series_name}: forecast {summary.model} from "
            f"{summary.origin.strftime('%Y-%m-%d %H:%M')} UTC"
        )
    if summary.model is None:
        return f"{series_name}: actuals (no champion model)"
    return f"{series_name}: actuals (no forecasts from {summary.model})"
