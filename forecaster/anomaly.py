"""Anomaly scores, the threshold that meets a chosen false-alarm rate, incidents and fleet-wide
events: the arithmetic of the evaluate job's anomaly detection, on frames, shared with
bench/anomalies.py.

Deviation. An actual's signed distance from the median served for it, in half-widths of the
band on its side: 0 at the median, +1 at the upper edge, -1 at the lower one (the calibrated
80% band covers |d| <= 1 four times in five). The half-width is floored at WIDTH_FLOOR times
the series' median half-width over the frame, so a band of zero width (a series at zero at
night) does not turn a miss of one unit into an outage; and capped at WIDTH_CAP times it, so
a band wider than usual (a busy hour the model is unsure of) does not hide a jump that
would be plain at any other hour: a band narrower than usual makes a point more surprising,
a wider one no less. (On bench/anomalies.py's nycflights replay the cap took the recall of
spikes of 5 median widths from 80% to 100% and of 3 from 58% to 83%, with fewer false
incidents on the clean run: 0.33 per series-week against 0.36; caps of 0.7, 1.5 and 2.5
measured worse.) The floor is half the median half-width: at a quarter, the narrow bands of
quiet hours turned ordinary misses into the clean data's largest deviations, which set the
threshold above what a disruption of 3 band widths reaches. On bench/anomalies.py's four
default datasets pooled (nycflights, bikeshare, temps, taylor; one run each, same model and
seeds), a floor of 0.5 against 0.25: spikes of 3 widths found within two steps 72% against
66%, precision 84% against 75%; spikes of 5 97% / 87% against 96% / 78%; shifts of 3 78% /
93% against 73% / 88%; dropouts 43% / 69% against 27% / 61%; clean-run false incidents
per series-week taylor 1.12 against 2.24, bikeshare 0.70 against 0.56, nycflights and temps
within 0.03; fewer anomalous points (bikeshare 0.75% against 1.33%, temps 2.8% against
4.4%). Disruptions of
one band width, within a model's ordinary misses, are found less often (spikes 6% against
26% within two steps, at 28% and 48% precision).

Evidence. The largest of |d| and |mean of the last k deviations| * sqrt(k) for k in RUNS
(consecutive points of the series; in a run each deviation counts at most RUN_CLIP), a run
counting only while the actual itself is outside the band on the run's side: one actual
far out, or several moderately out on the same side (a storm that halves traffic for hours
lies barely outside wide bands hour by hour, and is plain over six of them), without a
spike lingering in the runs after it. For errors that
are independent and normal each mean term is about |N(0, 0.78)|, whatever k. RUN_CLIP is 6:
at 3, a level shift of 3 band widths (6 half-widths) counted as 3 in its runs, so a series
whose own threshold was above 6 found it only after several steps (nycflights replay,
shifts of 3 widths found within two steps: 81% at 3, 91% at 4, 97% at 6 and at 9, with
precision 93%, 95%, 96%, 95%; the clean run's false incidents 0.33, 0.35, 0.39 and 0.37
per series-week).

Correlated misses. Dividing a run's sum by sqrt(k) assumes a series' deviations are
independent. Where a model's misses last (temperatures, bike counts, electricity demand:
deviations correlated 0.76-0.96 from one step to the next on bench/anomalies.py's public
datasets, against -0.1 on the flight counts) its ordinary runs reach 8-10 half-widths, they
set the threshold, and a single point far out (a spike of 3 band widths is about 6) stays
under it. So each series' runs are divided by the standard deviation of their sum under the
series' own lag-one correlation rho (run_scale: sqrt(n + 2 sum_(j<n) (n - j) rho ** j),
sqrt(k) at rho 0), measured as described at RHO_CLIP. The four default datasets pooled
(one run each, same models and seeds): spikes of 3 widths found within two steps 84%
against 76% before, shifts of 3 87% against 80%, shifts of 5 84% against 82%; precision
within a few points (spikes of 3 78% against 79%, shifts of 3 91% against 92%), lower on
spikes of 5 (75% against 83%: the one- and two-series sets, whose thresholds fell most).

Score. The evidence over the threshold in force for the series when the point was scored:
above 1 is anomalous, 2 is twice the threshold, one scale for every series and model, so
one alert rule (`score > 1`) serves them all.

Threshold. Set by the rate of incidents a user accepts on normal data, not by a band level.
Over the recent window, count for every candidate threshold the incidents its points would
have formed (as below: a point starts one when no point of its series in the `gap` + 1
steps before it was above the threshold). The least threshold meeting `rate` incidents per
series per week would do on clean data, but a window also holds whatever real trouble it
had, and there one real incident is a large share of the budget. So the tail is read where
it is dense, at the thresholds u and u2 meeting TAIL_REACH and twice TAIL_REACH times the
rate, and extrapolated to the rate as the mean of an exponential tail (u + (u - u2) / ln 2 *
ln TAIL_REACH) and a power-law one (u * (u / u2) ** (ln TAIL_REACH / ln 2)); when too few
points lie out to read a tail, the least threshold meeting the rate serves. Never below
MIN_THRESHOLD; until a window holds MIN_SERIES_WEEKS of points, DEFAULT_THRESHOLD. The
evaluate job sets one per series from its own points (series differ: an hourly count of
one or two flights jumps far out of a narrow band on normal days, a busy airport does not),
the fleet's pooled one serving series with too little history.

Incidents. The anomalous points of one series with at most `gap` normal steps between two
of them are one incident (start, end, peak score, points). An incident is open while its
last anomalous point is within `gap` steps of the series' newest scored point.

Fleet events. At a time where at least `share` of the series scored at that time, and at
least `min_series` of them, are inside an incident, the fleet has an event; so it has where
many more series than usual lie beyond the same edge of their bands together, even if each
alone is no incident (the February 2013 blizzard put 8 to 16 of 23 series below their
bands hour after hour; about 2 lie there at a normal hour): per time, that share in
standard deviations over the window's usual one, per side (the deviation measured: the
series of a fleet err together), as evidence over runs of times like a series', reaching
FLEET_THRESHOLD. Consecutive such times are one event, as are events less than `merge`
apart (a storm paused by a night when the series are quiet anyway), and the incidents
overlapping it are linked to it. Counting series in an incident at a time, rather than
incidents starting together, keeps an event whole when its series break one after another
over hours (a storm that reaches one airport after another), and keeps chance from chaining
the incidents of a large fleet into one event.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import polars as pl

DEFAULT_RATE = 0.5  # incidents per series per week ([anomalies].incidents_per_week)
DEFAULT_GAP = 2  # [anomalies].gap
WIDTH_FLOOR = 0.5
WIDTH_CAP = 1.0
RUNS = (1, 3, 6)
MIN_THRESHOLD = 2.0
DEFAULT_THRESHOLD = 4.0
MIN_SERIES_WEEKS = 2.0
TAIL_REACH = 4.0
EVIDENCE_CAP = 1000.0
FLEET_THRESHOLD = 6.0
RUN_CLIP = 6.0  # each deviation's share in a run's sum is at most this (half-widths)
CLEAR = 2.0  # an incident peaking at twice the threshold is no sample of normal data
MIN_EDGE_TIMES = 48  # past times before the usual share beyond an edge is trusted
WEEK_S = 7 * 86400

INCIDENT_COLUMNS = ("series_id", "start_ts", "end_ts", "peak_ts", "peak_score", "n_points")


@dataclass(frozen=True)
class Threshold:
    """The threshold chosen over a window and what it measured."""

    value: float  # evidence that scores 1
    series_weeks: float  # scored points of the window, in series-weeks
    incidents: int  # incidents the window would have had at that threshold
    measured: bool  # False: too little data, the default served

    @property
    def rate(self) -> float | None:
        """Incidents per series per week over the window at that threshold."""
        return self.incidents / self.series_weeks if self.series_weeks > 0 else None


def deviation(
    frame: pl.DataFrame,
    *,
    series: str = "series_id",
    actual: str = "actual",
    median: str = "yhat",
    lower: str = "yhat_lower",
    upper: str = "yhat_upper",
    typical: str | None = None,
) -> pl.Series:
    """Per row, the actual's signed distance from the median in half-widths of the band on
    its side, floored and capped by the series' median half-width (WIDTH_FLOOR, WIDTH_CAP):
    over the frame, or the column `typical` where the caller keeps it (the evaluate job
    carries it from run to run, typical_half_width)."""
    above = pl.col(actual) >= pl.col(median)
    half = (
        pl.when(above)
        .then(pl.col(upper) - pl.col(median))
        .otherwise(pl.col(median) - pl.col(lower))
    )
    if typical is None:
        typical_half = (pl.col(upper) - pl.col(lower)).median().over(series) / 2
    else:
        typical_half = pl.col(typical)
    half = pl.min_horizontal(half, WIDTH_CAP * typical_half)
    d = (pl.col(actual) - pl.col(median)) / pl.max_horizontal(
        half, WIDTH_FLOOR * typical_half, pl.lit(1e-9)
    )
    return frame.select(d.clip(-EVIDENCE_CAP, EVIDENCE_CAP).alias("deviation"))["deviation"]


def evidence(
    frame: pl.DataFrame,
    *,
    series: str = "series_id",
    d: str = "deviation",
    clip: float | None = RUN_CLIP,
    rho: str | None = None,
) -> pl.Series:
    """Per row of `frame` (sorted by series and time), max over k in RUNS of
    |sum of the series' last k deviations| / sqrt(k) (= |mean| * sqrt(k); over the n < k
    points there are at a series' start, / sqrt(n)); in a run of k > 1 each deviation
    counts at most RUN_CLIP, and the run counts only where the actual itself is outside the
    band (|d| >= 1) on the run's side. With `rho` (a column: the series' lag-one
    correlation of its deviations, from with_correlation over a whole window or from the
    evaluate job's carried sums), a sum of n is divided by its standard deviation under
    that correlation (run_scale) instead of sqrt(n)."""
    # Points of the series so far, and the powers of rho the run scales read: columns
    # computed once, not once per term.
    extra = [pl.int_range(1, pl.len() + 1).over(series).alias("_seen")]
    if rho is not None:
        extra += [pl.col(rho).pow(j).alias(f"_rho{j}") for j in range(1, max(RUNS))]
    frame = frame.with_columns(extra)
    terms = [pl.col(d).abs()]
    clipped = pl.col(d) if clip is None else pl.col(d).clip(-clip, clip)  # one far-out point
    # does not make a run
    for k in RUNS[1:]:
        total = clipped.rolling_sum(k, min_samples=1).over(series)
        # A run counts only while it goes on: the actual itself outside the band on the
        # run's side (else a spike would linger in the runs after it).
        going_on = (pl.col(d).abs() >= 1) & (pl.col(d).sign() == total.sign())
        n = pl.min_horizontal(pl.col("_seen"), pl.lit(k))
        if rho is None:
            scale = n.sqrt()
        else:
            scale = run_scale(n, [pl.col(f"_rho{j}") for j in range(1, k)])
        terms.append(pl.when(going_on).then(total.abs() / scale).otherwise(0.0))
    return frame.select(pl.max_horizontal(*terms).alias("evidence"))["evidence"]


def run_scale(n: pl.Expr, powers: list[pl.Expr]) -> pl.Expr:
    """The standard deviation, in units of one deviation's, of a sum of n consecutive
    deviations whose lag-j correlation is rho ** j (powers: rho, rho ** 2, ... up to at
    least rho ** (n - 1)): sqrt(n + 2 sum_(j<n) (n - j) rho ** j) (sqrt(n) at rho 0, n at
    rho 1)."""
    n = n.cast(pl.Float64)
    var = n
    for j, power in enumerate(powers, start=1):
        var = var + 2 * pl.max_horizontal(n - j, pl.lit(0.0)) * power
    return var.sqrt()


# The runs' scale follows each series' lag-one correlation of its deviations (evidence's
# rho): a model whose misses last (a level it has wrong for hours) adds up deviations that
# are not independent, and sqrt(k) made those runs the clean data's largest evidence, so the
# threshold rose above what a single far-out point reaches. The correlation is measured on
# deviations clipped at RHO_CLIP half-widths (a disruption of a few far-out points does not
# make a series look persistent), is at most RHO_MAX and at least 0 (errors that alternate
# are scaled as independent ones), and the evaluate job forgets old points with a half-life
# of RHO_HALF_LIFE points; a series' own sums weigh against the fleet's correlation as
# RHO_PRIOR points of it.
RHO_CLIP = 2.0
RHO_MAX = 0.95
RHO_HALF_LIFE = 336
RHO_PRIOR = 48.0


def lag_terms(
    frame: pl.DataFrame, *, series: str = "series_id", d: str = "deviation"
) -> pl.DataFrame:
    """Per row of `frame` (sorted by series and time) whose series has a point before it:
    the products of its clipped deviation with the one before (_lag) and the square of the
    one before (_square), null on a series' first row."""
    c = pl.col(d).clip(-RHO_CLIP, RHO_CLIP)
    before = c.shift(1).over(series)
    return frame.select((c * before).alias("_lag"), before.pow(2).alias("_square"))


def correlation(lag: Any, square: Any, pooled: float) -> Any:
    """A series' lag-one correlation from its sums of lag products and squares (lag_terms;
    floats or arrays, 0 where it has none), leaning on the fleet's `pooled` with the weight
    of RHO_PRIOR points: within [0, RHO_MAX]."""
    return np.clip((lag + pooled * RHO_PRIOR) / (square + RHO_PRIOR), 0.0, RHO_MAX)


def pooled_correlation(lag: float, square: float) -> float:
    """The fleet's lag-one correlation from its summed lag products and squares (0 where it
    has none), within [0, RHO_MAX]."""
    return float(np.clip(lag / square, 0.0, RHO_MAX)) if square > 0 else 0.0


def with_correlation(
    frame: pl.DataFrame, *, series: str = "series_id", d: str = "deviation"
) -> pl.DataFrame:
    """`frame` (sorted by series and time, with deviations) with each series' lag-one
    correlation measured over the frame itself (`rho`): for a window read whole, such as a
    model's holdout or a bench replay."""
    terms = frame.select(series).hstack(lag_terms(frame, series=series, d=d))
    sums = terms.group_by(series).agg(
        pl.col("_lag").sum().fill_null(0.0), pl.col("_square").sum().fill_null(0.0)
    )
    pooled = pooled_correlation(float(sums["_lag"].sum()), float(sums["_square"].sum()))
    rho = correlation(sums["_lag"].to_numpy(), sums["_square"].to_numpy(), pooled)
    return frame.join(
        sums.select(series).with_columns(pl.Series("rho", rho, dtype=pl.Float64)),
        on=series,
        maintain_order="left",
    )


def prior_max(
    frame: pl.DataFrame,
    value: str,
    gap: int,
    *,
    series: str = "series_id",
    ts: str = "ts",
    freq: str = "freq_s",
) -> pl.Series:
    """Per row of `frame` (sorted by series and ts), the largest `value` of the same series
    in the gap + 1 steps before it (0 when none)."""
    v = frame[value].fill_null(0.0).to_numpy().astype(np.float64)
    s = frame[series].to_numpy()
    t = frame[ts].dt.epoch("us").to_numpy()
    reach = frame[freq].to_numpy().astype(np.int64) * (gap + 1) * 1_000_000
    m = np.zeros(frame.height)
    for k in range(1, min(gap + 2, frame.height)):
        near = (s[k:] == s[:-k]) & (t[k:] - t[:-k] <= reach[k:])
        m[k:] = np.maximum(m[k:], np.where(near, v[:-k], 0.0))
    return pl.Series("m", m)


# A series' own threshold is read from a few weeks of its own points: a noisy estimate of a
# far tail. It is shrunk towards the fleet's, in logs, with the weight of SHRINK_WEEKS
# series-weeks of the fleet's (2 weeks of its own: half its own).
SHRINK_WEEKS = 2.0


def shrunk(value: Any, weeks: Any, pooled: float) -> Any:
    """A series' threshold `value`, read from `weeks` of its points, moved towards the
    fleet's `pooled`: the geometric mean weighted by its weeks against SHRINK_WEEKS (floats
    or arrays); never below MIN_THRESHOLD."""
    w = weeks / (weeks + SHRINK_WEEKS)
    return np.maximum(np.exp(w * np.log(value) + (1 - w) * np.log(pooled)), MIN_THRESHOLD)


def series_weeks(frame: pl.DataFrame, *, freq: str = "freq_s") -> float:
    """The scored points of `frame` in series-weeks (a point is one step of its series)."""
    return float(frame[freq].cast(pl.Float64).sum()) / WEEK_S if frame.height else 0.0


def choose_threshold(
    frame: pl.DataFrame,
    rate: float,
    gap: int,
    *,
    series: str = "series_id",
    ts: str = "ts",
    freq: str = "freq_s",
    weeks: float | None = None,
) -> Threshold:
    """The threshold of evidence meeting `rate` incidents per series per week over `frame`
    (series, ts, evidence, freq_s: one row per scored point, the newest forecast of its
    time); see the module docstring. With `weeks` (the points' series-weeks, counted by
    the caller), `frame` need only hold the points with evidence of at least MIN_THRESHOLD:
    no lower point starts or continues an incident at any threshold allowed."""
    if weeks is None:
        weeks = series_weeks(frame, freq=freq)
    if weeks < MIN_SERIES_WEEKS:
        return Threshold(DEFAULT_THRESHOLD, weeks, 0, measured=False)
    frame = frame.sort(series, ts)
    e = frame["evidence"].to_numpy().astype(np.float64)
    m = prior_max(frame, "evidence", gap, series=series, ts=ts, freq=freq).to_numpy()
    # Candidates: the floor and every evidence above it (anomalous: evidence > threshold).
    cand = np.unique(np.r_[MIN_THRESHOLD, e[e >= MIN_THRESHOLD]])
    # A point starts an incident at threshold T when e > T >= m: count(e > T) - count(min > T).
    n = e.size
    starts = (n - np.searchsorted(np.sort(e), cand, "right")) - (
        n - np.searchsorted(np.sort(np.minimum(e, m)), cand, "right")
    )
    # The smallest candidate from which on every higher one also meets a budget (a higher
    # threshold can split an incident in two, so the count is not monotone). The largest
    # candidate leaves no point above it, so one always does.
    suffix_max = np.maximum.accumulate(starts[::-1])[::-1]

    def least(budget: float) -> int:
        return int(np.argmax(suffix_max <= budget))

    budget = rate * weeks
    exact = least(budget)
    # The tail read where it holds many incidents (TAIL_REACH and twice that many times the
    # budget), then extrapolated (_extrapolate): a few real incidents in the window (one is
    # a large share of a small fleet's budget) barely move it.
    u, u2 = cand[least(TAIL_REACH * budget)], cand[least(2 * TAIL_REACH * budget)]
    if u2 >= u or u2 <= MIN_THRESHOLD:  # too few points outside the band to read a tail
        return Threshold(float(cand[exact]), weeks, int(starts[exact]), measured=True)
    value = float(_extrapolate(u, u2))
    at = int(np.searchsorted(cand, value, "right")) - 1
    return Threshold(max(value, MIN_THRESHOLD), weeks, int(starts[max(at, 0)]), measured=True)


def choose_thresholds(
    frame: pl.DataFrame,
    rate: float,
    gap: int,
    *,
    series: str = "series_id",
    ts: str = "ts",
    freq: str = "freq_s",
    shrink_to: float | None = None,
    weeks: pl.DataFrame | None = None,
) -> dict[int, float]:
    """choose_threshold(...).value for each series of `frame` with MIN_SERIES_WEEKS of
    points, computed for all of them in one pass (10,000 series: one sort, not 10,000);
    with `shrink_to` (the fleet's threshold), each moved towards it by its weeks (shrunk).
    With `weeks` (series, _weeks: each series' points in series-weeks, counted by the
    caller), `frame` need only hold the points with evidence of at least MIN_THRESHOLD, as
    for choose_threshold; a series of `weeks` without any is read as a series whose points
    all lie below it."""
    if weeks is None:
        weeks = frame.group_by(series).agg(
            (pl.col(freq).cast(pl.Float64).sum() / WEEK_S).alias("_weeks")
        )
    else:
        # One point below the floor for each series: it counts no incident at any threshold
        # allowed, and gives a series with no point above the floor its row.
        below = weeks.join(frame.select(series, freq).unique(series), on=series, how="left")
        frame = pl.concat(
            [
                frame.select(series, ts, "evidence", freq),
                below.select(
                    series,
                    pl.lit(datetime(1970, 1, 1), frame.schema[ts]).alias(ts),
                    pl.lit(0.0).alias("evidence"),
                    pl.col(freq).fill_null(3600).cast(frame.schema[freq]),
                ),
            ],
            how="vertical_relaxed",
        )
    frame = frame.join(weeks.filter(pl.col("_weeks") >= MIN_SERIES_WEEKS), on=series)
    if frame.is_empty():
        return {}
    frame = frame.sort(series, ts).with_columns(
        pl.col(series).rank("dense").cast(pl.Int64).alias("_s") - 1
    )
    m = prior_max(frame, "evidence", gap, series=series, ts=ts, freq=freq)
    frame = frame.with_columns(pl.min_horizontal(pl.col("evidence"), m).alias("_min"))
    # Each series' values offset into a band of their own: one sort ranks them all.
    off = 4 * EVIDENCE_CAP + 16
    sid = frame["_s"].to_numpy()
    key_e = np.sort(frame["evidence"].to_numpy() + sid * off)
    key_m = np.sort(frame["_min"].to_numpy() + sid * off)
    ends = np.cumsum(np.bincount(sid))  # one past each series' last row in those sorts
    floor = frame.select("_s").unique().with_columns(pl.lit(MIN_THRESHOLD).alias("_c"))
    cand = (
        pl.concat(
            [
                frame.filter(pl.col("evidence") >= MIN_THRESHOLD).select(
                    "_s", pl.col("evidence").alias("_c")
                ),
                floor,
            ]
        )
        .unique()
        .sort("_s", "_c")
    )
    cs, cv = cand["_s"].to_numpy(), cand["_c"].to_numpy()
    key_c = cv + cs * off
    starts = (ends[cs] - np.searchsorted(key_e, key_c, "right")) - (
        ends[cs] - np.searchsorted(key_m, key_c, "right")
    )
    budget = frame.group_by("_s").agg(
        pl.col("_weeks").first().alias("_n_weeks"),
        pl.col("_weeks").first() * rate,
        pl.col(series).first(),
    )
    cand = (
        cand.with_columns(pl.Series("_starts", starts))
        .with_columns(pl.col("_starts").reverse().cum_max().reverse().over("_s").alias("_suffix"))
        .join(budget.rename({"_weeks": "_budget"}), on="_s")
    )

    def least(mult: float, name: str) -> pl.DataFrame:
        return (
            cand.filter(pl.col("_suffix") <= mult * pl.col("_budget"))
            .group_by("_s")
            .agg(pl.col("_c").first().alias(name))
        )

    out = (
        budget.join(least(1, "_exact"), on="_s")
        .join(least(TAIL_REACH, "_u"), on="_s")
        .join(least(2 * TAIL_REACH, "_u2"), on="_s")
    )
    exact, u, u2 = (out[c].to_numpy() for c in ("_exact", "_u", "_u2"))
    no_tail = (u2 >= u) | (u2 <= MIN_THRESHOLD)  # as in choose_threshold
    with np.errstate(divide="ignore", invalid="ignore"):  # no_tail rows are not read
        value = np.where(no_tail, exact, _extrapolate(u, u2))
    value = np.maximum(value, MIN_THRESHOLD)
    if shrink_to is not None:
        value = shrunk(value, out["_n_weeks"].to_numpy(), shrink_to)
    return dict(zip(out[series].to_list(), value.tolist(), strict=True))


def _extrapolate(u: Any, u2: Any) -> Any:
    """The threshold meeting the rate from the tail read at u (TAIL_REACH times the budget)
    and u2 (twice that), floats or arrays: the mean of an exponential and a power-law tail
    through them. Exponential alone alarms too often on heavy tails (t with 3 degrees of
    freedom: 1.4 times the rate), power-law alone too rarely on Laplace ones (0.7); their
    mean stays within 0.8-1.2 on both."""
    reach = np.log(TAIL_REACH) / np.log(2)
    exponential = u + (u - u2) * reach
    power = u * np.exp((np.log(u) - np.log(u2)) * reach)
    return (exponential + power) / 2


def merge_incidents(intervals: pl.DataFrame, gap: int) -> pl.DataFrame:
    """Merge per series the intervals (INCIDENT_COLUMNS plus freq_s; a single anomalous point
    is an interval from its ts to its ts with n_points 1) that lie within gap + 1 steps of
    each other into incidents (INCIDENT_COLUMNS, sorted by series and start)."""
    if intervals.is_empty():
        return pl.DataFrame(schema={c: intervals.schema[c] for c in INCIDENT_COLUMNS})
    reach = pl.duration(seconds=pl.col("freq_s") * (gap + 1))
    reached = pl.col("end_ts").cum_max().shift(1).over("series_id") + reach
    grouped = intervals.sort("series_id", "start_ts").with_columns(
        (pl.col("start_ts") > reached).fill_null(True).cum_sum().alias("_incident")
    )
    return (
        grouped.group_by("series_id", "_incident", maintain_order=True)
        .agg(
            pl.col("start_ts").min(),
            pl.col("end_ts").max(),
            pl.col("peak_ts").sort_by("peak_score").last(),
            pl.col("peak_score").max(),
            pl.col("n_points").sum(),
        )
        .select(*INCIDENT_COLUMNS)
    )


def aftermath(points: pl.DataFrame, incidents: pl.DataFrame, gap: int, horizon: int) -> pl.Series:
    """Per point (series_id, ts, origin_ts, freq_s), the largest peak score (0 where none)
    of the incidents (INCIDENT_COLUMNS) of its series that its forecast's state absorbed and
    that had closed by then: the origin at or after the incident's start and at most
    `horizon` steps after its end, the point more than `gap` steps after that end. Such a
    forecast is off because of that incident (the recurrent state carries it on for a while,
    whichever step of the forecast the point is): a miss smaller than the incident itself
    is no evidence of a new one. While the incident is open, its points continue it."""
    if incidents.is_empty() or points.is_empty():
        return pl.Series("aftermath", [0.0] * points.height, dtype=pl.Float64)
    step = pl.duration(seconds=pl.col("freq_s"))
    keyed = points.select("series_id", "ts", "origin_ts", "freq_s").with_row_index("_row")
    peak = (
        keyed.join(
            incidents.select("series_id", "start_ts", "end_ts", "peak_score"), on="series_id"
        )
        .filter(
            (pl.col("origin_ts") >= pl.col("start_ts"))
            & (pl.col("origin_ts") <= pl.col("end_ts") + step * horizon)
            & (pl.col("ts") > pl.col("end_ts") + step * gap)
        )
        .group_by("_row")
        .agg(pl.col("peak_score").max().alias("_peak"))
    )
    flagged = keyed.select("_row").join(peak, on="_row", how="left").sort("_row")
    return flagged["_peak"].fill_null(0.0).cast(pl.Float64).alias("aftermath")


def point_intervals(points: pl.DataFrame) -> pl.DataFrame:
    """Anomalous points (series_id, ts, score, freq_s) as one-point intervals."""
    return points.select(
        "series_id",
        pl.col("ts").alias("start_ts"),
        pl.col("ts").alias("end_ts"),
        pl.col("ts").alias("peak_ts"),
        pl.col("score").alias("peak_score"),
        pl.lit(1, pl.Int64).alias("n_points"),
        "freq_s",
    )


def edge_counts(points: pl.DataFrame) -> pl.DataFrame:
    """Per time of `points` (series_id, ts, deviation): n_series scored, n_low and n_high
    beyond the band's lower / upper edge (d < -1, d > 1: an actual on the edge, such as a
    zero on a band clipped at zero, is not beyond it)."""
    return points.group_by("ts").agg(
        pl.col("series_id").n_unique().alias("n_series"),
        (pl.col("deviation") < -1).sum().alias("n_low"),
        (pl.col("deviation") > 1).sum().alias("n_high"),
    )


def edge_shares(counts: pl.DataFrame) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """From past edge_counts, per side (low, high): the mean and the standard deviation over
    times of the share of series beyond that edge; None before MIN_EDGE_TIMES times. The
    deviation is read, not assumed binomial: series of one fleet err together (one
    airport's carriers, the same evening rush), which a binomial count would take for
    events."""
    if counts.height < MIN_EDGE_TIMES:
        return None
    out = []
    for col in ("n_low", "n_high"):
        share = (counts[col] / counts["n_series"].clip(lower_bound=1)).cast(pl.Float64)
        out.append((float(share.mean()), float(share.std())))  # type: ignore[arg-type]
    return out[0], out[1]


def fleet_evidence(
    counts: pl.DataFrame, low: tuple[float, float], high: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Per time of `counts` (ts-sorted edge_counts): how many standard deviations more
    series than usual lie beyond one edge of their bands (per side; the deviation at least
    the binomial one), as evidence over runs of times like a series' (0 where fewer than
    usual are); the larger side's, and that side (-1 low, +1 high)."""
    sides = []
    for col, (mean, sd) in (("n_low", low), ("n_high", high)):
        n = pl.col("n_series").cast(pl.Float64).clip(lower_bound=1)
        p = min(max(mean, 0.01), 0.99)
        scale = pl.max_horizontal(pl.lit(sd), (p * (1 - p) / n).sqrt())
        z = (pl.col(col) / n - mean) / scale  # signed: runs of it are unbiased
        frame = counts.select(pl.lit(0).alias("series_id"), z.alias("deviation"))
        more = (frame["deviation"] > 0).to_numpy()  # fewer than usual beyond it is no event
        ev = evidence(frame, clip=None).to_numpy()  # a fleet's z is not bounded like a band
        sides.append(np.where(more, ev, 0.0))
    lo, hi = sides
    return np.maximum(lo, hi), np.where(hi > lo, 1, -1)


def fleet_events(
    scored: pl.DataFrame,
    incidents: pl.DataFrame,
    share: float,
    min_series: int,
    merge: timedelta = timedelta(0),
    *,
    edges: tuple[tuple[float, float], tuple[float, float]] | None = None,
    threshold: float = FLEET_THRESHOLD,
    edge_points: pl.DataFrame | None = None,
    judge_from: datetime | None = None,
    known: Sequence[tuple[datetime, datetime]] = (),
) -> pl.DataFrame:
    """Fleet-wide events (start_ts, end_ts, n_series, peak_share) over the times of `scored`
    (ts, n_series: how many series were scored at each time; with `edges` = the usual shares
    beyond each edge (edge_shares), also n_low and n_high as edge_counts gives) from
    `incidents` (series_id, start_ts, end_ts; one series' incidents do not overlap). A time
    is in an event when a share of the fleet is inside incidents, or when its fleet
    evidence (fleet_evidence) reaches `threshold`. n_series counts the series of the linked incidents and, at the
    times the fleet went beyond one edge together, those of `edge_points` (series_id, ts,
    deviation: points beyond an edge) beyond that edge. With `judge_from`, only times from
    then on are judged by their evidence (once, when new); the spans of `known` events
    (recorded before) stay events."""
    empty = pl.DataFrame(
        schema={
            "start_ts": scored.schema["ts"],
            "end_ts": scored.schema["ts"],
            "n_series": pl.Int64,
            "peak_share": pl.Float64,
        }
    )
    if scored.is_empty() or (incidents.is_empty() and edges is None):
        return empty
    scored = scored.sort("ts")
    ts = scored["ts"].to_physical().to_numpy()
    starts = np.sort(incidents["start_ts"].to_physical().to_numpy())
    ends = np.sort(incidents["end_ts"].to_physical().to_numpy())
    inside = np.searchsorted(starts, ts, "right") - np.searchsorted(ends, ts, "left")
    total = np.maximum(scored["n_series"].to_numpy(), 1)
    frac = inside / total
    active = (inside >= min_series) & (frac >= share)
    if edges is not None:
        ev, side = fleet_evidence(scored, *edges)
        at_edge = np.where(side > 0, scored["n_high"].to_numpy(), scored["n_low"].to_numpy())
        together = (ev >= threshold) & (at_edge >= min_series)
        judged = together
        if judge_from is not None:  # each time judged once, against the times before it
            judged = together & (
                scored["ts"].to_numpy() >= np.datetime64(judge_from.replace(tzinfo=None))
            )
        active |= judged
    for start, end in known:  # recorded before: an event stays one
        active |= scored["ts"].is_between(start, end).to_numpy()
    if edges is not None:
        together &= active
        frac = np.maximum(frac, np.where(together, at_edge / total, 0.0))
        if edge_points is not None:  # only those beyond the edge the fleet went to, then
            when = pl.DataFrame({"ts": scored["ts"], "_side": side, "_together": together})
            edge_points = (
                edge_points.join(when, on="ts")
                .filter(pl.col("_together") & (pl.col("deviation").sign() == pl.col("_side")))
                .select("series_id", "ts")
            )
    else:
        edge_points = None
    if not active.any():
        return empty
    run = np.cumsum(np.r_[True, active[1:] != active[:-1]])
    frame = scored.with_columns(
        pl.Series("_run", run), pl.Series("_active", active), pl.Series("_share", frac)
    ).filter("_active")
    runs = frame.group_by("_run", maintain_order=True).agg(
        pl.col("ts").min().alias("start_ts"),
        pl.col("ts").max().alias("end_ts"),
        pl.col("_share").max().alias("peak_share"),
    )
    # Runs less than `merge` apart are one event (a storm paused by a night when the series
    # are quiet anyway).
    apart = (pl.col("start_ts") - pl.col("end_ts").shift(1)) > merge
    events = (
        runs.with_columns(apart.fill_null(True).cum_sum().alias("_event"))
        .group_by("_event", maintain_order=True)
        .agg(pl.col("start_ts").min(), pl.col("end_ts").max(), pl.col("peak_share").max())
    )
    members = [link_events(incidents, events).select("series_id", "event_start")]
    if edge_points is not None and not edge_points.is_empty():
        at = edge_points.select(
            "series_id",
            pl.col("ts").alias("start_ts"),
            pl.col("ts").alias("end_ts"),
        )
        members.append(link_events(at, events).select("series_id", "event_start"))
    counts = (
        pl.concat(members, how="vertical_relaxed")
        .drop_nulls("event_start")
        .group_by("event_start")
        .agg(pl.col("series_id").n_unique().alias("n_series"))
    )
    return (
        events.join(counts, left_on="start_ts", right_on="event_start", how="left")
        .select("start_ts", "end_ts", pl.col("n_series").fill_null(0).cast(pl.Int64), "peak_share")
        .sort("start_ts")
    )


def new_events(
    events: pl.DataFrame, after: datetime, recorded: Sequence[tuple[datetime, datetime]]
) -> pl.DataFrame:
    """The `events` a run over a window starting at `after` may (re)write: those starting
    after it that overlap no event `recorded` before it began (the window's first hours
    would otherwise cut a second, clipped copy of an event that runs into it)."""
    events = events.filter(pl.col("start_ts") > after)
    for start, end in recorded:
        if start <= after:
            events = events.filter((pl.col("start_ts") > end) | (pl.col("end_ts") < start))
    return events


def link_events(incidents: pl.DataFrame, events: pl.DataFrame) -> pl.DataFrame:
    """`incidents` with event_start: the start of the event it overlaps (None if none)."""
    if events.is_empty() or incidents.is_empty():
        return incidents.with_columns(
            pl.lit(None, incidents.schema["start_ts"]).alias("event_start")
        )
    ev = events.select(pl.col("start_ts").alias("event_start"), pl.col("end_ts").alias("event_end"))
    pairs = (
        incidents.with_row_index("_i")
        .join(ev, how="cross")
        .filter(
            (pl.col("start_ts") <= pl.col("event_end"))
            & (pl.col("end_ts") >= pl.col("event_start"))
        )
        .group_by("_i")
        .agg(pl.col("event_start").min())
    )
    return incidents.with_row_index("_i").join(pairs, on="_i", how="left").drop("_i")
