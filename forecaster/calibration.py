"""Band calibration, shared by the evaluate job and the in-memory API.

A forecast's raw band [lower, upper] (its outer quantiles) is corrected per horizon step by
c band widths on each side: [lower - c * w, upper + c * w], w = upper - lower. The conformity
score of a scored forecast is how far the actual fell outside its raw band in widths of it
(negative inside), so scores pool series of any size. A model measures c on its training
holdout (forecaster.training.holdout_calibration) and serves it from its first forecast;
afterwards each step's c blends that prior with the conformal quantile of recent scores, the
prior weighing as much as `prior_weight` scores: a small fleet is calibrated at once, a large
one soon follows what it sees.

Those per-step quantiles assume the recent scores look like the coming ones. When they do
not (drift, a holdout unlike the test period, a mass of ties such as night-time zeros
inside a zero-width band), the band served drifts off its level, so one pooled offset is
added to every step's c: online quantile tracking of the served band's misses, an integral
of (share of actuals outside the band - (1 - level)) per horizon of time, times a gain,
carried from one scoring to the next (the store keeps it between evaluate runs). While the
band misses too often it widens, while it covers too much it narrows, until the long-run
coverage of what was served is the level. The
offset is pooled over series and steps (each forecast brings H actuals, so a fleet of one
series adapts after a few forecasts) and is counted per horizon of time, so it moves as fast
for one series as for ten thousand, and whatever the prediction cadence.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# A band of near-zero width (a series flat at zero at night) turns any miss into a huge
# score; capped, such misses still count as misses without swamping the quantile.
BAND_SCORE_CAP = 50.0
PRIOR_WEIGHT = 30
# Online quantile tracking of the served band (tracked_offset): band widths per horizon of
# time per unit of excess miss rate. A horizon that misses 40% instead of 20% widens the next
# bands by 0.2 widths each side. Chosen on the accuracy bench's datasets (0.5 was slow on a
# one-series fleet, 2 overshot); the bounds stop wind-up on a series that no band can cover.
OFFSET_GAIN = 1.0
OFFSET_BOUNDS = (-1.0, 5.0)


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


def tracked_offset(
    previous: float, n_new: int, n_new_inside: int, per_horizon: float, level: float
) -> float:
    """The pooled offset (band widths) added to every step's correction, carried forward
    over newly scored actuals: n_new of them, n_new_inside inside the band served, where a
    horizon of time brings `per_horizon` actuals (series x steps x forecasts per target).
    previous + OFFSET_GAIN * (misses - (1 - level) * n_new) / per_horizon, within
    OFFSET_BOUNDS: an integral of the served band's excess miss rate per horizon."""
    if n_new <= 0 or per_horizon <= 0:
        return previous
    excess = (n_new - n_new_inside) - (1 - level) * n_new
    step = OFFSET_GAIN * excess / per_horizon
    return min(OFFSET_BOUNDS[1], max(OFFSET_BOUNDS[0], previous + step))


def shifted(corrections: list[float], offset: float) -> list[float]:
    """Each step's correction plus the pooled offset, never below -0.5 (a band of no width:
    a lower correction would only turn the band inside out)."""
    return [max(-0.5, c + offset) for c in corrections]


def blend(recent: list[float], level: float, prior: float | None, prior_weight: int) -> float:
    """The correction for one horizon step from its recent scores and the holdout prior."""
    if not recent:
        return 0.0 if prior is None else prior
    q = conformal_quantile(recent, level)
    if prior is None:
        return q
    n = len(recent)
    return (n * q + prior_weight * prior) / (n + prior_weight)


# The evaluate job keeps each horizon step's conformity scores as a histogram per day (its
# running aggregates, calibration_days). Bins are SCORE_BIN band widths wide from SCORE_LOW
# (no score is lower: an actual inside its band is at most half a width from an edge) up to
# SCORE_WIDE band widths, then a factor SCORE_RATIO wide up to BAND_SCORE_CAP (a step whose
# band misses by that much is off by far more than a bin anyway). A quantile read from them
# is the upper edge of the bin its rank falls in: at most a bin above the scores' own
# quantile, never below it.
SCORE_LOW = -0.5
SCORE_BIN = 0.01
SCORE_WIDE = 10.0
SCORE_RATIO = 1.001
SCORE_EDGES = np.concatenate(
    [
        SCORE_LOW + SCORE_BIN * np.arange(round((SCORE_WIDE - SCORE_LOW) / SCORE_BIN)),
        SCORE_WIDE
        * SCORE_RATIO
        ** np.arange(math.ceil(math.log(BAND_SCORE_CAP / SCORE_WIDE, SCORE_RATIO)) + 2),
    ]
)
SCORE_BINS = len(SCORE_EDGES) - 1


def score_histogram(scores: np.ndarray | list[float]) -> np.ndarray:
    """Counts of `scores` per bin (SCORE_BINS int64)."""
    values = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=BAND_SCORE_CAP)
    idx = np.clip(np.searchsorted(SCORE_EDGES, values, "right") - 1, 0, SCORE_BINS - 1)
    return np.bincount(idx, minlength=SCORE_BINS).astype(np.int64)


def pack_histogram(counts: np.ndarray) -> bytes:
    """A histogram as stored: its nonzero bins as little-endian int64 (bin, count) pairs."""
    nz = np.flatnonzero(counts)
    return np.stack([nz, counts[nz]], axis=1).astype("<i8").tobytes()


def unpack_histogram(blob: bytes) -> np.ndarray:
    """The SCORE_BINS counts pack_histogram stored."""
    pairs = np.frombuffer(blob, dtype="<i8").reshape(-1, 2)
    counts = np.zeros(SCORE_BINS, dtype=np.int64)
    np.add.at(counts, pairs[:, 0], pairs[:, 1])
    return counts


def histogram_quantile(counts: np.ndarray, level: float) -> float:
    """conformal_quantile of the scores a histogram counts, to a bin: the upper edge of the
    bin holding the ceil((n + 1) * level)-th smallest."""
    n = int(counts.sum())
    rank = min(n, math.ceil((n + 1) * level))
    b = int(np.searchsorted(np.cumsum(counts), rank))
    return float(SCORE_EDGES[b + 1])


def score_bin_width(score: float) -> float:
    """The width of the histogram bin a score falls in (the most histogram_quantile can
    exceed the exact quantile by)."""
    b = int(np.clip(np.searchsorted(SCORE_EDGES, score, "right") - 1, 0, SCORE_BINS - 1))
    return float(SCORE_EDGES[b + 1] - SCORE_EDGES[b])


def blend_histogram(
    counts: np.ndarray | None, level: float, prior: float | None, prior_weight: int
) -> float:
    """blend, from a histogram of the recent scores."""
    n = 0 if counts is None else int(counts.sum())
    if n == 0:
        return 0.0 if prior is None else prior
    q = histogram_quantile(counts, level)
    if prior is None:
        return q
    return (n * q + prior_weight * prior) / (n + prior_weight)


def served_band(
    lower: float, upper: float, median: float, correction: float, floor: float | None = None
) -> tuple[float, float]:
    """apply() for one forecast step, on floats: the band served from the raw one."""
    width = max(upper - lower, 0.0)
    lo = min(median, lower - correction * width)
    hi = max(median, upper + correction * width)
    return (lo if floor is None else max(floor, lo)), hi


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
