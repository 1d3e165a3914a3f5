"""Encoder-decoder forecaster: a carried LSTM encoder, an LSTM-cell decoder over the horizon.

The encoder's state is the state carried from window to window (the same contract as the
recurrent forecasters). From each origin's encoder output the decoder unrolls the H steps,
reading the known future covariates of each target step (its calendar and seasonal-naive
values) and the previous step's value: the true one with probability `teacher_ratio` during
training (teacher forcing, decayed on a schedule by the training loop), its own median
otherwise and always at inference.

Bidirectional option. A backward LSTM over the current window, started from zero at every
window, adds what the window looks like read from its end. It must never carry state
backwards through time: that state would hold points from after the next window's
origins. And within a window, the backward output at step t has read the points after t, so
an origin inside the window would see its own future. So when bidirectional, the only
forecast origin is the window's last step, whose context is the forward output there plus
the backward output at the window's first step (which has read exactly the window). Each
window then gives one training origin instead of T, and a forecast costs a pass over the
window (O(window)), not O(new points): use it where accuracy matters more than update cost.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from forecaster.models.config import ModelConfig

State = tuple[Tensor, Tensor]


class Seq2SeqForecaster(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.kind == "seq2seq", f"Seq2SeqForecaster builds seq2seq, not {config.kind!r}"
        self.config = config
        hid = config.hidden
        self.encoder = nn.LSTM(
            config.n_inputs,
            hid,
            num_layers=config.layers,
            dropout=config.dropout if config.layers > 1 else 0.0,
            batch_first=True,
        )
        self.backward_encoder = (
            nn.LSTM(config.n_inputs, hid, batch_first=True) if config.bidirectional else None
        )
        n_context = hid * (2 if config.bidirectional else 1)
        self.init_h = nn.Linear(n_context, hid)
        self.init_c = nn.Linear(n_context, hid)
        self.step_embedding = nn.Embedding(config.horizon, 8)
        self.decoder = nn.LSTMCell(config.n_head_features + 1 + 8, hid)
        self.out = nn.Linear(hid + config.n_head_features, len(config.quantiles))
        nn.init.zeros_(self.out.weight)  # start at the seasonal-naive base
        nn.init.zeros_(self.out.bias)

    @property
    def last_origin_only(self) -> bool:
        return self.config.bidirectional

    def forward(
        self,
        x: Tensor,
        head_x: Tensor,
        state: State | None = None,
        *,
        targets: Tensor | None = None,
        teacher_ratio: float = 0.0,
        at: Tensor | None = None,
    ) -> tuple[Tensor, State]:
        """x (B, T, F); head_x (B, T, H, K); targets (B, T, H) scaled, NaN where unknown;
        at (T',) the steps of the window to decode from (default: all).

        Returns (B, T', H, Q) with T' = len(at), or 1 when bidirectional (the last step),
        and the encoder state after the window."""
        cfg = self.config
        assert x.dim() == 3 and x.shape[-1] == cfg.n_inputs, (
            f"x must be (B, T, {cfg.n_inputs}), got {tuple(x.shape)}"
        )
        assert head_x.shape[:2] == x.shape[:2] and head_x.shape[-1] == cfg.n_head_features, (
            f"head_x must be (B, T, H, {cfg.n_head_features}) matching x, got {tuple(head_x.shape)}"
        )
        out, state = self.encoder(x, state)  # (B, T, hidden)
        prev = x[..., :1]  # the value at each origin (feature 0), (B, T, 1)
        if self.backward_encoder is not None:
            back, _ = self.backward_encoder(x.flip(1))  # zero state: nothing crosses windows
            context = torch.cat([out[:, -1:], back.flip(1)[:, :1]], dim=-1)  # (B, 1, 2*hidden)
            head_x, prev = head_x[:, -1:], prev[:, -1:]
            targets = targets[:, -1:] if targets is not None else None
        else:
            context = out
            if at is not None:  # decoding is the costly part: training may sample origins
                context, head_x, prev = context[:, at], head_x[:, at], prev[:, at]
                targets = targets[:, at] if targets is not None else None
        return self._decode(context, head_x, prev, targets, teacher_ratio), state

    def _decode(
        self,
        context: Tensor,
        head_x: Tensor,
        prev: Tensor,
        targets: Tensor | None,
        teacher_ratio: float,
    ) -> Tensor:
        b, t, h_steps, k = head_x.shape
        n = b * t
        ctx = context.reshape(n, -1)
        hx = head_x.reshape(n, h_steps, k)
        h, c = torch.tanh(self.init_h(ctx)), self.init_c(ctx)
        y_prev = prev.reshape(n, 1)
        mid = len(self.config.quantiles) // 2
        outs = []
        for step in range(h_steps):
            emb = self.step_embedding.weight[step].expand(n, -1)
            h, c = self.decoder(torch.cat([hx[:, step], y_prev, emb], dim=-1), (h, c))
            q = self.out(torch.cat([h, hx[:, step]], dim=-1))  # (N, Q)
            if self.config.base_feature is not None:
                q = q + hx[:, step, self.config.base_feature : self.config.base_feature + 1]
            q = q if self.training else q.sort(dim=-1).values  # as in QuantileHead
            outs.append(q)
            y_prev = q[:, mid : mid + 1].detach()
            if targets is not None and teacher_ratio > 0:
                true = targets.reshape(n, h_steps)[:, step : step + 1]
                use = (torch.rand_like(true) < teacher_ratio) & ~torch.isnan(true)
                y_prev = torch.where(use, torch.nan_to_num(true), y_prev)
        return torch.stack(outs, dim=1).reshape(b, t, h_steps, -1)

    def advance(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """The encoder alone: x (B, T, F) -> (context (B, T, hidden), state)."""
        assert not self.config.bidirectional, "a bidirectional encoder reads whole windows"
        return self.encoder(x, state)

    def forecast(self, context: Tensor, head_x: Tensor, x: Tensor) -> Tensor:
        """Decode (B, T', H, Q) from contexts (B, T', hidden), their head inputs and the
        inputs x (B, T', F) at those steps (the value there starts the decoder)."""
        return self._decode(context, head_x, x[..., :1], None, 0.0)

    def zero_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        h = torch.zeros(self.config.layers, batch, self.config.hidden, device=device)
        return (h, torch.zeros_like(h))
