"""What serves each series: the model, a seasonal naive, the statistical challenger (MSTL,
forecaster.stats), or the mean of the model and one of them.

No single forecaster wins everywhere: on smooth series with a strong weekly shape a
seasonal naive can beat the network, and the mean of the two can beat both. A trained
version therefore carries, per series, the member that had the lowest error on that
series' held-out tail (which the network's weights never learnt from, bar the epoch
choice), and serves it; the network stays the default, and a member must beat it by
MARGIN to be chosen, so noise on a short tail does not flip a series to a naive. The band
served keeps the network's raw quantiles' shape around the member's median, so the
calibration applies to it unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

MEMBERS = (
    "model",
    "naive_daily",
    "naive_weekly",
    "mean_daily",
    "mean_weekly",
    "mstl",
    "mean_mstl",
)
MARGIN = 0.02


def member_medians(
    median: Tensor, daily: Tensor, weekly: Tensor, stat: Tensor | None = None
) -> dict[str, Tensor]:
    """Each member's point forecast, (S, ...) like `median`; a naive unknown (NaN) where a
    season back is not stored; the MSTL members only where the version has a challenger."""
    out = {
        "model": median,
        "naive_daily": daily,
        "naive_weekly": weekly,
        "mean_daily": (median + daily) / 2,
        "mean_weekly": (median + weekly) / 2,
    }
    if stat is not None:
        out["mstl"] = stat
        out["mean_mstl"] = (median + stat) / 2
    return out


def choose(errors: dict[str, Tensor]) -> list[str]:
    """Per series, the member with the lowest mean absolute error (S,) (NaN: no score),
    the model unless another beats it by MARGIN."""
    base = errors["model"]
    out = []
    for i in range(base.shape[0]):
        best, best_err = "model", float(base[i])
        for name in MEMBERS[1:]:
            if name not in errors:
                continue
            err = float(errors[name][i])
            if (
                err == err
                and (best_err != best_err or err < best_err)
                and (err < float(base[i]) * (1 - MARGIN) or base[i] != base[i])
            ):
                best, best_err = name, err
        out.append(best)
    return out


def served_point(
    median: Tensor,
    daily: Tensor,
    weekly: Tensor,
    members: list[str],
    stat: Tensor | None = None,
) -> Tensor:
    """median (S, ...) of the network, naives and MSTL (S, ...) -> (S, ...) the point each
    series' member serves: the network's where the member is unknown at a step (or the
    version has no such member)."""
    medians = member_medians(median, daily, weekly, stat)
    out = median.clone()
    for i, name in enumerate(members):
        if name == "model" or name not in medians:
            continue
        point = medians[name][i]
        out[i] = torch.where(torch.isnan(point), median[i], point)
    return out


def serve(
    quantiles: Tensor,
    daily: Tensor,
    weekly: Tensor,
    members: list[str],
    stat: Tensor | None = None,
) -> Tensor:
    """quantiles (S, ..., Q) of the network, naives and MSTL (S, ...) -> (S, ..., Q) served:
    each series' quantiles moved by (its member's median - the network's), the network's
    where the member is unknown at a step (or the version has no such member)."""
    mid = quantiles.shape[-1] // 2
    point = served_point(quantiles[..., mid], daily, weekly, members, stat)
    shift = (point - quantiles[..., mid]).nan_to_num(0.0)
    return quantiles + shift.unsqueeze(-1)
