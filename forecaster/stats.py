"""The statistical challenger: MSTL fitted by statsforecast, then updated as a state.

statsforecast's MSTL splits a series into a trend, one seasonal component per season (STL,
loess) and a remainder, forecasts trend + remainder with an exponential-smoothing model
(ETS, additive error, no / linear / damped trend, chosen by AICc) and each seasonal
component by repeating its last cycle. Refitting it at every forecast costs a decomposition
of the whole trailing window (0.3-4 s a series); re-applying a fitted one (`forward`) costs
the same. Here it is fitted once, at training time, and what its forecast needs is kept as
a small per-series state, advanced over new points only, like the network's:

- level and trend of the ETS recursion on the deseasonalised series, with the smoothing
  parameters (alpha, beta, phi) the fit chose;
- a smooth level: a one-day exponential average of the deseasonalised series, what STL's
  trend is to its seasonal components;
- one seasonal profile per season (its component's last cycle at the fit), indexed by the
  step's position on the epoch grid. At each new point each season's value for that slot
  moves `gamma` of the way towards what the point says it is: the point less the smooth
  level and the other seasons. So the shape follows the data between retrains as a refit's
  decomposition would.

The profiles are corrected against the smooth level, not against the ETS level: the fit's
alpha is often near 1 (the level follows every point), and a Holt-Winters correction by the
one-step error then leaves the seasonal shape where the fit left it (the level absorbs the
error). Kept as a state that way, MSTL lost to its own refit by 40-75% on smooth series
(half-hourly demand, hourly temperatures: 0.26 against 0.15, 1.39 against 1.02 MASE); with
the smooth level it is level with the refit on the first and ahead on the second (0.15,
0.93), and within 10% of the refit on each of the accuracy bench's eight datasets.

A forecast from step g is `level + (phi + ... + phi^h) * trend + the profiles at g + h`.
Cost: O(new points) to update, O(H) to forecast, per series. The state is a float32 row
(level, trend, smooth level, the profiles) stored beside the network's state, so snapshots,
rewinds after late data and exactly-once commits cover it as they cover the network. A
version fitted before the smooth level (its params carry no smooth_rate) keeps its row
layout and its update, the Holt-Winters correction by the one-step error.

`gamma` is chosen per series from GAMMAS on held-out data (the early-stopping tail), and a
missing point (NaN) advances the recursion without correcting it.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import numpy as np

# The model name of the challenger's own forecasts, stored beside the version's served ones
# (model_version_id NULL, as for the baselines), and of its accuracy and band coverage.
MODEL = "mstl"
# Seasons longer than this are left out of the decomposition: STL on a 2016-step week
# (5-minute data) costs tens of seconds a series. The network keeps them.
MAX_SEASON = 1000
GAMMAS = (0.0, 0.05, 0.1, 0.2, 0.4)
FIT_WEEKS = 8  # the trailing window the decomposition and ETS are fitted on


@dataclass
class StatParams:
    """Per-series parameters ((S,) or (S, k) for k seasons) and the seasons in use."""

    seasons: tuple[int, ...]
    alpha: np.ndarray
    beta: np.ndarray
    phi: np.ndarray
    gamma: np.ndarray  # (S, k): each season's profile correction rate
    # The smooth level's rate per step (1 / the daily season); None: a version fitted before
    # the smooth level, whose rows hold no smooth level and whose update is Holt-Winters'.
    smooth_rate: float | None = None

    @property
    def base(self) -> int:
        """Floats in a state row before the profiles: level, trend (and the smooth level)."""
        return 2 if self.smooth_rate is None else 3

    @property
    def width(self) -> int:
        """Floats in one series' state row: level, trend, smooth level, each profile."""
        return self.base + sum(self.seasons)

    def to_dict(self) -> dict:
        out = {
            "seasons": list(self.seasons),
            **{
                k: getattr(self, k).astype(float).tolist()
                for k in ("alpha", "beta", "phi", "gamma")
            },
        }
        if self.smooth_rate is not None:
            out["smooth_rate"] = float(self.smooth_rate)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> StatParams:
        seasons = tuple(int(s) for s in d["seasons"])
        gamma = np.asarray(d["gamma"], dtype=np.float64).reshape(-1, len(seasons))
        return cls(
            seasons=seasons,
            gamma=gamma,
            smooth_rate=d.get("smooth_rate"),
            **{k: np.asarray(d[k], dtype=np.float64) for k in ("alpha", "beta", "phi")},
        )

    def take(self, rows: np.ndarray) -> StatParams:
        """The parameters of the series at `rows`, in that order."""
        return StatParams(
            self.seasons,
            self.alpha[rows],
            self.beta[rows],
            self.phi[rows],
            self.gamma[rows],
            self.smooth_rate,
        )

    def offsets(self) -> list[int]:
        """Where each season's profile starts in a state row."""
        out, at = [], self.base
        for s in self.seasons:
            out.append(at)
            at += s
        return out


def seasons_kept(day: int, week: int, length: int) -> tuple[int, ...]:
    """The seasons the decomposition uses for a fit window of `length` steps: those of at
    most MAX_SEASON steps with two whole cycles in the window."""
    return tuple(s for s in sorted({day, week}) if 1 < s <= MAX_SEASON and 2 * s <= length)


def fit(
    values: np.ndarray,
    first: np.ndarray,
    end: np.ndarray,
    start_step: int,
    day: int,
    week: int,
    only: tuple[int, ...] | None = None,
) -> tuple[StatParams, np.ndarray]:
    """Fit MSTL per series on values[i, max(first, end - FIT_WEEKS weeks):end[i]] (raw units,
    NaN = missing, interpolated for the fit). `start_step` is grid index 0's position on the
    epoch grid (epoch seconds // step). Returns the parameters and the state (S, width) after
    each series' step end[i] - 1, with gammas 0 (choose_gamma sets them). `only`: the seasons
    to use, of those seasons_kept allows (default: all of them)."""
    from statsforecast.models import AutoETS
    from statsforecast.mstl import mstl

    n_series = values.shape[0]
    lengths = [int(e - max(f, e - FIT_WEEKS * week)) for f, e in zip(first, end, strict=True)]
    seasons = seasons_kept(day, week, min(lengths))
    if only is not None:
        seasons = tuple(s for s in seasons if s in only)
    params = StatParams(
        seasons,
        np.zeros(n_series),
        np.zeros(n_series),
        np.ones(n_series),
        np.zeros((n_series, len(seasons))),
        smooth_rate=1.0 / max(day, 1),
    )
    state = np.zeros((n_series, params.width))
    for i in range(n_series):
        lo, hi = int(end[i]) - lengths[i], int(end[i])
        y = _interpolate(values[i, lo:hi].astype(np.float64))
        components = []
        if seasons:
            parts = mstl(y, list(seasons))
            names = [c for c in parts.columns if c.startswith("seasonal")]
            components = [parts[c].to_numpy() for c in names]
        deseason = y - sum(components) if components else y
        model = AutoETS(model="AZN").fit(deseason).model_
        par, kind = model["par"], model["components"]
        has_trend, damped = kind[1] != "N", kind[3] == "D"
        params.alpha[i] = par[0]
        params.beta[i] = par[1] if has_trend else 0.0
        params.phi[i] = par[3] if damped else 1.0
        last = model["states"][-1]
        state[i, 0] = last[0]
        state[i, 1] = last[1] if has_trend else 0.0
        state[i, 2] = last[0]  # the smooth level starts at the ETS level
        # Each season's profile: its component's last cycle, by position on the epoch grid.
        for at, period, comp in zip(params.offsets(), seasons, components, strict=True):
            steps = start_step + np.arange(hi - period, hi)
            state[i, at + steps % period] = comp[-period:]
    return params, state


def _interpolate(y: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(y)
    if ok.all():
        return y
    idx = np.arange(len(y))
    return np.interp(idx, idx[ok], y[ok])


def forecast(params: StatParams, state: np.ndarray, step, horizon: int) -> np.ndarray:
    """(S, H) point forecasts from `state` after epoch-grid step `step` (an int, or (S,))."""
    h = np.arange(1, horizon + 1)[None, :]
    phi = params.phi[:, None]
    flat = np.isclose(phi, 1.0)
    # phi + phi^2 + ... + phi^h (h where phi is 1)
    damp = np.where(flat, h, phi * (1 - phi**h) / np.where(flat, 1.0, 1 - phi))
    out = state[:, :1] + damp * state[:, 1:2]
    targets = np.asarray(step).reshape(-1, 1) + h  # (1 or S, H)
    for at, period in zip(params.offsets(), params.seasons, strict=True):
        idx = np.broadcast_to(at + targets % period, out.shape)
        out = out + np.take_along_axis(state, idx, 1)
    return out


def update(
    params: StatParams,
    state: np.ndarray,
    values: np.ndarray,
    first_step: int,
    horizon: int = 0,
    *,
    active_from: np.ndarray | None = None,
    active_to: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Advance `state` (S, width; not modified) over values (S, T), the points at epoch-grid
    steps first_step .. first_step + T - 1, each series only at the steps within its own
    [active_from, active_to] (its state already holds the earlier ones; it stops after its
    last). Returns the new state and, if `horizon`, the forecast (S, T, H) from after each
    of those steps (NaN before active_from - 1: the state holds later points there)."""
    state = state.astype(np.float64, copy=True)
    n_series, n_steps = values.shape
    rows = np.arange(n_series)
    out = np.empty((n_series, n_steps, horizon)) if horizon else None
    offsets = params.offsets()
    lo = np.full(n_series, -np.inf) if active_from is None else np.asarray(active_from)
    hi = np.full(n_series, np.inf) if active_to is None else np.asarray(active_to)
    for t in range(n_steps):
        g = first_step + t
        act = (g >= lo) & (g <= hi)
        cols = [at + g % period for at, period in zip(offsets, params.seasons, strict=True)]
        season = sum((state[rows, c] for c in cols), np.zeros(n_series))
        fitted = state[:, 0] + params.phi * state[:, 1]
        y = values[:, t]
        seen = ~np.isnan(y) & act
        err = np.where(seen, y - season - fitted, 0.0)
        state[:, 0] = np.where(act, fitted + params.alpha * err, state[:, 0])
        state[:, 1] = np.where(act, params.phi * state[:, 1] + params.beta * err, state[:, 1])
        if params.smooth_rate is None:  # a version from before the smooth level
            for j, c in enumerate(cols):
                state[rows, c] += params.gamma[:, j] * err
        else:
            y0 = np.where(seen, y, 0.0)
            smooth = state[:, 2]
            own = [state[rows, c] for c in cols]  # each season's value before this point
            state[:, 2] = np.where(
                seen, smooth + params.smooth_rate * (y0 - season - smooth), smooth
            )
            for j, c in enumerate(cols):
                # What the point says season j is: itself less the smooth level and the others.
                target = y0 - state[:, 2] - (season - own[j])
                moved = own[j] + params.gamma[:, j] * (target - own[j])
                state[rows, c] = np.where(seen, moved, own[j])
        if out is not None:
            out[:, t] = forecast(params, state, g, horizon)
            out[g < lo - 1, t] = np.nan
    return state, out


def choose_gamma(
    params: StatParams,
    state: np.ndarray,
    values: np.ndarray,
    first_step: int,
    horizon: int,
    *,
    active_from: np.ndarray | None = None,
) -> np.ndarray:
    """Per series, the gammas (one per season, each from GAMMAS) whose forecasts over
    values (S, T) (held-out points after each series' fit, NaN past what may be read) have
    the lowest mean absolute error; all the combinations run as one batch."""
    n_series, n_steps = values.shape
    k = len(params.seasons)
    if not k or n_steps <= horizon:
        return np.zeros((n_series, k))
    grid = np.array(list(itertools.product(GAMMAS, repeat=k)))  # (G, k)
    n_grid = len(grid)
    rep = np.repeat(np.arange(n_series), n_grid)  # the series of each trial row
    trial = StatParams(
        params.seasons,
        params.alpha[rep],
        params.beta[rep],
        params.phi[rep],
        np.tile(grid, (n_series, 1)),
        params.smooth_rate,
    )
    _, pred = update(
        trial,
        state[rep],
        values[rep],
        first_step,
        horizon,
        active_from=None if active_from is None else np.asarray(active_from)[rep],
    )
    actual = np.stack([values[rep, h : n_steps - horizon + h] for h in range(1, horizon + 1)], -1)
    err = np.abs(pred[:, : n_steps - horizon] - actual)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a row with no scored point: NaN
        mae = np.nanmean(err.reshape(len(rep), -1), axis=1).reshape(n_series, n_grid)
    # No scored point: gamma 0 (the grid's first row).
    mae = np.where(np.isnan(mae), np.inf, mae)
    return grid[np.argmin(mae, axis=1)]
