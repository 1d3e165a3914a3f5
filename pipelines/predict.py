"""The predict job: for the champion model, absorb each series' new points and forecast.

Series whose state and watermark agree are advanced together as one batch (chunked). For
each chunk, the forecasts (the model's and the seasonal-naive baselines'), the new states
and the window-edge snapshots commit in ONE transaction: a crash anywhere leaves either all
of a chunk or none of it, and the next run redoes exactly what is missing. A series with
nothing new is not touched, so re-running writes nothing.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import structlog
import torch

from forecaster.checkpoints import load_checkpoint
from forecaster.errors import ForecasterError
from forecaster.inference import (
    advance,
    history_steps,
    lag_offsets,
    seasonal_naive_at,
    state_from_rows,
    state_to_rows,
)
from forecaster.store import Store
from forecaster.trained import TrainedModel

log = structlog.get_logger(__name__)
BASELINES = ("daily", "weekly")


class NoChampionError(ForecasterError, LookupError):
    def __init__(self) -> None:
        super().__init__("no champion model to predict with: run `forecaster train` first")


@dataclass
class PredictSummary:
    version_id: int = 0
    series_advanced: int = 0
    points_absorbed: int = 0
    forecasts_written: int = 0
    skipped_unknown: list[str] = field(default_factory=list)  # series the model has no scaler for

    def line(self) -> str:
        extra = (
            f"; {len(self.skipped_unknown)} series unknown to the model"
            if self.skipped_unknown
            else ""
        )
        return (
            f"model v{self.version_id}: {self.series_advanced} series advanced over "
            f"{self.points_absorbed} new points, {self.forecasts_written} forecast rows written{extra}"
        )


@functools.lru_cache(maxsize=4)
def _load(uri: str, sha256: str) -> TrainedModel:
    return TrainedModel.from_checkpoint(load_checkpoint(uri, sha256))


def run_predict(
    store: Store, *, warmup_steps: int = 336, keep_snapshots: int = 7, chunk: int = 2048
) -> PredictSummary:
    champion = store.champion()
    if champion is None:
        raise NoChampionError()
    vid = champion["id"]
    trained = _load(champion["uri"], champion["sha256"])
    spec = trained.spec
    step = timedelta(seconds=spec.freq_seconds)
    summary = PredictSummary(version_id=vid)
    row_of = {name: i for i, name in enumerate(trained.names)}
    targets = [t for t in store.prediction_targets() if t["watermark"] is not None]
    summary.skipped_unknown = [t["name"] for t in targets if t["name"] not in row_of]
    targets = [t for t in targets if t["name"] in row_of and t["freq_seconds"] == spec.freq_seconds]
    states = store.load_states(vid, [t["id"] for t in targets])

    groups: dict[tuple[datetime | None, datetime, int], list[dict]] = defaultdict(list)
    for t in targets:
        saved = states.get(t["id"])
        state_ts = saved[2] if saved else None
        if state_ts is not None and state_ts >= t["watermark"]:
            continue  # nothing new
        groups[(state_ts, t["watermark"], t["window_seconds"])].append(t)

    for (state_ts, watermark, window_s), members in sorted(groups.items(), key=lambda kv: kv[0][1]):
        for i in range(0, len(members), chunk):
            part = members[i : i + chunk]
            first_new = (
                state_ts + step if state_ts is not None else watermark - (warmup_steps - 1) * step
            )
            written, n_new = _predict_chunk(
                store, trained, vid, part, states, first_new, watermark, window_s, keep_snapshots
            )
            summary.series_advanced += len(part)
            summary.points_absorbed += n_new * len(part)
            summary.forecasts_written += written
    log.info(
        "predict done", **{k: v for k, v in summary.__dict__.items() if k != "skipped_unknown"}
    )
    return summary


def _predict_chunk(
    store: Store,
    trained: TrainedModel,
    vid: int,
    members: list[dict],
    states: dict,
    first_new: datetime,
    watermark: datetime,
    window_s: int,
    keep_snapshots: int,
) -> tuple[int, int]:
    spec = trained.spec
    step_s = spec.freq_seconds
    grid_start = first_new - timedelta(seconds=history_steps(spec) * step_s)
    start = int(grid_start.timestamp())
    n = int((watermark - grid_start).total_seconds()) // step_s + 1
    lo = n - (int((watermark - first_new).total_seconds()) // step_s + 1)
    ids = [m["id"] for m in members]
    step = timedelta(seconds=step_s)
    spans = [(first_new, watermark)] + [
        (watermark + a * step, watermark + b * step) for a, b in lag_offsets(spec)
    ]
    frame = store.recent_values(ids, spans)
    values = torch.full((len(ids), n), float("nan"))
    if frame.height:
        pos = {sid: r for r, sid in enumerate(ids)}
        rows = frame["series_id"].replace_strict(pos, return_dtype=pl.Int64).to_torch()
        cols = ((frame["ts"].dt.epoch("s") - start) // step_s).to_torch()
        keep = (cols >= 0) & (cols < n)
        values[rows[keep], cols[keep]] = (
            frame["value"].fill_null(float("nan")).to_torch().float()[keep]
        )
    row_of = {name: i for i, name in enumerate(trained.names)}
    scaler_rows = torch.tensor([row_of[m["name"]] for m in members])
    saved = [states.get(sid) for sid in ids]
    state = None
    if saved[0] is not None:
        state = state_from_rows([s[0] for s in saved], saved[0][1], trained.model_config.kind)
    out = advance(
        trained,
        values,
        start,
        lo,
        n,
        state,
        window_steps=window_s // step_s,
        scaler_rows=scaler_rows,
    )

    state_rows, shape = state_to_rows(out.state)
    new_states = [
        {"series_id": sid, "state": b, "shape": shape, "state_ts": watermark}
        for sid, b in zip(ids, state_rows, strict=True)
    ]
    snapshots = []
    for idx, edge_state in out.edge_states:
        edge_rows, _ = state_to_rows(edge_state)
        edge_ts = datetime.fromtimestamp(start + idx * step_s, UTC)
        wid = (start + idx * step_s) // window_s
        snapshots += [
            {"series_id": sid, "window_id": wid, "state": b, "shape": shape, "state_ts": edge_ts}
            for sid, b in zip(ids, edge_rows, strict=True)
        ]
    corrections = store.calibration_for(f"v{vid}")
    forecasts = _forecast_rows(
        trained, vid, ids, out.quantiles, values, n - 1, watermark, corrections
    )
    with store.begin() as conn:
        written = store.save_prediction(
            conn,
            version_id=vid,
            states=new_states,
            snapshots=snapshots,
            forecasts=forecasts,
            keep_snapshots=keep_snapshots,
        )
    return written, n - lo


def _forecast_rows(
    trained: TrainedModel,
    vid: int,
    ids: list[int],
    q: torch.Tensor,
    values: torch.Tensor,
    origin: int,
    origin_ts: datetime,
    corrections: dict[int, float],
) -> list[dict]:
    """Rows for the forecasts table. The band served is the raw one widened (or narrowed) by
    the conformal correction of its horizon step, never past the median."""
    spec = trained.spec
    quantiles = trained.model_config.quantiles
    lo_i, mid, hi_i = 0, len(quantiles) // 2, len(quantiles) - 1
    level = round(quantiles[hi_i] - quantiles[lo_i], 6)
    step = timedelta(seconds=spec.freq_seconds)
    n_series, horizon = len(ids), spec.horizon
    sid = np.repeat(np.asarray(ids), horizon)
    steps = np.tile(np.arange(1, horizon + 1), n_series)
    targets = [origin_ts + int(h) * step for h in range(1, horizon + 1)] * n_series
    yhat = q[..., mid].reshape(-1).double().numpy()
    raw_lo, raw_hi = (
        q[..., lo_i].reshape(-1).double().numpy(),
        q[..., hi_i].reshape(-1).double().numpy(),
    )
    corr = np.tile(np.array([corrections.get(h, 0.0) for h in range(1, horizon + 1)]), n_series)
    floor = 0.0 if trained.nonnegative else -np.inf
    lower = np.maximum(floor, np.minimum(yhat, raw_lo - corr))
    upper = np.maximum(yhat, raw_hi + corr)
    model = f"v{vid}"
    rows = [
        {
            "series_id": int(sid[i]),
            "model": model,
            "model_version_id": vid,
            "origin_ts": origin_ts,
            "horizon_step": int(steps[i]),
            "target_ts": targets[i],
            "yhat": float(yhat[i]),
            "yhat_lower": float(lower[i]),
            "yhat_upper": float(upper[i]),
            "raw_lower": float(raw_lo[i]),
            "raw_upper": float(raw_hi[i]),
            "interval_level": level,
        }
        for i in range(n_series * horizon)
    ]
    for season in BASELINES:
        naive = (
            seasonal_naive_at(spec, values, origin, season).reshape(-1).double().numpy()
        )  # (S * H,)
        rows += [
            {
                "series_id": int(sid[i]),
                "model": f"seasonal_naive_{season}",
                "model_version_id": None,
                "origin_ts": origin_ts,
                "horizon_step": int(steps[i]),
                "target_ts": targets[i],
                "yhat": float(naive[i]),
                "yhat_lower": None,
                "yhat_upper": None,
                "interval_level": None,
                "raw_lower": None,
                "raw_upper": None,
            }
            for i in np.flatnonzero(~np.isnan(naive))  # no value a season back: no forecast
        ]
    return rows
