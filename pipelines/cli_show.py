"""The `forecaster` commands that show the store: series, quarantine, model versions,
forecasts, accuracy, anomalies and plots (and `models promote`). Registered on the apps of
`pipelines.cli`, which imports this module."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from pipelines.cli import (
    UsageError,
    _database_url,
    _errors,
    _store,
    _version_id,
    app,
    forecasts_app,
    models_app,
    out,
    quarantine_app,
    series_app,
)

if TYPE_CHECKING:
    from forecaster.store import Store

BASELINES = ("seasonal_naive_daily", "seasonal_naive_weekly")
# Stored beside a version's forecasts under their own names (pipelines.predict.CHALLENGER).
OTHERS = (*BASELINES, "mstl")


def _ts(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"


def _model(store: Store, text: str) -> str:
    """A model as forecasts name it: "v<id>" for a registered version (given as v8 or 8;
    one the registry does not hold is an error), a seasonal-naive baseline or the MSTL
    challenger's own forecasts ("mstl")."""
    if text in OTHERS:
        return text
    try:
        version = _version_id(text)
    except UsageError:
        raise UsageError(
            f"unknown model {text!r}: give a version (v8 or 8; `forecaster models list` "
            f"shows them), a baseline ({', '.join(BASELINES)}) or mstl"
        ) from None
    store.model_version(version)  # UnknownModelVersionError names it and the fix
    return f"v{version}"


# -- series and quarantine ---------------------------------------------------------------


@series_app.command("list")
def series_list() -> None:
    """Series with their point counts and watermarks."""
    from forecaster.config_light import format_duration

    with _errors():
        with _store(_database_url()) as store:
            rows = store.list_series()
        table = Table("series", "source", "freq", "points", "observed", "first", "watermark")
        for r in rows:
            table.add_row(
                r["name"],
                r["source"] or "-",
                format_duration(timedelta(seconds=r["freq_seconds"])),
                str(r["points"]),
                str(r["observed"]),
                _ts(r["first_ts"]),
                _ts(r["watermark"]),
            )
        out.print(table)
        out.print(f"{len(rows)} series")


@quarantine_app.command("list")
def quarantine_list(
    source: Annotated[str | None, typer.Option(help="only this source")] = None,
    reason: Annotated[str | None, typer.Option(help="only this reason")] = None,
    limit: Annotated[int, typer.Option(help="rows to show")] = 20,
) -> None:
    """The newest quarantined rows and the count per reason."""
    from forecaster.reasons import REASONS

    with _errors():
        with _store(_database_url()) as store:
            rows, counts = store.list_quarantine(source=source, reason=reason, limit=limit)
        table = Table("id", "source", "origin", "series", "ts", "value", "reason", "detail")
        for r in rows:
            table.add_row(
                str(r["id"]),
                r["source"],
                r["origin"] or "-",
                r["series"] or "-",
                r["ts_raw"] or "-",
                r["value_raw"] or "-",
                r["reason"],
                r["detail"] or "",
            )
        out.print(table)
        summary = Table("reason", "rows", "meaning")
        for k, n in sorted(counts.items()):
            summary.add_row(k, str(n), REASONS.get(k, ""))
        out.print(summary)


# -- the model registry -------------------------------------------------------------------


@models_app.command("list")
def models_list(kind: Annotated[str | None, typer.Option(help="only this kind")] = None) -> None:
    """Registered model versions, newest first."""
    with _errors():
        with _store(_database_url()) as store:
            rows = store.list_model_versions(kind)
            untrained = {r["id"]: len(store.untrained_series(r["id"])) for r in rows}
        table = Table(
            "version",
            "kind",
            "stage",
            "trained to",
            "val MASE",
            "served MASE",
            "MSTL MASE",
            "naive MASE",
            "serves, not trained on",
            "created",
            "sha256",
        )
        for r in rows:
            m = r["metrics"] or {}
            naive = [v["mase"] for k, v in m.items() if k.startswith("seasonal_naive")]
            served = (m.get("served") or {}).get("mase")
            challenger = (m.get("mstl") or {}).get("mase")  # its statistical challenger's
            table.add_row(
                f"v{r['id']}",
                r["kind"],
                r["stage"],
                _ts(r["trained_to"]),
                f"{m['model']['mase']:.3f}" if "model" in m else "-",
                f"{served:.3f}" if served is not None else "-",
                f"{challenger:.3f}" if challenger is not None else "-",
                f"{min(naive):.3f}" if naive else "-",
                f"{untrained[r['id']]} series",
                _ts(r["created_at"]),
                r["sha256"][:12],
            )
        out.print(table)


@models_app.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="model version: v8 or 8", show_default=False)],
) -> None:
    """Make a version the champion (the current one is retired), atomically."""
    with _errors():
        version_id = _version_id(version)
        with _store(_database_url()) as store:
            with store.begin() as conn:
                store.promote(conn, version_id)
        out.print(f"model version v{version_id} is the champion")


# -- forecasts and their accuracy ---------------------------------------------------------


@forecasts_app.command("show")
def forecasts_show(
    series: Annotated[str, typer.Argument(help="series name")],
    model: Annotated[
        str | None,
        typer.Option(
            help="only this model: a version (v8 or 8), a seasonal_naive_* baseline or mstl"
        ),
    ] = None,
    origin: Annotated[
        datetime | None,
        typer.Option(help="the forecasts made at this origin (UTC) instead of the newest"),
    ] = None,
) -> None:
    """Each model's newest forecast of a series: every horizon step from its newest origin
    (the last observed point it used)."""
    with _errors():
        with _store(_database_url()) as store:
            chosen = None if model is None else _model(store, model)
            at = None if origin is None else _utc(origin)
            rows = store.newest_forecasts(series, origin=at, model=chosen)
        table = Table("model", "origin", "target", "step", "yhat", "lower", "upper")
        for r in rows:
            table.add_row(
                r["model"],
                _ts(r["origin_ts"]),
                _ts(r["target_ts"]),
                str(r["horizon_step"]),
                f"{r['yhat']:.2f}",
                "-" if r["yhat_lower"] is None else f"{r['yhat_lower']:.2f}",
                "-" if r["yhat_upper"] is None else f"{r['yhat_upper']:.2f}",
            )
        out.print(table)
        if rows:
            return
        if at is not None:
            out.print(f"no forecasts made at {_ts(at)}: leave out --origin for the newest")
        elif chosen is not None:
            out.print(f"no forecasts from {chosen} yet")
        else:
            out.print("no forecasts yet: run `forecaster predict`")


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


@app.command("accuracy")
def accuracy_cmd(
    days: Annotated[
        int, typer.Option(help="score the forecasts of the last N days with actuals")
    ] = 28,
) -> None:
    """Accuracy per model against the seasonal-naive baselines, from forecast_accuracy."""
    with _errors():
        with _store(_database_url()) as store:
            rows = store.accuracy_by_model(timedelta(days=days))
        table = Table(
            "model", "forecasts scored", "MAE", "MAE vs best naive", "80% band coverage", "pinball"
        )
        naive = [r["mae"] for r in rows if r["model"].startswith("seasonal_naive")]
        best = min(naive) if naive else None
        for r in rows:
            rel = f"{r['mae'] / best - 1:+.1%}" if best else "-"
            cov = "-" if r["coverage"] is None else f"{r['coverage']:.1%}"
            pin = "-" if r["pinball"] is None else f"{r['pinball']:.3f}"
            table.add_row(r["model"], str(r["n"]), f"{r['mae']:.3f}", rel, cov, pin)
        out.print(table)
        if not rows:
            out.print(
                "nothing scored yet: forecasts need their actuals (`forecaster predict`, then ingest)"
            )


@app.command("anomalies")
def anomalies_cmd(
    series: Annotated[str | None, typer.Option(help="only this series")] = None,
    limit: Annotated[int, typer.Option(help="rows to show")] = 20,
) -> None:
    """Anomalous actuals (anomaly score above 1), newest first."""
    with _errors():
        with _store(_database_url()) as store:
            rows = store.list_anomalies(series, limit)
        table = Table("series", "time", "actual", "forecast", "band", "score", "model")
        for r in rows:
            table.add_row(
                r["series"],
                _ts(r["ts"]),
                f"{r['actual']:.2f}",
                f"{r['yhat']:.2f}",
                f"{r['yhat_lower']:.2f} .. {r['yhat_upper']:.2f}",
                "-" if r["score"] is None else f"{r['score']:.1f}",
                r["model"],
            )
        out.print(table)


@app.command("incidents")
def incidents_cmd(
    series: Annotated[str | None, typer.Option(help="only this series")] = None,
    limit: Annotated[int, typer.Option(help="rows to show")] = 20,
) -> None:
    """Incidents (runs of anomalous actuals of one series) and the fleet-wide events they
    belong to, newest first; then the threshold and the false-alarm rate seen."""
    with _errors():
        with _store(_database_url()) as store:
            rows = store.list_incidents(series, limit)
            events = store.list_fleet_events(limit) if series is None else []
            champion = store.champion()
            threshold = store.anomaly_threshold(f"v{champion['id']}") if champion else None
        table = Table("series", "start", "end", "points", "peak score", "fleet event", "model")
        for r in rows:
            event = (
                "-"
                if r["event_start"] is None
                else f"{_ts(r['event_start'])} ({r['event_series'] or '?'} series)"
            )
            table.add_row(
                r["series"],
                _ts(r["start_ts"]),
                _ts(r["end_ts"]),
                str(r["n_points"]),
                f"{r['peak_score']:.1f}",
                event,
                r["model"],
            )
        out.print(table)
        if events:
            ev = Table("fleet event start", "end", "series", "peak share", "model")
            for e in events:
                ev.add_row(
                    _ts(e["start_ts"]),
                    _ts(e["end_ts"]),
                    str(e["n_series"]),
                    f"{e['peak_share']:.0%}",
                    e["model"],
                )
            out.print(ev)
        if threshold is not None:
            seen = threshold["rate_seen"]
            out.print(
                f"fleet threshold {threshold['threshold']:.2f} (evidence that scores 1)"
                f"{'' if threshold['measured'] else ' (default: too little data yet)'}; "
                f"incidents per series per week: chosen {threshold['rate_target']:g}, seen "
                f"{'-' if seen is None else f'{seen:.2f}'} over the evaluate window",
                markup=False,
                highlight=False,
            )


@app.command("plot")
def plot_cmd(
    series: Annotated[str, typer.Argument(help="series name")],
    output: Annotated[
        Path, typer.Option("--output", "-o", dir_okay=False, help="PNG file to write")
    ],
    days: Annotated[int, typer.Option(min=1, help="days of actuals before the newest point")] = 14,
    model: Annotated[
        str | None,
        typer.Option(
            help="a version (v8 or 8), a seasonal_naive_* baseline or mstl (default: the champion)"
        ),
    ] = None,
) -> None:
    """Draw a series' actuals, latest forecast median and band, and anomalies to a PNG."""
    from pipelines.plot import plot_series

    with _errors():
        with _store(_database_url()) as store:
            chosen = None if model is None else _model(store, model)
            summary = plot_series(store, series, output, days=days, model=chosen)
        out.print(summary.line())
