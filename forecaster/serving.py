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
"""

from __future__ import annotations

import math
from collections.abc import Mapping

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
    members: list[Entry],
    stat: Tensor | None = None,
) -> Tensor:
    """median (S, ...) of the network, naives and MSTL (S, ...) -> (S, ...) the point each
    series' entry serves: its members' weighted mean over those known at each step (the
    network's where none is)."""
    medians = member_medians(median, daily, weekly, stat)
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
    members: list[Entry],
    stat: Tensor | None = None,
) -> Tensor:
    """quantiles (S, ..., Q) of the network, naives and MSTL (S, ...) -> (S, ..., Q) served:
    each series' quantiles moved by (its blended median - the network's)."""
    mid = quantiles.shape[-1] // 2
    point = served_point(quantiles[..., mid], daily, weekly, members, stat)
    shift = (point - quantiles[..., mid]).nan_to_num(0.0)
    return quantiles + shift.unsqueeze(-1)
