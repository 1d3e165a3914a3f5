"""The SQL store: the only module that runs SQL against our database.

One write path per dialect for the bulk tables (DESIGN.md decisions 5 and 6):
- SQLite: Core `insert().on_conflict_do_update` executemany, timestamps normalised to naive
  UTC text before binding (SQLite has no time zones).
- PostgreSQL: psycopg 3 COPY into a temp table, then INSERT ... SELECT ... ON CONFLICT in
  the same transaction. Keys are de-duplicated before they get here (forecaster.frames).
Every statement binds its values; no value is ever formatted into SQL text.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine

from forecaster import schema as s
from forecaster.errors import SchemaOutOfDateError, StoreError, UnknownModelVersionError
from forecaster.frames import TS_DTYPE

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_SQLITE_TS_FORMAT = "%Y-%m-%d %H:%M:%S%.6f"  # what SQLAlchemy's SQLite DateTime stores
# Transaction-scoped PostgreSQL advisory lock that serialises promotions (any fixed bigint).
_PROMOTE_LOCK_KEY = 0x666F7265_63617374  # "forecast"

# Untyped twins of the bulk tables: the SQLite fast path binds pre-formatted values, so
# SQLAlchemy must not run its per-value processors on them.
_obs_raw = sa.table(
    "observations", *(sa.column(c) for c in ("series_id", "ts", "value", "quality", "window_id"))
)


def normalise_url(url: str) -> str:
    """postgresql:// and postgres:// mean psycopg 3 here (psycopg2 is not a dependency)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers (a dashboard, `series list`) run while an ingest writes.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def create_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = sa.create_engine(url)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.startswith("postgresql"):
        return sa.create_engine(url, pool_pre_ping=True)
    raise StoreError(
        f"unsupported database URL {url.split(':', 1)[0]!r}: use sqlite:///PATH or "
        "postgresql://USER@HOST/DB"
    )


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _fingerprint(source: str, row: Mapping[str, Any]) -> str:
    key = json.dumps(
        [source, row["origin"], row["reason"], row["series"], row["ts_raw"], row["value_raw"]]
    )
    return hashlib.sha256(key.encode()).hexdigest()


class Store:
    """Owns the engine. Reads open their own connection; writes take the connection of the
    caller's transaction (`with store.begin() as conn:`) so a job commits all or nothing."""

    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        self.engine = create_engine(self.url)
        self.dialect = self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except sa.exc.OperationalError as exc:
            raise StoreError(f"database error: {exc.orig}") from exc

    def _insert(self, table: sa.TableClause) -> Any:
        return (pg.insert if self.dialect == "postgresql" else sqlite_dialect.insert)(table)

    def _upsert(self, table: sa.Table, update: Sequence[str]) -> Any:
        """INSERT that, on a primary-key conflict, takes the new row's `update` columns."""
        stmt = self._insert(table)
        return stmt.on_conflict_do_update(
            index_elements=[c.name for c in table.primary_key.columns],
            set_={k: stmt.excluded[k] for k in update},
        )

    # -- migrations ---------------------------------------------------------------------

    def _alembic_config(self, conn: Connection | None = None) -> Any:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        cfg.attributes["connection"] = conn
        return cfg

    def head_revision(self) -> str:
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(self._alembic_config()).get_current_head()
        assert head is not None, "the migrations folder has no revision"
        return head

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def upgrade(self, revision: str = "head") -> None:
        from alembic import command

        with self.engine.begin() as conn:
            command.upgrade(self._alembic_config(conn), revision)

    def downgrade(self, revision: str) -> None:
        from alembic import command

        with self.engine.begin() as conn:
            command.downgrade(self._alembic_config(conn), revision)

    def check_schema(self) -> None:
        """Raise SchemaOutOfDateError unless the database is at the migrations' head."""
        try:
            current = self.current_revision()
        except sa.exc.OperationalError as exc:
            raise StoreError(f"cannot reach the database: {exc.orig}") from exc
        head = self.head_revision()
        if current != head:
            raise SchemaOutOfDateError(current, head)

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
        now = datetime.now(UTC)
        conn.execute(
            stmt,
            [
                {**r, "updated_at": now}
                for r in marks.select("series_id", "ts", "last_value").to_dicts()
            ],
        )

    # -- observations and windows --------------------------------------------------------

    def upsert_observations(self, conn: Connection, points: pl.DataFrame) -> int:
        """points: series_id, ts (UTC), value, quality, window_id; keys unique.

        An observed value replaces a filled one; a filled value never replaces an observed one."""
        if points.is_empty():
            return 0
        points = points.select("series_id", "ts", "value", "quality", "window_id")
        if self.dialect == "postgresql":
            self._copy_upsert_observations(conn, points)
        else:
            rows = points.with_columns(pl.col("ts").dt.to_string(_SQLITE_TS_FORMAT)).rows()
            # The Core statement, compiled once, goes straight to the driver's executemany:
            # SQLAlchemy's per-row parameter handling would cost more than SQLite's insert.
            conn.exec_driver_sql(_sqlite_obs_upsert_sql(), rows)
        return points.height

    def _copy_upsert_observations(self, conn: Connection, points: pl.DataFrame) -> None:
        buf = io.BytesIO()
        points.write_csv(
            buf, include_header=False, datetime_format="%Y-%m-%d %H:%M:%S%.6f+00:00", null_value=""
        )
        dbapi = conn.connection.driver_connection
        conn.exec_driver_sql(
            "CREATE TEMP TABLE IF NOT EXISTS _obs_in (series_id integer, ts timestamptz, "
            "value double precision, quality text, window_id bigint) ON COMMIT DROP"
        )
        with dbapi.cursor() as cur:
            with cur.copy(
                "COPY _obs_in (series_id, ts, value, quality, window_id) FROM STDIN (FORMAT csv)"
            ) as cp:
                cp.write(buf.getvalue())
        conn.exec_driver_sql(
            "INSERT INTO observations (series_id, ts, value, quality, window_id) "
            "SELECT series_id, ts, value, quality, window_id FROM _obs_in "
            "ON CONFLICT (series_id, ts) DO UPDATE SET value = excluded.value, "
            "quality = excluded.quality, window_id = excluded.window_id "
            "WHERE excluded.quality = 'observed' OR observations.quality <> 'observed'"
        )
        conn.exec_driver_sql("TRUNCATE _obs_in")

    def refresh_windows(
        self, conn: Connection, touched: pl.DataFrame, *, freq_seconds: int, window_seconds: int
    ) -> int:
        """Recount the windows in `touched` (series_id, window_id) from the stored points.

        A window is complete once its series' watermark reaches the window's last slot."""
        if touched.is_empty():
            return 0
        touched = touched.select("series_id", "window_id").unique()
        ranges = touched.group_by("series_id").agg(
            pl.col("window_id").min().alias("lo"), pl.col("window_id").max().alias("hi")
        )
        o, w = s.observations, s.watermarks
        counts: list[tuple[Any, ...]] = []
        for chunk in ranges.iter_slices(200):
            cond = sa.or_(
                *(
                    sa.and_(o.c.series_id == sid, o.c.window_id.between(lo, hi))
                    for sid, lo, hi in chunk.rows()
                )
            )
            q = (
                sa.select(
                    o.c.series_id,
                    o.c.window_id,
                    sa.func.count(),
                    sa.func.sum(sa.case((o.c.quality == "observed", 1), else_=0)),
                    w.c.ts,
                )
                .join(w, w.c.series_id == o.c.series_id)
                .where(cond)
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

    # -- quarantine and source cursors ---------------------------------------------------

    def insert_quarantine(self, conn: Connection, source: str, bad: pl.DataFrame) -> int:
        """bad: series, ts_raw, value_raw, origin, reason, detail. Returns rows newly stored;
        a row quarantined before (same fingerprint) is not stored twice."""
        if bad.is_empty():
            return 0
        now = datetime.now(UTC)
        rows = []
        for r in bad.select(
            "series", "ts_raw", "value_raw", "origin", "reason", "detail"
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

    def read_observations(self, series_name: str | None = None) -> pl.DataFrame:
        """series, ts, value, quality, window_id, sorted; all series when no name is given."""
        o, se = s.observations, s.series
        q = sa.select(
            se.c.name.label("series"), o.c.ts, o.c.value, o.c.quality, o.c.window_id
        ).join(se, se.c.id == o.c.series_id)
        if series_name is not None:
            q = q.where(se.c.name == series_name)
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

    # -- model registry ------------------------------------------------------------------

    def register_model_version(
        self,
        conn: Connection,
        *,
        kind: str,
        config: Mapping[str, Any],
        uri: str,
        sha256: str,
        trained_from: datetime | None,
        trained_to: datetime | None,
        metrics: Mapping[str, Any],
        stage: str = "candidate",
        parent_id: int | None = None,
    ) -> int:
        """Register a checkpoint already written by `forecaster.checkpoints.save_checkpoint`;
        return the new version's id. stage="champion" registers and promotes in one go."""
        if stage not in s.STAGES:
            raise ValueError(f"stage {stage!r} is not one of {', '.join(s.STAGES)}")
        if parent_id is not None:
            self._require_version(conn, parent_id)
        row = {
            "kind": kind,
            "config": dict(config),
            "uri": uri,
            "sha256": sha256,
            "trained_from": trained_from,
            "trained_to": trained_to,
            "metrics": dict(metrics),
            # A champion enters as a candidate and goes through promote(), which retires the
            # old one first: the one-champion index never sees two.
            "stage": "candidate" if stage == "champion" else stage,
            "parent_id": parent_id,
            "created_at": datetime.now(UTC),
        }
        mv = s.model_versions
        version_id = conn.execute(sa.insert(mv).values(row).returning(mv.c.id)).scalar_one()
        if stage == "champion":
            self.promote(conn, version_id)
        return version_id

    def model_version(self, version_id: int) -> dict[str, Any]:
        mv = s.model_versions
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(mv).where(mv.c.id == version_id)).first()
        if row is None:
            raise UnknownModelVersionError(version_id)
        return dict(row._mapping)

    def list_model_versions(self, kind: str | None = None) -> list[dict[str, Any]]:
        """All versions, newest first (ids only grow), optionally of one kind."""
        mv = s.model_versions
        q = sa.select(mv).order_by(mv.c.id.desc())
        if kind is not None:
            q = q.where(mv.c.kind == kind)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def champion(self, kind: str | None = None) -> dict[str, Any] | None:
        """The service's one champion; with `kind`, only if it is of that kind."""
        mv = s.model_versions
        q = sa.select(mv).where(mv.c.stage == "champion")
        if kind is not None:
            q = q.where(mv.c.kind == kind)
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        return None if row is None else dict(row._mapping)

    def promote(self, conn: Connection, version_id: int) -> None:
        """Make `version_id` the champion and retire the current one, in the caller's
        transaction: a rollback leaves the old champion serving.

        Concurrent promotions are serialised: on PostgreSQL by a transaction-scoped advisory
        lock (a row lock alone is not enough: a second promoter's UPDATE would not see the
        champion the first one just committed and would hit the one-champion index); on
        SQLite by the database's single writer. Under READ COMMITTED, the default, the last
        promotion to commit wins and both succeed."""
        mv = s.model_versions
        if self.dialect == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PROMOTE_LOCK_KEY)))
        # Retire first: the one-champion index is checked row by row, not at commit.
        conn.execute(
            sa.update(mv)
            .where(mv.c.stage == "champion", mv.c.id != version_id)
            .values(stage="retired")
        )
        done = conn.execute(sa.update(mv).where(mv.c.id == version_id).values(stage="champion"))
        if done.rowcount != 1:
            raise UnknownModelVersionError(version_id)  # the caller's rollback undoes the retire

    def set_stage(self, conn: Connection, version_id: int, stage: str) -> None:
        """Retire a version or make it a candidate again; champions come only from promote()."""
        if stage == "champion":
            raise ValueError("use promote() to make a version the champion")
        if stage not in s.STAGES:
            raise ValueError(f"stage {stage!r} is not one of {', '.join(s.STAGES)}")
        mv = s.model_versions
        done = conn.execute(sa.update(mv).where(mv.c.id == version_id).values(stage=stage))
        if done.rowcount != 1:
            raise UnknownModelVersionError(version_id)

    def _require_version(self, conn: Connection, version_id: int) -> None:
        mv = s.model_versions
        if conn.execute(sa.select(mv.c.id).where(mv.c.id == version_id)).first() is None:
            raise UnknownModelVersionError(version_id)

    # -- rolling prediction --------------------------------------------------------------

    def prediction_targets(self) -> list[dict[str, Any]]:
        """Every series with its id, name, frequency, window and watermark (None if empty)."""
        se, w = s.series, s.watermarks
        q = (
            sa.select(
                se.c.id,
                se.c.name,
                se.c.freq_seconds,
                se.c.window_seconds,
                w.c.ts.label("watermark"),
            )
            .select_from(se.outerjoin(w, w.c.series_id == se.c.id))
            .order_by(se.c.name)
        )
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def load_states(
        self, version_id: int, series_ids: Sequence[int]
    ) -> dict[int, tuple[bytes, list[int], datetime]]:
        """series_id -> (state bytes, shape, state_ts) for the given model version."""
        st = s.series_states
        out: dict[int, tuple[bytes, list[int], datetime]] = {}
        ids = sorted(set(series_ids))
        with self.engine.connect() as conn:
            for i in range(0, len(ids), 500):
                q = sa.select(st.c.series_id, st.c.state, st.c.shape, st.c.state_ts).where(
                    st.c.model_version_id == version_id, st.c.series_id.in_(ids[i : i + 500])
                )
                for sid, state, shape, ts in conn.execute(q):
                    out[sid] = (bytes(state), list(shape), ts)
        return out

    def recent_values(
        self, series_ids: Sequence[int], spans: Sequence[tuple[datetime, datetime]]
    ) -> pl.DataFrame:
        """series_id, ts, value (NULL when missing) of the points inside any of the inclusive
        time spans: the new points and the few seasonal lags a forecast reads."""
        o = s.observations
        rows: list[Any] = []
        ids = sorted(set(series_ids))
        in_spans = sa.or_(*(o.c.ts.between(lo, hi) for lo, hi in spans))
        with self.engine.connect() as conn:
            for i in range(0, len(ids), 500):
                q = sa.select(o.c.series_id, o.c.ts, o.c.value).where(
                    o.c.series_id.in_(ids[i : i + 500]), in_spans
                )
                rows.extend(conn.execute(q))
        return pl.DataFrame(
            rows, schema={"series_id": pl.Int64, "ts": TS_DTYPE, "value": pl.Float64}, orient="row"
        )

    def save_prediction(
        self,
        conn: Connection,
        *,
        version_id: int,
        states: Sequence[Mapping[str, Any]],
        snapshots: Sequence[Mapping[str, Any]],
        forecasts: Sequence[Mapping[str, Any]],
        keep_snapshots: int,
    ) -> int:
        """Forecasts, the states they came from and window-edge snapshots, in the caller's
        transaction. A forecast already stored (same series, model, origin, step) is kept as
        it is. Returns the number of forecast rows written."""
        now = datetime.now(UTC)
        if states:
            stmt = self._upsert(s.series_states, ("state", "shape", "state_ts", "updated_at"))
            conn.execute(
                stmt, [{**r, "model_version_id": version_id, "updated_at": now} for r in states]
            )
        if snapshots:
            stmt = self._upsert(s.state_snapshots, ("state", "shape", "state_ts"))
            conn.execute(stmt, [{**r, "model_version_id": version_id} for r in snapshots])
            newest = max(r["window_id"] for r in snapshots)
            sn = s.state_snapshots
            conn.execute(
                sa.delete(sn).where(
                    sn.c.model_version_id == version_id,
                    sn.c.series_id.in_(sorted({r["series_id"] for r in snapshots})),
                    sn.c.window_id <= newest - keep_snapshots,
                )
            )
        if not forecasts:
            return 0
        if self.dialect == "sqlite":
            # As for observations: the compiled Core statement straight to the driver's
            # executemany, timestamps pre-formatted; rowcount counts only new rows.
            fmt = "%Y-%m-%d %H:%M:%S.%f"
            tuples = [
                tuple(
                    r[k].astimezone(UTC).strftime(fmt) if k in ("origin_ts", "target_ts") else r[k]
                    for k in _FORECAST_KEYS[:-2]
                )
                + (False, now.strftime(fmt))
                for r in forecasts
            ]
            return conn.exec_driver_sql(_sqlite_forecast_insert_sql(), tuples).rowcount
        stmt = (
            self._insert(s.forecasts)
            .on_conflict_do_nothing(
                index_elements=["series_id", "model", "origin_ts", "horizon_step"]
            )
            .returning(s.forecasts.c.series_id)
        )
        rows = [{**r, "superseded": False, "created_at": now} for r in forecasts]
        return len(conn.execute(stmt, rows).all())

    def latest_forecasts(self, series_name: str) -> list[dict[str, Any]]:
        """Rows of the latest_forecasts view for one series, by model and target time."""
        view = sa.table(
            "latest_forecasts",
            *(
                sa.column(c)
                for c in (
                    "series",
                    "model",
                    "origin_ts",
                    "target_ts",
                    "horizon_step",
                    "yhat",
                    "yhat_lower",
                    "yhat_upper",
                    "interval_level",
                )
            ),
        )
        q = (
            sa.select(view)
            .where(view.c.series == series_name)
            .order_by(view.c.model, view.c.target_ts)
        )
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
        for r in rows:  # untyped view columns: SQLite hands back text
            for k in ("origin_ts", "target_ts"):
                if isinstance(r[k], str):
                    r[k] = _utc(datetime.fromisoformat(r[k]))
                elif isinstance(r[k], datetime):
                    r[k] = _utc(r[k])
        return rows

    # -- evaluation ----------------------------------------------------------------------

    def calibration_for(self, model: str) -> dict[int, float]:
        """horizon_step -> conformal correction for a model key ("v3"); empty when none yet."""
        c = s.calibration
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(c.c.horizon_step, c.c.correction).where(c.c.model == model)
            )
            return {step: corr for step, corr in rows}

    def scored_forecasts(self, model: str, since: datetime) -> pl.DataFrame:
        """Forecasts of `model` with targets at or after `since` whose actuals have arrived:
        series_id, origin_ts, target_ts, horizon_step, yhat, yhat_lower, yhat_upper,
        raw_lower, raw_upper, interval_level, actual."""
        f, o = s.forecasts, s.observations
        q = (
            sa.select(
                f.c.series_id,
                f.c.origin_ts,
                f.c.target_ts,
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
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
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
        return pl.DataFrame(rows, schema=schema_, orient="row")

    def newest_scored_target(self, model: str) -> datetime | None:
        f, o = s.forecasts, s.observations
        q = (
            sa.select(sa.func.max(f.c.target_ts))
            .join(o, sa.and_(o.c.series_id == f.c.series_id, o.c.ts == f.c.target_ts))
            .where(f.c.model == model, o.c.quality == "observed")
        )
        with self.engine.connect() as conn:
            value = conn.execute(q).scalar_one_or_none()
        if isinstance(value, str):  # max() over SQLite text
            value = datetime.fromisoformat(value)
        return None if value is None else _utc(value)

    def save_calibration(
        self, conn: Connection, model: str, rows: Sequence[Mapping[str, Any]]
    ) -> None:
        if not rows:
            return
        stmt = self._upsert(s.calibration, ("correction", "n_scored", "coverage_raw", "updated_at"))
        now = datetime.now(UTC)
        conn.execute(stmt, [{**r, "model": model, "updated_at": now} for r in rows])

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
    compiled = stmt.compile(dialect=sqlite_dialect.dialect(paramstyle="qmark"))
    assert tuple(compiled.positiontup or ()) == _OBS_KEYS, compiled.positiontup
    return str(compiled)


_FORECAST_KEYS = (
    "series_id",
    "model",
    "origin_ts",
    "horizon_step",
    "model_version_id",
    "target_ts",
    "yhat",
    "yhat_lower",
    "yhat_upper",
    "interval_level",
    "raw_lower",
    "raw_upper",
    "superseded",
    "created_at",
)
_forecasts_raw = sa.table("forecasts", *(sa.column(c) for c in _FORECAST_KEYS))


@functools.cache
def _sqlite_forecast_insert_sql() -> str:
    """INSERT ... ON CONFLICT DO NOTHING for forecasts, SQLite text with ? in _FORECAST_KEYS order."""
    stmt = sqlite_dialect.insert(_forecasts_raw).values(
        {k: sa.bindparam(k) for k in _FORECAST_KEYS}
    )
    stmt = stmt.on_conflict_do_nothing(
        index_elements=["series_id", "model", "origin_ts", "horizon_step"]
    )
    compiled = stmt.compile(dialect=sqlite_dialect.dialect(paramstyle="qmark"))
    assert tuple(compiled.positiontup or ()) == _FORECAST_KEYS, compiled.positiontup
    return str(compiled)
