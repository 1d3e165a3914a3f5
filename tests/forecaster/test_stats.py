"""The statistical challenger (forecaster.stats): MSTL fitted once, then a state advanced over
new points only, and its place among the members that serve a series."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import torch

from forecaster import stats
from forecaster.api import Forecaster
from forecaster.inference import Joint, state_from_rows, state_to_rows

DAY, WEEK = 24, 168


def seasonal(n: int, seed: int = 0, noise: float = 0.3, start: int = 0) -> np.ndarray:
    """A level with a slow trend, a daily and a weekly shape, and a little noise."""
    t = np.arange(start, start + n)
    rng = np.random.default_rng(seed)
    return (
        50
        + 0.01 * t
        + 8 * np.sin(2 * math.pi * t / DAY)
        + 3 * np.sin(2 * math.pi * t / WEEK)
        + rng.normal(0, noise, n)
    )


def test_fitted_state_forecasts_a_seasonal_series_after_updates():
    """Fitted on six weeks, advanced over a seventh point by point, the state forecasts the
    next day far better than a daily seasonal naive (the weekly shape and the trend are in
    it)."""
    y = seasonal(7 * WEEK + DAY)[None, :]
    fit_end = 6 * WEEK
    params, state = stats.fit(y, np.array([0]), np.array([fit_end]), 0, DAY, WEEK)
    assert params.seasons == (DAY, WEEK)
    state, _ = stats.update(params, state, y[:, fit_end : 7 * WEEK], fit_end)
    pred = stats.forecast(params, state, 7 * WEEK - 1, DAY)[0]
    truth = y[0, 7 * WEEK :]
    naive = y[0, 7 * WEEK - DAY : 7 * WEEK]
    assert np.abs(pred - truth).mean() < 0.5 * np.abs(naive - truth).mean()
    assert np.abs(pred - truth).mean() < 1.0  # noise 0.3, amplitude 8


def test_updating_in_pieces_equals_one_pass():
    """O(new points): advancing over a week in uneven pieces gives the state one pass
    gives, and the forecasts from each step agree."""
    y = seasonal(4 * WEEK, seed=1)[None, :].repeat(2, 0)
    y[1] += 5
    y[0, 3 * WEEK + 10 : 3 * WEEK + 14] = np.nan  # missing points advance without correcting
    params, state = stats.fit(y, np.zeros(2, int), np.full(2, 3 * WEEK), 0, DAY, WEEK)
    params.gamma[:] = 0.1
    whole, pred = stats.update(params, state, y[:, 3 * WEEK :], 3 * WEEK, horizon=DAY)
    part = state
    for a, b in [(0, 5), (5, 60), (60, WEEK)]:
        part, _ = stats.update(params, part, y[:, 3 * WEEK + a : 3 * WEEK + b], 3 * WEEK + a)
    np.testing.assert_allclose(part, whole, rtol=1e-12)
    np.testing.assert_allclose(
        pred[:, -1], stats.forecast(params, whole, 4 * WEEK - 1, DAY), rtol=1e-12
    )


def test_series_only_advance_over_their_own_span():
    """A series whose state already holds some steps skips them; one that ended stays put."""
    y = seasonal(3 * WEEK, seed=2)[None, :].repeat(2, 0)
    params, state = stats.fit(y, np.zeros(2, int), np.full(2, 2 * WEEK), 0, DAY, WEEK)
    moved, _ = stats.update(
        params,
        state,
        y[:, 2 * WEEK :],
        2 * WEEK,
        active_from=np.array([2 * WEEK, 3 * WEEK]),  # the second holds every step already
    )
    np.testing.assert_array_equal(moved[1], state[1])
    assert not np.allclose(moved[0], state[0])
    stopped, _ = stats.update(
        params, state, y[:, 2 * WEEK :], 2 * WEEK, active_to=np.array([2 * WEEK + 9, 3 * WEEK])
    )
    early, _ = stats.update(params, state, y[:, 2 * WEEK : 2 * WEEK + 10], 2 * WEEK)
    np.testing.assert_allclose(stopped[0], early[0], rtol=1e-12)


def test_gamma_is_chosen_on_held_out_points():
    """A seasonal shape that changes after the fit: the held-out points pick a gain that
    follows it, and that gain forecasts them better than none."""
    n = 6 * WEEK
    y = seasonal(n, seed=3)
    t = np.arange(n)
    y[4 * WEEK :] += 6 * np.sin(2 * math.pi * t[4 * WEEK :] / DAY + 1.0)  # the day changes
    y = y[None, :]
    params, state = stats.fit(y, np.array([0]), np.array([4 * WEEK]), 0, DAY, WEEK)
    gamma = stats.choose_gamma(params, state, y[:, 4 * WEEK :], 4 * WEEK, DAY)
    assert gamma.shape == (1, 2) and gamma[0, 0] > 0

    def mae(g: np.ndarray) -> float:
        trial = stats.StatParams(params.seasons, params.alpha, params.beta, params.phi, g)
        _, pred = stats.update(trial, state, y[:, 4 * WEEK :], 4 * WEEK, horizon=DAY)
        err = [np.abs(pred[0, :-DAY, h - 1] - y[0, 4 * WEEK + h : n - DAY + h]) for h in (1, DAY)]
        return float(np.mean(err))

    assert mae(gamma) < mae(np.zeros((1, 2)))


def test_params_round_trip_and_state_rows_carry_the_challenger():
    y = seasonal(3 * WEEK)[None, :].repeat(3, 0)
    params, state = stats.fit(y, np.zeros(3, int), np.full(3, 3 * WEEK), 0, DAY, WEEK)
    again = stats.StatParams.from_dict(params.to_dict())
    assert again.seasons == params.seasons and again.width == state.shape[1]
    np.testing.assert_array_equal(again.alpha, params.alpha)
    h, c = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    rows, shape = state_to_rows(Joint((h, c), state))
    assert shape == [2, 1, 8, state.shape[1]]
    back = state_from_rows(rows, shape, "lstm")
    assert isinstance(back, Joint)
    torch.testing.assert_close(back.net[0], h)
    torch.testing.assert_close(back.net[1], c)
    np.testing.assert_allclose(back.stat, state, rtol=1e-6)  # stored as float32


def frame(values: np.ndarray, names: list[str], start: datetime) -> pl.DataFrame:
    ts = [start + timedelta(hours=i) for i in range(values.shape[1])]
    return pl.concat(
        pl.DataFrame({"series": name, "ts": ts, "value": values[i]}) for i, name in enumerate(names)
    )


def test_a_series_the_challenger_forecasts_best_is_served_by_it():
    """A smooth seasonal series and a barely trained network: the MSTL challenger weighs
    most in what serves it, the served forecast follows it, and after updates it still
    does (its state advanced with the network's)."""
    start = datetime(2024, 1, 1, tzinfo=UTC)
    y = np.stack([seasonal(10 * WEEK, seed=4), 2 * seasonal(10 * WEEK, seed=5)])
    data = frame(y, ["a", "b"], start)
    cut = start + timedelta(hours=9 * WEEK)
    fc = Forecaster("gru", horizon=DAY, hidden=8, epochs=2, refit_epochs=0, seed=0)
    fc.fit(data.filter(pl.col("ts") < cut))
    served = fc.model.meta["serving"]
    assert all(max(w, key=w.get) == "mstl" and w["mstl"] > 0.5 for w in served.values()), served
    assert "mstl" in fc.result.metrics
    for day in range(3):
        lo, hi = cut + timedelta(hours=day * DAY), cut + timedelta(hours=(day + 1) * DAY)
        if day:
            fc.update(
                data.filter((pl.col("ts") >= lo - timedelta(hours=DAY)) & (pl.col("ts") < lo))
            )
        got = fc.forecast().sort("series", "horizon_step")
        truth = data.filter((pl.col("ts") >= lo) & (pl.col("ts") < hi)).sort("series", "ts")
        mae = (got["yhat"] - truth["value"]).abs().mean()
        assert mae < 1.5, (day, mae)  # noise 0.3 and 0.6; the daily swing is 16 and 32
    # Without the challenger the same network is served by itself or a naive.
    none = Forecaster("gru", horizon=DAY, hidden=8, epochs=2, refit_epochs=0, challenger="none")
    none.fit(data.filter(pl.col("ts") < cut))
    assert not any("mstl" in w for w in none.model.meta["serving"].values())
    assert "mstl" not in none.result.metrics


def test_the_profiles_follow_a_changing_seasonal_shape():
    """Fitted while the daily swing was 4, then advanced over two weeks where it is 12: the
    state's next day follows the new swing (the profile moves against the smooth level). The
    Holt-Winters correction by the one-step error, which a fit whose level follows every
    point (alpha near 1) leaves where it was, misses it by far more."""
    t = np.arange(8 * WEEK + DAY)
    amp = np.where(t < 6 * WEEK, 4.0, 12.0)
    rng = np.random.default_rng(4)
    y = (50 + amp * np.sin(2 * math.pi * t / DAY) + rng.normal(0, 0.2, t.size))[None, :]
    fit_end = 6 * WEEK
    params, state = stats.fit(y, np.array([0]), np.array([fit_end]), 0, DAY, WEEK)
    params.gamma[:] = [0.2, 0.0]
    params.alpha[:] = 0.99  # as fits on real data often choose: the level follows every point
    truth = y[0, 8 * WEEK :]

    def next_day_error(p: stats.StatParams, s: np.ndarray) -> float:
        moved, _ = stats.update(p, s, y[:, fit_end : 8 * WEEK], fit_end)
        return float(np.abs(stats.forecast(p, moved, 8 * WEEK - 1, DAY)[0] - truth).mean())

    new = next_day_error(params, state)
    assert new < 1.0, new  # swing 12: a day's profile two weeks old would miss by ~5
    old = stats.StatParams(
        params.seasons, params.alpha, params.beta, params.phi, params.gamma, smooth_rate=None
    )
    old_state = np.delete(state, 2, axis=1)  # the same fit in the old row layout
    assert next_day_error(old, old_state) > 2 * new


def test_a_version_fitted_before_the_smooth_level_keeps_its_layout_and_update():
    """Params stored without smooth_rate (checkpoints from before it) read back as the old
    layout (level, trend, profiles) and advance with the Holt-Winters correction."""
    y = seasonal(3 * WEEK, seed=5)[None, :]
    params, state = stats.fit(y, np.array([0]), np.array([2 * WEEK]), 0, DAY, WEEK)
    assert params.smooth_rate == 1 / DAY and state.shape[1] == 3 + DAY + WEEK
    stored = params.to_dict()
    assert stats.StatParams.from_dict(stored).smooth_rate == params.smooth_rate
    del stored["smooth_rate"]
    old = stats.StatParams.from_dict(stored)
    assert old.smooth_rate is None and old.width == 2 + DAY + WEEK
    old.gamma[:] = 0.1
    old_state = np.delete(state, 2, axis=1)
    moved, _ = stats.update(old, old_state, y[:, 2 * WEEK : 2 * WEEK + 5], 2 * WEEK)
    # By hand, the old rule at the first point: every profile slot moves by gamma * error.
    g = 2 * WEEK
    season = old_state[0, 2 + g % DAY] + old_state[0, 2 + DAY + g % WEEK]
    err = y[0, g] - season - (old_state[0, 0] + old.phi[0] * old_state[0, 1])
    first, _ = stats.update(old, old_state, y[:, g : g + 1], g)
    assert first[0, 2 + g % DAY] == np.float64(old_state[0, 2 + g % DAY] + 0.1 * err)
    assert moved.shape == old_state.shape


def test_the_served_challenger_is_refitted_on_the_newest_points(monkeypatch):
    """The daily swing doubles nine days before the end, inside the held-out test tail: the
    decomposition fitted before the tails (for an honest holdout) would still serve the old
    shape, moved only by its small chosen gain (a swing of about 22); the state that serves
    is refitted on the newest weeks and holds the new one (32)."""
    n = 10 * WEEK
    y = seasonal(n, seed=4)
    t = np.arange(n - 9 * DAY, n)
    y[t] += 8 * np.sin(2 * math.pi * t / DAY)
    fc = Forecaster("gru", horizon=DAY, hidden=8, epochs=1, refit_epochs=0, seed=0)
    fc.fit(frame(y[None], ["a"], datetime(2024, 1, 1, tzinfo=UTC)))
    challenger = fc.model.stat
    at = challenger.params.offsets()[challenger.params.seasons.index(DAY)]
    profile = challenger.state[0, at : at + DAY]
    assert 29 < profile.max() - profile.min() < 35
    # Where the refit fails, the first fit's state rolled over the tails serves (not none).
    from forecaster import training

    def fails(*args, **kwargs):
        raise ValueError("no refit")

    monkeypatch.setattr(training, "_refit_challenger", fails)
    fc = Forecaster("gru", horizon=DAY, hidden=8, epochs=1, refit_epochs=0, seed=0)
    fc.fit(frame(y[None], ["a"], datetime(2024, 1, 1, tzinfo=UTC)))
    rolled = fc.model.stat
    assert rolled is not None and rolled.params.seasons == challenger.params.seasons
    profile = rolled.state[0, at : at + DAY]
    assert 18 < profile.max() - profile.min() < 26  # the old shape, moved by its small gain
