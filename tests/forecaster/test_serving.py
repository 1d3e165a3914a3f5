"""What serves each series: chosen on the holdout, applied to the network's quantiles."""

from __future__ import annotations

import math

import pytest
import torch

from forecaster import serving
from forecaster.panel import Panel
from forecaster.trained import TrainedModel
from forecaster.training import TrainConfig, train, trained_model

NAN = float("nan")


def test_the_model_is_kept_unless_another_member_beats_it_by_the_margin():
    errors = {
        "model": torch.tensor([1.0, 1.0, 1.0, NAN]),
        "naive_daily": torch.tensor([0.99, 0.5, 2.0, 1.0]),
        "naive_weekly": torch.tensor([2.0, 0.6, 2.0, 2.0]),
        "mean_daily": torch.tensor([2.0, 0.7, 0.9, 2.0]),
        "mean_weekly": torch.tensor([NAN, 0.8, 2.0, 2.0]),
    }
    # 1% better is noise; 50% better wins; the best of several wins; no model score: the best.
    assert serving.choose(errors) == ["model", "naive_daily", "mean_daily", "naive_daily"]


def test_serve_moves_the_quantiles_to_the_members_median():
    q = torch.tensor([[[1.0, 2.0, 4.0]], [[1.0, 2.0, 4.0]], [[1.0, 2.0, 4.0]]])  # (3, 1, 3)
    daily = torch.tensor([[10.0], [10.0], [NAN]])
    weekly = torch.tensor([[6.0], [6.0], [6.0]])
    out = serving.serve(q, daily, weekly, ["model", "mean_daily", "naive_daily"])
    assert out[0].tolist() == [[1.0, 2.0, 4.0]]
    assert out[1].tolist() == [[5.0, 6.0, 8.0]]  # median (2 + 10) / 2 = 6
    assert out[2].tolist() == [[1.0, 2.0, 4.0]]  # the naive unknown: the network's


def test_a_trained_version_records_a_choice_per_series():
    """A series that repeats its week exactly is served by the weekly naive (or its mean
    with the network) when the network is kept from learning; a noisy one by the model."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(8 * 168, dtype=torch.float32)
    week = 10 + 5 * torch.sin(2 * math.pi * t / 168) + 3 * (t % 168 > 100).float()
    values = torch.stack([week, 10 + torch.randn(t.numel(), generator=g)])
    panel = Panel(["weekly", "noise"], 1356998400, 3600, values)
    result = train(panel, TrainConfig(kind="gru", hidden=8, epochs=2, lr=1e-9, base="daily"))
    assert len(result.serving) == 2 and set(result.serving) <= set(serving.MEMBERS)
    assert result.serving[0] in ("naive_weekly", "mean_weekly"), result.serving
    again = TrainedModel.from_checkpoint(trained_model(result).to_checkpoint())
    assert again.meta["serving"] == dict(zip(["weekly", "noise"], result.serving, strict=True))


def test_the_calibration_level_adapts_to_the_coverage_served_lately():
    from forecaster.calibration import adaptive_level

    assert adaptive_level(0.8, [True] * 10) == 0.8  # too few to judge
    assert adaptive_level(0.8, [True] * 70 + [False] * 30) == pytest.approx(0.9)
    assert adaptive_level(0.8, [True] * 100) == pytest.approx(0.6)
    assert adaptive_level(0.8, [False] * 100) == 0.99
