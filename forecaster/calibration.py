"""Band calibration, shared by the evaluate job and the in-memory API.

A forecast's raw band [lower, upper] (its outer quantiles) is corrected per horizon step by
c band widths on each side: [lower - c * w, upper + c * w], w = upper - lower. The conformity
score of a scored forecast is how far the actual fell outside its raw band in widths of it
(negative inside), so scores pool series of any size. A model measures c on its training
holdout (forecaster.training.holdout_calibration) and serves it from its first forecast;
afterwards c blends that prior with the conformal quantile of recent scores, the prior
weighing as much as `prior_weight` scores: a small fleet is calibrated at once, a large one
soon follows what it sees. Under drift the quantile's level adapts (adaptive conformal
inference over a recent window): when the band served lately covered less than the level,
the next correction is taken at a higher one, and the reverse. That recent coverage is
pooled over the horizon steps (each forecast brings H actuals), so a fleet forecast once a
horizon adapts after a few forecasts; the quantiles themselves stay per step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# A band of near-zero width (a series flat at zero at night) turns any miss into a huge
# score; capped, such misses still count as misses without swamping the quantile.
BAND_SCORE_CAP = 50.0
PRIOR_WEIGHT = 30


def band_scores(lower: Tensor, upper: Tensor, actual: Tensor) -> Tensor:
    """How far each actual fell outside its band, in band widths (negative inside it)."""
    width = (upper - lower).clamp_min(1e-9)
    score = torch.maximum(lower - actual, actual - upper) / width
    return score.clamp(max=BAND_SCORE_CAP)


def band_score(lower: float, upper: float, actual: float) -> float:
    """band_scores for one forecast, on floats."""
    width = max(upper - lower, 1e-9)
    return min(max(lower - actual, actual - upper) / width, BAND_SCORE_CAP)


def conformal_quantile(scores: list[float], level: float) -> float:
    """The finite-sample conformal quantile of the scores for coverage `level`."""
    n = len(scores)
    rank = min(n, math.ceil((n + 1) * level))
    return sorted(scores)[rank - 1]


def adaptive_level(level: float, inside: list[bool], min_n: int = 20) -> float:
    """The level to take the conformal quantile at, so that coverage comes back to `level`
    under drift: adaptive conformal inference with its error sum over a recent window,
    level + (level - the share of recent actuals inside the band served), between 0.5 and
    0.99. Fewer than `min_n` recent actuals: `level` as it is."""
    if len(inside) < min_n:
        return level
    covered = sum(inside) / len(inside)
    return min(0.99, max(0.5, level + (level - covered)))


def blend(recent: list[float], level: float, prior: float | None, prior_weight: int) -> float:
    """The correction for one horizon step from its recent scores and the holdout prior."""
    if not recent:
        return 0.0 if prior is None else prior
    q = conformal_quantile(recent, level)
    if prior is None:
        return q
    n = len(recent)
    return (n * q + prior_weight * prior) / (n + prior_weight)


def apply(
    lower: Tensor, upper: Tensor, median: Tensor, corrections: Tensor, floor: float | None = None
) -> tuple[Tensor, Tensor]:
    """The served band: (..., H) raw bounds widened by corrections (H,) band widths each
    side, never past the median, and not below `floor` (0 for a nonnegative series)."""
    width = (upper - lower).clamp_min(0.0)
    lo = torch.minimum(median, lower - corrections * width)
    hi = torch.maximum(median, upper + corrections * width)
    if floor is not None:
        lo = lo.clamp_min(floor)
    return lo, hi
