"""What serves each series: chosen on the holdout, applied to the network's quantiles."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
import torch

from forecaster import serving
from forecaster.panel import Panel
from forecaster.trained import TrainedModel
from forecaster.training import TrainConfig, train, trained_model

NAN = float("nan")


def test_the_blend_weighs_each_member_by_its_holdout_error_to_the_minus_fourth_power():
    errors = {
        "model": torch.tensor([1.0, 1.0, NAN, 1.0, NAN]),
        "naive_daily": torch.tensor([2.0, 1.0, 1.0, 0.0, NAN]),
        "naive_weekly": torch.tensor([NAN, 1.0, 3.0, 1.0, NAN]),
        "mstl": torch.tensor([NAN, 1.0, NAN, 2.0, NAN]),
    }
    got = serving.choose(errors)
    # Twice as accurate weighs 16 times as much; equals share; an unscored member has no
    # say; a member without error takes it all; nothing scored: the network serves.
    assert got[0] == pytest.approx({"model": 16 / 17, "naive_daily": 1 / 17}, abs=1e-6)
    assert got[1] == pytest.approx(dict.fromkeys(serving.BASE, 0.25))
    assert got[2] == pytest.approx({"naive_daily": 81 / 82, "naive_weekly": 1 / 82}, abs=1e-6)
    assert got[3] == {"naive_daily": 1.0}
    assert got[4] == {"model": 1.0}
    # Errors in any units: the weights depend on their ratios only.
    big = serving.choose({k: v * 1e12 for k, v in errors.items()})
    assert big[0] == pytest.approx(got[0], abs=1e-6)
    assert all(sum(w.values()) == pytest.approx(1.0, abs=1e-5) for w in got)


def test_named_members_and_blends_serve_alike():
    """A version from before the blend names one member per series (mean_daily: the mean of
    the network and the daily naive); the same weights as a blend serve the same."""
    assert serving.weights_of("mean_daily") == {"model": 0.5, "naive_daily": 0.5}
    q = torch.tensor([[[1.0, 2.0, 4.0]], [[1.0, 2.0, 4.0]]])
    daily, weekly = torch.tensor([[10.0], [10.0]]), torch.tensor([[6.0], [6.0]])
    named = serving.serve(q, daily, weekly, ["mean_daily", "naive_weekly"])
    blend = serving.serve(
        q, daily, weekly, [{"model": 0.5, "naive_daily": 0.5}, {"naive_weekly": 1.0}]
    )
    assert torch.equal(named, blend)
    with pytest.raises(ValueError, match="unknown serving member"):
        serving.weights_of("mean_everything")


def test_a_member_unknown_at_a_step_leaves_its_weight_to_the_others():
    median = torch.tensor([[2.0, 2.0, 2.0]])
    daily = torch.tensor([[10.0, NAN, NAN]])
    weekly = torch.tensor([[6.0, 6.0, NAN]])
    entry = {"model": 0.5, "naive_daily": 0.25, "naive_weekly": 0.25}
    out = serving.served_point(median, daily, weekly, [entry])
    assert out[0].tolist() == pytest.approx([(1 + 2.5 + 1.5), (1 + 1.5) / 0.75, 2.0])
    # MSTL weighed but the version has no challenger: the rest share its weight.
    out = serving.served_point(median, daily, weekly, [{"mstl": 0.5, "naive_weekly": 0.5}])
    assert out[0].tolist() == pytest.approx([6.0, 6.0, 2.0])


def test_serve_moves_the_quantiles_to_the_members_median():
    q = torch.tensor([[[1.0, 2.0, 4.0]], [[1.0, 2.0, 4.0]], [[1.0, 2.0, 4.0]]])  # (3, 1, 3)
    daily = torch.tensor([[10.0], [10.0], [NAN]])
    weekly = torch.tensor([[6.0], [6.0], [6.0]])
    out = serving.serve(q, daily, weekly, ["model", "mean_daily", "naive_daily"])
    assert out[0].tolist() == [[1.0, 2.0, 4.0]]
    assert out[1].tolist() == [[5.0, 6.0, 8.0]]  # median (2 + 10) / 2 = 6
    assert out[2].tolist() == [[1.0, 2.0, 4.0]]  # the naive unknown: the network's


def test_a_trained_version_records_a_blend_per_series():
    """A series that repeats its week exactly is served mostly by the weekly naive when the
    network is kept from learning; the weights survive the checkpoint."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(8 * 168, dtype=torch.float32)
    week = 10 + 5 * torch.sin(2 * math.pi * t / 168) + 3 * (t % 168 > 100).float()
    values = torch.stack([week, 10 + torch.randn(t.numel(), generator=g)])
    panel = Panel(["weekly", "noise"], 1356998400, 3600, values)
    result = train(panel, TrainConfig(kind="gru", hidden=8, epochs=2, lr=1e-9, base="daily"))
    assert len(result.serving) == 2
    for weights in result.serving:
        assert set(weights) <= set(serving.BASE) and sum(weights.values()) == pytest.approx(1)
    assert max(result.serving[0], key=result.serving[0].get) == "naive_weekly", result.serving
    again = TrainedModel.from_checkpoint(trained_model(result).to_checkpoint())
    assert again.meta["serving"] == dict(zip(["weekly", "noise"], result.serving, strict=True))


def test_the_tracked_offset_follows_the_served_bands_misses():
    from forecaster.calibration import OFFSET_BOUNDS, shifted, tracked_offset

    assert tracked_offset(0.3, 0, 0, 24, 0.8) == 0.3  # nothing newly scored: carried as is
    assert tracked_offset(0.3, 24, 19, 24, 0.8) == pytest.approx(0.3 + (5 - 0.2 * 24) / 24)
    # One horizon of actuals, 40% missed instead of 20%: 0.2 widths wider.
    assert tracked_offset(0.0, 100, 60, 100, 0.8) == pytest.approx(0.2)
    assert tracked_offset(0.0, 300, 300, 100, 0.8) == pytest.approx(-0.6)  # 3 covered all
    assert tracked_offset(4.9, 10**6, 0, 100, 0.8) == OFFSET_BOUNDS[1]  # no wind-up
    assert shifted([0.1, -0.3], -0.4) == pytest.approx([-0.3, -0.5])  # never inside out


def _served_coverage(make_y, lower, upper, level=0.8, horizons=60, h=24, seed=0):
    """Closed loop of what the evaluate job and the API do each horizon: serve the raw band
    widened by each step's correction (holdout prior 0 blended with recent scores) plus the
    pooled offset, then score the actuals. Returns the coverage of what was served."""
    import random

    from forecaster.calibration import apply, band_score, blend, shifted, tracked_offset

    rng = random.Random(seed)
    scores: dict[int, list[float]] = {k: [] for k in range(h)}
    offset, n, n_in = 0.0, 0, 0
    for t in range(horizons):
        corr = shifted([blend(scores[k][-1000:], level, 0.0, 30) for k in range(h)], offset)
        inside = 0
        for k in range(h):
            y = make_y(t, k, rng)
            lo, hi = apply(
                torch.tensor(lower(k)),
                torch.tensor(upper(k)),
                torch.tensor((lower(k) + upper(k)) / 2),
                torch.tensor(corr[k]),
                floor=0.0,
            )
            inside += int(lo.item() <= y <= hi.item())
            scores[k].append(band_score(lower(k), upper(k), y))
        offset = tracked_offset(offset, h, inside, h, level)
        n, n_in = n + h, n_in + inside
    return n_in / n


def test_the_served_band_covers_its_level_where_per_step_quantiles_cannot():
    """Night-time zeros inside a zero-width band score 0 and sit at every quantile of a
    series whose daytime band is too wide: per-step conformal quantiles (and a level that
    adapts between 0.5 and 0.99, as before) leave the band covering ~95%. The tracked offset
    narrows the daytime band until what is served covers 80%."""

    def night_and_day(t, k, rng):
        return 0.0 if k < 12 else 10 + rng.gauss(0, 1)

    def lower(k):
        return 0.0 if k < 12 else 7.0  # 10 +- 3: about 99.7% of daytime actuals inside

    def upper(k):
        return 0.0 if k < 12 else 13.0

    assert 0.75 <= _served_coverage(night_and_day, lower, upper) <= 0.85


def test_the_served_band_comes_back_to_its_level_after_a_shift():
    """The series doubles its noise halfway: coverage of what is served stays near 80%."""

    def shifting(t, k, rng):
        return 10 + rng.gauss(0, 1 if t < 30 else 2)

    cover = _served_coverage(shifting, lambda k: 8.7, lambda k: 11.3, horizons=90)
    assert 0.75 <= cover <= 0.85, cover


# -- weights that follow the members' recent errors -------------------------------------------


def _members(model, daily, weekly=None):
    out = {"model": torch.tensor([model]), "naive_daily": torch.tensor([daily])}
    if weekly is not None:
        out["naive_weekly"] = torch.tensor([weekly])
    return out


def test_the_tracker_scores_each_point_once_against_the_forecast_pending_for_it():
    """A forecast stays pending until the points of its whole horizon have arrived; each
    arriving actual decays the sums by one point's forgetting and adds every member's
    absolute error where that member forecast it."""
    h, half = 3, 2.0
    d = 0.5 ** (1 / half)
    t = serving.new_trackers(1, h)
    t = serving.track(t, np.array([[1.0, 2.0]]), h, half)  # nothing pending: nothing scored
    assert t[0, 1:9].tolist() == [0.0] * 8
    t = serving.refresh(t, _members([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]), h)
    assert t[0, 0] == 0
    kept = serving.refresh(t, _members([9.0] * 3, [9.0] * 3), h)  # not consumed: kept
    assert np.array_equal(kept, t, equal_nan=True)
    t = serving.track(t, np.array([[1.0, NAN]]), h, half)  # a missing actual is consumed
    assert t[0, 0] == 2
    sums, counts = t[0, 1:5], t[0, 5:9]
    assert sums.tolist() == [0.0, 1.0, 0.0, 0.0]  # model exact, daily 1 off
    assert counts.tolist() == [1.0, 1.0, 0.0, 0.0]  # the weekly naive forecast nothing
    t = serving.track(t, np.array([[3.0, 5.0]]), h, half)  # only step 3 was still pending
    assert t[0, 0] == h
    assert t[0, 1:3].tolist() == pytest.approx([2.0, d * 1.0 + 3.0])
    assert t[0, 5:7].tolist() == pytest.approx([d + 1.0, d + 1.0])
    t = serving.refresh(t, _members([7.0] * 3, [8.0] * 3), h)  # consumed: the next one
    assert t[0, 0] == 0 and t[0, 9:12].tolist() == [7.0] * 3


def test_the_weights_start_from_the_holdout_and_follow_the_tracked_errors():
    """The holdout's MAE weighs as much as PRIOR_HALFLIVES half-lives of tracked points; the
    blended errors are weighed as at training (MAE ** -4)."""
    half = 24.0
    n0 = serving.PRIOR_HALFLIVES * half
    trackers = serving.new_trackers(3, 24)
    # Series 0: nothing tracked yet: the holdout's weights.
    # Series 1: n0 points tracked, the network 3 off on each, the daily naive 2: blended
    # MAEs (1 + 3) / 2 = 2 and (2 + 2) / 2 = 2, an even split.
    trackers[1, 1:3], trackers[1, 5:7] = [3 * n0, 2 * n0], [n0, n0]
    prior = {"model": 1.0, "naive_daily": 2.0}
    got = serving.adapted(
        [{"model": 0.9, "naive_daily": 0.1}] * 2 + ["naive_weekly"],
        trackers,
        [prior, prior, None],  # series 2: no holdout errors: its entry serves unchanged
        half,
    )
    assert isinstance(got, torch.Tensor) and got.shape == (3, len(serving.BASE))
    assert got[0].tolist() == pytest.approx([16 / 17, 1 / 17, 0.0, 0.0])
    assert got[1].tolist() == pytest.approx([0.5, 0.5, 0.0, 0.0])
    assert got[2].tolist() == [0.0, 0.0, 1.0, 0.0]
    # A version without holdout errors (or no trackers) serves its entries as they are.
    assert serving.adapted(["model"], None, [prior], half) == ["model"]
    assert serving.adapted(["model"], trackers[:1], [None], half) == ["model"]


def test_states_keep_their_trackers_and_older_states_still_load():
    from forecaster.inference import Joint, stack_states, state_from_rows, state_to_rows

    h = torch.randn(1, 2, 4)
    stat = np.random.default_rng(0).normal(size=(2, 5))
    blend = serving.new_trackers(2, 3)
    blend[1, 1] = 1.5
    rows, shape = state_to_rows(Joint(h, stat, blend))
    assert shape == [1, 1, 4, 5, serving.tracker_width(3)]
    back = state_from_rows(rows, shape, "gru")
    assert torch.equal(back.net, h)
    assert np.allclose(back.stat, stat, atol=1e-6)  # float32 on disk
    assert np.allclose(back.blend, blend, equal_nan=True)  # float32 on disk too
    rows, shape = state_to_rows(Joint(h, None, blend))  # no challenger
    back = state_from_rows(rows, shape, "gru")
    assert back.stat is None and np.allclose(back.blend, blend, equal_nan=True)
    # A state saved before the trackers (network and challenger only) loads without one;
    # batched with a tracked one, it starts with nothing tracked.
    old_rows, old_shape = state_to_rows(Joint(h[:, :1], stat[:1]))
    assert old_shape == [1, 1, 4, 5]
    old = state_from_rows(old_rows, old_shape, "gru")
    assert old.blend is None
    new = state_from_rows(*state_to_rows(Joint(h[:, 1:], stat[1:], blend[1:])), "gru")
    both = stack_states([old, new], 3)
    assert torch.equal(both.net, h)
    assert np.array_equal(both.blend[0], serving.new_trackers(1, 3)[0], equal_nan=True)
    assert both.blend[1, 1] == 1.5


def test_a_series_that_turns_into_its_daily_naive_is_served_by_it():
    """Fitted on noisy daily waves, then fed days that repeat the day before exactly: the
    daily naive's tracked error is zero, and within a few days it weighs the most. (The
    holdout's errors stay in the blend, weighing about as much as the tracked points, so
    a member is never judged on recent days alone.)"""
    from forecaster.api import Forecaster

    rng = np.random.default_rng(1)
    n = 36 * 24
    t = np.arange(n)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    v = 20 + 8 * np.sin(2 * np.pi * t / 24) + rng.normal(0, 2, n)
    ts = [start + timedelta(hours=int(i)) for i in t]
    fc = Forecaster("gru", horizon=24, hidden=8, epochs=3, challenger="none")
    fc.fit(pl.DataFrame({"series": "a", "ts": ts, "value": v}))
    before = fc.weights()
    assert "serving_errors" in fc.model.meta
    last_day = v[-24:]
    for day in range(4):
        nxt = [ts[-1] + timedelta(hours=int(i) + 1 + 24 * day) for i in range(24)]
        fc.update(pl.DataFrame({"series": "a", "ts": nxt, "value": last_day}))
    after = fc.weights()
    weight = dict(zip(after["member"], after["weight"], strict=True))
    was = dict(zip(before["member"], before["weight"], strict=True)).get("naive_daily", 0.0)
    assert weight["naive_daily"] > max(0.5, was + 0.1), (before, after)
    assert max(weight, key=weight.get) == "naive_daily"
    # The network forecasts the waves, about 1.6 off the noise of the repeated day (the
    # mean absolute value of N(0, 2)); served, the day itself weighs in.
    served = fc.forecast()["yhat"].to_numpy()
    assert np.abs(served - last_day).mean() < 0.6


def test_what_advance_tracks_does_not_depend_on_how_the_points_are_chunked():
    """The warm-up's chunks end at window edges; a window longer than the horizon holds a
    tracked origin from before the trackers start and one after. Whatever the window, the
    trackers (so the blend's weights) and the forecast are the same: the API (its TBPTT
    window) and predict (the series' window) serve alike."""
    from forecaster.api import Forecaster
    from forecaster.inference import advance

    rng = np.random.default_rng(2)
    n = 30 * 24
    t = np.arange(n)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    values = np.stack([20 + 8 * np.sin(2 * np.pi * (t + s) / 24) for s in (0, 5)])
    values = values + rng.normal(0, 1, values.shape)
    frame = pl.concat(
        pl.DataFrame(
            {"series": f"s{i}", "ts": [start + timedelta(hours=int(h)) for h in t], "value": row}
        )
        for i, row in enumerate(values)
    )
    trained = Forecaster("gru", horizon=24, hidden=8, epochs=2).fit(frame).model
    assert serving.tracks(trained)
    grid = torch.tensor(values, dtype=torch.float32)
    runs = [
        advance(
            trained,
            grid,
            int(start.timestamp()),
            n - 336,
            n,
            None,
            window_steps=window,
            scaler_rows=torch.tensor([0, 1]),
        )
        for window in (24, 7, 135, 1000)
    ]
    # Equal up to the order of floating-point sums (chunks group the trackers' sums
    # differently); a tracked origin skipped or counted twice moves them by a whole origin's
    # error.
    for run in runs[1:]:
        np.testing.assert_allclose(run.blend, runs[0].blend, rtol=1e-6, equal_nan=True)
        torch.testing.assert_close(run.quantiles, runs[0].quantiles, rtol=1e-6, atol=1e-6)
