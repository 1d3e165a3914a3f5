"""Prometheus metrics of the service: job health, and forecasts read from SQL.

The only module that imports prometheus_client (DESIGN.md decision 7). Two halves:
- `ServiceMetrics` declares the job metrics once, every job's labels initialised up front,
  in a registry of its own (never the process-wide default one, so tests and two apps in
  one process never share state);
- `SqlCollector` reads the latest forecasts, actuals, accuracy and ingest counts (and, for
  staleness alerts, their times as values) through `forecaster.store.service`, and keeps
  what it read, rendered, as a snapshot: a scrape serves the snapshot, which is read again
  only when something it shows may have changed (a cheap marker query:
  `Store.metrics_generation`, and the clock passing a step of the finest series). In the
  daemon a background thread keeps the snapshot current (after every job, and every few
  seconds), so a scrape of 10,000 series costs no SQL and no rendering; elsewhere the scrape
  that finds it stale reads it. A series that vanished from SQL vanishes from /metrics.
  What it exposes is bounded by `MetricsSettings` (series by glob pattern and count,
  horizon steps), and no sample carries a timestamp: a forecast for 6 hours ahead is
  `forecaster_forecast{horizon_step="6"}` now, because Prometheus rejects samples stamped
  in the future.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from forecaster.clock import Clock
from forecaster.config import MetricsSettings
from forecaster.stats import MODEL as CHALLENGER

if TYPE_CHECKING:
    from forecaster.store import Store

__all__ = ["JOB_KINDS", "ServiceMetrics", "SqlCollector", "render"]
log = structlog.get_logger(__name__)

JOB_KINDS = ("ingest", "predict", "evaluate", "retrain", "housekeeping")

# From a 10 ms no-op predict to a 30 min retrain.
JOB_DURATION_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1200.0, 1800.0,
)  # fmt: skip


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in the Prometheus text format, and the content type to serve it with."""
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantile_label(q: float) -> str:
    """0.09999999999999998 -> '0.1': the label a dashboard types."""
    return f"{round(q, 6):g}"


class ServiceMetrics:
    """The metrics of one running service, in `self.registry`.

    job_ids are the scheduler's job ids ("ingest:nycflights", "predict", ...); each gets its
    series at zero from the start, so `rate()` and "absent" alerts work before the first run."""

    def __init__(
        self,
        store: Store,
        settings: MetricsSettings,
        clock: Clock,
        *,
        job_ids: Sequence[str],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._jobs = CollectorRegistry()  # the job metrics alone: rendered at each scrape
        self._duration = Histogram(
            "forecaster_job_duration_seconds",
            "Wall time of a job run, successful or not.",
            ["job"],
            buckets=JOB_DURATION_BUCKETS,
            registry=self._jobs,
        )
        self._failures = Counter(
            "forecaster_job_failures_total",
            "Job runs that raised.",
            ["job"],
            registry=self._jobs,
        )
        self._missed = Counter(
            "forecaster_job_missed_total",
            "Scheduled job runs skipped because they fired later than the misfire grace time.",
            ["job"],
            registry=self._jobs,
        )
        self._last_success = Gauge(
            "forecaster_job_last_success_timestamp_seconds",
            "Unix wall time at which the job last finished without error (0 = never).",
            ["job"],
            registry=self._jobs,
        )
        for job in job_ids:
            self._duration.labels(job)
            self._failures.labels(job)
            self._missed.labels(job)
            self._last_success.labels(job)
        for metric in (self._duration, self._failures, self._missed, self._last_success):
            self.registry.register(metric)
        self.collector = SqlCollector(store, settings, clock)
        self.registry.register(self.collector)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def exposition(self) -> tuple[bytes, str]:
        """What /metrics serves: the job metrics, then the SQL collector's snapshot."""
        return generate_latest(self._jobs) + self.collector.exposition(), CONTENT_TYPE_PLAIN_0_0_4

    def start_refresher(self, interval: float = 5.0) -> None:
        """Keep the SQL snapshot current from a background thread: after each job, and every
        `interval` seconds (a cheap marker query when nothing changed). Scrapes then serve
        the last snapshot without waiting for SQL."""
        if self._refresher is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.collector.refresh()
                    self.collector.background = True
                except Exception:  # noqa: BLE001 - a failed read is retried, scrapes go on
                    log.exception("metrics refresh failed")
                self._wake.wait(interval)
                self._wake.clear()

        self._refresher = threading.Thread(target=loop, name="metrics-refresh", daemon=True)
        self._refresher.start()

    def stop_refresher(self) -> None:
        if self._refresher is None:
            return
        self._stop.set()
        self._wake.set()
        self._refresher.join(timeout=30)
        self._refresher = None
        self.collector.background = False

    def job_finished(self, job: str, seconds: float, ok: bool, finished_at_unix: float) -> None:
        self._duration.labels(job).observe(seconds)
        if ok:
            self._last_success.labels(job).set(finished_at_unix)
        else:
            self._failures.labels(job).inc()
        self._wake.set()  # what the job wrote shows at the next scrape but one, at the latest

    def job_missed(self, job: str) -> None:
        self._missed.labels(job).inc()


UNTRAINED = "model_untrained"  # served_by's member for a series new to the champion
PREDECESSORS = 2  # retired versions whose forecasts may still be the ones served


@dataclass
class _Snapshot:
    key: tuple  # Store.metrics_generation() and the clock's step bucket when it was read
    text: bytes  # what was read, rendered in the Prometheus text format (kept alone: the
    # families' sample objects take several times its memory, 10,000 series: 20 MB of text)


class _Families:
    """Metric families in the shape generate_latest reads (a registry's collect())."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


class SqlCollector:
    """The SQL-backed metric families (a prometheus_client Collector), read into a snapshot
    that is read again only when the store or the clock's step may have changed it."""

    def __init__(self, store: Store, settings: MetricsSettings, clock: Clock) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.background = False  # a refresher keeps the snapshot current: serve it as is
        self._snapshot: _Snapshot | None = None
        self._lock = threading.Lock()

    def _key(self) -> tuple:
        generation = self.store.metrics_generation()
        step = max(60, int(generation[0] or 60))  # the finest series' step, at least a minute
        return (*generation, int(self.clock.now().timestamp()) // step)

    def refresh(self) -> _Snapshot:
        """The snapshot of the store as it is now: the last one if its key is unchanged."""
        with self._lock:
            key = self._key()
            if self._snapshot is None or self._snapshot.key != key:
                text = generate_latest(_Families(list(self._read())))  # type: ignore[arg-type]
                self._snapshot = _Snapshot(key, text)
            return self._snapshot

    def _current(self) -> _Snapshot:
        snapshot = self._snapshot
        if self.background and snapshot is not None:
            return snapshot
        return self.refresh()

    def exposition(self) -> bytes:
        return self._current().text

    def collect(self) -> Iterator[Metric]:
        """The snapshot's families, parsed back from its text (the HTTP app serves the text
        itself: `exposition`; this is for registries read in-process)."""
        return text_string_to_metric_families(self._current().text.decode())

    def describe(self) -> Iterable[Metric]:
        # Names without values: registering must not run SQL.
        return list(self._families().values())

    def _served_at(self, served: list[str], ids: list[int], now: Any) -> dict[int, dict[str, Any]]:
        """The forecast served for `now` among the models in `served` (the champion, then its
        predecessors: until a just-promoted champion has a target that old, theirs is the
        one served): whichever has the newest target <= now, then the newest origin."""
        best: dict[int, dict[str, Any]] = {}
        for model in served:
            for sid, r in self.store.forecasts_at(model, ids, now).items():
                key = (r["target_ts"], r["origin_ts"])
                if sid not in best or key > (best[sid]["target_ts"], best[sid]["origin_ts"]):
                    best[sid] = r
        return best

    def _predecessors(self) -> list[str]:
        """The newest retired versions, newest first (their forecasts were served last)."""
        versions = self.store.list_model_versions()
        return [f"v{v['id']}" for v in versions if v["stage"] == "retired"][:PREDECESSORS]

    def _read(self) -> Iterator[Metric]:
        fam = self._families()
        store, settings = self.store, self.settings
        catalogue = store.series_catalogue()
        fam["series"].add_metric([], len(catalogue))
        # Sorted here, not by the database: PostgreSQL's collation would order names
        # differently from SQLite, and then pick a different max_series.
        chosen = sorted(
            ((sid, name) for sid, name in catalogue if _matches(name, settings.series)),
            key=lambda r: r[1],
        )[: settings.max_series]
        names = dict(chosen)
        ids = list(names)

        champion = store.champion()
        model = f"v{champion['id']}" if champion is not None else None
        served = [model, *self._predecessors()] if model is not None else []
        if model is not None and ids:
            for r in store.newest_origin_forecasts(model, ids, settings.horizon_steps):
                labels = [names[r["series_id"]], str(r["horizon_step"])]
                level = r["interval_level"]
                edges = level is not None
                if edges and r["yhat_lower"] is not None:
                    q = quantile_label((1 - level) / 2)
                    fam["forecast"].add_metric([*labels, q], r["yhat_lower"])
                fam["forecast"].add_metric([*labels, "0.5"], r["yhat"])
                if edges and r["yhat_upper"] is not None:
                    q = quantile_label((1 + level) / 2)
                    fam["forecast"].add_metric([*labels, q], r["yhat_upper"])
            for sid, origin in store.newest_origins(model, ids).items():
                fam["origin_ts"].add_metric([names[sid]], origin.timestamp())
            now = self.clock.now()
            for sid, r in self._served_at(served, ids, now).items():
                fam["median"].add_metric([names[sid]], r["yhat"])
                if r["yhat_lower"] is not None:
                    fam["lower"].add_metric([names[sid]], r["yhat_lower"])
                if r["yhat_upper"] is not None:
                    fam["upper"].add_metric([names[sid]], r["yhat_upper"])

        actuals = store.latest_actuals(ids, model)
        for older in served[1:]:  # judged by the forecast served then, as for the band
            missing = [sid for sid, r in actuals.items() if r["yhat_lower"] is None]
            if not missing:
                break
            actuals.update(
                {
                    sid: r
                    for sid, r in store.latest_actuals(missing, older).items()
                    if r["yhat_lower"] is not None
                }
            )
        for sid, r in actuals.items():
            fam["observation"].add_metric([names[sid]], r["value"])
            fam["observation_ts"].add_metric([names[sid]], r["ts"].timestamp())
            lo, hi = r["yhat_lower"], r["yhat_upper"]
            if lo is not None and hi is not None:
                fam["outside"].add_metric([names[sid]], float(not lo <= r["value"] <= hi))
        for sid, n in store.anomaly_counts(ids).items():
            fam["anomalies"].add_metric([names[sid]], n)
        for sid, n in store.incident_counts(ids).items():
            fam["incidents"].add_metric([names[sid]], n)
        if model is not None:
            for r in store.anomaly_state(model, ids):
                fam["score"].add_metric([names[r["series_id"]]], r["score"])
                fam["incident_open"].add_metric([names[r["series_id"]]], float(r["incident_open"]))
            fleet = store.fleet_summary(model)
            fam["fleet_events"].add_metric([], fleet["events"])
            fam["in_incident"].add_metric([], fleet["in_incident"])
            running = fleet["newest"] is not None and fleet["newest_event_end"] == fleet["newest"]
            fam["fleet_event_open"].add_metric([], float(running))
            threshold = store.anomaly_threshold(model)
            if threshold is not None:
                fam["threshold"].add_metric([model], threshold["threshold"])
                fam["incident_rate"].add_metric([model, "target"], threshold["rate_target"])
                if threshold["rate_seen"] is not None:
                    fam["incident_rate"].add_metric([model, "seen"], threshold["rate_seen"])
        for sid, scored_model, mase in store.mase_by_series(ids):
            fam["mase"].add_metric([names[sid], scored_model], mase)
        for banded in (model, CHALLENGER) if model is not None else ():
            coverage = store.pooled_coverage(banded)
            if coverage is not None:
                fam["coverage"].add_metric([banded], coverage)
        serving = store.serving_by_series(champion, UNTRAINED)
        for _, name in chosen:
            if name in serving:
                entry = serving[name]
                weights = {entry: 1.0} if isinstance(entry, str) else entry
                for member, weight in weights.items():
                    fam["served_by"].add_metric([name, member], weight)
        for mv in store.serving_models():
            fam["model_info"].add_metric([f"v{mv['id']}", mv["kind"], mv["stage"]], 1)
        for source, n in store.source_rows().items():
            fam["ingested"].add_metric([source], n)
        for source, at in store.source_ingest_times().items():
            fam["last_ingest"].add_metric([source], at.timestamp())
        for source, reason, n in store.quarantine_counts():
            fam["quarantined"].add_metric([source, reason], n)
        yield from fam.values()

    @staticmethod
    def _families() -> dict[str, Metric]:
        g, c = GaugeMetricFamily, CounterMetricFamily
        return {
            "forecast": g(
                "forecaster_forecast",
                "The champion's forecast from its newest origin, horizon_step steps ahead, at "
                "the given quantile (0.5 = median, the others the calibrated band's edges).",
                labels=["series", "horizon_step", "q"],
            ),
            "lower": g(
                "forecaster_forecast_band_lower",
                "Lower edge of the calibrated band served for the current time (the champion's, or "
                "its predecessor's until a just-promoted champion has a target that old).",
                labels=["series"],
            ),
            "upper": g(
                "forecaster_forecast_band_upper",
                "Upper edge of the calibrated band served for the current time (the champion's, or "
                "its predecessor's until a just-promoted champion has a target that old).",
                labels=["series"],
            ),
            "median": g(
                "forecaster_forecast_median",
                "The median forecast served for the current time (the champion's, or its "
                "predecessor's until a just-promoted champion has a target that old).",
                labels=["series"],
            ),
            "observation": g(
                "forecaster_observation",
                "The latest observed value of the series.",
                labels=["series"],
            ),
            "observation_ts": g(
                "forecaster_observation_timestamp_seconds",
                "Unix time of the latest observed value of the series (its data time).",
                labels=["series"],
            ),
            "origin_ts": g(
                "forecaster_forecast_origin_timestamp_seconds",
                "Unix time of the champion's newest forecast origin for the series (the last "
                "point its forecasts have absorbed).",
                labels=["series"],
            ),
            "outside": g(
                "forecaster_outside_band",
                "1 if the latest observed value lies outside the band served for its time (the "
                "champion's newest forecast for it, else its predecessor's), else 0.",
                labels=["series"],
            ),
            "anomalies": c(
                "forecaster_anomalies",
                "Actuals recorded as anomalous (anomaly score above 1).",
                labels=["series"],
            ),
            "score": g(
                "forecaster_anomaly_score",
                "Anomaly score of the series' newest scored actual under the champion: its "
                "evidence (distance from the median in half-band widths, alone or over a run) "
                "over the series' threshold; above 1 is anomalous.",
                labels=["series"],
            ),
            "incident_open": g(
                "forecaster_incident_open",
                "1 while the series has an incident open (an anomalous actual within the last "
                "[anomalies].gap + 1 steps), else 0.",
                labels=["series"],
            ),
            "incidents": c(
                "forecaster_incidents",
                "Incidents recorded for the series (runs of anomalous actuals).",
                labels=["series"],
            ),
            "in_incident": g(
                "forecaster_series_in_incident",
                "Series with an incident open under the champion, over every series (not only "
                "those exposed).",
            ),
            "fleet_event_open": g(
                "forecaster_fleet_event_open",
                "1 while a fleet-wide event is running at the newest scored time (a share of the "
                "fleet in incidents at once), else 0.",
            ),
            "fleet_events": c(
                "forecaster_fleet_events",
                "Fleet-wide events recorded (every model).",
            ),
            "threshold": g(
                "forecaster_anomaly_threshold",
                "The fleet's pooled anomaly threshold (evidence that scores 1), set from the "
                "false-alarm rate chosen ([anomalies].incidents_per_week); series with enough "
                "history have their own.",
                labels=["model"],
            ),
            "incident_rate": g(
                "forecaster_incident_rate",
                "Incidents per series per week: the rate chosen (kind=target) and the rate seen "
                "over the evaluate window (kind=seen).",
                labels=["model", "kind"],
            ),
            "mase": g(
                "forecaster_mase",
                "Mean absolute scaled error over the evaluate job's recent window (1 = as good "
                "as the daily seasonal naive).",
                labels=["series", "model"],
            ),
            "coverage": g(
                "forecaster_band_coverage_ratio",
                "Share of scored actuals inside the served band, pooled over series: the "
                "champion's (model v<id>) and the statistical challenger's (model mstl).",
                labels=["model"],
            ),
            "series": g("forecaster_series", "Series in the store."),
            "served_by": g(
                "forecaster_series_served_by",
                "The weight of each member in what serves the series under the champion (they "
                "sum to 1): model (the network), naive_daily, naive_weekly, mstl (the "
                "statistical challenger), weighed per series on the holdout at training, "
                "then on the members' tracked errors as of the newest forecast "
                "(versions before the blend: 1 for one member, mean_daily / mean_weekly / "
                "mean_mstl being its mean with the network); model_untrained: the network, "
                "for a series the champion was not trained on (scaled from its own points).",
                labels=["series", "member"],
            ),
            "model_info": g(
                "forecaster_model_info",
                "1 for each model version serving (champion) or waiting (candidate).",
                labels=["version", "kind", "stage"],
            ),
            "ingested": c(
                "forecaster_ingested_rows",
                "Observed points ingested from the source.",
                labels=["source"],
            ),
            "last_ingest": g(
                "forecaster_source_last_ingest_timestamp_seconds",
                "Unix wall-clock time at which the source's last batch was committed.",
                labels=["source"],
            ),
            "quarantined": c(
                "forecaster_quarantined_rows",
                "Rows quarantined by the ingest, by source and reason.",
                labels=["source", "reason"],
            ),
        }
