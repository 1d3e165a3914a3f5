"""The one MetaData of the store. Alembic revisions are reviewed copies of what this declares.

Names here are the SQL contract analysts type; keep them stable once released.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

# Quality of a stored point: observed, or filled by the gap policy (or left empty).
QUALITIES = ("observed", "ffill", "interpolated", "missing")


class UTCDateTime(TypeDecorator[datetime]):
    """timestamptz on PostgreSQL; on SQLite a naive UTC string (SQLite has no time zones and
    SQLAlchemy would silently drop tzinfo without converting). Always aware UTC in Python."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} reached the store; timestamps must be UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _now() -> datetime:
    return datetime.now(UTC)


def _model_version_id() -> sa.Column:
    """A model_version_id key column of a per-version table: rows go when the version goes."""
    return sa.Column(
        "model_version_id",
        sa.Integer,
        sa.ForeignKey("model_versions.id", ondelete="CASCADE"),
        primary_key=True,
    )


def _series_id(primary_key: bool = False) -> sa.Column:
    """A series_id column: rows go when their series goes."""
    return sa.Column(
        "series_id",
        sa.Integer,
        sa.ForeignKey("series.id", ondelete="CASCADE"),
        primary_key=primary_key,
    )


series = sa.Table(
    "series",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(512), nullable=False, unique=True),
    sa.Column("source", sa.String(128), nullable=True),
    sa.Column("freq_seconds", sa.Integer, nullable=False),
    sa.Column("window_seconds", sa.Integer, nullable=False),
    sa.Column("labels", sa.JSON, nullable=False, default=dict),
    sa.Column("created_at", UTCDateTime, nullable=False, default=_now),
)

observations = sa.Table(
    "observations",
    metadata,
    _series_id(primary_key=True),
    sa.Column("ts", UTCDateTime, primary_key=True),
    sa.Column("value", sa.Float, nullable=True),
    sa.Column("quality", sa.String(16), nullable=False),
    # floor(epoch seconds / window seconds): stable across restarts, so windows can be
    # recounted with an indexed range scan on the primary key.
    sa.Column("window_id", sa.BigInteger, nullable=False),
)

windows = sa.Table(
    "windows",
    metadata,
    _series_id(primary_key=True),
    sa.Column("window_id", sa.BigInteger, primary_key=True),
    sa.Column("start_ts", UTCDateTime, nullable=False),
    sa.Column("end_ts", UTCDateTime, nullable=False),  # exclusive
    sa.Column("n_expected", sa.Integer, nullable=False),
    sa.Column("n_points", sa.Integer, nullable=False),
    sa.Column("n_observed", sa.Integer, nullable=False),
    sa.Column("complete", sa.Boolean, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

watermarks = sa.Table(
    "watermarks",
    metadata,
    _series_id(primary_key=True),
    sa.Column("ts", UTCDateTime, nullable=False),  # newest point stored
    sa.Column("last_value", sa.Float, nullable=True),  # seeds ffill/interpolate of the next batch
    sa.Column("updated_at", UTCDateTime, nullable=False),
    # Late data: the oldest point at or before the watermark whose stored value a batch
    # changed since predict last looked (NULL when none), and a counter bumped with every
    # such batch, so predict clears only the mark it handled, never one that landed since.
    sa.Column("late_from", UTCDateTime, nullable=True),
    sa.Column("late_seq", sa.BigInteger, nullable=False, server_default="0"),
)

source_cursors = sa.Table(
    "source_cursors",
    metadata,
    sa.Column("source", sa.String(128), primary_key=True),
    sa.Column("cursor", sa.JSON, nullable=False),
    sa.Column("rows_total", sa.BigInteger, nullable=False, default=0),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

quarantine = sa.Table(
    "quarantine",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # sha256 of (source, origin, reason, series, ts, value): re-reading a row twice
    # quarantines it once.
    sa.Column("fingerprint", sa.String(64), nullable=False, unique=True),
    sa.Column("source", sa.String(128), nullable=False),
    sa.Column("origin", sa.Text, nullable=True),
    sa.Column("series", sa.Text, nullable=True),
    sa.Column("ts_raw", sa.Text, nullable=True),
    sa.Column("value_raw", sa.Text, nullable=True),
    sa.Column("reason", sa.String(32), nullable=False, index=True),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

job_runs = sa.Table(
    "job_runs",
    metadata,
    sa.Column("job_id", sa.String(256), primary_key=True),
    sa.Column("scheduled_at", UTCDateTime, primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),  # running / succeeded / failed
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.Column("detail", sa.Text, nullable=True),
)

# A version's place in the registry. One champion for the whole service: it serves forecasts.
STAGES = ("candidate", "champion", "retired")

model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(32), nullable=False),  # lstm / gru / rnn / seq2seq
    sa.Column("config", sa.JSON, nullable=False),
    # The checkpoint file (forecaster.checkpoints), written before this row. Not unique on
    # sha256: the same weights may be registered twice on purpose (e.g. scored on a new span).
    sa.Column("uri", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("trained_from", UTCDateTime, nullable=True),
    sa.Column("trained_to", UTCDateTime, nullable=True),
    sa.Column("metrics", sa.JSON, nullable=False, default=dict),
    sa.Column("stage", sa.String(16), nullable=False, index=True),
    # Fine-tuned from this version; NULL when trained from scratch.
    sa.Column("parent_id", sa.Integer, sa.ForeignKey("model_versions.id"), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False, default=_now),
    sa.CheckConstraint("stage IN ('candidate', 'champion', 'retired')", name="stage"),
    # At most one champion, enforced by the database whatever code or person writes the row.
    sa.Index(
        "uq_model_versions_one_champion",
        "stage",
        unique=True,
        sqlite_where=sa.text("stage = 'champion'"),
        postgresql_where=sa.text("stage = 'champion'"),
    ),
)

# -- rolling prediction -----------------------------------------------------------------------

# A model's hidden state per series after absorbing every point up to state_ts: raw float32
# bytes of `shape` (C order). Committed with the forecasts made from it, so a replay can
# never advance a state twice and a restart resumes exactly.
series_states = sa.Table(
    "series_states",
    metadata,
    _model_version_id(),
    _series_id(primary_key=True),
    sa.Column("state", sa.LargeBinary, nullable=False),
    sa.Column("shape", sa.JSON, nullable=False),
    sa.Column("state_ts", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    # The blend's weights served from this state ({member: weight}, forecaster.serving): the
    # version's holdout weights moved by the members' tracked errors. NULL where they do not
    # move (older versions and states). Migration 0012.
    sa.Column("weights", sa.JSON, nullable=True),
)

# A series a version was not trained on, served by it all the same (a new series): the
# robust scaler (median, IQR) fitted on its own stored points the first time it was served,
# kept so that every later state of it is in the same units. Migration 0009.
series_scalers = sa.Table(
    "series_scalers",
    metadata,
    _model_version_id(),
    _series_id(primary_key=True),
    sa.Column("center", sa.Float, nullable=False),
    sa.Column("scale", sa.Float, nullable=False),
    sa.Column("n_points", sa.Integer, nullable=False),  # the stored points it was fitted on
    sa.Column("fitted_to", UTCDateTime, nullable=False),  # the newest of them
    sa.Column("created_at", UTCDateTime, nullable=False),
)

# A copy of a complete window's points of a series, as the predict job reads them: float32,
# one per step from the window's start (little-endian; NaN where no value is stored). Written
# by predict in the transaction of the forecasts it read them for, kept over the reach of
# the head's seasonal lags (three weeks and a day), dropped from a series' late point on
# when that point is handled. The head's lags a day to three weeks back come from a few of
# these rows per series instead of ~100 observation rows. Migration 0016.
window_values = sa.Table(
    "window_values",
    metadata,
    _series_id(primary_key=True),
    sa.Column("window_id", sa.BigInteger, primary_key=True),
    sa.Column("step_seconds", sa.Integer, nullable=False),
    sa.Column("points", sa.LargeBinary, nullable=False),
)

# The state at each window edge for the last K windows (late data restores one of these).
state_snapshots = sa.Table(
    "state_snapshots",
    metadata,
    _model_version_id(),
    _series_id(primary_key=True),
    # The state after this window's last point.
    sa.Column("window_id", sa.BigInteger, primary_key=True),
    sa.Column("state", sa.LargeBinary, nullable=False),
    sa.Column("shape", sa.JSON, nullable=False),
    sa.Column("state_ts", UTCDateTime, nullable=False),
)

# The forecast ledger (migration 0013): one row per series, model, origin and revision, the
# whole horizon in `points`, a JSON array with one entry per horizon step (step 1 first):
# [yhat, yhat_lower, yhat_upper, raw_lower, raw_upper] for a model with a band, [yhat] for a
# baseline, null where a model made no forecast for that step. Step k's target time is
# origin_ts + k * step_seconds. A predict cycle writes one row per series and model instead
# of one per horizon step (10,000 series x 3 models: 30,000 rows, not 720,000). Analysts read
# the long view `forecasts` below, and latest_forecasts / forecast_accuracy on top of it.
forecast_origins = sa.Table(
    "forecast_origins",
    metadata,
    _series_id(primary_key=True),
    # "v<id>" for a registered model, "seasonal_naive_daily" / "_weekly" for the baselines
    # forecast beside it, so MASE is always at hand.
    sa.Column("model", sa.String(64), primary_key=True),
    sa.Column("origin_ts", UTCDateTime, primary_key=True),  # the last observed point used
    # 0 when first issued; a late point re-issues the origin's forecast as revision + 1 and
    # marks the old row superseded, so the history stays and one row per key is current.
    sa.Column("revision", sa.Integer, primary_key=True, server_default="0"),
    sa.Column(
        "model_version_id",
        sa.Integer,
        sa.ForeignKey("model_versions.id", ondelete="CASCADE"),
        nullable=True,
    ),
    sa.Column("step_seconds", sa.Integer, nullable=False),
    sa.Column("n_steps", sa.Integer, nullable=False),  # entries of `points`
    # origin_ts + n_steps * step_seconds: what retention and "targets after t" reads seek on.
    sa.Column("last_target_ts", UTCDateTime, nullable=False, index=True),
    sa.Column("interval_level", sa.Float, nullable=True),  # 0.8 for the 10-90% band
    # yhat_lower / yhat_upper are the served (calibrated) band; raw_lower / raw_upper the
    # model's own quantiles, which evaluation scores to update the correction.
    sa.Column("points", sa.Text, nullable=False),
    sa.Column("superseded", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

# Read-only definitions of the views (created by the migrations, not by this MetaData, so the
# schema comparison leaves them alone). `forecasts` is the ledger unnested to one row per
# horizon step, with the columns the forecasts table had before migration 0013, plus
# last_target_ts (its origin's newest target, for queries that seek on it).
views = sa.MetaData()

forecasts = sa.Table(
    "forecasts",
    views,
    sa.Column("series_id", sa.Integer),
    sa.Column("model", sa.String(64)),
    sa.Column("origin_ts", UTCDateTime),
    sa.Column("horizon_step", sa.Integer),
    sa.Column("model_version_id", sa.Integer),
    sa.Column("target_ts", UTCDateTime),
    sa.Column("yhat", sa.Float),
    sa.Column("yhat_lower", sa.Float),
    sa.Column("yhat_upper", sa.Float),
    sa.Column("interval_level", sa.Float),
    sa.Column("superseded", sa.Boolean),
    sa.Column("created_at", UTCDateTime),
    sa.Column("raw_lower", sa.Float),
    sa.Column("raw_upper", sa.Float),
    sa.Column("revision", sa.Integer),
    sa.Column("last_target_ts", UTCDateTime),
)

# -- evaluation ---------------------------------------------------------------------------------

# Conformal corrections per model and horizon step, from recently scored forecasts blended
# with the model's holdout calibration: the band served is [raw_lower - c * w, raw_upper +
# c * w], w the raw band's width and c the level quantile of how far actuals fell outside
# the raw band in widths of it (negative when the raw band is too wide). Migration 0007.
calibration = sa.Table(
    "calibration",
    metadata,
    sa.Column("model", sa.String(64), primary_key=True),
    sa.Column("horizon_step", sa.Integer, primary_key=True),
    sa.Column("correction", sa.Float, nullable=False),
    sa.Column("n_scored", sa.Integer, nullable=False),
    sa.Column("coverage_raw", sa.Float, nullable=True),  # of the raw band on the same forecasts
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

# The pooled offset added to every step's correction of a model (forecaster.calibration):
# an integral of the served band's excess misses, carried from one evaluate run to the next.
# calibration_tracking says, per series, up to which target time the actuals are in it.
# Migration 0008.
calibration_offsets = sa.Table(
    "calibration_offsets",
    metadata,
    sa.Column("model", sa.String(64), primary_key=True),
    sa.Column("offset", sa.Float, nullable=False),  # band widths, each side
    sa.Column("n_tracked", sa.BigInteger, nullable=False),  # actuals counted into it
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

calibration_tracking = sa.Table(
    "calibration_tracking",
    metadata,
    sa.Column("model", sa.String(64), primary_key=True),
    _series_id(primary_key=True),
    sa.Column("tracked_until", UTCDateTime, nullable=False),
)

# An anomalous actual: its score against the band served by the newest forecast for its time
# was above 1 (forecaster.anomaly). Rows from before migration 0010 have no score: they were
# every actual outside the band.
anomalies = sa.Table(
    "anomalies",
    metadata,
    _series_id(primary_key=True),
    sa.Column("ts", UTCDateTime, primary_key=True),
    sa.Column("model", sa.String(64), primary_key=True),
    sa.Column("actual", sa.Float, nullable=False),
    sa.Column("yhat", sa.Float, nullable=False),
    sa.Column("yhat_lower", sa.Float, nullable=False),
    sa.Column("yhat_upper", sa.Float, nullable=False),
    sa.Column("origin_ts", UTCDateTime, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("score", sa.Float, nullable=True),  # evidence over the threshold: > 1 anomalous
    sa.Column("threshold", sa.Float, nullable=True),  # the series' threshold when scored
)

# Consecutive anomalous points of one series (at most [anomalies].gap normal steps inside).
incidents = sa.Table(
    "incidents",
    metadata,
    _series_id(primary_key=True),
    sa.Column("model", sa.String(64), primary_key=True),
    sa.Column("start_ts", UTCDateTime, primary_key=True),
    sa.Column("end_ts", UTCDateTime, nullable=False),  # its last anomalous point
    sa.Column("peak_ts", UTCDateTime, nullable=False),
    sa.Column("peak_score", sa.Float, nullable=False),
    sa.Column("n_points", sa.Integer, nullable=False),
    sa.Column("event_start", UTCDateTime, nullable=True),  # its fleet event, if any
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Index("ix_incidents_start_ts", "start_ts"),
)

# Times at which a share of the fleet was inside incidents at once, one row per event.
fleet_events = sa.Table(
    "fleet_events",
    metadata,
    sa.Column("model", sa.String(64), primary_key=True),
    sa.Column("start_ts", UTCDateTime, primary_key=True),
    sa.Column("end_ts", UTCDateTime, nullable=False),
    sa.Column("n_series", sa.Integer, nullable=False),
    sa.Column("peak_share", sa.Float, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

# Per model: the fleet's evidence threshold in force (forecaster.anomaly), the false-alarm rate it was
# set for and the rate of incidents seen over the window (per series per week).
anomaly_thresholds = sa.Table(
    "anomaly_thresholds",
    metadata,
    sa.Column("model", sa.String(64), primary_key=True),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("measured", sa.Boolean, nullable=False),  # False: too little data, the default
    sa.Column("rate_target", sa.Float, nullable=False),
    sa.Column("rate_seen", sa.Float, nullable=True),
    sa.Column("series_weeks", sa.Float, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

# Per model and series: the score of its newest scored point, and whether an incident is open.
anomaly_state = sa.Table(
    "anomaly_state",
    metadata,
    sa.Column("model", sa.String(64), primary_key=True),
    _series_id(primary_key=True),
    sa.Column("ts", UTCDateTime, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("incident_open", sa.Boolean, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    # What the next run's new points continue (migration 0014): the series' typical
    # half-width of the band (its deviations' scale, forecaster.anomaly.deviation) and its
    # last deviations (a JSON array, oldest first: the runs its evidence sums).
    sa.Column("typical", sa.Float, nullable=True),
    sa.Column("recent", sa.Text, nullable=True),
    # What the next run's threshold reads (migration 0015), so that a run does not read the
    # window's judged points again: the series' points of the window with evidence of at
    # least the lowest threshold allowed (its "tail": little-endian float64 pairs of epoch
    # seconds and evidence, oldest first), and its judged points per whole day from
    # window_day on (day_counts: little-endian int64, one per day). NULL (rows written
    # before 0015): read from anomaly_points and accuracy_days once.
    sa.Column("tail", sa.LargeBinary, nullable=True),
    sa.Column("day_counts", sa.LargeBinary, nullable=True),
    sa.Column("window_day", UTCDateTime, nullable=True),
    # The lag-one correlation of the series' deviations its runs are scaled by (migration
    # 0018, forecaster.anomaly.run_scale): the sums of its clipped deviations' lag products
    # and squares, older points weighing less (anomaly.RHO_HALF_LIFE). NULL: none yet.
    sa.Column("lag_sum", sa.Float, nullable=True),
    sa.Column("square_sum", sa.Float, nullable=True),
)

# -- running aggregates of the evaluate job (migration 0014) -----------------------------------
# Each evaluate run reads only the forecasts whose actuals are new and adds them here, in the
# transaction that moves calibration_tracking on: its cost follows the new data, not the
# calibration window. Days are UTC days of the target time.

# Per model, day and horizon step: scored forecasts, how many fell inside the served and the
# raw band, and the histogram of their conformity scores (forecaster.calibration.ScoreHistogram,
# packed): the per-step conformal quantile over the window is read from the summed histograms.
calibration_days = sa.Table(
    "calibration_days",
    metadata,
    sa.Column("model", sa.String(64), primary_key=True),
    sa.Column("day", UTCDateTime, primary_key=True),
    sa.Column("horizon_step", sa.Integer, primary_key=True),
    sa.Column("n", sa.BigInteger, nullable=False),
    sa.Column("inside", sa.BigInteger, nullable=False),
    sa.Column("inside_raw", sa.BigInteger, nullable=False),
    sa.Column("scores", sa.LargeBinary, nullable=False),
)

# Per series, model and day: scored forecasts that the daily seasonal naive also forecast
# (series_accuracy pairs them), the sums of their absolute errors and of the naive's on the
# same (series, origin, step), how many fell inside the band (models with one), and, for the
# champion, the actuals judged for anomalies (one per target time: the series' points, in
# weeks the threshold's budget).
accuracy_days = sa.Table(
    "accuracy_days",
    metadata,
    _series_id(primary_key=True),
    sa.Column("model", sa.String(64), primary_key=True),
    sa.Column("day", UTCDateTime, primary_key=True),
    sa.Column("n", sa.BigInteger, nullable=False),
    sa.Column("abs_err", sa.Float, nullable=False),
    sa.Column("naive_abs_err", sa.Float, nullable=False),
    sa.Column("inside", sa.BigInteger, nullable=False),
    sa.Column("n_points", sa.BigInteger, nullable=False),
    sa.Index("ix_accuracy_days_day", "day"),  # each run drops the days before its window
    # SQLite: stored in the key's order, the row in the key's b-tree (migration 0017): the
    # window sums walk the key without a table lookup per row.
    sqlite_with_rowid=False,
)

# Per model and target time: series judged, and how many lay beyond the lower and the upper
# edge of their bands (forecaster.anomaly.edge_counts): the fleet's usual share beyond an
# edge, and its evidence of going there together.
fleet_times = sa.Table(
    "fleet_times",
    metadata,
    sa.Column("model", sa.String(64), primary_key=True),
    sa.Column("ts", UTCDateTime, primary_key=True),
    sa.Column("n_series", sa.BigInteger, nullable=False),
    sa.Column("n_low", sa.BigInteger, nullable=False),
    sa.Column("n_high", sa.BigInteger, nullable=False),
)

# The judged points an anomaly threshold or a fleet event may need again: those with
# evidence of at least forecaster.anomaly.MIN_THRESHOLD (no threshold is lower, so the
# others never start an incident), kept over the window, and those beyond an edge of their
# band, kept while a fleet event they may belong to can still be rewritten.
anomaly_points = sa.Table(
    "anomaly_points",
    metadata,
    sa.Column("model", sa.String(64), primary_key=True),
    _series_id(primary_key=True),
    sa.Column("ts", UTCDateTime, primary_key=True),
    sa.Column("deviation", sa.Float, nullable=False),
    sa.Column("evidence", sa.Float, nullable=False),
    sa.Index("ix_anomaly_points_model_ts", "model", "ts"),
)

# Rolling accuracy per series and model over the evaluate job's recent window: what the
# retraining trigger, /metrics (forecaster_mase) and dashboards read. MASE is scaled by the
# daily seasonal naive's in-sample MAE over the same window (1.0 = as good as copying
# yesterday).
series_accuracy = sa.Table(
    "series_accuracy",
    metadata,
    _series_id(primary_key=True),
    sa.Column("model", sa.String(64), primary_key=True),
    sa.Column("n_scored", sa.Integer, nullable=False),
    sa.Column("mae", sa.Float, nullable=False),
    sa.Column("mase", sa.Float, nullable=True),  # NULL when the series has no scale yet
    sa.Column("coverage", sa.Float, nullable=True),  # of the served band; NULL for baselines
    sa.Column("window_start", UTCDateTime, nullable=False),
    sa.Column("window_end", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)
