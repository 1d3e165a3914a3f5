"""Series, observations, windows, watermarks, quarantine and source cursors."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection

from forecaster import schema as s
from forecaster.store.base import (
    _SQLITE_TS_FORMAT,
    PgTemp,
    StoreBase,
    _fingerprint,
    _obs_raw,
    _utc,
    pg_copy_new,
    pg_copy_temp,
    sqlite_qmark,
)

if TYPE_CHECKING:  # polars is imported where frames are built (see forecaster.store)
    import polars as pl


# PostgreSQL bulk writes (forecaster.store.base.pg_copy_temp): the temp tables COPYed into.
_PG_OBS_IN = PgTemp(
    create="CREATE TEMP TABLE IF NOT EXISTS _obs_in (series_id integer, ts timestamptz, "
    "value double precision, quality text, window_id bigint) ON COMMIT DROP",
    truncate="TRUNCATE _obs_in",
    copy="COPY _obs_in (series_id, ts, value, quality, window_id) FROM STDIN (FORMAT csv)",
)
# Points with new keys (after their series' watermark): straight into the table.
_PG_OBS_COPY = (
    "COPY observations (series_id, ts, value, quality, window_id) FROM STDIN (FORMAT csv)"
)
_PG_MARKS_IN = PgTemp(
    create="CREATE TEMP TABLE IF NOT EXISTS _marks_in (series_id integer, ts timestamptz, "
    "last_value double precision) ON COMMIT DROP",
    truncate="TRUNCATE _marks_in",
    copy="COPY _marks_in (series_id, ts, last_value) FROM STDIN (FORMAT csv)",
)
_PG_WINDOWS_IN = PgTemp(
    create="CREATE TEMP TABLE IF NOT EXISTS _windows_in (series_id integer, window_id bigint, "
    "start_ts timestamptz, end_ts timestamptz, last_slot timestamptz) ON COMMIT DROP",
    truncate="TRUNCATE _windows_in",
    copy="COPY _windows_in (series_id, window_id, start_ts, end_ts, last_slot) "
    "FROM STDIN (FORMAT csv)",
)
# PostgreSQL: the touched windows (from _pg_refresh_windows' temp table) recounted and
# upserted in one statement; a window with no stored point gets no row, as on SQLite.
_PG_WINDOWS_UPSERT_SQL = (
    "INSERT INTO windows (series_id, window_id, start_ts, end_ts, n_expected, n_points, "
    "n_observed, complete, updated_at) "
    "SELECT t.series_id, t.window_id, t.start_ts, t.end_ts, %(n_expected)s, c.n_points, "
    "c.n_observed, w.ts >= t.last_slot, %(now)s "
    "FROM _windows_in t JOIN watermarks w ON w.series_id = t.series_id "
    "CROSS JOIN LATERAL (SELECT count(*) AS n_points, "
    "count(*) FILTER (WHERE o.quality = 'observed') AS n_observed FROM observations o "
    "WHERE o.series_id = t.series_id AND o.ts >= t.start_ts AND o.ts < t.end_ts) c "
    "WHERE c.n_points > 0 "
    "ON CONFLICT (series_id, window_id) DO UPDATE SET n_points = excluded.n_points, "
    "n_observed = excluded.n_observed, complete = excluded.complete, "
    "updated_at = excluded.updated_at"
)


class IngestStore(StoreBase):
    # -- series and watermarks -----------------------------------------------------------

    def resolve_series(
        self,
        conn: Connection,
        names: Sequence[str],
        *,
        create: bool,
        source: str,
        freq_seconds: int,
        window_seconds: int,
    ) -> dict[str, int]:
        """Map series names to ids, creating the missing ones when `create`."""
        names = sorted(set(names))
        if not names:
            return {}
        found = self._series_ids(conn, names)
        missing = [n for n in names if n not in found]
        if missing and create:
            now = datetime.now(UTC)
            stmt = self._insert(s.series).on_conflict_do_nothing(index_elements=["name"])
            conn.execute(
                stmt,
                [
                    {
                        "name": n,
                        "source": source,
                        "freq_seconds": freq_seconds,
                        "window_seconds": window_seconds,
                        "labels": {},
                        "created_at": now,
                    }
                    for n in missing
                ],
            )
            found.update(self._series_ids(conn, missing))
        return found

    def _series_ids(self, conn: Connection, names: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in range(0, len(names), 500):
            chunk = list(names[i : i + 500])
            rows = conn.execute(
                sa.select(s.series.c.name, s.series.c.id).where(s.series.c.name.in_(chunk))
            )
            out.update({name: sid for name, sid in rows})
        return out

    def watermarks_frame(self, conn: Connection, series_ids: Sequence[int]) -> pl.DataFrame:
        """series_id, prev_ts, prev_value of the given series (absent when none stored)."""
        import polars as pl

        from forecaster.frames import TS_DTYPE

        rows: list[tuple[int, datetime, float | None]] = []
        ids = sorted(set(series_ids))
        for i in range(0, len(ids), 500):
            q = sa.select(
                s.watermarks.c.series_id, s.watermarks.c.ts, s.watermarks.c.last_value
            ).where(s.watermarks.c.series_id.in_(ids[i : i + 500]))
            rows.extend(conn.execute(q))
        return pl.DataFrame(
            rows,
            schema={"series_id": pl.Int64, "prev_ts": TS_DTYPE, "prev_value": pl.Float64},
            orient="row",
        )

    def upsert_watermarks(self, conn: Connection, marks: pl.DataFrame) -> None:
        """marks: series_id, ts, last_value. Only ever moves a watermark forward."""
        if marks.is_empty():
            return
        now = datetime.now(UTC)
        if self.dialect == "postgresql":  # 10,000 series a batch: COPY, then one statement
            pg_copy_temp(conn, marks.select("series_id", "ts", "last_value"), _PG_MARKS_IN)
            conn.exec_driver_sql(
                "INSERT INTO watermarks (series_id, ts, last_value, updated_at) "
                "SELECT series_id, ts, last_value, %(now)s FROM _marks_in "
                "ON CONFLICT (series_id) DO UPDATE SET ts = excluded.ts, "
                "last_value = excluded.last_value, updated_at = excluded.updated_at "
                "WHERE excluded.ts > watermarks.ts",
                {"now": now},
            )
            return
        stmt = self._insert(s.watermarks)
        stmt = stmt.on_conflict_do_update(
            index_elements=["series_id"],
            set_={
                "ts": stmt.excluded.ts,
                "last_value": stmt.excluded.last_value,
                "updated_at": stmt.excluded.updated_at,
            },
            where=stmt.excluded.ts > s.watermarks.c.ts,
        )
        conn.execute(
            stmt,
            [
                {**r, "updated_at": now}
                for r in marks.select("series_id", "ts", "last_value").to_dicts()
            ],
        )

    def late_changes(self, conn: Connection, points: pl.DataFrame) -> pl.DataFrame:
        """Of `points` (series_id, ts, value, quality; at or before their series' watermark),
        the ones whose upsert will change what is stored: a new point, an observed value
        over a filled one, or a different observed value. A source that re-sends what it
        sent before changes nothing and marks nothing late."""
        import polars as pl

        from forecaster.frames import TS_DTYPE

        empty = pl.DataFrame(schema={"series_id": pl.Int64, "ts": TS_DTYPE})
        if points.is_empty():
            return empty
        o = s.observations
        stored: list[tuple[Any, ...]] = []
        spans = points.group_by("series_id").agg(
            pl.col("ts").min().alias("lo"), pl.col("ts").max().alias("hi")
        )
        for sid, lo, hi in spans.rows():
            q = sa.select(o.c.series_id, o.c.ts, o.c.value, o.c.quality).where(
                o.c.series_id == sid, o.c.ts.between(lo, hi)
            )
            stored.extend(conn.execute(q))
        before = pl.DataFrame(
            stored,
            schema={
                "series_id": pl.Int64,
                "ts": TS_DTYPE,
                "old_value": pl.Float64,
                "old_quality": pl.Utf8,
            },
            orient="row",
        )
        joined = points.select("series_id", "ts", "value", "quality").join(
            before, on=["series_id", "ts"], how="left"
        )
        observed = pl.col("quality") == "observed"
        changed = (
            pl.col("old_quality").is_null()
            | (observed & (pl.col("old_quality") != "observed"))
            | (observed & pl.col("value").ne_missing(pl.col("old_value")))
        )
        return joined.filter(changed).select("series_id", "ts")

    def mark_late(self, conn: Connection, marks: pl.DataFrame) -> None:
        """marks: series_id, late_from. Moves each series' late mark back to late_from (never
        forward) and bumps its late_seq, in the batch's transaction."""
        if marks.is_empty():
            return
        w = s.watermarks
        ts = sa.bindparam("late_ts", type_=s.UTCDateTime)
        conn.execute(
            sa.update(w)
            .where(w.c.series_id == sa.bindparam("sid"))
            .values(
                late_from=sa.case(
                    (sa.or_(w.c.late_from.is_(None), w.c.late_from > ts), ts),
                    else_=w.c.late_from,
                ),
                late_seq=w.c.late_seq + 1,
            ),
            [
                {"sid": sid, "late_ts": ts_}
                for sid, ts_ in marks.select("series_id", "late_from").rows()
            ],
        )

    # -- observations and windows --------------------------------------------------------

    def upsert_observations(
        self, conn: Connection, points: pl.DataFrame, *, after: pl.DataFrame | None = None
    ) -> int:
        """points: series_id, ts (UTC), value, quality, window_id; keys unique.

        An observed value replaces a filled one; a filled value never replaces an observed one.
        `after` (series_id, prev_ts: each series' newest stored point, the watermark): the
        points after it are new keys, which PostgreSQL takes by a COPY straight into the table
        (an upsert through a temp table costs a third more); should one be stored after all
        (a writer beside this one), they go the upsert's way too."""
        import polars as pl

        if points.is_empty():
            return 0
        points = points.select("series_id", "ts", "value", "quality", "window_id")
        if self.dialect == "postgresql":
            total = points.height
            if after is not None:
                new = (
                    points.join(
                        after.select("series_id", "prev_ts"),
                        on="series_id",
                        how="left",
                        maintain_order="left",
                    )
                    .select(pl.col("prev_ts").is_null() | (pl.col("ts") > pl.col("prev_ts")))
                    .to_series()
                )
                fresh, points = points.filter(new), points.filter(~new)
                if not fresh.is_empty() and not pg_copy_new(conn, fresh, _PG_OBS_COPY):
                    points = pl.concat([points, fresh])
            if not points.is_empty():
                self._copy_upsert_observations(conn, points)
            return total
        rows = points.with_columns(pl.col("ts").dt.to_string(_SQLITE_TS_FORMAT)).rows()
        # The Core statement, compiled once, goes straight to the driver's executemany:
        # SQLAlchemy's per-row parameter handling would cost more than SQLite's insert.
        conn.exec_driver_sql(_sqlite_obs_upsert_sql(), rows)
        return points.height

    def _copy_upsert_observations(self, conn: Connection, points: pl.DataFrame) -> None:
        pg_copy_temp(conn, points, _PG_OBS_IN)
        conn.exec_driver_sql(
            "INSERT INTO observations (series_id, ts, value, quality, window_id) "
            "SELECT series_id, ts, value, quality, window_id FROM _obs_in "
            "ON CONFLICT (series_id, ts) DO UPDATE SET value = excluded.value, "
            "quality = excluded.quality, window_id = excluded.window_id "
            "WHERE excluded.quality = 'observed' OR observations.quality <> 'observed'"
        )

    def refresh_windows(
        self, conn: Connection, touched: pl.DataFrame, *, freq_seconds: int, window_seconds: int
    ) -> int:
        """Recount the windows in `touched` (series_id, window_id) from the stored points.

        A window is complete once its series' watermark reaches the window's last slot."""
        import polars as pl

        if touched.is_empty():
            return 0
        touched = touched.select("series_id", "window_id").unique()
        if self.dialect == "postgresql":
            return self._pg_refresh_windows(conn, touched, freq_seconds, window_seconds)
        ranges = touched.group_by("series_id").agg(
            pl.col("window_id").min().alias("lo"), pl.col("window_id").max().alias("hi")
        )
        o, w = s.observations, s.watermarks
        counts: list[tuple[Any, ...]] = []
        # Series that share a range of windows (a batch usually brings the same span for
        # every series) are recounted together: their ids in chunks, and the windows as a
        # range of the primary key's ts, so each series is an index range scan (an OR of a
        # term per series took PostgreSQL 30 s for 10,000 series).
        for (lo, hi), group in ranges.group_by("lo", "hi"):
            first = datetime.fromtimestamp(lo * window_seconds, UTC)
            after = datetime.fromtimestamp((hi + 1) * window_seconds, UTC)
            ids = sorted(group["series_id"].to_list())
            for i in range(0, len(ids), 500):
                q = (
                    sa.select(
                        o.c.series_id,
                        o.c.window_id,
                        sa.func.count(),
                        sa.func.sum(sa.case((o.c.quality == "observed", 1), else_=0)),
                        w.c.ts,
                    )
                    .join(w, w.c.series_id == o.c.series_id)
                    .where(o.c.series_id.in_(ids[i : i + 500]), o.c.ts >= first, o.c.ts < after)
                    .group_by(o.c.series_id, o.c.window_id, w.c.ts)
                )
                counts.extend(conn.execute(q))
        wanted = set(touched.rows())
        now = datetime.now(UTC)
        n_expected = window_seconds // freq_seconds
        rows = []
        for sid, wid, n_points, n_observed, mark in counts:
            if (sid, wid) not in wanted:
                continue
            start = datetime.fromtimestamp(wid * window_seconds, UTC)
            end = datetime.fromtimestamp((wid + 1) * window_seconds, UTC)
            last_slot = datetime.fromtimestamp((wid + 1) * window_seconds - freq_seconds, UTC)
            rows.append(
                {
                    "series_id": sid,
                    "window_id": wid,
                    "start_ts": start,
                    "end_ts": end,
                    "n_expected": n_expected,
                    "n_points": n_points,
                    "n_observed": int(n_observed or 0),
                    "complete": _utc(mark) >= last_slot,
                    "updated_at": now,
                }
            )
        if rows:
            stmt = self._upsert(s.windows, ("n_points", "n_observed", "complete", "updated_at"))
            conn.execute(stmt, rows)
        return len(rows)

    def _pg_refresh_windows(
        self, conn: Connection, touched: pl.DataFrame, freq_seconds: int, window_seconds: int
    ) -> int:
        """refresh_windows on PostgreSQL: the touched windows COPYed in, then counted and
        upserted by one statement on the server, each window a primary-key range scan of
        its series' points (LATERAL: the planner would otherwise merge-join the whole key)."""
        import polars as pl

        from forecaster.frames import TS_DTYPE

        start_us = pl.col("window_id") * (window_seconds * 1_000_000)
        span_us = window_seconds * 1_000_000
        pg_copy_temp(
            conn,
            touched.select(
                "series_id",
                "window_id",
                start_us.cast(TS_DTYPE).alias("start_ts"),
                (start_us + span_us).cast(TS_DTYPE).alias("end_ts"),
                (start_us + span_us - freq_seconds * 1_000_000).cast(TS_DTYPE).alias("last_slot"),
            ),
            _PG_WINDOWS_IN,
        )
        return conn.exec_driver_sql(
            _PG_WINDOWS_UPSERT_SQL,
            {"n_expected": window_seconds // freq_seconds, "now": datetime.now(UTC)},
        ).rowcount

    # -- quarantine and source cursors ---------------------------------------------------

    def insert_quarantine(self, conn: Connection, source: str, bad: pl.DataFrame) -> int:
        """bad: series, ts_raw, value_raw, origin, reason, detail. Returns rows newly stored;
        a row quarantined before (same fingerprint) is not stored twice."""
        import polars as pl

        if bad.is_empty():
            return 0
        now = datetime.now(UTC)
        rows = []
        # PostgreSQL text cannot hold NUL: one in a raw field would fail the whole batch, so
        # it is kept visible as U+FFFD (as the file source shows bytes it cannot decode).
        text = ("series", "ts_raw", "value_raw", "origin", "reason", "detail")
        for r in bad.select(
            pl.col(text).cast(pl.Utf8).str.replace_all("\x00", "\ufffd", literal=True)
        ).to_dicts():
            rows.append(
                {**r, "source": source, "fingerprint": _fingerprint(source, r), "created_at": now}
            )
        stmt = (
            self._insert(s.quarantine)
            .on_conflict_do_nothing(index_elements=["fingerprint"])
            .returning(s.quarantine.c.id)
        )
        return len(conn.execute(stmt, rows).all())

    def get_cursor(self, source: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(s.source_cursors.c.cursor).where(s.source_cursors.c.source == source)
            ).first()
        return None if row is None else dict(row[0])

    def save_cursor(
        self, conn: Connection, source: str, cursor: Mapping[str, Any], rows_added: int
    ) -> None:
        stmt = self._insert(s.source_cursors)
        stmt = stmt.on_conflict_do_update(
            index_elements=["source"],
            set_={
                "cursor": stmt.excluded.cursor,
                "rows_total": s.source_cursors.c.rows_total + stmt.excluded.rows_total,
                "updated_at": stmt.excluded.updated_at,
            },
        )
        conn.execute(
            stmt,
            {
                "source": source,
                "cursor": dict(cursor),
                "rows_total": rows_added,
                "updated_at": datetime.now(UTC),
            },
        )

    # -- reads for the CLI and later jobs ------------------------------------------------

    def list_series(self) -> list[dict[str, Any]]:
        o, se, w = s.observations, s.series, s.watermarks
        counts = (
            sa.select(
                o.c.series_id,
                sa.func.count().label("points"),
                sa.func.sum(sa.case((o.c.quality == "observed", 1), else_=0)).label("observed"),
                sa.func.min(o.c.ts).label("first_ts"),
            )
            .group_by(o.c.series_id)
            .subquery()
        )
        q = (
            sa.select(
                se.c.name,
                se.c.source,
                se.c.freq_seconds,
                sa.func.coalesce(counts.c.points, 0).label("points"),
                sa.func.coalesce(counts.c.observed, 0).label("observed"),
                counts.c.first_ts,
                w.c.ts.label("watermark"),
            )
            .select_from(
                se.outerjoin(counts, counts.c.series_id == se.c.id).outerjoin(
                    w, w.c.series_id == se.c.id
                )
            )
            .order_by(se.c.name)
        )
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
        for r in rows:  # min() over a SQLite text column comes back as text
            if isinstance(r["first_ts"], str):
                r["first_ts"] = _utc(datetime.fromisoformat(r["first_ts"]))
        return rows

    def list_quarantine(
        self, *, source: str | None = None, reason: str | None = None, limit: int = 50
    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Newest quarantined rows (filtered) and the count per reason (same filter)."""
        q = s.quarantine
        conds = [
            c
            for c in (
                q.c.source == source if source else None,
                q.c.reason == reason if reason else None,
            )
            if c is not None
        ]
        rows_q = sa.select(q).where(*conds).order_by(q.c.id.desc()).limit(limit)
        counts_q = sa.select(q.c.reason, sa.func.count()).where(*conds).group_by(q.c.reason)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(rows_q)]
            counts = {reason_: n for reason_, n in conn.execute(counts_q)}
        return rows, counts

    def table_counts(self) -> dict[str, int]:
        out = {}
        with self.engine.connect() as conn:
            for t in (
                s.series,
                s.observations,
                s.windows,
                s.watermarks,
                s.quarantine,
                s.source_cursors,
            ):
                out[t.name] = conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
        return out

    def read_observations(
        self,
        series_name: str | None = None,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> pl.DataFrame:
        """series, ts, value, quality, window_id, sorted; all series when no name is given;
        only points with since <= ts <= until when those are given."""
        import polars as pl

        from forecaster.frames import TS_DTYPE

        o, se = s.observations, s.series
        q = sa.select(
            se.c.name.label("series"), o.c.ts, o.c.value, o.c.quality, o.c.window_id
        ).join(se, se.c.id == o.c.series_id)
        if series_name is not None:
            q = q.where(se.c.name == series_name)
        if since is not None:
            q = q.where(o.c.ts >= since)
        if until is not None:
            q = q.where(o.c.ts <= until)
        q = q.order_by(se.c.name, o.c.ts)
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return pl.DataFrame(
            rows,
            schema={
                "series": pl.Utf8,
                "ts": TS_DTYPE,
                "value": pl.Float64,
                "quality": pl.Utf8,
                "window_id": pl.Int64,
            },
            orient="row",
        )


_OBS_KEYS = ("series_id", "ts", "value", "quality", "window_id")


@functools.cache
def _sqlite_obs_upsert_sql() -> str:
    """INSERT ... ON CONFLICT DO UPDATE for observations, as SQLite text with ? parameters in
    _OBS_KEYS order. An observed value replaces a filled one, never the reverse."""
    stmt = sqlite_dialect.insert(_obs_raw).values({k: sa.bindparam(k) for k in _OBS_KEYS})
    observed = sa.literal_column("'observed'")
    stmt = stmt.on_conflict_do_update(
        index_elements=["series_id", "ts"],
        set_={k: stmt.excluded[k] for k in ("value", "quality", "window_id")},
        where=(stmt.excluded.quality == observed) | (_obs_raw.c.quality != observed),
    )
    return sqlite_qmark(stmt, _OBS_KEYS)
