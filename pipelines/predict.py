"""The predict job: for the champion model, absorb each series' new points and forecast.

Series whose state and watermark agree are advanced together as one batch (chunked). For
each chunk, the forecasts (the model's and the seasonal-naive baselines'), the new states
and the window-edge snapshots commit in ONE transaction: a crash anywhere leaves either all
of a chunk or none of it, and the next run redoes exactly what is missing. A series with
nothing new is not touched, so re-running writes nothing.

`series_ids` restricts a pass to some series: the Ray backend runs one pass per shard of
series, each in its own worker, with the same transactions (pipelines.backends.ray).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import structlog
import torch

from forecaster import calibration, serving, stats
from forecaster.checkpoints import load_checkpoint
from forecaster.errors import ForecasterError
from forecaster.features import FeatureSpec
from forecaster.inference import (
    advance,
    history_steps,
    lag_offsets,
    seasonal_naive_at,
    stack_states,
    state_from_rows,
    state_to_rows,
    tracked_origins,
)
from forecaster.panel import Scalers
from forecaster.store import Store
from forecaster.store.prediction import ledger_rows
from forecaster.trained import TrainedModel
from forecaster.training import resolve_device

log = structlog.get_logger(__name__)
BASELINES = ("daily", "weekly")
CHALLENGER = stats.MODEL  # the MSTL challenger's own forecasts
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class NoChampionError(ForecasterError, LookupError):
    def __init__(self) -> None:
        super().__init__("no champion model to predict with: run `forecaster train` first")


@dataclass
class PredictSummary:
    version_id: int = 0
    series_advanced: int = 0
    points_absorbed: int = 0
    forecasts_written: int = 0
    series_rewound: int = 0  # late data: restored from a snapshot and re-advanced
    # Series advanced that the version was not trained on (new series, own scalers).
    untrained_advanced: int = 0
    # Series stored at another step than the model's: it cannot serve them.
    skipped_freq: list[str] = field(default_factory=list)

    def line(self) -> str:
        extra = ""
        if self.untrained_advanced:
            extra += f" ({self.untrained_advanced} of them new to the model)"
        if self.skipped_freq:
            extra += (
                f"; {len(self.skipped_freq)} series skipped: stored at another step than the "
                "model's"
            )
        if self.series_rewound:
            extra += f"; {self.series_rewound} series re-forecast after late points"
        return (
            f"model v{self.version_id}: {self.series_advanced} series advanced over "
            f"{self.points_absorbed} new points, {self.forecasts_written} forecast rows written{extra}"
        )


@functools.lru_cache(maxsize=4)
def load_trained(uri: str, sha256: str) -> TrainedModel:
    """A registered checkpoint, loaded once per process (checkpoints are immutable)."""
    return TrainedModel.from_checkpoint(load_checkpoint(uri, sha256))


def band_corrections(store: Store, trained: TrainedModel, vid: int) -> dict[int, float]:
    """horizon step -> the correction served, in band widths: evaluate's where it has
    written one, else the one measured on the model's training holdout."""
    return {**trained.holdout_corrections, **store.calibration_for(f"v{vid}")}


def run_predict(
    store: Store,
    *,
    warmup: timedelta | None = None,
    warmup_steps: int | None = None,
    keep_snapshots: int = 7,
    chunk: int = 2048,
    version_id: int | None = None,
    device: str = "cpu",
    series_ids: Collection[int] | None = None,
) -> PredictSummary:
    """One pass for the champion (or, to build a challenger's states before it is promoted,
    the model version `version_id`), on `device` ("auto" picks CUDA when there is one), over
    every series or only those of `series_ids`. A series without a state is warmed up over
    `warmup` (converted with the model's own step, which may differ from the global
    frequency), or `warmup_steps`; by default two of the model's weeks (its long season)."""
    champion = store.champion() if version_id is None else store.model_version(version_id)
    if champion is None:
        raise NoChampionError()
    vid = champion["id"]
    trained = load_trained(champion["uri"], champion["sha256"])
    trained.model.to(resolve_device(device))
    spec = trained.spec
    warmup_steps = warmup_steps_for(spec, warmup, warmup_steps)
    summary = PredictSummary(version_id=vid)
    row_of = {name: i for i, name in enumerate(trained.names)}
    targets = [t for t in store.prediction_targets(series_ids) if t["watermark"] is not None]
    summary.skipped_freq = [t["name"] for t in targets if t["freq_seconds"] != spec.freq_seconds]
    targets = [t for t in targets if t["freq_seconds"] == spec.freq_seconds]
    known = [t for t in targets if t["name"] in row_of]
    new = [t for t in targets if t["name"] not in row_of]
    args = (store, vid, warmup_steps, chunk, keep_snapshots, summary)
    if known:
        _serve(trained, known, *args)
    if new:  # series that came after training: the same network, their own scalers
        before = summary.series_advanced + summary.series_rewound
        _serve(_untrained_view(store, trained, vid, new, warmup_steps), new, *args)
        summary.untrained_advanced = summary.series_advanced + summary.series_rewound - before
    log.info("predict done", **{k: v for k, v in summary.__dict__.items() if k != "skipped_freq"})
    return summary


def _untrained_view(
    store: Store, trained: TrainedModel, vid: int, targets: list[dict], warmup_steps: int
) -> TrainedModel:
    """The version as it serves series it was not trained on: the same network and band
    corrections, each series scaled by the robust scaler of its own stored points (fitted
    the first time it is served, from up to `warmup_steps` of them before its watermark,
    and kept in series_scalers, so its states stay in the same units), the network serving
    it (no member was chosen for it and the challenger has no fit for it)."""
    ids = [t["id"] for t in targets]
    have = store.series_scalers(vid, ids)
    missing = [t for t in targets if t["id"] not in have]
    if missing:
        step_s = trained.spec.freq_seconds
        by_watermark: dict[datetime, list[dict]] = defaultdict(list)
        for t in missing:
            by_watermark[t["watermark"]].append(t)
        rows = []
        for watermark, group in by_watermark.items():  # one read per shared watermark
            first = watermark - timedelta(seconds=(warmup_steps - 1) * step_s)
            values = _read_grid(
                store,
                [t["id"] for t in group],
                [(first, watermark)],
                int(first.timestamp()),
                step_s,
                warmup_steps,
            )
            fitted = Scalers.fit(values)
            counts = (~torch.isnan(values)).sum(dim=1)
            for i, t in enumerate(group):
                rows.append(
                    {
                        "series_id": t["id"],
                        "center": float(fitted.center[i]),
                        "scale": float(fitted.scale[i]),
                        "n_points": int(counts[i]),
                        "fitted_to": watermark,
                    }
                )
                log.info(
                    "serving a series the model was not trained on",
                    series=t["name"],
                    version_id=vid,
                    points=int(counts[i]),
                )
        store.save_series_scalers(vid, rows)
        have = store.series_scalers(vid, ids)
    scalers = Scalers(
        center=torch.tensor([have[i]["center"] for i in ids], dtype=torch.float32),
        scale=torch.tensor([have[i]["scale"] for i in ids], dtype=torch.float32),
    )
    meta = {k: v for k, v in trained.meta.items() if k not in ("stat", "serving", "serving_errors")}
    return replace(trained, scalers=scalers, names=[t["name"] for t in targets], meta=meta)


def _serve(
    trained: TrainedModel,
    targets: list[dict],
    store: Store,
    vid: int,
    warmup_steps: int,
    chunk: int,
    keep_snapshots: int,
    summary: PredictSummary,
) -> None:
    """Advance and forecast `targets` (all known to `trained`: its scalers hold them)."""
    step = timedelta(seconds=trained.spec.freq_seconds)
    states = store.load_states(vid, [t["id"] for t in targets])

    # Late data: a point changed at or before the time a state has absorbed. Such a series
    # is rewound to the snapshot before that point and re-advanced (below); a late mark
    # past the state is just cleared by the ordinary pass, which reads that point anyway.
    late = [
        t
        for t in targets
        if t["late_from"] is not None and t["id"] in states and t["late_from"] <= states[t["id"]][2]
    ]
    late_ids = {t["id"] for t in late}
    rewinds = _plan_rewinds(store, trained, vid, late, states, step, warmup_steps)

    groups: dict[tuple[datetime | None, datetime, int], list[dict]] = defaultdict(list)
    for t in targets:
        if t["id"] in late_ids:
            continue
        saved = states.get(t["id"])
        state_ts = saved[2] if saved else None
        if state_ts is not None and state_ts >= t["watermark"]:
            continue  # nothing new
        groups[(state_ts, t["watermark"], t["window_seconds"])].append(t)

    for (state_ts, watermark, window_s), members in sorted(groups.items(), key=lambda kv: kv[0][1]):
        # Chunks of consecutive ids: each chunk's rows are one range of every table's key.
        members.sort(key=lambda t: t["id"])
        first_new = (
            state_ts + step
            if state_ts is not None
            else _warmup_start(trained, members, watermark - (warmup_steps - 1) * step)
        )
        for i in range(0, len(members), chunk):
            part = members[i : i + chunk]
            saved = [states.get(m["id"]) for m in part]
            written, n_new = _advance_chunk(
                store,
                trained,
                vid,
                part,
                saved if saved[0] is not None else None,
                first_new,
                [watermark],
                window_s,
                keep_snapshots,
            )
            summary.series_advanced += len(part)
            summary.points_absorbed += n_new * len(part)
            summary.forecasts_written += written

    for (first_new, origins, window_s, _), plans in rewinds.items():
        plans.sort(key=lambda p: p.target["id"])
        for i in range(0, len(plans), chunk):
            part = plans[i : i + chunk]
            saved = [p.snapshot for p in part]
            written, n_new = _advance_chunk(
                store,
                trained,
                vid,
                [p.target for p in part],
                saved if saved[0] is not None else None,
                first_new,
                list(origins),
                window_s,
                keep_snapshots,
                reissued=[(p.target["id"], o) for p in part for o in p.stale_origins],
            )
            summary.series_rewound += len(part)
            summary.points_absorbed += n_new * len(part)
            summary.forecasts_written += written


def warmup_steps_for(
    spec: FeatureSpec, warmup: timedelta | None = None, warmup_steps: int | None = None
) -> int:
    """The warm-up in the model's steps: `warmup_steps` if given, else `warmup` divided by
    the model's own step, else two of its long seasons (two weeks on a clock grid)."""
    if warmup_steps is None:
        step = timedelta(seconds=spec.freq_seconds)
        warmup_steps = warmup // step if warmup is not None else 2 * spec.season_week
    return max(1, int(warmup_steps))


@dataclass
class _Rewind:
    target: dict  # the series' prediction_targets row
    snapshot: tuple[bytes, list[int], datetime] | None  # restored state; None: warm up again
    stale_origins: list[datetime]  # origins whose forecasts read the late point


def _warmup_start(trained: TrainedModel, members: list[dict], start: datetime) -> datetime:
    """Where a warm-up from no state begins: `start`, or earlier where the statistical
    challenger's fitted state (forecaster.stats) holds only older points, so it absorbs
    every point after them (once per series and version)."""
    challenger = trained.stat
    if challenger is None:
        return start
    row_of = {name: i for i, name in enumerate(trained.names)}
    step_s = trained.spec.freq_seconds
    held = min(int(challenger.step[row_of[m["name"]]]) for m in members)
    return min(start, datetime.fromtimestamp((held + 1) * step_s, UTC))


def _plan_rewinds(
    store: Store,
    trained: TrainedModel,
    vid: int,
    late: list[dict],
    states: dict,
    step: timedelta,
    warmup_steps: int,
) -> dict[tuple[datetime, tuple[datetime, ...], int, bool], list[_Rewind]]:
    """Group the late series by where their re-advance starts and which origins it re-issues.

    Each restarts from the newest window-edge snapshot before its late point and forecasts
    again from every origin at or after that point, then from its watermark if new points
    came too: the forecasts and state come out as if the point had been on time. With no
    snapshot that old (pruned, or the point predates the state's warm-up), the state is
    warmed up again before the first stale origin, as a new state would have been."""
    if not late:
        return {}
    since = {t["id"]: t["late_from"] for t in late}
    snaps = store.snapshots_before(vid, since)
    stale = store.issued_origins(f"v{vid}", since)
    out: dict[tuple[datetime, tuple[datetime, ...], int, bool], list[_Rewind]] = defaultdict(list)
    for t in late:
        sid, watermark = t["id"], t["watermark"]
        origins = list(stale[sid])
        if watermark > states[sid][2]:
            origins.append(watermark)
        elif not origins or origins[-1] != watermark:
            origins.append(watermark)  # the state must end at the watermark
        snap = snaps.get(sid)
        if snap is not None:
            first_new = snap[2] + step
        else:
            first_new = _warmup_start(trained, [t], origins[0] - (warmup_steps - 1) * step)
            log.warning(
                "late point older than the kept snapshots: warming the state up again",
                series=t["name"],
                late_from=t["late_from"].isoformat(),
            )
        # Restored snapshots and fresh warm-ups cannot share a batched state.
        key = (first_new, tuple(origins), t["window_seconds"], snap is not None)
        out[key].append(_Rewind(target=t, snapshot=snap, stale_origins=stale[sid]))
    return out


def _advance_chunk(
    store: Store,
    trained: TrainedModel,
    vid: int,
    members: list[dict],
    saved: list | None,
    first_new: datetime,
    origins: list[datetime],
    window_s: int,
    keep_snapshots: int,
    reissued: list[tuple[int, datetime]] | None = None,
) -> tuple[int, int]:
    """Advance the chunk's states (saved: one (bytes, shape, ts) per member, or None for a
    warm-up from zero) from first_new over the points to the last origin, forecasting from
    each origin, and commit forecasts, states, snapshots and cleared late marks together.
    Returns (forecast rows written, points absorbed per series)."""
    spec = trained.spec
    step_s = spec.freq_seconds
    step = timedelta(seconds=step_s)
    watermark = origins[-1]
    grid_start = first_new - timedelta(seconds=history_steps(spec) * step_s)
    start = int(grid_start.timestamp())
    n = int((watermark - grid_start).total_seconds()) // step_s + 1
    lo = n - (int((watermark - first_new).total_seconds()) // step_s + 1)
    ids = [m["id"] for m in members]
    # The head's seasonal lags from each origin, and from the origins the blend's trackers
    # forecast from (inference.advance), merged where they overlap.
    heads = list(origins)
    if serving.tracks(trained):
        first_step, last_step = (
            int(first_new.timestamp()) // step_s,
            int(watermark.timestamp()) // step_s,
        )
        heads += [
            datetime.fromtimestamp(v * step_s, UTC)
            for v in tracked_origins(spec, first_step, last_step)
        ]
    spans = _merged(
        [(first_new, watermark)]
        + [(o + a * step, o + b * step) for o in heads for a, b in lag_offsets(spec)],
        step,
    )
    # Complete windows come from their stored copies where every member has one (none in
    # a chunk with a late point, rewinds included: its copies from that point on are
    # dropped below).
    fresh = all(m.get("late_from") is None for m in members)
    values, windows = _read_windows_and_grid(
        store, ids, spans, start, step_s, n, window_s, watermark, use_copies=fresh
    )
    row_of = {name: i for i, name in enumerate(trained.names)}
    scaler_rows = torch.tensor([row_of[m["name"]] for m in members])
    state = None
    if saved is not None:
        state = _load_states(saved, trained)
    corrections = band_corrections(store, trained, vid)
    # The challenger's band: the version's, plus the offset tracked on its own misses.
    challenger_offset = store.calibration_offset(CHALLENGER) if trained.stat is not None else 0.0
    names = [m["name"] for m in members]
    forecasts: list[pl.DataFrame] = []
    edge_states: list[tuple[int, object]] = []
    weights = None  # what served the last origin, where the blend follows tracked errors
    a = lo
    for origin in origins:
        hi = int((origin - grid_start).total_seconds()) // step_s + 1
        out = advance(
            trained,
            values,
            start,
            a,
            hi,
            state,
            window_steps=window_s // step_s,
            scaler_rows=scaler_rows,
        )
        forecasts.append(
            _forecast_rows(
                trained,
                vid,
                ids,
                out.quantiles,
                values,
                hi - 1,
                origin,
                corrections,
                (weights := serving.served_weights(trained, names, out.blend)),
                out.stat,
                challenger_offset,
            )
        )
        edge_states += out.edge_states
        state, a = out.state, hi

    state_rows, shape = state_to_rows(state)
    # The weights that served the last origin, recorded beside the state (SQL, /metrics,
    # the overview page), where they follow the tracked errors.
    recorded = (
        serving.weight_rows(weights) if isinstance(weights, torch.Tensor) else [None] * len(ids)
    )
    new_states = [
        {"series_id": sid, "state": b, "shape": shape, "state_ts": watermark, "weights": w}
        for sid, b, w in zip(ids, state_rows, recorded, strict=True)
    ]
    snapshots = []
    for idx, edge_state in edge_states:
        edge_rows, _ = state_to_rows(edge_state)
        edge_ts = datetime.fromtimestamp(start + idx * step_s, UTC)
        wid = (start + idx * step_s) // window_s
        snapshots += [
            {"series_id": sid, "window_id": wid, "state": b, "shape": shape, "state_ts": edge_ts}
            for sid, b in zip(ids, edge_rows, strict=True)
        ]
    late_handled = [(m["id"], m["late_seq"]) for m in members if m.get("late_from") is not None]
    stale_windows = [
        (m["id"], int(m["late_from"].timestamp()) // window_s)
        for m in members
        if m.get("late_from") is not None
    ]
    reach = -(-history_steps(spec) * step_s // window_s) + 1  # the lags' reach, in windows
    with store.begin() as conn:
        written = store.save_prediction(
            conn,
            version_id=vid,
            states=new_states,
            snapshots=snapshots,
            forecasts=pl.concat(forecasts),
            keep_snapshots=keep_snapshots,
            reissued=reissued or (),
            late_handled=late_handled,
            windows=windows,
            windows_stale_from=stale_windows,
            windows_kept_from=int(watermark.timestamp()) // window_s - reach,
        )
    return written, n - lo


def _merged(
    spans: list[tuple[datetime, datetime]], step: timedelta
) -> list[tuple[datetime, datetime]]:
    """Inclusive spans, overlapping or adjacent ones merged (each is read once)."""
    out: list[tuple[datetime, datetime]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1] + step:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _load_states(saved: list, trained: TrainedModel) -> object:
    """The saved rows (bytes, shape, ts) of a chunk as one batched state; rows saved in
    different formats (from before the blend trackers, say) are loaded one by one."""
    kind = trained.model_config.kind
    shapes = {tuple(s[1]) for s in saved}
    if len(shapes) == 1:
        return state_from_rows([s[0] for s in saved], saved[0][1], kind)
    return stack_states([state_from_rows([s[0]], s[1], kind) for s in saved], trained.spec.horizon)


def _read_windows_and_grid(
    store: Store,
    ids: list[int],
    spans: list[tuple[datetime, datetime]],
    start: int,
    step_s: int,
    n: int,
    window_s: int,
    complete_to: datetime,
    *,
    use_copies: bool,
) -> tuple[torch.Tensor, list[tuple[int, int, int, bytes]]]:
    """The grid `_read_grid` reads, with each complete window inside `spans` (its last step
    at or before `complete_to`) taken from its stored copy (schema.window_values) where
    every series of `ids` has one and `use_copies`, the rest read from observations; and
    the copies to store: the complete windows read from observations. A copy holds the
    grid's float32 values, so the grid is the same bit for bit either way."""
    per = window_s // step_s
    last_complete = (int(complete_to.timestamp()) + step_s) // window_s - 1
    inside: list[int] = []  # complete windows wholly inside a span
    if window_s % step_s == 0:
        for lo, hi in spans:
            first = -(-int(lo.timestamp()) // window_s)
            last = min((int(hi.timestamp()) + step_s) // window_s - 1, last_complete)
            inside += range(first, last + 1)
        inside = [w for w in inside if 0 <= w * window_s - start <= (n - per) * step_s]
    copies: dict[int, np.ndarray] = {}
    if use_copies and inside:
        found: dict[int, dict[int, bytes]] = defaultdict(dict)
        for sid, wid, step, points in store.window_values(ids, inside):
            if step == step_s and len(points) == 4 * per:  # not a copy on another grid
                found[wid][sid] = points
        for wid, by_series in found.items():
            if len(by_series) == len(ids):
                blob = b"".join(by_series[sid] for sid in ids)
                copies[wid] = np.frombuffer(blob, dtype="<f4").reshape(len(ids), per)
    step = timedelta(seconds=step_s)
    rest = spans
    for wid in sorted(copies):  # the spans less the windows read from copies
        a = datetime.fromtimestamp(wid * window_s, UTC)
        b = a + (per - 1) * step
        rest = [
            piece
            for lo, hi in rest
            for piece in ((lo, min(hi, a - step)), (max(lo, b + step), hi))
            if piece[0] <= piece[1]
        ]
    values = _read_grid(store, ids, rest, start, step_s, n)
    for wid, block in copies.items():
        col = (wid * window_s - start) // step_s
        values[:, col : col + per] = torch.from_numpy(block.astype(np.float32))
    new_copies = []
    for wid in sorted(set(inside) - set(copies)):
        col = (wid * window_s - start) // step_s
        block = values[:, col : col + per].numpy().astype("<f4")
        new_copies += [(sid, wid, step_s, block[r].tobytes()) for r, sid in enumerate(ids)]
    return values, new_copies


def _read_grid(
    store: Store,
    ids: list[int],
    spans: list[tuple[datetime, datetime]],
    start: int,
    step_s: int,
    n: int,
) -> torch.Tensor:
    """The stored values inside `spans` on a (series, n-step) grid from epoch `start`; NaN
    where nothing is stored or read."""
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
    return values


def _forecast_rows(
    trained: TrainedModel,
    vid: int,
    ids: list[int],
    q: torch.Tensor,
    values: torch.Tensor,
    origin: int,
    origin_ts: datetime,
    corrections: dict[int, float],
    served: list[serving.Entry] | torch.Tensor | None = None,
    stat: torch.Tensor | None = None,
    challenger_offset: float = 0.0,
) -> pl.DataFrame:
    """Ledger rows (forecaster.store.prediction.ledger_rows), one per series and model: the
    version's served forecast (`v<id>`), the MSTL challenger's own (`mstl`, when the
    version has one), then each baseline's where a value one season back is known. The band
    served is the raw one widened (or narrowed) on each side by the conformal correction of
    its horizon step times the raw band's width, never past the median. A series served by
    a naive or a mean (forecaster.serving, chosen at training) has the network's quantiles
    moved to that member's median (`stat`: the MSTL challenger's forecast (S, H), for the
    members that use it); the challenger's row is the network's quantiles moved to its
    median the same way, with the version's band correction plus `challenger_offset`, the
    pooled offset the evaluate job tracks on the challenger's own misses (its errors are
    not the served blend's), and no forecast where the challenger has none (serving.serve
    would fall back to the network's there)."""
    spec = trained.spec
    # Both naives serve in the blend, whichever baselines are stored as rows.
    naives = {
        season: seasonal_naive_at(spec, values, origin, season)
        for season in {"daily", "weekly", *BASELINES}
    }
    quantiles = trained.model_config.quantiles
    lo_i, mid, hi_i = 0, len(quantiles) // 2, len(quantiles) - 1
    challenger = None
    if stat is not None:  # (S, H, Q): the network's band around the challenger's median
        challenger = q + (stat.to(q.dtype) - q[..., mid]).unsqueeze(-1)
    if isinstance(served, torch.Tensor) or (served and any(m != "model" for m in served)):
        q = serving.serve(q, naives["daily"], naives["weekly"], served, stat)
    level = round(quantiles[hi_i] - quantiles[lo_i], 6)
    horizon = spec.horizon
    sid = np.asarray(ids, dtype=np.int64)
    origin_us = (origin_ts - _EPOCH) // timedelta(microseconds=1)
    corr = torch.tensor([corrections.get(h, 0.0) for h in range(1, horizon + 1)]).double()
    floor = 0.0 if trained.nonnegative else None
    step_s = spec.freq_seconds

    def rows(quant: torch.Tensor, model: str, version: int | None, c: torch.Tensor) -> pl.DataFrame:
        qd = quant.double()
        lower, upper = calibration.apply(qd[..., lo_i], qd[..., hi_i], qd[..., mid], c, floor)
        band = (lower.numpy(), upper.numpy(), qd[..., lo_i].numpy(), qd[..., hi_i].numpy())
        mid_ = qd[..., mid].numpy()
        return ledger_rows(sid, model, version, origin_us, step_s, mid_, band, level)

    frames = [rows(q, f"v{vid}", vid, corr)]
    if challenger is not None:
        # Beside the version like the baselines (model_version_id NULL): a query for "the
        # version's forecasts" by model_version_id keeps getting one forecast per target.
        shifted = torch.tensor(calibration.shifted(corr.tolist(), challenger_offset)).double()
        frames.append(rows(challenger, CHALLENGER, None, shifted))
    for season in BASELINES:
        naive = naives[season].double().numpy()  # (S, H); NaN: no value a season back
        frames.append(
            ledger_rows(sid, f"seasonal_naive_{season}", None, origin_us, step_s, naive, None, None)
        )
    return pl.concat(frames)
