"""Evaluation: conformal calibration of the bands, anomalies, idempotence."""

from __future__ import annotations

import random
from datetime import timedelta

import polars as pl
import pytest
import sqlalchemy as sa

from forecaster import schema
from forecaster.calibration import conformal_quantile
from pipelines.evaluate import run_evaluate
from pipelines.predict import run_predict
from tests.pipelines.test_predict import (  # noqa: F401
    START,
    WARMUP,
    _ingest_days,
    _promote_with_states,
    _setup,
    trained,
)


@pytest.mark.parametrize("level", [0.5, 0.8, 0.9])
def test_conformal_correction_is_the_finite_sample_quantile(level):
    rng = random.Random(1)
    scores = [rng.gauss(0, 1) for _ in range(199)]
    q = conformal_quantile(scores, level)
    # Definition: the smallest score with at least ceil((n+1) level) scores <= it.
    need = -(-(len(scores) + 1) * level // 1)
    assert sum(s <= q for s in scores) >= need
    assert sum(s < q for s in scores) < need


def _coverage(store, model, since):
    f, o = schema.forecasts, schema.observations
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(o.c.value, f.c.yhat_lower, f.c.yhat_upper)
            .join(o, sa.and_(o.c.series_id == f.c.series_id, o.c.ts == f.c.target_ts))
            .where(f.c.model == model, f.c.origin_ts >= since)
        ).all()
    return sum(lo <= v <= hi for v, lo, hi in rows) / len(rows), len(rows)


def test_calibrated_band_covers_about_its_level_and_flags_a_spike(sqlite_url, trained):  # noqa: F811
    store = _setup(sqlite_url, trained)
    _ingest_days(store, 0, 20)
    run_predict(store, warmup_steps=WARMUP)
    for day in range(20, 38):
        _ingest_days(store, day, day + 1)
        run_predict(store, warmup_steps=WARMUP)
        summary = run_evaluate(store, prior_weight=10)
        assert summary.scored > 0
    assert summary.steps_calibrated == 24
    # Bands served after a week of calibration: close to the nominal 80%.
    coverage, n = _coverage(store, "v1", START + timedelta(days=27))
    assert n >= 2 * 24 * 9
    assert 0.7 <= coverage <= 0.92, (coverage, summary)
    assert summary.new_anomalies >= 0

    # A spike far outside any band is flagged once, however often evaluate runs.
    _ingest_days(store, 38, 39)
    with store.begin() as conn:
        conn.execute(
            sa.update(schema.observations)
            .where(schema.observations.c.ts == START + timedelta(days=38, hours=12))
            .values(value=schema.observations.c.value + 100)
        )
    first = run_evaluate(store, prior_weight=10)
    again = run_evaluate(store, prior_weight=10)
    assert first.new_anomalies >= 2 and again.new_anomalies == 0
    with store.engine.connect() as conn:
        flagged = conn.execute(
            sa.select(schema.anomalies.c.series_id).where(
                schema.anomalies.c.ts == START + timedelta(days=38, hours=12)
            )
        ).all()
    assert len(flagged) == 2
    store.close()


def test_evaluate_without_a_champion_or_actuals_does_nothing(sqlite_url, trained):  # noqa: F811
    store = _setup(sqlite_url, trained)
    assert run_evaluate(store).scored == 0
    _ingest_days(store, 0, 20)
    run_predict(store, warmup_steps=WARMUP)
    assert run_evaluate(store).scored == 0  # no actuals for the forecasts yet
    store.close()


def test_accuracy_by_model_and_the_cli_on_both_dialects(db_url, trained, tmp_path, monkeypatch):  # noqa: F811
    from typer.testing import CliRunner

    from pipelines.cli import app

    store = _setup(db_url, trained)
    _ingest_days(store, 0, 20)
    run_predict(store, warmup_steps=WARMUP)
    for day in range(20, 24):
        _ingest_days(store, day, day + 1)
        run_predict(store, warmup_steps=WARMUP)
    rows = {r["model"]: r for r in store.accuracy_by_model(timedelta(days=28))}
    assert set(rows) == {"v1", "mstl", "seasonal_naive_daily", "seasonal_naive_weekly"}
    assert rows["v1"]["n"] == rows["mstl"]["n"] == 2 * 24 * 4
    assert 0 <= rows["v1"]["coverage"] <= 1 and 0 <= rows["mstl"]["coverage"] <= 1
    assert (
        rows["seasonal_naive_daily"]["coverage"] is None and rows["seasonal_naive_daily"]["mae"] > 0
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FORECASTER_DATABASE_URL", db_url)
    runner = CliRunner()
    for args, expect in (
        (["evaluate"], "forecasts scored"),
        (["accuracy"], "seasonal_naive_weekly"),
        (["anomalies"], "series"),
        (["accuracy"], "mstl"),
        (["forecasts", "show", "sine.0"], "v1"),
        (["forecasts", "show", "sine.0", "--model", "mstl"], "mstl"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and expect in result.output, (args, result.output)
    store.close()


def test_series_accuracy_scales_each_model_by_the_daily_naive_on_the_same_forecasts(
    db_url,
    trained,  # noqa: F811
):
    store = _setup(db_url, trained)
    _ingest_days(store, 0, 20)
    run_predict(store, warmup_steps=WARMUP)
    for day in range(20, 26):
        _ingest_days(store, day, day + 1)
        run_predict(store, warmup_steps=WARMUP)
    # A second version serves only the last two days of the week evaluated.
    v2 = _promote_with_states(store, trained)  # states and forecasts, then promoted
    for day in range(26, 28):
        _ingest_days(store, day, day + 1)
        run_predict(store, warmup_steps=WARMUP)
    summary = run_evaluate(store, accuracy_window=timedelta(days=7))
    rows = {(r["series"], r["model"]): r for r in store.series_accuracy()}
    with store.engine.connect() as conn:
        acc = conn.execute(
            sa.text(
                "SELECT series, model, origin_ts, horizon_step, abs_error, inside_interval "
                "FROM forecast_accuracy WHERE model IN (:m, 'seasonal_naive_daily', 'mstl')"
            ),
            {"m": f"v{v2}"},
        ).all()
    err = {(s, m, str(o), h): e for s, m, o, h, e, _ in acc}
    inside = {(s, m, str(o), h): i for s, m, o, h, _, i in acc}
    for series in ("sine.0", "sine.1"):
        # The statistical challenger, on the same forecasts (its rows at the champion's
        # origins), with the coverage of its own band.
        keys = [(series, "mstl", k[2], k[3]) for k in err if k[:2] == (series, f"v{v2}")]
        challenger = rows[(series, "mstl")]
        assert challenger["n_scored"] == len(keys) == 48 and all(k in err for k in keys)
        mae = sum(err[k] for k in keys) / len(keys)
        naive_mae = sum(err[(series, "seasonal_naive_daily", k[2], k[3])] for k in keys) / 48
        assert challenger["mae"] == pytest.approx(mae)
        assert challenger["mase"] == pytest.approx(mae / naive_mae)
        assert challenger["coverage"] == pytest.approx(sum(inside[k] for k in keys) / 48)
        naive = rows[(series, "seasonal_naive_daily")]
        assert naive["mase"] == pytest.approx(1.0)
        mine = rows[(series, f"v{v2}")]
        keys = [k for k in err if k[0] == series and k[1] == f"v{v2}"]
        assert mine["n_scored"] == len(keys) == 24 + 24  # two origins with their actuals...
        model_mae = sum(err[k] for k in keys) / len(keys)
        naive_mae = sum(err[(series, "seasonal_naive_daily", k[2], k[3])] for k in keys) / len(keys)
        assert mine["mae"] == pytest.approx(model_mae)
        assert mine["mase"] == pytest.approx(model_mae / naive_mae)
        assert 0 <= mine["coverage"] <= 1
    assert summary.mase == pytest.approx(
        sum(
            rows[(s, f"v{v2}")]["mae"] * rows[(s, f"v{v2}")]["n_scored"]
            for s in ("sine.0", "sine.1")
        )
        / sum(
            rows[(s, f"v{v2}")]["mae"]
            / rows[(s, f"v{v2}")]["mase"]
            * rows[(s, f"v{v2}")]["n_scored"]
            for s in ("sine.0", "sine.1")
        )
    )
    store.close()


def test_the_first_forecast_serves_the_holdout_calibration(sqlite_url, trained):  # noqa: F811
    """Before any forecast is scored, the band served is the raw one corrected by what the
    model measured on its training holdout (it used to stay raw until 30 scored forecasts
    per horizon step, which a small fleet forecast once a day took weeks to reach)."""
    result = trained[0]
    assert len(result.calibration) == 24 and any(c != 0 for c in result.calibration)
    store = _setup(sqlite_url, trained)
    _ingest_days(store, 0, 20)
    run_predict(store, warmup_steps=WARMUP)
    f = schema.forecasts
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(f.c.horizon_step, f.c.yhat, f.c.yhat_lower, f.c.yhat_upper)
            .add_columns(f.c.raw_lower, f.c.raw_upper)
            .where(f.c.model == "v1")
        ).all()
    assert rows
    for step, yhat, lo, hi, raw_lo, raw_hi in rows:
        c = result.calibration[step - 1]
        assert hi == pytest.approx(max(yhat, raw_hi + c * (raw_hi - raw_lo)))
        assert lo == pytest.approx(min(yhat, raw_lo - c * (raw_hi - raw_lo)))
    store.close()


def test_one_series_forecast_once_a_day_is_calibrated_at_once(sqlite_url, trained):  # noqa: F811
    """Each evaluate blends the holdout correction with the few scores there are: every
    horizon step gets a correction from the first scored day on."""
    store = _setup(sqlite_url, trained)
    _ingest_days(store, 0, 20)
    run_predict(store, warmup_steps=WARMUP)
    _ingest_days(store, 20, 21)
    run_predict(store, warmup_steps=WARMUP)
    summary = run_evaluate(store)
    assert summary.steps_calibrated == 24
    corrections = store.calibration_for("v1")
    prior = trained[0].calibration
    # One day of scores against a prior worth 30: the correction stays near the prior.
    assert all(abs(corrections[h] - prior[h - 1]) < 0.5 for h in corrections), corrections
    store.close()


def _a_day_far_above_the_band(url, trained):  # noqa: F811
    """A store forecast from day 20's start, whose day-20 actuals are all 10^4 higher."""
    store = _setup(url, trained)
    _ingest_days(store, 0, 20)
    run_predict(store, warmup_steps=WARMUP)
    _ingest_days(store, 20, 21)
    o = schema.observations
    with store.begin() as conn:
        conn.execute(
            sa.update(o).where(o.c.ts >= START + timedelta(days=20)).values(value=o.c.value + 1e4)
        )
    return store


def test_a_day_the_band_missed_widens_every_step_by_the_tracked_offset(sqlite_url, trained):  # noqa: F811
    """Every actual of the first scored day far outside the band served: one horizon of
    time, all missed, so every step's correction is its blended per-step one plus
    1 x (1 - 0.2) band widths (forecaster.calibration.tracked_offset)."""
    from forecaster.calibration import OFFSET_GAIN, band_score, blend, score_bin_width

    store = _a_day_far_above_the_band(sqlite_url, trained)
    o = schema.observations
    summary = run_evaluate(store)
    assert summary.coverage == 0.0 and summary.offset == pytest.approx(OFFSET_GAIN * 0.8)
    prior = trained[0].calibration
    scored = store.scored_forecasts("v1", START)
    corrections = store.calibration_for("v1")
    assert sorted(corrections) == list(range(1, 25))
    for step in range(1, 25):
        g = scored.filter(scored["horizon_step"] == step)
        score = [
            band_score(lo, hi, a)
            for a, lo, hi in zip(g["actual"], g["raw_lower"], g["raw_upper"], strict=True)
        ]
        want = blend(score, 0.8, prior[step - 1], 30) + OFFSET_GAIN * 0.8
        # The scores are kept as histograms (calibration_days): the quantile is read to a
        # bin above the exact one, never below it.
        bin_ = score_bin_width(conformal_quantile(score, 0.8))
        assert want - 1e-9 <= corrections[step] <= want + bin_ + 1e-9, step
    # Carried, not recomputed: running again counts nothing twice; a second missed day
    # adds as much again, and the sum outlives the window the scores are read from.
    assert run_evaluate(store).offset == pytest.approx(OFFSET_GAIN * 0.8)
    run_predict(store, warmup_steps=WARMUP)
    _ingest_days(store, 21, 22)
    with store.begin() as conn:
        conn.execute(
            sa.update(o).where(o.c.ts >= START + timedelta(days=21)).values(value=o.c.value + 2e4)
        )
    assert run_evaluate(store).offset == pytest.approx(OFFSET_GAIN * 1.6)
    assert run_evaluate(store, window=timedelta(hours=1)).offset == pytest.approx(OFFSET_GAIN * 1.6)
    assert store.calibration_offset("v1") == pytest.approx(OFFSET_GAIN * 1.6)
    store.close()


def test_the_challengers_band_is_widened_by_its_own_tracked_misses(sqlite_url, trained):  # noqa: F811
    """The MSTL challenger's rows (model "mstl") carry the version's band moved to their
    median; the evaluate job tracks their own misses into an offset of their own, which
    the next predict adds to the version's corrections for those rows only: a day far
    outside every band moves both offsets by 1 x (1 - 0.2) band widths; counted once."""
    from forecaster.calibration import OFFSET_GAIN

    store = _a_day_far_above_the_band(sqlite_url, trained)
    assert store.calibration_offset("mstl") == 0.0
    run_evaluate(store)
    assert store.calibration_offset("v1") == pytest.approx(OFFSET_GAIN * 0.8)
    assert store.calibration_offset("mstl") == pytest.approx(OFFSET_GAIN * 0.8)
    assert run_evaluate(store) is not None
    assert store.calibration_offset("mstl") == pytest.approx(OFFSET_GAIN * 0.8)  # once
    run_predict(store, warmup_steps=WARMUP)
    corrections = store.calibration_for("v1")
    newest = START + timedelta(days=21, hours=-1)
    f = schema.forecasts
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                f.c.model, f.c.horizon_step, f.c.yhat_upper, f.c.raw_lower, f.c.raw_upper
            ).where(f.c.origin_ts == newest, f.c.model.in_(["v1", "mstl"]))
        ).all()
    # The upper bound, never cut (the lower one may be, at zero): raw + correction x width.
    assert sorted(r[0] for r in rows) == ["mstl"] * 48 + ["v1"] * 48
    for model, step, upper, raw_lo, raw_hi in rows:
        want = corrections[step] + (OFFSET_GAIN * 0.8 if model == "mstl" else 0.0)
        assert upper == pytest.approx(raw_hi + want * (raw_hi - raw_lo), rel=1e-6), (model, step)
    store.close()


def test_series_that_end_years_apart_are_each_scored_over_their_own_window(
    sqlite_url,
    trained,  # noqa: F811
):
    """Each series' new actuals are those after its own last counted one, within the window
    before its own newest point: a series whose data ended three years before the other's
    still has its forecasts scored, counted into the offset and its accuracy recorded over
    its own week (a window counted from the newest point of all once left it out). The
    per-step corrections are the fleet's, read from the days before the newest point of
    all (calibration_days)."""
    store = _setup(sqlite_url, trained)
    _ingest_days(store, 0, 20)
    for day in range(20, 23):
        run_predict(store, warmup_steps=WARMUP)
        _ingest_days(store, day, day + 1)
    years = timedelta(days=3 * 365)
    with store.begin() as conn:  # sine.1's whole stored history, three years later
        sid = conn.execute(
            sa.select(schema.series.c.id).where(schema.series.c.name == "sine.1")
        ).scalar_one()
        for table, cols in (
            (schema.observations, ("ts",)),
            (schema.watermarks, ("ts",)),
            (schema.forecast_origins, ("origin_ts", "last_target_ts")),
        ):
            rows = [
                r._asdict() for r in conn.execute(table.select().where(table.c.series_id == sid))
            ]
            conn.execute(table.delete().where(table.c.series_id == sid))
            conn.execute(table.insert(), [{**r, **{c: r[c] + years for c in cols}} for r in rows])
    scored = store.scored_forecasts("v1", START)
    per_series = dict(scored.group_by("series_id").len().rows())
    newest = dict(scored.group_by("series_id").agg(pl.col("target_ts").max()).rows())
    apart = run_evaluate(store)
    tracked = dict(store.calibration_tracking("v1").rows())
    assert tracked == newest and len(tracked) == 2  # both counted, each to its own end
    assert store.calibration_offset("v1") != 0.0
    assert apart.scored == per_series[sid]  # the fleet's corrections: the newest days
    with store.engine.connect() as conn:
        acc = conn.execute(
            sa.select(
                schema.series_accuracy.c.series_id,
                schema.series_accuracy.c.n_scored,
                schema.series_accuracy.c.window_end,
            ).where(schema.series_accuracy.c.model == "v1")
        ).all()
    assert len(acc) == 2 and acc[0][2] != acc[1][2], acc  # each its own window
    assert all(n == per_series[s] for s, n, _ in acc), (acc, per_series)
    store.close()


def test_each_run_reads_only_the_forecasts_whose_actuals_are_new(sqlite_url, trained):  # noqa: F811
    """Evaluate's cost follows the new data, not the window: over a week of daily runs,
    each scored forecast of the champion is read from the ledger once, by the run that
    first counts its actual, not once per run while its target stays in the window; and
    what the runs keep (accuracy_days) gives the per-series accuracy that the window's rows
    give (the view forecast_accuracy, over the week's whole days)."""
    store = _setup(sqlite_url, trained)
    _ingest_days(store, 0, 20)
    run_predict(store, warmup_steps=WARMUP)
    read = []
    real = store.forecast_points

    def reading(model, since, series_ids=None, before=None):  # the real read, rows noted
        frame = real(model, since, series_ids, before)
        if model == "v1":
            read.append(frame.filter(pl.col("target_ts") > since))
        return frame

    store.forecast_points = reading
    for day in range(20, 30):
        _ingest_days(store, day, day + 1)
        run_evaluate(store, accuracy_window=timedelta(days=7))
        run_predict(store, warmup_steps=WARMUP)
    keys = pl.concat(read).select("series_id", "origin_ts", "horizon_step")
    scored = store.scored_forecasts("v1", START)
    assert keys.height == keys.unique().height == scored.height == 2 * 10 * 24
    rows = {(r["series"], r["model"]): r for r in store.series_accuracy()}
    with store.engine.connect() as conn:
        acc = conn.execute(
            sa.text(
                "SELECT series, model, origin_ts, horizon_step, target_ts, abs_error, "
                "inside_interval FROM forecast_accuracy "
                "WHERE model IN ('v1', 'seasonal_naive_daily', 'seasonal_naive_weekly', 'mstl')"
            )
        ).all()
    since = START + timedelta(days=30 - 7)  # the week's whole days, up to the newest point
    err = {(s, m, str(o), h): (e, i) for s, m, o, h, t, e, i in acc if str(t) >= str(since)}
    for series in ("sine.0", "sine.1"):
        mine = [k for k in err if k[:2] == (series, "v1")]
        naive = sum(err[(series, "seasonal_naive_daily", *k[2:])][0] for k in mine)
        assert len(mine) == 7 * 24
        for model in ("v1", "seasonal_naive_weekly", "mstl"):
            keys_m = [(series, model, *k[2:]) for k in mine]
            row = rows[(series, model)]
            total = sum(err[k][0] for k in keys_m)
            assert row["n_scored"] == len(keys_m), model
            assert row["mae"] == pytest.approx(total / len(keys_m)), model
            assert row["mase"] == pytest.approx(total / naive), model
            if model != "seasonal_naive_weekly":
                inside = sum(err[k][1] for k in keys_m) / len(keys_m)
                assert row["coverage"] == pytest.approx(inside), model
        assert rows[(series, "seasonal_naive_daily")]["mase"] == pytest.approx(1.0)
    store.close()


def test_naive_values_read_from_window_copies_equal_those_read_from_observations(
    db_url,
    trained,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """The seasonal naives' values a day and a week back, which evaluate reads from
    predict's window copies (schema.window_values) where it can: a store reading them and
    one whose copies are wiped before every run (so it reads `observations`) keep the same
    accuracy figures, bit for bit, through a late point in a window already copied and read
    a day back before predict has handled it (that series' values then come from
    `observations`); and the copies store reads every other value from its copies."""
    import pipelines.evaluate as evaluate
    from tests.pipelines.test_predict import _late_point

    copies = _setup(db_url, trained)
    plain = _setup(f"sqlite:///{tmp_path / 'plain.db'}", trained)
    copied: dict[int, int] = {}
    real = evaluate._copied_values
    day = 0

    def spy(store, keys):
        got = real(store, keys)
        if store is copies:
            copied[day] = copied.get(day, 0) + got.height
        return got

    monkeypatch.setattr(evaluate, "_copied_values", spy)
    late_hour = 26 * 24 + 5  # day 26: copied by its own predict, read a week back on day 33
    late_day = 27
    for store in (copies, plain):
        _ingest_days(store, 0, 20)
        run_predict(store, warmup_steps=WARMUP)
    for day in range(20, 38):  # noqa: B007 - read by the spy
        for store in (copies, plain):
            if day == late_day:
                _late_point(store, hour=late_hour, shift=0.1)  # no float32 value
            _ingest_days(store, day, day + 1)
            if store is plain:
                with store.begin() as conn:
                    conn.execute(sa.delete(schema.window_values))
            summary = run_evaluate(store, accuracy_window=timedelta(days=7))
            assert summary.scored > 0
            run_predict(store, warmup_steps=WARMUP)
    # Each day 2 series x 24 targets, a day and a week back: 96 values, all copied but the
    # late series' on the day its point arrived.
    assert copied == {d: 48 if d == late_day else 96 for d in range(20, 38)}

    def figures(store):
        a, sa_ = schema.accuracy_days, schema.series_accuracy
        with store.engine.connect() as conn:
            days = conn.execute(sa.select(a).order_by(a.c.series_id, a.c.model, a.c.day)).all()
            rows = conn.execute(
                sa.select(*(c for c in sa_.columns if c.name != "updated_at")).order_by(
                    sa_.c.series_id, sa_.c.model
                )
            ).all()
        return [tuple(r) for r in days], [tuple(r) for r in rows]

    assert figures(copies) == figures(plain)
    days, _ = figures(copies)
    assert {r[1] for r in days} >= {"seasonal_naive_daily", "seasonal_naive_weekly"}
    copies.close()
    plain.close()
