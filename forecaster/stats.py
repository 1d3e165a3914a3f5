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
- one seasonal profile of the longest season's length P (the seasons summed, each repeated
  from its last cycle), indexed by the step's position on the epoch grid, and corrected at
  each new point by `gamma` times the one-step error (the Holt-Winters update), so the
  shape follows the data between retrains.

A forecast from step g is `level + (phi + ... + phi^h) * trend + profile[(g + h) mod P]`.
Cost: O(new points) to update, O(H) to forecast, per series. The state is a float32 row
(level, trend, P profile values) stored beside the network's state, so snapshots, rewinds
after late data and exactly-once commits cover it as they cover the network.

`gamma` is chosen per series from GAMMAS on held-out data (the early-stopping tail), and a
missing point (NaN) advances the recursion without correcting it.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import numpy as np

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
    gamma: np.ndarray  # (S, k): each season's profile correction per unit of one-step error

    @property
    def width(self) -> int:
        """Floats in one series' state row: level, trend, then each season's profile."""
        return 2 + sum(self.seasons)

    def to_dict(self) -> dict:
        return {
            "seasons": list(self.seasons),
            **{
                k: getattr(self, k).astype(float).tolist()
                for k in ("alpha", "beta", "phi", "gamma")
            },
        }

    @classmethod
    def from_dict(cls, d: dict) -> StatParams:
        seasons = tuple(int(s) for s in d["seasons"])
        gamma = np.asarray(d["gamma"], dtype=np.float64).reshape(-1, len(seasons))
        return cls(
            seasons=seasons,
            gamma=gamma,
            **{k: np.asarray(d[k], dtype=np.float64) for k in ("alpha", "beta", "phi")},
        )

    def take(self, rows: np.ndarray) -> StatParams:
        """The parameters of the series at `rows`, in that order."""
        return StatParams(
            self.seasons, self.alpha[rows], self.beta[rows], self.phi[rows], self.gamma[rows]
        )

    def offsets(self) -> list[int]:
        """Where each season's profile starts in a state row."""
        out, at = [], 2
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
) -> tuple[StatParams, np.ndarray]:
    """Fit MSTL per series on values[i, max(first, end - FIT_WEEKS weeks):end[i]] (raw units,
    NaN = missing, interpolated for the fit). `start_step` is grid index 0's position on the
    epoch grid (epoch seconds // step). Returns the parameters and the state (S, width) after
    each series' step end[i] - 1, with gammas 0 (choose_gamma sets them)."""
    from statsforecast.models import AutoETS
    from statsforecast.mstl import mstl

    n_series = values.shape[0]
    lengths = [int(e - max(f, e - FIT_WEEKS * week)) for f, e in zip(first, end, strict=True)]
    seasons = seasons_kept(day, week, min(lengths))
    params = StatParams(
        seasons,
        np.zeros(n_series),
        np.zeros(n_series),
        np.ones(n_series),
        np.zeros((n_series, len(seasons))),
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
        err = np.where(np.isnan(y) | ~act, 0.0, y - season - fitted)
        state[:, 0] = np.where(act, fitted + params.alpha * err, state[:, 0])
        state[:, 1] = np.where(act, params.phi * state[:, 1] + params.beta * err, state[:, 1])
        for j, c in enumerate(cols):
            state[rows, c] += params.gamma[:, j] * err
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
