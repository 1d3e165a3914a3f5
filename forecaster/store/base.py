"""The base of the store: the engine, transactions, per-dialect insert helpers, migrations.

One write path per dialect for the bulk tables (DESIGN.md decisions 5 and 6):
- SQLite: Core `insert().on_conflict_do_update` executemany, timestamps normalised to naive
  UTC text before binding (SQLite has no time zones).
- PostgreSQL: psycopg 3 COPY into a temp table, then INSERT ... SELECT ... ON CONFLICT in
  the same transaction. Keys are de-duplicated before they get here (forecaster.frames).
Every statement binds its values; no value is ever formatted into SQL text.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import io
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine

from forecaster import schema
from forecaster.errors import SchemaOutOfDateError, StoreError, UnknownSeriesError

if TYPE_CHECKING:
    import polars as pl

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent.parent / "migrations"
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


def _sqlite_pragmas(dbapi_conn: Any, _record: Any, *, busy_timeout: bool = True) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers (a dashboard, `series list`) run while an ingest writes.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    if busy_timeout:
        cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def create_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = sa.create_engine(url)
        # Waiting for another writer's lock: 30 s, or the URL's own `?timeout=SECONDS` (which
        # the driver passes to sqlite3.connect; the pragma would override it).
        given = "timeout" in sa.engine.make_url(url).query
        sa.event.listen(
            engine, "connect", functools.partial(_sqlite_pragmas, busy_timeout=not given)
        )
        return engine
    if url.startswith("postgresql"):
        return sa.create_engine(url, pool_pre_ping=True)
    raise StoreError(
        f"unsupported database URL {url.split(':', 1)[0]!r}: use sqlite:///PATH or "
        "postgresql://USER@HOST/DB"
    )


_REVISION_LINE = re.compile(
    r"^(revision|down_revision)\s*(?::[^=\n]*)?=\s*(?:[\"']([^\"']+)[\"']|None)\s*$", re.MULTILINE
)


def _file_head() -> str | None:
    """The newest revision, read from the `revision` and `down_revision` lines of the
    migration files: Alembic's ScriptDirectory imports every migration, a third of the
    start-up of a command that only checks the schema. None unless the files form one
    plain chain (Alembic answers then)."""
    parent: dict[str, str | None] = {}
    for path in (MIGRATIONS_DIR / "versions").glob("*.py"):
        found = dict(_REVISION_LINE.findall(path.read_text()))
        if "revision" not in found or "down_revision" not in found:
            return None
        parent[found["revision"]] = found["down_revision"] or None
    roots = [r for r, p in parent.items() if p is None]
    children = [p for p in parent.values() if p is not None]
    heads = set(parent) - set(children)
    if len(roots) != 1 or len(heads) != 1 or len(set(children)) != len(children):
        return None
    if not set(children) <= set(parent):
        return None
    return heads.pop()


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (relative to the working directory as SQLite opens it);
    None for other databases, in-memory ones and file: URIs."""
    parsed = sa.engine.make_url(normalise_url(url))
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:") or parsed.query.get("uri") == "true":
        return None
    return Path(database)


def _require_sqlite_file(url: str) -> None:
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise StoreError(
            f"no database at {path.absolute()}: `forecaster db upgrade` creates it there, "
            "or point --db / database_url at an existing one"
        )


def connection_lost(exc: BaseException) -> bool:
    """True for errors that say the database is unreachable or dropped the connection (and
    SQLite's "database is locked"): the transaction rolled back whole, so the same work can
    be tried again. Not for errors in the SQL or the data."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sa.exc.DBAPIError):
            if seen.connection_invalidated:
                return True
            if type(seen.orig).__module__.startswith("sqlite3"):
                # SQLite's OperationalError also means "no such table" or "disk is full":
                # only a lock held by another writer passes.
                return "database is locked" in str(seen.orig)
            return isinstance(seen, sa.exc.OperationalError | sa.exc.InterfaceError)
        seen = seen.__cause__ or seen.__context__
    return False


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


# Timestamps as PostgreSQL reads them from CSV (UTC, microseconds).
PG_CSV_TS_FORMAT = "%Y-%m-%d %H:%M:%S%.6f+00:00"


@dataclass(frozen=True)
class PgTemp:
    """A PostgreSQL temp table that a bulk write COPYs into: its CREATE (ON COMMIT DROP),
    TRUNCATE and COPY ... FROM STDIN (FORMAT csv) statements, constants of the caller. For
    rows holding bytes (pg_copy_rows), also its COPY ... (FORMAT binary) and the columns'
    types in that order: bytea then goes as it is, not escaped into text (about 4x faster
    for 10,000 states of half a kilobyte)."""

    create: str
    truncate: str
    copy: str
    copy_binary: str | None = None
    types: tuple[str, ...] = ()


def pg_copy_temp(conn: Connection, frame: pl.DataFrame, temp: PgTemp) -> None:
    """PostgreSQL: `frame`'s columns (in the COPY's order) COPYed as CSV into `temp`, created
    for the transaction if absent and emptied first, for one INSERT ... SELECT ... ON
    CONFLICT on the server: no parameter bound per row, no round trip per row."""
    with _pg_copy(conn, temp) as cp:
        cp.write(_pg_csv(frame))


def pg_copy_new(conn: Connection, frame: pl.DataFrame, copy: str) -> bool:
    """PostgreSQL: rows known to have new keys (`frame`'s columns, in the COPY's order)
    COPYed as CSV straight into their table by `copy` (a constant COPY ... FROM STDIN
    (FORMAT csv) statement), inside a savepoint: cheaper than a temp table and an upsert
    where the upsert would update on conflict. False, and nothing stored, where a key was
    stored after all (a writer beside this one): the caller then upserts them."""
    import psycopg

    savepoint = conn.begin_nested()
    try:
        with conn.connection.driver_connection.cursor() as cur:
            with cur.copy(copy) as cp:
                cp.write(_pg_csv(frame))
    except psycopg.errors.UniqueViolation:
        savepoint.rollback()
        return False
    savepoint.commit()
    conn.info["wrote"] = True  # work (base._note_write sees no driver call)
    return True


def _pg_text_safe(frame: pl.DataFrame) -> bool:
    """Whether polars can write `frame` as COPY's text format: columns of numbers, booleans,
    timestamps and strings, no string holding a tab, a newline or a backslash (which that
    format escapes)."""
    import polars as pl

    schema = frame.schema
    plain = (pl.String, pl.Boolean)
    if not all(t in plain or t.is_numeric() or isinstance(t, pl.Datetime) for t in schema.values()):
        return False  # before scanning any string column (a frame with bytes goes row by row)
    return not any(
        frame[name].str.contains(r"[\t\n\r\\]").any()
        for name, t in schema.items()
        if t == pl.String
    )


def _pg_csv(frame: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.write_csv(buf, include_header=False, datetime_format=PG_CSV_TS_FORMAT, null_value="")
    return buf.getvalue()


def pg_copy_rows(conn: Connection, rows: Sequence[tuple[Any, ...]], temp: PgTemp) -> None:
    """PostgreSQL: Python rows (in the COPY's order; bytes go in as bytea, timestamps
    aware) COPYed into `temp` as pg_copy_temp does a frame: in COPY's binary format where
    `temp` has one (its columns' types), else its text format."""
    with _pg_copy(conn, temp, temp.copy_binary) as cp:
        if temp.copy_binary is not None:
            cp.set_types(list(temp.types))
        for r in rows:
            cp.write_row(r)


@contextmanager
def _pg_copy(conn: Connection, temp: PgTemp, copy: str | None = None) -> Iterator[Any]:
    """The COPY into `temp` (its `copy`, or the one given), the table created for the
    transaction if absent and emptied first."""
    conn.exec_driver_sql(temp.create)
    conn.exec_driver_sql(temp.truncate)
    with conn.connection.driver_connection.cursor() as cur:
        with cur.copy(copy or temp.copy) as cp:
            yield cp


def sqlite_qmark(stmt: Any, order: Sequence[str]) -> str:
    """A Core statement as SQLite text with ? parameters, checked to take them in `order`
    (for the driver's executemany of tuples, without SQLAlchemy's per-row binding)."""
    compiled = stmt.compile(dialect=sqlite_dialect.dialect(paramstyle="qmark"))
    assert tuple(compiled.positiontup or ()) == tuple(order), compiled.positiontup
    return str(compiled)


def _fingerprint(source: str, row: Mapping[str, Any]) -> str:
    key = json.dumps(
        [source, row["origin"], row["reason"], row["series"], row["ts_raw"], row["value_raw"]]
    )
    return hashlib.sha256(key.encode()).hexdigest()


# The job run whose work this thread's transactions do (StoreBase.working_for).
_working_for: contextvars.ContextVar[tuple[str, datetime] | None] = contextvars.ContextVar(
    "forecaster_working_for", default=None
)
WORK_MARK = "work committed by this run"
_WRITES = ("INSERT", "UPDATE", "DELETE")
# Bookkeeping, not work: a source's cursor moves on an empty read too, and the run's own row.
_BOOKKEEPING = ("source_cursors", "job_runs")


def _note_write(conn: Connection, cursor: Any, statement: str, *_: Any) -> None:
    """Work = a statement that changed rows of a data table (an upsert that changed
    nothing, or a DELETE of nothing, is no work: the uninterrupted run would have been
    skipped too)."""
    head = statement.lstrip()[:120]
    if (
        head[:6].upper().startswith(_WRITES)
        and (cursor.rowcount or 0) != 0
        and not any(t in head for t in _BOOKKEEPING)
    ):
        conn.info["wrote"] = True


@dataclass(frozen=True)
class Bulk:
    """A table upserted in bulk (StoreBase._bulk_upsert): its columns (the primary key first),
    those that are timestamps, the columns an upsert takes, and the PostgreSQL temp table
    and upsert statement (constants)."""

    table: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    timestamps: tuple[str, ...]
    pg: PgTemp
    pg_upsert: str
    # SQLite's statement (? in columns' order) where the upsert is not "take the new row"
    # (running sums add to the stored row).
    sqlite_upsert: str | None = None


@functools.cache
def sqlite_upsert_sql(target: Bulk) -> str:
    """INSERT ... ON CONFLICT DO UPDATE for a Bulk table, SQLite text with ? in its
    columns' order."""
    raw = sa.table(target.table, *(sa.column(c) for c in target.columns))
    stmt = sqlite_dialect.insert(raw).values({c: sa.bindparam(c) for c in target.columns})
    stmt = stmt.on_conflict_do_update(
        index_elements=list(target.key),
        set_={c: stmt.excluded[c] for c in target.columns if c not in target.key},
    )
    return sqlite_qmark(stmt, target.columns)


@functools.lru_cache(maxsize=65536)
def sqlite_ts(ts: datetime) -> str:
    """A UTC time as SQLAlchemy stores DateTime on SQLite (naive text, microseconds). Cached:
    a bulk write's times repeat (a day's 24 hours over 10,000 series)."""
    return _utc(ts).replace(tzinfo=None).isoformat(" ", "microseconds")


class StoreBase:
    """Owns the engine. Reads open their own connection; writes take the connection of the
    caller's transaction (`with store.begin() as conn:`) so a job commits all or nothing."""

    def _bulk_upsert(self, conn: Connection, target: Bulk, rows: list[tuple[Any, ...]]) -> None:
        """Rows (in target.columns order; timestamps aware, JSON as text) upserted on the
        table's primary key: on SQLite one compiled statement through the driver's
        executemany (no per-row bind processing), on PostgreSQL COPYed into a temp table
        and upserted by one statement."""
        if rows:  # work for the run this transaction is for (base._note_write sees no driver call)
            conn.info["wrote"] = True
        if self.dialect == "sqlite":
            ts = [i for i, c in enumerate(target.columns) if c in target.timestamps]
            text = [tuple(sqlite_ts(v) if i in ts else v for i, v in enumerate(r)) for r in rows]
            cur = conn.connection.driver_connection.cursor()
            try:
                cur.executemany(target.sqlite_upsert or sqlite_upsert_sql(target), text)
            finally:
                cur.close()
            return
        pg_copy_rows(conn, rows, target.pg)
        conn.exec_driver_sql(target.pg_upsert)

    def _bulk_upsert_frame(self, conn: Connection, target: Bulk, frame: pl.DataFrame) -> None:
        """_bulk_upsert of a frame's rows (its columns in target.columns order, timestamps
        UTC-aware), its values made text by polars a column at a time rather than value by
        value: on SQLite the timestamps, on PostgreSQL the whole COPY (text format, written
        by polars: numbers, booleans, timestamps and strings without a tab, newline or
        backslash; other frames go row by row)."""
        if frame.is_empty():
            return
        import polars as pl

        if self.dialect == "postgresql":
            if _pg_text_safe(frame):
                buf = io.BytesIO()
                frame.write_csv(
                    buf,
                    include_header=False,
                    separator="\t",
                    null_value="\\N",
                    quote_style="never",
                    datetime_format=PG_CSV_TS_FORMAT,
                )
                conn.info["wrote"] = True
                with _pg_copy(conn, target.pg) as cp:
                    cp.write(buf.getvalue())
                conn.exec_driver_sql(target.pg_upsert)
            else:
                self._bulk_upsert(conn, target, frame.rows())
            return

        text = frame.with_columns(
            pl.col(c)
            .dt.convert_time_zone("UTC")
            .dt.replace_time_zone(None)
            .dt.strftime("%Y-%m-%d %H:%M:%S%.6f")
            for c in target.timestamps
        )
        conn.info["wrote"] = True
        cur = conn.connection.driver_connection.cursor()
        try:
            cur.executemany(target.sqlite_upsert or sqlite_upsert_sql(target), text.rows())
        finally:
            cur.close()

    def __init__(self, url: str, *, create: bool = True) -> None:
        """create=False: a SQLite file that does not exist is an error (StoreError naming
        the path), not a new empty database; for commands that only read or update one."""
        self.url = normalise_url(url)
        if not create:
            _require_sqlite_file(self.url)
        self.engine = create_engine(self.url)
        self.dialect = self.engine.dialect.name
        sa.event.listen(self.engine, "after_cursor_execute", _note_write)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction. Inside working_for(run), one that wrote also marks that run's
        job_runs row (detail = WORK_MARK) in the same commit."""
        try:
            with self.engine.begin() as conn:
                conn.info["wrote"] = False
                yield conn
                run = _working_for.get()
                if run is not None and conn.info.pop("wrote", False):
                    jr = schema.job_runs
                    conn.execute(
                        sa.update(jr)
                        .where(jr.c.job_id == run[0], jr.c.scheduled_at == run[1])
                        .where(jr.c.status == "running")
                        .values(detail=WORK_MARK)
                    )
        except sa.exc.OperationalError as exc:
            raise StoreError(f"database error: {exc.orig}") from exc

    @staticmethod
    def working_run() -> tuple[str, datetime] | None:
        """The job run this thread works for (working_for), to hand to another process."""
        return _working_for.get()

    @contextmanager
    def working_for(self, job_id: str, scheduled_at: datetime) -> Iterator[None]:
        """Transactions of this thread (or task) inside the block do work for that job run:
        a run killed after some of them committed is then known to have left work behind,
        and its redo, finding nothing left, still succeeded (see JobsStore.claim_job_run)."""
        token = _working_for.set((job_id, scheduled_at))
        try:
            yield
        finally:
            _working_for.reset(token)

    def _insert(self, table: sa.TableClause) -> Any:
        if self.dialect == "postgresql":
            # Here, not at the top: a SQLite store's command need not load this dialect.
            from sqlalchemy.dialects import postgresql as pg

            return pg.insert(table)
        return sqlite_dialect.insert(table)

    def _upsert(self, table: sa.Table, update: Sequence[str]) -> Any:
        """INSERT that, on a primary-key conflict, takes the new row's `update` columns."""
        stmt = self._insert(table)
        return stmt.on_conflict_do_update(
            index_elements=[c.name for c in table.primary_key.columns],
            set_={k: stmt.excluded[k] for k in update},
        )

    def _frame(self, query: Any, schema: dict[str, Any]) -> pl.DataFrame:
        """A query's rows as a polars frame built column by column (far cheaper than a row
        per tuple). Timestamp columns of `schema` may come raw (select them through
        type_coerce(..., NullType())): naive UTC text on SQLite, aware datetimes on
        PostgreSQL; both become Datetime("us", "UTC")."""
        import polars as pl

        from forecaster.frames import TS_DTYPE

        names = list(schema)
        cols: list[list[Any]] = [[] for _ in names]
        with self.engine.connect() as conn:
            result = conn.execute(query)
            for batch in result.partitions(8192):
                for i, col in enumerate(zip(*batch, strict=True)):
                    cols[i].extend(col)
        series = {}
        for name, values in zip(names, cols, strict=True):
            dtype = schema[name]
            first = next((v for v in values if v is not None), None)
            if dtype == TS_DTYPE and isinstance(first, str):
                series[name] = pl.Series(name, values, dtype=pl.String).str.to_datetime(
                    "%Y-%m-%d %H:%M:%S%.f", time_unit="us", time_zone="UTC"
                )
            else:
                series[name] = pl.Series(name, values, dtype=dtype, strict=False)
        return pl.DataFrame(series, schema=schema)

    # -- migrations ---------------------------------------------------------------------

    def _alembic_config(self, conn: Connection | None = None) -> Any:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        cfg.attributes["connection"] = conn
        return cfg

    def revisions(self) -> list[str]:
        """Every revision of the migrations, oldest first."""
        from alembic.script import ScriptDirectory

        walk = ScriptDirectory.from_config(self._alembic_config()).walk_revisions()
        return [s.revision for s in reversed(list(walk))]

    def head_revision(self) -> str:
        head = _file_head()
        if head is not None:
            return head
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(self._alembic_config()).get_current_head()
        assert head is not None, "the migrations folder has no revision"
        return head

    def current_revision(self) -> str | None:
        """The revision in the database's alembic_version table (None for an empty
        database), read with plain SQL: Alembic is imported only to migrate."""
        try:
            with self.engine.connect() as conn:
                if not sa.inspect(conn).has_table("alembic_version"):
                    return None
                stored = conn.execute(sa.text("SELECT version_num FROM alembic_version"))
                rows = list(stored.scalars())
        except sa.exc.OperationalError as exc:
            raise StoreError(f"cannot reach the database: {exc.orig}") from exc
        if len(rows) > 1:
            raise StoreError(
                f"the database is at several schema revisions at once ({', '.join(rows)}); "
                "`alembic heads` and `alembic merge` sort that out"
            )
        return rows[0] if rows else None

    def upgrade(self, revision: str = "head") -> None:
        self._migrate("upgrade", revision)

    def downgrade(self, revision: str) -> None:
        self._migrate("downgrade", revision)

    def _migrate(self, direction: str, revision: str) -> None:
        from alembic import command
        from alembic.util import CommandError

        try:
            with self.engine.begin() as conn:
                getattr(command, direction)(self._alembic_config(conn), revision)
        except sa.exc.OperationalError as exc:
            raise StoreError(f"cannot reach the database: {exc.orig}") from exc
        except CommandError as exc:  # an unknown revision, or one on the wrong side
            raise StoreError(
                f"cannot {direction} the schema to {revision!r}: {exc} (the revisions are "
                f"{', '.join(self.revisions())}, plus head and base)"
            ) from None

    def check_schema(self) -> None:
        """Raise SchemaOutOfDateError unless the database is at the migrations' head."""
        current = self.current_revision()  # StoreError when the database cannot be reached
        head = self.head_revision()
        if current != head:
            raise SchemaOutOfDateError(current, head)

    # -- the newest forecasts -------------------------------------------------------------

    def newest_forecasts(
        self, series_name: str, *, origin: datetime | None = None, model: str | None = None
    ) -> list[dict[str, Any]]:
        """Each model's current forecast of one series from its newest origin (or from
        `origin`), every horizon step, by model and step. Index seeks on the ledger's key
        (series_id, model, origin_ts, ...): a few queries per model, however long the
        history (the latest_forecasts view instead joins every stored target)."""
        f, fo, se = schema.forecasts, schema.forecast_origins, schema.series
        columns = (
            f.c.model,
            f.c.origin_ts,
            f.c.target_ts,
            f.c.horizon_step,
            f.c.yhat,
            f.c.yhat_lower,
            f.c.yhat_upper,
            f.c.interval_level,
        )
        with self.engine.connect() as conn:
            sid = conn.execute(sa.select(se.c.id).where(se.c.name == series_name)).scalar()
            if sid is None:
                raise UnknownSeriesError(series_name)
            models = sa.select(fo.c.model).where(fo.c.series_id == sid).distinct()
            if model is not None:
                models = models.where(fo.c.model == model)
            rows: list[dict[str, Any]] = []
            for name in sorted(r[0] for r in conn.execute(models)):
                current = (f.c.series_id == sid, f.c.model == name, sa.not_(f.c.superseded))
                at = origin
                if at is None:
                    newest = sa.select(fo.c.origin_ts).where(
                        fo.c.series_id == sid, fo.c.model == name, sa.not_(fo.c.superseded)
                    )
                    at = conn.execute(newest.order_by(fo.c.origin_ts.desc()).limit(1)).scalar()
                if at is None:
                    continue
                q = sa.select(*columns).where(*current, f.c.origin_ts == at)
                rows.extend(dict(r._mapping) for r in conn.execute(q.order_by(f.c.horizon_step)))
        return rows
