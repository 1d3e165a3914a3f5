"""The evaluate job: score forecasts whose actuals have arrived, recalibrate the bands, flag
anomalies.

Calibration is split conformal per horizon step: over the recent scored forecasts of the
champion, the conformity score of each is how far the actual fell outside the model's raw
band, in widths of that band (negative inside it), so it is scale-free and pools series of
any size; the correction c is that score's ceil((n + 1) * level) / n quantile, and the band
[raw_lower - c * width, raw_upper + c * width] covers about `level` of actuals whatever the
raw quantiles did. A model starts from the correction measured on its training holdout
(forecaster.training.holdout_calibration), which serves from its first forecast; each run
blends it with the recent scores' correction, the holdout weighing as much as `prior_weight`
scored forecasts, so a small fleet is calibrated at once and a large one soon follows what
it sees. On top of those per-step corrections, one pooled offset tracks the served band's
misses, carried from run to run over the actuals each run newly scores
(forecaster.calibration.tracked_offset), so the coverage of what was served comes back to
the level under drift. The next predict run serves the sum.

Anomalies (forecaster.anomaly has the definitions): each newly scored actual gets a score
from how far it lies outside the band served by the newest forecast for its time, over a
threshold set so the recent window would have had at most [anomalies].incidents_per_week
incidents per series per week; a score above 1 is anomalous. Anomalous points of a series
close together are one incident, incidents overlapping while a share of the fleet is in
trouble are linked as one fleet event. Every write is idempotent: running twice stores the
same rows, and the actuals judged are those counted into the offset, in the same
transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import polars as pl
import structlog

from forecaster import anomaly, calibration, schema
from forecaster.config import AnomalySettings
from forecaster.features import FeatureSpec
from forecaster.frames import TS_DTYPE
from forecaster.store import Store
from forecaster.store.evaluation import with_actuals
from pipelines.predict import BASELINES, CHALLENGER

log = structlog.get_logger(__name__)


@dataclass
class EvaluateSummary:
    model: str = ""
    scored: int = 0
    coverage: float | None = None  # of the served (calibrated) band over the scored window
    coverage_raw: float | None = None
    steps_calibrated: int = 0
    offset: float = 0.0  # the pooled offset added to every step's correction (band widths)
    new_anomalies: int = 0
    new_incidents: int = 0  # incidents that began in this run's new actuals
    incidents_open: int = 0  # series with an incident open after this run
    fleet_events: int = 0  # fleet events over the window
    threshold: float | None = None  # the fleet's evidence that scores 1 (series may have their own)
    # The champion's MAE over the last accuracy_window relative to the daily seasonal naive's
    # on the same forecasts (pooled over series); None until both have been scored.
    mase: float | None = None
    accuracy_window: timedelta | None = None

    def line(self) -> str:
        if not self.scored:
            return f"model {self.model or '-'}: no forecast has its actuals yet"
        cov = f"{self.coverage:.1%}" if self.coverage is not None else "-"
        raw = f"{self.coverage_raw:.1%}" if self.coverage_raw is not None else "-"
        return (
            f"model {self.model}: {self.scored} forecasts scored, band coverage {cov} (raw {raw}), "
            f"{self.steps_calibrated} horizon steps recalibrated (pooled offset "
            f"{self.offset:+.2f} band widths), {self.new_anomalies} new anomalies, "
            f"{self.new_incidents} new incidents, {self.incidents_open} open"
        )


def _inside(lower: str = "yhat_lower", upper: str = "yhat_upper") -> pl.Expr:
    """The actual inside the band [lower, upper] (the served one by default)."""
    return (pl.col("actual") >= pl.col(lower)) & (pl.col("actual") <= pl.col(upper))


def run_evaluate(
    store: Store,
    *,
    window: timedelta = timedelta(days=28),
    prior_weight: int = calibration.PRIOR_WEIGHT,
    accuracy_window: timedelta = timedelta(days=7),
    anomalies: AnomalySettings | None = None,
) -> EvaluateSummary:
    champion = store.champion()
    if champion is None:
        return EvaluateSummary()
    prior, holdout, spec = _holdout_priors(champion)
    model = f"v{champion['id']}"
    summary = EvaluateSummary(model=model, accuracy_window=accuracy_window)
    ends = store.series_ends()
    if ends.is_empty():
        return summary
    # What is new: per series, the scored forecasts whose targets are after the newest one
    # counted before (calibration_tracking), within the window. Everything else the window
    # held is in the running aggregates (forecaster.store.aggregates).
    tracked = store.calibration_tracking(model)
    actuals = _Actuals(store)
    new = _new_scored(store, model, ends, tracked, window, actuals)
    cal_start = _day(ends["end"].max()) - _whole_days(window) + DAY
    days = _calibration_days(
        store.calibration_days(model, cal_start), new.filter(pl.col("target_ts") >= cal_start)
    )
    totals = _step_totals(days)
    summary.scored = sum(int(t["n"]) for t in totals.values())
    if summary.scored:
        n_all = summary.scored
        summary.coverage = sum(int(t["inside"]) for t in totals.values()) / n_all
        summary.coverage_raw = sum(int(t["inside_raw"]) for t in totals.values()) / n_all
    if new.is_empty():
        # Nothing scored since the last run: what it stored stands.
        summary.steps_calibrated = len(totals)
        summary.offset = store.calibration_offset(model)
        return summary

    inside = _inside()
    # One offset for every step, carried between runs: the actuals scored since the last
    # run move it by their excess miss rate per horizon of time. A horizon brings as many
    # scored rows as each target gets forecasts, times series, times horizon steps.
    horizon = max([int(new["horizon_step"].max()), *totals, *prior])
    level = float(new["interval_level"].max())
    until = new.group_by("series_id").agg(pl.col("target_ts").max().alias("tracked_until"))
    now_tracked = (
        pl.concat([tracked, until], how="vertical_relaxed")
        .group_by("series_id")
        .agg(pl.col("tracked_until").max())
        .join(ends, on="series_id")
        .filter(pl.col("tracked_until") > pl.col("end") - window)
    )
    per_target = new.height / new.select("series_id", "target_ts").unique().height
    per_horizon = per_target * max(now_tracked.height, 1) * horizon
    offset = calibration.tracked_offset(
        store.calibration_offset(model),
        new.height,
        int(new.select(inside.sum()).item()),
        per_horizon,
        level,
    )
    challenger_tracked = store.calibration_tracking(CHALLENGER)
    new_challenger = _new_scored(store, CHALLENGER, ends, challenger_tracked, window, actuals)
    challenger = _challenger_offset(store, new_challenger, per_horizon, level)
    rows = []
    for step in sorted(set(totals) | set(prior)):  # every step the offset applies to
        t = totals.get(step)
        base = calibration.blend_histogram(
            None if t is None else t["scores"], level, prior.get(step), prior_weight
        )
        rows.append(
            {
                "horizon_step": step,
                "correction": calibration.shifted([base], offset)[0],
                "n_scored": 0 if t is None else int(t["n"]),
                "coverage_raw": None if t is None else int(t["inside_raw"]) / int(t["n"]),
            }
        )
    summary.steps_calibrated, summary.offset = len(rows), offset

    # Anomalies: the newly scored actuals, judged against the newest forecast for each
    # (series, time), as served; incidents and fleet events follow (forecaster.anomaly).
    newest = new.sort("origin_ts").group_by("series_id", "target_ts").last()
    weeks_start = _series_days(ends, window)
    judged = _judge(store, model, newest, ends, window, weeks_start, anomalies, holdout, horizon)
    accuracy_new = _accuracy_days(store, model, new, new_challenger, newest, spec)
    accuracy = _series_accuracy(store, model, ends, accuracy_window, accuracy_new)
    summary.mase = _pooled_mase(accuracy, model)
    with store.begin() as conn:
        store.save_calibration(conn, model, sorted(rows, key=lambda r: r["horizon_step"]))
        store.save_calibration_days(conn, model, days["touched"], cal_start)
        store.save_calibration_offset(conn, model, offset, new.height, until)
        if challenger is not None:
            store.save_calibration_offset(conn, CHALLENGER, *challenger)
        # Kept over the accuracy window; over the anomaly window too while some series'
        # day counts are still read from it (a store upgraded past 0015, until judged).
        keep = _series_days(ends, accuracy_window)["since"].min()
        if judged.uncarried:
            keep = min(keep, weeks_start["since"].min())
        store.add_accuracy_days(conn, accuracy_new, keep)
        summary.new_anomalies = store.insert_anomalies(conn, judged.anomalies)
        judged.save(store, conn, model)
        store.save_series_accuracy(conn, accuracy.drop("_scale"))
    summary.threshold = judged.threshold.value
    summary.incidents_open = int(judged.state["incident_open"].sum())
    summary.new_incidents = judged.new_incidents
    summary.fleet_events = judged.events.height
    log.info("evaluate done", **summary.__dict__)
    return summary


DAY = timedelta(days=1)


def _day(ts):  # noqa: ANN001, ANN202 - a datetime
    """The UTC day a time falls in (its midnight)."""
    return ts.replace(hour=0, minute=0, second=0, microsecond=0)


def _whole_days(span: timedelta) -> timedelta:
    """`span` rounded up to whole days: the running aggregates count by day."""
    return DAY * -(-span // DAY)


def _series_days(ends: pl.DataFrame, span: timedelta) -> pl.DataFrame:
    """Per series (series_id, since): the first day of the whole days of `span` that end
    with the day of its newest point."""
    return ends.select(
        "series_id",
        (pl.col("end").dt.truncate("1d") - _whole_days(span) + DAY).alias("since"),
    )


def _new_scored(
    store: Store,
    model: str,
    ends: pl.DataFrame,
    tracked: pl.DataFrame,
    window: timedelta,
    actuals: _Actuals,
) -> pl.DataFrame:
    """The scored forecasts of `model` whose targets are after each series' newest one
    counted before (`tracked`: series_id, tracked_until) and in the last `window` before
    its newest point."""
    since = ends.join(tracked, on="series_id", how="left").select(
        "series_id",
        pl.max_horizontal(
            pl.col("tracked_until").fill_null(pl.col("end") - window), pl.col("end") - window
        ).alias("after"),
        "end",
    )
    return _scored_after(store, model, since, window, actuals)


class _Actuals:
    """The observed actuals one run reads (Store.actuals_for). A read that covers another's
    series and span serves it: the champion's and the challenger's
    new targets, which mostly share theirs, are read once."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reads: list[tuple[set[int], object, object, pl.DataFrame]] = []

    def scored(self, points: pl.DataFrame) -> pl.DataFrame:
        """`points` (forecast_points) joined to their actuals: the scored ones."""
        if points.is_empty():
            return with_actuals(points, None)
        ids = set(points["series_id"].unique().to_list())
        lo, hi = points["target_ts"].min(), points["target_ts"].max()
        for got, a, b, frame in self.reads:
            if a <= lo and hi <= b and ids <= got:
                return with_actuals(points, frame)
        frame = self.store.actuals_for(points)
        self.reads.append((ids, lo, hi, frame))
        return with_actuals(points, frame)


def _calibration_days(stored: list[dict], new: pl.DataFrame) -> dict:
    """The window's calibration_days (stored rows, from the window's first day) with the new
    scored forecasts added: {"window": {(day, step): row}, "touched": the rows of the days
    and steps the new ones fell in, to store}. A row: day, horizon_step, n, inside,
    inside_raw, scores (the histogram's counts; packed in "touched")."""
    window = {
        (r["day"], int(r["horizon_step"])): {
            **r,
            "scores": calibration.unpack_histogram(r["scores"]),
        }
        for r in stored
    }
    touched = []
    if not new.is_empty():
        inside = _inside()
        inside_raw = _inside("raw_lower", "raw_upper")
        width = pl.max_horizontal(pl.col("raw_upper") - pl.col("raw_lower"), pl.lit(1e-9))
        score = pl.min_horizontal(
            pl.max_horizontal(
                pl.col("raw_lower") - pl.col("actual"), pl.col("actual") - pl.col("raw_upper")
            )
            / width,
            pl.lit(calibration.BAND_SCORE_CAP),
        )
        scored = new.select(
            pl.col("target_ts").dt.truncate("1d").alias("day"),
            "horizon_step",
            inside.alias("inside"),
            inside_raw.alias("inside_raw"),
            score.alias("score"),
        )
        for (day, step), group in scored.group_by("day", "horizon_step"):
            key = (day, int(step))
            row = window.get(key) or {"day": day, "horizon_step": int(step), **_no_counts()}
            row = {
                **row,
                "n": int(row["n"]) + group.height,
                "inside": int(row["inside"]) + int(group["inside"].sum()),
                "inside_raw": int(row["inside_raw"]) + int(group["inside_raw"].sum()),
                "scores": row["scores"] + calibration.score_histogram(group["score"].to_numpy()),
            }
            window[key] = row
            touched.append({**row, "scores": calibration.pack_histogram(row["scores"])})
    return {"window": window, "touched": touched}


def _no_counts() -> dict:
    """A calibration_days row's counts before anything is scored."""
    return {"n": 0, "inside": 0, "inside_raw": 0, "scores": calibration.score_histogram([])}


def _step_totals(days: dict) -> dict[int, dict]:
    """Per horizon step, the window's sums: n, inside, inside_raw, scores (counts)."""
    out: dict[int, dict] = {}
    for (_, step), row in days["window"].items():
        t = out.setdefault(step, _no_counts())
        t["n"] += int(row["n"])
        t["inside"] += int(row["inside"])
        t["inside_raw"] += int(row["inside_raw"])
        t["scores"] = t["scores"] + row["scores"]
    return {step: t for step, t in out.items() if t["n"] > 0}


def _holdout_priors(version: dict) -> tuple[dict[int, float], dict, FeatureSpec | None]:
    """What the version measured on its training holdout: horizon step -> band correction,
    and its anomaly thresholds (training._holdout_thresholds); and its feature spec (the
    grid and seasons its baselines are forecast on). Empty (None) for a checkpoint from
    before them, or one that cannot be read."""
    from pipelines.predict import load_trained

    try:
        trained = load_trained(version["uri"], version["sha256"])
    except Exception as exc:  # noqa: BLE001 - the bands then follow the scores alone
        log.warning("no holdout calibration", model=f"v{version['id']}", error=str(exc))
        return {}, {}, None
    thresholds = trained.meta.get("anomaly_thresholds") or {}
    return trained.holdout_corrections, thresholds, trained.spec


ECHO = (timedelta(days=1), timedelta(weeks=1))  # the seasonal lags the models read

BASELINE_MODELS = tuple(f"seasonal_naive_{season}" for season in BASELINES)


def _scored_after(
    store: Store,
    model: str,
    starts: pl.DataFrame,
    window: timedelta,
    actuals: _Actuals | None = None,
) -> pl.DataFrame:
    """The scored forecasts of `model` with targets after each series' `after` (starts:
    series_id, after, and optionally end: its newest point; a forecast made at or after it
    has no actual yet and is not read). Series whose starts lie within a window of each
    other are read in one query; there is one query per such group."""
    actuals = actuals or _Actuals(store)
    starts = starts.sort("after")
    group = (starts["after"].diff().fill_null(timedelta(0)) > window).cum_sum()
    parts = []
    for (_,), members in starts.with_columns(group=group).group_by("group", maintain_order=True):
        ids = None if members.height == starts.height else members["series_id"].to_list()
        before = members["end"].max() if "end" in members.columns else None
        # Targets strictly after: a forecast whose last target is a series' `after` (the
        # one a run before counted up to) holds nothing new and is not decoded.
        since = members["after"].min() + timedelta(microseconds=1)
        points = store.forecast_points(model, since, ids, before)
        parts.append(actuals.scored(points))
    return _after(pl.concat(parts), starts)


def _challenger_offset(
    store: Store, new: pl.DataFrame, per_horizon: float, level: float
) -> tuple[float, int, pl.DataFrame] | None:
    """The statistical challenger's own pooled offset (band widths added to the champion's
    corrections where its rows are written, pipelines.predict), carried over its actuals
    scored since the last run (`new`, _challenger_scored) as the champion's is: (offset,
    actuals counted, each series' newest target counted), or None where it has no newly
    scored forecast."""
    if new.is_empty():
        return None
    inside = _inside()
    offset = calibration.tracked_offset(
        store.calibration_offset(CHALLENGER),
        new.height,
        int(new.select(inside.sum()).item()),
        per_horizon,
        level,
    )
    until = new.group_by("series_id").agg(pl.col("target_ts").max().alias("tracked_until"))
    return offset, new.height, until


def _after(frame: pl.DataFrame, starts: pl.DataFrame) -> pl.DataFrame:
    """The rows whose target lies after their series' `after` (starts: series_id, after)."""
    return (
        frame.join(starts.select("series_id", "after"), on="series_id")
        .filter(pl.col("target_ts") > pl.col("after"))
        .drop("after")
    )


def _window_sums(
    store: Store, starts: pl.DataFrame, models: Sequence[str], *, first_day: bool = False
) -> pl.DataFrame:
    """Per series of `starts` (series_id, since: a day) and model of `models`, the sums of
    its accuracy_days from its `since` on (AggregateStore.accuracy_sums; one query per
    distinct first day, most fleets have one); with `first_day`, also `first`, the first of
    those days with scored forecasts."""
    parts = []
    for (since,), group in starts.group_by("since"):
        sums = store.accuracy_sums(since, models, first_day=first_day)
        parts.append(sums.join(group.select("series_id"), on="series_id", how="semi"))
    if not parts:
        return pl.DataFrame(
            schema={
                "series_id": pl.Int64,
                "model": pl.String,
                **{c: pl.Int64 for c in ("n", "inside", "n_points")},
                **{c: pl.Float64 for c in ("abs_err", "naive_abs_err")},
                **({"first": TS_DTYPE} if first_day else {}),
            }
        )
    return pl.concat(parts, how="vertical_relaxed")


def _accuracy_days(
    store: Store,
    model: str,
    new: pl.DataFrame,
    new_challenger: pl.DataFrame,
    newest: pl.DataFrame,
    spec: FeatureSpec | None,
) -> pl.DataFrame:
    """What the new scored forecasts add to accuracy_days: per series, model and day of
    target, for the champion, the challenger and both seasonal naives, on the forecasts the
    daily naive also made (series, origin, step): n, the sums of absolute errors (abs_err)
    and of the daily naive's (naive_abs_err), how many fell inside the band (models with
    one); and the champion's actuals judged (n_points: `newest`, one per target time).

    The naives' forecasts are not read back: a seasonal naive's forecast of a target is the
    value one season (or k seasons) before it, read from `observations` for the new keys
    (_naives_from) with the champion's seasons (`spec`); without a spec (a checkpoint that
    cannot be read) their stored rows are read."""
    key = ["series_id", "origin_ts", "horizon_step"]
    frames = {name: f for name, f in ((model, new), (CHALLENGER, new_challenger)) if f.height}
    keys = pl.concat(
        [f.select(*key, "target_ts", "actual") for f in frames.values()], how="vertical_relaxed"
    ).unique(key)
    if spec is not None:
        frames.update(_naives_from(store, keys, keys, spec))
    else:
        starts = keys.group_by("series_id").agg(
            (pl.col("target_ts").min() - timedelta(microseconds=1)).alias("after")
        )
        for name in BASELINE_MODELS:
            read = _scored_after(store, name, starts, timedelta(days=28))
            frames[name] = read.join(keys.select(key), on=key, how="semi")
    daily = frames.get("seasonal_naive_daily")
    parts = []
    if daily is not None and daily.height:
        naive_err = daily.select(*key, (pl.col("yhat") - pl.col("actual")).abs().alias("_naive"))
        inside = _inside()
        mine = new.select(key)
        for name, f in frames.items():
            paired = f.join(naive_err, on=key, how="inner")
            if name in BASELINE_MODELS:  # on the champion's forecasts, as series_accuracy pairs
                paired = paired.join(mine, on=key, how="semi")
            paired = paired.sort(key)  # summed in one order, whatever order the rows came in
            parts.append(
                paired.group_by("series_id", pl.col("target_ts").dt.truncate("1d").alias("day"))
                .agg(
                    pl.len().cast(pl.Int64).alias("n"),
                    (pl.col("yhat") - pl.col("actual")).abs().sum().alias("abs_err"),
                    pl.col("_naive").sum().alias("naive_abs_err"),
                    inside.fill_null(False).sum().cast(pl.Int64).alias("inside"),
                    pl.lit(0, pl.Int64).alias("n_points"),
                )
                .with_columns(pl.lit(name).alias("model"))
            )
    parts.append(
        newest.group_by("series_id", pl.col("target_ts").dt.truncate("1d").alias("day")).agg(
            pl.lit(0, pl.Int64).alias("n"),
            pl.lit(0.0).alias("abs_err"),
            pl.lit(0.0).alias("naive_abs_err"),
            pl.lit(0, pl.Int64).alias("inside"),
            pl.len().cast(pl.Int64).alias("n_points"),
            pl.lit(model).alias("model"),
        )
    )
    return (
        pl.concat([p.select(_DAY_COLUMNS) for p in parts], how="vertical_relaxed")
        .group_by("series_id", "model", "day")
        .agg(pl.col(c).sum() for c in _DAY_COLUMNS[3:])
        .select(_DAY_COLUMNS)
    )


_DAY_COLUMNS = tuple(c.name for c in schema.accuracy_days.columns)  # as the table has them


def _series_accuracy(
    store: Store, champion: str, ends: pl.DataFrame, window: timedelta, new_days: pl.DataFrame
) -> pl.DataFrame:
    """Per series with new scored forecasts and per model (the champion, the challenger and
    both seasonal naives), over the whole days of `window` that end with the day of the
    series' newest point: n, MAE, MASE and band coverage (of the models with a band), from
    accuracy_days as stored plus what this run adds (`new_days`, _accuracy_days). MASE is
    the MAE over the daily seasonal naive's MAE on the same forecasts (series, origin,
    step): with a horizon of at most a day that naive's MAE is the textbook in-sample scale,
    and pairing the rows keeps a model that has served only part of the window (a new
    champion) from being scaled by the rest. `_scale` (the naive's MAE on those rows) is for
    pooling and is not stored. Series with nothing new keep the rows they have."""
    starts = _series_days(ends, window).join(
        new_days.select("series_id").unique(), on="series_id", how="semi"
    )
    if starts.is_empty():
        return pl.DataFrame(
            schema={"series_id": pl.Int64, "model": pl.String, "n": pl.Int64}
            | {"abs_err": pl.Float64, "naive_abs_err": pl.Float64, "inside": pl.Int64}
            | {"since": TS_DTYPE, "end": TS_DTYPE}
        ).select(_accuracy_columns())
    sums = ["n", "abs_err", "naive_abs_err", "inside"]

    def totals_of(
        models: Sequence[str], since: pl.DataFrame, stored: pl.DataFrame | None = None
    ) -> pl.DataFrame:
        # The stored days' sums (in day order, AggregateStore.accuracy_sums; `stored` where
        # read already), then what this run adds, in day order: equal runs give equal sums.
        if stored is None:
            stored = _window_sums(store, since, models)
        fresh = (
            new_days.filter(pl.col("model").is_in(list(models)))
            .join(since, on="series_id")
            .filter(pl.col("day") >= pl.col("since"))
            .sort("series_id", "model", "day")
        )
        return (
            pl.concat(
                [
                    stored.select("series_id", "model", *sums),
                    fresh.select("series_id", "model", *sums),
                ],
                how="vertical_relaxed",
            )
            .group_by("series_id", "model", maintain_order=True)
            .agg(pl.col(c).sum() for c in sums)
            .filter(pl.col("n") > 0)
        )

    # The others on the champion's days only (a champion promoted inside the window is
    # compared on what it served): from the first day it has scored forecasts of.
    models = set(new_days["model"].to_list())
    mine = _window_sums(store, starts, [champion], first_day=True)
    firsts = (
        pl.concat(
            [
                mine.select("series_id", "first"),
                new_days.filter((pl.col("model") == champion) & (pl.col("n") > 0)).select(
                    "series_id", pl.col("day").alias("first")
                ),
            ],
            how="vertical_relaxed",
        )
        .group_by("series_id")
        .agg(pl.col("first").min())
    )
    others_since = starts.join(firsts, on="series_id").select(
        "series_id", pl.max_horizontal("since", "first").alias("since")
    )
    totals = (
        pl.concat(
            [
                totals_of([champion], starts, mine),
                totals_of(sorted(models - {champion}), others_since),
            ]
        )
        .join(starts, on="series_id")
        .join(ends, on="series_id")
    )
    return totals.select(_accuracy_columns())


def _accuracy_columns() -> list[pl.Expr]:
    """series_accuracy's columns from a frame of window sums (series_id, model, n, abs_err,
    naive_abs_err, inside, since, end), and `_scale` (the daily naive's MAE on the same
    forecasts: for pooling, not stored)."""
    n = pl.col("n")
    return [
        pl.col("series_id"),
        pl.col("model"),
        n.alias("n_scored"),
        (pl.col("abs_err") / n).alias("mae"),
        pl.when(pl.col("naive_abs_err") != 0)
        .then(pl.col("abs_err") / pl.col("naive_abs_err"))
        .alias("mase"),
        pl.when(pl.col("model").is_in(BASELINE_MODELS))
        .then(None)
        .otherwise(pl.col("inside") / n)
        .cast(pl.Float64)
        .alias("coverage"),
        pl.col("since").alias("window_start"),
        pl.col("end").alias("window_end"),
        (pl.col("naive_abs_err") / n).alias("_scale"),
    ]


def _naives_from(
    store: Store, scored: pl.DataFrame, mine: pl.DataFrame, spec: FeatureSpec
) -> dict[str, pl.DataFrame]:
    """Each seasonal naive's forecasts on the keys of `mine` (series_id, origin_ts,
    horizon_step, target_ts, actual), with yhat the value stored one season before the
    target (k seasons for steps past one season) as predict's grid holds it (float32), so
    as predict forecasts and stores it (forecaster.features.seasonal_naive). Those values
    are the actuals `scored` holds, or in the window copies predict keeps
    (_copied_values); the few that are in neither (a series with a late point predict has
    not handled yet, a window not copied) are read from `observations`. Keys with nothing
    stored a season back are left out, as predict leaves out a baseline row with nothing to
    copy."""
    keys = mine.select("series_id", "origin_ts", "horizon_step", "target_ts", "actual")
    backs = {}
    for season, period in zip(BASELINES, (spec.season_day, spec.season_week), strict=True):
        seasons_back = (pl.col("horizon_step") + period - 1) // period
        back = pl.col("target_ts") - pl.duration(seconds=seasons_back * period * spec.freq_seconds)
        backs[season] = keys.with_columns(back.alias("_back"))
    values = scored.select(
        "series_id", pl.col("target_ts").alias("_back"), pl.col("actual").alias("yhat")
    ).unique(["series_id", "_back"])
    wanted = pl.concat([b.select("series_id", "_back") for b in backs.values()]).unique()
    missing = wanted.join(values, on=["series_id", "_back"], how="anti")
    if not missing.is_empty():
        copied = _copied_values(store, missing)
        values = pl.concat([values, copied], how="vertical_relaxed")
        missing = missing.join(copied, on=["series_id", "_back"], how="anti")
    if not missing.is_empty():
        # One span per series and season (a day and a week back are apart: a span over
        # both would read the days between).
        spans = pl.concat(
            [
                b.join(missing, on=["series_id", "_back"], how="semi")
                .group_by("series_id")
                .agg(pl.col("_back").min().alias("a"), pl.col("_back").max().alias("b"))
                for b in backs.values()
            ]
        )
        ranges = sorted(set(zip(spans["a"], spans["b"], strict=True)))
        ids = spans["series_id"].unique().to_list()
        read = store.recent_values(ids, ranges).select(
            "series_id", pl.col("ts").alias("_back"), pl.col("value").alias("yhat")
        )
        values = pl.concat(
            [values, read.join(missing, on=["series_id", "_back"], how="semi")],
            how="vertical_relaxed",
        )
    values = values.with_columns(pl.col("yhat").cast(pl.Float32).cast(pl.Float64)).filter(
        pl.col("yhat").is_not_null() & pl.col("yhat").is_not_nan()
    )
    return {
        f"seasonal_naive_{season}": frame.join(values, on=["series_id", "_back"], how="inner")
        .drop("_back")
        .with_columns(
            pl.lit(None, pl.Float64).alias("yhat_lower"),
            pl.lit(None, pl.Float64).alias("yhat_upper"),
        )
        for season, frame in backs.items()
    }


def _copied_values(store: Store, keys: pl.DataFrame) -> pl.DataFrame:
    """The values at `keys` (series_id, _back) that predict's window copies hold
    (schema.window_values: its grid's float32 values of a series' complete windows), as
    series_id, _back, yhat; NaN cells (nothing stored) left out. Not of a series with a
    late mark (Store.copied_windows)."""
    out = {"series_id": pl.Int64, "_back": TS_DTYPE, "yhat": pl.Float64}
    windows = store.copied_windows().rename({"window_s": "_window_s"})
    keys = keys.join(windows, on="series_id").with_columns(
        (pl.col("_back").dt.epoch("s") // pl.col("_window_s")).alias("_wid")
    )
    found = store.window_values(
        keys["series_id"].unique().to_list(), keys["_wid"].unique().to_list()
    )
    if not found:
        return pl.DataFrame(schema=out)
    sid, wid, step, blobs = zip(*found, strict=True)
    n = np.array([len(b) // 4 for b in blobs], dtype=np.int64)
    copies = pl.DataFrame(
        {
            "series_id": np.asarray(sid, dtype=np.int64),
            "_wid": np.asarray(wid, dtype=np.int64),
            "_step": np.asarray(step, dtype=np.int64),
            "_n": n,
            "_first": np.cumsum(n) - n,  # its first cell in `cells`
        }
    )
    at = (
        keys.join(copies, on=["series_id", "_wid"])
        .with_columns(
            (pl.col("_back").dt.epoch("s") - pl.col("_wid") * pl.col("_window_s")).alias("_s")
        )
        .filter(
            (pl.col("_s") % pl.col("_step") == 0) & (pl.col("_s") // pl.col("_step") < pl.col("_n"))
        )
    )
    cells = np.frombuffer(b"".join(blobs), dtype="<f4")
    index = (at["_first"] + at["_s"] // at["_step"]).to_numpy()
    return (
        at.select("series_id", "_back")
        .with_columns(pl.Series("yhat", cells[index].astype(np.float64)))
        .filter(~pl.col("yhat").is_nan())
    )


def _pooled_mase(rows: pl.DataFrame, model: str) -> float | None:
    """The model's MAE over the daily naive's on the same forecasts, pooled over series."""
    mine = rows.filter(pl.col("model") == model)
    n = mine["n_scored"].to_list()
    naive = sum(s * k for s, k in zip(mine["_scale"].to_list(), n, strict=True))
    mae = sum(m * k for m, k in zip(mine["mae"].to_list(), n, strict=True))
    return mae / naive if naive > 0 else None


# How far back of its new points a run rewrites the fleet's events (at least): events less
# than [anomalies].fleet_merge apart merge, and a time's fleet evidence sums runs of times.
EVENT_REACH = timedelta(days=1)
RECENT = max(anomaly.RUNS) - 1  # deviations carried in anomaly_state for the runs


@dataclass
class _Judged:
    """What one evaluate run writes about anomalies."""

    threshold: anomaly.Threshold
    anomalies: list[dict]
    old_incidents: pl.DataFrame  # (series_id, start_ts) replaced by `incidents`
    incidents: pl.DataFrame
    state: pl.DataFrame  # anomaly_state's rows (Store.save_anomaly_state)
    after: object  # events after this time are rewritten
    events: pl.DataFrame
    links: pl.DataFrame
    new_incidents: int
    rate_seen: float | None
    rate_target: float
    points: pl.DataFrame  # the judged points to keep (anomaly_points)
    times: pl.DataFrame  # their counts per time (fleet_times)
    window_start: object  # aggregates before it are dropped
    # Series whose anomaly_state row still lacks what a run carries (written before
    # migration 0015, not judged since): their day counts are still read from accuracy_days.
    uncarried: int = 0

    def save(self, store: Store, conn, model: str) -> None:  # noqa: ANN001
        store.replace_incidents(conn, model, self.old_incidents, self.incidents)
        store.save_anomaly_state(conn, model, self.state)
        store.replace_fleet_events(conn, model, self.after, self.events, self.links)
        store.save_anomaly_threshold(
            conn,
            model,
            {
                "threshold": self.threshold.value,
                "measured": self.threshold.measured,
                "rate_target": self.rate_target,
                "rate_seen": self.rate_seen,
                "series_weeks": self.threshold.series_weeks,
            },
        )
        store.save_anomaly_points(
            conn,
            model,
            self.points,
            before=self.window_start,
            edges_before=self.after,
            min_evidence=anomaly.MIN_THRESHOLD,
        )
        store.add_fleet_times(conn, model, self.times, self.window_start)


# A series' tail in anomaly_state: its window's points with evidence >= MIN_THRESHOLD, oldest
# first, each the epoch microseconds of its time and its evidence (little-endian).
_TAIL = np.dtype([("ts", "<i8"), ("evidence", "<f8")])
_NO_TAILS = {"series_id": pl.Int64, "ts": TS_DTYPE, "evidence": pl.Float64}


def _from_blobs(blobs: list[bytes], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The items of `blobs` (each a packed array of `dtype`) end to end, and how many each
    holds."""
    counts = np.array([len(b) // dtype.itemsize for b in blobs], dtype=np.int64)
    return np.frombuffer(b"".join(blobs), dtype=dtype), counts


def _to_blobs(items: np.ndarray, counts: np.ndarray) -> list[bytes]:
    """`items` cut into consecutive runs of `counts` items, each packed."""
    ends = np.cumsum(counts).tolist()
    return [items[e - n : e].tobytes() for e, n in zip(ends, counts.tolist(), strict=True)]


def _unpack_tails(state: pl.DataFrame) -> pl.DataFrame:
    """The points of the `tail`s of `state` (series_id, tail): series_id, ts, evidence."""
    rec, counts = _from_blobs(state["tail"].to_list(), _TAIL)
    return pl.DataFrame(
        {
            "series_id": np.repeat(state["series_id"].to_numpy(), counts),
            "ts": pl.Series(np.ascontiguousarray(rec["ts"]), dtype=pl.Int64).cast(TS_DTYPE),
            "evidence": np.ascontiguousarray(rec["evidence"]),
        },
        schema=_NO_TAILS,
    )


def _pack_tails(points: pl.DataFrame) -> pl.DataFrame:
    """Per series of `points` (series_id, ts, evidence), its tail: series_id, tail."""
    schema = {"series_id": pl.Int64, "tail": pl.Binary}
    if points.is_empty():
        return pl.DataFrame(schema=schema)
    points = points.sort("series_id", "ts")
    rec = np.empty(points.height, dtype=_TAIL)
    rec["ts"] = points["ts"].dt.epoch("us").to_numpy()
    rec["evidence"] = points["evidence"].to_numpy()
    ids, counts = np.unique(points["series_id"].to_numpy(), return_counts=True)
    return pl.DataFrame({"series_id": ids, "tail": _to_blobs(rec, counts)}, schema=schema)


_DAY_US = 86_400 * 10**6
_DAY_COUNT = np.dtype("<i8")  # a series' judged points on one day, in anomaly_state.day_counts
_NO_DAYS = {"series_id": pl.Int64, "day": TS_DTYPE, "n_points": pl.Int64}


def _unpack_days(state: pl.DataFrame) -> pl.DataFrame:
    """The `day_counts` of `state` (series_id, day_counts, window_day) as rows: series_id,
    day, n_points (each series' days from its window_day on)."""
    n, counts = _from_blobs(state["day_counts"].to_list(), _DAY_COUNT)
    first = np.cumsum(counts) - counts
    k = np.arange(n.size, dtype=np.int64) - np.repeat(first, counts)
    day0 = state["window_day"].dt.epoch("us").to_numpy()
    return pl.DataFrame(
        {
            "series_id": np.repeat(state["series_id"].to_numpy(), counts),
            "day": pl.Series(np.repeat(day0, counts) + k * _DAY_US).cast(TS_DTYPE),
            "n_points": n.astype(np.int64),
        },
        schema=_NO_DAYS,
    )


def _pack_days(days: pl.DataFrame, since: pl.DataFrame) -> pl.DataFrame:
    """Per series of `since` (series_id, since), its `days` (series_id, day, n_points: its
    judged points per day, none before its since) as day_counts from its since on (an
    empty one where it has none): series_id, day_counts."""
    days = days.join(since, on="series_id").sort("series_id", "day")
    ids = since["series_id"].to_numpy()
    row = {sid: r for r, sid in enumerate(ids.tolist())}
    at = days["series_id"].replace_strict(row, return_dtype=pl.Int64).to_numpy()
    k = ((days["day"].dt.epoch("us") - days["since"].dt.epoch("us")) // _DAY_US).to_numpy()
    length = np.zeros(ids.size, dtype=np.int64)
    np.maximum.at(length, at, k + 1)
    first = np.cumsum(length) - length
    flat = np.zeros(int(length.sum()), dtype=_DAY_COUNT)
    np.add.at(flat, first[at] + k, days["n_points"].to_numpy())
    return pl.DataFrame(
        {"series_id": ids, "day_counts": _to_blobs(flat, length)},
        schema={"series_id": pl.Int64, "day_counts": pl.Binary},
    )


def _window_before(
    store: Store,
    model: str,
    state: pl.DataFrame,
    weeks_start: pl.DataFrame,
    starts: pl.DataFrame,
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """What each series' window held before the new points: its judged points per whole
    day from its `since` on (weeks_start; series_id, day, n_points) and their total
    (series_id, _n_before), and those after its window's start (starts: series_id, _from)
    with evidence of at least MIN_THRESHOLD (series_id, ts, evidence). Read from what
    anomaly_state carries (day_counts from window_day on, tail), less the days and points
    that have left the window since; where it carries none (rows written before migration
    0015), from accuracy_days and anomaly_points, as the window's aggregates; those series
    are the fourth frame (series_id)."""
    state = state.join(weeks_start, on="series_id")
    ok = pl.col("tail").is_not_null() & pl.col("day_counts").is_not_null()
    carried, recount = state.filter(ok), state.filter(~ok)
    days = _unpack_days(carried.select("series_id", "day_counts", "window_day"))
    tails = _unpack_tails(carried.select("series_id", "tail"))
    if recount.height:
        ids = recount["series_id"].implode()
        stored = store.judged_per_day(model, recount["since"].min())
        days = pl.concat([days, stored.filter(pl.col("series_id").is_in(ids))])
        since = starts.filter(pl.col("series_id").is_in(ids))["_from"].min()
        points = store.anomaly_points(model, since, min_evidence=anomaly.MIN_THRESHOLD)
        tails = pl.concat(
            [tails, points.filter(pl.col("series_id").is_in(ids)).select(list(_NO_TAILS))]
        )
    days = (
        days.join(weeks_start, on="series_id")
        .filter(pl.col("day") >= pl.col("since"))
        .select(list(_NO_DAYS))
    )
    counts = days.group_by("series_id").agg(pl.col("n_points").sum().alias("_n_before"))
    tails = (
        tails.join(starts, on="series_id")
        .filter(pl.col("ts") > pl.col("_from"))
        .select(list(_NO_TAILS))
    )
    return days, counts, tails, recount.select("series_id")


def _carry(
    tails: pl.DataFrame,
    days: pl.DataFrame,
    new: pl.DataFrame,
    weeks_start: pl.DataFrame,
) -> pl.DataFrame:
    """What anomaly_state carries for the series judged (`new`: their new points, series_id,
    ts, evidence): the window's `tails` with the new points above MIN_THRESHOLD added (tail),
    and its `days` (series_id, day, n_points) with the new points counted, from its since
    on, as accuracy_days counts them (day_counts, window_day)."""
    ids = new.select("series_id").unique()
    fresh = new.filter(pl.col("evidence") >= anomaly.MIN_THRESHOLD)
    packed = _pack_tails(
        pl.concat(
            [tails.join(ids, on="series_id", how="semi"), fresh.select(list(_NO_TAILS))],
            how="vertical_relaxed",
        )
    )
    since = weeks_start.join(ids, on="series_id", how="semi")
    counted = pl.concat(
        [
            days.join(ids, on="series_id", how="semi"),
            new.join(since, on="series_id")
            .filter(pl.col("ts") >= pl.col("since"))
            .group_by("series_id", pl.col("ts").dt.truncate("1d").alias("day"))
            .agg(pl.len().cast(pl.Int64).alias("n_points")),
        ],
        how="vertical_relaxed",
    )
    return (
        _pack_days(counted, since)
        .join(since, on="series_id")
        .join(packed, on="series_id", how="left")
        .select(
            "series_id",
            pl.col("tail").fill_null(pl.lit(b"", dtype=pl.Binary)),
            "day_counts",
            pl.col("since").alias("window_day"),
        )
    )


def _typical(points: pl.DataFrame, state: pl.DataFrame) -> pl.DataFrame:
    """Per series of `points` (the new ones: series_id, yhat_lower, yhat_upper, _n_before:
    its points in the window before them), its typical half-width of the band (the scale
    forecaster.anomaly.deviation floors and caps by): the median of the new points' blended
    with the one carried in `state`, weighing as many points as the window held before."""
    new = points.group_by("series_id").agg(
        ((pl.col("yhat_upper") - pl.col("yhat_lower")).median() / 2).alias("_median"),
        pl.len().alias("_n"),
        pl.col("_n_before").first(),
    )
    carried = state.select("series_id", pl.col("typical").alias("_carried"))
    w = pl.col("_n_before").fill_null(0).cast(pl.Float64)
    blended = (pl.col("_carried") * w + pl.col("_median") * pl.col("_n")) / (w + pl.col("_n"))
    return new.join(carried, on="series_id", how="left").select(
        "series_id",
        pl.when(pl.col("_carried").is_null() | (w <= 0))
        .then(pl.col("_median"))
        .otherwise(blended)
        .alias("_typical"),
    )


def _carried(state: pl.DataFrame, freqs: pl.DataFrame) -> pl.DataFrame:
    """The deviations anomaly_state carries (its last RECENT points of each series) as rows
    before the new points: series_id, ts (stepped back from the newest point judged, for
    order only), deviation."""
    rows = []
    for sid, ts, recent in state.select("series_id", "ts", "recent").rows():
        values = json.loads(recent) if recent else []
        rows.extend((sid, len(values) - i, ts, d) for i, d in enumerate(values))
    if not rows:
        return pl.DataFrame(schema={"series_id": pl.Int64, "ts": TS_DTYPE, "deviation": pl.Float64})
    frame = pl.DataFrame(
        rows, schema=["series_id", "_back", "_last", "deviation"], orient="row"
    ).with_columns(pl.col("_last").cast(TS_DTYPE))
    return frame.join(freqs, on="series_id").select(
        "series_id",
        (pl.col("_last") - pl.duration(seconds=pl.col("freq_s") * pl.col("_back"))).alias("ts"),
        "deviation",
    )


def _correlations(state: pl.DataFrame, runs: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per series of `runs` (the carried deviations, then the new ones: series_id,
    _carried, _lag, _square from anomaly.lag_terms): the lag-one correlation of its
    deviations its runs are scaled by (_rho: from the sums anomaly_state carries, leaning on
    the fleet's, out of sample as the thresholds are), and those sums with its new points
    added (lag_sum, square_sum; older points weigh half every anomaly.RHO_HALF_LIFE points).
    The fleet's correlation is read from every series' carried sums, or from the new
    points where none carries any (a new model's first run)."""
    has = state.filter(pl.col("square_sum").is_not_null())
    new = runs.filter(~pl.col("_carried"))
    if has.height and float(has["square_sum"].sum()) > 0:
        pooled = anomaly.pooled_correlation(
            float(has["lag_sum"].sum()), float(has["square_sum"].sum())
        )
    else:
        pooled = anomaly.pooled_correlation(
            float(new["_lag"].fill_null(0.0).sum()), float(new["_square"].fill_null(0.0).sum())
        )
    decay = 0.5 ** (1.0 / anomaly.RHO_HALF_LIFE)
    age = pl.int_range(pl.len()).reverse().over("series_id")  # new points after this one
    added = (
        new.with_columns(pl.lit(decay).pow(age).alias("_w"))
        .group_by("series_id")
        .agg(
            (pl.col("_lag") * pl.col("_w")).sum().alias("_add_lag"),
            (pl.col("_square") * pl.col("_w")).sum().alias("_add_square"),
            pl.len().alias("_m"),
        )
    )
    sums = added.join(
        has.select("series_id", "lag_sum", "square_sum"), on="series_id", how="left"
    ).with_columns(pl.col("lag_sum", "square_sum").fill_null(0.0))
    rho = anomaly.correlation(sums["lag_sum"].to_numpy(), sums["square_sum"].to_numpy(), pooled)
    kept = pl.lit(decay).pow(pl.col("_m"))
    return (
        sums.select("series_id", pl.Series("_rho", rho, dtype=pl.Float64)),
        sums.select(
            "series_id",
            (pl.col("lag_sum") * kept + pl.col("_add_lag")).alias("lag_sum"),
            (pl.col("square_sum") * kept + pl.col("_add_square")).alias("square_sum"),
        ),
    )


def _judge(
    store: Store,
    model: str,
    newest: pl.DataFrame,
    ends: pl.DataFrame,
    window: timedelta,
    weeks_start: pl.DataFrame,
    cfg: AnomalySettings | None,
    holdout: dict | None,
    horizon: int,
) -> _Judged:
    """Score the newly scored actuals (`newest`: one per series and target time, the newest
    forecast's), judge them, and fold the anomalous ones into incidents and fleet events.
    What the window held before comes from the running aggregates: each series' carried
    typical half-width, last deviations, judged points over the whole days of its window
    from `weeks_start` (series_id, since) and those of them above the lowest threshold
    allowed (anomaly_state: _window_before), and the fleet's counts per time
    (fleet_times)."""
    cfg = cfg or AnomalySettings()
    gap = cfg.gap
    freqs = store.series_freqs()
    state = store.carried_state(model)
    starts = ends.select("series_id", (pl.col("end") - window).alias("_from"))
    window_start = starts["_from"].min()
    days_before, points_before, tails, uncarried = _window_before(
        store, model, state, weeks_start, starts
    )
    points = (
        newest.rename({"target_ts": "ts"})
        .join(freqs, on="series_id")
        .join(points_before, on="series_id", how="left")
        .sort("series_id", "ts")
    )
    points = points.join(_typical(points, state), on="series_id")
    points = points.with_columns(anomaly.deviation(points, typical="_typical"))
    # Evidence sums runs of a series' last deviations: those carried from the last run come
    # first, then are dropped.
    carried = _carried(state.join(points.select("series_id").unique(), on="series_id"), freqs)
    runs = pl.concat(
        [
            carried.with_columns(pl.lit(True).alias("_carried")),
            points.select("series_id", "ts", "deviation", pl.lit(False).alias("_carried")),
        ],
        how="vertical_relaxed",
    ).sort("series_id", "ts")
    runs = runs.hstack(anomaly.lag_terms(runs))
    rho, lag_sums = _correlations(state, runs)
    runs = runs.join(rho, on="series_id", maintain_order="left")
    runs = runs.with_columns(anomaly.evidence(runs, rho="_rho"))
    recent = (
        runs.group_by("series_id", maintain_order=True)
        .agg(pl.col("deviation").tail(RECENT).alias("_recent"))
        .select(
            "series_id",
            pl.col("_recent").map_elements(
                lambda d: json.dumps(d.to_list()), return_dtype=pl.String
            ),
        )
    )
    points = points.join(
        runs.filter(~pl.col("_carried")).select("series_id", "ts", "evidence"),
        on=["series_id", "ts"],
    )
    first_new = points["ts"].min()
    # Thresholds are read from the points judged before, out of sample as the bands'
    # calibration is, and without the times of fleet events: a storm over the whole fleet
    # is no sample of normal data, and would lift the threshold over the next one. Only the
    # points above the lowest threshold allowed are kept (each series' tail); each series'
    # points are counted by day, as the threshold's budget.
    past = tails.join(freqs, on="series_id")
    known = store.fleet_events_since(model, window_start)
    for event in known:
        past = past.filter(~pl.col("ts").is_between(event["start_ts"], event["end_ts"]))
    # Nor with the incidents that were clear anomalies (peak score CLEAR or more): disruptions
    # more frequent than the rate chosen would otherwise lift the threshold over themselves.
    # Marginal incidents stay in, so the threshold cannot talk itself down.
    window = store.incidents_since(model, window_start)
    clear = window.filter(pl.col("peak_score") >= anomaly.CLEAR).select(
        "series_id", pl.col("start_ts").alias("_from"), pl.col("end_ts").alias("_to")
    )
    if not clear.is_empty():
        inside = (
            past.select("series_id", "ts")
            .join(clear, on="series_id")
            .filter(pl.col("ts").is_between(pl.col("_from"), pl.col("_to")))
            .select("series_id", "ts")
            .unique()
        )
        past = past.join(inside, on=["series_id", "ts"], how="anti")
    weeks = (
        points_before.join(freqs, on="series_id")
        .select(
            "series_id",
            (pl.col("_n_before").cast(pl.Float64) * pl.col("freq_s") / anomaly.WEEK_S).alias(
                "_weeks"
            ),
        )
        .filter(pl.col("_weeks") > 0)
    )
    judged_ids = set(points["series_id"].unique().to_list())
    threshold = anomaly.choose_threshold(
        past, cfg.incidents_per_week, gap, weeks=float(weeks["_weeks"].sum())
    )
    # What the model measured on its training holdout, at the same rate and gap: serves
    # each series until it has enough scored points of its own.
    holdout = holdout or {}
    same = holdout.get("rate") == cfg.incidents_per_week and holdout.get("gap") == gap
    from_holdout = holdout.get("series", {}) if same else {}
    served = threshold.measured  # the fleet's level read from what is served
    if not threshold.measured:
        # A new model: the level its predecessor measured on what it served, else the one
        # its own holdout measured (holdout bands are tighter than served ones: it runs low).
        before = store.anomaly_threshold()
        if before is not None:
            value, served = float(before["threshold"]), True
        elif same and holdout.get("pooled") is not None:
            value = float(holdout["pooled"])
        else:
            value = threshold.value
        threshold = anomaly.Threshold(value, threshold.series_weeks, 0, measured=False)
    # Each series with enough history of its own gets its own threshold, one known to the
    # model its holdout's; the rest, the fleet's.
    own: dict[int, float] = {}
    if from_holdout:
        # The holdout's thresholds differ between series as the served ones will; their
        # level follows the fleet's served one where there is one (bands served live are
        # not the holdout's).
        pooled = holdout.get("pooled")
        level = threshold.value / pooled if served and pooled else 1.0
        for sid, name in store.series_catalogue():
            if sid in judged_ids and name in from_holdout:
                own[sid] = max(float(from_holdout[name]) * level, anomaly.MIN_THRESHOLD)
    mine = past.filter(pl.col("series_id").is_in(list(judged_ids)))
    own.update(
        anomaly.choose_thresholds(
            mine,
            cfg.incidents_per_week,
            gap,
            shrink_to=threshold.value,
            weeks=weeks.filter(pl.col("series_id").is_in(list(judged_ids))),
        )
    )
    new = points.with_columns(
        pl.col("series_id")
        .replace_strict(own, default=threshold.value, return_dtype=pl.Float64)
        .alias("threshold")
    ).with_columns((pl.col("evidence") / pl.col("threshold")).alias("score"))
    # An echo: the models read the values a day and a week back, so an anomalous actual
    # then makes the forecast for now wrong the other way. Such an actual is no evidence
    # of trouble now: its score is 0.
    earlier_hits = store.anomalies_since(model, first_new - ECHO[-1])
    raw = new.filter(pl.col("score") > 1).select("series_id", "ts", "deviation")
    seen = pl.concat(
        [earlier_hits, raw.select("series_id", "ts", pl.col("deviation").sign().alias("sign"))],
        how="vertical_relaxed",
    )
    echo = pl.lit(False)
    for lag in ECHO:
        earlier = seen.select(
            "series_id", (pl.col("ts") + lag).alias("ts"), pl.col("sign").alias(f"_s{lag}")
        ).unique(["series_id", "ts"])
        new = new.join(earlier, on=["series_id", "ts"], how="left")
        echo = echo | (pl.col(f"_s{lag}") == -pl.col("deviation").sign()).fill_null(False)
    new = new.with_columns(pl.when(echo).then(0.0).otherwise(pl.col("score")).alias("score")).drop(
        [f"_s{lag}" for lag in ECHO]
    )
    # An aftermath: a forecast made from a state that absorbed an incident of its series
    # (the stored ones and those the new points form) is off because of it; once that
    # incident has closed, misses that score no more than it did score 0
    # (forecaster.anomaly.aftermath).
    raw_incidents = anomaly.merge_incidents(
        anomaly.point_intervals(
            new.filter(pl.col("score") > 1).select("series_id", "ts", "score", "freq_s")
        ),
        gap,
    )
    sources = pl.concat(
        [window.select(*anomaly.INCIDENT_COLUMNS), raw_incidents], how="vertical_relaxed"
    )
    shadow = anomaly.aftermath(new, sources, gap, horizon)
    new = new.with_columns(
        pl.when(pl.col("score") <= shadow).then(0.0).otherwise(pl.col("score")).alias("score")
    )
    hits = new.filter(pl.col("score") > 1)
    rows = hits.select(
        "series_id",
        "ts",
        pl.lit(model).alias("model"),
        *("actual", "yhat", "yhat_lower", "yhat_upper", "origin_ts", "score", "threshold"),
    ).to_dicts()
    # The incidents the new points may extend or join: those of their series ending within
    # reach of the series' first new anomalous point.
    reach = pl.duration(seconds=pl.col("freq_s") * (gap + 1))
    firsts = hits.group_by("series_id").agg(
        pl.col("ts").min().alias("_first"), pl.col("freq_s").first()
    )
    touching = (
        window.join(firsts, on="series_id")
        .filter(pl.col("end_ts") >= pl.col("_first") - reach)
        .drop("_first")
    )
    merged = anomaly.merge_incidents(
        pl.concat(
            [
                anomaly.point_intervals(hits.select("series_id", "ts", "score", "freq_s")),
                touching.select(*anomaly.INCIDENT_COLUMNS, "freq_s"),
            ],
            how="vertical_relaxed",
        ),
        gap,
    )
    kept = window.join(
        touching.select("series_id", "start_ts"), on=["series_id", "start_ts"], how="anti"
    )
    incidents = pl.concat([kept.select(*anomaly.INCIDENT_COLUMNS), merged], how="vertical_relaxed")
    # Each series' newest point: its score, whether an incident is still open there, and
    # what the next run continues.
    last = (
        new.group_by("series_id")
        .agg(
            pl.col("ts").max().alias("ts"),
            pl.col("score").sort_by("ts").last(),
            pl.col("freq_s").first(),
            pl.col("_typical").first().alias("typical"),
        )
        .join(recent, on="series_id", how="left")
        .join(lag_sums, on="series_id", how="left")
        .join(
            incidents.group_by("series_id").agg(pl.col("end_ts").max()), on="series_id", how="left"
        )
        .with_columns(
            (
                pl.col("end_ts").is_not_null()
                & (pl.col("ts") - pl.col("end_ts") <= pl.duration(seconds=pl.col("freq_s") * gap))
            ).alias("incident_open")
        )
    )
    # What the next run's thresholds read: each series' tail (the window's points above the
    # lowest threshold allowed, fleet events and clear incidents included: those are left
    # out when read, as they stand then) and its judged points by whole days.
    carry = _carry(tails, days_before, new.select("series_id", "ts", "evidence"), weeks_start)
    state_rows = last.join(carry, on="series_id", how="left").select(
        "series_id",
        "ts",
        "score",
        "incident_open",
        "typical",
        pl.col("_recent").alias("recent"),
        "lag_sum",
        "square_sum",
        "tail",
        "day_counts",
        "window_day",
    )
    # Fleet events, rewritten from a little before the new points (EVENT_REACH, or the
    # merge span, back), and from the start of any event still running then: a share of
    # the fleet in incidents, or far more series than usual beyond the same edge of their
    # bands at once (the usual share read from the times judged before, fleet events left
    # out).
    reach_back = max(
        EVENT_REACH, cfg.fleet_merge, timedelta(seconds=int(freqs["freq_s"].max())) * 6
    )
    after = first_new - reach_back
    running = [e["start_ts"] for e in known if e["end_ts"] >= after]
    after = min([after, *running]) - timedelta(seconds=1)
    times_new = anomaly.edge_counts(new)
    times_stored = store.fleet_times(model, window_start)
    usual = times_stored.filter(pl.col("ts") < first_new)
    for event in known:
        usual = usual.filter(~pl.col("ts").is_between(event["start_ts"], event["end_ts"]))
    counts = (
        pl.concat(
            [times_stored.filter(pl.col("ts") > after), times_new.select(times_stored.columns)],
            how="vertical_relaxed",
        )
        .group_by("ts")
        .agg(pl.col("n_series", "n_low", "n_high").sum())
    )
    near = incidents.filter(pl.col("end_ts") > after)

    def events_with(edge_points: pl.DataFrame | None) -> pl.DataFrame:
        return anomaly.fleet_events(
            counts,
            near,
            cfg.fleet_share,
            cfg.fleet_min_series,
            cfg.fleet_merge,
            edges=anomaly.edge_shares(usual),
            threshold=cfg.fleet_evidence,
            edge_points=edge_points,
            judge_from=first_new,
            known=[(e["start_ts"], e["end_ts"]) for e in known if e["start_ts"] > after],
        )

    # The points beyond an edge only count an event's series (which times are events does
    # not depend on them): they are read where there is an event, which is seldom.
    events = events_with(None)
    if not events.is_empty():
        edge_points = pl.concat(
            [
                store.anomaly_points(model, after, beyond=1.0),
                new.filter(pl.col("deviation").abs() > 1).select(
                    "series_id", "ts", "deviation", "evidence"
                ),
            ],
            how="vertical_relaxed",
        ).select("series_id", "ts", "deviation")
        events = events_with(edge_points)
    events = anomaly.new_events(events, after, [(e["start_ts"], e["end_ts"]) for e in known])
    links = anomaly.link_events(near.select("series_id", "start_ts", "end_ts"), events)
    in_window = incidents.filter(pl.col("start_ts") >= window_start).height
    all_weeks = float(weeks["_weeks"].sum()) + anomaly.series_weeks(new)
    keep = new.filter(
        (pl.col("deviation").abs() > 1) | (pl.col("evidence") >= anomaly.MIN_THRESHOLD)
    ).select("series_id", "ts", "deviation", "evidence")
    return _Judged(
        threshold=threshold,
        anomalies=rows,
        old_incidents=touching.select("series_id", "start_ts"),
        incidents=merged,
        state=state_rows,
        after=after,
        events=events,
        links=links.select("series_id", "start_ts", "event_start"),
        new_incidents=merged.join(
            touching.select("series_id", "start_ts"), on=["series_id", "start_ts"], how="anti"
        ).height,
        rate_seen=in_window / all_weeks if all_weeks > 0 else None,
        rate_target=cfg.incidents_per_week,
        points=keep,
        times=times_new.select("ts", "n_series", "n_low", "n_high"),
        window_start=window_start,
        uncarried=uncarried.join(
            new.select("series_id").unique(), on="series_id", how="anti"
        ).height,
    )
