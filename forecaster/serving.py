"""What serves each series: a blend of the network, the two seasonal naives and the
statistical challenger (MSTL, forecaster.stats), weighted by how each did on that series'
held-out tails.

No single forecaster wins everywhere: on smooth series with a strong weekly shape a
seasonal naive can beat the network, MSTL can beat both on a series with steady seasons,
and a mix can beat every member. Picking the one member with the lowest error on a short
tail is a gamble that a short history loses often (on three weeks of data the member that
won the tail was the worst of four on the next four weeks of one business-hours set). So a
trained version carries, per series, weights for the members, proportional to the inverse
of the fourth power of each member's mean absolute error on that series' held-out tails
(which the network's weights never learnt from, bar the epoch choice): a member twice as
accurate weighs 16 times as much, so a clear winner serves almost alone and near-equals
share. (Powers 3 to 6 measured alike on bench/accuracy.py's eight datasets; 1 and 2 leave
too much weight on a poor member; docs/architecture.md, decision 20.)

A series' entry in a version's "serving" is those weights ({member: weight}, summing to 1)
or, from versions before the blend and in tests, one named member of MEMBERS (the mean_*
ones: the mean of the network and that member). Where a member is unknown at a step (a
naive with no season back stored, a version with no challenger) the others share its
weight. The band served keeps the network's raw quantiles' shape around the blended median,
so the calibration applies to it unchanged.

The holdout's weights are where a series starts, not where it stays: a few days of held-out
tail rank members by chance on a short history, and the member that serves a series best
changes with the season. So each series' saved state carries a tracker of its members'
recent errors (`track`, `refresh`): every member's forecast from an origin is kept until
the points of its whole horizon have arrived, each arriving point scores every member's
forecast for it (so the errors span all horizon steps, whether predict runs once a horizon
or at every point), and the absolute errors are summed with exponential forgetting, a
half-life of a day of steps (at least HALFLIFE_MIN_POINTS points). Weights are then chosen
as at training, on each member's error blended from the holdout's MAE, weighing as much as
PRIOR_HALFLIVES half-lives of points, and the tracked mean (`adapted`). The tracker is part
of the state, so it advances, is saved, restored and replayed with it: O(new points), and a
restart or a late point gives the same weights as an uninterrupted run. (Measured on
bench/accuracy.py's eight datasets, replaying their members' forecasts: geometric mean MASE
-2.4% with full histories, -4.6% with three weeks, half-hourly demand with two weeks from
30% behind the weekly naive to level with it; docs/architecture.md, decision 21.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

# What a blend weighs, in this order.
BASE = ("model", "naive_daily", "naive_weekly", "mstl")
# Named members (versions before the blend): their weights over BASE.
MEMBERS: dict[str, dict[str, float]] = {
    "model": {"model": 1.0},
    "naive_daily": {"naive_daily": 1.0},
    "naive_weekly": {"naive_weekly": 1.0},
    "mean_daily": {"model": 0.5, "naive_daily": 0.5},
    "mean_weekly": {"model": 0.5, "naive_weekly": 0.5},
    "mstl": {"mstl": 1.0},
    "mean_mstl": {"model": 0.5, "mstl": 0.5},
}
POWER = 4  # weights proportional to MAE ** -POWER

Entry = str | Mapping[str, float]


def weights_of(entry: Entry) -> dict[str, float]:
    """A series' serving entry as weights over BASE (a named member, or weights already)."""
    if isinstance(entry, str):
        if entry not in MEMBERS:
            raise ValueError(f"unknown serving member {entry!r} (one of {sorted(MEMBERS)})")
        return dict(MEMBERS[entry])
    unknown = set(entry) - set(BASE)
    if unknown:
        raise ValueError(f"serving weights for unknown members {sorted(unknown)}")
    return {k: float(v) for k, v in entry.items() if v > 0}


def member_medians(
    median: Tensor, daily: Tensor, weekly: Tensor, stat: Tensor | None = None
) -> dict[str, Tensor]:
    """Each member's point forecast, (S, ...) like `median`; a naive unknown (NaN) where a
    season back is not stored; MSTL only where the version has a challenger."""
    out = {"model": median, "naive_daily": daily, "naive_weekly": weekly}
    if stat is not None:
        out["mstl"] = stat
    return out


def choose(errors: Mapping[str, Tensor], power: int = POWER) -> list[dict[str, float]]:
    """What serves each series, from its members' mean absolute errors on the held-out
    tails (each (S,), NaN: not scored): weights over the members proportional to
    MAE ** -power; a member with no error at all takes it all; a series with no score for
    any member is served by the network."""
    names = [m for m in BASE if m in errors]
    err = torch.stack([errors[m].double() for m in names], dim=1)  # (S, M)
    out = []
    for row in err.tolist():
        scored = {m: e for m, e in zip(names, row, strict=True) if not math.isnan(e)}
        if not scored:
            out.append({"model": 1.0})
            continue
        exact = [m for m, e in scored.items() if e <= 0]
        if exact:
            out.append({m: 1.0 / len(exact) for m in exact})
            continue
        best = min(scored.values())  # relative errors: no overflow for tiny or huge units
        raw = {m: (best / e) ** power for m, e in scored.items()}
        total = sum(raw.values())
        out.append({m: round(w / total, 6) for m, w in raw.items() if w / total >= 1e-6})
    return out


def served_point(
    median: Tensor,
    daily: Tensor,
    weekly: Tensor,
    members: list[Entry] | Tensor,
    stat: Tensor | None = None,
) -> Tensor:
    """median (S, ...) of the network, naives and MSTL (S, ...) -> (S, ...) the point each
    series' entry serves: its members' weighted mean over those known at each step (the
    network's where none is)."""
    medians = member_medians(median, daily, weekly, stat)
    if isinstance(members, Tensor):  # weights over BASE already (S, M): `adapted`
        weights = members.to(median.dtype)
    else:
        rows = []
        for entry in members:
            found = weights_of(entry)
            rows.append([found.get(name, 0.0) for name in BASE])
        weights = torch.tensor(rows, dtype=median.dtype).reshape(len(members), len(BASE))
    if bool((weights[:, 0] == 1).all()):
        return median.clone()  # the network serves every series
    nan = torch.full_like(median, float("nan"))
    points = torch.stack([medians.get(name, nan) for name in BASE], dim=-1)  # (S, ..., M)
    w = weights.view(weights.shape[0], *([1] * (median.dim() - 1)), len(BASE))
    known = ~torch.isnan(points)
    mass = (known.to(median.dtype) * w).sum(-1)
    total = (points.nan_to_num(0.0) * w).sum(-1)
    return torch.where(mass > 0, total / mass.clamp_min(1e-12), median)


def serve(
    quantiles: Tensor,
    daily: Tensor,
    weekly: Tensor,
    members: list[Entry] | Tensor,
    stat: Tensor | None = None,
) -> Tensor:
    """quantiles (S, ..., Q) of the network, naives and MSTL (S, ...) -> (S, ..., Q) served:
    each series' quantiles moved by (its blended median - the network's)."""
    mid = quantiles.shape[-1] // 2
    point = served_point(quantiles[..., mid], daily, weekly, members, stat)
    shift = (point - quantiles[..., mid]).nan_to_num(0.0)
    return quantiles + shift.unsqueeze(-1)


# -- weights that follow the members' recent errors -------------------------------------------

HALFLIFE_MIN_POINTS = 24  # the errors' half-life: a day of steps, and at least this many points
PRIOR_HALFLIVES = 2.0  # the holdout's MAE weighs as much as this many half-lives of points
_M = len(BASE)


def tracks(trained: Any) -> bool:
    """Whether a trained version's blend follows tracked errors: it carries the holdout
    errors they start from (versions before the trackers do not)."""
    return bool(trained.meta.get("serving_errors"))


def weight_rows(served: Tensor | Sequence[Entry]) -> list[dict[str, float]]:
    """Weights as `adapted` or a version's entries give them -> per series {member: weight},
    members without weight left out."""
    if isinstance(served, Tensor):
        rows = [dict(zip(BASE, r, strict=True)) for r in served.tolist()]
    else:
        rows = [weights_of(e) for e in served]
    return [{m: round(w, 6) for m, w in r.items() if w >= 1e-6} for r in rows]


def halflife(season_day: int) -> float:
    """Points after which a tracked error counts half (a day of steps, at least 24)."""
    return float(max(season_day, HALFLIFE_MIN_POINTS))


def tracker_width(horizon: int) -> int:
    """Floats per series: steps consumed of the pending forecasts, the decayed sums of
    absolute errors and of counts per member, then the pending forecasts (member-major)."""
    return 1 + 2 * _M + _M * horizon


def new_trackers(n: int, horizon: int) -> np.ndarray:
    """Trackers with nothing scored and nothing pending (n, width), float64."""
    out = np.zeros((n, tracker_width(horizon)))
    out[:, 0] = horizon
    out[:, 1 + 2 * _M :] = np.nan
    return out


def track(trackers: np.ndarray, actual: np.ndarray, horizon: int, half: float) -> np.ndarray:
    """Score the pending forecasts against the next grid steps' actuals (S, n), NaN where
    none arrived: the steps still pending are consumed, each actual decays the sums by one
    point's forgetting and adds each member's absolute error where that member forecast it.
    Returns the updated trackers (a copy)."""
    out = trackers.copy()
    n = min(actual.shape[1], horizon)
    if n == 0:
        return out
    decay = 0.5 ** (1.0 / half)
    rows = np.arange(len(out))
    pending = out[:, 1 + 2 * _M :].reshape(len(out), _M, horizon)
    sums, counts = out[:, 1 : 1 + _M], out[:, 1 + _M : 1 + 2 * _M]  # views into out
    done = out[:, 0].astype(np.int64)
    for t in range(n):
        col = done + t
        y = actual[:, t].astype(np.float64)
        valid = (col < horizon) & ~np.isnan(y)
        points = pending[rows, :, np.minimum(col, horizon - 1)]  # (S, M)
        known = ~np.isnan(points) & valid[:, None]
        sums[valid] *= decay
        counts[valid] *= decay
        sums += np.where(known, np.abs(np.nan_to_num(points) - np.nan_to_num(y)[:, None]), 0.0)
        counts += known
    out[:, 0] = np.minimum(done + actual.shape[1], horizon)
    return out


def refresh(trackers: np.ndarray, points: Mapping[str, Tensor], horizon: int) -> np.ndarray:
    """Where the pending forecasts are all consumed, keep the members' forecasts from this
    origin (each (S, H), NaN where a member has none) as the next pending ones."""
    out = trackers.copy()
    nan = np.full((len(out), horizon), np.nan)
    stacked = np.stack(
        [points[m].double().cpu().numpy() if m in points else nan for m in BASE], axis=1
    )  # (S, M, H)
    due = out[:, 0] >= horizon
    out[due, 1 + 2 * _M :] = stacked[due].reshape(-1, _M * horizon)
    out[due, 0] = 0
    return out


def adapted(
    entries: Sequence[Entry],
    trackers: np.ndarray | None,
    priors: Sequence[Mapping[str, float] | None],
    half: float,
    power: int = POWER,
) -> Tensor | list[Entry]:
    """Each series' weights over BASE (S, M): from its members' holdout MAE (`priors`; None
    or empty: no holdout errors, its entry serves unchanged) blended with their tracked
    errors, weighed as `choose` weighs errors. No trackers: the entries unchanged."""
    if trackers is None or not any(priors):
        return list(entries)
    prior = np.array(
        [[np.nan if not p or p.get(m) is None else float(p[m]) for m in BASE] for p in priors]
    )
    prior[~np.isfinite(prior)] = np.nan
    n0 = PRIOR_HALFLIVES * half
    err = (n0 * prior + trackers[:, 1 : 1 + _M]) / (n0 + trackers[:, 1 + _M : 1 + 2 * _M])
    has = ~np.isnan(err).all(axis=1)
    best = np.where(has, np.nanmin(np.where(has[:, None], err, 0.0), axis=1), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.where(err <= 0, 1.0, 0.0)  # members without error take it all
        exact = (raw > 0).any(axis=1)
        ratio = np.where(np.isnan(err), 0.0, (best[:, None] / err) ** power)
    weights = np.where(exact[:, None], raw, np.nan_to_num(ratio, posinf=0.0))
    weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-300)
    if not has.all():  # series without holdout errors: their entries as they are
        static = [weights_of(e) for i, e in enumerate(entries) if not has[i]]
        weights[~has] = [[w.get(m, 0.0) for m in BASE] for w in static]
    return torch.from_numpy(weights)


def served_weights(trained: Any, names: Sequence[str], trackers: np.ndarray | None) -> Any:
    """What serves each of `names` under a trained version (forecaster.trained.TrainedModel):
    its blend chosen on the holdout, moved by the members' tracked errors where the version
    carries its holdout errors (`adapted`)."""
    chosen = trained.meta.get("serving") or {}
    entries = [chosen.get(name, "model") for name in names]
    errors = trained.meta.get("serving_errors") or {}
    priors = [errors.get(name) for name in names]
    return adapted(entries, trackers, priors, halflife(trained.spec.season_day))
