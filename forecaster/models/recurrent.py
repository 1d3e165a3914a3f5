"""RNN, LSTM and GRU forecasters with a forking-sequences multi-horizon quantile head.

MQ-RNN (Wen et al. 2017): at every time step the head maps the hidden state to H steps x Q
quantiles, so every step of a window is a training origin and a forecast needs nothing but
the current state. Following DESIGN.md decision 16, the head also sees, for each horizon step
h, the seasonal-naive values for the target time and its calendar, and its output is a
residual on one seasonal naive, with the last layer initialised to zero: training starts at
the naive forecast and can only learn to improve on it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from forecaster.models.config import ModelConfig

State = Tensor | tuple[Tensor, Tensor]

_CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class QuantileHead(nn.Module):
    """(hidden per origin, features per origin and step) -> quantiles per origin and step.

    A one-hidden-layer MLP on [context, step features, step embedding], with its first layer
    split by input: the context part is computed once per origin, not once per horizon step,
    which makes the head H times cheaper than concatenating first (same function)."""

    def __init__(self, config: ModelConfig, n_context: int) -> None:
        super().__init__()
        self.config = config
        self.context_proj = nn.Linear(n_context, config.head_hidden)
        self.feature_proj = nn.Linear(config.n_head_features, config.head_hidden, bias=False)
        self.step_embedding = nn.Embedding(config.horizon, config.head_hidden)
        self.act = nn.GELU()
        self.out = nn.Linear(config.head_hidden, len(config.quantiles))
        # Zero output at the start: the forecast begins as the seasonal naive base.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, context: Tensor, head_x: Tensor) -> Tensor:
        """context (B, T, C), head_x (B, T, H, K) -> (B, T, H, Q), quantiles sorted."""
        h = head_x.shape[2]
        z = (
            self.context_proj(context).unsqueeze(2)  # (B, T, 1, D)
            + self.feature_proj(head_x)  # (B, T, H, D)
            + self.step_embedding.weight[:h]  # (H, D)
        )
        out = self.out(self.act(z))  # (B, T, H, Q)
        if self.config.base_feature is not None:
            out = out + head_x[..., self.config.base_feature].unsqueeze(-1)
        # Served quantiles never cross. Training leaves them unsorted: the pinball loss
        # needs no sort, and the sort's backward costs as much as the rest of the head.
        return out if self.training else out.sort(dim=-1).values


class RecurrentForecaster(nn.Module):
    """forward(x, head_x, state) -> (quantiles, state); state carried by the caller."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.kind in _CELLS, (
            f"RecurrentForecaster builds rnn/lstm/gru, not {config.kind!r}"
        )
        self.config = config
        self.rnn = _CELLS[config.kind](
            input_size=config.n_inputs,
            hidden_size=config.hidden,
            num_layers=config.layers,
            dropout=config.dropout if config.layers > 1 else 0.0,
            batch_first=True,
        )
        self.head = QuantileHead(config, config.hidden)

    def forward(
        self, x: Tensor, head_x: Tensor, state: State | None = None, *, at: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """x (B, T, F) step inputs; head_x (B, T, H, K); state from the previous window or None.

        Returns (B, T, H, Q) quantile forecasts from every step as origin, and the state after
        the last step (not detached: the training loop decides where to cut the graph).
        at (T',): forecast from those steps only (head_x (B, T', H, K) holds theirs): the
        recurrence still runs over every step, the head only where asked."""
        cfg = self.config
        assert x.dim() == 3 and x.shape[-1] == cfg.n_inputs, (
            f"x must be (B, T, {cfg.n_inputs}), got {tuple(x.shape)}"
        )
        steps = x.shape[1] if at is None else at.shape[0]
        assert (
            head_x.shape[:2] == (x.shape[0], steps) and head_x.shape[-1] == cfg.n_head_features
        ), f"head_x must be (B, {steps}, H, {cfg.n_head_features}), got {tuple(head_x.shape)}"
        assert head_x.shape[2] <= cfg.horizon, f"at most {cfg.horizon} horizon steps"
        out, state = self.rnn(x, state)  # (B, T, hidden)
        if at is not None:
            out = out[:, at]
        return self.head(out, head_x), state

    def advance(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """The recurrence alone: x (B, T, F) -> (context (B, T, hidden), state). Rolling
        prediction advances over new points with this and runs the head once, at the end."""
        return self.rnn(x, state)

    def forecast(self, context: Tensor, head_x: Tensor, x: Tensor) -> Tensor:
        """Quantiles (B, T', H, Q) from contexts (B, T', hidden) and their head inputs
        (B, T', H, K); x (B, T', F) are the inputs at those steps (unused here)."""
        return self.head(context, head_x)

    def zero_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        h = torch.zeros(self.config.layers, batch, self.config.hidden, device=device)
        return (h, torch.zeros_like(h)) if self.config.kind == "lstm" else h
