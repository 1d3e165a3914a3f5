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
from forecaster import serving, stats
from forecaster.trained import TrainedModel


@dataclass
class Joint:
    """The state of a version with a statistical challenger or a blend tracker: the
    network's batched state, the challenger's rows (B, width) (forecaster.stats; None for a
    version without one) and the trackers of the members' recent errors (B, width)
    (forecaster.serving.track; None for a version from before them), float64."""

    net: Any
    stat: np.ndarray | None
    blend: np.ndarray | None = None


def state_to_rows(state: Any) -> tuple[list[bytes], list[int]]:
    """A batched state ((layers, B, hidden) or a tuple of them; or a Joint) -> per-series
    bytes and the shape of one series' array (parts, layers, hidden), with the challenger's
    width appended for a Joint (its float32 row follows the network's bytes), and the blend
    tracker's width after it where there is one (its float32 row comes last)."""
    stat = blend = None
    if isinstance(state, Joint):
        state, stat, blend = state.net, state.stat, state.blend
    parts = state if isinstance(state, tuple) else (state,)
    stacked = torch.stack([p.detach().float().cpu() for p in parts])  # (P, L, B, H)
    per_series = stacked.permute(2, 0, 1, 3).contiguous().numpy()  # (B, P, L, H)
    shape = list(per_series.shape[1:])
    if stat is None and blend is None:
        return [row.tobytes() for row in per_series], shape
    n = len(per_series)
    extra = (np.zeros((n, 0)) if stat is None else stat).astype(np.float32)
    rows = [row.tobytes() + x.tobytes() for row, x in zip(per_series, extra, strict=True)]
    if blend is None:
        return rows, [*shape, int(extra.shape[1])]
    tracked = blend.astype(np.float32)
    rows = [r + x.tobytes() for r, x in zip(rows, tracked, strict=True)]
    return rows, [*shape, int(extra.shape[1]), int(tracked.shape[1])]


def state_from_rows(rows: list[bytes], shape: list[int], kind: str) -> Any:
    """Inverse of state_to_rows for a batch of series (same shape)."""
    if len(shape) in (4, 5):  # a network state, the challenger's row, the tracker's
        cut = 4 * int(np.prod(shape[:3]))
        net = state_from_rows([r[:cut] for r in rows], shape[:3], kind)
        end = cut + 4 * int(shape[3])
        stat = np.stack([np.frombuffer(r[cut:end], dtype=np.float32) for r in rows])
        blend = None
        if len(shape) == 5:
            blend = np.stack([np.frombuffer(r[end:], dtype=np.float32) for r in rows])
            blend = blend.astype(np.float64)
        return Joint(net, stat.astype(np.float64) if shape[3] else None, blend)
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
    blend: np.ndarray | None = None  # (S, width) the trackers after it (forecaster.serving)


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
    stat, stat_from, params, blend = None, None, None, None
    saved_stat = None
    if isinstance(state, Joint):
        state, saved_stat, blend = state.net, state.stat, state.blend
    if challenger is not None:
        picked = rows.numpy()
        params = challenger.params.take(picked)
        if saved_stat is not None:
            stat = saved_stat
        else:  # from the fit's state, at the step it holds up to
            stat, stat_from = challenger.state[picked], challenger.step[picked] + 1
    # The members' recent errors (forecaster.serving.track), for versions that carry their
    # holdout errors; a state from before them starts with nothing tracked. The forecasts
    # tracked are those from grid-aligned origins (every H-th step of the epoch grid), so
    # the errors depend on the points alone, not on when predict ran.
    horizon = spec.horizon
    half = serving.halflife(spec.season_day)
    track_from = lo
    if not serving.tracks(trained):
        blend = None
    elif blend is None:  # a warm-up: its first steps forecast from a state still cold
        blend = serving.new_trackers(len(rows), horizon)
        track_from = lo + min(spec.season_week, (hi - lo) // 2)
    # Raw values for the challenger's and the trackers' updates, only when there are any.
    raw = values.double().cpu().numpy() if stat is not None or blend is not None else None
    cpu_values = values.cpu()
    tracked = None  # (grid step, network quantiles, challenger point) of the last tracked origin
    state = _to(state, device)
    edges = []
    a = lo
    while a < hi:
        # Steps to the end of the epoch-aligned window that step a falls in.
        to_edge = window_steps - (((start + a * step_s) // step_s) % window_steps)
        b = min(hi, a + to_edge)
        origin = None  # the first tracked origin inside [a, b): the chunk ends there
        if blend is not None:
            # From track_from on only: a chunk longer than H (a long window) may hold a
            # tracked origin before it and one after, and the chunk's length must not
            # change which origins are tracked.
            v = tracked_origins(spec, start // step_s + max(a, track_from), start // step_s + b - 1)
            if v:
                origin = v[0] - start // step_s
                b = origin + 1
        x = F.step_inputs(spec, scaled, start, a, b)
        context, state = model.advance(x, state)  # the recurrence only: O(new points)
        if stat is not None:
            stat, _ = stats.update(
                params, stat, raw[:, a:b], start // step_s + a, active_from=stat_from
            )
        if blend is not None:
            blend = serving.track(blend, raw[:, a:b], horizon, half)
            if origin is not None:
                q_o = _quantiles(trained, scaled, start, origin, context, x, scale, center)
                p_o = None if stat is None else _stat_point(trained, params, stat, start, origin)
                blend = serving.refresh(
                    blend, _members(spec, q_o, cpu_values, origin, p_o), horizon
                )
                tracked = (origin, q_o, p_o)
        if b == a + to_edge:
            edges.append((b - 1, _joint(_clone(state), stat, blend)))
        a = b
    # The forecast from the last step, the origin: the head runs there once (a tracked origin
    # at the last step has already run it).
    if tracked is not None and tracked[0] == hi - 1:
        q, point = tracked[1], tracked[2]
    else:
        q = _quantiles(trained, scaled, start, hi - 1, context, x, scale, center)
        point = None if stat is None else _stat_point(trained, params, stat, start, hi - 1)
    return Advanced(
        quantiles=q, state=_joint(state, stat, blend), edge_states=edges, stat=point, blend=blend
    )


def _quantiles(
    trained: TrainedModel,
    scaled: Tensor,
    start: int,
    origin: int,
    context: Tensor,
    x: Tensor,
    scale: Tensor,
    center: Tensor,
) -> Tensor:
    """The network's quantiles (S, H, Q) from grid step `origin`, the last step of the
    chunk whose `context` and inputs `x` are given, in the series' units, on the CPU."""
    head_x = F.head_inputs(trained.spec, scaled, start, torch.tensor([origin]))
    pred = trained.model.forecast(context[:, -1:], head_x, x[:, -1:])  # (S, 1, H, Q)
    q = pred[:, -1].float() * scale.view(-1, 1, 1) + center.view(-1, 1, 1)  # (S, H, Q)
    if trained.nonnegative:
        q = q.clamp_min(0.0)
    return q.cpu()


def _stat_point(
    trained: TrainedModel, params: Any, stat: np.ndarray, start: int, origin: int
) -> Tensor:
    """The challenger's point forecast (S, H) from grid step `origin` (epoch `start` at 0)."""
    spec = trained.spec
    step = start // spec.freq_seconds + origin
    point = torch.from_numpy(stats.forecast(params, stat, step, spec.horizon))
    if trained.nonnegative:
        point = point.clamp_min(0.0)
    return point.float()


def _members(
    spec: F.FeatureSpec, q: Tensor, values: Tensor, origin: int, point: Tensor | None
) -> dict[str, Tensor]:
    """Each member's point forecast (S, H) from grid step `origin` (forecaster.serving):
    the network's median of `q`, both naives, the challenger's `point`."""
    return serving.member_medians(
        q[..., q.shape[-1] // 2],
        seasonal_naive_at(spec, values, origin, "daily"),
        seasonal_naive_at(spec, values, origin, "weekly"),
        point,
    )


def _joint(state: Any, stat: np.ndarray | None, blend: np.ndarray | None) -> Any:
    """The network's state alone, or a Joint with the challenger's and tracker's rows."""
    if stat is None and blend is None:
        return state
    return Joint(state, stat, None if blend is None else blend.copy())


def stack_states(states: list[Any], horizon: int) -> Any:
    """Per-series states (each for a batch of one, possibly of older formats: a Joint
    without a tracker, or none at all) -> one batched state. Trackers missing beside
    others start empty."""
    joints = [s for s in states if isinstance(s, Joint)]
    nets = [s.net if isinstance(s, Joint) else s for s in states]
    if isinstance(nets[0], tuple):
        net: Any = tuple(torch.cat([n[k] for n in nets], dim=1) for k in range(len(nets[0])))
    else:
        net = torch.cat(nets, dim=1)
    if not joints:
        return net
    stats_ = [s.stat if isinstance(s, Joint) else None for s in states]
    stat = None if any(x is None for x in stats_) else np.concatenate(stats_)
    blends = [s.blend if isinstance(s, Joint) else None for s in states]
    blend = None
    if any(b is not None for b in blends):
        blend = np.concatenate(
            [serving.new_trackers(1, horizon) if b is None else b for b in blends]
        )
    return _joint(net, stat, blend)


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


def tracked_origins(spec: F.FeatureSpec, first: int, last: int) -> list[int]:
    """The epoch steps in [first, last] from which the blend's members' forecasts are
    tracked (advance): every H-th step of the epoch grid."""
    h = spec.horizon
    v = first + (h - 1 - first % h)
    return list(range(v, last + 1, h))


def history_steps(spec: F.FeatureSpec) -> int:
    """How far before the first new step the head's seasonal lags reach (in steps)."""
    return 3 * spec.season_week + spec.horizon
