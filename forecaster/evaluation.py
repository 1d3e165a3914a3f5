"""Accuracy measures on tensors with NaN for unknown actuals: pinball loss, MASE, sMAPE,
interval coverage. Forecasts are (S, T, H) or (S, T, H, Q); actuals (S, T, H)."""

from __future__ import annotations

import torch
from torch import Tensor


def pinball_loss(pred: Tensor, actual: Tensor, quantiles: Tensor) -> Tensor:
    """Mean quantile loss over the known actuals. pred (..., Q), actual (...), quantiles (Q,)."""
    mask = ~torch.isnan(actual)
    diff = torch.nan_to_num(actual).unsqueeze(-1) - pred  # (..., Q)
    loss = torch.maximum(quantiles * diff, (quantiles - 1) * diff).mean(-1)
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def mae_scale(values: Tensor, season: int) -> Tensor:
    """Per-series in-sample MAE of the seasonal naive with period `season` (MASE's scale)."""
    diff = (values[:, season:] - values[:, :-season]).abs()
    scale = torch.nanmean(diff, dim=1)
    return torch.where(torch.isnan(scale) | (scale == 0), torch.ones_like(scale), scale)


def mase(pred: Tensor, actual: Tensor, scale: Tensor) -> float:
    """Mean over series of (MAE of pred / scale), ignoring unknown actuals."""
    err = (pred - actual).abs()
    per_series = torch.nanmean(err.flatten(1), dim=1) / scale
    return float(torch.nanmean(per_series))


def smape(pred: Tensor, actual: Tensor) -> float:
    """Symmetric MAPE in percent; 0/0 counts as a perfect forecast."""
    num = 2 * (pred - actual).abs()
    den = pred.abs() + actual.abs()
    ratio = torch.where(den > 0, num / den.clamp(min=1e-12), torch.zeros_like(num))
    ratio = torch.where(
        torch.isnan(actual) | torch.isnan(pred), torch.full_like(ratio, float("nan")), ratio
    )
    return float(100 * torch.nanmean(ratio))


def coverage(lower: Tensor, upper: Tensor, actual: Tensor) -> float:
    """Share of known actuals inside [lower, upper]."""
    mask = ~torch.isnan(actual)
    inside = (actual >= lower) & (actual <= upper)
    return float(inside[mask].float().mean()) if mask.any() else float("nan")
