"""Rolling prediction: series states, window-edge snapshots and forecasts."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import polars as pl
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection

from forecaster import schema as s
from forecaster.frames import TS_DTYPE
from forecaster.store.base import (
    StoreBase,
    _utc,
)


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
        reissued: Sequence[tuple[int, datetime]] = (),
        late_handled: Sequence[tuple[int, int]] = (),
    ) -> int:
        """Forecasts, the states they came from and window-edge snapshots, in the caller's
        transaction. A forecast already stored (same series, model, origin, step) is kept as
        it is, except at the (series_id, origin_ts) pairs in `reissued` (late data): there
        the current rows of the models in `forecasts` are marked superseded and the new ones
        stored as the next revision. `late_handled` (series_id, late_seq) clears the late
        marks this run handled, unless a newer batch has marked the series again. Returns
        the number of forecast rows written."""
        now = datetime.now(UTC)
        if late_handled:
            w = s.watermarks
            conn.execute(
                sa.update(w)
                .where(w.c.series_id == sa.bindparam("sid"), w.c.late_seq == sa.bindparam("seq"))
                .values(late_from=None),
                [{"sid": sid, "seq": seq} for sid, seq in late_handled],
            )
        if reissued:
            forecasts = self._supersede(conn, forecasts, set(reissued))
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
                    for k in _FORECAST_KEYS[:-3]
                )
                + (r.get("revision", 0), False, now.strftime(fmt))
                for r in forecasts
            ]
            return conn.exec_driver_sql(_sqlite_forecast_insert_sql(), tuples).rowcount
        stmt = (
            self._insert(s.forecasts)
            .on_conflict_do_nothing(index_elements=_FORECAST_PK)
            .returning(s.forecasts.c.series_id)
        )
        rows = [{"revision": 0, **r, "superseded": False, "created_at": now} for r in forecasts]
        return len(conn.execute(stmt, rows).all())

    def _supersede(
        self,
        conn: Connection,
        forecasts: Sequence[Mapping[str, Any]],
        reissued: set[tuple[int, datetime]],
    ) -> list[dict[str, Any]]:
        """Mark the current rows that `forecasts` re-issue superseded; return the forecasts
        numbered as the next revision of each (series, model, origin)."""
        f = s.forecasts
        keys = sorted(
            {
                (r["series_id"], r["model"], r["origin_ts"])
                for r in forecasts
                if (r["series_id"], r["origin_ts"]) in reissued
            }
        )
        if not keys:
            return list(forecasts)
        key_match = sa.and_(
            f.c.series_id == sa.bindparam("sid"),
            f.c.model == sa.bindparam("m"),
            f.c.origin_ts == sa.bindparam("o", type_=s.UTCDateTime),
        )
        revision_of: dict[tuple[int, str, datetime], int] = {}
        for sid, model, origin in keys:
            top = conn.execute(
                sa.select(sa.func.max(f.c.revision)).where(key_match),
                {"sid": sid, "m": model, "o": origin},
            ).scalar_one_or_none()
            revision_of[(sid, model, origin)] = -1 if top is None else int(top)
        conn.execute(
            sa.update(f).where(key_match, f.c.superseded.is_(False)).values(superseded=True),
            [{"sid": sid, "m": m, "o": o} for sid, m, o in keys],
        )
        out = []
        for r in forecasts:
            key = (r["series_id"], r["model"], r["origin_ts"])
            out.append({**r, "revision": revision_of[key] + 1} if key in revision_of else dict(r))
        return out

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
def _sqlite_forecast_insert_sql() -> str:
    """INSERT ... ON CONFLICT DO NOTHING for forecasts, SQLite text with ? in _FORECAST_KEYS order."""
    stmt = sqlite_dialect.insert(_forecasts_raw).values(
        {k: sa.bindparam(k) for k in _FORECAST_KEYS}
    )
    stmt = stmt.on_conflict_do_nothing(index_elements=_FORECAST_PK)
    compiled = stmt.compile(dialect=sqlite_dialect.dialect(paramstyle="qmark"))
    assert tuple(compiled.positiontup or ()) == _FORECAST_KEYS, compiled.positiontup
    return str(compiled)
