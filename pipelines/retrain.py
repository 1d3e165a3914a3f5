"""The retrain job: train a challenger, score it against the champion on a recent holdout,
and promote it only if what it serves is better, after its states are built.

1. Read the last `retrain.history` of every stored series (nothing before `min_history` is
   stored: skipped).
2. Train a challenger with the same loop as `forecaster train`: fine-tuned from the
   champion's weights by default (`retrain.fine_tune`, or full=True for a fresh start); its
   last `holdout` of steps is a test tail that no choice sees, the week before it picks the
   epoch.
3. Score what each version serves (forecaster.holdout: its per-series member, the network,
   a naive or its MSTL state) on that same holdout (same series, same origins, same MASE
   scale), from the champion's newest training point on, so neither is scored on forecasts
   it learnt from; the challenger as it stood before its refit through the tail. The
   challenger is registered either way (a candidate, for the record).
4. If it beats the champion by `min_gain` (or there is no champion yet), build its states
   from recent history through the predict job (forecasts included, so it serves at once),
   then promote it in one transaction: the old champion serves until that commit.

Training runs wherever the dispatcher puts it (a separate process in the daemon, or Ray
Train workers: `trainer` and `predict` are how the Ray backend swaps in its own, same-loop
versions), never on the scheduler's thread, so predictions keep using the champion meanwhile.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import structlog
import torch

from forecaster.checkpoints import load_checkpoint, save_checkpoint
from forecaster.config import Settings
from forecaster.errors import ConfigError
from forecaster.panel import Panel
from forecaster.store import Store
from forecaster.trained import TrainedModel
from forecaster.training import (
    Progress,
    TrainConfig,
    TrainResult,
    train,
    trained_model,
    version_served_errors,
)
from pipelines.predict import run_predict
from pipelines.train import data_until, load_panel, register_trained, train_config

log = structlog.get_logger(__name__)


@dataclass
class RetrainOutcome:
    decision: str  # promoted | kept | skipped
    reason: str
    challenger_id: int | None = None
    champion_id: int | None = None  # the champion when the job started
    challenger_mase: float | None = None
    champion_mase: float | None = None
    seconds: float = 0.0

    def line(self) -> str:
        def fmt(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"

        scores = (
            f" (holdout MASE challenger {fmt(self.challenger_mase)}, "
            f"champion {fmt(self.champion_mase)})"
            if self.challenger_id is not None
            else ""
        )
        who = f"v{self.challenger_id} " if self.challenger_id is not None else ""
        return f"retrain: {who}{self.decision}: {self.reason}{scores} in {self.seconds:.0f} s"


def retrain_config(
    settings: Settings, champion: dict | None, holdout_steps: int, store: Store | None = None
) -> TrainConfig:
    """The challenger's training config: the champion's architecture (or [retrain].kind /
    [training] for a first model), retrain.epochs, the holdout as the test tail."""
    # retrain.epochs bounds every retrain, a first model's too: the daemon's cost stays
    # predictable (`forecaster train` scales its epochs with the history instead).
    config = train_config(
        settings,
        store,
        kind=settings.retrain.kind,
        epochs=settings.retrain.epochs,
        val_steps=holdout_steps,
        stop_steps=holdout_steps,
    )
    if champion is not None:
        trained_with = (champion.get("config") or {}).get("training") or {}
        same = {
            key: trained_with[key]
            for key in ("kind", "hidden", "layers", "dropout", "horizon", "window", "bidirectional")
            if key in trained_with
        }
        if "quantiles" in trained_with:
            same["quantiles"] = tuple(trained_with["quantiles"])
        config = replace(config, **same)
    return config


def run_retrain(
    store: Store,
    settings: Settings,
    *,
    now: datetime,
    full: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
    config_override: dict[str, Any] | None = None,
    run_key: str | None = None,
    trainer: Callable[..., TrainResult] | None = None,
    predict: Callable[..., Any] | None = None,
) -> RetrainOutcome:
    """See the module docstring. config_override replaces TrainConfig fields (tests use it
    to cripple a challenger on purpose). run_key names the job run: a run killed after it
    registered its challenger is finished from that version when done again, not trained
    twice. trainer replaces `forecaster.training.train` (same signature) and predict
    `run_predict` (the Ray backend's data-parallel and sharded ones)."""
    t0 = time.perf_counter()
    r = settings.retrain
    champion = store.champion()
    champion_id = champion["id"] if champion else None
    done = _version_of_run(store, run_key)
    if done is not None:
        h = done["metrics"]["holdout"]
        outcome = RetrainOutcome(
            "kept",
            "",
            challenger_id=done["id"],
            champion_id=h.get("champion_id"),
            challenger_mase=h.get("challenger"),
            champion_mase=h.get("champion"),
        )
        return _decide(store, settings, outcome, t0, predict)
    # History ends at the newest stored point (not the clock: a replayed source's data may
    # be years old), and never after now.
    newest = max(
        (t["watermark"] for t in store.prediction_targets() if t["watermark"]), default=now
    )
    until = min(now, newest)
    try:
        panel = load_panel(store, since=until - r.history, until=until)
    except ConfigError as exc:
        return RetrainOutcome("skipped", str(exc), champion_id=champion_id)
    have = timedelta(seconds=panel.n_steps * panel.freq_seconds)
    if have < r.min_history:
        return RetrainOutcome(
            "skipped",
            f"{have} of history stored, retraining needs {r.min_history}",
            champion_id=champion_id,
            seconds=time.perf_counter() - t0,
        )

    # Nothing new since the newest version was trained: training again would register a
    # copy of it (a stalled source and a weekly cron, or a command run twice).
    newest_version = max(store.list_model_versions(), key=lambda v: v["id"], default=None)
    late = any(t["late_from"] is not None for t in store.prediction_targets())
    if (
        newest_version is not None
        and not full
        and not late
        and (newest_version["metrics"] or {}).get("data_until") == data_until(panel)
    ):
        return RetrainOutcome(
            "skipped",
            f"nothing new since v{newest_version['id']} was trained on the data up to "
            f"{data_until(panel)}",
            champion_id=champion_id,
            seconds=time.perf_counter() - t0,
        )

    # In the model's own steps: a source may override the global frequency.
    holdout_steps = int(r.holdout.total_seconds() // panel.freq_seconds)
    config = retrain_config(settings, champion, holdout_steps, store)
    if config_override:
        config = replace(config, **config_override)
    champ_model = _load(champion) if champion else None
    init = None
    if champ_model is not None and r.fine_tune and not full:
        if champ_model.model_config.kind == config.kind:
            init = {k: v.clone() for k, v in champ_model.model.state_dict().items()}
    result = (trainer or train)(panel, config, on_progress=on_progress, init_state_dict=init)
    result.metrics = _finite(result.metrics)  # a diverged run scores NaN: JSON has no NaN
    result.history = _finite(result.history)
    challenger = trained_model(result)
    # Both scored on what they serve (forecaster.holdout): the series the champion knows,
    # each series' own test tail (series may end at different times), the same origins and
    # MASE scale, and only forecasts neither version has learnt from.
    assert result.spans is not None
    known = [n for n in panel.names if champ_model is None or n in champ_model.names]
    rows = torch.tensor([panel.names.index(n) for n in known], dtype=torch.long)
    test_start = result.spans.test_start[rows]
    challenger_errors = result.served_holdout
    if challenger_errors is None:  # a trainer that does not score it: the refit network's
        challenger_errors = version_served_errors(challenger, panel, result.spans.test_start)
    from_origin = test_start - 1
    champion_mase, unseen = None, True
    if champ_model is not None:
        sub = _subpanel(panel, known)
        champion_errors = version_served_errors(champ_model, sub, test_start)
        seen = _grid_index(panel, (champion["metrics"] or {}).get("data_until"))
        after = from_origin.clamp(min=seen)
        # Forecasts from before the champion's newest training point are partly in-sample
        # for it; they are left out unless too little would be left (a champion trained
        # moments ago: then both are scored on the whole tail).
        unseen = champion_errors.scored(None, after) >= len(known) * challenger.spec.horizon
        if unseen:
            from_origin = after
        champion_mase = champion_errors.mase(None, from_origin)
    challenger_mase = challenger_errors.mase(rows, from_origin)

    uri, sha = save_checkpoint(challenger.to_checkpoint(), settings.checkpoint_dir)
    with store.begin() as conn:
        challenger_id = register_trained(
            store,
            conn,
            config,
            result,
            panel,
            uri=uri,
            sha256=sha,
            metrics=_finite(
                {
                    **result.metrics,
                    "holdout": {
                        "challenger": challenger_mase,
                        "champion": champion_mase,
                        "champion_id": champion_id,
                        "measure": "served",  # what each version serves, not its network
                        "unseen_by_champion": unseen,
                    },
                    "run": run_key,
                }
            ),
            stage="candidate",
            parent_id=champion_id if init is not None else None,
        )
    outcome = RetrainOutcome(
        "kept",
        "",
        challenger_id=challenger_id,
        champion_id=champion_id,
        challenger_mase=challenger_mase,
        champion_mase=champion_mase,
    )
    return _decide(store, settings, outcome, t0, predict)


def _decide(
    store: Store,
    settings: Settings,
    outcome: RetrainOutcome,
    t0: float,
    predict: Callable[..., Any] | None = None,
) -> RetrainOutcome:
    """Promote the registered challenger if it won: its states first, then the promotion
    (the new champion serves from its first scrape). Safe to run again for the same one."""
    r = settings.retrain
    cid, champion_id = outcome.challenger_id, outcome.champion_id
    assert cid is not None
    mase, champ = outcome.challenger_mase, outcome.champion_mase
    current = store.champion()
    if current is not None and current["id"] == cid:
        outcome.decision, outcome.reason = "promoted", "promoted before the restart"
    elif mase is None or not math.isfinite(mase):
        outcome.reason = "the challenger diverged (its holdout error is not finite)"
    elif champ is not None and not mase < champ * (1 - r.min_gain):
        outcome.reason = f"not better than the champion v{champion_id}"
    else:
        if current is not None:  # its first bands calibrated like the champion's
            with store.begin() as conn:
                store.copy_calibration(conn, f"v{current['id']}", f"v{cid}")
        (predict or run_predict)(store, version_id=cid, warmup=r.warmup, device=settings.device)
        with store.begin() as conn:
            store.promote(conn, cid)
        outcome.decision = "promoted"
        outcome.reason = (
            f"better than the champion v{champion_id}" if champion_id else "the first model"
        )
    outcome.seconds = time.perf_counter() - t0
    log.info("retrain done", **asdict(outcome))
    return outcome


def _version_of_run(store: Store, run_key: str | None) -> dict | None:
    if run_key is None:
        return None
    for v in store.list_model_versions():
        if (v["metrics"] or {}).get("run") == run_key:
            return v
    return None


def _load(version: dict) -> TrainedModel:
    return TrainedModel.from_checkpoint(load_checkpoint(version["uri"], version["sha256"]))


def _subpanel(panel: Panel, names: list[str]) -> Panel:
    idx = torch.tensor([panel.names.index(n) for n in names], dtype=torch.long)
    return Panel(
        names=names, start=panel.start, freq_seconds=panel.freq_seconds, values=panel.values[idx]
    )


def _grid_index(panel: Panel, iso: str | None) -> int:
    """The panel's grid index of an ISO time (a version's data_until); -1 for None."""
    if not iso:
        return -1
    epoch = datetime.fromisoformat(iso).timestamp()
    return int((epoch - panel.start) // panel.freq_seconds)


def _finite(value: Any) -> Any:
    """The same structure with NaN and infinities replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
