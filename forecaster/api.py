"""The in-memory Python API: fit, forecast, update and cross-validate on DataFrames.

The same code the service's jobs run (training.train, inference.advance, the calibration of
forecaster.calibration), without a store::

    fc = Forecaster(horizon=24).fit(history)        # long frame: series, ts, value
    fc.forecast()                                    # quantiles from each series' last point
    fc.update(new_points)                            # advance the saved states over new points
    cv = Forecaster(horizon=24).cross_validation(history, n_windows=4)

Frames are polars (pandas accepted and converted); `ts` is UTC (naive timestamps are taken
as UTC) on a regular grid of `freq` (inferred when not given). A series' state after its
last point is kept, so `update` costs O(new points): the network never re-reads history.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import polars as pl
import torch

from forecaster import calibration, serving
from forecaster import features as F
from forecaster.inference import Joint, advance, history_steps, stack_states
from forecaster.panel import Panel
from forecaster.trained import TrainedModel
from forecaster.training import Progress, TrainConfig, TrainResult, train, trained_model

TS = pl.Datetime("us", "UTC")
COLUMNS = ("series", "ts", "value")


def to_long_frame(data: Any) -> pl.DataFrame:
    """polars or pandas (series, ts, value) -> polars with UTC timestamps, sorted, checked."""
    if not isinstance(data, pl.DataFrame):
        try:
            data = pl.from_pandas(data)
        except Exception as exc:
            raise TypeError(
                f"expected a polars or pandas DataFrame with columns {COLUMNS}, got "
                f"{type(data).__name__}"
            ) from exc
    missing = [c for c in COLUMNS if c not in data.columns]
    if missing:
        raise ValueError(
            f"the frame lacks column(s) {missing} (it has {data.columns}); rename yours to "
            "series, ts, value"
        )
    ts = data["ts"]
    if not isinstance(ts.dtype, pl.Datetime):
        raise ValueError(f"column 'ts' must hold datetimes, it holds {ts.dtype}")
    ts = ts.dt.replace_time_zone("UTC") if ts.dtype.time_zone is None else ts
    frame = data.select(
        pl.col("series").cast(pl.String),
        ts.dt.convert_time_zone("UTC").dt.cast_time_unit("us").alias("ts"),
        pl.col("value").cast(pl.Float64),
    )
    if frame["series"].null_count():
        raise ValueError("column 'series' has nulls: every row needs a series name")
    dup = frame.select(pl.struct("series", "ts").is_duplicated().any()).item()
    if dup:
        raise ValueError("the frame has several rows for one (series, ts): aggregate them first")
    return frame.sort("series", "ts")


def infer_freq(frame: pl.DataFrame) -> int:
    """The most common step between consecutive points of a series, in seconds."""
    steps = (
        frame.select(pl.col("ts").diff().over("series").dt.total_seconds().alias("d"))
        .drop_nulls()
        .filter(pl.col("d") > 0)
    )
    if steps.is_empty():
        raise ValueError("cannot infer the frequency from one point per series: pass freq=")
    return int(steps["d"].mode().min())


def _seconds(freq: int | str | timedelta | None) -> int | None:
    if freq is None or isinstance(freq, int):
        return freq
    if isinstance(freq, timedelta):
        return int(freq.total_seconds())
    units = {"s": 1, "min": 60, "m": 60, "h": 3600, "d": 86400}
    text = freq.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)] or 1) * units[unit])
    raise ValueError(f"freq {freq!r}: give seconds, a timedelta or text like '30min', '1h'")


@dataclass
class _SeriesState:
    row: int  # the series' row in the model's scalers
    last: int  # epoch seconds of its newest point
    recent: np.ndarray  # the newest `keep` values (NaN where missing), ending at `last`
    state: Any  # the model's state after `last` (one series' slice)
    quantiles: np.ndarray | None = None  # (H, Q) forecast from `last`


class Forecaster:
    """A stateful recurrent forecaster over many series (see the module docstring).

    kind, horizon, level (the central band, 0.8 = the 10% and 90% quantiles), freq (seconds,
    a timedelta or text such as '30min'; inferred when None), seasons ((short, long) periods
    in steps; None: a day and a week of freq) and any TrainConfig field as a keyword
    (epochs, hidden, window, device, seed, ...). prior_weight and score_window (scores kept
    per horizon step) set the bands' calibration, as the evaluate job's settings do for the
    service."""

    def __init__(
        self,
        kind: str = "lstm",
        *,
        horizon: int = 24,
        level: float = 0.8,
        freq: int | str | timedelta | None = None,
        seasons: tuple[int, int] | None = None,
        prior_weight: int = calibration.PRIOR_WEIGHT,
        score_window: int = 1000,
        **options: Any,
    ) -> None:
        if not 0 < level < 1:
            raise ValueError(f"level must be between 0 and 1 (0.8 for a 10-90% band), got {level}")
        unknown = set(options) - set(TrainConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}: see forecaster.TrainConfig")
        self.kind, self.horizon, self.level = kind, horizon, level
        self.freq, self.seasons, self.options = freq, seasons, options
        self.prior_weight, self.score_window = prior_weight, score_window
        self.model: TrainedModel | None = None
        self.result: TrainResult | None = None
        self._series: dict[str, _SeriesState] = {}
        self._scores: dict[int, deque[float]] = defaultdict(lambda: deque(maxlen=score_window))
        # The pooled offset: the integral of the served band's excess misses so far.
        self._offset = 0.0

    # -- fitting ------------------------------------------------------------------------

    @property
    def config(self) -> TrainConfig:
        lo = round((1 - self.level) / 2, 6)
        return TrainConfig(
            kind=self.kind,  # type: ignore[arg-type]
            horizon=self.horizon,
            quantiles=(lo, 0.5, round(1 - lo, 6)),
            seasons=self.seasons,
            **self.options,
        )

    def fit(
        self, data: Any, *, on_progress: Callable[[Progress], None] | None = None
    ) -> Forecaster:
        """Train on a long frame (series, ts, value), then warm each series' state up to its
        own last point, as the service does for a new model."""
        frame = to_long_frame(data)
        freq = _seconds(self.freq) or infer_freq(frame)
        self.freq = freq
        result = train(Panel.from_frame(frame, freq), self.config, on_progress=on_progress)
        self.result, self.model = result, trained_model(result)
        self._series, self._scores = {}, defaultdict(lambda: deque(maxlen=self.score_window))
        self._offset = 0.0
        self._absorb(frame)
        return self

    def _need_model(self) -> TrainedModel:
        if self.model is None:
            raise RuntimeError("the forecaster is not fitted: call fit(frame) first")
        return self.model

    @property
    def _keep(self) -> int:
        """Values kept per series: what the head's seasonal lags read, plus one."""
        return history_steps(self._need_model().spec) + 1

    @property
    def _warmup(self) -> int:
        return 2 * self._need_model().spec.season_week

    # -- state --------------------------------------------------------------------------

    def update(self, data: Any) -> Forecaster:
        """Absorb new points (series, ts, value) after each series' last: the saved states
        advance over them only. Earlier forecasts whose targets arrive are scored, and the
        bands' calibration follows those scores."""
        self._need_model()
        frame = to_long_frame(data)
        unknown = sorted(set(frame["series"].unique()) - set(self._series))
        if unknown:
            raise KeyError(
                f"series {unknown[:5]} are unknown to the model: fit on them first (a new "
                "series needs its own scaler)"
            )
        self._absorb(frame)
        return self

    def _absorb(self, frame: pl.DataFrame) -> None:
        trained = self._need_model()
        step = int(self.freq)  # type: ignore[arg-type]
        row_of = {n: i for i, n in enumerate(trained.names)}
        groups: dict[tuple[int | None, int], list[tuple[str, pl.DataFrame]]] = defaultdict(list)
        for (name,), part in frame.group_by("series", maintain_order=True):
            epoch = part["ts"].dt.epoch("s")
            if (epoch % step != 0).any():
                raise ValueError(f"series {name!r} has timestamps off the {step}s grid")
            have = self._series.get(name)
            if have is not None and int(epoch.min()) <= have.last:
                raise ValueError(
                    f"series {name!r}: update with points after its last one "
                    f"({_iso(have.last)}); got one at {_iso(int(epoch.min()))}"
                )
            groups[(None if have is None else have.last, int(epoch.max()))].append((name, part))
        for (last, end), members in groups.items():
            names = [m[0] for m in members]
            keep = self._keep
            if last is None:  # a warm-up from a zero state over the newest `warmup` steps
                first = end - (self._warmup - 1) * step  # as predict's (warmup_steps_for)
                start, lo = first - keep * step, keep
            else:
                start, lo = last - (keep - 1) * step, keep
            n = (end - start) // step + 1
            values = torch.full((len(names), n), float("nan"))
            for i, (name, part) in enumerate(members):
                have = self._series.get(name)
                if have is not None:
                    values[i, :keep] = torch.from_numpy(have.recent.astype(np.float32))
                cols = (part["ts"].dt.epoch("s") - start) // step
                inside = (cols >= 0).to_numpy()
                values[i, cols.to_numpy()[inside]] = torch.from_numpy(
                    part["value"].fill_null(float("nan")).to_numpy()[inside].astype(np.float32)
                )
            self._score(names, values, start, step)
            state = None
            if last is not None:
                state = stack_states([self._series[n].state for n in names], self.horizon)
            out = advance(
                trained,
                values,
                start,
                lo,
                n,
                state,
                window_steps=trained.window,
                scaler_rows=torch.tensor([row_of[nm] for nm in names]),
            )
            # What serves each series: a blend of the network, the naives and MSTL,
            # weighed on its holdout at fit, then on the members' tracked errors.
            at = torch.tensor([n - 1])
            quantiles = serving.serve(
                out.quantiles,
                F.seasonal_naive(trained.spec, values, at, "daily")[:, 0],
                F.seasonal_naive(trained.spec, values, at, "weekly")[:, 0],
                serving.served_weights(trained, names, out.blend),
                out.stat,
            )
            for i, name in enumerate(names):
                self._series[name] = _SeriesState(
                    row=row_of[name],
                    last=end,
                    recent=values[i, n - keep :].numpy().astype(np.float64),
                    state=_slice(out.state, i),
                    quantiles=quantiles[i].numpy(),
                )

    def _score(self, names: list[str], values: torch.Tensor, start: int, step: int) -> None:
        """Score each series' previous forecast against the actuals now known, and note
        whether each fell inside the band that was served."""
        corrections = None  # computed once, and only when there is something to score
        floor = 0.0 if self._need_model().nonnegative else None
        vals, n_new, n_inside = values.numpy(), 0, 0
        for i, name in enumerate(names):
            have = self._series.get(name)
            if have is None or have.quantiles is None:
                continue
            if corrections is None:
                corrections = self.corrections()
            first = (have.last + step - start) // step  # the column of horizon step 1
            mid = have.quantiles.shape[1] // 2
            for h in range(1, min(self.horizon, vals.shape[1] - first) + 1):
                y = float(vals[i, first + h - 1])
                if math.isnan(y):
                    continue
                lo, med, hi = (float(have.quantiles[h - 1, j]) for j in (0, mid, -1))
                served_lo, served_hi = calibration.served_band(
                    lo, hi, med, corrections[h - 1], floor
                )
                n_new += 1
                n_inside += served_lo <= y <= served_hi
                self._scores[h].append(calibration.band_score(lo, hi, y))
        # One forecast per series and target: a horizon of time brings series x H actuals.
        n_series = sum(s.quantiles is not None for s in self._series.values())
        self._offset = calibration.tracked_offset(
            self._offset, n_new, n_inside, n_series * self.horizon, self.level
        )

    # -- forecasting --------------------------------------------------------------------

    def corrections(self) -> list[float]:
        """Per horizon step, the band correction served (band widths each side)."""
        trained = self._need_model()
        prior = trained.holdout_corrections  # as the evaluate job blends it
        per_step = [  # the quantile read to a bin, as the evaluate job's histograms give it
            calibration.blend_histogram(
                calibration.score_histogram(list(self._scores[h])),
                self.level,
                prior.get(h),
                self.prior_weight,
            )
            for h in range(1, self.horizon + 1)
        ]
        return calibration.shifted(per_step, self._offset)

    def forecast(self) -> pl.DataFrame:
        """The newest forecast of every series from its last point: series, origin_ts, ts,
        horizon_step, yhat (the median), yhat_lower and yhat_upper (the calibrated band),
        raw_lower and raw_upper (the model's own quantiles)."""
        trained = self._need_model()
        names = sorted(self._series)
        q = torch.from_numpy(np.stack([self._series[n].quantiles for n in names]))  # (S, H, Q)
        mid = len(trained.model_config.quantiles) // 2
        corr = torch.tensor(self.corrections(), dtype=q.dtype)
        lower, upper = calibration.apply(
            q[..., 0], q[..., -1], q[..., mid], corr, 0.0 if trained.nonnegative else None
        )
        step = int(self.freq)  # type: ignore[arg-type]
        h = np.arange(1, self.horizon + 1)
        origin = np.repeat([self._series[n].last for n in names], self.horizon)
        return pl.DataFrame(
            {
                "series": np.repeat(names, self.horizon),
                "origin_ts": origin * 1_000_000,
                "ts": (origin + np.tile(h, len(names)) * step) * 1_000_000,
                "horizon_step": np.tile(h, len(names)),
                "yhat": q[..., mid].reshape(-1).double().numpy(),
                "yhat_lower": lower.reshape(-1).double().numpy(),
                "yhat_upper": upper.reshape(-1).double().numpy(),
                "raw_lower": q[..., 0].reshape(-1).double().numpy(),
                "raw_upper": q[..., -1].reshape(-1).double().numpy(),
            }
        ).with_columns(pl.col("origin_ts").cast(TS), pl.col("ts").cast(TS))

    def weights(self) -> pl.DataFrame:
        """What serves each series now (forecaster.serving): series, member, weight. The
        blend chosen on the holdout at fit, moved by the members' errors tracked since."""
        trained = self._need_model()
        names = sorted(self._series)
        states = [self._series[n].state for n in names]
        trackers = None
        if states and all(isinstance(st, Joint) and st.blend is not None for st in states):
            trackers = np.concatenate([st.blend for st in states])
        rows = serving.weight_rows(serving.served_weights(trained, names, trackers))
        return pl.DataFrame(
            [
                {"series": n, "member": m, "weight": float(w)}
                for n, r in zip(names, rows, strict=True)
                for m, w in r.items()
            ],
            schema={"series": pl.String, "member": pl.String, "weight": pl.Float64},
        )

    # -- evaluation ---------------------------------------------------------------------

    def cross_validation(
        self,
        data: Any,
        *,
        n_windows: int = 4,
        step_size: int | None = None,
        refit: bool = False,
    ) -> pl.DataFrame:
        """Rolling-origin evaluation: cutoffs every `step_size` steps (default the horizon)
        over the last n_windows * step_size steps of each series. Fits on the data before the
        first cutoff, then, like the service, updates through each cutoff and forecasts from
        it (refit=True trains anew at every cutoff instead). Returns series, cutoff, ts,
        horizon_step, y, yhat, yhat_lower, yhat_upper."""
        frame = to_long_frame(data)
        freq = _seconds(self.freq) or infer_freq(frame)
        self.freq = freq
        step_size = step_size or self.horizon
        # Each series' cutoffs count back from its own end: series may lie in other years.
        frame = frame.with_columns(
            (
                (pl.col("ts").dt.epoch("s") - pl.col("ts").max().over("series").dt.epoch("s"))
                // (step_size * freq)
            ).alias("_block"),
            (
                (pl.col("ts").max().over("series").dt.epoch("s") - pl.col("ts").dt.epoch("s"))
                % (step_size * freq)
                == 0
            ).alias("_edge"),
        )

        # Block -k holds the points after cutoff k (k = n_windows .. 1, cutoff 1 the last).
        def upto(k: int) -> pl.Expr:  # the points at or before cutoff k
            return (pl.col("_block") < -k) | ((pl.col("_block") == -k) & pl.col("_edge"))

        cols = list(COLUMNS)
        out, model = [], self
        for k in range(n_windows, 0, -1):
            if refit or k == n_windows:
                model = replace_fitted(self)
                model.fit(frame.filter(upto(k)).select(cols))
            else:
                new = frame.filter(upto(k) & ~upto(k + 1)).select(cols)
                new = new.filter(pl.col("series").is_in(list(model._series)))
                if new.height:
                    model.update(new)
            out.append(model.forecast())
        cv = (
            pl.concat(out)
            .rename({"origin_ts": "cutoff"})
            .join(frame.select("series", "ts", pl.col("value").alias("y")), on=["series", "ts"])
        )
        return cv.select(
            "series", "cutoff", "ts", "horizon_step", "y", "yhat", "yhat_lower", "yhat_upper"
        ).sort("series", "cutoff", "horizon_step")


def replace_fitted(fc: Forecaster) -> Forecaster:
    """An unfitted Forecaster with the same settings."""
    return Forecaster(
        fc.kind,
        horizon=fc.horizon,
        level=fc.level,
        freq=fc.freq,
        seasons=fc.seasons,
        prior_weight=fc.prior_weight,
        score_window=fc.score_window,
        **fc.options,
    )


def _iso(epoch: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC).isoformat()


def _slice(state: Any, i: int) -> Any:
    """Series i of a batched state ((layers, B, hidden), a tuple of them, or a Joint)."""
    if isinstance(state, Joint):
        return Joint(
            _slice(state.net, i),
            None if state.stat is None else state.stat[i : i + 1].copy(),
            None if state.blend is None else state.blend[i : i + 1].copy(),
        )
    if isinstance(state, tuple):
        return tuple(s[:, i : i + 1].clone() for s in state)
    return state[:, i : i + 1].clone()


__all__ = ["Forecaster", "infer_freq", "to_long_frame"]
