"""Rolling prediction from saved state: advance over the new points only, then forecast.

A series' state after absorbing every point up to state_ts is stored as raw float32 bytes.
When points arrive, the state is loaded, advanced over just those points (O(new points), not
O(lookback): the network never re-reads history; the head looks up a few seasonal values
per horizon step), and the forecast is read from the last step. A series with no state yet,
or a new model version, is warmed up from a bounded stretch of history instead (the model's
memory is about a week, DESIGN.md decision 16, so a few weeks rebuild the state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from forecaster import features as F
from forecaster import stats
from forecaster.trained import TrainedModel


@dataclass
class Joint:
    """The state of a version with a statistical challenger: the network's batched state
    and the challenger's rows (B, width), float64 (forecaster.stats)."""

    net: Any
    stat: np.ndarray


def state_to_rows(state: Any) -> tuple[list[bytes], list[int]]:
    """A batched state ((layers, B, hidden) or a tuple of them; or a Joint) -> per-series
    bytes and the shape of one series' array (parts, layers, hidden), with the challenger's
    width appended for a Joint (its float32 row follows the network's bytes)."""
    stat = None
    if isinstance(state, Joint):
        state, stat = state.net, state.stat
    parts = state if isinstance(state, tuple) else (state,)
    stacked = torch.stack([p.detach().float().cpu() for p in parts])  # (P, L, B, H)
    per_series = stacked.permute(2, 0, 1, 3).contiguous().numpy()  # (B, P, L, H)
    shape = list(per_series.shape[1:])
    if stat is None:
        return [row.tobytes() for row in per_series], shape
    extra = stat.astype(np.float32)
    rows = [row.tobytes() + x.tobytes() for row, x in zip(per_series, extra, strict=True)]
    return rows, [*shape, int(extra.shape[1])]


def state_from_rows(rows: list[bytes], shape: list[int], kind: str) -> Any:
    """Inverse of state_to_rows for a batch of series (same shape)."""
    if len(shape) == 4:  # a network state, then the challenger's row
        cut = 4 * int(np.prod(shape[:3]))
        net = state_from_rows([r[:cut] for r in rows], shape[:3], kind)
        stat = np.stack([np.frombuffer(r[cut:], dtype=np.float32) for r in rows])
        return Joint(net, stat.astype(np.float64))
    arr = np.stack(
        [np.frombuffer(r, dtype=np.float32).reshape(shape) for r in rows]
    )  # (B, P, L, H)
    stacked = torch.from_numpy(arr.copy()).permute(1, 2, 0, 3).contiguous()  # (P, L, B, H)
    if kind in ("lstm", "seq2seq"):
        assert stacked.shape[0] == 2, f"an {kind} state has h and c, got {stacked.shape[0]} parts"
        return (stacked[0], stacked[1])
    return stacked[0]


@dataclass
class Advanced:
    quantiles: Tensor  # (S, H, Q) forecast from the last step, in the series' units
    state: Any  # batched state after the last step
    edge_states: list[tuple[int, Any]]  # (grid index of a window's last step, state there)
    stat: Tensor | None = None  # (S, H) the challenger's forecast from the last step


@torch.no_grad()
def advance(
    trained: TrainedModel,
    values: Tensor,
    start: int,
    lo: int,
    hi: int,
    state: Any,
    *,
    window_steps: int,
    scaler_rows: Tensor,
) -> Advanced:
    """Advance `state` over grid steps lo..hi-1 of `values` (S, N), raw units, NaN = missing,
    grid index 0 at epoch `start`. scaler_rows (S,) picks each row's scaler. Splits at window
    edges (epoch-aligned, window_steps long) to return the state at each edge crossed.

    Runs on the model's device (inputs and state are moved there); the quantiles come back
    on the CPU, the states stay on the device until state_to_rows copies them out.

    A version with a statistical challenger advances it over the same points (a Joint
    state); with no state yet, the challenger starts from the state its fit left, skipping
    the points that state already holds."""
    assert hi > lo, "nothing to advance over"
    assert not getattr(trained.model, "last_origin_only", False), (
        "a bidirectional seq2seq re-reads its window at each forecast; rolling prediction "
        "from saved state supports the other kinds"
    )
    device = next(trained.model.parameters()).device
    rows = scaler_rows.cpu()
    center = trained.scalers.center[rows].to(device)
    scale = trained.scalers.scale[rows].to(device)
    scaled = (values.to(device) - center.unsqueeze(1)) / scale.unsqueeze(1)  # (S, N)
    spec, model = trained.spec, trained.model
    step_s = spec.freq_seconds
    challenger = trained.stat
    stat, stat_from, params = None, None, None
    if challenger is not None:
        picked = rows.numpy()
        params = challenger.params.take(picked)
        if isinstance(state, Joint):
            state, stat = state.net, state.stat
        else:  # from the fit's state, at the step it holds up to
            stat, stat_from = challenger.state[picked], challenger.step[picked] + 1
        raw = values.double().cpu().numpy()
    state = _to(state, device)
    edges = []
    a = lo
    while a < hi:
        # Steps to the end of the epoch-aligned window that step a falls in.
        to_edge = window_steps - (((start + a * step_s) // step_s) % window_steps)
        b = min(hi, a + to_edge)
        x = F.step_inputs(spec, scaled, start, a, b)
        context, state = model.advance(x, state)  # the recurrence only: O(new points)
        if stat is not None:
            stat, _ = stats.update(
                params, stat, raw[:, a:b], start // step_s + a, active_from=stat_from
            )
        if b == a + to_edge:
            edges.append((b - 1, _clone(state) if stat is None else Joint(_clone(state), stat)))
        a = b
    # The head runs once, at the last step: the forecast origin.
    head_x = F.head_inputs(spec, scaled, start, torch.tensor([hi - 1]))
    pred = model.forecast(context[:, -1:], head_x, x[:, -1:])  # (S, 1, H, Q)
    q = pred[:, -1].float() * scale.view(-1, 1, 1) + center.view(-1, 1, 1)  # (S, H, Q)
    if trained.nonnegative:
        q = q.clamp_min(0.0)
    if stat is None:
        return Advanced(quantiles=q.cpu(), state=state, edge_states=edges)
    point = torch.from_numpy(stats.forecast(params, stat, start // step_s + hi - 1, spec.horizon))
    if trained.nonnegative:
        point = point.clamp_min(0.0)
    return Advanced(
        quantiles=q.cpu(), state=Joint(state, stat), edge_states=edges, stat=point.float()
    )


def _to(state: Any, device: torch.device) -> Any:
    if state is None:
        return None
    return tuple(s.to(device) for s in state) if isinstance(state, tuple) else state.to(device)


def _clone(state: Any) -> Any:
    return tuple(s.clone() for s in state) if isinstance(state, tuple) else state.clone()


def seasonal_naive_at(spec: F.FeatureSpec, values: Tensor, origin: int, season: str) -> Tensor:
    """The seasonal-naive forecast (S, H) from grid index `origin`, raw units."""
    return F.seasonal_naive(spec, values, torch.tensor([origin]), season)[:, 0]  # type: ignore[arg-type]


def lag_offsets(spec: F.FeatureSpec) -> list[tuple[int, int]]:
    """The grid offsets (inclusive ranges, <= 0) relative to the origin that the head's
    seasonal lags read: a handful of spans of H points, not the whole lookback."""
    h = torch.arange(1, spec.horizon + 1)
    offsets: set[int] = set()
    for row in F.head_lag_table(spec, h):
        offsets.update(int(o) for o in (h - row))
    ranges: list[tuple[int, int]] = []
    for o in sorted(offsets):
        if ranges and o == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], o)
        else:
            ranges.append((o, o))
    return ranges


def history_steps(spec: F.FeatureSpec) -> int:
    """How far before the first new step the head's seasonal lags reach (in steps)."""
    return 3 * spec.season_week + spec.horizon
