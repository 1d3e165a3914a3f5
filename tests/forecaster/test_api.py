"""The in-memory API: fit, forecast, update and cross-validate on DataFrames."""

from __future__ import annotations

import copy
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from forecaster.api import Forecaster, infer_freq, to_long_frame

START = datetime(2024, 1, 1, tzinfo=UTC)


def _frame(n_series=2, days=36, start=START, seed=0, freq_h=1) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    n = days * 24 // freq_h
    t = np.arange(n) * freq_h
    rows = []
    for s in range(n_series):
        v = 20 + 8 * np.sin(2 * np.pi * t / 24 + s) + rng.normal(0, 1, n)
        rows.append(
            pl.DataFrame(
                {
                    "series": f"s{s}",
                    "ts": [start + timedelta(hours=int(h)) for h in t],
                    "value": v,
                }
            )
        )
    return pl.concat(rows).with_columns(pl.col("ts").dt.cast_time_unit("us"))


@pytest.fixture(scope="module")
def fitted() -> tuple[Forecaster, pl.DataFrame]:
    data = _frame()
    cut = START + timedelta(days=30)
    fc = Forecaster("gru", horizon=24, hidden=8, epochs=3).fit(data.filter(pl.col("ts") < cut))
    return fc, data


def test_fit_and_forecast_give_a_frame_of_quantiles(fitted):
    fc, _ = fitted
    out = fc.forecast()
    assert out.columns == [
        "series",
        "origin_ts",
        "ts",
        "horizon_step",
        "yhat",
        "yhat_lower",
        "yhat_upper",
        "raw_lower",
        "raw_upper",
    ]
    assert out.height == 2 * 24 and out["series"].unique().sort().to_list() == ["s0", "s1"]
    last = START + timedelta(days=30, hours=-1)
    assert (out["origin_ts"] == last).all()
    assert (
        out.filter(pl.col("horizon_step") == 1)["ts"].to_list() == [last + timedelta(hours=1)] * 2
    )
    assert (out["yhat_lower"] <= out["yhat"]).all() and (out["yhat"] <= out["yhat_upper"]).all()


def test_update_advances_the_state_over_new_points_only(fitted):
    """Oracle: two updates give the very forecast one update over both spans gives."""
    fc, data = fitted
    one, two = copy.deepcopy(fc), copy.deepcopy(fc)
    a = data.filter(
        pl.col("ts").is_between(START + timedelta(days=30), START + timedelta(days=31), "left")
    )
    b = data.filter(
        pl.col("ts").is_between(START + timedelta(days=31), START + timedelta(days=32), "left")
    )
    one.update(a).update(b)
    two.update(pl.concat([a, b]))
    f1, f2 = one.forecast(), two.forecast()
    assert (f1["origin_ts"] == START + timedelta(days=32, hours=-1)).all()
    np.testing.assert_allclose(f1["raw_upper"].to_numpy(), f2["raw_upper"].to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(f1["yhat"].to_numpy(), f2["yhat"].to_numpy(), rtol=1e-5)


def test_update_scores_earlier_forecasts_for_the_bands(fitted):
    fc = copy.deepcopy(fitted[0])
    data = fitted[1]
    before = fc.corrections()
    assert before == pytest.approx(fc.model.meta["calibration"])  # the holdout's, at first
    fc.update(
        data.filter(
            pl.col("ts").is_between(START + timedelta(days=30), START + timedelta(days=31), "left")
        )
    )
    assert all(len(fc._scores[h]) == 2 for h in range(1, 25))  # two series, one origin each


def test_update_refuses_old_points_and_unknown_series(fitted):
    fc = copy.deepcopy(fitted[0])
    with pytest.raises(ValueError, match="after its last one"):
        fc.update(fitted[1].filter(pl.col("ts") < START + timedelta(days=1)))
    stranger = pl.DataFrame(
        {"series": ["x"], "ts": [START + timedelta(days=40)], "value": [1.0]}
    ).with_columns(pl.col("ts").dt.cast_time_unit("us"))
    with pytest.raises(KeyError, match="unknown to the model"):
        fc.update(stranger)


def test_pandas_in_polars_out_and_clear_errors():
    pd = pytest.importorskip("pandas")
    data = _frame(n_series=1, days=2)
    back = to_long_frame(data.to_pandas())
    assert back.equals(data.sort("series", "ts"))
    assert infer_freq(back) == 3600
    with pytest.raises(ValueError, match="lacks column"):
        to_long_frame(pd.DataFrame({"series": ["a"], "time": [START], "value": [1.0]}))
    with pytest.raises(TypeError, match="unknown option"):
        Forecaster(epochz=3)
    with pytest.raises(RuntimeError, match="not fitted"):
        Forecaster().forecast()


def test_cross_validation_counts_back_from_each_series_own_end():
    """Two series in different years: each gets its own cutoffs, every block of H scored."""
    a = _frame(n_series=1, days=26)
    b = _frame(n_series=1, days=26, start=START + timedelta(days=400), seed=1).with_columns(
        pl.lit("later").alias("series")
    )
    cv = Forecaster("gru", horizon=24, hidden=8, epochs=2).cross_validation(
        pl.concat([a, b]), n_windows=3
    )
    assert cv.columns == [
        "series",
        "cutoff",
        "ts",
        "horizon_step",
        "y",
        "yhat",
        "yhat_lower",
        "yhat_upper",
    ]
    for name, part in cv.group_by("series"):
        cutoffs = part["cutoff"].unique().sort().to_list()
        assert len(cutoffs) == 3 and part.height == 3 * 24, name
        assert all(b - a == timedelta(hours=24) for a, b in zip(cutoffs, cutoffs[1:], strict=False))
    assert cv["y"].null_count() == 0 and all(math.isfinite(x) for x in cv["yhat"])


def test_the_pooled_offset_widens_every_step(fitted):
    """The offset the served band's misses have built up is added to every step's blended
    correction."""
    from collections import deque

    from forecaster import calibration

    fc = copy.deepcopy(fitted[0])
    scores = [0.1 * k for k in range(10)]
    for h in range(1, fc.horizon + 1):
        fc._scores[h] = deque(scores)
    fc._offset = 2.4
    prior = fc.model.holdout_corrections
    want = [
        calibration.blend(scores, 0.8, prior.get(h), fc.prior_weight) + 2.4
        for h in range(1, fc.horizon + 1)
    ]
    # The quantile is read to a bin of the scores' histogram, as the evaluate job reads it:
    # never below the exact one, at most a bin above.
    got = fc.corrections()
    assert len(got) == len(want)
    assert all(
        w - 1e-9 <= g <= w + calibration.SCORE_BIN + 1e-9 for g, w in zip(got, want, strict=True)
    )


def test_each_missed_horizon_adds_to_the_offset_and_a_covered_one_takes_off(fitted):
    """A fleet forecast once a horizon whose served band missed every actual of a day moves
    the offset by 1 x (1 - 0.2) band widths at once; a second such day doubles it (an
    integral: per-step scores alone would take weeks to move); days inside the band bring
    it back down."""
    from forecaster.calibration import OFFSET_GAIN

    fc, data = copy.deepcopy(fitted[0]), fitted[1]
    assert fc._offset == 0.0

    def day(d: int, shift: float = 0.0) -> pl.DataFrame:
        span = (START + timedelta(days=d), START + timedelta(days=d + 1))
        return data.filter(pl.col("ts").is_between(*span, "left")).with_columns(
            pl.col("value") + shift
        )

    fc.update(day(30, 1e4))
    assert fc._offset == pytest.approx(OFFSET_GAIN * 0.8)
    fc.update(day(31, -1e4))  # the forecasts from the shifted point miss again
    assert fc._offset == pytest.approx(OFFSET_GAIN * 1.6)
    wide = copy.deepcopy(fitted[0])
    wide._offset = 2.0  # bands 2 widths wider each side cover (nearly) every actual
    for d in (30, 31, 32):
        wide.update(day(d))
    assert 2.0 - 3 * 0.2 * OFFSET_GAIN - 1e-9 <= wide._offset < 2.0 - 0.5
