"""Evaluation: scored forecasts, calibration, anomalies and accuracy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from forecaster import schema as s
from forecaster.store.base import (
    Bulk,
    PgTemp,
    StoreBase,
    _utc,
)

if TYPE_CHECKING:  # polars is imported where frames are built (see forecaster.store)
    import polars as pl


class EvaluationStore(StoreBase):
    # -- evaluation ----------------------------------------------------------------------

    def calibration_for(self, model: str) -> dict[int, float]:
        """horizon_step -> conformal correction for a model key ("v3"); empty when none yet."""
        c = s.calibration
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(c.c.horizon_step, c.c.correction).where(c.c.model == model)
            )
            return {step: corr for step, corr in rows}

    def scored_forecasts(
        self, model: str, since: datetime, series_ids: Sequence[int] | None = None
    ) -> pl.DataFrame:
        """Forecasts of `model` with targets at or after `since` whose actuals have arrived
        (of the given series only, when given): series_id, origin_ts, target_ts,
        horizon_step, yhat, yhat_lower, yhat_upper, raw_lower, raw_upper, interval_level,
        actual. The ledger's points (forecast_points) joined to the observed actuals, read
        in one range for all their series (recent_values)."""
        points = self.forecast_points(model, since, series_ids)
        if points.is_empty():
            return with_actuals(points, None)
        return with_actuals(points, self.actuals_for(points))

    def actuals_for(self, points: pl.DataFrame) -> pl.DataFrame:
        """The observed actuals (series_id, ts, value) of the series of `points` (forecast
        points, not empty) over the span of their targets: one range for all, since the
        series' targets lie within the same few weeks (callers read series whose ends lie
        far apart in separate calls)."""
        span = (points["target_ts"].min(), points["target_ts"].max())
        ids = points["series_id"].unique().to_list()
        return self.recent_values(ids, [span], observed_only=True)

    def forecast_points(
        self,
        model: str,
        since: datetime,
        series_ids: Sequence[int] | None = None,
        before: datetime | None = None,
    ) -> pl.DataFrame:
        """The current forecasts of `model` with targets at or after `since` (of the given
        series only, when given; made before `before`, when given: a forecast made at or
        after a series' newest point has no actual yet): series_id, origin_ts, target_ts,
        horizon_step, yhat, yhat_lower, yhat_upper, raw_lower, raw_upper, interval_level.

        The current ledger rows whose last target is at or after `since` (its index), their
        horizons decoded together by polars (not unnested in SQL, point by point)."""
        import polars as pl

        from forecaster.frames import TS_DTYPE

        fo = s.forecast_origins
        raw = sa.types.NullType()
        q = sa.select(
            fo.c.series_id,
            sa.type_coerce(fo.c.origin_ts, raw).label("origin_ts"),
            fo.c.step_seconds,
            fo.c.interval_level,
            fo.c.points,
        ).where(fo.c.model == model, fo.c.superseded.is_(False), fo.c.last_target_ts >= since)
        if series_ids is not None:
            q = q.where(fo.c.series_id.in_(sorted(series_ids)))
        if before is not None:
            q = q.where(fo.c.origin_ts < before)
        ledger = self._frame(
            q,
            {
                "series_id": pl.Int64,
                "origin_ts": TS_DTYPE,
                "step_seconds": pl.Int64,
                "interval_level": pl.Float64,
                "points": pl.String,
            },
        )
        if ledger.is_empty():
            return pl.DataFrame(schema=_points_schema())
        entry = pl.col("p")
        points = (
            ledger.with_columns(
                pl.col("points").str.json_decode(pl.List(pl.List(pl.Float64))).alias("p")
            )
            .with_columns(pl.int_ranges(1, pl.col("p").list.len() + 1).alias("horizon_step"))
            .explode("p", "horizon_step")
            .filter(entry.is_not_null())  # a step without a forecast
            .with_columns(
                (
                    pl.col("origin_ts")
                    + pl.duration(seconds=pl.col("horizon_step") * pl.col("step_seconds"))
                ).alias("target_ts")
            )
            .filter(pl.col("target_ts") >= since)
        )
        return (
            points.with_columns(
                *(
                    entry.list.get(i, null_on_oob=True).alias(name)
                    for i, name in enumerate(
                        ("yhat", "yhat_lower", "yhat_upper", "raw_lower", "raw_upper")
                    )
                )
            )
            .select(list(_points_schema()))
            .cast(_points_schema())  # type: ignore[arg-type]
        )

    def series_ends(self) -> pl.DataFrame:
        """series_id and `end`, the newest point stored, of every series with one."""
        import polars as pl

        from forecaster.frames import TS_DTYPE

        w = s.watermarks
        raw = sa.types.NullType()
        q = sa.select(w.c.series_id, sa.type_coerce(w.c.ts, raw).label("end"))
        return self._frame(q, {"series_id": pl.Int64, "end": TS_DTYPE})

    def series_freqs(self) -> pl.DataFrame:
        """series_id and freq_s, the step in seconds, of every series."""
        import polars as pl

        se = s.series
        q = sa.select(se.c.id, se.c.freq_seconds)
        return self._frame(q, {"series_id": pl.Int64, "freq_s": pl.Int64})

    def calibration_offset(self, model: str) -> float:
        """The pooled offset carried for a model (band widths); 0 before its first."""
        c = s.calibration_offsets
        with self.engine.connect() as conn:
            value = conn.execute(
                sa.select(c.c.offset).where(c.c.model == model)
            ).scalar_one_or_none()
        return 0.0 if value is None else float(value)

    def calibration_tracking(self, model: str) -> pl.DataFrame:
        """series_id, tracked_until: per series, the newest target time whose actuals are
        counted into the model's offset."""
        import polars as pl

        from forecaster.frames import TS_DTYPE

        t = s.calibration_tracking
        raw = sa.types.NullType()
        q = sa.select(t.c.series_id, sa.type_coerce(t.c.tracked_until, raw)).where(
            t.c.model == model
        )
        return self._frame(q, {"series_id": pl.Int64, "tracked_until": TS_DTYPE})

    def save_calibration_offset(
        self, conn: Connection, model: str, offset: float, n_new: int, tracked: pl.DataFrame
    ) -> None:
        """Store the model's offset after counting n_new more actuals, and each series'
        newest target counted (`tracked`: series_id, tracked_until)."""
        o = s.calibration_offsets
        now = datetime.now(UTC)
        before = conn.execute(sa.select(o.c.n_tracked).where(o.c.model == model)).scalar()
        stmt = self._upsert(o, ("offset", "n_tracked", "updated_at"))
        conn.execute(
            stmt,
            [
                {
                    "model": model,
                    "offset": offset,
                    "n_tracked": (before or 0) + n_new,
                    "updated_at": now,
                }
            ],
        )
        if not tracked.is_empty():  # a row per series: in bulk
            import polars as pl

            frame = tracked.select(pl.lit(model).alias("model"), "series_id", "tracked_until")
            self._bulk_upsert_frame(conn, _TRACKING, frame)

    def save_calibration(
        self, conn: Connection, model: str, rows: Sequence[Mapping[str, Any]]
    ) -> None:
        if not rows:
            return
        stmt = self._upsert(s.calibration, ("correction", "n_scored", "coverage_raw", "updated_at"))
        now = datetime.now(UTC)
        conn.execute(stmt, [{**r, "model": model, "updated_at": now} for r in rows])

    def copy_calibration(self, conn: Connection, source: str, target: str) -> int:
        """Give model `target` the conformal corrections of `source` where it has none yet:
        a new champion serves calibrated bands from its first forecast, until evaluate has
        scored enough of its own (the corrections then become its own). Returns rows added."""
        c = s.calibration
        have = {
            step for (step,) in conn.execute(sa.select(c.c.horizon_step).where(c.c.model == target))
        }
        rows = [
            {**dict(r._mapping), "model": target}
            for r in conn.execute(sa.select(c).where(c.c.model == source))
            if r.horizon_step not in have
        ]
        if rows:
            conn.execute(sa.insert(c), rows)
        # ... and the pooled offset, which its own evaluate runs then carry on from.
        o = s.calibration_offsets
        offset = conn.execute(sa.select(o.c.offset).where(o.c.model == source)).scalar()
        has = conn.execute(sa.select(o.c.model).where(o.c.model == target)).scalar()
        if offset is not None and has is None:
            now = datetime.now(UTC)
            conn.execute(
                sa.insert(o),
                [{"model": target, "offset": offset, "n_tracked": 0, "updated_at": now}],
            )
        return len(rows)

    def save_series_accuracy(self, conn: Connection, frame: pl.DataFrame) -> None:
        """Upsert rolling accuracy rows (series_id, model, n_scored, mae, mase, coverage,
        window_start, window_end); a series scored no more keeps its last row. In bulk (a
        row per series and model: 40,000 a run at 10,000 series)."""
        if frame.is_empty():
            return
        import polars as pl

        now = pl.lit(datetime.now(UTC)).dt.cast_time_unit("us").alias("updated_at")
        self._bulk_upsert_frame(conn, _ACCURACY, frame.select(*_ACCURACY.columns[:-1], now))

    def series_accuracy(self, model: str | None = None) -> list[dict[str, Any]]:
        """Rows of series_accuracy with the series' name, optionally of one model."""
        a, se = s.series_accuracy, s.series
        q = sa.select(se.c.name.label("series"), a).join(se, se.c.id == a.c.series_id)
        if model is not None:
            q = q.where(a.c.model == model)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q.order_by(se.c.name, a.c.model))]

    def insert_anomalies(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> int:
        """Store anomalies once (keyed by series, time and model); returns how many are new."""
        if not rows:
            return 0
        now = datetime.now(UTC)
        stmt = (
            self._insert(s.anomalies)
            .on_conflict_do_nothing(index_elements=["series_id", "ts", "model"])
            .returning(s.anomalies.c.series_id)
        )
        return len(conn.execute(stmt, [{**r, "created_at": now} for r in rows]).all())

    # -- incidents and fleet events (forecaster.anomaly) ----------------------------------

    def incidents_since(self, model: str, since: datetime) -> pl.DataFrame:
        """The model's incidents whose last point is at or after `since`: series_id,
        start_ts, end_ts, peak_ts, peak_score, n_points, event_start."""
        import polars as pl

        from forecaster.frames import TS_DTYPE

        i = s.incidents
        raw = sa.types.NullType()
        q = sa.select(
            i.c.series_id,
            *(sa.type_coerce(i.c[c], raw) for c in ("start_ts", "end_ts", "peak_ts")),
            i.c.peak_score,
            i.c.n_points,
            sa.type_coerce(i.c.event_start, raw),
        ).where(i.c.model == model, i.c.end_ts >= since)
        return self._frame(
            q,
            {
                "series_id": pl.Int64,
                "start_ts": TS_DTYPE,
                "end_ts": TS_DTYPE,
                "peak_ts": TS_DTYPE,
                "peak_score": pl.Float64,
                "n_points": pl.Int64,
                "event_start": TS_DTYPE,
            },
        )

    def replace_incidents(
        self, conn: Connection, model: str, old: pl.DataFrame, new: pl.DataFrame
    ) -> None:
        """Delete the model's incidents keyed by `old` (series_id, start_ts) and store `new`
        (forecaster.anomaly.INCIDENT_COLUMNS, event_start optional)."""
        i = s.incidents
        if not old.is_empty():
            conn.execute(
                sa.delete(i).where(
                    i.c.model == model,
                    i.c.series_id == sa.bindparam("sid"),
                    i.c.start_ts == sa.bindparam("start"),
                ),
                [
                    {"sid": sid, "start": start}
                    for sid, start in old.select("series_id", "start_ts").rows()
                ],
            )
        if not new.is_empty():
            now = datetime.now(UTC)
            rows = [
                {"event_start": None, **r, "model": model, "updated_at": now}
                for r in new.iter_rows(named=True)
            ]
            conn.execute(sa.insert(i), rows)

    def replace_fleet_events(
        self,
        conn: Connection,
        model: str,
        after: datetime,
        events: pl.DataFrame,
        links: pl.DataFrame,
    ) -> None:
        """The model's fleet events starting after `after` become `events` (start_ts, end_ts,
        n_series, peak_share), and the incidents linked to them are those `links` names
        (series_id, start_ts, event_start); events from before are left as they are."""
        f, i = s.fleet_events, s.incidents
        conn.execute(sa.delete(f).where(f.c.model == model, f.c.start_ts > after))
        now = datetime.now(UTC)
        if not events.is_empty():
            conn.execute(
                sa.insert(f),
                [{**r, "model": model, "updated_at": now} for r in events.iter_rows(named=True)],
            )
        conn.execute(
            sa.update(i).where(i.c.model == model, i.c.event_start > after).values(event_start=None)
        )
        linked = links.filter(links["event_start"].is_not_null()) if not links.is_empty() else links
        if not linked.is_empty():
            conn.execute(
                sa.update(i)
                .where(
                    i.c.model == model,
                    i.c.series_id == sa.bindparam("sid"),
                    i.c.start_ts == sa.bindparam("start"),
                )
                .values(event_start=sa.bindparam("event"), updated_at=now),
                [
                    {"sid": sid, "start": start, "event": event}
                    for sid, start, event in linked.select(
                        "series_id", "start_ts", "event_start"
                    ).rows()
                ],
            )

    def save_anomaly_threshold(self, conn: Connection, model: str, row: Mapping[str, Any]) -> None:
        """Upsert the model's threshold row (threshold, measured, rate_target, rate_seen,
        series_weeks)."""
        cols = ("threshold", "measured", "rate_target", "rate_seen", "series_weeks", "updated_at")
        stmt = self._upsert(s.anomaly_thresholds, cols)
        conn.execute(stmt, [{**row, "model": model, "updated_at": datetime.now(UTC)}])

    def anomaly_threshold(self, model: str | None = None) -> dict[str, Any] | None:
        """The threshold row of `model`; with None, the newest measured one of any model
        (what a new champion starts from)."""
        t = s.anomaly_thresholds
        q = sa.select(t)
        if model is not None:
            q = q.where(t.c.model == model)
        else:
            q = q.where(t.c.measured.is_(True)).order_by(t.c.updated_at.desc()).limit(1)
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        return None if row is None else dict(row._mapping)

    def save_anomaly_state(self, conn: Connection, model: str, frame: pl.DataFrame) -> None:
        """Upsert per series (frame: series_id, ts, score, incident_open, typical, recent,
        lag_sum, square_sum, tail, day_counts, window_day) the newest scored point and what
        the next run continues. In bulk: a row per series judged, 10,000 a run at 10,000
        series."""
        if frame.is_empty():
            return
        import polars as pl

        now = pl.lit(datetime.now(UTC)).dt.cast_time_unit("us").alias("updated_at")
        rows = frame.select(pl.lit(model).alias("model"), *_STATE.columns[1:-1], now)
        self._bulk_upsert_frame(conn, _STATE, rows)

    def anomaly_state(
        self, model: str, series_ids: Sequence[int] | None = None
    ) -> list[dict[str, Any]]:
        """Rows of anomaly_state of `model` (series_id, ts, score, incident_open, typical,
        recent); what the evaluate job carries besides is read by carried_state."""
        a = s.anomaly_state
        q = sa.select(
            a.c.series_id, a.c.ts, a.c.score, a.c.incident_open, a.c.typical, a.c.recent
        ).where(a.c.model == model)
        if series_ids is not None:
            q = q.where(a.c.series_id.in_(list(series_ids)))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def carried_state(self, model: str) -> pl.DataFrame:
        """anomaly_state of `model` as a frame, with what the evaluate job carries: series_id,
        ts, score, incident_open, typical, recent, lag_sum, square_sum, tail, day_counts,
        window_day."""
        import polars as pl

        from forecaster.frames import TS_DTYPE

        a = s.anomaly_state
        raw = sa.types.NullType()
        q = sa.select(
            a.c.series_id,
            sa.type_coerce(a.c.ts, raw),
            a.c.score,
            a.c.incident_open,
            a.c.typical,
            a.c.recent,
            a.c.lag_sum,
            a.c.square_sum,
            a.c.tail,
            a.c.day_counts,
            sa.type_coerce(a.c.window_day, raw),
        ).where(a.c.model == model)
        return self._frame(
            q,
            {
                "series_id": pl.Int64,
                "ts": TS_DTYPE,
                "score": pl.Float64,
                "incident_open": pl.Boolean,
                "typical": pl.Float64,
                "recent": pl.String,
                "lag_sum": pl.Float64,
                "square_sum": pl.Float64,
                "tail": pl.Binary,
                "day_counts": pl.Binary,
                "window_day": TS_DTYPE,
            },
        )

    def list_incidents(
        self, series_name: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Incidents, newest first, with their series' name and their fleet event's size."""
        i, se, f = s.incidents, s.series, s.fleet_events
        q = (
            sa.select(
                se.c.name.label("series"),
                i.c.model,
                i.c.start_ts,
                i.c.end_ts,
                i.c.peak_ts,
                i.c.peak_score,
                i.c.n_points,
                i.c.event_start,
                f.c.n_series.label("event_series"),
            )
            .join(se, se.c.id == i.c.series_id)
            .outerjoin(f, sa.and_(f.c.model == i.c.model, f.c.start_ts == i.c.event_start))
        )
        if series_name is not None:
            q = q.where(se.c.name == series_name)
        q = q.order_by(i.c.start_ts.desc(), se.c.name).limit(limit)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def anomalies_since(self, model: str, since: datetime) -> pl.DataFrame:
        """series_id, ts and sign (of actual - yhat) of the model's anomalies from `since`."""
        import polars as pl

        from forecaster.frames import TS_DTYPE

        a = s.anomalies
        raw = sa.types.NullType()
        sign = sa.case((a.c.actual > a.c.yhat, 1), (a.c.actual < a.c.yhat, -1), else_=0)
        q = sa.select(a.c.series_id, sa.type_coerce(a.c.ts, raw), sign).where(
            a.c.model == model, a.c.ts >= since
        )
        return self._frame(q, {"series_id": pl.Int64, "ts": TS_DTYPE, "sign": pl.Float64})

    def fleet_events_since(self, model: str, since: datetime) -> list[dict[str, Any]]:
        """The model's fleet events ending at or after `since` (start_ts, end_ts)."""
        f = s.fleet_events
        q = sa.select(f.c.start_ts, f.c.end_ts).where(f.c.model == model, f.c.end_ts >= since)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q.order_by(f.c.start_ts))]

    def list_fleet_events(self, limit: int = 50) -> list[dict[str, Any]]:
        """Fleet-wide events, newest first."""
        f = s.fleet_events
        q = sa.select(f).order_by(f.c.start_ts.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def list_anomalies(
        self, series_name: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        a, se = s.anomalies, s.series
        q = sa.select(se.c.name.label("series"), a).join(se, se.c.id == a.c.series_id)
        if series_name is not None:
            q = q.where(se.c.name == series_name)
        q = q.order_by(a.c.ts.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def accuracy_by_model(self, window: timedelta) -> list[dict[str, Any]]:
        """Per model over the forecast_accuracy view's last `window` of targets: n, MAE,
        band coverage and mean pinball loss (None for models without a band)."""
        view = sa.table(
            "forecast_accuracy",
            *(
                sa.column(c)
                for c in (
                    "model",
                    "target_ts",
                    "abs_error",
                    "inside_interval",
                    "pinball_loss",
                    "yhat_lower",
                )
            ),
        )
        newest = sa.select(sa.func.max(view.c.target_ts)).scalar_subquery()
        with self.engine.connect() as conn:
            newest_ts = conn.execute(sa.select(newest)).scalar_one_or_none()
            if newest_ts is None:
                return []
            if isinstance(newest_ts, str):
                newest_ts = datetime.fromisoformat(newest_ts)
            since = _utc(newest_ts) - window
            since_bind = (
                since.replace(tzinfo=None).isoformat(" ") if self.dialect == "sqlite" else since
            )
            has_band = view.c.yhat_lower.is_not(None)
            q = (
                sa.select(
                    view.c.model,
                    sa.func.count().label("n"),
                    sa.func.avg(view.c.abs_error).label("mae"),
                    sa.func.avg(sa.case((has_band, view.c.inside_interval), else_=None)).label(
                        "coverage"
                    ),
                    sa.func.avg(sa.case((has_band, view.c.pinball_loss), else_=None)).label(
                        "pinball"
                    ),
                )
                .where(view.c.target_ts >= since_bind)
                .group_by(view.c.model)
                .order_by(view.c.model)
            )
            return [
                {k: (float(v) if isinstance(v, Decimal) else v) for k, v in r._mapping.items()}
                for r in conn.execute(q)
            ]


_ACCURACY = Bulk(
    table="series_accuracy",
    columns=(
        "series_id",
        "model",
        "n_scored",
        "mae",
        "mase",
        "coverage",
        "window_start",
        "window_end",
        "updated_at",
    ),
    key=("series_id", "model"),
    timestamps=("window_start", "window_end", "updated_at"),
    pg=PgTemp(
        create="CREATE TEMP TABLE IF NOT EXISTS _series_accuracy_in (series_id integer, "
        "model text, n_scored integer, mae double precision, mase double precision, "
        "coverage double precision, window_start timestamptz, window_end timestamptz, "
        "updated_at timestamptz) ON COMMIT DROP",
        truncate="TRUNCATE _series_accuracy_in",
        copy="COPY _series_accuracy_in (series_id, model, n_scored, mae, mase, coverage, "
        "window_start, window_end, updated_at) FROM STDIN",
    ),
    pg_upsert="INSERT INTO series_accuracy (series_id, model, n_scored, mae, mase, coverage, "
    "window_start, window_end, updated_at) SELECT series_id, model, n_scored, mae, mase, "
    "coverage, window_start, window_end, updated_at FROM _series_accuracy_in "
    "ON CONFLICT (series_id, model) DO UPDATE SET n_scored = excluded.n_scored, "
    "mae = excluded.mae, mase = excluded.mase, coverage = excluded.coverage, "
    "window_start = excluded.window_start, window_end = excluded.window_end, "
    "updated_at = excluded.updated_at",
)


_STATE = Bulk(
    table="anomaly_state",
    columns=(
        "model",
        "series_id",
        "ts",
        "score",
        "incident_open",
        "typical",
        "recent",
        "lag_sum",
        "square_sum",
        "tail",
        "day_counts",
        "window_day",
        "updated_at",
    ),
    key=("model", "series_id"),
    timestamps=("ts", "window_day", "updated_at"),
    pg=PgTemp(
        create="CREATE TEMP TABLE IF NOT EXISTS _anomaly_state_in (model text, "
        "series_id integer, ts timestamptz, score double precision, incident_open boolean, "
        "typical double precision, recent text, lag_sum double precision, "
        "square_sum double precision, tail bytea, day_counts bytea, "
        "window_day timestamptz, updated_at timestamptz) ON COMMIT DROP",
        truncate="TRUNCATE _anomaly_state_in",
        copy="COPY _anomaly_state_in (model, series_id, ts, score, incident_open, typical, "
        "recent, lag_sum, square_sum, tail, day_counts, window_day, updated_at) FROM STDIN",
        copy_binary="COPY _anomaly_state_in (model, series_id, ts, score, incident_open, "
        "typical, recent, lag_sum, square_sum, tail, day_counts, window_day, updated_at) "
        "FROM STDIN (FORMAT binary)",
        types=(
            "text",
            "integer",
            "timestamptz",
            "float8",
            "boolean",
            "float8",
            "text",
            "float8",
            "float8",
            "bytea",
            "bytea",
            "timestamptz",
            "timestamptz",
        ),
    ),
    pg_upsert="INSERT INTO anomaly_state (model, series_id, ts, score, incident_open, "
    "typical, recent, lag_sum, square_sum, tail, day_counts, window_day, updated_at) "
    "SELECT model, series_id, ts, score, incident_open, typical, recent, lag_sum, "
    "square_sum, tail, day_counts, window_day, updated_at "
    "FROM _anomaly_state_in ON CONFLICT (model, series_id) DO UPDATE SET ts = excluded.ts, "
    "score = excluded.score, incident_open = excluded.incident_open, "
    "typical = excluded.typical, recent = excluded.recent, lag_sum = excluded.lag_sum, "
    "square_sum = excluded.square_sum, tail = excluded.tail, "
    "day_counts = excluded.day_counts, window_day = excluded.window_day, "
    "updated_at = excluded.updated_at",
)

_TRACKING = Bulk(
    table="calibration_tracking",
    columns=("model", "series_id", "tracked_until"),
    key=("model", "series_id"),
    timestamps=("tracked_until",),
    pg=PgTemp(
        create="CREATE TEMP TABLE IF NOT EXISTS _calibration_tracking_in (model text, "
        "series_id integer, tracked_until timestamptz) ON COMMIT DROP",
        truncate="TRUNCATE _calibration_tracking_in",
        copy="COPY _calibration_tracking_in (model, series_id, tracked_until) FROM STDIN",
    ),
    pg_upsert="INSERT INTO calibration_tracking (model, series_id, tracked_until) "
    "SELECT model, series_id, tracked_until FROM _calibration_tracking_in "
    "ON CONFLICT (model, series_id) DO UPDATE SET tracked_until = excluded.tracked_until",
)


def _points_schema() -> dict[str, Any]:
    import polars as pl

    from forecaster.frames import TS_DTYPE

    return {
        "series_id": pl.Int64,
        "origin_ts": TS_DTYPE,
        "target_ts": TS_DTYPE,
        "horizon_step": pl.Int64,
        "yhat": pl.Float64,
        "yhat_lower": pl.Float64,
        "yhat_upper": pl.Float64,
        "raw_lower": pl.Float64,
        "raw_upper": pl.Float64,
        "interval_level": pl.Float64,
    }


def with_actuals(points: pl.DataFrame, actual: pl.DataFrame | None) -> pl.DataFrame:
    """Forecast points (EvaluationStore.forecast_points) joined to their observed actuals
    (`actual`: series_id, ts, value; it may hold more): the scored ones, with `actual`."""
    import polars as pl

    schema = {**_points_schema(), "actual": pl.Float64}
    if actual is None or points.is_empty():
        return pl.DataFrame(schema=schema)
    return (
        points.join(
            actual.select(
                "series_id", pl.col("ts").alias("target_ts"), pl.col("value").alias("actual")
            ),
            on=["series_id", "target_ts"],
        )
        .select(list(schema))
        .cast(schema)  # type: ignore[arg-type]
    )
