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

from dataclasses import dataclass
from datetime import timedelta

import polars as pl
import structlog

from forecaster import anomaly, calibration
from forecaster.config import AnomalySettings
from forecaster.features import FeatureSpec
from forecaster.store import Store
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
    summary = EvaluateSummary(model=model)
    ends = store.series_ends()
    if ends.is_empty():
        return summary
    scored = _recent_scored(store, model, ends, window)
    summary.scored = scored.height
    if scored.is_empty():
        return summary
    inside = (pl.col("actual") >= pl.col("yhat_lower")) & (pl.col("actual") <= pl.col("yhat_upper"))
    inside_raw = (pl.col("actual") >= pl.col("raw_lower")) & (
        pl.col("actual") <= pl.col("raw_upper")
    )
    summary.coverage = float(scored.select(inside.mean()).item())
    summary.coverage_raw = float(scored.select(inside_raw.mean()).item())

    width = pl.max_horizontal(pl.col("raw_upper") - pl.col("raw_lower"), pl.lit(1e-9))
    scores = scored.with_columns(
        pl.min_horizontal(
            pl.max_horizontal(
                pl.col("raw_lower") - pl.col("actual"), pl.col("actual") - pl.col("raw_upper")
            )
            / width,
            pl.lit(calibration.BAND_SCORE_CAP),
        ).alias("score")
    )
    # One offset for every step, carried between runs: the actuals scored since the last
    # run (per series, targets after the newest one counted) move it by their excess miss
    # rate per horizon of time. A horizon brings as many scored rows as the window holds
    # per horizon (distinct series and target times over series times horizon steps).
    horizon = max([int(scored["horizon_step"].max()), *prior])
    level = float(scored["interval_level"].max())
    horizons = scored.select("series_id", "target_ts").unique().height / (
        scored["series_id"].n_unique() * horizon
    )
    tracked = store.calibration_tracking(model)
    new = scored.join(tracked, on="series_id", how="left").filter(
        pl.col("tracked_until").is_null() | (pl.col("target_ts") > pl.col("tracked_until"))
    )
    offset = calibration.tracked_offset(
        store.calibration_offset(model),
        new.height,
        int(new.select(inside.sum()).item()),
        scored.height / horizons,
        level,
    )
    tracked_until = new.group_by("series_id").agg(pl.col("target_ts").max().alias("tracked_until"))
    new_challenger, recent_challenger = _challenger_scored(store, ends, window, accuracy_window)
    challenger = _challenger_offset(store, new_challenger, scored.height / horizons, level)
    by_step = {int(step): group for (step,), group in scores.group_by("horizon_step")}
    rows = []
    for step in sorted(set(by_step) | set(prior)):  # every step the offset applies to
        group = by_step.get(step)
        recent = [] if group is None else group["score"].to_list()
        base = calibration.blend(recent, level, prior.get(step), prior_weight)
        rows.append(
            {
                "horizon_step": step,
                "correction": calibration.shifted([base], offset)[0],
                "n_scored": len(recent),
                "coverage_raw": (
                    None if group is None else float(group.select(inside_raw.mean()).item())
                ),
            }
        )
    summary.steps_calibrated, summary.offset = len(rows), offset

    # Anomalies: the newly scored actuals, judged against the newest forecast for each
    # (series, time), as served; incidents and fleet events follow (forecaster.anomaly).
    newest = scored.sort("origin_ts").group_by("series_id", "target_ts").last()
    judged = _judge(store, model, newest, tracked, anomalies, holdout, horizon)
    accuracy = _series_accuracy(
        store, model, scored, ends, accuracy_window, spec, {CHALLENGER: recent_challenger}
    )
    summary.accuracy_window = accuracy_window
    summary.mase = _pooled_mase(accuracy, model)
    with store.begin() as conn:
        store.save_calibration(conn, model, sorted(rows, key=lambda r: r["horizon_step"]))
        store.save_calibration_offset(conn, model, offset, new.height, tracked_until)
        if challenger is not None:
            store.save_calibration_offset(conn, CHALLENGER, *challenger)
        summary.new_anomalies = store.insert_anomalies(conn, judged.anomalies)
        judged.save(store, conn, model)
        store.save_series_accuracy(
            conn, [{k: v for k, v in r.items() if k != "_scale"} for r in accuracy]
        )
    summary.threshold = judged.threshold.value
    summary.incidents_open = sum(r["incident_open"] for r in judged.state)
    summary.new_incidents = judged.new_incidents
    summary.fleet_events = judged.events.height
    log.info("evaluate done", **summary.__dict__)
    return summary


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


def _recent_scored(store: Store, model: str, ends: pl.DataFrame, window: timedelta) -> pl.DataFrame:
    """The scored forecasts of `model` whose targets lie in the last `window` before each
    series' own newest point (series may end years apart: a window counted from the newest
    of all would leave the others out)."""
    starts = ends.select("series_id", (pl.col("end") - window).alias("after"))
    return _scored_after(store, model, starts, window)


def _scored_after(
    store: Store, model: str, starts: pl.DataFrame, window: timedelta
) -> pl.DataFrame:
    """The scored forecasts of `model` with targets after each series' `after` (starts:
    series_id, after). Series whose starts lie within a window of each other are read in one
    query; there is one query per such group."""
    starts = starts.sort("after")
    group = (starts["after"].diff().fill_null(timedelta(0)) > window).cum_sum()
    parts = []
    for (_,), members in starts.with_columns(group=group).group_by("group", maintain_order=True):
        ids = None if members.height == starts.height else members["series_id"].to_list()
        parts.append(store.scored_forecasts(model, members["after"].min(), ids))
    return _after(pl.concat(parts), starts)


def _challenger_scored(
    store: Store, ends: pl.DataFrame, window: timedelta, accuracy_window: timedelta
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The statistical challenger's scored forecasts, read once: those whose targets are new
    since its offset last counted (after each series' tracked_until, or the calibration
    window's start), and those in the accuracy window (its per-series accuracy, beside the
    champion's). Both are at most a week or so of targets, not the calibration window."""
    tracked = store.calibration_tracking(CHALLENGER)
    since = ends.join(tracked, on="series_id", how="left").select(
        "series_id",
        "end",
        pl.max_horizontal(
            pl.col("tracked_until").fill_null(pl.col("end") - window), pl.col("end") - window
        ).alias("after"),
    )
    starts = since.select(
        "series_id", pl.min_horizontal("after", pl.col("end") - accuracy_window).alias("after")
    )
    read = _scored_after(store, CHALLENGER, starts, window)
    return _after(read, since), _in_window(read, ends, accuracy_window)


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
    inside = (pl.col("actual") >= pl.col("yhat_lower")) & (pl.col("actual") <= pl.col("yhat_upper"))
    offset = calibration.tracked_offset(
        store.calibration_offset(CHALLENGER),
        new.height,
        int(new.select(inside.sum()).item()),
        per_horizon,
        level,
    )
    until = new.group_by("series_id").agg(pl.col("target_ts").max().alias("tracked_until"))
    return offset, new.height, until


def _in_window(frame: pl.DataFrame, ends: pl.DataFrame, window: timedelta) -> pl.DataFrame:
    """The rows whose target lies in the last `window` before their series' end."""
    return _after(frame, ends.select("series_id", (pl.col("end") - window).alias("after")))


def _after(frame: pl.DataFrame, starts: pl.DataFrame) -> pl.DataFrame:
    """The rows whose target lies after their series' `after` (starts: series_id, after)."""
    return (
        frame.join(starts.select("series_id", "after"), on="series_id")
        .filter(pl.col("target_ts") > pl.col("after"))
        .drop("after")
    )


def _series_accuracy(
    store: Store,
    model: str,
    scored: pl.DataFrame,
    ends: pl.DataFrame,
    window: timedelta,
    spec: FeatureSpec | None = None,
    others: dict[str, pl.DataFrame] | None = None,
) -> list[dict]:
    """Per series, for the champion, the baselines and `others` (model -> its scored
    forecasts in the window: the statistical challenger) over the last `window` of targets
    before the series' newest point: n, MAE, MASE and band coverage (of the models with a
    band: the champion and `others`). MASE is the MAE over
    the daily seasonal naive's MAE on the same forecasts (series, origin, step): with a
    horizon of at most a day that naive's MAE is the textbook in-sample scale, and pairing
    the rows keeps a model that has served only part of the window (a new champion) from
    being scaled by the rest. `_scale` (the naive's MAE on those rows) is for pooling and is
    not stored.

    The baselines' forecasts are not read back: a seasonal naive's forecast of a target is
    the actual one (or k) seasons before it, which `scored` (the champion's scored
    forecasts over the calibration window, at least three weeks longer than `window`)
    already holds, so they are rebuilt from it on the champion's own (series, origin, step)
    keys with the champion's seasons (`spec`). Reading the baselines' stored rows was two
    thirds of an evaluate run at 10,000 series (docs/reliability.md); without a spec (a
    checkpoint that cannot be read) they are read as before."""
    frames = {model: _in_window(scored, ends, window)}
    if spec is not None:
        frames.update(_naives_from(store, scored, frames[model], spec))
    else:
        for name in BASELINE_MODELS:
            frames[name] = _recent_scored(store, name, ends, window)
    frames.update(others or {})
    naive = frames["seasonal_naive_daily"]
    if naive.is_empty():
        return []
    key = ["series_id", "origin_ts", "horizon_step"]
    naive_err = naive.select(*key, (pl.col("yhat") - pl.col("actual")).abs().alias("naive_err"))
    inside = (pl.col("actual") >= pl.col("yhat_lower")) & (pl.col("actual") <= pl.col("yhat_upper"))
    end_of = dict(zip(ends["series_id"], ends["end"], strict=True))
    rows = []
    for name, f in frames.items():
        paired = f.join(naive_err, on=key, how="inner")
        if paired.is_empty():
            continue
        stats = paired.group_by("series_id").agg(
            pl.len().alias("n_scored"),
            (pl.col("yhat") - pl.col("actual")).abs().mean().alias("mae"),
            pl.col("naive_err").mean().alias("scale"),
            inside.cast(pl.Float64).mean().alias("coverage"),
        )
        for r in stats.iter_rows(named=True):
            end = end_of[r["series_id"]]
            rows.append(
                {
                    "series_id": r["series_id"],
                    "model": name,
                    "n_scored": r["n_scored"],
                    "mae": r["mae"],
                    "mase": r["mae"] / r["scale"] if r["scale"] else None,
                    "coverage": None if name in BASELINE_MODELS else r["coverage"],
                    "window_start": end - window,
                    "window_end": end,
                    "_scale": r["scale"],
                }
            )
    return rows


def _naives_from(
    store: Store, scored: pl.DataFrame, mine: pl.DataFrame, spec: FeatureSpec
) -> dict[str, pl.DataFrame]:
    """Each seasonal naive's forecasts on the keys of `mine` (series_id, origin_ts,
    horizon_step, target_ts, actual), with yhat the value stored one season before the
    target (k seasons for steps past one season), as predict forecasts it
    (forecaster.features.seasonal_naive). Those values are the actuals `scored` holds;
    the few it does not (a champion younger than a season, a filled point) are read from
    `observations`. Keys with nothing stored a season back are left out, as predict leaves
    out a baseline row with nothing to copy."""
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
        spans = missing.group_by("series_id").agg(
            pl.col("_back").min().alias("a"), pl.col("_back").max().alias("b")
        )
        ranges = sorted(set(zip(spans["a"], spans["b"], strict=True)))
        read = store.recent_values(spans["series_id"].to_list(), ranges).select(
            "series_id", pl.col("ts").alias("_back"), pl.col("value").alias("yhat")
        )
        values = pl.concat(
            [values, read.join(missing, on=["series_id", "_back"], how="semi")],
            how="vertical_relaxed",
        )
    values = values.filter(pl.col("yhat").is_not_null() & pl.col("yhat").is_not_nan())
    return {
        f"seasonal_naive_{season}": frame.join(values, on=["series_id", "_back"], how="inner")
        .drop("_back")
        .with_columns(
            pl.lit(None, pl.Float64).alias("yhat_lower"),
            pl.lit(None, pl.Float64).alias("yhat_upper"),
        )
        for season, frame in backs.items()
    }


def _pooled_mase(rows: list[dict], model: str) -> float | None:
    """The model's MAE over the daily naive's on the same forecasts, pooled over series."""
    mine = [r for r in rows if r["model"] == model]
    naive = sum(r["_scale"] * r["n_scored"] for r in mine)
    return sum(r["mae"] * r["n_scored"] for r in mine) / naive if naive > 0 else None


@dataclass
class _Judged:
    """What one evaluate run writes about anomalies."""

    threshold: anomaly.Threshold
    anomalies: list[dict]
    old_incidents: pl.DataFrame  # (series_id, start_ts) replaced by `incidents`
    incidents: pl.DataFrame
    state: list[dict]
    after: object  # events after this time are rewritten
    events: pl.DataFrame
    links: pl.DataFrame
    new_incidents: int
    rate_seen: float | None
    rate_target: float
    new_points: int

    def save(self, store: Store, conn, model: str) -> None:  # noqa: ANN001
        store.replace_incidents(conn, model, self.old_incidents, self.incidents)
        store.save_anomaly_state(conn, model, self.state)
        if self.new_points == 0:
            return  # nothing judged: events and threshold stay as the last judgement left them
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


def _judge(
    store: Store,
    model: str,
    newest: pl.DataFrame,
    tracked: pl.DataFrame,
    cfg: AnomalySettings | None,
    holdout: dict | None,
    horizon: int,
) -> _Judged:
    """Score the window's newest forecasts, judge the actuals not judged before, and fold the
    anomalous ones into incidents and fleet events."""
    cfg = cfg or AnomalySettings()
    gap = cfg.gap
    points = (
        newest.rename({"target_ts": "ts"})
        .join(store.series_freqs(), on="series_id")
        .sort("series_id", "ts")
    )
    points = points.with_columns(anomaly.deviation(points))
    points = points.with_columns(anomaly.evidence(points)).join(tracked, on="series_id", how="left")
    is_new = pl.col("tracked_until").is_null() | (pl.col("ts") > pl.col("tracked_until"))
    after = points["ts"].min()
    # Thresholds are read from the points judged before, out of sample as the bands'
    # calibration is, and without the times of fleet events: a storm over the whole fleet
    # is no sample of normal data, and would lift the threshold over the next one.
    past = points.filter(~is_new)
    known = store.fleet_events_since(model, after)
    for event in known:
        past = past.filter(~pl.col("ts").is_between(event["start_ts"], event["end_ts"]))
    # Nor with the incidents that were clear anomalies (peak score CLEAR or more): disruptions
    # more frequent than the rate chosen would otherwise lift the threshold over themselves.
    # Marginal incidents stay in, so the threshold cannot talk itself down.
    window = store.incidents_since(model, after)
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
    stored = store.anomaly_threshold(model)
    judged_ids = set(points.filter(is_new)["series_id"].unique().to_list())
    nothing_new = not judged_ids
    if nothing_new and stored is not None:  # a re-run: what was judged stays judged
        threshold = anomaly.Threshold(
            float(stored["threshold"]), float(stored["series_weeks"]), 0, stored["measured"]
        )
    else:
        threshold = anomaly.choose_threshold(past, cfg.incidents_per_week, gap)
    # What the model measured on its training holdout, at the same rate and gap: serves
    # each series until it has enough scored points of its own.
    holdout = holdout or {}
    same = holdout.get("rate") == cfg.incidents_per_week and holdout.get("gap") == gap
    from_holdout = holdout.get("series", {}) if same else {}
    served = threshold.measured  # the fleet's level read from what is served
    if not threshold.measured and not (nothing_new and stored is not None):
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
    # model its holdout's; the rest, the fleet's. (Only where there is something new to
    # judge: the others keep theirs.)
    own: dict[int, float] = {}
    if not nothing_new:
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
            anomaly.choose_thresholds(mine, cfg.incidents_per_week, gap, shrink_to=threshold.value)
        )
    points = points.with_columns(
        pl.col("series_id")
        .replace_strict(own, default=threshold.value, return_dtype=pl.Float64)
        .alias("threshold")
    ).with_columns((pl.col("evidence") / pl.col("threshold")).alias("score"))
    new = points.filter(is_new)
    # An echo: the models read the values a day and a week back, so an anomalous actual
    # then makes the forecast for now wrong the other way. Such an actual is no evidence
    # of trouble now: its score is 0.
    earlier_hits = store.anomalies_since(model, after - ECHO[-1])
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
    # Each series' newest point: its score, and whether an incident is still open there.
    last = (
        new.group_by("series_id")
        .agg(
            pl.col("ts").max().alias("ts"),
            pl.col("score").sort_by("ts").last(),
            pl.col("freq_s").first(),
        )
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
    state = last.select("series_id", "ts", "score", "incident_open").to_dicts()
    # Fleet events: a share of the fleet in incidents, or far more series than usual beyond
    # the same edge of their bands at once (the usual share read from the points judged
    # before, fleet events left out).
    events = anomaly.fleet_events(
        anomaly.edge_counts(points),
        incidents,
        cfg.fleet_share,
        cfg.fleet_min_series,
        cfg.fleet_merge,
        edges=anomaly.edge_shares(anomaly.edge_counts(past)),
        threshold=cfg.fleet_evidence,
        edge_points=points.filter(pl.col("deviation").abs() > 1).select(
            "series_id", "ts", "deviation"
        ),
        judge_from=new["ts"].min() if new.height else None,
        known=[(e["start_ts"], e["end_ts"]) for e in known if e["start_ts"] > after],
    )
    events = anomaly.new_events(events, after, [(e["start_ts"], e["end_ts"]) for e in known])
    links = anomaly.link_events(incidents.select("series_id", "start_ts", "end_ts"), events)
    in_window = incidents.filter(pl.col("start_ts") >= after).height
    return _Judged(
        threshold=threshold,
        anomalies=rows,
        old_incidents=touching.select("series_id", "start_ts"),
        incidents=merged,
        state=state,
        after=after,
        events=events,
        links=links.select("series_id", "start_ts", "event_start"),
        new_incidents=merged.join(
            touching.select("series_id", "start_ts"), on=["series_id", "start_ts"], how="anti"
        ).height,
        rate_seen=in_window / weeks if (weeks := anomaly.series_weeks(points)) > 0 else None,
        rate_target=cfg.incidents_per_week,
        new_points=new.height,
    )
