"""The one config every model is built from. Plain data: it goes into checkpoints as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Kind = Literal["lstm", "gru", "rnn", "seq2seq"]
KINDS: tuple[str, ...] = ("lstm", "gru", "rnn", "seq2seq")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    kind: Kind = "lstm"
    n_inputs: int  # features per time step (value, observed flag, calendar, exogenous)
    n_head_features: int  # features per (origin, horizon step): seasonal naives, target calendar
    horizon: int = 24
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    hidden: int = 64
    layers: int = 1
    dropout: float = 0.0
    head_hidden: int = 64
    # Index into the head features of the seasonal-naive value the output is a residual
    # on (DESIGN.md decision 16); None for a plain head.
    base_feature: int | None = 0
    # seq2seq only: a within-window backward encoder (see models/seq2seq.py for why the
    # forecast origin is then the window's last step only).
    bidirectional: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.kind in KINDS, f"unknown model kind {self.kind!r}; one of {KINDS}"
        assert self.n_inputs > 0 and self.n_head_features >= 0 and self.horizon > 0
        assert list(self.quantiles) == sorted(self.quantiles), "quantiles must be increasing"
        assert all(0 < q < 1 for q in self.quantiles), "quantiles must lie in (0, 1)"
        assert self.base_feature is None or 0 <= self.base_feature < self.n_head_features
        assert not (self.bidirectional and self.kind != "seq2seq"), "only seq2seq is bidirectional"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["quantiles"] = list(self.quantiles)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["quantiles"] = tuple(d["quantiles"])
        return cls(**d)
