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
        actual."""
        import polars as pl

        from forecaster.frames import TS_DTYPE

        f, o = s.forecasts, s.observations
        raw = sa.types.NullType()  # no per-value result processing: the frame converts columns
        q = (
            sa.select(
                f.c.series_id,
                sa.type_coerce(f.c.origin_ts, raw).label("origin_ts"),
                sa.type_coerce(f.c.target_ts, raw).label("target_ts"),
                f.c.horizon_step,
                f.c.yhat,
                f.c.yhat_lower,
                f.c.yhat_upper,
                f.c.raw_lower,
                f.c.raw_upper,
                f.c.interval_level,
                o.c.value.label("actual"),
            )
            .join(o, sa.and_(o.c.series_id == f.c.series_id, o.c.ts == f.c.target_ts))
            .where(
                f.c.model == model,
                f.c.superseded.is_(False),
                f.c.target_ts >= since,
                o.c.quality == "observed",
                o.c.value.is_not(None),
            )
        )
        if series_ids is not None:
            q = q.where(f.c.series_id.in_(sorted(series_ids)))
        schema_ = {
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
            "actual": pl.Float64,
        }
        return self._frame(q, schema_)

    def series_ends(self) -> pl.DataFrame:
        """series_id and `end`, the newest point stored, of every series with one."""
        import polars as pl

        from forecaster.frames import TS_DTYPE

        w = s.watermarks
        raw = sa.types.NullType()
        q = sa.select(w.c.series_id, sa.type_coerce(w.c.ts, raw).label("end"))
        return self._frame(q, {"series_id": pl.Int64, "end": TS_DTYPE})

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
        if not tracked.is_empty():
            stmt = self._upsert(s.calibration_tracking, ("tracked_until",))
            conn.execute(
                stmt,
                [
                    {"model": model, "series_id": sid, "tracked_until": until}
                    for sid, until in tracked.select("series_id", "tracked_until").rows()
                ],
            )

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

    def save_series_accuracy(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Upsert rolling accuracy rows (series_id, model, n_scored, mae, mase, coverage,
        window_start, window_end); a series scored no more keeps its last row."""
        if not rows:
            return
        stmt = self._upsert(
            s.series_accuracy,
            ("n_scored", "mae", "mase", "coverage", "window_start", "window_end", "updated_at"),
        )
        now = datetime.now(UTC)
        conn.execute(stmt, [{**r, "updated_at": now} for r in rows])

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
