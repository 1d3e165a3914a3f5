"""Writes dashboards/forecaster.json, the Grafana dashboard of the forecaster daemon.

    python deploy/grafana/build_dashboard.py           # regenerate the JSON
    python deploy/grafana/build_dashboard.py --check   # exit 1 when the JSON is out of date

The JSON is generated so that every panel keeps the same look (datasource variable, units,
legends, layout) and stays small to review here; commit both. tests/deploy checks that the
committed JSON is what this script produces, and that every query parses and returns data
from a real daemon. The daemon's job metrics carry a label `job`, which Prometheus renames
`exported_job` (see deploy/prometheus/prometheus.yml).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "forecaster.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
S = 'series="$series"'


def _target(expr: str, legend: str, ref: str, *, instant: bool = False) -> dict[str, Any]:
    return {
        "datasource": DS,
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
        "range": not instant,
        "instant": instant,
    }


def _targets(queries: list[tuple[str, str]], *, instant: bool = False) -> list[dict[str, Any]]:
    return [
        _target(expr, legend, chr(ord("A") + i), instant=instant)
        for i, (expr, legend) in enumerate(queries)
    ]


def _timeseries(
    title: str,
    description: str,
    queries: list[tuple[str, str]],
    *,
    unit: str = "short",
    bars: bool = False,
    overrides: list[dict[str, Any]] | None = None,
    thresholds: list[tuple[str, float | None]] | None = None,
) -> dict[str, Any]:
    custom: dict[str, Any] = {
        "drawStyle": "bars" if bars else "line",
        "lineWidth": 1,
        "fillOpacity": 60 if bars else 0,
        "showPoints": "never",
        "spanNulls": False,
    }
    if thresholds is not None:
        custom["thresholdsStyle"] = {"mode": "line+area"}
    steps = [{"color": c, "value": v} for c, v in (thresholds or [("green", None)])]
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": custom,
                "thresholds": {"mode": "absolute", "steps": steps},
            },
            "overrides": overrides or [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "none"},
        },
        "targets": _targets(queries),
    }


def _stat(
    title: str, description: str, expr: str, legend: str, *, unit: str, text: str = "value"
) -> dict[str, Any]:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None}]},
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": text,
            "colorMode": "none",
            "graphMode": "none",
        },
        "targets": _targets([(expr, legend)], instant=True),
    }


def _bargauge(title: str, description: str, expr: str, legend: str, *, unit: str) -> dict[str, Any]:
    return {
        "type": "bargauge",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "min": 0,
                "thresholds": {"mode": "absolute", "steps": [{"color": "blue", "value": None}]},
            },
            "overrides": [],
        },
        "options": {
            "orientation": "vertical",
            "displayMode": "basic",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "showUnfilled": True,
        },
        "targets": _targets([(expr, legend)], instant=True),
    }


def _override(name: str, **props: Any) -> dict[str, Any]:
    return {
        "matcher": {"id": "byName", "options": name},
        "properties": [{"id": k.replace("__", "."), "value": v} for k, v in props.items()],
    }


def _row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


BAND_COLOUR = {"mode": "fixed", "fixedColor": "blue"}


def _panels() -> list[tuple[dict[str, Any], int, int]]:
    """(panel, width, height) in reading order; rows take the full width."""
    band = [
        _override("actual", color={"mode": "fixed", "fixedColor": "orange"}, custom__lineWidth=2),
        _override("median", color=BAND_COLOUR),
        _override("band lower", color=BAND_COLOUR, custom__lineWidth=0),
        _override(
            "band upper",
            color=BAND_COLOUR,
            custom__lineWidth=0,
            custom__fillBelowTo="band lower",
            custom__fillOpacity=20,
        ),
    ]
    return [
        (_row("Overview"), 24, 1),
        (
            _stat(
                "Forecast lag: $series",
                "Newest actual minus the champion's newest forecast origin: how much data "
                "the forecasts have not absorbed yet (ForecasterForecastsStale at 2 h).",
                f"forecaster_observation_timestamp_seconds{{{S}}}"
                f" - forecaster_forecast_origin_timestamp_seconds{{{S}}}",
                "",
                unit="s",
            ),
            6,
            4,
        ),
        (
            _stat(
                "Since the last ingest",
                "Wall time since each source last committed a batch "
                "(ForecasterIngestionStale at 1 h).",
                "time() - forecaster_source_last_ingest_timestamp_seconds",
                "{{source}}",
                unit="s",
                text="value_and_name",
            ),
            6,
            4,
        ),
        (
            _stat(
                "Champion",
                "The model version serving forecasts.",
                'forecaster_model_info{stage="champion"}',
                "{{version}} ({{kind}})",
                unit="none",
                text="name",
            ),
            6,
            4,
        ),
        (
            _stat(
                "Champion MASE / best naive",
                "The champion's MASE over the better seasonal naive's, both averaged over "
                "series: below 1 the model beats the baselines.",
                "forecaster:mase_champion_vs_best_baseline:ratio",
                "",
                unit="none",
            ),
            6,
            4,
        ),
        (_row("Series $series"), 24, 1),
        (
            _timeseries(
                "Actual vs forecast: $series",
                "The latest actual, and the champion's median and calibrated 80% band served "
                "for the current hour.",
                [
                    (f"forecaster_observation{{{S}}}", "actual"),
                    (f"forecaster_forecast_median{{{S}}}", "median"),
                    (f"forecaster_forecast_band_lower{{{S}}}", "band lower"),
                    (f"forecaster_forecast_band_upper{{{S}}}", "band upper"),
                ],
                overrides=band,
            ),
            16,
            9,
        ),
        (
            _bargauge(
                "Forecast horizon: $series",
                "The champion's median forecast from its newest origin, by horizon step "
                "(hours ahead; the steps of [metrics] horizon_steps).",
                f'forecaster_forecast{{{S}, q="0.5"}}',
                "+{{horizon_step}}",
                unit="short",
            ),
            8,
            9,
        ),
        (
            _timeseries(
                "MASE per model: $series",
                "Mean absolute scaled error over the evaluate job's recent window; the daily "
                "seasonal naive is 1 by definition, the weekly one is the other baseline.",
                [(f"forecaster_mase{{{S}}}", "{{model}}")],
                thresholds=[("transparent", None), ("red", 1)],
            ),
            12,
            8,
        ),
        (
            _timeseries(
                "Anomalies per hour: $series",
                "Anomalous actuals (score above 1) recorded in the last hour (by the time "
                "evaluate recorded them), for the series and over all series.",
                [
                    (f"increase(forecaster_anomalies_total{{{S}}}[1h])", "$series"),
                    ("sum(increase(forecaster_anomalies_total[1h]))", "all series"),
                ],
                bars=True,
            ),
            12,
            8,
        ),
        (
            _timeseries(
                "Anomaly score: $series",
                "The score of the series' newest scored actual: its evidence (how far, alone or "
                "over a run, it lies from the median in half-band widths) over the threshold set "
                "from the false-alarm rate chosen. Above 1 is anomalous; 0 inside the band.",
                [(f"forecaster_anomaly_score{{{S}}}", "$series")],
                thresholds=[("transparent", None), ("red", 1)],
            ),
            12,
            8,
        ),
        (
            _timeseries(
                "Series in incidents",
                "Series with an incident open (every series, not only those exposed), and 1 "
                "while a fleet-wide event runs (a share of the fleet in incidents at once).",
                [
                    ("forecaster_series_in_incident", "series in incidents"),
                    ("forecaster_fleet_event_open", "fleet event running"),
                ],
            ),
            12,
            8,
        ),
        (_row("Model"), 24, 1),
        (
            _timeseries(
                "MASE per model: mean over series",
                "forecaster:mase:avg_by_model: each model's MASE averaged over the series "
                "exposed, the champion's against the two seasonal naives.",
                [("forecaster:mase:avg_by_model", "{{model}}")],
                thresholds=[("transparent", None), ("red", 1)],
            ),
            12,
            8,
        ),
        (
            _timeseries(
                "Band coverage",
                "Share of scored actuals inside the champion's band (nominal 80%; "
                "ForecasterBandCoverageOff outside 65%..95% for 6 h), and the share of series "
                "whose latest actual is outside its band now.",
                [
                    ("forecaster_band_coverage_ratio", "coverage {{model}}"),
                    ("forecaster:outside_band:ratio", "series outside the band now"),
                ],
                unit="percentunit",
                thresholds=[("red", None), ("transparent", 0.65), ("red", 0.95)],
            ),
            12,
            8,
        ),
        (_row("Jobs"), 24, 1),
        (
            _timeseries(
                "Job duration (p50, p95 over 1 h)",
                "Run time quantiles per job from forecaster_job_duration_seconds, failed "
                "runs included.",
                [
                    (
                        "histogram_quantile(0.5, sum by (exported_job, le) "
                        "(rate(forecaster_job_duration_seconds_bucket[1h])))",
                        "{{exported_job}} p50",
                    ),
                    (
                        "histogram_quantile(0.95, sum by (exported_job, le) "
                        "(rate(forecaster_job_duration_seconds_bucket[1h])))",
                        "{{exported_job}} p95",
                    ),
                ],
                unit="s",
            ),
            12,
            8,
        ),
        (
            _timeseries(
                "Job runs per hour",
                "Runs per job over the last hour, successful or not.",
                [
                    (
                        "sum by (exported_job) "
                        "(increase(forecaster_job_duration_seconds_count[1h]))",
                        "{{exported_job}}",
                    )
                ],
            ),
            12,
            8,
        ),
        (
            _timeseries(
                "Job failures and missed runs per hour",
                "Runs that raised, and scheduled runs skipped past the misfire grace time "
                "(ForecasterJobFailing, ForecasterJobMissedRuns).",
                [
                    (
                        "sum by (exported_job) (increase(forecaster_job_failures_total[1h]))",
                        "{{exported_job}} failed",
                    ),
                    (
                        "sum by (exported_job) (increase(forecaster_job_missed_total[1h]))",
                        "{{exported_job}} missed",
                    ),
                ],
                bars=True,
            ),
            12,
            8,
        ),
        (
            _bargauge(
                "Since the last success",
                "Wall time since each job last finished without error (jobs that never "
                "succeeded are left out).",
                "time() - (forecaster_job_last_success_timestamp_seconds > 0)",
                "{{exported_job}}",
                unit="s",
            ),
            12,
            8,
        ),
        (_row("Ingest"), 24, 1),
        (
            _timeseries(
                "Ingested rows per hour",
                "Observed points stored per source over the last hour.",
                [
                    (
                        "sum by (source) (increase(forecaster_ingested_rows_total[1h]))",
                        "{{source}}",
                    )
                ],
            ),
            12,
            8,
        ),
        (
            _timeseries(
                "Quarantined rows per hour",
                "Rows refused at ingest per source and reason over the last hour (0 for a "
                "source with none; `forecaster quarantine list` shows them).",
                [
                    (
                        "sum by (source, reason) "
                        "(increase(forecaster_quarantined_rows_total[1h]))"
                        " or on (source) "
                        "(0 * sum by (source) (forecaster_ingested_rows_total))",
                        "{{source}} {{reason}}",
                    )
                ],
            ),
            12,
            8,
        ),
    ]


def _layout(panels: list[tuple[dict[str, Any], int, int]]) -> list[dict[str, Any]]:
    """Ids and grid positions: left to right, wrapping at 24 columns."""
    out, x, y, row_h = [], 0, 0, 0
    for i, (panel, w, h) in enumerate(panels, start=1):
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        out.append({"id": i, "gridPos": {"h": h, "w": w, "x": x, "y": y}, **panel})
        x, row_h = x + w, max(row_h, h)
    return out


def dashboard() -> dict[str, Any]:
    return {
        "uid": "forecaster",
        "title": "Forecaster",
        "description": "The forecaster daemon: forecasts against actuals, accuracy against the "
        "seasonal naives, band coverage, anomalies, job health and ingest.",
        "tags": ["forecaster"],
        "timezone": "utc",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "1m",
        "time": {"from": "now-2d", "to": "now"},
        "schemaVersion": 39,
        "version": 1,
        "links": [],
        "templating": {
            "list": [
                {
                    "type": "datasource",
                    "name": "datasource",
                    "label": "Data source",
                    "query": "prometheus",
                    "current": {"text": "Prometheus", "value": "forecaster-prometheus"},
                    "hide": 0,
                    "refresh": 1,
                },
                {
                    "type": "query",
                    "name": "series",
                    "label": "Series",
                    "datasource": DS,
                    "definition": "label_values(forecaster_observation, series)",
                    "query": "label_values(forecaster_observation, series)",
                    "refresh": 2,
                    "sort": 1,
                    "multi": False,
                    "includeAll": False,
                    "hide": 0,
                },
            ]
        },
        "annotations": {
            "list": [
                {
                    "name": "Anomalies: $series",
                    "datasource": DS,
                    "enable": True,
                    "iconColor": "red",
                    "expr": f"increase(forecaster_anomalies_total{{{S}}}[5m]) > 0",
                    "step": "5m",
                    "titleFormat": "anomalies recorded",
                    "textFormat": "{{series}}",
                    "useValueForTime": False,
                }
            ]
        },
        "panels": _layout(_panels()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            sys.exit(f"{OUT} is out of date: run python {Path(__file__).name}")
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
