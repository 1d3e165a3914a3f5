"""Training over consecutive windows with carried, detached state (truncated BPTT).

Series are the batch dimension and keep their slot for the whole epoch. Each epoch walks
the training span window by window: the state leaving window k enters window k+1 detached,
the way a character-level LSTM carries (h.detach(), c.detach()) between chunks, so the
gradient of a window's loss never reaches into earlier windows. The state is reset at the
start of each epoch and the first `burn_in_windows` after a reset run without loss, so no
loss is taken from a state that has seen too little. Every step of a window is a forecast
origin (forking sequences), with the targets that lie past the training span masked out.
Validation replays the whole history with carried state and scores the origins in the
held-out tail; the best epoch's weights are kept (early stopping).

Data parallel (`DataParallel`, used by the Ray Train backend): each rank trains the same
loop on its own rows of series, its model wrapped in DDP so every backward all-reduces the
gradients; every rank walks the same windows (the series share one time grid), so the
collectives line up, and the validation loss is averaged over ranks, so early stopping
takes the same decision everywhere. Without it the loop is the single-process one.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from forecaster import evaluation as ev
from forecaster import features as F
from forecaster.models import ModelConfig, Seq2SeqForecaster, build_model
from forecaster.panel import Panel, Scalers
from forecaster.trained import TrainedModel


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    kind: Literal["lstm", "gru", "rnn", "seq2seq"] = "lstm"
    hidden: int = 64
    layers: int = 1
    dropout: float = 0.0
    horizon: int = 24
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    window: int | None = None  # TBPTT length in steps; None = one week
    epochs: int = 30
    lr: float = 2e-3
    weight_decay: float = 1e-2
    clip: float = 1.0
    patience: int = 4
    val_steps: int | None = None  # held-out test tail, never used for a choice; None = four weeks
    stop_steps: int | None = None  # early-stopping tail just before it; None = two weeks
    burn_in_windows: int = 1
    teacher_forcing: tuple[float, float] = (1.0, 0.0)  # seq2seq ratio, first -> last epoch
    seq2seq_origin_stride: int = 4  # seq2seq trains from every k-th origin (decoding is costly)
    bidirectional: bool = False
    calendar: bool = True
    base: Literal["auto", "daily", "weekly"] = "auto"
    seed: int = 0
    device: str = "auto"
    amp: bool = True


@dataclass(frozen=True, kw_only=True)
class DataParallel:
    """One rank's part in a data-parallel `train` (this module knows no Ray; the Ray Train
    backend builds it). rows: this rank's series (batch rows of the panel); wrap: the model
    as the loop calls it (DDP: gradients all-reduced in backward); mean: (value, weight) ->
    the weighted mean over all ranks, the same on each; main: rank 0, which alone scores
    the final metrics."""

    rows: slice
    wrap: Callable[[nn.Module], nn.Module]
    mean: Callable[[float, float], float]
    main: bool


@dataclass
class Progress:
    epoch: int
    epochs: int
    window: int
    windows: int
    loss: float
    points_per_s: float
    val_loss: float | None = None


@dataclass
class TrainResult:
    model: nn.Module  # best weights, on CPU, eval mode
    model_config: ModelConfig
    spec: F.FeatureSpec
    scalers: Scalers
    names: list[str]
    nonnegative: bool  # every training value >= 0: forecasts are floored at 0
    metrics: dict[str, dict[str, float | None]]  # model and baselines -> mase, smape, coverage
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    train_end: int = 0  # grid index where the early-stopping tail starts
    test_start: int = 0  # grid index where the held-out test tail starts
    test_steps: int = 0
    window: int = 168
    seconds: float = 0.0
    points_per_s: float = 0.0


def trained_model(result: TrainResult) -> TrainedModel:
    return TrainedModel(
        model=result.model,
        model_config=result.model_config,
        spec=result.spec,
        scalers=result.scalers,
        names=result.names,
        nonnegative=result.nonnegative,
        window=result.window,
        meta={
            "metrics": result.metrics,
            "best_epoch": result.best_epoch,
            "history": result.history,
        },
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} asked for, but torch sees no CUDA device; use 'cpu' or 'auto'"
        )
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def detach(state: Any) -> Any:
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


def choose_base(
    spec: F.FeatureSpec, values: Tensor, lo: int, hi: int
) -> Literal["daily", "weekly"]:
    """The seasonal naive with the lower MAE on origins lo..hi-1 (a tail of the training span)."""
    at = F.origins(lo, hi)
    actual = F.targets(spec, values, at, limit=hi)
    errs = {
        s: torch.nanmean((F.seasonal_naive(spec, values, at, s) - actual).abs())
        for s in ("daily", "weekly")
    }
    return "daily" if float(errs["daily"]) < float(errs["weekly"]) else "weekly"


def forward_window(
    model: nn.Module,
    spec: F.FeatureSpec,
    scaled: Tensor,
    start: int,
    lo: int,
    hi: int,
    state: Any,
    *,
    targets: Tensor | None = None,
    teacher_ratio: float = 0.0,
    origin_stride: int = 1,
) -> tuple[Tensor, Any, Tensor]:
    """Run the model over grid steps lo..hi-1 from `state`. Returns (predictions (S, T', H, Q),
    state after hi-1, origin indices (T',)). All inputs are on the model's device.

    origin_stride > 1 decodes seq2seq from every k-th step only (ending at the last)."""
    device = scaled.device
    x = F.step_inputs(spec, scaled, start, lo, hi).to(device)
    hx = F.head_inputs(spec, scaled, start, F.origins(lo, hi)).to(device)
    origins = torch.arange(lo, hi)
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if isinstance(core, Seq2SeqForecaster):
        at = None
        if origin_stride > 1 and not core.last_origin_only:
            at = torch.arange(hi - lo - 1, -1, -origin_stride).flip(0)
            origins = origins[at]
        pred, state = model(
            x,
            hx,
            state,
            targets=targets,
            teacher_ratio=teacher_ratio,
            at=None if at is None else at.to(x.device),
        )
        if core.last_origin_only:
            origins = torch.tensor([hi - 1])
    else:
        pred, state = model(x, hx, state)
    return pred, state, origins


def _windows(lo: int, hi: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, hi)) for a in range(lo, hi, size)]


@torch.no_grad()
def replay(
    model: nn.Module, spec: F.FeatureSpec, scaled: Tensor, start: int, window: int, from_origin: int
) -> tuple[Tensor, Tensor]:
    """Run the whole history with carried state; keep the forecasts from origins >= from_origin.

    Returns (origins (T,), predictions (S, T, H, Q)) in scaled units."""
    model.eval()
    state, preds, origins = None, [], []
    for a, b in _windows(0, scaled.shape[1], window):
        pred, state, org = forward_window(model, spec, scaled, start, a, b, state)
        keep = org >= from_origin
        if keep.any():
            preds.append(pred[:, keep.to(pred.device)].float().cpu())
            origins.append(org[keep])
    if not preds:
        return torch.empty(0, dtype=torch.long), torch.empty(scaled.shape[0], 0, spec.horizon, 0)
    return torch.cat(origins), torch.cat(preds, dim=1)


def evaluate(
    model: nn.Module,
    spec: F.FeatureSpec,
    panel: Panel,
    scalers: Scalers,
    quantiles: tuple[float, ...],
    window: int,
    val_start: int,
    nonnegative: bool = False,
) -> dict[str, dict[str, float | None]]:
    """MASE, sMAPE and coverage of the model and the two seasonal naives on the same origins
    (every origin from val_start - 1 whose targets lie in the held-out tail)."""
    device = next(model.parameters()).device
    scaled = scalers.transform(panel.values).to(device)
    origins, pred = replay(model, spec, scaled, panel.start, window, val_start - 1)
    pred = scalers.inverse(pred)  # (S, T, H, Q)
    if nonnegative:  # counts, prices, loads: a forecast below zero is never right
        pred = pred.clamp_min(0.0)
    actual = F.targets(spec, panel.values, origins)
    # MASE's scale: the daily seasonal naive's in-sample MAE on the training span.
    scale = ev.mae_scale(panel.values[:, :val_start], spec.season_day)
    lo_q, mid, hi_q = 0, len(quantiles) // 2, len(quantiles) - 1
    out = {
        "model": {
            "mase": ev.mase(pred[..., mid], actual, scale),
            "smape": ev.smape(pred[..., mid], actual),
            "coverage": ev.coverage(pred[..., lo_q], pred[..., hi_q], actual),
        }
    }
    for season in ("daily", "weekly"):
        naive = F.seasonal_naive(spec, panel.values, origins, season)
        out[f"seasonal_naive_{season}"] = {
            "mase": ev.mase(naive, actual, scale),
            "smape": ev.smape(naive, actual),
            "coverage": None,  # a point forecast has no band
        }
    return out


def train(
    panel: Panel,
    config: TrainConfig,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    init_state_dict: dict[str, Tensor] | None = None,
    parallel: DataParallel | None = None,
) -> TrainResult:
    """Train one global model over every series of the panel (see the module docstring);
    with `parallel`, this rank's share of it. Scalers and the seasonal base are fitted on
    the whole panel on every rank, so all ranks agree on them without a collective."""
    seed_everything(config.seed)
    device = resolve_device(config.device)
    spec0 = F.FeatureSpec(
        freq_seconds=panel.freq_seconds, horizon=config.horizon, calendar=config.calendar
    )
    window = config.window or spec0.season_week
    val_steps = config.val_steps if config.val_steps is not None else 4 * spec0.season_week
    stop_steps = config.stop_steps if config.stop_steps is not None else 2 * spec0.season_week
    n = panel.n_steps
    # [0, train_end) trains; [train_end, test_start) picks the epoch (early stopping);
    # [test_start, n) is scored once at the end, so the reported accuracy is honest.
    test_start = n - val_steps
    train_end = test_start - stop_steps
    if train_end < 2 * window:
        raise ValueError(
            f"{n} steps leave {train_end} for training after a {stop_steps}-step early-stopping "
            f"tail and a {val_steps}-step test tail; need at least two windows of {window}. "
            "Ingest more history or lower val_steps/stop_steps/window."
        )
    scalers = Scalers.fit(panel.values[:, :train_end])
    scaled_cpu = scalers.transform(panel.values)
    base = config.base
    if base == "auto":
        base = choose_base(
            spec0, scaled_cpu, max(0, train_end - 4 * spec0.season_week), train_end - config.horizon
        )
    spec = F.FeatureSpec(
        freq_seconds=panel.freq_seconds, horizon=config.horizon, calendar=config.calendar, base=base
    )
    model_config = ModelConfig(
        kind=config.kind,
        n_inputs=spec.n_inputs,
        n_head_features=spec.n_head_features,
        horizon=config.horizon,
        quantiles=config.quantiles,
        hidden=config.hidden,
        layers=config.layers,
        dropout=config.dropout,
        base_feature=spec.base_feature,
        bidirectional=config.bidirectional,
    )
    model = build_model(model_config).to(device)
    if init_state_dict is not None:
        model.load_state_dict(init_state_dict)
    optim = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    q = torch.tensor(config.quantiles, device=device)
    net = model if parallel is None else parallel.wrap(model)
    if parallel is not None:  # this rank's series: (S_rank, N)
        scaled_cpu = scaled_cpu[parallel.rows]
    n_rows = scaled_cpu.shape[0]
    scaled = scaled_cpu.to(device)
    use_amp = config.amp and device.type == "cuda"
    windows = _windows(0, train_end, window)

    best = (math.inf, 0, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    history: list[dict[str, float]] = []
    stale, points, train_seconds, t0 = 0, 0, 0.0, time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        ratio = _teacher_ratio(config, epoch)
        state, losses = None, []
        t_epoch, points_epoch = time.perf_counter(), 0
        for k, (a, b) in enumerate(windows):
            y = F.targets(spec, scaled_cpu, F.origins(a, b), limit=train_end).to(device)
            if k < config.burn_in_windows:  # warm the state up; no loss from a cold state
                with torch.no_grad():
                    _, state, _ = forward_window(net, spec, scaled, panel.start, a, b, state)
                state = detach(state)
                continue
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                pred, state, origins = forward_window(
                    net,
                    spec,
                    scaled,
                    panel.start,
                    a,
                    b,
                    state,
                    targets=y,
                    teacher_ratio=ratio,
                    origin_stride=config.seq2seq_origin_stride,
                )
            state = detach(state)  # truncated BPTT: the graph ends at the window edge
            y = y[:, origins - a]
            loss = ev.pinball_loss(pred.float(), y, q)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optim.step()
            losses.append(float(loss.detach()))
            points_epoch += n_rows * (b - a)
            if on_progress is not None:
                rate = points_epoch / max(time.perf_counter() - t_epoch, 1e-9)
                on_progress(
                    Progress(epoch + 1, config.epochs, k + 1, len(windows), losses[-1], rate)
                )
        points += points_epoch
        train_seconds += time.perf_counter() - t_epoch
        val = _val_loss(model, spec, scaled, panel.start, window, train_end, test_start, q)
        if parallel is not None:
            val = parallel.mean(val, float(n_rows))
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)) if losses else math.nan,
                "val_loss": val,
            }
        )
        if on_progress is not None:
            rate = points_epoch / max(time.perf_counter() - t_epoch, 1e-9)
            on_progress(
                Progress(
                    epoch + 1,
                    config.epochs,
                    len(windows),
                    len(windows),
                    history[-1]["train_loss"],
                    rate,
                    val,
                )
            )
        if val < best[0] - 1e-6:
            best = (
                val,
                epoch + 1,
                {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            )
            stale = 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    seconds = time.perf_counter() - t0
    model.load_state_dict(best[2])
    model = model.cpu().eval()
    nonnegative = bool(torch.nan_to_num(panel.values[:, :train_end], nan=0.0).min() >= 0)
    metrics: dict[str, dict[str, float | None]] = {}
    if parallel is None or parallel.main:
        metrics = evaluate(
            model, spec, panel, scalers, config.quantiles, window, test_start, nonnegative
        )
    return TrainResult(
        model=model,
        model_config=model_config,
        spec=spec,
        scalers=scalers,
        names=list(panel.names),
        nonnegative=nonnegative,
        metrics=metrics,
        history=history,
        best_epoch=best[1],
        train_end=train_end,
        test_start=test_start,
        test_steps=n - test_start,
        window=window,
        seconds=seconds,
        points_per_s=points / max(train_seconds, 1e-9),  # training windows only
    )


def _teacher_ratio(config: TrainConfig, epoch: int) -> float:
    first, last = config.teacher_forcing
    if config.epochs <= 1:
        return first
    return first + (last - first) * epoch / (config.epochs - 1)


@torch.no_grad()
def _val_loss(
    model: nn.Module,
    spec: F.FeatureSpec,
    scaled: Tensor,
    start: int,
    window: int,
    lo: int,
    hi: int,
    q: Tensor,
) -> float:
    """Pinball loss of the forecasts from origins lo-1.. whose targets lie in [lo, hi)."""
    origins, pred = replay(model, spec, scaled, start, window, lo - 1)
    keep = origins < hi - 1
    actual = F.targets(spec, scaled.cpu(), origins[keep], limit=hi)
    return float(ev.pinball_loss(pred[:, keep], actual, q.cpu()))
