"""Rolling prediction: series states, window-edge snapshots and forecasts."""

from __future__ import annotations

import functools
import json
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from itertools import repeat
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection

from forecaster import schema as s
from forecaster.store.base import (
    _SQLITE_TS_FORMAT,
    Bulk,
    PgTemp,
    StoreBase,
    _utc,
    pg_copy_temp,
    sqlite_qmark,
    sqlite_ts,
)

if TYPE_CHECKING:  # polars is imported where frames are built (see forecaster.store)
    import numpy as np
    import polars as pl


class PredictionStore(StoreBase):
    # -- rolling prediction --------------------------------------------------------------

    @contextmanager
    def _large_read(self) -> Iterator[Any]:
        """A raw driver cursor for one large read (its ids bound as one parameter): no
        per-row SQLAlchemy processing. On PostgreSQL results come in binary (no number
        printed by the server and parsed again here: 1.2 million points read in 0.3-0.5 s
        less, states' bytes without hex), and JIT is off for the read's transaction (the
        planner's over-estimate of such a query would JIT-compile it, seconds, for a read of
        milliseconds per series)."""
        with self.engine.connect() as conn:
            sqlite = self.dialect == "sqlite"
            cur = conn.connection.driver_connection.cursor(**({} if sqlite else {"binary": True}))
            try:
                if not sqlite:
                    cur.execute("SET LOCAL jit = off")
                yield cur
            finally:
                cur.close()

    def prediction_targets(self, ids: Collection[int] | None = None) -> list[dict[str, Any]]:
        """Every series (or those of `ids`) with its id, name, frequency, window, watermark
        (None if empty) and late mark (late_from, late_seq: see schema.watermarks). `ids`
        are looked up by their id range and then picked: a shard of a large fleet reads
        its own rows, not the fleet's."""
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
        if ids is not None:
            wanted = set(ids)
            if not wanted:
                return []
            q = q.where(se.c.id.between(min(wanted), max(wanted)))
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
        return rows if ids is None else [r for r in rows if r["id"] in wanted]

    def copied_windows(self) -> pl.DataFrame:
        """series_id, window_s (its window length in seconds) of the series whose window
        copies (schema.window_values) may be read: those without a late mark (a marked
        series' copies from its late point's window on are stale until the predict run that
        handles the mark drops them)."""
        import polars as pl

        se, w = s.series, s.watermarks
        q = (
            sa.select(se.c.id, se.c.window_seconds)
            .select_from(se.outerjoin(w, w.c.series_id == se.c.id))
            .where(w.c.late_from.is_(None))
        )
        return self._frame(q, {"series_id": pl.Int64, "window_s": pl.Int64})

    def load_states(
        self, version_id: int, series_ids: Sequence[int]
    ) -> dict[int, tuple[bytes, list[int], datetime]]:
        """series_id -> (state bytes, shape, state_ts) for the given model version.

        One query through the raw driver, the ids bound as one parameter (a JSON array on
        SQLite, an array on PostgreSQL); the shape and time texts, which a version's states
        share, are parsed once each, not once per row."""
        ids = sorted(set(series_ids))
        if not ids:
            return {}
        with self._large_read() as cur:
            if self.dialect == "sqlite":
                cur.execute(_SQLITE_STATES_SQL, (version_id, json.dumps(ids)))
            else:
                cur.execute(_PG_STATES_SQL, (version_id, ids))
            rows = cur.fetchall()
        shapes: dict[str, list[int]] = {}
        times: dict[Any, datetime] = {}
        out: dict[int, tuple[bytes, list[int], datetime]] = {}
        for sid, state, shape, ts in rows:
            if shape not in shapes:
                shapes[shape] = json.loads(shape)
            if ts not in times:  # naive UTC text on SQLite, an aware time on PostgreSQL
                times[ts] = _utc(datetime.fromisoformat(ts) if isinstance(ts, str) else ts)
            out[sid] = (bytes(state), list(shapes[shape]), times[ts])
        return out

    def window_values(
        self, series_ids: Sequence[int], window_ids: Collection[int]
    ) -> list[tuple[int, int, int, bytes]]:
        """(series_id, window_id, step_seconds, points) of the stored window copies
        (schema.window_values) of those windows of those series that have one."""
        ids, windows = sorted(set(series_ids)), sorted(set(window_ids))
        if not ids or not windows:
            return []
        with self._large_read() as cur:
            if self.dialect == "sqlite":
                cur.execute(_SQLITE_WINDOWS_SQL, (json.dumps(windows), json.dumps(ids)))
            else:
                cur.execute(_PG_WINDOWS_SQL, (windows, ids))
            return [(sid, wid, step, bytes(b)) for sid, wid, step, b in cur.fetchall()]

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
        self,
        series_ids: Sequence[int],
        spans: Sequence[tuple[datetime, datetime]],
        *,
        observed_only: bool = False,
    ) -> pl.DataFrame:
        """series_id, ts, value (NULL when missing) of the points inside any of the inclusive
        time spans: the new points and the few seasonal lags a forecast reads. With
        `observed_only`, the observed points with a value only (no filled or missing ones):
        the actuals a forecast is scored on.

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
        with self._large_read() as cur:
            if self.dialect == "sqlite":
                bounds = [[sqlite_ts(lo), sqlite_ts(hi)] for lo, hi in merged]
                sql = _SQLITE_RECENT_SQL + (_OBSERVED_SQL if observed_only else "")
                cur.execute(sql, (json.dumps(ids), json.dumps(bounds)))
            else:
                los, his = zip(*merged, strict=True)
                sql = _PG_OBSERVED_SQL if observed_only else _PG_RECENT_SQL
                cur.execute(sql, (ids, list(los), list(his)))
            # Columns from batches of rows: zip(*rows) would walk every row per column,
            # and 10^5 live tuples keep the garbage collector busy.
            sid: list[int] = []
            ts: list[Any] = []
            value: list[float | None] = []
            while batch := cur.fetchmany(8192):
                sid += [r[0] for r in batch]
                ts += [r[1] for r in batch]
                value += [r[2] for r in batch]
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
        windows: Sequence[tuple[int, int, int, bytes]] = (),
        windows_stale_from: Sequence[tuple[int, int]] = (),
        windows_kept_from: int | None = None,
    ) -> int:
        """Forecasts, the states they came from and window-edge snapshots, in the caller's
        transaction. `forecasts` is a frame of ledger rows (ledger_rows), or a frame (or
        rows) of long rows with the forecasts view's columns (_forecast_schema; `revision`
        optional, 0), packed here into one ledger row per series, model and origin. An
        origin's forecast already stored (same series, model, origin, revision) is kept as
        it is, except at the (series_id, origin_ts) pairs in `reissued` (late data): there
        the current rows of the models in `forecasts` are marked superseded and the new ones
        stored as the next revision. `late_handled` (series_id, late_seq) clears the late
        marks this run handled, unless a newer batch has marked the series again.
        `windows` (series_id, window_id, step_seconds, points) are stored as the series'
        window copies (schema.window_values) after dropping, for each (series_id,
        window_id) of `windows_stale_from`, that series' copies from that window on (a late
        point's), and, with `windows_kept_from`, the copies before that window of the
        series written. Returns the number of forecast points (series x model x step)
        written."""
        import polars as pl

        now = datetime.now(UTC)

        if isinstance(forecasts, pl.DataFrame) and "points" in forecasts.columns:
            ledger = forecasts.select(*_ledger_schema())  # from ledger_rows
        else:
            frame = _forecast_frame(forecasts)
            ledger = _ledger_frame(frame) if not frame.is_empty() else frame.clear()
        if late_handled:
            w = s.watermarks
            conn.execute(
                sa.update(w)
                .where(w.c.series_id == sa.bindparam("sid"), w.c.late_seq == sa.bindparam("seq"))
                .values(late_from=None),
                [{"sid": sid, "seq": seq} for sid, seq in late_handled],
            )
        if windows_stale_from:
            sql = (
                _SQLITE_DROP_WINDOWS_FROM_SQL
                if self.dialect == "sqlite"
                else _PG_DROP_WINDOWS_FROM_SQL
            )
            conn.exec_driver_sql(sql, list(windows_stale_from))
        if windows:
            self._bulk_upsert(conn, _WINDOW_VALUES, list(windows))
            if windows_kept_from is not None:
                copied = sorted({w[0] for w in windows})
                if self.dialect == "sqlite":
                    params = (windows_kept_from, json.dumps(copied))
                    conn.exec_driver_sql(_SQLITE_PRUNE_WINDOWS_SQL, params)
                else:
                    conn.exec_driver_sql(_PG_PRUNE_WINDOWS_SQL, (windows_kept_from, copied))
        if reissued and not ledger.is_empty():
            ledger = self._supersede(conn, ledger, set(reissued))
        if states:
            shapes = _json_texts(r["shape"] for r in states)
            self._bulk_upsert(
                conn,
                _STATES,
                [
                    (version_id, r["series_id"], r["state"], shape, r["state_ts"], now, weights)
                    for r, shape, weights in zip(
                        states, shapes, _json_texts(r.get("weights") for r in states), strict=True
                    )
                ],
            )
        if snapshots:
            shapes = _json_texts(r["shape"] for r in snapshots)
            self._bulk_upsert(
                conn,
                _SNAPSHOTS,
                [
                    (version_id, r["series_id"], r["window_id"], r["state"], shape, r["state_ts"])
                    for r, shape in zip(snapshots, shapes, strict=True)
                ],
            )
            # The snapshots past the kept ones, the ids bound as one parameter (one
            # statement text whatever the chunk's size, not an IN list of its ids).
            newest = max(r["window_id"] for r in snapshots)
            touched = sorted({r["series_id"] for r in snapshots})
            bounds = (version_id, newest - keep_snapshots, touched[0], touched[-1])
            if self.dialect == "sqlite":
                conn.exec_driver_sql(_SQLITE_PRUNE_SNAPSHOTS_SQL, (*bounds, json.dumps(touched)))
            else:
                conn.exec_driver_sql(_PG_PRUNE_SNAPSHOTS_SQL, (*bounds, touched))
        if ledger.is_empty():
            return 0
        if self.dialect != "sqlite":
            # No check first: the insert skips the keys stored already (ON CONFLICT DO
            # NOTHING) and sums the points of the rows it stored.
            pg_copy_temp(conn, ledger.select(*_LEDGER_KEYS[:10], "n_points"), _PG_LEDGER_IN)
            written = conn.exec_driver_sql(_PG_LEDGER_INSERT_SQL, {"now": now}).scalar_one()
            if written:
                conn.info["wrote"] = True  # work (base._note_write sees no driver call)
            return int(written)
        ledger = self._new_origins(conn, ledger)
        if ledger.is_empty():
            return 0
        conn.info["wrote"] = True  # work (base._note_write sees no driver call)
        # The compiled Core statement straight to the driver's executemany, rows made lazily
        # from columns (no dict per row).
        cur = conn.connection.driver_connection.cursor()
        try:
            cur.executemany(_sqlite_ledger_insert_sql(), _sqlite_ledger_rows(ledger, now))
        finally:
            cur.close()
        return int(ledger["n_points"].sum())

    def _new_origins(self, conn: Connection, ledger: pl.DataFrame) -> pl.DataFrame:
        """The ledger rows whose key (series, model, origin, revision) is not stored yet: a
        forecast already stored is kept as it is, and only new rows count (SQLite; on
        PostgreSQL the insert itself skips the stored keys and counts what it stored)."""
        fo = s.forecast_origins
        key = ["series_id", "model", "origin_ts", "revision"]
        origins = ledger["origin_ts"].unique().sort().to_list()
        models = ledger["model"].unique().sort().to_list()
        ids = ledger["series_id"].unique().sort().to_list()
        found: list[tuple[Any, ...]] = []
        for i in range(0, len(ids), 2000):
            # Seeks on the key's prefix (series, model, origin), not a scan of each series'
            # stored origins.
            q = sa.select(fo.c.series_id, fo.c.model, fo.c.origin_ts, fo.c.revision).where(
                fo.c.series_id.in_(ids[i : i + 2000]),
                fo.c.model.in_(models),
                fo.c.origin_ts.in_(origins),
            )
            found.extend(tuple(r) for r in conn.execute(q))
        if not found:
            return ledger
        import polars as pl

        stored = pl.DataFrame(found, schema=ledger.select(key).schema, orient="row")
        return ledger.join(stored, on=key, how="anti", nulls_equal=True)

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

        f = s.forecast_origins
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
        f = s.forecast_origins
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


# The ledger's columns as save_prediction writes them (superseded and created_at last).
_LEDGER_KEYS = (
    "series_id",
    "model",
    "origin_ts",
    "revision",
    "model_version_id",
    "step_seconds",
    "n_steps",
    "last_target_ts",
    "interval_level",
    "points",
    "superseded",
    "created_at",
)
_LEDGER_PK = ["series_id", "model", "origin_ts", "revision"]
_ledger_raw = sa.table("forecast_origins", *(sa.column(c) for c in _LEDGER_KEYS))
# The band columns of a stored point, after yhat, in the order `points` holds them.
_BAND = ("yhat_lower", "yhat_upper", "raw_lower", "raw_upper")


@functools.cache
def _forecast_schema() -> dict[str, pl.DataType]:
    """The long rows save_prediction takes, one per series, model, origin and step (it packs
    them into ledger rows; superseded and created_at are its own)."""
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

# A version's states of some series (load_states): the ids as one parameter.
_SQLITE_STATES_SQL = (
    "SELECT series_id, state, shape, state_ts FROM series_states WHERE model_version_id = ? "
    "AND series_id IN (SELECT value FROM json_each(?))"
)
_PG_STATES_SQL = (
    "SELECT series_id, state, shape::text, state_ts FROM series_states "
    "WHERE model_version_id = %s AND series_id = ANY(%s::integer[])"
)
# Window-edge snapshots older than the kept ones, of the series a chunk wrote.
# The range of the ids as well as the ids: left to match (version, window <= w) in the primary
# key, PostgreSQL's planner visited every snapshot of the version to find a chunk's (0.17 s a
# chunk of 2,048 at 10,000 series).
_SQLITE_PRUNE_SNAPSHOTS_SQL = (
    "DELETE FROM state_snapshots WHERE model_version_id = ? AND window_id <= ? "
    "AND series_id BETWEEN ? AND ? AND series_id IN (SELECT value FROM json_each(?))"
)
_PG_PRUNE_SNAPSHOTS_SQL = (
    "DELETE FROM state_snapshots WHERE model_version_id = %s AND window_id <= %s "
    "AND series_id BETWEEN %s AND %s AND series_id = ANY(%s::integer[])"
)

# The actuals forecasts are scored on: observed points with a value.
_OBSERVED_SQL = " AND o.quality = 'observed' AND o.value IS NOT NULL"
_PG_OBSERVED_SQL = _PG_RECENT_SQL.replace(
    "AND ts BETWEEN sp.lo AND sp.hi OFFSET 0",
    "AND ts BETWEEN sp.lo AND sp.hi AND quality = 'observed' AND value IS NOT NULL OFFSET 0",
)
assert _PG_OBSERVED_SQL != _PG_RECENT_SQL

# PostgreSQL ledger rows: COPY into a temp table, then one INSERT ... SELECT ... ON CONFLICT DO
# NOTHING (DESIGN.md decision 6).
_PG_LEDGER_IN = PgTemp(
    create="CREATE TEMP TABLE IF NOT EXISTS _forecast_origins_in (series_id integer, "
    "model text, origin_ts timestamptz, revision integer, model_version_id integer, "
    "step_seconds integer, n_steps integer, last_target_ts timestamptz, "
    "interval_level double precision, points text, n_points integer) ON COMMIT DROP",
    truncate="TRUNCATE _forecast_origins_in",
    copy="COPY _forecast_origins_in (series_id, model, origin_ts, revision, model_version_id, "
    "step_seconds, n_steps, last_target_ts, interval_level, points, n_points) "
    "FROM STDIN (FORMAT csv)",  # the columns in _LEDGER_KEYS[:10] order, then n_points
)
# The new rows stored (a key stored already is kept as it is) and the sum of their points.
_PG_LEDGER_INSERT_SQL = (
    "WITH stored AS (INSERT INTO forecast_origins (series_id, model, origin_ts, revision, "
    "model_version_id, step_seconds, n_steps, last_target_ts, interval_level, points, "
    "superseded, created_at) "
    "SELECT series_id, model, origin_ts, revision, model_version_id, step_seconds, n_steps, "
    "last_target_ts, interval_level, points, false, %(now)s FROM _forecast_origins_in "
    "ON CONFLICT (series_id, model, origin_ts, revision) DO NOTHING "
    "RETURNING series_id, model, origin_ts, revision) "
    "SELECT coalesce(sum(i.n_points), 0) FROM stored JOIN _forecast_origins_in AS i "
    "USING (series_id, model, origin_ts, revision)"
)


_STATES = Bulk(
    table="series_states",
    columns=(
        "model_version_id",
        "series_id",
        "state",
        "shape",
        "state_ts",
        "updated_at",
        "weights",
    ),
    key=("model_version_id", "series_id"),
    timestamps=("state_ts", "updated_at"),
    pg=PgTemp(
        create="CREATE TEMP TABLE IF NOT EXISTS _series_states_in (model_version_id integer, "
        "series_id integer, state bytea, shape text, state_ts timestamptz, "
        "updated_at timestamptz, weights text) ON COMMIT DROP",
        truncate="TRUNCATE _series_states_in",
        copy="COPY _series_states_in (model_version_id, series_id, state, shape, state_ts, "
        "updated_at, weights) FROM STDIN",
        copy_binary="COPY _series_states_in (model_version_id, series_id, state, shape, "
        "state_ts, updated_at, weights) FROM STDIN (FORMAT binary)",
        types=("integer", "integer", "bytea", "text", "timestamptz", "timestamptz", "text"),
    ),
    pg_upsert="INSERT INTO series_states (model_version_id, series_id, state, shape, state_ts, "
    "updated_at, weights) SELECT model_version_id, series_id, state, shape::json, state_ts, "
    "updated_at, weights::json FROM _series_states_in "
    "ON CONFLICT (model_version_id, series_id) DO UPDATE SET state = excluded.state, "
    "shape = excluded.shape, state_ts = excluded.state_ts, updated_at = excluded.updated_at, "
    "weights = excluded.weights",
)
_SNAPSHOTS = Bulk(
    table="state_snapshots",
    columns=("model_version_id", "series_id", "window_id", "state", "shape", "state_ts"),
    key=("model_version_id", "series_id", "window_id"),
    timestamps=("state_ts",),
    pg=PgTemp(
        create="CREATE TEMP TABLE IF NOT EXISTS _state_snapshots_in (model_version_id integer, "
        "series_id integer, window_id bigint, state bytea, shape text, state_ts timestamptz) "
        "ON COMMIT DROP",
        truncate="TRUNCATE _state_snapshots_in",
        copy="COPY _state_snapshots_in (model_version_id, series_id, window_id, state, shape, "
        "state_ts) FROM STDIN",
        copy_binary="COPY _state_snapshots_in (model_version_id, series_id, window_id, state, "
        "shape, state_ts) FROM STDIN (FORMAT binary)",
        types=("integer", "integer", "bigint", "bytea", "text", "timestamptz"),
    ),
    pg_upsert="INSERT INTO state_snapshots (model_version_id, series_id, window_id, state, "
    "shape, state_ts) SELECT model_version_id, series_id, window_id, state, shape::json, "
    "state_ts FROM _state_snapshots_in "
    "ON CONFLICT (model_version_id, series_id, window_id) DO UPDATE SET "
    "state = excluded.state, shape = excluded.shape, state_ts = excluded.state_ts",
)


_WINDOW_VALUES = Bulk(
    table="window_values",
    columns=("series_id", "window_id", "step_seconds", "points"),
    key=("series_id", "window_id"),
    timestamps=(),
    pg=PgTemp(
        create="CREATE TEMP TABLE IF NOT EXISTS _window_values_in (series_id integer, "
        "window_id bigint, step_seconds integer, points bytea) ON COMMIT DROP",
        truncate="TRUNCATE _window_values_in",
        copy="COPY _window_values_in (series_id, window_id, step_seconds, points) FROM STDIN",
        copy_binary="COPY _window_values_in (series_id, window_id, step_seconds, points) "
        "FROM STDIN (FORMAT binary)",
        types=("integer", "bigint", "integer", "bytea"),
    ),
    pg_upsert="INSERT INTO window_values (series_id, window_id, step_seconds, points) "
    "SELECT series_id, window_id, step_seconds, points FROM _window_values_in "
    "ON CONFLICT (series_id, window_id) DO UPDATE SET step_seconds = excluded.step_seconds, "
    "points = excluded.points",
)
# A series' window_values from a window on (its late point's), and those of some series
# before a window (past the lags' reach).
_SQLITE_DROP_WINDOWS_FROM_SQL = "DELETE FROM window_values WHERE series_id = ? AND window_id >= ?"
_PG_DROP_WINDOWS_FROM_SQL = "DELETE FROM window_values WHERE series_id = %s AND window_id >= %s"
_SQLITE_PRUNE_WINDOWS_SQL = (
    "DELETE FROM window_values WHERE window_id < ? "
    "AND series_id IN (SELECT value FROM json_each(?))"
)
_PG_PRUNE_WINDOWS_SQL = (
    "DELETE FROM window_values WHERE window_id < %s AND series_id = ANY(%s::integer[])"
)
_SQLITE_WINDOWS_SQL = (
    "SELECT series_id, window_id, step_seconds, points FROM window_values "
    "WHERE window_id IN (SELECT value FROM json_each(?)) "
    "AND series_id IN (SELECT value FROM json_each(?))"
)
_PG_WINDOWS_SQL = (
    "SELECT series_id, window_id, step_seconds, points FROM window_values "
    "WHERE window_id = ANY(%s::bigint[]) AND series_id = ANY(%s::integer[])"
)


def _json_texts(values: Iterator[Any]) -> list[str]:
    """Each value as the JSON text SQLAlchemy's JSON type stores (None as JSON null), the
    text of equal values made once (a chunk's states share one shape)."""
    out: list[str] = []
    last: Any = object()
    text = ""
    for v in values:
        if v != last:
            text, last = json.dumps(v), v
        out.append(text)
    return out


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


def _ledger_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """Long forecast rows (_forecast_schema) as ledger rows, one per series, model, origin
    and revision: `points` the JSON array of the horizon (schema.forecast_origins), n_points
    the steps with a forecast. A key given twice keeps its first row (the table's primary
    key did the same). Every row of one origin must be on one grid: target_ts = origin_ts +
    step x a whole number of seconds, the same for all its steps."""
    import polars as pl

    key = ["series_id", "model", "origin_ts", "revision"]
    frame = frame.unique([*key, "horizon_step"], keep="first", maintain_order=True)
    dt_us = (pl.col("target_ts") - pl.col("origin_ts")).dt.total_microseconds()
    step_us = dt_us // pl.col("horizon_step")
    checked = frame.with_columns(step_us.alias("_step_us"), dt_us.alias("_dt_us"))
    bad = checked.filter(
        (pl.col("horizon_step") < 1)
        | (pl.col("_step_us") <= 0)
        | (pl.col("_step_us") * pl.col("horizon_step") != pl.col("_dt_us"))
        | (pl.col("_step_us") % 1_000_000 != 0)
        | (pl.col("_step_us").min().over(key) != pl.col("_step_us").max().over(key))
    )
    if not bad.is_empty():
        r = bad.row(0, named=True)
        raise ValueError(
            f"forecast of series {r['series_id']}, model {r['model']}, origin {r['origin_ts']}: "
            f"step {r['horizon_step']} targets {r['target_ts']}, not on one grid of whole "
            "seconds from the origin with the origin's other steps"
        )

    points = checked.with_columns(_point_text("yhat", _BAND).alias("_point"))
    n_steps = points.group_by(key).agg(pl.col("horizon_step").max().alias("n_steps"))
    if int(n_steps["n_steps"].sum()) != points.height:  # steps without a forecast: null
        grid = n_steps.select(*key, pl.int_ranges(1, pl.col("n_steps") + 1).alias("horizon_step"))
        points = grid.explode("horizon_step").join(
            points, on=[*key, "horizon_step"], how="left", nulls_equal=True
        )
        points = points.with_columns(pl.col("_point").fill_null("null"))
    points = points.sort([*key, "horizon_step"], maintain_order=True)
    out = points.group_by(key, maintain_order=True).agg(
        pl.col("model_version_id").drop_nulls().first(),
        (pl.col("_step_us").drop_nulls().first() // 1_000_000).alias("step_seconds"),
        pl.col("horizon_step").max().alias("n_steps"),
        pl.col("interval_level").drop_nulls().first(),
        pl.col("_point").str.join(",").alias("points"),
        pl.col("_point").ne("null").sum().alias("n_points"),
    )
    last = pl.col("origin_ts") + pl.duration(seconds=pl.col("step_seconds") * pl.col("n_steps"))
    return out.select(
        pl.col("series_id").cast(pl.Int64),
        "model",
        "origin_ts",
        pl.col("revision").cast(pl.Int64),
        pl.col("model_version_id").cast(pl.Int64),
        pl.col("step_seconds").cast(pl.Int64),
        pl.col("n_steps").cast(pl.Int64),
        last.alias("last_target_ts"),
        pl.col("interval_level").cast(pl.Float64),
        pl.concat_str([pl.lit("["), pl.col("points"), pl.lit("]")]).alias("points"),
        pl.col("n_points").cast(pl.Int64),
    ).cast(_ledger_schema())


# The largest magnitude written at single precision (float32's largest finite value).
_SINGLE_MAX = 3.4028234663852886e38


def _point_text(yhat: str, band: Sequence[str], single: bool = False) -> pl.Expr:
    """One horizon step's entry of `points` (schema.forecast_origins) from the columns
    `yhat` and `band`: "null" where yhat is missing (null or NaN), "[yhat]" where there is
    no band (no band columns, or all of them null), else "[yhat,band...]", a band value that
    is missing (null, NaN or infinite) written null. Shortest text that reads back as the
    same double, or with `single` as the same float32 (a model's forecasts, computed at that
    precision: about half the text; a value beyond float32's range as a double)."""
    import polars as pl

    def num(c: str) -> pl.Expr:
        col = pl.col(c)
        missing = col.is_null() | col.is_nan() | col.is_infinite()
        text = col.cast(pl.String)
        if single:
            short = col.cast(pl.Float32).cast(pl.String)
            text = pl.when(col.abs() <= _SINGLE_MAX).then(short).otherwise(text)
        return pl.when(missing).then(pl.lit("null")).otherwise(text)

    y = pl.col(yhat)
    bare = pl.concat_str([pl.lit("["), num(yhat), pl.lit("]")])
    point = pl.when(y.is_null() | y.is_nan()).then(pl.lit("null"))
    if not band:
        return point.otherwise(bare)
    full = pl.concat_str(
        [pl.lit("["), num(yhat), *(e for c in band for e in (pl.lit(","), num(c))), pl.lit("]")]
    )
    no_band = pl.all_horizontal(pl.col(c).is_null() for c in band)
    return point.when(no_band).then(bare).otherwise(full)


@functools.cache
def _ledger_schema() -> dict[str, pl.DataType]:
    """The ledger frame save_prediction writes (n_points: the steps with a forecast, not
    stored)."""
    import polars as pl

    from forecaster.frames import TS_DTYPE

    return {
        "series_id": pl.Int64(),
        "model": pl.String(),
        "origin_ts": TS_DTYPE,
        "revision": pl.Int64(),
        "model_version_id": pl.Int64(),
        "step_seconds": pl.Int64(),
        "n_steps": pl.Int64(),
        "last_target_ts": TS_DTYPE,
        "interval_level": pl.Float64(),
        "points": pl.String(),
        "n_points": pl.Int64(),
    }


def ledger_rows(
    series_ids: np.ndarray,
    model: str,
    version_id: int | None,
    origin_us: int,
    step_seconds: int,
    yhat: np.ndarray,
    band: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None,
    level: float | None,
) -> pl.DataFrame:
    """One model's forecasts from one origin (epoch microseconds) as ledger rows for
    save_prediction, straight from its (S, H) arrays: `band` is (yhat_lower, yhat_upper,
    raw_lower, raw_upper), None for a baseline; a NaN yhat is a step without a forecast, and
    a series with none at all gets no row. A model's values (with a band) are written at
    float32 precision, the network's own; a baseline's, copies of stored observations, as
    the doubles they are. Vectorised: no group-by, no sort."""
    import numpy as np
    import polars as pl

    from forecaster.frames import TS_DTYPE

    n_series, horizon = yhat.shape
    arrays = [yhat, *(band or ())]
    cols = {f"c{i}": pl.Series(a.reshape(-1), dtype=pl.Float64) for i, a in enumerate(arrays)}

    band_cols = [f"c{i}" for i in range(1, len(arrays))]
    single = band is not None
    text = pl.DataFrame(cols).select(_point_text("c0", band_cols, single).alias("p"))["p"]
    points = text.reshape((n_series, horizon)).arr.join(",")
    n_points = (~np.isnan(yhat)).sum(axis=1)
    keep = n_points > 0
    n = int(keep.sum())
    return pl.DataFrame(
        {
            "series_id": pl.Series(series_ids[keep], dtype=pl.Int64),
            "model": pl.repeat(model, n, dtype=pl.String, eager=True),
            "origin_ts": pl.repeat(origin_us, n, dtype=pl.Int64, eager=True).cast(TS_DTYPE),
            "revision": pl.repeat(0, n, dtype=pl.Int64, eager=True),
            "model_version_id": pl.repeat(version_id, n, dtype=pl.Int64, eager=True),
            "step_seconds": pl.repeat(step_seconds, n, dtype=pl.Int64, eager=True),
            "n_steps": pl.repeat(horizon, n, dtype=pl.Int64, eager=True),
            "last_target_ts": pl.repeat(
                origin_us + horizon * step_seconds * 1_000_000, n, dtype=pl.Int64, eager=True
            ).cast(TS_DTYPE),
            "interval_level": pl.repeat(level, n, dtype=pl.Float64, eager=True),
            "points": ("[" + points + "]").filter(pl.Series(keep)),
            "n_points": pl.Series(n_points[keep], dtype=pl.Int64),
        },
        schema=_ledger_schema(),
    )


def _sqlite_ledger_rows(ledger: pl.DataFrame, now: datetime) -> Iterator[tuple[Any, ...]]:
    """Rows in _LEDGER_KEYS order for the SQLite executemany, zipped from columns, the
    timestamps as the naive UTC text SQLAlchemy would bind (formatted once per distinct
    time: a chunk has one origin)."""
    n = ledger.height
    columns: list[Any] = []
    for k in _LEDGER_KEYS[:10]:
        col = ledger[k]
        if k in ("origin_ts", "last_target_ts"):
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
    return zip(*columns, repeat(False, n), repeat(sqlite_ts(now), n), strict=True)


@functools.cache
def _sqlite_ledger_insert_sql() -> str:
    """INSERT ... ON CONFLICT DO NOTHING for forecast_origins, SQLite text with ? in
    _LEDGER_KEYS order."""
    stmt = sqlite_dialect.insert(_ledger_raw).values({k: sa.bindparam(k) for k in _LEDGER_KEYS})
    stmt = stmt.on_conflict_do_nothing(index_elements=_LEDGER_PK)
    return sqlite_qmark(stmt, _LEDGER_KEYS)
