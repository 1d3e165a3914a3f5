"""The evaluate job's anomalies: scores, incidents, fleet events, the threshold from a
false-alarm rate; idempotent, and a crash then a restart equals an uninterrupted run."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import polars as pl
import pytest
import sqlalchemy as sa

from forecaster import anomaly, schema
from forecaster.config import AnomalySettings
from pipelines.evaluate import _correlations, run_evaluate
from pipelines.predict import run_predict
from tests.pipelines.test_predict import (  # noqa: F401
    START,
    WARMUP,
    _ingest_days,
    _setup,
    trained,
)

# Two series: an event is both at once; events are not merged.
CFG = AnomalySettings(fleet_min_series=2, fleet_share=0.5, fleet_merge=timedelta(0))
TABLES = ("anomalies", "incidents", "fleet_events", "anomaly_state", "anomaly_thresholds")


def _disrupt(store, series: str | None, day: int, hours: range, add: float) -> None:
    """Add `add` to the stored values of `series` (None: every series) at those hours."""
    o, se = schema.observations, schema.series
    times = [START + timedelta(days=day, hours=h) for h in hours]
    q = sa.update(o).where(o.c.ts.in_(times)).values(value=o.c.value + add)
    if series is not None:
        q = q.where(
            o.c.series_id == sa.select(se.c.id).where(se.c.name == series).scalar_subquery()
        )
    with store.begin() as conn:
        conn.execute(q)


def _day(store, day: int, disrupt=None, cfg: AnomalySettings = CFG):
    _ingest_days(store, day, day + 1)
    if disrupt is not None:
        disrupt(store)
    run_predict(store, warmup_steps=WARMUP)
    return run_evaluate(store, prior_weight=10, anomalies=cfg)


def _rows(store, table: str) -> list[tuple]:
    t = schema.metadata.tables[table]
    skip = {"created_at", "updated_at"}
    cols = [c for c in t.columns if c.name not in skip]
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(*cols)).all()
    return sorted(tuple(round(v, 9) if isinstance(v, float) else v for v in r) for r in rows)


def _replay(store, last: int, disruptions: dict[int, object]):
    _ingest_days(store, 0, 20)
    run_predict(store, warmup_steps=WARMUP)
    summary = None
    for day in range(20, last):
        summary = _day(store, day, disruptions.get(day))
    return summary


def _shift_one(store) -> None:
    _disrupt(store, "sine.0", 34, range(10, 16), 30.0)


def _shift_all(store) -> None:
    _disrupt(store, None, 36, range(5, 13), -40.0)


def test_a_shift_is_one_incident_scored_above_one_and_a_fleet_shift_one_event(db_url, trained):  # noqa: F811
    store = _setup(db_url, trained)
    summary = _replay(store, 38, {34: _shift_one, 36: _shift_all})
    threshold = store.anomaly_threshold("v1")
    assert threshold["measured"] and threshold["threshold"] >= 0.25
    assert threshold["rate_target"] == CFG.incidents_per_week
    # Normal days brought fewer incidents than the two disruptions did.
    incidents = store.list_incidents(limit=100)
    shift = [i for i in incidents if i["series"] == "sine.0" and i["start_ts"].day == 4]
    assert len(shift) == 1, incidents
    (one,) = shift
    assert one["start_ts"] == START + timedelta(days=34, hours=10)
    assert one["end_ts"] >= START + timedelta(days=34, hours=14) and one["n_points"] >= 5
    assert one["peak_score"] > 3 and one["event_start"] is None
    scores = [a["score"] for a in store.list_anomalies("sine.0", limit=100)]
    assert scores and all(s > 1 for s in scores)
    # Both series down together for 8 hours: one fleet event, both incidents linked to it.
    events = {e["start_ts"]: e for e in store.list_fleet_events()}
    event = events[START + timedelta(days=36, hours=5)]
    assert event["end_ts"] == START + timedelta(days=36, hours=12)
    assert event["n_series"] == 2 and event["peak_share"] == 1.0
    linked = [i for i in incidents if i["event_start"] == event["start_ts"]]
    assert sorted(i["series"] for i in linked) == ["sine.0", "sine.1"]
    assert all(i["event_series"] == 2 for i in linked)
    with store.engine.connect() as conn:
        view = conn.execute(
            sa.text("SELECT series, n_points, event_series FROM anomaly_incidents")
        ).all()
    assert len(view) == len(incidents)
    # The model reads yesterday's values, so the forecasts a day after each disruption copy
    # it: those actuals are echoes, scored 0, and no incident starts there.
    echoes = {(35, "sine.0"), (37, "sine.0"), (37, "sine.1")}
    assert not [i for i in incidents if ((i["start_ts"] - START).days, i["series"]) in echoes]
    # Besides the disruptions, once the window's threshold is measured (two series-weeks
    # scored: from day 27), the normal days brought at most twice the 0.5 incidents per
    # series-week chosen. (Before, this toy model's holdout thresholds, measured on bands
    # tighter than those served, let through about twice as many.)
    disrupted = {(34, "sine.0"), (36, "sine.0"), (36, "sine.1")}
    normal = [
        i
        for i in incidents
        if ((i["start_ts"] - START).days, i["series"]) not in disrupted
        and i["start_ts"] >= START + timedelta(days=27)
    ]
    assert len(normal) <= 2 * 0.5 * (2 * 11 / 7), normal
    assert threshold["rate_seen"] is not None
    assert summary.fleet_events == len(events) >= 1
    # Running again stores the same rows.
    before = {t: _rows(store, t) for t in TABLES}
    again = run_evaluate(store, prior_weight=10, anomalies=CFG)
    assert again.new_anomalies == 0 and again.new_incidents == 0
    after = {t: _rows(store, t) for t in TABLES}
    assert after == before
    store.close()


def test_an_open_incident_is_in_the_state_and_closes(sqlite_url, trained):  # noqa: F811
    store = _setup(sqlite_url, trained)

    def tail(store) -> None:  # the last hours of the day: still going at its end
        _disrupt(store, "sine.1", 30, range(20, 24), 50.0)

    _replay(store, 31, {30: tail})
    state = store.anomaly_state("v1")
    assert sum(r["incident_open"] for r in state) == 1
    (open_,) = [r for r in state if r["incident_open"]]
    assert open_["score"] > 1 and open_["ts"] == START + timedelta(days=30, hours=23)
    _day(store, 31)
    # That incident ended with the disruption; the series' state is open again only if a
    # later incident (the echo a day later, where the forecast copies the disruption)
    # reaches the newest hour.
    (ended,) = [
        i
        for i in store.list_incidents("sine.1")
        if i["start_ts"] == START + timedelta(days=30, hours=20)
    ]
    assert ended["end_ts"] == START + timedelta(days=30, hours=23) and ended["n_points"] == 4
    newest = max(i["end_ts"] for i in store.list_incidents("sine.1"))
    (now,) = [r for r in store.anomaly_state("v1") if r["series_id"] == open_["series_id"]]
    assert now["ts"] == START + timedelta(days=31, hours=23)
    assert now["incident_open"] == (now["ts"] - newest <= timedelta(hours=2))
    store.close()


@pytest.mark.parametrize("fail_at", ["replace_incidents", "replace_fleet_events"])
def test_a_crash_inside_evaluate_then_a_rerun_equals_an_uninterrupted_run(
    sqlite_url,
    trained,  # noqa: F811
    tmp_path,
    monkeypatch,
    fail_at,  # noqa: F811
):
    reference = _setup(f"sqlite:///{tmp_path / 'ref.db'}", trained)
    _replay(reference, 37, {34: _shift_one, 36: _shift_all})
    store = _setup(sqlite_url, trained)
    _replay(store, 36, {34: _shift_one})
    _ingest_days(store, 36, 37)
    _shift_all(store)
    run_predict(store, warmup_steps=WARMUP)

    def boom(*args, **kwargs):
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(type(store), fail_at, boom)
        with pytest.raises(RuntimeError):
            run_evaluate(store, prior_weight=10, anomalies=CFG)
    run_evaluate(store, prior_weight=10, anomalies=CFG)
    for table in TABLES:
        assert _rows(store, table) == _rows(reference, table), table
    store.close()
    reference.close()


def _move_forecasts(store, series: str, day: int, hours: range, half_widths: float) -> None:
    """Move the champion's stored forecasts (median and band) of `series` for those hours
    of `day` down by `half_widths` of each one's band: the actual then lies that far above.
    The ledger holds an origin's horizon in one row (schema.forecast_origins): each row
    with such a target is read, moved at those steps and written back."""
    import json

    fo, se = schema.forecast_origins, schema.series
    times = {START + timedelta(days=day, hours=h) for h in hours}
    with store.begin() as conn:
        sid = conn.execute(sa.select(se.c.id).where(se.c.name == series)).scalar_one()
        rows = conn.execute(
            sa.select(fo.c.origin_ts, fo.c.revision, fo.c.step_seconds, fo.c.points).where(
                fo.c.series_id == sid, fo.c.model == "v1"
            )
        ).all()
        for origin, revision, step_s, text in rows:
            points = json.loads(text)
            moved = False
            for k, p in enumerate(points, start=1):
                if p is not None and origin + timedelta(seconds=k * step_s) in times:
                    shift = (p[2] - p[1]) / 2 * half_widths
                    p[0], p[1], p[2] = p[0] - shift, p[1] - shift, p[2] - shift
                    moved = True
            if moved:
                conn.execute(
                    sa.update(fo)
                    .where(
                        fo.c.series_id == sid,
                        fo.c.model == "v1",
                        fo.c.origin_ts == origin,
                        fo.c.revision == revision,
                    )
                    .values(points=json.dumps(points))
                )


def test_the_aftermath_of_a_closed_incident_opens_no_new_one_unless_it_is_larger(
    sqlite_url,
    trained,  # noqa: F811
):
    store = _setup(sqlite_url, trained)
    _replay(store, 31, {})
    # Day 31, hours 2-4: the forecasts (made the day before) miss by 60 half-widths: an
    # incident, closed by the day's end. The forecasts for day 32 come from the state at
    # day 31's end, which absorbed it (origin within a horizon after its end).
    _ingest_days(store, 31, 32)
    _move_forecasts(store, "sine.0", 31, range(2, 5), 60.0)
    run_predict(store, warmup_steps=WARMUP)
    run_evaluate(store, prior_weight=10, anomalies=CFG)
    # Day 32: those forecasts miss by 20 half-widths at hours 8-10 (anomalous, but less
    # than the incident that made them) and by 120 at hours 16-18 (more than it).
    _ingest_days(store, 32, 33)
    _move_forecasts(store, "sine.0", 32, range(8, 11), 20.0)
    _move_forecasts(store, "sine.0", 32, range(16, 19), 120.0)
    run_predict(store, warmup_steps=WARMUP)
    run_evaluate(store, prior_weight=10, anomalies=CFG)
    starts = sorted(
        (i["start_ts"] - START) // timedelta(hours=1)
        for i in store.list_incidents(limit=100)
        if i["series"] == "sine.0" and i["start_ts"] >= START + timedelta(days=31)
    )
    assert starts == [31 * 24 + 2, 32 * 24 + 16], starts
    # The moderate misses were scored (they are stored for what they are) as 0.
    hours = {
        (a["ts"] - START) // timedelta(hours=1): a["score"]
        for a in store.list_anomalies("sine.0", limit=200)
    }
    assert not any(32 * 24 + 8 <= h <= 32 * 24 + 10 for h in hours)
    assert all(hours.get(32 * 24 + h, 0) > 1 for h in (16, 17, 18))
    store.close()


def test_thresholds_read_from_the_carried_tails_equal_those_read_from_the_window(
    sqlite_url,
    trained,  # noqa: F811
    tmp_path,
):
    """anomaly_state carries each series' tail (its window's points above the lowest
    threshold allowed) and its judged points by day, so a run does not read the window's
    points again. A store whose carried columns are wiped before every run reads them from
    anomaly_points and accuracy_days (as rows written before migration 0015 are): over an
    8-day window that fills and then slides for 12 days (each series' own threshold from
    half a week of its points), with a shift of one series and of the fleet in it, both
    store the same thresholds, scores, incidents, events and state, to the bit."""
    window = timedelta(days=8)
    carried = _setup(sqlite_url, trained)
    recounted = _setup(f"sqlite:///{tmp_path / 'recounted.db'}", trained)
    reads = []
    real = type(carried).anomaly_points

    def counting(self, model, since, *, min_evidence=None, beyond=None):
        if self is carried and min_evidence is not None:
            reads.append(since)
        return real(self, model, since, min_evidence=min_evidence, beyond=beyond)

    wipe = sa.update(schema.anomaly_state).values(tail=None, day_counts=None, window_day=None)
    for store in (carried, recounted):
        _ingest_days(store, 0, 20)
        run_predict(store, warmup_steps=WARMUP)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(type(carried), "anomaly_points", counting)
        m.setattr(anomaly, "MIN_SERIES_WEEKS", 0.5)
        for day in range(20, 40):
            for store in (carried, recounted):
                _ingest_days(store, day, day + 1)
                {34: _shift_one, 36: _shift_all}.get(day, lambda s: None)(store)
                run_predict(store, warmup_steps=WARMUP)
                if store is recounted:
                    with store.begin() as conn:
                        conn.execute(wipe)
                run_evaluate(store, window=window, prior_weight=10, anomalies=CFG)
    for table in (*TABLES, "anomalies"):
        assert _rows(carried, table) == _rows(recounted, table), table
    state = carried.carried_state("v1").to_dicts()
    assert all(r["tail"] is not None and r["day_counts"] for r in state), state
    # And the sums of its deviations' correlation (migration 0018).
    assert all(r["square_sum"] > 0 and r["lag_sum"] is not None for r in state), state
    # The tails held points, the series their own measured thresholds, and the window slid.
    assert any(len(r["tail"]) for r in state)
    assert min(r["window_day"] for r in state) > START + timedelta(days=30)
    (threshold,) = _rows(carried, "anomaly_thresholds")
    assert threshold[2] is True, threshold  # measured
    assert reads == [], "the carried store read the window's points again"
    carried.close()
    recounted.close()


def test_accuracy_days_keep_the_anomaly_window_while_a_series_still_reads_its_counts_there(
    sqlite_url,
    trained,  # noqa: F811
):
    """The day counts a threshold's budget needs are carried in anomaly_state, so
    accuracy_days is kept over the 7-day accuracy window only; but a series whose row was
    written before migration 0015 (no day counts) and that is not judged in a run reads its
    counts from accuracy_days when it is: until then its anomaly window's days stay."""
    store = _setup(sqlite_url, trained)
    _ingest_days(store, 0, 20)
    run_predict(store, warmup_steps=WARMUP)
    window = timedelta(days=10)

    def day(accuracy_window: timedelta = timedelta(days=7), skip=frozenset()) -> None:
        d = next(days)
        _ingest_days(
            store, d, d + 1, skip={(s, h) for s in skip for h in range(d * 24, d * 24 + 24)}
        )
        run_predict(store, warmup_steps=WARMUP)
        run_evaluate(
            store, window=window, accuracy_window=accuracy_window, prior_weight=10, anomalies=CFG
        )

    def first_day():
        with store.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.min(schema.accuracy_days.c.day))).scalar()

    days = iter(range(20, 40))
    for _ in range(12):  # to day 31, accuracy_days kept over the 10 days as 0014 kept them
        day(accuracy_window=window)
    assert first_day() == START + timedelta(days=31 - 9)
    a = schema.anomaly_state
    with store.begin() as conn:  # sine.1's row as 0014 wrote it
        conn.execute(sa.update(a).where(a.c.series_id == 2).values(tail=None, day_counts=None))
    day(skip={"sine.1"})  # day 32: sine.1 is not judged
    assert first_day() == START + timedelta(days=31 - 9)  # its 10 days stay
    day()  # day 33: sine.1's forecasts for it were never made (it had no day 32)
    day()  # day 34: sine.1 judged, its counts carried from then on
    assert all(r["day_counts"] is not None for r in store.carried_state("v1").to_dicts())
    assert first_day() == START + timedelta(days=34 - 6)  # the accuracy window's alone
    store.close()


def _runs(ids: list[int], deviations: list[list[float]], carried: int = 0) -> pl.DataFrame:
    """The evaluate job's runs frame: per series its deviations, the first `carried` of
    them carried from the run before."""
    frame = pl.DataFrame(
        {
            "series_id": [i for i, d in zip(ids, deviations, strict=True) for _ in d],
            "deviation": [x for d in deviations for x in d],
            "_carried": [k < carried for d in deviations for k in range(len(d))],
        }
    )
    return frame.hstack(anomaly.lag_terms(frame))


def _no_sums(ids: list[int]) -> pl.DataFrame:
    return pl.DataFrame(
        {"series_id": ids, "lag_sum": [None] * len(ids), "square_sum": [None] * len(ids)},
        schema={"series_id": pl.Int64, "lag_sum": pl.Float64, "square_sum": pl.Float64},
    )


def test_the_carried_correlation_sums_do_not_depend_on_how_the_points_were_split_into_runs():
    """anomaly_state's lag_sum and square_sum after judging a series' points in one run
    equal those after judging them over several runs (each carrying its last deviations
    and sums to the next), older points weighing half every RHO_HALF_LIFE points."""
    rng = np.random.default_rng(1)
    d = {1: rng.standard_normal(900).tolist(), 2: (3 * rng.standard_normal(900)).tolist()}
    ids = [1, 2]
    _, whole = _correlations(_no_sums(ids), _runs(ids, [d[1], d[2]]))
    state = _no_sums(ids)
    for lo, hi in ((0, 24), (24, 25), (25, 500), (500, 900)):
        back = max(lo - 5, 0)  # the carried deviations (RECENT)
        runs = _runs(ids, [d[1][back:hi], d[2][back:hi]], carried=lo - back)
        _, state = _correlations(state, runs)
    assert state.sort("series_id").to_dicts() == [
        pytest.approx(r) for r in whole.sort("series_id").to_dicts()
    ]
    # The sums decayed: a point 900 back weighs about 0.5 ** (900 / RHO_HALF_LIFE).
    c = np.clip(np.array(d[2]), -anomaly.RHO_CLIP, anomaly.RHO_CLIP)
    w = 0.5 ** (np.arange(898, -1, -1) / anomaly.RHO_HALF_LIFE)
    assert whole.sort("series_id")["square_sum"][1] == pytest.approx(float((w * c[:-1] ** 2).sum()))


def test_a_series_without_sums_of_its_own_leans_on_the_fleet_s_correlation():
    rng = np.random.default_rng(2)
    x = np.cumsum(rng.standard_normal(400)) * 0.05  # a slow wander: close to 1
    # A model's first run: the fleet's correlation from the new points themselves.
    rho, _ = _correlations(_no_sums([1]), _runs([1], [x.tolist()]))
    assert 0.8 < rho["_rho"][0] <= anomaly.RHO_MAX
    # Later: series 2, new, leans on the correlation the others carry (here 0.5).
    state = pl.DataFrame(
        {"series_id": [1, 2], "lag_sum": [500.0, None], "square_sum": [1000.0, None]},
        schema={"series_id": pl.Int64, "lag_sum": pl.Float64, "square_sum": pl.Float64},
    )
    rho, _ = _correlations(state, _runs([1, 2], [[0.1, 0.2], [0.5, -0.5]]))
    assert dict(rho.iter_rows()) == pytest.approx({1: 0.5, 2: 0.5})
