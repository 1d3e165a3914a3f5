"""Rolling prediction: series states, window-edge snapshots and forecasts."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from itertools import repeat
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection

from forecaster import schema as s
from forecaster.store.base import (
    _SQLITE_TS_FORMAT,
    PgTemp,
    StoreBase,
    _utc,
    pg_copy_temp,
)

if TYPE_CHECKING:  # polars is imported where frames are built (see forecaster.store)
    import polars as pl


class PredictionStore(StoreBase):
    # -- rolling prediction --------------------------------------------------------------

    def prediction_targets(self) -> list[dict[str, Any]]:
        """Every series with its id, name, frequency, window, watermark (None if empty) and
        late mark (late_from, late_seq: see schema.watermarks)."""
        se, w = s.series, s.watermarks
        q = (
            sa.select(
                se.c.id,
                se.c.name,
                se.c.freq_seconds,
                se.c.window_seconds,
                w.c.ts.label("watermark"),
                w.c.late_from,
                w.c.late_seq,
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

    def series_scalers(self, version_id: int, series_ids: Sequence[int]) -> dict[int, dict]:
        """series_id -> its series_scalers row (center, scale, n_points, fitted_to) for the
        series `version_id` serves without having been trained on them."""
        sc = s.series_scalers
        ids = sorted(set(series_ids))
        out: dict[int, dict] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(ids), 500):
                q = sa.select(sc).where(
                    sc.c.model_version_id == version_id, sc.c.series_id.in_(ids[i : i + 500])
                )
                for r in conn.execute(q):
                    out[r.series_id] = {**r._mapping, "fitted_to": _utc(r.fitted_to)}
        return out

    def save_series_scalers(self, version_id: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Record the scalers of series first served by `version_id` (series_id, center,
        scale, n_points, fitted_to); a series that has one keeps it (a rerun after a crash
        between this and the states changes nothing)."""
        if not rows:
            return
        now = datetime.now(UTC)
        stmt = self._insert(s.series_scalers).on_conflict_do_nothing(
            index_elements=["model_version_id", "series_id"]
        )
        with self.begin() as conn:
            conn.execute(
                stmt, [{**r, "model_version_id": version_id, "created_at": now} for r in rows]
            )

    def served_weights(self, version_id: int) -> dict[str, dict[str, float]]:
        """Series name -> the blend's weights served from its newest state under
        `version_id` (forecaster.serving), for the states that record them."""
        st, se = s.series_states, s.series
        q = (
            sa.select(se.c.name, st.c.weights)
            .join(st, st.c.series_id == se.c.id)
            .where(st.c.model_version_id == version_id, st.c.weights.is_not(None))
        )
        with self.engine.connect() as conn:
            return {name: dict(w) for name, w in conn.execute(q) if w}

    def serving_by_series(self, version: dict | None, untrained: str) -> dict[str, Any]:
        """Series name -> what serves it under `version` (a model_versions row; None: no
        series): the weights its newest state recorded where they follow tracked errors,
        else the version's holdout entry (forecaster.serving), and `untrained` for a series
        the version serves without having been trained on it."""
        if version is None:
            return {}
        return {
            **((version.get("metrics") or {}).get("serving") or {}),
            **self.served_weights(version["id"]),
            **dict.fromkeys(self.untrained_series(version["id"]), untrained),
        }

    def untrained_series(self, version_id: int) -> list[str]:
        """Names of the series `version_id` serves without having been trained on them."""
        sc, se = s.series_scalers, s.series
        q = (
            sa.select(se.c.name)
            .join(sc, sc.c.series_id == se.c.id)
            .where(sc.c.model_version_id == version_id)
            .order_by(se.c.name)
        )
        with self.engine.connect() as conn:
            return list(conn.execute(q).scalars())

    def recent_values(
        self, series_ids: Sequence[int], spans: Sequence[tuple[datetime, datetime]]
    ) -> pl.DataFrame:
        """series_id, ts, value (NULL when missing) of the points inside any of the inclusive
        time spans: the new points and the few seasonal lags a forecast reads.

        One query through the raw driver: the ids and the spans are bound as one parameter
        each (a JSON array on SQLite, arrays on PostgreSQL) and joined to `observations`, so
        each (series, span) is one range scan of its primary key (series_id, ts) and no
        per-row SQLAlchemy processing runs; the frame is built from columns."""
        import polars as pl

        from forecaster.frames import TS_DTYPE

        ids = sorted(set(series_ids))
        merged = _merge_spans(spans)
        if not ids or not merged:
            return pl.DataFrame(schema={"series_id": pl.Int64, "ts": TS_DTYPE, "value": pl.Float64})
        with self.engine.connect() as conn:
            cur = conn.connection.driver_connection.cursor()
            try:
                if self.dialect == "sqlite":
                    bounds = [[_sqlite_ts(lo), _sqlite_ts(hi)] for lo, hi in merged]
                    cur.execute(_SQLITE_RECENT_SQL, (json.dumps(ids), json.dumps(bounds)))
                else:
                    # The same over-estimate would JIT-compile the query (seconds) for a
                    # read of milliseconds per series; for this transaction only.
                    cur.execute("SET LOCAL jit = off")
                    los, his = zip(*merged, strict=True)
                    cur.execute(_PG_RECENT_SQL, (ids, list(los), list(his)))
                # Columns from batches of rows: zip(*rows) would walk every row per column,
                # and 10^5 live tuples keep the garbage collector busy.
                sid: list[int] = []
                ts: list[Any] = []
                value: list[float | None] = []
                while batch := cur.fetchmany(8192):
                    sid += [r[0] for r in batch]
                    ts += [r[1] for r in batch]
                    value += [r[2] for r in batch]
            finally:
                cur.close()
        if self.dialect == "sqlite":  # naive UTC text, as SQLAlchemy stores DateTime there
            when = pl.Series(ts, dtype=pl.String).str.to_datetime(
                "%Y-%m-%d %H:%M:%S%.f", time_unit="us", time_zone="UTC"
            )
        else:  # epoch microseconds: cheaper to fetch than a datetime per row
            when = pl.Series(ts, dtype=pl.Int64).cast(TS_DTYPE)
        return pl.DataFrame(
            {
                "series_id": pl.Series(sid, dtype=pl.Int64),
                "ts": when,
                "value": pl.Series(value, dtype=pl.Float64),
            }
        )

    def save_prediction(
        self,
        conn: Connection,
        *,
        version_id: int,
        states: Sequence[Mapping[str, Any]],
        snapshots: Sequence[Mapping[str, Any]],
        forecasts: pl.DataFrame | Sequence[Mapping[str, Any]],
        keep_snapshots: int,
        reissued: Sequence[tuple[int, datetime]] = (),
        late_handled: Sequence[tuple[int, int]] = (),
    ) -> int:
        """Forecasts, the states they came from and window-edge snapshots, in the caller's
        transaction. `forecasts` is a frame (or rows) with the forecasts table's columns
        (_forecast_schema; `revision` optional, 0). A forecast already stored (same
        series, model, origin, step) is kept as it is, except at the (series_id, origin_ts)
        pairs in `reissued` (late data): there the current rows of the models in `forecasts`
        are marked superseded and the new ones stored as the next revision. `late_handled`
        (series_id, late_seq) clears the late marks this run handled, unless a newer batch
        has marked the series again. Returns the number of forecast rows written."""
        now = datetime.now(UTC)
        frame = _forecast_frame(forecasts)
        if late_handled:
            w = s.watermarks
            conn.execute(
                sa.update(w)
                .where(w.c.series_id == sa.bindparam("sid"), w.c.late_seq == sa.bindparam("seq"))
                .values(late_from=None),
                [{"sid": sid, "seq": seq} for sid, seq in late_handled],
            )
        if reissued:
            frame = self._supersede(conn, frame, set(reissued))
        if states:
            cols = ("state", "shape", "state_ts", "updated_at", "weights")
            stmt = self._upsert(s.series_states, cols)
            conn.execute(
                stmt,
                [
                    {"weights": None, **r, "model_version_id": version_id, "updated_at": now}
                    for r in states
                ],
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
        if frame.is_empty():
            return 0
        # Grouped by series (a stable sort keeps each model's rows together): each series'
        # pages of the primary key are visited once per chunk, not once per model.
        frame = frame.sort("series_id", maintain_order=True)
        if self.dialect == "sqlite":
            # The compiled Core statement straight to the driver's executemany, rows made
            # lazily from columns (no dict per row; a list of 10^5 tuples would also keep the
            # garbage collector busy); rowcount counts only new rows.
            cur = conn.connection.driver_connection.cursor()
            try:
                cur.executemany(_sqlite_forecast_insert_sql(), _sqlite_forecast_rows(frame, now))
                return cur.rowcount
            finally:
                cur.close()
        return _copy_insert_forecasts(conn, frame, now)

    def _supersede(
        self,
        conn: Connection,
        forecasts: pl.DataFrame,
        reissued: set[tuple[int, datetime]],
    ) -> pl.DataFrame:
        """Mark the current rows that `forecasts` re-issue superseded; return the forecasts
        numbered as the next revision of each (series, model, origin)."""
        import polars as pl

        from forecaster.frames import TS_DTYPE

        f = s.forecasts
        pairs = pl.DataFrame(
            sorted(reissued), schema={"series_id": pl.Int64, "origin_ts": TS_DTYPE}, orient="row"
        )
        key_cols = ["series_id", "model", "origin_ts"]
        keys = (
            forecasts.join(pairs, on=["series_id", "origin_ts"], how="semi")
            .select(key_cols)
            .unique()
            .sort(key_cols)
        )
        if keys.is_empty():
            return forecasts
        key_match = sa.and_(
            f.c.series_id == sa.bindparam("sid"),
            f.c.model == sa.bindparam("m"),
            f.c.origin_ts == sa.bindparam("o", type_=s.UTCDateTime),
        )
        params = [{"sid": sid, "m": m, "o": o} for sid, m, o in keys.iter_rows()]
        revisions = []
        for p in params:
            top = conn.execute(sa.select(sa.func.max(f.c.revision)).where(key_match), p).scalar()
            revisions.append(0 if top is None else int(top) + 1)
        conn.execute(
            sa.update(f).where(key_match, f.c.superseded.is_(False)).values(superseded=True),
            params,
        )
        nxt = keys.with_columns(pl.Series("next_revision", revisions, dtype=pl.Int64))
        return (
            forecasts.join(nxt, on=key_cols, how="left")
            .with_columns(pl.coalesce("next_revision", "revision").alias("revision"))
            .drop("next_revision")
        )

    def issued_origins(
        self, model: str, since: Mapping[int, datetime]
    ) -> dict[int, list[datetime]]:
        """series_id -> the origins (ascending) of `model`'s current forecasts at or after
        since[series_id]: the forecasts a late point at that time has made stale."""
        f = s.forecasts
        out: dict[int, list[datetime]] = {sid: [] for sid in since}
        if not since:
            return out
        ids = sorted(since)
        with self.engine.connect() as conn:
            for i in range(0, len(ids), 500):
                q = (
                    sa.select(f.c.series_id, f.c.origin_ts)
                    .where(
                        f.c.model == model,
                        f.c.superseded.is_(False),
                        f.c.horizon_step == 1,
                        f.c.series_id.in_(ids[i : i + 500]),
                        f.c.origin_ts >= min(since[sid] for sid in ids[i : i + 500]),
                    )
                    .order_by(f.c.series_id, f.c.origin_ts)
                )
                for sid, origin in conn.execute(q):
                    if origin >= since[sid]:
                        out[sid].append(origin)
        return out

    def snapshots_before(
        self, version_id: int, before: Mapping[int, datetime]
    ) -> dict[int, tuple[bytes, list[int], datetime]]:
        """series_id -> (state, shape, state_ts) of the newest window-edge snapshot taken
        before before[series_id]; series with none kept that old are absent."""
        sn = s.state_snapshots
        out: dict[int, tuple[bytes, list[int], datetime]] = {}
        ids = sorted(before)
        with self.engine.connect() as conn:
            for i in range(0, len(ids), 500):
                q = (
                    sa.select(sn.c.series_id, sn.c.state, sn.c.shape, sn.c.state_ts)
                    .where(
                        sn.c.model_version_id == version_id, sn.c.series_id.in_(ids[i : i + 500])
                    )
                    .order_by(sn.c.series_id, sn.c.window_id)
                )
                for sid, state, shape, ts in conn.execute(q):
                    if ts < before[sid]:
                        out[sid] = (bytes(state), list(shape), ts)
        return out

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
    "revision",
    "superseded",
    "created_at",
)
_FORECAST_PK = ["series_id", "model", "origin_ts", "horizon_step", "revision"]
_forecasts_raw = sa.table("forecasts", *(sa.column(c) for c in _FORECAST_KEYS))


@functools.cache
def _forecast_schema() -> dict[str, pl.DataType]:
    """What save_prediction takes, in _FORECAST_KEYS order (superseded and created_at are
    its own)."""
    import polars as pl

    from forecaster.frames import TS_DTYPE

    return {
        "series_id": pl.Int64(),
        "model": pl.String(),
        "origin_ts": TS_DTYPE,
        "horizon_step": pl.Int64(),
        "model_version_id": pl.Int64(),
        "target_ts": TS_DTYPE,
        "yhat": pl.Float64(),
        "yhat_lower": pl.Float64(),
        "yhat_upper": pl.Float64(),
        "interval_level": pl.Float64(),
        "raw_lower": pl.Float64(),
        "raw_upper": pl.Float64(),
        "revision": pl.Int64(),
    }


# recent_values: ids x spans joined to observations, each pair one primary-key range scan.
# SQLite: CROSS JOIN fixes the loop order (ids, then spans, then the index); the spans are
# [lo, hi] pairs of naive UTC text, which compares like the stored text.
_SQLITE_RECENT_SQL = (
    "SELECT o.series_id, o.ts, o.value FROM json_each(?) AS i CROSS JOIN json_each(?) AS sp "
    "CROSS JOIN observations AS o WHERE o.series_id = i.value "
    "AND o.ts BETWEEN json_extract(sp.value, '$[0]') AND json_extract(sp.value, '$[1]')"
)
# PostgreSQL: as a plain join the planner guesses thousands of rows per (series, span) and
# merge-joins the whole primary key; a LATERAL subquery kept apart by OFFSET 0 forces one
# index range scan per pair. Timestamps come back as epoch microseconds.
_PG_RECENT_SQL = (
    "SELECT i.id, (extract(epoch FROM o.ts) * 1000000)::bigint, o.value "
    "FROM unnest(%s::integer[]) AS i (id) "
    "CROSS JOIN unnest(%s::timestamptz[], %s::timestamptz[]) AS sp (lo, hi) "
    "CROSS JOIN LATERAL (SELECT ts, value FROM observations "
    "WHERE series_id = i.id AND ts BETWEEN sp.lo AND sp.hi OFFSET 0) AS o"
)

# PostgreSQL forecasts: COPY into a temp table, then one INSERT ... SELECT ... ON CONFLICT DO
# NOTHING whose row count is the number of new rows (DESIGN.md decision 6).
_PG_FORECASTS_IN = PgTemp(
    create="CREATE TEMP TABLE IF NOT EXISTS _forecasts_in (series_id integer, model text, "
    "origin_ts timestamptz, horizon_step integer, model_version_id integer, "
    "target_ts timestamptz, yhat double precision, yhat_lower double precision, "
    "yhat_upper double precision, interval_level double precision, "
    "raw_lower double precision, raw_upper double precision, revision integer) ON COMMIT DROP",
    truncate="TRUNCATE _forecasts_in",
    copy="COPY _forecasts_in (series_id, model, origin_ts, horizon_step, model_version_id, "
    "target_ts, yhat, yhat_lower, yhat_upper, interval_level, raw_lower, raw_upper, revision) "
    "FROM STDIN (FORMAT csv)",  # the columns in _FORECAST_KEYS[:13] order
)
_PG_FORECASTS_INSERT_SQL = (
    "INSERT INTO forecasts (series_id, model, origin_ts, horizon_step, model_version_id, "
    "target_ts, yhat, yhat_lower, yhat_upper, interval_level, raw_lower, raw_upper, revision, "
    "superseded, created_at) "
    "SELECT series_id, model, origin_ts, horizon_step, model_version_id, target_ts, yhat, "
    "yhat_lower, yhat_upper, interval_level, raw_lower, raw_upper, revision, false, %(now)s "
    "FROM _forecasts_in "
    "ON CONFLICT (series_id, model, origin_ts, horizon_step, revision) DO NOTHING"
)


def _sqlite_ts(ts: datetime) -> str:
    """A UTC time as SQLAlchemy stores DateTime on SQLite (naive text, microseconds)."""
    return _utc(ts).replace(tzinfo=None).isoformat(" ", "microseconds")


def _merge_spans(spans: Sequence[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """The inclusive spans sorted, overlapping ones merged, so no point is read twice."""
    out: list[tuple[datetime, datetime]] = []
    for lo, hi in sorted(spans):
        if lo > hi:
            continue
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _forecast_frame(forecasts: pl.DataFrame | Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    """The forecasts as a frame of _forecast_schema (revision 0 where not given)."""
    import polars as pl

    schema = _forecast_schema()
    if not isinstance(forecasts, pl.DataFrame):
        forecasts = pl.DataFrame(list(forecasts), schema=schema)
    missing = [c for c in schema if c != "revision" and c not in forecasts.columns]
    if missing:
        raise ValueError(
            f"forecasts lack the column(s) {', '.join(missing)}: give every column of the "
            "forecasts table but revision (optional), superseded and created_at"
        )
    if "revision" not in forecasts.columns:
        forecasts = forecasts.with_columns(pl.lit(0, pl.Int64).alias("revision"))
    return forecasts.select(
        pl.col(c).cast(t).fill_null(0) if c == "revision" else pl.col(c).cast(t)
        for c, t in schema.items()
    )


def _sqlite_forecast_rows(frame: pl.DataFrame, now: datetime) -> Iterator[tuple[Any, ...]]:
    """Rows in _FORECAST_KEYS order for the SQLite executemany, zipped from columns, the
    timestamps as the naive UTC text SQLAlchemy would bind (formatted once per distinct time:
    a chunk has one origin and H targets)."""
    n = frame.height
    columns: list[Any] = []
    for k in _FORECAST_KEYS[:13]:
        col = frame[k]
        if k in ("origin_ts", "target_ts"):
            distinct = col.unique()
            text = dict(
                zip(
                    distinct.to_physical().to_list(),
                    distinct.dt.to_string(_SQLITE_TS_FORMAT).to_list(),
                    strict=True,
                )
            )
            columns.append([text[v] for v in col.to_physical().to_list()])
        else:
            columns.append(col.to_list())
    return zip(*columns, repeat(False, n), repeat(_sqlite_ts(now), n), strict=True)


def _copy_insert_forecasts(conn: Connection, frame: pl.DataFrame, now: datetime) -> int:
    """PostgreSQL: the frame COPYed into a temp table, then inserted where its key is new.
    Returns the number of rows inserted."""
    pg_copy_temp(conn, frame.select(_FORECAST_KEYS[:13]), _PG_FORECASTS_IN)
    return conn.exec_driver_sql(_PG_FORECASTS_INSERT_SQL, {"now": now}).rowcount


@functools.cache
def _sqlite_forecast_insert_sql() -> str:
    """INSERT ... ON CONFLICT DO NOTHING for forecasts, SQLite text with ? in _FORECAST_KEYS order."""
    stmt = sqlite_dialect.insert(_forecasts_raw).values(
        {k: sa.bindparam(k) for k in _FORECAST_KEYS}
    )
    stmt = stmt.on_conflict_do_nothing(index_elements=_FORECAST_PK)
    compiled = stmt.compile(dialect=sqlite_dialect.dialect(paramstyle="qmark"))
    assert tuple(compiled.positiontup or ()) == _FORECAST_KEYS, compiled.positiontup
    return str(compiled)
