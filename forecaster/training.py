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

import copy
import functools
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import structlog
import torch
from torch import Tensor, nn

from forecaster import evaluation as ev
from forecaster import features as F
from forecaster import serving, stats
from forecaster.calibration import band_scores, conformal_quantile
from forecaster.holdout import ServedErrors, served_errors, stat_forecasts
from forecaster.models import ModelConfig, Seq2SeqForecaster, build_model
from forecaster.panel import Panel, Scalers
from forecaster.trained import TrainedModel

log = structlog.get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    kind: Literal["lstm", "gru", "rnn", "seq2seq"] = "lstm"
    hidden: int = 64
    layers: int = 1
    dropout: float = 0.0
    horizon: int = 24
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    window: int | None = None  # TBPTT length in steps; None = one week
    # None: scaled with the history (see plan_spans): enough epochs for about min_steps
    # gradient steps (at least 30, at most 300), patience an eighth of them (at least 4).
    epochs: int | None = None
    min_steps: int = 600
    lr: float = 2e-3
    weight_decay: float = 1e-2
    clip: float = 1.0
    patience: int | None = None
    # Held-out test tail, never used for a choice, and the early-stopping tail before it,
    # in steps, per series; None: 15% and 10% of each series' history (at least a horizon,
    # at most four and two weeks).
    val_steps: int | None = None
    stop_steps: int | None = None
    # Passes over the whole history, newest points included, after early stopping; None:
    # a quarter of the chosen epoch count (at least one). 0 serves the early-stopped model.
    refit_epochs: int | None = None
    seasons: tuple[int, int] | None = None  # (daily, weekly) periods in steps; None: from freq
    # The statistical challenger fitted beside the network (forecaster.stats), a member of
    # each series' blend (forecaster.serving); "none": the network and the naives only.
    challenger: Literal["mstl", "none"] = "mstl"
    burn_in_windows: int = 1
    teacher_forcing: tuple[float, float] = (1.0, 0.0)  # seq2seq ratio, first -> last epoch
    seq2seq_origin_stride: int = 4  # seq2seq trains from every k-th origin (decoding is costly)
    # The other kinds: the loss is taken from every k-th origin of a window (a random phase
    # per window, so every origin is used across epochs); the recurrence runs over every
    # step either way. 1: every origin. 8 trains the LSTM about 4x faster than 1 with the
    # same accuracy on bench/accuracy.py (docs/benchmarks.md, Training).
    origin_stride: int = 8
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
    spans: Spans | None = None
    calibration: list[float] = field(default_factory=list)  # per horizon step, band widths
    # Anomaly thresholds measured on the holdout (training._holdout_thresholds): rate, gap,
    # pooled, series (name -> threshold); empty when there was no holdout.
    anomaly_thresholds: dict[str, Any] = field(default_factory=dict)
    refit_epochs: int = 0
    serving: list[str] = field(default_factory=list)  # per series (names' order): what serves it
    # Per series, each member's MAE on the held-out tails that `serving` was weighed on:
    # where the served blend's tracked errors start (forecaster.serving.adapted).
    serving_errors: list[dict[str, float]] = field(default_factory=list)
    # The statistical challenger (forecaster.stats): params, per-series state and the epoch
    # step each state holds up to; None: no challenger.
    stat: dict[str, Any] | None = None
    # What the version serves scored on its test tail, per series and origin (member chosen
    # on the early-stopping tail alone): what retraining compares; not kept in the checkpoint.
    served_holdout: ServedErrors | None = None


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
            "calibration": list(result.calibration),
            "anomaly_thresholds": result.anomaly_thresholds,
            "serving": dict(zip(result.names, result.serving, strict=True))
            if result.serving
            else {},
            **(
                {"serving_errors": dict(zip(result.names, result.serving_errors, strict=True))}
                if result.serving_errors
                else {}
            ),
            **({"stat": result.stat} if result.stat else {}),
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
    spec: F.FeatureSpec, values: Tensor, floor: Tensor, limit: Tensor
) -> Literal["daily", "weekly"]:
    """The seasonal naive with the lower MAE on each series' targets in [floor, limit) (a tail
    of its own training span), pooled over series."""
    lo = max(0, int(floor.min()) - spec.horizon)
    at = F.origins(lo, max(lo + 1, int(limit.max())))
    actual = F.targets(spec, values, at, limit, floor=floor)
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
    phase: int = 0,
) -> tuple[Tensor, Any, Tensor]:
    """Run the model over grid steps lo..hi-1 from `state`. Returns (predictions (S, T', H, Q),
    state after hi-1, origin indices (T',)). All inputs are on the model's device.

    origin_stride > 1 decodes seq2seq from every k-th step only (ending at the last); the
    other kinds forecast from every k-th step from `phase` on (the recurrence runs over
    every step)."""
    device = scaled.device
    x = F.step_inputs(spec, scaled, start, lo, hi).to(device)
    origins = torch.arange(lo, hi)
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if origin_stride > 1 and not isinstance(core, Seq2SeqForecaster):
        steps = hi - lo  # a short last window still forecasts from one step at least
        at = torch.arange(min(phase % origin_stride, steps - 1), steps, origin_stride)
        hx = F.head_inputs(spec, scaled, start, origins[at]).to(device)
        pred, state = model(x, hx, state, at=at.to(device))
        return pred, state, origins[at]
    hx = F.head_inputs(spec, scaled, start, F.origins(lo, hi)).to(device)
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
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    # A window wholly before from_origin only carries the state on: the recurrence alone
    # (the same state as the full forward), not the head, whose forecasts would be dropped.
    # Most of the history, when scoring a tail.
    advance = None if getattr(core, "last_origin_only", False) else getattr(core, "advance", None)
    state, preds, origins = None, [], []
    for a, b in _windows(0, scaled.shape[1], window):
        if advance is not None and b - 1 < from_origin:
            _, state = advance(F.step_inputs(spec, scaled, start, a, b).to(scaled.device), state)
            continue
        pred, state, org = forward_window(model, spec, scaled, start, a, b, state)
        keep = org >= from_origin
        if keep.any():
            preds.append(pred[:, keep.to(pred.device)].float().cpu())
            origins.append(org[keep])
    if not preds:
        return torch.empty(0, dtype=torch.long), torch.empty(scaled.shape[0], 0, spec.horizon, 0)
    return torch.cat(origins), torch.cat(preds, dim=1)


def _as_index(value: int | Tensor, n_series: int) -> Tensor:
    """A grid index for all series (int) or one per series, as an (S,) long tensor."""
    if isinstance(value, Tensor):
        return value.long().cpu()
    return torch.full((n_series,), int(value), dtype=torch.long)


def evaluate(
    model: nn.Module,
    spec: F.FeatureSpec,
    panel: Panel,
    scalers: Scalers,
    quantiles: tuple[float, ...],
    window: int,
    val_start: int | Tensor,
    nonnegative: bool = False,
    val_end: int | Tensor | None = None,
    replayed: tuple[Tensor, Tensor] | None = None,
    stat: Tensor | None = None,
) -> dict[str, dict[str, float | None]]:
    """MASE, sMAPE and coverage of the model and the two seasonal naives on the same origins:
    each series' forecasts whose targets lie in its held-out tail [val_start, val_end) (one
    index for all series, or one per series). `replayed`: the model's replay (scaled
    units) from at least the tail's first origin, when the caller has it already."""
    n_series = panel.values.shape[0]
    lo = _as_index(val_start, n_series)
    hi = _as_index(panel.n_steps if val_end is None else val_end, n_series)
    replayed = replayed or _replay_scaled(model, spec, panel, scalers, window, lo)
    keep = replayed[0] >= int(lo.min()) - 1
    origins, pred = _kept_from(replayed, int(lo.min()) - 1)
    pred = scalers.inverse(pred)  # (S, T, H, Q)
    if nonnegative:  # counts, prices, loads: a forecast below zero is never right
        pred = pred.clamp_min(0.0)
    actual = F.targets(spec, panel.values, origins, hi, floor=lo)
    # MASE's scale: the daily seasonal naive's in-sample MAE on each series' training span.
    scale = ev.mae_scale(_before(panel.values, lo), spec.season_day)
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
    if stat is not None:  # the statistical challenger, on the same origins
        point = stat[:, keep]
        out["mstl"] = {
            "mase": ev.mase(point, actual, scale),
            "smape": ev.smape(point, actual),
            "coverage": None,
        }
    return out


@torch.no_grad()
def holdout_choices(
    model: nn.Module,
    spec: F.FeatureSpec,
    panel: Panel,
    scalers: Scalers,
    window: int,
    lo: Tensor,
    his: Sequence[Tensor],
    nonnegative: bool = False,
    replayed: tuple[Tensor, Tensor] | None = None,
    stat: Tensor | None = None,
    errors_out: list[dict[str, list[float]]] | None = None,
) -> list[list[str]]:
    """For each limit hi of `his`, per series, what serves it (forecaster.serving): the
    members weighed by their MAE on the forecasts whose targets lie in its held-out
    [lo, hi). The members' forecasts are built once for all the limits. `stat`: the
    challenger's forecasts (S, T, H) from the origins of `replayed`, NaN where it has none.
    `errors_out`, if given, receives per limit each member's MAE per series (NaN: not
    scored), the prior the served blend's tracked errors start from."""
    replayed = replayed or _replay_scaled(model, spec, panel, scalers, window, lo)
    first = int(lo.min()) - 1
    keep = replayed[0] >= first
    origins, median, daily, weekly = _members_from(
        replayed, first, scalers, spec, panel.values, nonnegative
    )
    medians = serving.member_medians(median, daily, weekly, None if stat is None else stat[:, keep])
    # Scored only where every member has a forecast, so all face the same targets.
    unknown = torch.isnan(sum(m for name, m in medians.items() if name != "model"))
    choices = []
    for hi in his:
        actual = F.targets(spec, panel.values, origins, hi, floor=lo)
        errors = {}
        for name, point in medians.items():
            err = torch.where(unknown, torch.nan, (point - actual).abs())
            errors[name] = torch.nanmean(err.flatten(1), dim=1)
        choices.append(serving.choose(errors))
        if errors_out is not None:
            errors_out.append({name: e.double().tolist() for name, e in errors.items()})
    return choices


def _members_from(
    replayed: tuple[Tensor, Tensor],
    first: int,
    scalers: Scalers,
    spec: F.FeatureSpec,
    values: Tensor,
    nonnegative: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The replay's origins >= first (T,), the network's median from each (S, T, H) in the
    series' units (floored at 0 for a nonnegative panel) and both seasonal naives'."""
    origins, pred = _kept_from(replayed, first)
    median = scalers.inverse(pred[..., pred.shape[-1] // 2])
    if nonnegative:
        median = median.clamp_min(0.0)
    daily = F.seasonal_naive(spec, values, origins, "daily")
    weekly = F.seasonal_naive(spec, values, origins, "weekly")
    return origins, median, daily, weekly


def _served(
    replayed: tuple[Tensor, Tensor],
    first: int,
    scalers: Scalers,
    spec: F.FeatureSpec,
    values: Tensor,
    lo: Tensor,
    hi: Tensor,
    nonnegative: bool,
    members: list[str],
    stat: Tensor | None,
) -> tuple[ServedErrors, float]:
    """What `members` serve (forecaster.serving) from the replay's origins >= first, scored
    on each series' targets in [lo, hi): the errors (forecaster.holdout) and the sMAPE.
    `stat`: the challenger's forecasts (S, T, H) from those same origins, or None."""
    origins, median, daily, weekly = _members_from(
        replayed, first, scalers, spec, values, nonnegative
    )
    point = serving.served_point(median, daily, weekly, members, stat)
    actual = F.targets(spec, values, origins, hi, floor=lo)
    scale = ev.mae_scale(_before(values, lo), spec.season_day)
    return served_errors(point, actual, origins, scale), ev.smape(point, actual)


@torch.no_grad()
def version_served_errors(
    trained: TrainedModel, panel: Panel, lo: Tensor, hi: Tensor | None = None
) -> ServedErrors:
    """What a registered version serves (its network, its challenger's state rolled on over
    the panel, the naives, its per-series choice), scored on each series' targets in
    [lo, hi) of `panel`, whose series the version must know."""
    spec, n = trained.spec, panel.values.shape[0]
    lo = _as_index(lo, n)
    hi = _as_index(panel.n_steps if hi is None else hi, n)
    scalers = Scalers.from_dict(trained.scalers.to_dict(trained.names), panel.names)
    replayed = _replay_scaled(trained.model, spec, panel, scalers, trained.window, lo)
    first = int(lo.min()) - 1
    stat = None
    if trained.stat is not None:
        rows = np.asarray([trained.names.index(name) for name in panel.names])
        c = trained.stat
        stat = stat_forecasts(
            c.params.take(rows),
            c.state[rows],
            c.step[rows],
            panel.values,
            panel.start // panel.freq_seconds,
            replayed[0][replayed[0] >= first],
            spec.horizon,
        )
        if trained.nonnegative:
            stat = stat.clamp_min(0.0)
    chosen = trained.meta.get("serving") or {}
    members = [chosen.get(name, "model") for name in panel.names]
    errors, _ = _served(
        replayed, first, scalers, spec, panel.values, lo, hi, trained.nonnegative, members, stat
    )
    return errors


def _replay_scaled(
    model: nn.Module, spec: F.FeatureSpec, panel: Panel, scalers: Scalers, window: int, lo: Tensor
) -> tuple[Tensor, Tensor]:
    """The model's replay of the panel (scaled units) keeping origins from lo.min() - 1."""
    device = next(model.parameters()).device
    scaled = scalers.transform(panel.values).to(device)
    return replay(model, spec, scaled, panel.start, window, int(lo.min()) - 1)


def _kept_from(replayed: tuple[Tensor, Tensor], first: int) -> tuple[Tensor, Tensor]:
    """A replay (origins (T,), predictions (S, T, ...)) cut to the origins from `first`, as
    if it had been run with from_origin=first."""
    origins, pred = replayed
    keep = origins >= first
    return origins[keep], pred[:, keep]


def _before(values: Tensor, limit: Tensor) -> Tensor:
    """values (S, N) with NaN at and after each series' own limit (S,)."""
    idx = torch.arange(values.shape[1]).unsqueeze(0)
    return torch.where(idx < limit.unsqueeze(1), values, torch.full_like(values, float("nan")))


@dataclass(frozen=True)
class Spans:
    """Where each series' data lies on the panel's grid and how its history is split (grid
    indices, (S,) each): [first, train_end) trains, [train_end, test_start) picks the epoch
    (early stopping), [test_start, end) is scored once (the honest holdout). Each series is
    cut at its own end, so a series whose points all lie before another's is trained on."""

    first: Tensor
    end: Tensor  # one past the series' last observed point
    train_end: Tensor
    test_start: Tensor
    window: int
    epochs: int
    patience: int


def plan_spans(values: Tensor, spec: F.FeatureSpec, config: TrainConfig) -> Spans:
    """The defaults scale with the history: tails of about 15% and 10% of each series (at
    least a horizon, at most four and two weeks), a TBPTT window of a quarter of the training
    span (between a day and a week), and epochs enough for about `min_steps` gradient steps.
    Explicit config values win."""
    observed = ~torch.isnan(values)
    if not observed.any(dim=1).all():
        empty = int((~observed.any(dim=1)).sum())
        raise ValueError(f"{empty} series have no values at all: ingest data for them first")
    n = values.shape[1]
    idx = torch.arange(n)
    first = torch.where(observed, idx, n).min(dim=1).values
    end = torch.where(observed, idx, -1).max(dim=1).values + 1
    length = end - first
    h, day, week = spec.horizon, spec.season_day, spec.season_week

    def tail(explicit: int | None, share: float, most: int) -> Tensor:
        if explicit is not None:
            return torch.full_like(length, explicit)
        return (length.double() * share).round().long().clamp(min=h).clamp(max=max(h, most))

    test_start = end - tail(config.val_steps, 0.15, 4 * week)
    train_end = test_start - tail(config.stop_steps, 0.10, 2 * week)
    span = int(torch.median(train_end - first))
    window = config.window or int(min(week, max(day, span // 4)))
    if int((train_end - first).max()) < 2 * window:
        raise ValueError(
            f"the series' histories (median {int(torch.median(length))} steps) leave "
            f"{span} steps for training after the early-stopping and test tails; need at least "
            f"two windows of {window}. Ingest more history or lower val_steps/stop_steps/window."
        )
    trained_windows = max(1, math.ceil(int((train_end - first).max()) / window) - 1)
    epochs = config.epochs or int(min(300, max(30, math.ceil(config.min_steps / trained_windows))))
    patience = config.patience or max(4, epochs // 8)
    return Spans(first, end, train_end, test_start, window, epochs, patience)


def _state_dict(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


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
    the whole panel on every rank, so all ranks agree on them without a collective.

    Once early stopping has chosen the epoch, the holdout is scored (the reported metrics)
    and the band calibration measured on it; then the model is fine-tuned through the
    newest data (`refit_epochs` passes over the whole history), so the version that serves
    has learnt from the points nearest to what it forecasts."""
    seed_everything(config.seed)
    device = resolve_device(config.device)
    spec0 = F.FeatureSpec(
        freq_seconds=panel.freq_seconds,
        horizon=config.horizon,
        calendar=config.calendar,
        seasons=config.seasons,
    )
    spans = plan_spans(panel.values, spec0, config)
    window, n = spans.window, panel.n_steps
    # Each series is scaled from its own training points; one with too few of them there
    # (shorter than a day) from all of its points rather than from nothing.
    train_values = _before(panel.values, spans.train_end)
    few = (~torch.isnan(train_values)).sum(dim=1) < spec0.season_day
    scalers = Scalers.fit(torch.where(few.unsqueeze(1), panel.values, train_values))
    scaled_cpu = scalers.transform(panel.values)
    base = config.base
    if base == "auto":
        base = choose_base(
            spec0, scaled_cpu, spans.train_end - 4 * spec0.season_week, spans.train_end
        )
    spec = replace(spec0, base=base)
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
    rows = slice(None) if parallel is None else parallel.rows
    scaled = scaled_cpu[rows].to(device)  # this rank's series: (S_rank, N)
    n_rows = scaled.shape[0]
    # No loss from a series' first day: its state has seen too little of it.
    floor = (spans.first + spec.season_day)[rows]
    epoch_loop = functools.partial(
        _epoch,
        net=net,
        model=model,
        optim=optim,
        spec=spec,
        config=config,
        scaled=scaled,
        start=panel.start,
        floor=floor,
        q=q,
        device=device,
        on_progress=on_progress,
    )

    best = (math.inf, 0, _state_dict(model))
    history: list[dict[str, float]] = []
    stale, points, train_seconds, t0 = 0, 0, 0.0, time.perf_counter()
    windows = _windows(0, int(spans.train_end.max()), window)
    for epoch in range(spans.epochs):
        t_epoch = time.perf_counter()
        losses, points_epoch = epoch_loop(
            windows,
            spans.train_end[rows],
            epoch,
            spans.epochs,
            _teacher_ratio(config, epoch, spans.epochs),
        )
        points += points_epoch
        train_seconds += time.perf_counter() - t_epoch
        val = _val_loss(
            model,
            spec,
            scaled,
            panel.start,
            window,
            spans.train_end[rows],
            spans.test_start[rows],
            q,
        )
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
                    spans.epochs,
                    len(windows),
                    len(windows),
                    history[-1]["train_loss"],
                    rate,
                    val,
                )
            )
        if val < best[0] - 1e-6:
            best, stale = (val, epoch + 1, _state_dict(model)), 0
        else:
            stale += 1
            if stale >= spans.patience:
                break
    model.load_state_dict(best[2])
    nonnegative = bool(torch.nan_to_num(train_values, nan=0.0).min() >= 0)
    metrics: dict[str, dict[str, float | None]] = {}
    calibration: list[float] = []
    thresholds: dict[str, Any] = {}
    choice: list[str] = []
    serving_errors: list[dict[str, float]] = []
    stat_kept: dict[str, Any] | None = None
    served_holdout: ServedErrors | None = None
    if parallel is None or parallel.main:
        cpu_model = copy.deepcopy(model).cpu().eval()
        # One replay of the whole history serves the scores, the choice and the calibration
        # (each keeps the origins whose targets lie in its own tail).
        replayed = _replay_scaled(cpu_model, spec, panel, scalers, window, spans.train_end)
        stat_pred = None
        if config.challenger == "mstl":
            stat_kept, stat_pred = _challenger(panel, spans, spec, replayed[0])
            if stat_pred is not None and nonnegative:
                stat_pred = stat_pred.clamp_min(0.0)
        metrics = evaluate(
            cpu_model,
            spec,
            panel,
            scalers,
            config.quantiles,
            window,
            spans.test_start,
            nonnegative,
            val_end=spans.end,
            replayed=replayed,
            stat=stat_pred,
        )
        # Per series, what serves it, chosen on both held-out tails; and, to score this
        # version as retraining compares versions, chosen on the early-stopping tail alone
        # (scored on the test tail below).
        tail_errors: list[dict[str, list[float]]] = []
        choice, honest = holdout_choices(
            cpu_model,
            spec,
            panel,
            scalers,
            window,
            spans.train_end,
            (spans.end, spans.test_start),
            nonnegative,
            replayed=replayed,
            stat=stat_pred,
            errors_out=tail_errors,
        )
        if tail_errors:  # what `choice` was weighed on, per series
            serving_errors = [
                {m: e[i] for m, e in tail_errors[0].items() if math.isfinite(e[i])}
                for i in range(len(panel.names))
            ]
        first = int(spans.test_start.min()) - 1
        served_holdout, served_smape = _served(
            replayed,
            first,
            scalers,
            spec,
            panel.values,
            spans.test_start,
            spans.end,
            nonnegative,
            honest,
            None if stat_pred is None else stat_pred[:, replayed[0] >= first],
        )
        served_mase = served_holdout.mase()
        metrics["served"] = {
            "mase": float("nan") if served_mase is None else served_mase,
            "smape": served_smape,
            "coverage": None,
        }
        calibration = holdout_calibration(
            cpu_model,
            spec,
            scalers.transform(panel.values),
            panel.start,
            window,
            spans.train_end,
            spans.end,
            config.quantiles,
            replayed=replayed,
            served=choice,
            stat=None
            if stat_pred is None
            else (stat_pred - scalers.center.view(-1, 1, 1)) / scalers.scale.view(-1, 1, 1),
            thresholds=thresholds,
        )

    # Refit: fine-tune the chosen model through every point, newest included.
    refit_epochs = config.refit_epochs
    if refit_epochs is None:
        refit_epochs = max(1, math.ceil(best[1] / 4))
    all_windows = _windows(0, n, window)
    for _ in range(refit_epochs):
        t_epoch = time.perf_counter()
        # Shown as the last epoch: the progress bar's total is the planned epoch count.
        _, points_epoch = epoch_loop(
            all_windows, spans.end[rows], spans.epochs - 1, spans.epochs, 0.0
        )
        points += points_epoch
        train_seconds += time.perf_counter() - t_epoch
    model = model.cpu().eval()
    if calibration and refit_epochs and (parallel is None or parallel.main):
        # The corrections were measured on the early-stopped network's band; the refit one's
        # band may be narrower or wider on the same origins. Keep the width the holdout
        # found right: rescale each step's correction by the ratio of the two widths.
        refit_replay = _replay_scaled(model, spec, panel, scalers, window, spans.train_end)
        calibration = rescale_calibration(calibration, replayed, refit_replay, spans.train_end)
    seconds = time.perf_counter() - t0
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
        train_end=int(spans.train_end.max()),
        test_start=int(spans.test_start.max()),
        test_steps=int((spans.end - spans.test_start).max()),
        window=window,
        seconds=seconds,
        points_per_s=points / max(train_seconds, 1e-9),  # training windows only
        spans=spans,
        calibration=calibration,
        anomaly_thresholds=(
            {**thresholds, "series": {panel.names[i]: v for i, v in thresholds["series"].items()}}
            if thresholds
            else {}
        ),
        refit_epochs=refit_epochs,
        serving=choice,
        serving_errors=serving_errors,
        stat=stat_kept,
        served_holdout=served_holdout,
    )


def _epoch(
    windows: list[tuple[int, int]],
    limit: Tensor,
    epoch: int,
    epochs: int,
    ratio: float,
    *,
    net: nn.Module,
    model: nn.Module,
    optim: torch.optim.Optimizer,
    spec: F.FeatureSpec,
    config: TrainConfig,
    scaled: Tensor,
    start: int,
    floor: Tensor,
    q: Tensor,
    device: torch.device,
    on_progress: Callable[[Progress], None] | None,
) -> tuple[list[float], int]:
    """One pass over `windows` from a reset state, learning from the targets of each series
    before its own `limit` (S,). Returns (the windows' losses, points read)."""
    model.train()
    use_amp = config.amp and device.type == "cuda"
    state, losses, points, t0 = None, [], 0, time.perf_counter()
    scaled_cpu = scaled.cpu() if scaled.device.type != "cpu" else scaled
    n_rows = scaled.shape[0]
    # The origins' phase per window: the same on every rank (data parallel) and every rerun.
    phases = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    for k, (a, b) in enumerate(windows):
        if k < config.burn_in_windows:  # warm the state up; no loss from a cold state
            with torch.no_grad():
                _, state, _ = forward_window(net, spec, scaled, start, a, b, state)
            state = detach(state)
            continue
        y = F.targets(spec, scaled_cpu, F.origins(a, b), limit, floor=floor).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            pred, state, origins = forward_window(
                net,
                spec,
                scaled,
                start,
                a,
                b,
                state,
                targets=y,
                teacher_ratio=ratio,
                origin_stride=(
                    config.seq2seq_origin_stride
                    if config.kind == "seq2seq"
                    else config.origin_stride
                ),
                phase=int(torch.randint(config.origin_stride, (1,), generator=phases)),
            )
        state = detach(state)  # truncated BPTT: the graph ends at the window edge
        y = y[:, origins - a]
        if torch.isnan(y).all():
            continue  # nothing to learn here (every series past its limit)
        loss = ev.pinball_loss(pred.float(), y, q)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        optim.step()
        losses.append(float(loss.detach()))
        points += n_rows * (b - a)
        if on_progress is not None:
            rate = points / max(time.perf_counter() - t0, 1e-9)
            on_progress(Progress(epoch + 1, epochs, k + 1, len(windows), losses[-1], rate))
    return losses, points


def _teacher_ratio(config: TrainConfig, epoch: int, epochs: int) -> float:
    first, last = config.teacher_forcing
    if epochs <= 1:
        return first
    return first + (last - first) * min(1.0, epoch / (epochs - 1))


@torch.no_grad()
def _val_loss(
    model: nn.Module,
    spec: F.FeatureSpec,
    scaled: Tensor,
    start: int,
    window: int,
    lo: Tensor,
    hi: Tensor,
    q: Tensor,
) -> float:
    """Pinball loss of the forecasts whose targets lie in each series' [lo, hi)."""
    origins, pred = replay(model, spec, scaled, start, window, int(lo.min()) - 1)
    keep = origins < int(hi.max()) - 1
    actual = F.targets(spec, scaled.cpu(), origins[keep], hi, floor=lo)
    return float(ev.pinball_loss(pred[:, keep], actual, q.cpu()))


@torch.no_grad()
def holdout_calibration(
    model: nn.Module,
    spec: F.FeatureSpec,
    scaled: Tensor,
    start: int,
    window: int,
    lo: Tensor,
    hi: Tensor,
    quantiles: tuple[float, ...],
    replayed: tuple[Tensor, Tensor] | None = None,
    served: list[str] | None = None,
    stat: Tensor | None = None,
    thresholds: dict[str, Any] | None = None,
) -> list[float]:
    """Per horizon step, the conformal correction of the raw band in band widths, from the
    forecasts whose targets lie in each series' held-out [lo, hi) (the early-stopping and
    test tails, which the chosen weights never learnt from). Scale-free, so it pools series
    of any size: served = [lower - c * width, upper + c * width]. With `served` (each
    series' member, forecaster.serving) the band is measured where it is served: moved to
    that member's median (`stat`: the challenger's forecasts from the replay's origins, in
    the same scaled units). Given a `thresholds` dict, fills it with the anomaly thresholds
    measured on the same forecasts (_holdout_thresholds; series by row)."""
    replayed = replayed or replay(model, spec, scaled, start, window, int(lo.min()) - 1)
    keep = replayed[0] >= int(lo.min()) - 1
    origins, pred = _kept_from(replayed, int(lo.min()) - 1)
    actual = F.targets(spec, scaled, origins, hi, floor=lo)  # (S, T, H)
    if served and any(m != "model" for m in served):
        pred = serving.serve(
            pred,
            F.seasonal_naive(spec, scaled, origins, "daily"),
            F.seasonal_naive(spec, scaled, origins, "weekly"),
            served,
            None if stat is None else stat[:, keep],
        )
    lower, upper = pred[..., 0], pred[..., -1]
    scores = band_scores(lower, upper, actual)
    level = round(quantiles[-1] - quantiles[0], 6)
    out = []
    for h in range(spec.horizon):
        col = scores[:, :, h]
        col = col[~torch.isnan(col)]
        out.append(conformal_quantile(col.tolist(), level) if col.numel() else 0.0)
    if thresholds is not None:
        thresholds.update(_holdout_thresholds(origins, pred, actual, out, spec, start))
    return out


def _holdout_thresholds(
    origins: Tensor,
    pred: Tensor,
    actual: Tensor,
    corrections: list[float],
    spec: F.FeatureSpec,
    start: int,
) -> dict[str, Any]:
    """Anomaly thresholds measured on the holdout, per series (by row) and pooled: the
    forecasts from every horizon-th origin (each target forecast once, as predict does
    window by window), their band corrected as served, the evidence of each actual
    (forecaster.anomaly; each series' runs scaled by the correlation of its deviations over
    the holdout) and the threshold meeting the default false-alarm rate. They serve
    a new model's series until each has two weeks of its own scored points."""
    import polars as pl

    from forecaster import anomaly

    h = spec.horizon
    take = torch.arange(0, origins.numel(), h)
    o, p, a = origins[take], pred[:, take], actual[:, take]  # (T',), (S, T', H, Q), (S, T', H)
    c = torch.tensor(corrections, dtype=p.dtype).view(1, 1, -1)
    lo, hi, mid = p[..., 0], p[..., -1], p[..., p.shape[-1] // 2]
    width = hi - lo
    lower, upper = lo - c * width, hi + c * width
    steps = (o.view(-1, 1) + torch.arange(1, h + 1).view(1, -1)).flatten()  # (T' * H,)
    n_series = p.shape[0]
    frame = pl.DataFrame(
        {
            "series_id": np.repeat(np.arange(n_series), steps.numel()),
            "ts": np.tile(((start + steps.numpy() * spec.freq_seconds) * 1_000_000), n_series),
            "actual": a.reshape(n_series, -1).double().numpy().ravel(),
            "yhat": mid.reshape(n_series, -1).double().numpy().ravel(),
            "yhat_lower": lower.reshape(n_series, -1).double().numpy().ravel(),
            "yhat_upper": upper.reshape(n_series, -1).double().numpy().ravel(),
            "freq_s": np.full(n_series * steps.numel(), spec.freq_seconds),
        }
    )
    frame = frame.with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))
    frame = frame.filter(pl.col("actual").is_not_nan()).sort("series_id", "ts")
    if frame.is_empty():
        return {}
    frame = anomaly.with_correlation(frame.with_columns(anomaly.deviation(frame)))
    frame = frame.with_columns(anomaly.evidence(frame, rho="rho"))
    rate, gap = anomaly.DEFAULT_RATE, anomaly.DEFAULT_GAP
    per = {int(row): value for row, value in anomaly.choose_thresholds(frame, rate, gap).items()}
    pooled = anomaly.choose_threshold(frame, rate, gap)
    return {
        "rate": rate,
        "gap": gap,
        "pooled": pooled.value if pooled.measured else None,
        "series": per,
    }


def rescale_calibration(
    corrections: list[float],
    before: tuple[Tensor, Tensor],
    after: tuple[Tensor, Tensor],
    lo: Tensor,
) -> list[float]:
    """Per horizon step, the correction that gives the band of the `after` replay the
    served width (1 + 2c) x width that `corrections` gave the `before` replay, by the
    ratio of their median raw widths over the origins from lo.min() - 1."""
    first = int(lo.min()) - 1
    _, b = _kept_from(before, first)
    _, a = _kept_from(after, first)
    out = []
    for h, c in enumerate(corrections):
        wb = (b[:, :, h, -1] - b[:, :, h, 0]).flatten()
        wa = (a[:, :, h, -1] - a[:, :, h, 0]).flatten()
        mb, ma = float(wb.median()), float(wa.median())
        if not (ma > 0 and mb > 0):
            out.append(c)
            continue
        out.append(((1 + 2 * c) * mb / ma - 1) / 2)
    return out


def _challenger(
    panel: Panel, spans: Spans, spec: F.FeatureSpec, origins: Tensor
) -> tuple[dict[str, Any] | None, Tensor | None]:
    """fit_challenger, or (None, None) with a warning where the fit fails: the network and
    the naives still serve."""
    try:
        return fit_challenger(panel, spans, spec, origins)
    except Exception as exc:  # a statistical fit failing must not lose the trained network
        log.warning("the MSTL challenger could not be fitted; serving without it", error=str(exc))
        return None, None


def _refit_challenger(
    params: stats.StatParams,
    values: np.ndarray,
    first: np.ndarray,
    end: np.ndarray,
    step0: int,
    spec: F.FeatureSpec,
) -> tuple[stats.StatParams, np.ndarray]:
    """MSTL fitted again on each series' newest points up to `end`, with `params`' seasons
    and gains: the parameters and the state after each series' last point."""
    served, state = stats.fit(
        values, first, end, step0, spec.season_day, spec.season_week, only=params.seasons
    )
    served.gamma = np.array(
        [params.gamma[:, params.seasons.index(s)] for s in served.seasons]
    ).T.reshape(len(values), len(served.seasons))
    return served, state


def fit_challenger(
    panel: Panel, spans: Spans, spec: F.FeatureSpec, origins: Tensor
) -> tuple[dict[str, Any], Tensor]:
    """The statistical challenger (forecaster.stats): MSTL fitted on each series' training
    span, its seasonal-update gains chosen on the early-stopping tail, then its state rolled
    over the held-out tails to each series' last point. Returns what a checkpoint keeps
    (params, states, the epoch step each state holds up to) and its forecasts (S, T, H),
    raw units, from each of `origins` (grid indices), NaN where an origin precedes the fit's
    end (the fit saw those targets)."""
    values = panel.values.double().numpy()
    step0 = panel.start // panel.freq_seconds
    first, train_end = spans.first.numpy(), spans.train_end.numpy()
    test_start, end = spans.test_start.numpy(), spans.end.numpy()
    params, fitted = stats.fit(values, first, train_end, step0, spec.season_day, spec.season_week)
    lo = int(train_end.min())
    idx = np.arange(values.shape[1])
    stop_tail = np.where(idx[None, :] < test_start[:, None], values, np.nan)[:, lo:]
    params.gamma = stats.choose_gamma(
        params, fitted, stop_tail, step0 + lo, spec.horizon, active_from=step0 + train_end
    )
    state, pred = stats.update(
        params,
        fitted,
        values[:, lo:],
        step0 + lo,
        spec.horizon,
        active_from=step0 + train_end,
        active_to=step0 + end - 1,
    )
    # From origin lo - 1: the fit's own end, for the series whose training ends there.
    first_pred = stats.forecast(params, fitted, step0 + lo - 1, spec.horizon)
    first_pred[train_end != lo] = np.nan
    every = np.concatenate([first_pred[:, None], pred], axis=1)  # origins lo - 1 .. n - 1
    at = (origins - (lo - 1)).clamp(0, every.shape[1] - 1).numpy()
    out = torch.from_numpy(every[:, at]).float()
    out[:, torch.from_numpy(origins.numpy() < lo - 1)] = torch.nan
    # What serves: the decomposition refitted on each series' newest points (the fit above
    # ended before the tails so that they could choose its gains and weigh it honestly),
    # with the gains chosen there and the same seasons; where that refit fails, the first
    # fit's state rolled over the tails serves.
    served = params
    try:
        served, state = _refit_challenger(params, values, first, end, step0, spec)
    except Exception as exc:  # noqa: BLE001 - the rolled state is a sound challenger still
        log.warning(
            "the MSTL challenger could not be refitted; its rolled state serves", error=str(exc)
        )
    kept = {
        "params": served.to_dict(),
        "state": state.astype(float).tolist(),
        "step": (step0 + end - 1).astype(int).tolist(),
    }
    return kept, out
