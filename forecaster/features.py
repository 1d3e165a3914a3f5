"""What the networks read, built from a panel of series on one regular grid.

Shared by training and inference so both compute the very same inputs. Arrays are torch
tensors; index 0 of the grid is at `start` (epoch seconds) and step i at start + i * freq.

Per time step t (the model's input x):
    value (scaled, 0 where missing), observed flag, [sin/cos hour of day, sin/cos day of
    week], [exogenous columns]
Per origin t and horizon step h = 1..H (the head's input head_x), all known at t:
    daily seasonal naive  y[t + h - m * ceil(h / m)],
    weekly seasonal naive y[t + h - w * ceil(h / w)],
    the daily one a day earlier, the weekly one one and two weeks earlier,
    [calendar of the target time t + h]
with m steps per day and w per week (DESIGN.md decision 16). Unknown lags read 0, the
scaled series' median.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

DAY, WEEK = 86400, 7 * 86400


@dataclass(frozen=True, kw_only=True)
class FeatureSpec:
    freq_seconds: int
    horizon: int = 24
    base: Literal["daily", "weekly"] = "weekly"  # the seasonal naive the head is a residual on
    calendar: bool = True
    n_exog: int = 0
    # (short, long) seasonal periods in steps; None: a day and a week of `freq_seconds`.
    # Business hours with clock gaps, say, give (8, 40): eight open hours make a day and
    # five days a week, where the clock would say 24 and 168.
    seasons: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.seasons is not None:
            short, long = (int(x) for x in self.seasons)
            if short < 1 or long < short:
                raise ValueError(
                    f"seasons must be (short, long) periods in steps with 1 <= short <= long, "
                    f"got {tuple(self.seasons)}"
                )
            object.__setattr__(self, "seasons", (short, long))

    @property
    def season_day(self) -> int:
        if self.seasons is not None:
            return self.seasons[0]
        return max(1, DAY // self.freq_seconds)

    @property
    def season_week(self) -> int:
        if self.seasons is not None:
            return self.seasons[1]
        return max(1, WEEK // self.freq_seconds)

    @property
    def n_inputs(self) -> int:
        return 2 + (4 if self.calendar else 0) + self.n_exog

    @property
    def n_head_features(self) -> int:
        return 5 + (4 if self.calendar else 0)

    @property
    def base_feature(self) -> int:
        return 0 if self.base == "daily" else 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calendar(epoch_seconds: Tensor) -> Tensor:
    """(...,) epoch seconds -> (..., 4): sin/cos of the hour of day and of the day of week."""
    day_phase = (epoch_seconds % DAY).double() / DAY
    week_phase = ((epoch_seconds + 3 * DAY) % WEEK).double() / WEEK  # 0 = Monday 00:00 UTC
    angles = torch.stack([day_phase, week_phase], dim=-1) * (2 * math.pi)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


def _gather(values: Tensor, idx: Tensor) -> Tensor:
    """values (S, N); idx (...) of ints, out of range -> NaN. Returns (S, ...)."""
    n = values.shape[1]
    valid = (idx >= 0) & (idx < n)
    out = values[:, idx.clamp(0, n - 1)]
    return torch.where(valid, out, torch.full_like(out, float("nan")))


def step_inputs(
    spec: FeatureSpec, values: Tensor, start: int, lo: int, hi: int, exog: Tensor | None = None
) -> Tensor:
    """x for steps lo..hi-1 of the grid. values (S, N) scaled, NaN = missing. -> (S, T, F)."""
    v = values[:, lo:hi]
    parts = [torch.nan_to_num(v, nan=0.0).unsqueeze(-1), (~torch.isnan(v)).float().unsqueeze(-1)]
    if spec.calendar:
        epoch = start + torch.arange(lo, hi, dtype=torch.int64, device=v.device) * spec.freq_seconds
        parts.append(calendar(epoch).expand(v.shape[0], -1, -1))
    if spec.n_exog:
        assert exog is not None and exog.shape[-1] == spec.n_exog, (
            f"expected {spec.n_exog} exogenous columns"
        )
        parts.append(torch.nan_to_num(exog[:, lo:hi], nan=0.0))
    return torch.cat(parts, dim=-1)


def origins(lo: int, hi: int) -> Tensor:
    return torch.arange(lo, hi)


def _lag(h: Tensor, season: int) -> Tensor:
    """For horizon steps h, the lag of the latest same-phase point known at the origin."""
    return season * torch.ceil(h / season).long()


def head_inputs(spec: FeatureSpec, values: Tensor, start: int, at: Tensor) -> Tensor:
    """head_x for the origins `at` (T,): (S, T, H, K). Reads only values at or before each origin."""
    h = torch.arange(1, spec.horizon + 1, device=values.device)
    t = at.to(values.device).unsqueeze(1)  # (T, 1)
    parts = [
        torch.nan_to_num(_gather(values, t + h - lag), nan=0.0).unsqueeze(-1)
        for lag in head_lag_table(spec, h)
    ]
    if spec.calendar:
        epoch = start + (t + h) * spec.freq_seconds  # (T, H)
        parts.append(calendar(epoch).expand(values.shape[0], -1, -1, -1))
    return torch.cat(parts, dim=-1)


def head_lag_table(spec: FeatureSpec, h: Tensor) -> list[Tensor]:
    """For horizon steps h (H,), the lags (H,) of each seasonal value the head reads.

    Beside the latest daily and weekly seasonal values, older ones let the head average away
    some of the noise a single naive copies (on the bundled data: MASE 1.006 with the two
    latest only, 0.967 with a second of each, 0.948 with a third weekly one)."""
    lag_d, lag_w = _lag(h, spec.season_day), _lag(h, spec.season_week)
    return [
        lag_d,
        lag_w,
        lag_d + spec.season_day,
        lag_w + spec.season_week,
        lag_w + 2 * spec.season_week,
    ]


def targets(
    spec: FeatureSpec,
    values: Tensor,
    at: Tensor,
    limit: int | Tensor | None = None,
    *,
    floor: Tensor | None = None,
) -> Tensor:
    """y[t + h] for the origins `at` (T,): (S, T, H), NaN where missing, at/after `limit`
    or before `floor`. limit and floor are grid indices, one for all series (int) or one
    per series ((S,) tensors: each series' own tails when series end at different times)."""
    h = torch.arange(1, spec.horizon + 1, device=values.device)
    idx = at.to(values.device).unsqueeze(1) + h
    if isinstance(limit, int):
        idx = torch.where(idx < limit, idx, torch.full_like(idx, -1))
        limit = None
    out = _gather(values, idx)
    if limit is not None or floor is not None:
        keep = torch.ones_like(out, dtype=torch.bool)
        if limit is not None:
            keep &= idx.unsqueeze(0) < limit.to(values.device).view(-1, 1, 1)
        if floor is not None:
            keep &= idx.unsqueeze(0) >= floor.to(values.device).view(-1, 1, 1)
        out = torch.where(keep, out, torch.full_like(out, float("nan")))
    return out


def seasonal_naive(
    spec: FeatureSpec, values: Tensor, at: Tensor, season: Literal["daily", "weekly"]
) -> Tensor:
    """The seasonal-naive forecast from the origins `at` (T,): (S, T, H), NaN where unknown."""
    h = torch.arange(1, spec.horizon + 1, device=values.device)
    lag = _lag(h, spec.season_day if season == "daily" else spec.season_week)
    return _gather(values, at.to(values.device).unsqueeze(1) + h - lag)
