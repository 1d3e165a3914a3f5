"""Forecast accuracy on real public datasets (bench/accuracy_data.py), rolling origin.

    python bench/accuracy.py [--datasets taylor,temps] [--models naive_daily,mstl] [--quick]
                             [--horizon H] [--history-weeks N]

Protocol. The last `test_days` days of each series (28; m steps a day, so business-hours
data count open days) are cut into non-overlapping blocks of H steps. At the start of each
block (an origin) a model sees every row before the origin, of every series, and forecasts
H steps with a 10-90% band. Scored per dataset and model on observed rows only (the
loaders' interpolated slots are not scored):

- MASE: mean |y - median| / the mean |y_t - y_{t-m}| before the first origin, per series,
  averaged over series; "rel" divides by naive_daily's MASE, and the summary takes the
  geometric mean of rel over datasets.
- sMAPE (%): mean 200 |y - f| / (|y| + |f|), 0 where both are 0.
- cover: share of actuals inside the 10-90% band (0.80 is calibrated).
- s/fit: fit + forecast seconds per series and origin; s/update (stateful models): the
  update + forecast seconds per series and origin after the one fit.

`--history-weeks N` keeps only the N weeks (w steps each) before the first origin of each
series, for every model: the short-history case (a service that has just started).

A model plugs in (MODELS) as a `Candidate` function called at each origin with the
training frame, or as a `Stateful` object fitted once on the rows before the first origin,
then at each later origin given the block of new rows (`update`) before `forecast`. The
references are computed in the same run: seasonal naive with the daily and the weekly
period (bands: quantiles of the same rule's in-sample errors at each lag), statsforecast's
MSTL(season_length=[m, w]) and AutoETS(season_length=m), refit at each origin on the trailing
`window_weeks` weeks (MSTL drops seasons of over 1000 steps, and ETS cannot hold one of over
24: see MSTL_MAX_SEASON, ETS_MAX_SEASON). `profile` is a small stateful example.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.accuracy_data import DATASETS, Spec  # noqa: E402
from bench.accuracy_ours import Ours  # noqa: E402
from bench.accuracy_service import Service  # noqa: E402

QUANTILES = ("q0.1", "q0.5", "q0.9")

# A forecast at one origin: (train: series, ts, value; h; spec) -> series, ts, q0.1, q0.5, q0.9
# with h rows per series at the grid slots after each series' last training row
# (Spec.next_steps gives them).
Candidate = Callable[[pl.DataFrame, int, Spec], pl.DataFrame]


class Stateful(Protocol):
    def fit(self, history: pl.DataFrame, spec: Spec) -> None: ...

    def update(self, new: pl.DataFrame) -> None: ...

    def forecast(self, h: int) -> pl.DataFrame: ...


@dataclass(frozen=True, kw_only=True)
class Model:
    name: str
    about: str
    candidate: Candidate | None = None
    stateful: Callable[[], Stateful] | None = None


def _series(train: pl.DataFrame, keep: int | None = None) -> list[tuple[str, np.ndarray, datetime]]:
    """(name, the last `keep` values, last ts) per series."""
    out = []
    for (name,), part in train.sort("ts").group_by("series", maintain_order=True):
        y = part["value"].to_numpy()
        out.append((name, y[-keep:] if keep else y, part["ts"][-1]))
    return sorted(out, key=lambda s: s[0])


def _forecast_frame(spec: Spec, rows: list[tuple[str, datetime, np.ndarray]]) -> pl.DataFrame:
    """rows: (series, last ts, (3, h) quantiles) -> the long forecast frame."""
    parts = []
    for name, last, q in rows:
        ts = spec.next_steps(last, q.shape[1])
        parts.append(
            pl.DataFrame({"series": name, "ts": ts, **dict(zip(QUANTILES, q, strict=True))})
        )
    return pl.concat(parts).with_columns(pl.col("ts").dt.cast_time_unit("us"))


# -- reference models ------------------------------------------------------------------


def _lags(h: int, period: int) -> np.ndarray:
    """The lag of each step 1..h under the seasonal naive rule: the last value one whole
    number of periods back."""
    steps = np.arange(1, h + 1)
    return period * -(-steps // period)


def seasonal_naive(which: int) -> Candidate:
    def candidate(train: pl.DataFrame, h: int, spec: Spec) -> pl.DataFrame:
        period = spec.seasons[which]
        rows = []
        for name, y, last in _series(train, spec.window_weeks * spec.seasons[1]):
            lags = _lags(h, period)
            point = y[len(y) - 1 + np.arange(1, h + 1) - lags]
            band = {lag: np.quantile(y[lag:] - y[:-lag], [0.1, 0.9]) for lag in set(lags.tolist())}
            lo = point + np.array([band[lag][0] for lag in lags])
            hi = point + np.array([band[lag][1] for lag in lags])
            rows.append((name, last, np.stack([lo, point, hi])))
        return _forecast_frame(spec, rows)

    return candidate


# STL on a season of more than this many steps costs tens of seconds a fit (glucose's
# 2016-step week), so MSTL keeps only the shorter seasons there.
MSTL_MAX_SEASON = 1000


def _statsforecast(make: Callable[[Spec], object]) -> Candidate:
    def candidate(train: pl.DataFrame, h: int, spec: Spec) -> pl.DataFrame:
        from statsforecast import StatsForecast

        model = make(spec)
        rows = _series(train, spec.window_weeks * spec.seasons[1])
        df = pl.concat(
            pl.DataFrame({"unique_id": name, "ds": np.arange(len(y)), "y": y})
            for name, y, _ in rows
        )
        # Integer ds: the grid (business hours, wall-clock days) is the spec's, not pandas'.
        out = StatsForecast(models=[model], freq=1, n_jobs=1).forecast(df=df, h=h, level=[80])
        out = pl.from_pandas(out) if not isinstance(out, pl.DataFrame) else out
        alias = model.alias
        quantiles = []
        for name, _, last in rows:
            part = out.filter(pl.col("unique_id") == name).sort("ds")
            q = np.stack([part[f"{alias}-lo-80"], part[alias], part[f"{alias}-hi-80"]])
            quantiles.append((name, last, q))
        return _forecast_frame(spec, quantiles)

    return candidate


def _mstl(spec: Spec) -> object:
    from statsforecast.models import MSTL

    return MSTL(season_length=[s for s in spec.seasons if s <= MSTL_MAX_SEASON])


# ETS cannot hold a season of more than 24 steps: statsforecast tries the seasonal models
# with such an m and discards them, ending on the non-seasonal fit that season_length=1
# gives directly (the same forecasts on taylor's m=48, in 1/20 of the time; on glucose's
# m=288 the tries cost two minutes a fit).
ETS_MAX_SEASON = 24


def _autoets(spec: Spec) -> object:
    from statsforecast.models import AutoETS

    m = spec.seasons[0]
    return AutoETS(season_length=m if m <= ETS_MAX_SEASON else 1)


class Profile:
    """Example stateful candidate: each step's median and 10-90% band over the same slot of
    the last `days` days. Keeps a bounded buffer per series; `update` appends to it."""

    def __init__(self, days: int = 14) -> None:
        self.days = days
        self.y: dict[str, np.ndarray] = {}
        self.last: dict[str, datetime] = {}

    def fit(self, history: pl.DataFrame, spec: Spec) -> None:
        self.spec = spec
        self.update(history)

    def update(self, new: pl.DataFrame) -> None:
        m = self.spec.seasons[0]
        for name, y, last in _series(new):
            self.y[name] = np.concatenate([self.y.get(name, np.empty(0)), y])[
                -m * (self.days + 8) :
            ]
            self.last[name] = last

    def forecast(self, h: int) -> pl.DataFrame:
        m = self.spec.seasons[0]
        rows = []
        for name, y in self.y.items():
            base = len(y) - 1 + np.arange(1, h + 1) - _lags(h, m)
            idx = base[:, None] - m * np.arange(self.days)[None, :]  # (h, days)
            vals = np.where(idx >= 0, y[np.maximum(idx, 0)], np.nan)
            rows.append((name, self.last[name], np.nanquantile(vals, [0.1, 0.5, 0.9], axis=1)))
        return _forecast_frame(self.spec, rows)


MODELS: dict[str, Model] = {
    m.name: m
    for m in [
        Model(name="naive_daily", about="y one day (m steps) back", candidate=seasonal_naive(0)),
        Model(name="naive_weekly", about="y one week (w steps) back", candidate=seasonal_naive(1)),
        Model(
            name="mstl",
            about=f"statsforecast MSTL([m, w]), seasons over {MSTL_MAX_SEASON} steps dropped",
            candidate=_statsforecast(_mstl),
        ),
        Model(
            name="autoets",
            about=f"statsforecast AutoETS(season_length=m), non-seasonal for m over {ETS_MAX_SEASON}",
            candidate=_statsforecast(_autoets),
        ),
        Model(name="profile", about="example stateful: same slot, last 14 days", stateful=Profile),
        Model(
            name="lstm",
            about="ours: the stateful LSTM through forecaster.api, fitted once, then updated "
            "over each block (the service's path), per-series blend included",
            stateful=lambda: Ours("lstm"),
        ),
        Model(
            name="lstm_service",
            about="ours as lstm, through the service's store and jobs: ingest, train, then "
            "ingest, evaluate and predict at each origin, read from the latest_forecasts view",
            stateful=Service,
        ),
        Model(
            name="lstm_every_origin",
            about="ours as lstm, trained with its loss taken from every origin of a window "
            "(origin_stride=1; the default takes it from every 8th)",
            stateful=lambda: Ours("lstm", origin_stride=1),
        ),
    ]
}


# -- harness ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    dataset: str
    model: str
    mase: float
    smape: float
    cover: float
    s_per_fit: float
    s_per_update: float = math.nan  # stateful: update + forecast only (origins after the fit)


def _origins(frame: pl.DataFrame, spec: Spec, max_origins: int | None) -> tuple[pl.DataFrame, int]:
    """Adds the row index `i` and the first origin `o0` per series; returns the block count."""
    blocks = spec.test_days * spec.seasons[0] // spec.horizon
    if max_origins:
        blocks = min(blocks, max_origins)
    frame = frame.sort("series", "ts").with_columns(i=pl.int_range(pl.len()).over("series"))
    frame = frame.with_columns(o0=pl.len().over("series") - blocks * spec.horizon)
    short = frame.filter(pl.col("o0") < 2 * spec.seasons[1]).select("series").unique()
    if short.height:
        raise ValueError(
            f"{spec.name}: series {short['series'].to_list()} too short for {blocks} blocks"
        )
    return frame, blocks


def short_history(
    frame: pl.DataFrame, spec: Spec, weeks: int, max_origins: int | None = None
) -> pl.DataFrame:
    """`frame` (with `i` and `o0`, from _origins) cut to the last `weeks` weeks (w steps
    each) before each series' first origin: what a service that has just started holds.
    The origins and the scored rows stay the same."""
    keep = pl.col("i") >= pl.col("o0") - weeks * spec.seasons[1]
    return _origins(frame.filter(keep).drop("i", "o0"), spec, max_origins)[0]


def _check(fc: pl.DataFrame, actual: pl.DataFrame, model: str, spec: Spec) -> pl.DataFrame:
    missing = [c for c in ("series", "ts", *QUANTILES) if c not in fc.columns]
    if missing:
        raise ValueError(f"{model} on {spec.name}: the forecast has no column(s) {missing}")
    joined = actual.join(fc.select("series", "ts", *QUANTILES), on=["series", "ts"], how="left")
    if (gap := joined.filter(pl.col("q0.5").is_null())).height:
        raise ValueError(
            f"{model} on {spec.name}: no forecast for {gap.height} slot(s), e.g. "
            f"{gap['series'][0]} at {gap['ts'][0]}; forecast the slots Spec.next_steps gives"
        )
    return joined


def run_model(
    model: Model, spec: Spec, frame: pl.DataFrame, blocks: int
) -> tuple[pl.DataFrame, float]:
    """Every origin of one model on one dataset: the joined forecasts and actuals, and the
    seconds spent in the model (in all, and in the updates and forecasts after a stateful
    model's one fit)."""
    h, cols, parts, spent, updating = spec.horizon, ["series", "ts", "value"], [], 0.0, 0.0
    state = model.stateful() if model.stateful else None
    for k in range(blocks):
        origin = pl.col("o0") + k * h
        t = time.perf_counter()
        if state is None:
            fc = model.candidate(frame.filter(pl.col("i") < origin).select(cols), h, spec)
        else:
            if k == 0:
                state.fit(frame.filter(pl.col("i") < origin).select(cols), spec)
            else:
                state.update(
                    frame.filter((pl.col("i") >= origin - h) & (pl.col("i") < origin)).select(cols)
                )
            fc = state.forecast(h)
        spent += time.perf_counter() - t
        if state is not None and k > 0:
            updating += time.perf_counter() - t
        actual = frame.filter((pl.col("i") >= origin) & (pl.col("i") < origin + h))
        parts.append(_check(fc, actual.select("series", "ts", "value", "filled"), model.name, spec))
    return pl.concat(parts), (spent, updating)


def score(
    spec: Spec,
    frame: pl.DataFrame,
    joined: pl.DataFrame,
    model: str,
    spent: tuple[float, float],
    blocks: int,
) -> Score:
    m = spec.seasons[0]
    scale = (
        frame.filter(pl.col("i") < pl.col("o0"))
        .group_by("series")
        .agg(scale=(pl.col("value") - pl.col("value").shift(m)).abs().mean())
    )
    y, f = pl.col("value"), pl.col("q0.5")
    ape = (
        pl.when((y.abs() + f.abs()) == 0)
        .then(0.0)
        .otherwise(200 * (y - f).abs() / (y.abs() + f.abs()))
    )
    scored = joined.filter(~pl.col("filled"))
    per_series = (
        scored.group_by("series")
        .agg(mae=(y - f).abs().mean(), smape=ape.mean())
        .join(scale, on="series")
    )
    cover = scored.select(((y >= pl.col("q0.1")) & (y <= pl.col("q0.9"))).mean()).item()
    n_series = frame["series"].n_unique()
    return Score(
        dataset=spec.name,
        model=model,
        mase=(per_series["mae"] / per_series["scale"]).mean(),
        smape=per_series["smape"].mean(),
        cover=cover,
        s_per_fit=spent[0] / (n_series * blocks),
        s_per_update=spent[1] / (n_series * (blocks - 1)) if spent[1] and blocks > 1 else math.nan,
    )


def evaluate(
    spec: Spec,
    models: list[Model],
    *,
    max_origins: int | None = None,
    max_series: int | None = None,
    history_weeks: int | None = None,
) -> tuple[list[Score], int, int]:
    frame = spec.load()
    if max_series:
        frame = frame.filter(pl.col("series").is_in(sorted(frame["series"].unique())[:max_series]))
    frame, blocks = _origins(frame, spec, max_origins)
    if history_weeks:
        frame = short_history(frame, spec, history_weeks, max_origins)
    scores = []
    for model in models:
        joined, spent = run_model(model, spec, frame, blocks)
        scores.append(score(spec, frame, joined, model.name, spent, blocks))
    return scores, frame["series"].n_unique(), blocks


def _table(scores: list[Score]) -> str:
    base = next((s.mase for s in scores if s.model == "naive_daily"), math.nan)
    lines = [
        f"{'model':<14} {'MASE':>7} {'rel':>6} {'sMAPE%':>7} {'cover':>6} {'s/fit':>8} {'s/update':>9}"
    ]
    for s in scores:
        upd = "-" if math.isnan(s.s_per_update) else f"{s.s_per_update:9.5f}"
        lines.append(
            f"{s.model:<14} {s.mase:7.3f} {s.mase / base:6.3f} {s.smape:7.2f} {s.cover:6.3f} "
            f"{s.s_per_fit:8.4f} {upd:>9}"
        )
    return "\n".join(lines)


def summary(scores: list[Score]) -> str:
    base = {s.dataset: s.mase for s in scores if s.model == "naive_daily"}
    lines = [f"{'model':<14} {'gmean rel':>9} {'mean cover':>10} {'datasets':>8}"]
    for model in dict.fromkeys(s.model for s in scores):
        mine = [s for s in scores if s.model == model and s.dataset in base]
        rel = (
            math.exp(np.mean([math.log(s.mase / base[s.dataset]) for s in mine]))
            if mine
            else math.nan
        )
        cover = np.mean([s.cover for s in mine]) if mine else math.nan
        lines.append(f"{model:<14} {rel:9.3f} {cover:10.3f} {len(mine):8d}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--datasets", default=",".join(DATASETS), help="comma-separated, of: " + ", ".join(DATASETS)
    )
    ap.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS)
    )
    ap.add_argument(
        "--quick", action="store_true", help="the last 4 origins and at most 2 series per dataset"
    )
    ap.add_argument(
        "--horizon",
        type=int,
        default=0,
        help="forecast this many steps at each origin instead of each dataset's own H (the "
        "origins stay 28 days' worth of non-overlapping blocks)",
    )
    ap.add_argument(
        "--history-weeks",
        type=int,
        default=0,
        help="keep only this many weeks (w steps each, at least 2) before the first origin: "
        "every model sees a short history",
    )
    args = ap.parse_args()
    if args.history_weeks and args.history_weeks < 2:
        ap.error("--history-weeks must be at least 2 (the references need two weeks)")
    unknown = [d for d in args.datasets.split(",") if d not in DATASETS]
    unknown += [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        ap.error(f"unknown dataset(s) or model(s) {unknown}; see --help for the names")
    models = [MODELS[m] for m in args.models.split(",")]
    limits: dict[str, int] = {"max_origins": 4, "max_series": 2} if args.quick else {}
    if args.history_weeks:
        limits["history_weeks"] = args.history_weeks

    import statsforecast

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, polars {pl.__version__}, statsforecast {statsforecast.__version__}"
    )
    scores: list[Score] = []
    for name in args.datasets.split(","):
        spec = DATASETS[name]
        if args.horizon:
            spec = dataclasses.replace(spec, horizon=args.horizon)
        if not spec.available():
            print(f"\n## {name}: skipped, pip install {spec.package} (or -e '.[bench]')")
            continue
        t = time.perf_counter()
        found, n_series, blocks = evaluate(spec, models, **limits)
        scores += found
        m, w = spec.seasons
        print(f"\n## {name}: {spec.source}")
        print(
            f"# {n_series} series x {blocks} origins of H={spec.horizon} steps of {spec.freq_s}s, "
            f"m={m} w={w}; {spec.license}; {time.perf_counter() - t:.0f}s"
        )
        print(_table(found))
    if scores:
        print(f"\n## summary over {len({s.dataset for s in scores})} datasets")
        print(summary(scores))


if __name__ == "__main__":
    main()
