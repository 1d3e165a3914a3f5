"""The evaluate job's running aggregates (migration 0014): what it once recomputed from every
scored forecast of its window, kept per day (calibration_days, accuracy_days), per target
time (fleet_times) and per judged point that may matter again (anomaly_points).

A run reads the window's aggregates before it writes (its own connection, as every read of
the store), adds what its new actuals bring, and writes the sums in its transaction with the
tracking that says those actuals are counted: a rerun finds nothing new and adds nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from forecaster import schema as s
from forecaster.store.base import Bulk, PgTemp, StoreBase

if TYPE_CHECKING:
    import polars as pl

_RAW = sa.types.NullType()


class AggregateStore(StoreBase):
    # -- calibration_days ---------------------------------------------------------------

    def calibration_days(self, model: str, since: datetime) -> list[dict[str, Any]]:
        """The model's calibration_days rows from day `since` on (day, horizon_step, n,
        inside, inside_raw, scores: the packed histogram)."""
        c = s.calibration_days
        q = sa.select(
            c.c.day, c.c.horizon_step, c.c.n, c.c.inside, c.c.inside_raw, c.c.scores
        ).where(c.c.model == model, c.c.day >= since)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def save_calibration_days(
        self, conn: Connection, model: str, rows: Sequence[Mapping[str, Any]], before: datetime
    ) -> None:
        """Upsert the model's (day, horizon_step) rows (their totals) and drop its days
        before `before`."""
        c = s.calibration_days
        conn.execute(sa.delete(c).where(c.c.model == model, c.c.day < before))
        if rows:
            stmt = self._upsert(c, ("n", "inside", "inside_raw", "scores"))
            conn.execute(stmt, [{**r, "model": model} for r in rows])

    # -- accuracy_days ------------------------------------------------------------------

    def accuracy_sums(
        self, since: datetime, models: Sequence[str], *, first_day: bool = False
    ) -> pl.DataFrame:
        """Per series and model (of `models`), the sums of accuracy_days from day `since` on:
        series_id, model, n, abs_err, naive_abs_err, inside, n_points; with `first_day`,
        also `first`, the first of those days with scored forecasts (n > 0).

        The float sums run over each series' days in day order, so that equal rows give
        equal sums whatever order they were written in (a run and its redo after an
        outage): PostgreSQL is told so (an ordered aggregate); SQLite groups by walking the
        primary key (series_id, model, day), which is that order."""
        import polars as pl

        from forecaster.frames import TS_DTYPE

        a = s.accuracy_days

        def total(col: str) -> Any:
            if self.dialect == "postgresql" and col in ("abs_err", "naive_abs_err"):
                from sqlalchemy.dialects.postgresql import aggregate_order_by

                return sa.func.sum(aggregate_order_by(a.c[col], a.c.day)).label(col)
            return sa.func.sum(a.c[col]).label(col)

        cols = ("n", "abs_err", "naive_abs_err", "inside", "n_points")
        extra = []
        if first_day:
            first = sa.func.min(sa.case((a.c.n > 0, a.c.day), else_=None))
            extra.append(sa.type_coerce(first, _RAW).label("first"))
        q = (
            sa.select(a.c.series_id, a.c.model, *(total(c) for c in cols), *extra)
            .where(a.c.day >= since, a.c.model.in_(list(models)))
            .group_by(a.c.series_id, a.c.model)
        )
        schema = {
            "series_id": pl.Int64,
            "model": pl.String,
            "n": pl.Int64,
            "abs_err": pl.Float64,
            "naive_abs_err": pl.Float64,
            "inside": pl.Int64,
            "n_points": pl.Int64,
        }
        return self._frame(q, {**schema, **({"first": TS_DTYPE} if first_day else {})})

    def judged_per_day(self, model: str, since: datetime) -> pl.DataFrame:
        """The model's judged points per series and day (accuracy_days.n_points) from day
        `since` on: series_id, day, n_points."""
        import polars as pl

        from forecaster.frames import TS_DTYPE

        a = s.accuracy_days
        q = sa.select(a.c.series_id, sa.type_coerce(a.c.day, _RAW), a.c.n_points).where(
            a.c.model == model, a.c.day >= since, a.c.n_points > 0
        )
        return self._frame(q, {"series_id": pl.Int64, "day": TS_DTYPE, "n_points": pl.Int64})

    def add_accuracy_days(self, conn: Connection, frame: pl.DataFrame, before: datetime) -> None:
        """Add `frame`'s sums (series_id, model, day, n, abs_err, naive_abs_err, inside,
        n_points) to the stored rows, in bulk, and drop days before `before`."""
        a = s.accuracy_days
        conn.execute(sa.delete(a).where(a.c.day < before))
        if frame.is_empty():
            return
        self._bulk_upsert_frame(conn, _ACCURACY_DAYS, frame.select(_ACCURACY_DAYS.columns))

    # -- fleet_times --------------------------------------------------------------------

    def fleet_times(self, model: str, since: datetime) -> pl.DataFrame:
        """The model's fleet_times from `since` on: ts, n_series, n_low, n_high."""
        import polars as pl

        from forecaster.frames import TS_DTYPE

        f = s.fleet_times
        q = sa.select(sa.type_coerce(f.c.ts, _RAW), f.c.n_series, f.c.n_low, f.c.n_high).where(
            f.c.model == model, f.c.ts >= since
        )
        return self._frame(
            q, {"ts": TS_DTYPE, "n_series": pl.Int64, "n_low": pl.Int64, "n_high": pl.Int64}
        )

    def add_fleet_times(
        self, conn: Connection, model: str, frame: pl.DataFrame, before: datetime
    ) -> None:
        """Add `frame`'s counts (ts, n_series, n_low, n_high) to the model's stored ones and
        drop its times before `before`."""
        f = s.fleet_times
        conn.execute(sa.delete(f).where(f.c.model == model, f.c.ts < before))
        if frame.is_empty():
            return
        stmt = self._insert(f)
        stmt = stmt.on_conflict_do_update(
            index_elements=["model", "ts"],
            set_={c: f.c[c] + stmt.excluded[c] for c in ("n_series", "n_low", "n_high")},
        )
        conn.execute(stmt, [{**r, "model": model} for r in frame.iter_rows(named=True)])

    # -- anomaly_points -----------------------------------------------------------------

    def anomaly_points(
        self,
        model: str,
        since: datetime,
        *,
        min_evidence: float | None = None,
        beyond: float | None = None,
    ) -> pl.DataFrame:
        """The model's stored judged points after `since` (series_id, ts, deviation,
        evidence), with evidence of at least `min_evidence` if given, and a deviation
        beyond +-`beyond` if given."""
        import polars as pl

        from forecaster.frames import TS_DTYPE

        p = s.anomaly_points
        q = sa.select(
            p.c.series_id, sa.type_coerce(p.c.ts, _RAW), p.c.deviation, p.c.evidence
        ).where(p.c.model == model, p.c.ts > since)
        if min_evidence is not None:
            q = q.where(p.c.evidence >= min_evidence)
        if beyond is not None:
            q = q.where(sa.or_(p.c.deviation > beyond, p.c.deviation < -beyond))
        return self._frame(
            q,
            {
                "series_id": pl.Int64,
                "ts": TS_DTYPE,
                "deviation": pl.Float64,
                "evidence": pl.Float64,
            },
        )

    def save_anomaly_points(
        self,
        conn: Connection,
        model: str,
        frame: pl.DataFrame,
        *,
        before: datetime,
        edges_before: datetime,
        min_evidence: float,
    ) -> None:
        """Store judged points (series_id, ts, deviation, evidence); drop the model's points
        before `before`, and those before `edges_before` with less than `min_evidence`."""
        p = s.anomaly_points
        conn.execute(sa.delete(p).where(p.c.model == model, p.c.ts < before))
        conn.execute(
            sa.delete(p).where(
                p.c.model == model, p.c.ts < edges_before, p.c.evidence < min_evidence
            )
        )
        if frame.is_empty():
            return
        import polars as pl

        rows = frame.select(pl.lit(model).alias("model"), *_POINTS.columns[1:])
        self._bulk_upsert_frame(conn, _POINTS, rows)


_ACCURACY_DAYS = Bulk(
    table="accuracy_days",
    columns=tuple(c.name for c in s.accuracy_days.columns),
    key=("series_id", "model", "day"),
    timestamps=("day",),
    pg=PgTemp(
        create="CREATE TEMP TABLE IF NOT EXISTS _accuracy_days_in (series_id integer, "
        "model text, day timestamptz, n bigint, abs_err double precision, "
        "naive_abs_err double precision, inside bigint, n_points bigint) ON COMMIT DROP",
        truncate="TRUNCATE _accuracy_days_in",
        copy="COPY _accuracy_days_in (series_id, model, day, n, abs_err, naive_abs_err, "
        "inside, n_points) FROM STDIN",
    ),
    pg_upsert="INSERT INTO accuracy_days (series_id, model, day, n, abs_err, naive_abs_err, "
    "inside, n_points) SELECT series_id, model, day, n, abs_err, naive_abs_err, inside, "
    "n_points FROM _accuracy_days_in ON CONFLICT (series_id, model, day) DO UPDATE SET "
    "n = accuracy_days.n + excluded.n, abs_err = accuracy_days.abs_err + excluded.abs_err, "
    "naive_abs_err = accuracy_days.naive_abs_err + excluded.naive_abs_err, "
    "inside = accuracy_days.inside + excluded.inside, "
    "n_points = accuracy_days.n_points + excluded.n_points",
    sqlite_upsert="INSERT INTO accuracy_days (series_id, model, day, n, abs_err, "
    "naive_abs_err, inside, n_points) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (series_id, model, day) DO UPDATE SET "
    "n = accuracy_days.n + excluded.n, abs_err = accuracy_days.abs_err + excluded.abs_err, "
    "naive_abs_err = accuracy_days.naive_abs_err + excluded.naive_abs_err, "
    "inside = accuracy_days.inside + excluded.inside, "
    "n_points = accuracy_days.n_points + excluded.n_points",
)

_POINTS = Bulk(
    table="anomaly_points",
    columns=("model", "series_id", "ts", "deviation", "evidence"),
    key=("model", "series_id", "ts"),
    timestamps=("ts",),
    pg=PgTemp(
        create="CREATE TEMP TABLE IF NOT EXISTS _anomaly_points_in (model text, "
        "series_id integer, ts timestamptz, deviation double precision, "
        "evidence double precision) ON COMMIT DROP",
        truncate="TRUNCATE _anomaly_points_in",
        copy="COPY _anomaly_points_in (model, series_id, ts, deviation, evidence) FROM STDIN",
    ),
    pg_upsert="INSERT INTO anomaly_points (model, series_id, ts, deviation, evidence) "
    "SELECT model, series_id, ts, deviation, evidence FROM _anomaly_points_in "
    "ON CONFLICT (model, series_id, ts) DO UPDATE SET deviation = excluded.deviation, "
    "evidence = excluded.evidence",
)
