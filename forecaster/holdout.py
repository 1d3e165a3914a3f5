"""What a version serves, scored on a held-out tail: the measure retraining compares.

A version serves, per series, a blend (forecaster.serving) of the network, the seasonal
naives and the MSTL challenger. Comparing two versions' networks says little when
most series are served by something else, so retraining compares what each one serves, on
forecasts neither has learnt from. The errors are kept summed per series and forecast
origin, so the same record can be scored from any per-series first origin (the newer of
the test tail's start and the newest point the champion was trained on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from forecaster import stats


@dataclass
class ServedErrors:
    origins: Tensor  # (T,) grid indices of the forecast origins
    err: Tensor  # (S, T) sum over the horizon of |served point - actual|
    count: Tensor  # (S, T) actuals scored
    scale: Tensor  # (S,) each series' MASE scale

    def _kept(self, rows: Tensor | None, from_origin: Tensor | None) -> tuple[Tensor, ...]:
        err, count, scale = self.err, self.count, self.scale
        if rows is not None:
            err, count, scale = err[rows], count[rows], scale[rows]
        if from_origin is not None:
            keep = self.origins.unsqueeze(0) >= from_origin.view(-1, 1)
            err, count = err * keep, count * keep
        return err, count, scale

    def mase(self, rows: Tensor | None = None, from_origin: Tensor | None = None) -> float | None:
        """Mean over series of MAE / scale, from each series' origin `from_origin` (S,) on;
        None where nothing is scored."""
        err, count, scale = self._kept(rows, from_origin)
        n = count.sum(1)
        per_series = err.sum(1) / n.clamp(min=1) / scale
        ok = (n > 0) & torch.isfinite(per_series)
        return float(per_series[ok].mean()) if bool(ok.any()) else None

    def scored(self, rows: Tensor | None = None, from_origin: Tensor | None = None) -> int:
        return int(self._kept(rows, from_origin)[1].sum())

    def to_dict(self) -> dict[str, Any]:
        return {
            "origins": self.origins.tolist(),
            "err": self.err.tolist(),
            "count": self.count.tolist(),
            "scale": self.scale.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServedErrors:
        return cls(
            origins=torch.tensor(d["origins"], dtype=torch.long),
            err=torch.tensor(d["err"], dtype=torch.float64),
            count=torch.tensor(d["count"], dtype=torch.long),
            scale=torch.tensor(d["scale"], dtype=torch.float64),
        )


def served_errors(point: Tensor, actual: Tensor, origins: Tensor, scale: Tensor) -> ServedErrors:
    """The served point (S, T, H) of every series from each of `origins` (T,), against
    `actual` (S, T, H), NaN where a target is not scored."""
    err = (point.double() - actual.double()).abs()
    known = ~torch.isnan(err)
    return ServedErrors(
        origins=origins.long().cpu(),
        err=torch.where(known, err, torch.zeros_like(err)).sum(-1),
        count=known.sum(-1),
        scale=scale.double(),
    )


def stat_forecasts(
    params: stats.StatParams,
    state: np.ndarray,
    step: np.ndarray,
    values: Tensor,
    step0: int,
    origins: Tensor,
    horizon: int,
) -> Tensor:
    """The MSTL challenger's point forecasts (S, T, H) from each of `origins` (consecutive
    grid indices), its state rolled on from the epoch step it holds up to (`step`, (S,))
    over values (S, N), raw units, whose grid index 0 is epoch step `step0`. NaN from an
    origin before a series' state: that state holds later points."""
    raw = values.double().cpu().numpy()
    o0, o1 = int(origins[0]), int(origins[-1]) + 1
    active_from = step + 1
    a = max(0, int(step.min()) + 1 - step0)
    if a < o0:  # the points between the states and the first origin, no forecasts
        state, _ = stats.update(params, state, raw[:, a:o0], step0 + a, active_from=active_from)
    _, pred = stats.update(
        params, state, raw[:, o0:o1], step0 + o0, horizon, active_from=active_from
    )
    assert pred is not None
    return torch.from_numpy(pred[:, (origins - o0).numpy()]).float()
