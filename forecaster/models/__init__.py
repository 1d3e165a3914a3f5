"""Forecasting networks: plain nn.Modules built from a ModelConfig, `forward(x, head_x, state)
-> (quantiles, state)`. No data loading, devices or logging in here."""

from __future__ import annotations

from torch import nn

from forecaster.models.config import KINDS, ModelConfig
from forecaster.models.recurrent import QuantileHead, RecurrentForecaster
from forecaster.models.seq2seq import Seq2SeqForecaster

__all__ = [
    "KINDS",
    "ModelConfig",
    "QuantileHead",
    "RecurrentForecaster",
    "Seq2SeqForecaster",
    "build_model",
]


def build_model(config: ModelConfig) -> nn.Module:
    if config.kind == "seq2seq":
        return Seq2SeqForecaster(config)
    return RecurrentForecaster(config)
