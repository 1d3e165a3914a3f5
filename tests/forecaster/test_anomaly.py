"""forecaster.anomaly: deviation, evidence, the threshold from a false-alarm rate, incidents, fleet events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from forecaster import anomaly

T0 = datetime(2024, 1, 1, tzinfo=UTC)
HOUR = 3600


def _ts(hours) -> list[datetime]:
    return [T0 + timedelta(hours=int(h)) for h in hours]


def test_deviation_is_half_widths_from_the_median_and_floors_a_zero_width():
    frame = pl.DataFrame(
        {
            "series_id": [1, 1, 1, 1, 1],
            "actual": [5.0, 12.0, 0.0, 3.0, 1.0],
            "yhat": [5.0, 6.0, 6.0, 0.0, 6.0],
            "yhat_lower": [0.0, 2.0, 2.0, 0.0, 2.0],
            "yhat_upper": [10.0, 10.0, 10.0, 0.0, 10.0],
        }
    )
    d = anomaly.deviation(frame).to_list()
    assert d[0] == 0.0  # at the median
    assert d[1] == pytest.approx(6 / 4) and d[2] == pytest.approx(-6 / 4)  # each side's half
    assert d[4] == pytest.approx(-5 / 4)
    # A band of zero width counts as a quarter of the series' median half-width (4): 3 / 1.
    assert d[3] == pytest.approx(3 / (anomaly.WIDTH_FLOOR * 4))


def test_a_band_wider_than_usual_does_not_hide_a_jump():
    """A busy hour the model is unsure of has a wide band; a jump of 4 half-widths of the
    series' usual band is as plain there as at any other hour (WIDTH_CAP), while a band
    narrower than usual still makes a miss more surprising."""
    frame = pl.DataFrame(
        {
            "series_id": [1] * 5,
            "actual": [10.0, 14.0, 10.5, 14.0, 10.0],
            "yhat": [10.0] * 5,
            "yhat_lower": [9.0, 0.0, 9.0, 9.75, 9.0],
            "yhat_upper": [11.0, 20.0, 11.0, 10.25, 11.0],
        }
    )
    d = anomaly.deviation(frame).to_list()
    assert anomaly.WIDTH_CAP == 1.0
    assert d[1] == pytest.approx(4.0)  # not 4 / 10: the usual half-width is 1
    assert d[2] == pytest.approx(0.5)
    # A band a quarter of the usual counts as WIDTH_FLOOR of it: twice as far (at a floor of
    # a half).
    assert anomaly.WIDTH_FLOOR == 0.5
    assert d[3] == pytest.approx(4 / 0.5)


def test_evidence_adds_up_a_run_of_moderate_deviations_while_it_goes_on():
    d = [0.5, -0.3, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 6.0, 0.2, -1.2]
    frame = pl.DataFrame({"series_id": [1] * len(d), "deviation": d})
    x = anomaly.evidence(frame).to_list()
    assert x[0] == pytest.approx(0.5)  # one point: |d|
    # Six points at 1.5, each just outside the band's edge: 1.5 * sqrt(6) over six.
    assert x[7] == pytest.approx(1.5 * 6**0.5)
    assert x[8] == pytest.approx(max(6.0, (1.5 * 2 + 6) / 3 * 3**0.5, (1.5 * 5 + 6) / 6 * 6**0.5))
    # Back inside the band: the spike does not linger in the runs; on the other side, the
    # runs' sums point the other way and do not count either.
    assert x[9] == pytest.approx(0.2) and x[10] == pytest.approx(1.2)
    # Runs never mix series.
    two = pl.DataFrame({"series_id": [1, 1, 2], "deviation": [3.0, 3.0, 0.1]})
    assert anomaly.evidence(two).to_list()[2] == pytest.approx(0.1)


def _ar(rng: np.random.Generator, rho: float, n: int) -> np.ndarray:
    """n steps of a stationary AR(1) of unit variance and lag-one correlation rho."""
    x = np.empty(n)
    x[0] = rng.standard_normal()
    e = rng.standard_normal(n) * np.sqrt(1 - rho**2)
    for i in range(1, n):
        x[i] = rho * x[i - 1] + e[i]
    return x


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_a_run_is_scaled_by_the_spread_of_its_sum_under_the_series_correlation(rho):
    rng = np.random.default_rng(3)
    x = _ar(rng, rho, 50_000)
    frame = anomaly.with_correlation(
        pl.DataFrame({"series_id": np.zeros(x.size, dtype=np.int64), "deviation": x / 1.2816})
    )
    # Measured on deviations clipped at RHO_CLIP half-widths, as they come.
    assert frame["rho"][0] == pytest.approx(rho, abs=0.02)
    for k in anomaly.RUNS:
        sums = pl.Series(x).rolling_sum(k).drop_nulls().to_numpy()
        powers = [pl.lit(rho**j) for j in range(1, k)]
        scale = pl.select(anomaly.run_scale(pl.lit(k), powers)).item()
        assert np.std(sums) / scale == pytest.approx(1.0, abs=0.03), k
    # At a correlation of 0 the runs are scaled by sqrt(k), as without one.
    flat = frame.with_columns(pl.lit(0.0).alias("rho"))
    assert anomaly.evidence(flat, rho="rho").to_list() == pytest.approx(
        anomaly.evidence(flat).to_list(), rel=1e-12
    )


def test_lasting_misses_do_not_lift_the_threshold_over_a_single_far_out_point():
    """A model whose misses last (deviations correlated 0.9 from one step to the next, a
    calibrated 80% band): summed as if independent, its ordinary runs set the threshold
    above 5 half-widths, where a spike of 3 band widths (6) barely scores; scaled by their
    correlation, the runs set it where the single points do."""
    rng = np.random.default_rng(0)
    n_series, hours = 6, 4 * 168
    x = np.concatenate([_ar(rng, 0.9, hours) for _ in range(n_series)])
    frame = pl.DataFrame(
        {
            "series_id": np.repeat(np.arange(n_series), hours),
            "ts": _ts(np.tile(np.arange(hours), n_series)),
            "deviation": x / np.quantile(np.abs(x), 0.8),
            "freq_s": np.full(x.size, HOUR),
        }
    )
    plain = anomaly.choose_threshold(frame.with_columns(anomaly.evidence(frame)), 0.5, 2)
    scaled = anomaly.with_correlation(frame)
    assert scaled["rho"].min() > 0.85
    scaled = scaled.with_columns(anomaly.evidence(scaled, rho="rho"))
    by_rho = anomaly.choose_threshold(scaled, 0.5, 2)
    single = frame.with_columns(pl.col("deviation").abs().alias("evidence"))
    alone = anomaly.choose_threshold(single, 0.5, 2)
    assert plain.value > 5.0
    assert by_rho.value < 3.0
    assert by_rho.value == pytest.approx(alone.value, rel=0.05)


def test_the_correlation_leans_on_the_fleet_s_and_stays_within_its_bounds():
    pooled = 0.6
    # No points of its own: the fleet's; many: its own.
    assert anomaly.correlation(0.0, 0.0, pooled) == pytest.approx(pooled)
    assert anomaly.correlation(-900.0, 1000.0, pooled) == 0.0  # alternating: as independent
    assert anomaly.correlation(990.0, 1000.0, pooled) == anomaly.RHO_MAX
    half = anomaly.correlation(0.2 * anomaly.RHO_PRIOR, anomaly.RHO_PRIOR, pooled)
    assert half == pytest.approx((0.2 + pooled) / 2)
    assert anomaly.pooled_correlation(5.0, 0.0) == 0.0


def _points(excess: np.ndarray, n_series: int) -> pl.DataFrame:
    per = excess.size // n_series
    return pl.DataFrame(
        {
            "series_id": np.repeat(np.arange(n_series), per),
            "ts": _ts(np.tile(np.arange(per), n_series)),
            "evidence": excess,
            "freq_s": np.full(excess.size, HOUR),
        }
    )


def _incidents_at(points: pl.DataFrame, threshold: float, gap: int) -> int:
    """Incidents counted the slow way: cluster the points above the threshold."""
    hits = points.filter(pl.col("evidence") > threshold).with_columns(
        pl.col("evidence").alias("score")
    )
    return anomaly.merge_incidents(anomaly.point_intervals(hits), gap).height


def _band_excess(x: np.ndarray) -> np.ndarray:
    """The evidence of single errors x against a calibrated central 80% band (|x| <= q0.8
    is |d| <= 1)."""
    return np.abs(x) / np.quantile(np.abs(x), 0.8)


@pytest.mark.parametrize("dist", ["normal", "laplace", "t3"])
@pytest.mark.parametrize("rate", [0.25, 1.0, 3.0])
def test_the_threshold_meets_the_rate_on_clean_data_within_a_factor_two(dist, rate):
    rng = np.random.default_rng(5)
    n_series, hours = 6, 4 * 168
    draw = {
        "normal": rng.standard_normal,
        "laplace": lambda n: rng.laplace(size=n),
        "t3": lambda n: rng.standard_t(3, n),
    }
    points = _points(_band_excess(draw[dist](n_series * hours)), n_series)
    gap = 2
    th = anomaly.choose_threshold(points, rate, gap)
    weeks = n_series * 4
    assert th.measured and th.series_weeks == pytest.approx(weeks)
    seen = _incidents_at(points, th.value, gap) / weeks
    # Extrapolating the tail as exponential errs by less than a factor two, the heavy
    # tails of t(3) towards more alarms.
    assert rate / 2 <= seen <= 2 * rate, (th, seen)
    assert th.incidents == _incidents_at(points, th.value, gap)


def test_thresholds_of_many_series_at_once_equal_one_by_one():
    rng = np.random.default_rng(3)
    n_series, hours = 40, 3 * 168
    scale = rng.uniform(0.5, 2, n_series).repeat(hours)  # series with tails of their own
    points = _points(np.abs(rng.standard_t(3, n_series * hours)) * scale, n_series)
    points = points.filter(~((pl.col("series_id") == 7) & (pl.col("ts") > _ts([200])[0])))
    one_by_one = {
        sid: th.value
        for (sid,), mine in points.partition_by("series_id", as_dict=True).items()
        if (th := anomaly.choose_threshold(mine, 0.5, 2)).measured
    }
    at_once = anomaly.choose_thresholds(points, 0.5, 2)
    assert 7 not in at_once and len(at_once) == n_series - 1  # series 7: too short
    assert at_once == pytest.approx(one_by_one)


def test_thresholds_from_the_points_above_the_floor_and_the_weeks_equal_those_from_all():
    """The evaluate job keeps only the judged points with evidence of at least
    MIN_THRESHOLD (anomaly_points) and counts each series' points by day: no lower point
    starts or continues an incident at any threshold allowed, so the thresholds are the
    same. A series with no point above the floor gets the floor (shrunk to the fleet's)."""
    rng = np.random.default_rng(11)
    n_series, hours = 12, 3 * 168
    scale = rng.uniform(0.3, 1.5, n_series).repeat(hours)
    points = _points(np.abs(rng.standard_t(3, n_series * hours)) * scale, n_series)
    quiet = points["series_id"].unique().sort()[0]  # all its evidence below the floor
    points = points.with_columns(
        pl.when(pl.col("series_id") == quiet)
        .then(pl.col("evidence").clip(upper_bound=anomaly.MIN_THRESHOLD * 0.9))
        .otherwise(pl.col("evidence"))
        .alias("evidence")
    )
    weeks = points.group_by("series_id").agg(
        (pl.col("freq_s").sum() / anomaly.WEEK_S).cast(pl.Float64).alias("_weeks")
    )
    above = points.filter(pl.col("evidence") >= anomaly.MIN_THRESHOLD)
    assert above.height < points.height / 3 and quiet not in above["series_id"].to_list()
    fleet = anomaly.choose_threshold(points, 0.5, 2)
    assert fleet == anomaly.choose_threshold(above, 0.5, 2, weeks=float(weeks["_weeks"].sum()))
    every = anomaly.choose_thresholds(points, 0.5, 2, shrink_to=fleet.value)
    kept = anomaly.choose_thresholds(above, 0.5, 2, shrink_to=fleet.value, weeks=weeks)
    assert len(every) == n_series and kept == pytest.approx(every)
    assert every[quiet] == pytest.approx(
        float(anomaly.shrunk(anomaly.MIN_THRESHOLD, 3.0, fleet.value))
    )


def test_prior_max_is_the_largest_value_of_the_series_within_gap_plus_one_steps_before():
    """Against the definition, point by point: series of hourly and two-hourly steps, with
    holes in time (a point after a hole longer than the reach has nothing before it)."""
    rng = np.random.default_rng(2)
    rows = []
    for sid, freq in ((1, HOUR), (2, 2 * HOUR), (3, HOUR)):
        hours = np.sort(rng.choice(400, 120, replace=False)) * (freq // HOUR)
        rows += [(sid, T0 + timedelta(hours=int(h)), float(rng.exponential()), freq) for h in hours]
    frame = pl.DataFrame(rows, schema=["series_id", "ts", "evidence", "freq_s"], orient="row")
    frame = frame.with_columns(pl.col("ts").dt.replace_time_zone("UTC")).sort("series_id", "ts")
    for gap in (0, 2, 5):
        got = anomaly.prior_max(frame, "evidence", gap).to_list()
        want = []
        for sid, ts, _, freq in frame.rows():
            reach = timedelta(seconds=freq * (gap + 1))
            before = [e for s, t, e, _ in frame.rows() if s == sid and ts - reach <= t < ts]
            want.append(max(before, default=0.0))
        assert got == want, gap


def test_too_little_data_serves_the_default_threshold():
    points = _points(np.linspace(0, 5, 100), 1)  # 100 hours: under two series-weeks
    th = anomaly.choose_threshold(points, 1.0, 2)
    assert not th.measured and th.value == anomaly.DEFAULT_THRESHOLD


def test_points_close_together_are_one_incident_and_an_old_one_extends():
    points = pl.DataFrame(
        {
            "series_id": [1, 1, 1, 1, 2],
            "ts": _ts([10, 11, 14, 30, 11]),  # 11 -> 14: two normal steps inside, one incident
            "score": [1.5, 3.0, 1.2, 2.0, 1.1],
            "freq_s": [HOUR] * 5,
        }
    )
    inc = anomaly.merge_incidents(anomaly.point_intervals(points), gap=2)
    assert inc.select("series_id", "start_ts", "end_ts", "n_points", "peak_score").rows() == [
        (1, *_ts([10, 14]), 3, 3.0),
        (1, *_ts([30, 30]), 1, 2.0),
        (2, *_ts([11, 11]), 1, 1.1),
    ]
    assert inc["peak_ts"][0] == _ts([11])[0]
    # A later point three steps after the first incident's end joins it; four would not.
    more = anomaly.point_intervals(
        pl.DataFrame({"series_id": [1], "ts": _ts([17]), "score": [4.0], "freq_s": [HOUR]})
    )
    old = inc.filter(pl.col("series_id") == 1).head(1).with_columns(pl.lit(HOUR).alias("freq_s"))
    merged = anomaly.merge_incidents(pl.concat([old, more], how="vertical_relaxed"), gap=2)
    assert merged.select("start_ts", "end_ts", "n_points", "peak_score").rows() == [
        (*_ts([10, 17]), 4, 4.0)
    ]
    apart = anomaly.point_intervals(
        pl.DataFrame({"series_id": [1], "ts": _ts([18]), "score": [4.0], "freq_s": [HOUR]})
    )
    assert anomaly.merge_incidents(pl.concat([old, apart], how="vertical_relaxed"), 2).height == 2


def test_config_defaults_are_the_module_defaults():
    from forecaster.config import AnomalySettings

    cfg = AnomalySettings()
    assert (cfg.incidents_per_week, cfg.gap) == (anomaly.DEFAULT_RATE, anomaly.DEFAULT_GAP)


def test_a_fleet_event_is_the_time_a_share_of_the_fleet_is_in_incidents():
    hours = np.arange(0, 48)
    scored = pl.DataFrame({"ts": _ts(hours), "n_series": [10] * hours.size})
    # Ten series; from hour 20 on, series break one after another (a storm moving on), each
    # for a few hours; two unrelated incidents elsewhere.
    starts = [20, 21, 21, 22, 23, 24]
    incidents = pl.DataFrame(
        {
            "series_id": [0, 1, 2, 3, 4, 5, 6, 7],
            "start_ts": _ts([*starts, 2, 40]),
            "end_ts": _ts([26, 25, 27, 26, 28, 27, 3, 41]),
        }
    )
    events = anomaly.fleet_events(scored, incidents, share=0.3, min_series=3)
    # From hour 21 (3 of 10 inside) to 27 (3 of 10 inside: series 2, 4 and 5).
    assert events.rows() == [(*_ts([21, 27]), 6, 0.6)]
    linked = anomaly.link_events(incidents, events)
    assert linked.filter(pl.col("event_start").is_not_null())["series_id"].to_list() == [
        0,
        1,
        2,
        3,
        4,
        5,
    ]
    # Two bursts nine hours apart (a night between): one event when merged within 12 hours.
    later = pl.concat(
        [
            incidents,
            pl.DataFrame(
                {
                    "series_id": [8, 9, 0],
                    "start_ts": _ts([36, 36, 37]),
                    "end_ts": _ts([38, 38, 38]),
                }
            ),
        ]
    )
    apart = anomaly.fleet_events(scored, later, share=0.3, min_series=3)
    assert apart["start_ts"].to_list() == _ts([21, 37])  # three series in incidents from 37
    (merged,) = anomaly.fleet_events(
        scored, later, share=0.3, min_series=3, merge=timedelta(hours=12)
    ).rows()
    assert merged[:3] == (*_ts([21, 38]), 8)  # series 0 counted once
    # A smaller share of the fleet is no event.
    assert anomaly.fleet_events(scored, incidents, share=0.7, min_series=3).is_empty()


def _fleet_points(n_series: int, hours: int, storm: range, rng) -> pl.DataFrame:
    """Deviations of a fleet whose series err together (a shared term) and, in `storm`,
    fall below their bands together, each alone not far: -1.5 half-widths."""
    shared = np.repeat(rng.normal(0, 0.25, hours), n_series).reshape(hours, n_series)
    d = rng.normal(0, 0.7, (hours, n_series)) + shared
    d[list(storm)] = -1.5 + rng.normal(0, 0.2, (len(storm), n_series))
    return pl.DataFrame(
        {
            "series_id": np.tile(np.arange(n_series), hours),
            "ts": pl.Series([t for t in _ts(np.arange(hours)) for _ in range(n_series)]),
            "deviation": d.ravel(),
        }
    )


def test_a_fleet_beyond_the_same_edge_together_is_an_event_though_no_series_is_alone():
    rng = np.random.default_rng(11)
    points = _fleet_points(23, 10 * 24, range(200, 206), rng)
    past = anomaly.edge_counts(points.filter(pl.col("ts") < _ts([190])[0]))
    usual = anomaly.edge_shares(past)
    assert usual is not None
    (low_mean, low_sd), _ = usual
    # The shared term makes the share beyond an edge vary more than a binomial would.
    assert low_sd > np.sqrt(low_mean * (1 - low_mean) / 23)
    counts = anomaly.edge_counts(points)
    no_incidents = pl.DataFrame(
        schema={
            "series_id": pl.Int64,
            "start_ts": counts.schema["ts"],
            "end_ts": counts.schema["ts"],
        }
    )
    edge = points.filter(pl.col("deviation").abs() > 1)
    events = anomaly.fleet_events(
        counts, no_incidents, 0.4, 3, edges=usual, edge_points=edge, judge_from=_ts([190])[0]
    )
    assert events.height == 1
    start, end, n_series, peak = events.row(0)
    assert _ts([200])[0] <= start <= _ts([202])[0] and _ts([205])[0] <= end <= _ts([207])[0]
    assert n_series == 23 and peak > 0.8
    # Times before judge_from are not judged again by their evidence: a storm there is no
    # event unless it was recorded (known) when it was new.
    early = _fleet_points(23, 10 * 24, range(100, 106), np.random.default_rng(11))
    counts = anomaly.edge_counts(early)
    late = anomaly.fleet_events(counts, no_incidents, 0.4, 3, edges=usual, judge_from=_ts([190])[0])
    assert late.is_empty()
    kept = anomaly.fleet_events(
        counts,
        no_incidents,
        0.4,
        3,
        edges=usual,
        judge_from=_ts([190])[0],
        known=[(_ts([100])[0], _ts([105])[0])],
    )
    assert kept.select("start_ts", "end_ts").rows() == [tuple(_ts([100, 105]))]
    # Too little history: no usual share yet.
    assert anomaly.edge_shares(past.head(anomaly.MIN_EDGE_TIMES - 1)) is None


def test_which_times_are_fleet_events_does_not_depend_on_the_points_beyond_an_edge():
    """The evaluate job reads the stored points beyond an edge only where fleet_events found
    an event without them: they count an event's series, and never make or move one."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        storms = [range(a, a + int(rng.integers(2, 8))) for a in rng.integers(60, 230, 2)]
        points = _fleet_points(23, 10 * 24, [h for r in storms for h in r], rng)
        usual = anomaly.edge_shares(anomaly.edge_counts(points.filter(pl.col("ts") < _ts([50])[0])))
        counts = anomaly.edge_counts(points)
        hit = points.filter(pl.col("deviation") < -1.8).sort("series_id", "ts")
        incidents = hit.select(
            "series_id", pl.col("ts").alias("start_ts"), pl.col("ts").alias("end_ts")
        ).unique("series_id", keep="first")
        args = (counts, incidents, 0.4, 3, timedelta(hours=int(rng.integers(0, 6))))
        kw = {"edges": usual, "judge_from": _ts([50])[0]}
        without = anomaly.fleet_events(*args, **kw)
        edge = points.filter(pl.col("deviation").abs() > 1)
        found = anomaly.fleet_events(*args, **kw, edge_points=edge)
        assert not found.is_empty()
        keep = ["start_ts", "end_ts", "peak_share"]
        assert found.select(keep).equals(without.select(keep))
        assert (found["n_series"] >= without["n_series"]).all()
        assert (found["n_series"] > without["n_series"]).any()  # the points did count


def test_a_run_rewrites_only_events_that_start_in_its_window_and_overlap_none_before():
    events = pl.DataFrame(
        {
            "start_ts": _ts([1, 4, 20, 30]),
            "end_ts": _ts([2, 6, 22, 31]),
            "n_series": [3, 3, 3, 3],
            "peak_share": [0.5, 0.5, 0.5, 0.5],
        }
    )
    # Window from hour 3; an event recorded from hour 0 to 5 runs into it.
    kept = anomaly.new_events(events, _ts([3])[0], [tuple(_ts([0, 5])), tuple(_ts([20, 22]))])
    assert kept["start_ts"].to_list() == _ts([20, 30])  # 1: before; 4: a clipped copy


def test_the_aftermath_of_a_closed_incident_is_its_own_series_forecasts_from_a_state_that_saw_it():
    # Series 1 had incidents from hour 10 to 12 (peak 3) and at hour 30 (peak 1.5). Hourly
    # data, gap 2, a 24-step horizon.
    incidents = pl.DataFrame(
        {
            "series_id": [1, 1],
            "start_ts": _ts([10, 30]),
            "end_ts": _ts([12, 30]),
            "peak_score": [3.0, 1.5],
        },
    )
    cases = [  # (series, ts, origin) -> the peak of the incident in its state's past
        (1, 20, 12, 3.0),  # origin inside the incident, the point after it closed
        (1, 40, 36, 3.0),  # origin a horizon after the end (and after the second one's)
        (1, 40, 37, 1.5),  # past a horizon after the first's end: only the second's
        (1, 28, 9, 0.0),  # origin before the incident: the state never saw it
        (1, 14, 12, 0.0),  # within gap steps of the end: it continues the incident
        (1, 15, 12, 3.0),  # past gap steps of the end
        (2, 20, 12, 0.0),  # another series
    ]
    points = pl.DataFrame(
        {
            "series_id": [c[0] for c in cases],
            "ts": _ts([c[1] for c in cases]),
            "origin_ts": _ts([c[2] for c in cases]),
            "freq_s": [HOUR] * len(cases),
        }
    )
    got = anomaly.aftermath(points, incidents, gap=2, horizon=24).to_list()
    assert got == [c[3] for c in cases]
    assert anomaly.aftermath(points, incidents.clear(), gap=2, horizon=24).to_list() == [0.0] * 7


def test_a_series_own_threshold_leans_on_the_fleet_s_while_its_history_is_short():
    own = np.array([16.0, 16.0, 2.0])
    weeks = np.array([anomaly.SHRINK_WEEKS, 1000 * anomaly.SHRINK_WEEKS, anomaly.SHRINK_WEEKS])
    got = anomaly.shrunk(own, weeks, pooled=4.0)
    assert got[0] == pytest.approx(8.0)  # as many weeks as the prior's: the geometric mean
    assert got[1] == pytest.approx(16.0, rel=0.01)  # a long history: its own
    assert got[2] == pytest.approx(max((2.0 * 4.0) ** 0.5, anomaly.MIN_THRESHOLD))
    assert anomaly.shrunk(np.array([]), np.array([]), pooled=4.0).size == 0
    # choose_thresholds(shrink_to=) moves each series' own by the weeks it was read from.
    rng = np.random.default_rng(3)
    frame = _points(np.abs(rng.standard_t(3, 5 * 3 * 168)), 5)  # 5 series, 3 weeks each
    plain = anomaly.choose_thresholds(frame, 0.5, 2)
    leaning = anomaly.choose_thresholds(frame, 0.5, 2, shrink_to=4.0)
    weeks_of = frame.group_by("series_id").agg(pl.col("freq_s").sum() / anomaly.WEEK_S)
    for sid, w in weeks_of.iter_rows():
        assert leaning[sid] == pytest.approx(anomaly.shrunk(plain[sid], w, 4.0))
