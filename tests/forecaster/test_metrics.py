"""/metrics from SQL: every value the collector exposes is checked against a naive reference
computed from full reads of the same tables, on stores built by the real jobs (ingest,
predict, evaluate), on SQLite and PostgreSQL."""

from __future__ import annotations

import fnmatch
import subprocess
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from forecaster import schema
from forecaster.clock import FixedClock
from forecaster.config import MetricsSettings, SeriesDefaults
from forecaster.metrics import JOB_KINDS, ServiceMetrics, render
from forecaster.store import Store
from pipelines.evaluate import run_evaluate
from pipelines.ingest import ingest_batch
from pipelines.predict import run_predict
from pipelines.sources.base import Batch, raw_frame
from tests.conftest import require_binary
from tests.pipelines.test_predict import (  # noqa: F401
    NOW,
    START,
    WARMUP,
    _ingest_days,
    _promote_with_states,
    _setup,
    trained,
)

LAST_DAY = 24  # days ingested by _roll
NEWEST = START + timedelta(days=LAST_DAY) - timedelta(hours=1)  # newest point and origin
SQL_FAMILIES = {
    "forecaster_forecast",
    "forecaster_forecast_band_lower",
    "forecaster_forecast_band_upper",
    "forecaster_forecast_median",
    "forecaster_observation",
    "forecaster_observation_timestamp_seconds",
    "forecaster_forecast_origin_timestamp_seconds",
    "forecaster_outside_band",
    "forecaster_anomalies_total",
    "forecaster_incidents_total",
    "forecaster_anomaly_score",
    "forecaster_incident_open",
    "forecaster_series_in_incident",
    "forecaster_fleet_event_open",
    "forecaster_fleet_events_total",
    "forecaster_anomaly_threshold",
    "forecaster_incident_rate",
    "forecaster_mase",
    "forecaster_band_coverage_ratio",
    "forecaster_series",
    "forecaster_model_info",
    "forecaster_ingested_rows_total",
    "forecaster_quarantined_rows_total",
    "forecaster_source_last_ingest_timestamp_seconds",
}
WALL_CLOCK = {"forecaster_source_last_ingest_timestamp_seconds"}  # differs between two rolls
BAND = {
    "forecaster_forecast_band_lower": "yhat_lower",
    "forecaster_forecast_median": "yhat",
    "forecaster_forecast_band_upper": "yhat_upper",
}
HOSTILE = ['a"} 1\nevil{x="', "'; DROP TABLE observations; --", "back\\slash\\", "température ☃"]


def _register(store: Store, kind: str, stage: str) -> int:
    with store.begin() as conn:
        return store.register_model_version(
            conn,
            kind=kind,
            config={},
            uri="file:///nowhere.safetensors",
            sha256="0" * 64,
            trained_from=None,
            trained_to=None,
            metrics={},
            stage=stage,
        )


def _roll(url: str, trained) -> Store:  # noqa: F811
    """20 days, then (ingest a day, evaluate, predict) to day 24, with a late point that makes
    predict re-issue (supersede) forecasts, rows quarantined, and more registry entries."""
    store = _setup(url, trained)
    _ingest_days(store, 0, 20)
    run_predict(store, warmup_steps=WARMUP)
    for day in range(20, LAST_DAY):
        _ingest_days(store, day, day + 1)
        if day == 21:  # a spike: an anomaly, an incident
            with store.begin() as conn:
                o = schema.observations
                conn.execute(
                    sa.update(o)
                    .where(o.c.series_id == 1, o.c.ts == START + timedelta(days=day, hours=12))
                    .values(value=o.c.value + 100)
                )
        if day == LAST_DAY - 1:  # a late correction inside an absorbed window
            late = START + timedelta(days=day, hours=-3)
            batch = Batch(raw_frame(["sine.0"], [late.isoformat()], ["40.0"], "t"), {"late": 1})
            ingest_batch(store, "t", batch, SeriesDefaults(), NOW)
        run_evaluate(store, prior_weight=10)
        run_predict(store, warmup_steps=WARMUP)
    # And one inside the newest origin's window: its forecasts are re-issued too.
    late = Batch(
        raw_frame(["sine.0"], [(NEWEST - timedelta(hours=2)).isoformat()], ["5.0"], "t"), {}
    )
    ingest_batch(store, "t", late, SeriesDefaults(), NOW)
    run_predict(store, warmup_steps=WARMUP)
    bad = raw_frame(
        ["sine.0", "sine.0", "sine.1"],
        ["yesterday", START.isoformat(), (NOW + timedelta(days=3)).isoformat()],
        ["1.0", "not a number", "2.0"],
        "bad.csv",
    )
    ingest_batch(store, "q", Batch(bad, {"n": 1}), SeriesDefaults(), NOW)
    _register(store, "lstm", "candidate")
    retired = _register(store, "rnn", "candidate")
    with store.begin() as conn:
        store.set_stage(conn, retired, "retired")
    return store


@pytest.fixture(scope="module")
def rolled(tmp_path_factory, trained):  # noqa: F811
    store = _roll(f"sqlite:///{tmp_path_factory.mktemp('metrics') / 'store.db'}", trained)
    yield store
    store.close()


def _metrics(store: Store, now: datetime, **settings) -> ServiceMetrics:
    return ServiceMetrics(store, MetricsSettings(**settings), FixedClock(now), job_ids=[])


def _key(name: str, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def _exposed(registry: CollectorRegistry) -> dict[tuple, float]:
    """Every SQL-backed sample of one scrape (and no sample twice)."""
    samples = [
        (_key(s.name, s.labels), s.value)
        for fam in registry.collect()
        for s in fam.samples
        if s.name in SQL_FAMILIES
    ]
    out = dict(samples)
    assert len(out) == len(samples), "a sample is exposed twice"
    return out


def _expected(store: Store, settings: MetricsSettings, now: datetime) -> dict[tuple, float]:
    """The reference: full reads of the tables, the newest rows picked in Python."""
    f, o, se = schema.forecasts, schema.observations, schema.series
    with store.engine.connect() as conn:
        names = dict(conn.execute(sa.select(se.c.id, se.c.name)).all())
        obs = conn.execute(
            sa.select(o.c.series_id, o.c.ts, o.c.value).where(
                o.c.quality == "observed", o.c.value.is_not(None)
            )
        ).all()
        acc = conn.execute(sa.select(schema.series_accuracy)).mappings().all()
        anomalies = conn.execute(sa.select(schema.anomalies.c.series_id)).scalars().all()
        incidents = conn.execute(sa.select(schema.incidents.c.series_id)).scalars().all()
        states = conn.execute(sa.select(schema.anomaly_state)).mappings().all()
        events = conn.execute(sa.select(schema.fleet_events)).mappings().all()
        thresholds = conn.execute(sa.select(schema.anomaly_thresholds)).mappings().all()
        versions = conn.execute(sa.select(schema.model_versions)).mappings().all()
        cursors = conn.execute(sa.select(schema.source_cursors)).mappings().all()
        quarantine = conn.execute(
            sa.select(schema.quarantine.c.source, schema.quarantine.c.reason)
        ).all()
        champion = store.champion()
        model = f"v{champion['id']}" if champion else None
        retired = sorted((v["id"] for v in versions if v["stage"] == "retired"), reverse=True)
        # The band served for a time comes from the champion or, until it has a target that
        # old, from its last two predecessors.
        served = [model] + [f"v{i}" for i in retired[:2]] if model else []
        every = (
            conn.execute(sa.select(f).where(f.c.model.in_(served), f.c.superseded.is_(False)))
            .mappings()
            .all()
        )
        rows = [r for r in every if r["model"] == model]
    out: dict[tuple, float] = {_key("forecaster_series", {}): len(names)}
    chosen = sorted(
        (n, i) for i, n in names.items() if any(fnmatch.fnmatchcase(n, p) for p in settings.series)
    )[: settings.max_series]
    for name, sid in chosen:
        mine = [r for r in rows if r["series_id"] == sid]
        if mine:
            newest = max(r["origin_ts"] for r in mine)
            origin_key = _key("forecaster_forecast_origin_timestamp_seconds", {"series": name})
            out[origin_key] = newest.timestamp()
            for r in mine:
                if r["origin_ts"] == newest and r["horizon_step"] in settings.horizon_steps:
                    assert r["interval_level"] == pytest.approx(0.8)
                    for q, col in (("0.1", "yhat_lower"), ("0.5", "yhat"), ("0.9", "yhat_upper")):
                        labels = {
                            "series": name,
                            "horizon_step": str(r["horizon_step"]),
                            "q": q,
                        }
                        out[_key("forecaster_forecast", labels)] = r[col]
        past = [r for r in every if r["series_id"] == sid and r["target_ts"] <= now]
        if past:
            band = max(past, key=lambda r: (r["target_ts"], r["origin_ts"]))
            for metric, col in BAND.items():
                out[_key(metric, {"series": name})] = band[col]
        mine_obs = [(ts, v) for i, ts, v in obs if i == sid]
        if mine_obs:
            ts, value = max(mine_obs)
            out[_key("forecaster_observation", {"series": name})] = value
            obs_key = _key("forecaster_observation_timestamp_seconds", {"series": name})
            out[obs_key] = ts.timestamp()
            for m in served:  # the champion's forecast for that time, else a predecessor's
                at = [
                    r
                    for r in every
                    if r["model"] == m and r["series_id"] == sid and r["target_ts"] == ts
                ]
                if at:
                    r = max(at, key=lambda r: r["origin_ts"])
                    outside = not r["yhat_lower"] <= value <= r["yhat_upper"]
                    out[_key("forecaster_outside_band", {"series": name})] = float(outside)
                    break
        if sid in anomalies:
            out[_key("forecaster_anomalies_total", {"series": name})] = anomalies.count(sid)
        if sid in incidents:
            out[_key("forecaster_incidents_total", {"series": name})] = incidents.count(sid)
        for st in states:
            if st["series_id"] == sid and st["model"] == model:
                out[_key("forecaster_anomaly_score", {"series": name})] = st["score"]
                open_key = _key("forecaster_incident_open", {"series": name})
                out[open_key] = float(st["incident_open"])
        for a in acc:
            if a["series_id"] == sid and a["mase"] is not None:
                out[_key("forecaster_mase", {"series": name, "model": a["model"]})] = a["mase"]
    for banded in (model, "mstl") if model is not None else ():  # the champion, the challenger
        pooled = [
            (a["coverage"], a["n_scored"])
            for a in acc
            if a["model"] == banded and a["coverage"] is not None
        ]
        if pooled:
            coverage = sum(c * n for c, n in pooled) / sum(n for _, n in pooled)
            out[_key("forecaster_band_coverage_ratio", {"model": banded})] = coverage
    if model is not None:
        mine = [st for st in states if st["model"] == model]
        open_ = sum(st["incident_open"] for st in mine)
        out[_key("forecaster_series_in_incident", {})] = open_
        out[_key("forecaster_fleet_events_total", {})] = len(events)
        newest = max((st["ts"] for st in mine), default=None)
        ends = [e["end_ts"] for e in events if e["model"] == model]
        running = newest is not None and bool(ends) and max(ends) == newest
        out[_key("forecaster_fleet_event_open", {})] = float(running)
        for t in thresholds:
            if t["model"] == model:
                labels = {"model": model}
                out[_key("forecaster_anomaly_threshold", labels)] = t["threshold"]
                rate = "forecaster_incident_rate"
                out[_key(rate, {**labels, "kind": "target"})] = t["rate_target"]
                if t["rate_seen"] is not None:
                    out[_key(rate, {**labels, "kind": "seen"})] = t["rate_seen"]
    for v in versions:
        if v["stage"] != "retired":
            labels = {"version": f"v{v['id']}", "kind": v["kind"], "stage": v["stage"]}
            out[_key("forecaster_model_info", labels)] = 1.0
    for c in cursors:
        out[_key("forecaster_ingested_rows_total", {"source": c["source"]})] = c["rows_total"]
        at_key = _key("forecaster_source_last_ingest_timestamp_seconds", {"source": c["source"]})
        out[at_key] = c["updated_at"].timestamp()
    for (source, reason), n in Counter(quarantine).items():
        out[_key("forecaster_quarantined_rows_total", {"source": source, "reason": reason})] = n
    return out


def _assert_matches_sql(store: Store, now: datetime, **settings) -> dict[tuple, float]:
    """Every sample equals the reference and nothing else is exposed; one sample of each
    family is also read the way a user reads it, with get_sample_value (one scrape each)."""
    metrics = _metrics(store, now, **settings)
    want = _expected(store, MetricsSettings(**settings), now)
    got = _exposed(metrics.registry)
    assert set(got) == set(want)
    assert got == pytest.approx(want)
    first = {name: labels for name, labels in reversed(list(want))}
    for name, labels in first.items():
        value = metrics.registry.get_sample_value(name, dict(labels))
        assert value == pytest.approx(want[name, labels]), (name, labels)
    return want


# Clock times around the newest origin NEWEST (origins are daily, 24 hourly steps each).
CLOCKS = {
    "mid-data": NEWEST - timedelta(hours=5, minutes=30),  # a simulated clock behind the data
    "at-newest-origin": NEWEST,
    "half-step-after": NEWEST + timedelta(minutes=30),  # newest origin has no target yet
    "seven-steps-after": NEWEST + timedelta(hours=7),
    "far-future": datetime(2030, 1, 1, tzinfo=UTC),
    "before-any-forecast": START,
}


@pytest.mark.parametrize("now", CLOCKS.values(), ids=CLOCKS.keys())
def test_every_value_matches_what_sql_holds(rolled, now):
    want = _assert_matches_sql(rolled, now)
    names = {name for name, _ in want}
    has_band = now >= START + timedelta(days=20)  # the first forecast's first target
    assert names == (SQL_FAMILIES if has_band else SQL_FAMILIES - set(BAND))


def test_spot_checks_by_hand(rolled):
    """A few values read straight from their rows, and what the roll must have exercised:
    superseded rows at both newest origins, quarantine, a candidate and a retired version."""
    f = schema.forecasts
    with rolled.engine.connect() as conn:
        superseded = conn.execute(
            sa.select(f.c.origin_ts).where(f.c.model == "v1", f.c.superseded.is_(True)).distinct()
        ).scalars()
        assert set(superseded) == {NEWEST - timedelta(days=1), NEWEST}
        step = {
            r.horizon_step: r
            for r in conn.execute(
                sa.select(f).where(
                    f.c.series_id == 1,
                    f.c.model == "v1",
                    f.c.origin_ts == NEWEST,
                    f.c.superseded.is_(False),
                )
            )
        }
        mase = conn.execute(
            sa.select(schema.series_accuracy.c.mase).where(
                schema.series_accuracy.c.series_id == 1, schema.series_accuracy.c.model == "v1"
            )
        ).scalar_one()
    reg = _metrics(rolled, NEWEST + timedelta(hours=7)).registry
    s0 = {"series": "sine.0"}
    assert reg.get_sample_value("forecaster_forecast_median", s0) == step[7].yhat
    assert reg.get_sample_value("forecaster_forecast_band_lower", s0) == step[7].yhat_lower
    assert reg.get_sample_value("forecaster_forecast_band_upper", s0) == step[7].yhat_upper
    at6 = {**s0, "horizon_step": "6"}
    assert reg.get_sample_value("forecaster_forecast", {**at6, "q": "0.9"}) == step[6].yhat_upper
    assert reg.get_sample_value("forecaster_forecast", {**at6, "q": "0.1"}) == step[6].yhat_lower
    assert reg.get_sample_value("forecaster_mase", {**s0, "model": "v1"}) == mase
    assert 0 < reg.get_sample_value("forecaster_band_coverage_ratio", {"model": "v1"}) < 1
    assert 0 < reg.get_sample_value("forecaster_band_coverage_ratio", {"model": "mstl"}) <= 1
    assert reg.get_sample_value("forecaster_mase", {**s0, "model": "mstl"}) > 0
    assert reg.get_sample_value("forecaster_series") == 2
    info = "forecaster_model_info"
    assert reg.get_sample_value(info, {"version": "v1", "kind": "gru", "stage": "champion"}) == 1
    assert reg.get_sample_value(info, {"version": "v2", "kind": "lstm", "stage": "candidate"}) == 1
    assert reg.get_sample_value(info, {"version": "v3", "kind": "rnn", "stage": "retired"}) is None
    for reason in ("bad_ts", "bad_value", "future"):
        labels = {"source": "q", "reason": reason}
        assert reg.get_sample_value("forecaster_quarantined_rows_total", labels) == 1
    # Every observed point of both series, the two late corrections counted once more.
    ingested = reg.get_sample_value("forecaster_ingested_rows_total", {"source": "t"})
    assert ingested == 2 * 24 * LAST_DAY + 2
    assert reg.get_sample_value("forecaster_anomalies_total", s0) > 0


def _names(store: Store) -> dict[int, str]:
    with store.engine.connect() as conn:
        return dict(conn.execute(sa.select(schema.series.c.id, schema.series.c.name)).all())


def test_forecast_origin_timestamp_is_the_champions_newest_current_origin(rolled):
    f = schema.forecasts
    with rolled.engine.connect() as conn:
        newest = dict(
            conn.execute(
                sa.select(f.c.series_id, sa.func.max(f.c.origin_ts))
                .where(f.c.model == "v1", f.c.superseded.is_(False))
                .group_by(f.c.series_id)
            ).all()
        )
    assert set(newest.values()) == {NEWEST}
    names = _names(rolled)
    # A value, not a sample timestamp, and the same whatever the clock says.
    for now in (CLOCKS["before-any-forecast"], CLOCKS["far-future"]):
        reg = _metrics(rolled, now).registry
        for sid, origin in newest.items():
            labels = {"series": names[sid]}
            got = reg.get_sample_value("forecaster_forecast_origin_timestamp_seconds", labels)
            assert got == origin.timestamp() == NEWEST.timestamp()


def test_observation_timestamp_is_the_time_of_the_observation_exposed(rolled):
    o = schema.observations
    observed = sa.and_(o.c.quality == "observed", o.c.value.is_not(None))
    with rolled.engine.connect() as conn:
        newest = dict(
            conn.execute(
                sa.select(o.c.series_id, sa.func.max(o.c.ts))
                .where(observed)
                .group_by(o.c.series_id)
            ).all()
        )
        values = {
            sid: conn.execute(
                sa.select(o.c.value).where(o.c.series_id == sid, o.c.ts == ts)
            ).scalar_one()
            for sid, ts in newest.items()
        }
    assert set(newest.values()) == {NEWEST}
    names = _names(rolled)
    reg = _metrics(rolled, CLOCKS["mid-data"]).registry
    for sid, ts in newest.items():
        labels = {"series": names[sid]}
        assert reg.get_sample_value("forecaster_observation_timestamp_seconds", labels) == (
            ts.timestamp()
        )
        assert reg.get_sample_value("forecaster_observation", labels) == values[sid]


def test_source_last_ingest_timestamp_is_the_cursors_wall_clock_time(db_url):
    store = Store(db_url)
    store.upgrade()
    name = "forecaster_source_last_ingest_timestamp_seconds"
    assert _metrics(store, NOW).registry.get_sample_value(name, {"source": "t"}) is None
    c = schema.source_cursors

    def sql() -> float:
        with store.engine.connect() as conn:
            at = conn.execute(sa.select(c.c.updated_at).where(c.c.source == "t")).scalar_one()
        return at.timestamp()

    before = time.time()
    _ingest_days(store, 0, 1)
    first = _metrics(store, NOW).registry.get_sample_value(name, {"source": "t"})
    # The wall clock of the commit: neither the data's time (2024) nor the metrics' clock.
    assert first == sql() and before - 1 <= first <= time.time() + 1
    time.sleep(0.01)
    empty = Batch(raw_frame([], [], [], "t"), {"day": 1, "polled": 2})
    ingest_batch(store, "t", empty, SeriesDefaults(), NOW)  # nothing new, the cursor moves
    second = _metrics(store, NOW).registry.get_sample_value(name, {"source": "t"})
    assert second == sql() > first
    store.close()


def test_bounds_series_patterns_max_series_and_horizon_steps(rolled):
    now = NEWEST + timedelta(hours=3)
    want = _assert_matches_sql(rolled, now, series=["*.1"])
    assert {dict(labels).get("series") for _, labels in want} == {"sine.1", None}
    want = _assert_matches_sql(rolled, now, series=["sine.?"], max_series=1)
    assert {dict(labels).get("series") for _, labels in want} == {"sine.0", None}
    want = _assert_matches_sql(rolled, now, series=["nothing*", "sine.0"], horizon_steps=[2, 3])
    steps = {dict(labels)["horizon_step"] for name, labels in want if name == "forecaster_forecast"}
    assert steps == {"2", "3"}
    assert {dict(labels).get("series") for _, labels in want} == {"sine.0", None}
    m = _metrics(rolled, now, series=["none"])
    assert m.registry.get_sample_value("forecaster_series") == 2  # the count is not bounded
    assert m.registry.get_sample_value("forecaster_observation", {"series": "sine.0"}) is None


def test_job_metrics_start_at_zero_and_count(sqlite_url):
    store = Store(sqlite_url)
    store.upgrade()
    jobs = ["ingest:nycflights", *JOB_KINDS[1:]]
    m = ServiceMetrics(store, MetricsSettings(), FixedClock(NOW), job_ids=jobs)
    assert m.registry is not REGISTRY
    reg = m.registry
    for job in jobs:
        assert reg.get_sample_value("forecaster_job_duration_seconds_count", {"job": job}) == 0
        assert reg.get_sample_value("forecaster_job_failures_total", {"job": job}) == 0
        assert reg.get_sample_value("forecaster_job_missed_total", {"job": job}) == 0
        assert (
            reg.get_sample_value("forecaster_job_last_success_timestamp_seconds", {"job": job}) == 0
        )
    m.job_finished("predict", 0.2, True, 1_700_000_000.0)
    m.job_finished("predict", 3.0, False, 1_700_000_100.0)
    m.job_finished("retrain", 1500.0, True, 1_700_002_000.0)
    m.job_missed("evaluate")
    m.job_missed("evaluate")
    p = {"job": "predict"}
    assert reg.get_sample_value("forecaster_job_duration_seconds_count", p) == 2
    assert reg.get_sample_value("forecaster_job_duration_seconds_sum", p) == pytest.approx(3.2)
    assert reg.get_sample_value("forecaster_job_duration_seconds_bucket", {**p, "le": "0.25"}) == 1
    assert reg.get_sample_value("forecaster_job_duration_seconds_bucket", {**p, "le": "0.01"}) == 0
    assert reg.get_sample_value("forecaster_job_failures_total", p) == 1
    assert (
        reg.get_sample_value("forecaster_job_last_success_timestamp_seconds", p) == 1_700_000_000.0
    )
    r = {"job": "retrain"}
    assert (
        reg.get_sample_value("forecaster_job_duration_seconds_bucket", {**r, "le": "1800.0"}) == 1
    )
    assert (
        reg.get_sample_value("forecaster_job_duration_seconds_bucket", {**r, "le": "1200.0"}) == 0
    )
    assert reg.get_sample_value("forecaster_job_missed_total", {"job": "evaluate"}) == 2
    # Two services in one process never share a registry.
    other = ServiceMetrics(store, MetricsSettings(), FixedClock(NOW), job_ids=jobs)
    assert other.registry.get_sample_value("forecaster_job_failures_total", p) == 0
    # A registry handed in is the one used.
    mine = CollectorRegistry()
    assert (
        ServiceMetrics(
            store, MetricsSettings(), FixedClock(NOW), job_ids=[], registry=mine
        ).registry
        is mine
    )
    store.close()


def test_a_series_deleted_from_sql_vanishes_on_the_next_scrape(db_url, trained):  # noqa: F811
    store = _setup(db_url, trained)
    _ingest_days(store, 0, 8)
    run_predict(store, warmup_steps=WARMUP)
    m = _metrics(store, START + timedelta(days=8, hours=5))
    before = _exposed(m.registry)
    assert {dict(k[1]).get("series") for k in before} == {"sine.0", "sine.1", None}
    assert (
        m.registry.get_sample_value("forecaster_forecast_median", {"series": "sine.1"}) is not None
    )
    # No actual has reached a forecast yet: no outside_band sample.
    assert m.registry.get_sample_value("forecaster_outside_band", {"series": "sine.1"}) is None
    with store.begin() as conn:
        conn.execute(sa.delete(schema.series).where(schema.series.c.name == "sine.1"))
    after = _exposed(m.registry)
    assert {dict(k[1]).get("series") for k in after} == {"sine.0", None}
    assert after[_key("forecaster_series", {})] == 1
    assert {
        k: v
        for k, v in before.items()
        if ("series", "sine.1") not in k[1] and k[0] != "forecaster_series"
    } == {k: v for k, v in after.items() if k[0] != "forecaster_series"}
    store.close()


def test_without_a_champion_only_actuals_and_counts_are_exposed(db_url):
    store = Store(db_url)
    store.upgrade()
    _ingest_days(store, 0, 2)
    _assert_matches_sql(store, NOW)
    reg = _metrics(store, NOW).registry
    assert reg.get_sample_value("forecaster_observation", {"series": "sine.0"}) is not None
    assert reg.get_sample_value("forecaster_forecast_median", {"series": "sine.0"}) is None
    store.close()


@pytest.mark.postgres
def test_postgresql_exposes_the_same_values_as_sqlite(pg_url, trained, rolled):  # noqa: F811
    store = _roll(pg_url, trained)
    for now in (CLOCKS["mid-data"], CLOCKS["half-step-after"], CLOCKS["far-future"]):
        got = _exposed(_metrics(store, now).registry)
        ref = _exposed(_metrics(rolled, now).registry)
        assert got.keys() == ref.keys()
        same = {k: v for k, v in got.items() if k[0] not in WALL_CLOCK}
        assert same == pytest.approx({k: v for k, v in ref.items() if k[0] not in WALL_CLOCK})
    _assert_matches_sql(store, CLOCKS["seven-steps-after"])
    store.close()


def _promtool_problems(text: bytes) -> list[str]:
    """Run the real `promtool check metrics`; return its lint problems (a parse error fails)."""
    binary = require_binary("promtool")
    proc = subprocess.run(
        [binary, "check", "metrics"], input=text, capture_output=True, timeout=30, check=False
    )
    out = (proc.stdout + proc.stderr).decode()
    # 0: clean; 3: parsed, with lint problems listed; anything else (1): unparseable.
    assert proc.returncode in (0, 3), out  # 3: parsed, with lint problems listed
    return [line for line in out.splitlines() if line.strip()]


@pytest.mark.prometheus
def test_hostile_series_names_are_stored_verbatim_and_exposed_parseably(db_url, trained):  # noqa: F811
    store = _setup(db_url, trained)
    _ingest_days(store, 0, 8)
    names = HOSTILE + ["sine.0"]
    ts = [(START + timedelta(days=8, hours=h)).isoformat() for h in range(len(names))]
    hostile_source = 'src"\n\\'
    batch = Batch(raw_frame(names, ts, ["1.5"] * len(names), "x"), {"n": 1})
    ingest_batch(store, hostile_source, batch, SeriesDefaults(), NOW)
    bad = Batch(raw_frame([HOSTILE[0]], ["never"], ["1"], "x"), {"n": 2})
    ingest_batch(store, hostile_source, bad, SeriesDefaults(), NOW)
    run_predict(store, warmup_steps=WARMUP)  # forecasts for sine.*; the model knows no others
    with store.engine.connect() as conn:
        stored = set(conn.execute(sa.select(schema.series.c.name)).scalars())
        assert (
            conn.execute(sa.select(sa.func.count()).select_from(schema.observations)).scalar_one()
            > 0
        )
    assert stored == set(HOSTILE) | {"sine.0", "sine.1"}

    metrics = _metrics(store, NOW)
    _assert_matches_sql(store, NOW)
    for name in HOSTILE:
        assert metrics.registry.get_sample_value("forecaster_observation", {"series": name}) == 1.5
    body, content_type = render(metrics.registry)
    assert content_type.startswith("text/plain; version=0.0.4")
    parsed = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
    }
    for name in HOSTILE:
        assert parsed[_key("forecaster_observation", {"series": name})] == 1.5
    assert parsed[_key("forecaster_ingested_rows_total", {"source": hostile_source})] == len(names)
    assert (
        parsed[
            _key(
                "forecaster_quarantined_rows_total", {"source": hostile_source, "reason": "bad_ts"}
            )
        ]
        == 1
    )
    assert any(k[0] == "forecaster_forecast" for k in parsed)
    assert _promtool_problems(body) == []  # promtool parses and lints it clean
    # No sample carries a timestamp: each line is `name{labels} value`.
    for family in text_string_to_metric_families(body.decode()):
        assert all(s.timestamp is None for s in family.samples)
    store.close()


def test_a_scrape_of_500_series_is_fast_on_sqlite(sqlite_url):
    """The reliability requirement: well under a second for 500 series (lenient bound). The
    forecasts are written through the store's own write path (predict's model knows only the
    sine series)."""
    store = Store(sqlite_url)
    store.upgrade()
    version = _register(store, "gru", "champion")
    names = [f"load.{i:03d}" for i in range(500)]
    hours = 2 * 24
    series, ts, value = [], [], []
    for i, name in enumerate(names):
        for h in range(hours):
            series.append(name)
            ts.append((START + timedelta(hours=h)).isoformat())
            value.append(str(i + h % 24))
    ingest_batch(
        store, "load", Batch(raw_frame(series, ts, value, "load"), {"n": 1}), SeriesDefaults(), NOW
    )
    ids = _series_ids(store)
    champion = f"v{version}"
    rows = [
        {
            "series_id": ids[name],
            "model": model,
            "origin_ts": origin,
            "horizon_step": step,
            "model_version_id": version if model == champion else None,
            "target_ts": origin + timedelta(hours=step),
            "yhat": float(step),
            "yhat_lower": step - 1.0,
            "yhat_upper": step + 1.0,
            "interval_level": 0.8,
            "raw_lower": step - 1.0,
            "raw_upper": step + 1.0,
        }
        for name in names
        for origin in (START + timedelta(hours=23), START + timedelta(hours=47))
        for model in (champion, "seasonal_naive_daily")
        for step in range(1, 25)
    ]
    with store.begin() as conn:
        store.save_prediction(
            conn, version_id=version, states=[], snapshots=[], forecasts=rows, keep_snapshots=7
        )
    metrics = _metrics(store, START + timedelta(days=1, hours=12))
    timings = []
    for _ in range(3):
        t0 = time.perf_counter()
        body, _ = render(metrics.registry)
        timings.append(time.perf_counter() - t0)
    assert body.count(b"\nforecaster_forecast{") == 500 * 4 * 3
    assert body.count(b"\nforecaster_forecast_median{") == 500
    assert body.count(b"\nforecaster_observation{") == 500
    assert sorted(timings)[1] < 1.0, timings  # the median of three: one hiccup is not a fail
    store.close()


def _series_ids(store: Store) -> dict[str, int]:
    with store.engine.connect() as conn:
        return dict(conn.execute(sa.select(schema.series.c.name, schema.series.c.id)).all())


def test_after_a_promotion_the_band_served_is_the_predecessors_until_the_champion_covers_now(
    sqlite_url,
    trained,  # noqa: F811
):
    store = _setup(sqlite_url, trained)  # v1, the champion
    _ingest_days(store, 0, 30)
    run_predict(store, warmup_steps=WARMUP)
    _ingest_days(store, 30, 31)
    run_predict(store, warmup_steps=WARMUP)  # v1 forecasts day 31 from the end of day 30
    v2 = _promote_with_states(store, trained)  # states and forecasts, then promoted
    origin = START + timedelta(days=31) - timedelta(hours=1)  # v2's first and only origin
    f = schema.forecasts
    with store.engine.connect() as conn:
        v1_rows = conn.execute(
            sa.select(f.c.series_id, f.c.target_ts, f.c.yhat).where(f.c.model == "v1")
        ).all()
    # At v2's origin it has no target yet: the band served is v1's forecast for that hour.
    at_origin = _metrics(store, origin).registry
    sid = {r["name"]: r["id"] for r in store.prediction_targets()}["sine.0"]
    want = next(y for s, t, y in v1_rows if s == sid and t == origin)
    assert at_origin.get_sample_value("forecaster_forecast_median", {"series": "sine.0"}) == want
    _assert_matches_sql(store, origin)
    # An hour later v2's first target has come: its forecast is the one served.
    later = origin + timedelta(hours=1)
    reg = _metrics(store, later).registry
    with store.engine.connect() as conn:
        v2_first = conn.execute(
            sa.select(f.c.yhat).where(
                f.c.model == f"v{v2}", f.c.series_id == sid, f.c.target_ts == later
            )
        ).scalar_one()
    assert reg.get_sample_value("forecaster_forecast_median", {"series": "sine.0"}) == v2_first
    _assert_matches_sql(store, later)
    store.close()


def test_what_serves_each_series_is_exposed(tmp_path):
    """forecaster_series_served_by: the champion's per-series choice (model_versions.metrics
    key "serving"), per series shown one sample per member with its weight in the blend (1
    for a version's named member), or the weights recorded beside the series' state by the
    last predict (series_states.weights); model_untrained for a series it serves without
    having been trained on it (series_scalers)."""
    store = Store(f"sqlite:///{tmp_path / 'served.db'}")
    store.upgrade()
    with store.begin() as conn:
        store.resolve_series(
            conn, ["a", "b", "c"], create=True, source="t", freq_seconds=3600, window_seconds=86400
        )
        store.register_model_version(
            conn,
            kind="lstm",
            config={},
            uri="file:///nowhere.safetensors",
            sha256="0" * 64,
            trained_from=None,
            trained_to=None,
            metrics={"serving": {"a": "model", "b": {"naive_weekly": 0.75, "mstl": 0.25}}},
            stage="champion",
        )
    reg = _metrics(store, NOW).registry
    name = "forecaster_series_served_by"
    assert reg.get_sample_value(name, {"series": "a", "member": "model"}) == 1
    assert reg.get_sample_value(name, {"series": "b", "member": "naive_weekly"}) == 0.75
    assert reg.get_sample_value(name, {"series": "b", "member": "mstl"}) == 0.25
    assert reg.get_sample_value(name, {"series": "b", "member": "model"}) is None
    assert reg.get_sample_value(name, {"series": "c", "member": "model"}) is None  # not trained on
    # Once predict serves "c" (a series the champion was not trained on), it says so.
    (cid,) = [sid for sid, n in store.series_catalogue() if n == "c"]
    store.save_series_scalers(
        1, [{"series_id": cid, "center": 1.0, "scale": 2.0, "n_points": 5, "fitted_to": NOW}]
    )
    reg = _metrics(store, NOW).registry
    assert reg.get_sample_value(name, {"series": "c", "member": "model_untrained"}) == 1
    assert reg.get_sample_value(name, {"series": "a", "member": "model"}) == 1
    # Where predict recorded the weights that served the newest forecast (they follow the
    # members' tracked errors), those are shown instead of the holdout's.
    (bid,) = [sid for sid, n in store.series_catalogue() if n == "b"]
    with store.begin() as conn:
        store.save_prediction(
            conn,
            version_id=1,
            states=[
                {
                    "series_id": bid,
                    "state": b"\0" * 4,
                    "shape": [1, 1, 1],
                    "state_ts": NOW,
                    "weights": {"naive_weekly": 0.5, "model": 0.5},
                }
            ],
            snapshots=[],
            forecasts=[],
            keep_snapshots=7,
        )
    reg = _metrics(store, NOW).registry
    assert reg.get_sample_value(name, {"series": "b", "member": "naive_weekly"}) == 0.5
    assert reg.get_sample_value(name, {"series": "b", "member": "model"}) == 0.5
    assert reg.get_sample_value(name, {"series": "b", "member": "mstl"}) is None
    store.close()


class _Statements:
    """Counts the SQL statements an engine runs while active."""

    def __init__(self, store: Store) -> None:
        self.engine, self.n = store.engine, 0

    def _count(self, *_a) -> None:
        self.n += 1

    def __enter__(self) -> _Statements:
        sa.event.listen(self.engine, "before_cursor_execute", self._count)
        return self

    def __exit__(self, *_exc) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._count)


def test_a_scrape_serves_the_snapshot_until_what_it_shows_changes(db_url, trained):  # noqa: F811
    """A scrape reads SQL only when a job changed something it shows (one marker query
    tells) or the clock passed a step; what it serves always equals a fresh read."""
    store = _setup(db_url, trained)
    _ingest_days(store, 0, 8)
    run_predict(store, warmup_steps=WARMUP)
    now = START + timedelta(days=8, minutes=5)
    m = _metrics(store, now)
    first, _ = m.exposition()
    with _Statements(store) as sql:
        again, _ = m.exposition()
    assert again == first and sql.n == 1  # the marker query alone

    def fresh(at: datetime) -> dict:
        return _exposed(_metrics(store, at).registry)

    # A new day ingested and predicted: the next scrape reads it.
    _ingest_days(store, 8, 9)
    run_predict(store, warmup_steps=WARMUP)
    with _Statements(store) as sql:
        changed, _ = m.exposition()
    assert sql.n > 1 and changed != first
    assert _exposed(m.registry) == fresh(now)
    # The clock passing an hour moves the band served for now, without any job running.
    m.collector.clock.set(now + timedelta(hours=1))
    assert _exposed(m.registry) == fresh(now + timedelta(hours=1))
    assert _exposed(m.registry) != fresh(now)
    store.close()


def test_in_the_daemon_a_scrape_runs_no_sql_and_a_finished_job_refreshes_it(
    db_url,
    trained,  # noqa: F811
):
    """With the background refresher (the live daemon's), a scrape serves the snapshot with
    no SQL at all; a finished job wakes the refresher, which reads what the job wrote."""
    store = _setup(db_url, trained)
    _ingest_days(store, 0, 8)
    run_predict(store, warmup_steps=WARMUP)
    now = START + timedelta(days=8, minutes=5)
    m = _metrics(store, now)
    m.start_refresher(interval=60)
    try:
        deadline = time.monotonic() + 30
        while not m.collector.background and time.monotonic() < deadline:
            time.sleep(0.01)
        before = m.collector.exposition()
        with _Statements(store) as sql:
            for _ in range(3):
                assert m.exposition()[0].endswith(before)
        assert sql.n == 0
        _ingest_days(store, 8, 9)
        run_predict(store, warmup_steps=WARMUP)
        m.job_finished("predict", 0.1, True, time.time())
        while m.collector.exposition() == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _exposed(m.registry) == _exposed(_metrics(store, now).registry)
    finally:
        m.stop_refresher()
    store.close()
