"""Reads for the daemon's HTTP app: what /metrics and /readyz show, straight from SQL.

A scrape runs these every 15 s or so, so each is bounded: per-series reads take an explicit
list of series ids (the ones /metrics exposes) and find "the newest" with correlated
`max()` / `ORDER BY ... LIMIT 1` subqueries that the forecast ledger's primary key
(series_id, model, origin_ts, revision) answers by its prefix with a few index probes per
series, however long the history, then read the ledger rows they name and pick the horizon
step in Python (the long `forecasts` view unnests whatever it is joined to).
Superseded rows are filtered by `superseded == false()`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from forecaster import schema as s
from forecaster.store.base import StoreBase

_CHUNK = 500  # series ids per statement: well inside every driver's bound-parameter limit


def _chunks(ids: Sequence[int]) -> Iterator[list[int]]:
    ids = sorted(set(ids))
    for i in range(0, len(ids), _CHUNK):
        yield ids[i : i + _CHUNK]


def _current(f: sa.Table | sa.Alias, model: str) -> sa.ColumnElement[bool]:
    """The model's current (not superseded) forecasts, of the ledger or of its long view."""
    return sa.and_(f.c.model == model, f.c.superseded == sa.false())


class ServiceStore(StoreBase):
    # -- what /metrics reads at scrape time ----------------------------------------------

    def metrics_generation(self) -> tuple:
        """A cheap marker of everything /metrics shows, changing whenever a job changes it:
        series (the finest step first, then the count) and versions (counts, the champion),
        ingest (watermarks, cursors, quarantine), predict (states), evaluate (calibration,
        anomaly thresholds, states, incidents, fleet events), new-series scalers. One round trip of maxima and counts over small tables (none over
        forecasts or observations)."""
        mv = s.model_versions

        def one(expr: Any, table: sa.Table, where: Any = None) -> sa.ScalarSelect:
            q = sa.select(expr).select_from(table)
            return (q.where(where) if where is not None else q).scalar_subquery()

        q = sa.select(
            one(sa.func.min(s.series.c.freq_seconds), s.series),  # first: the finest step
            one(sa.func.count(), s.series),
            one(sa.func.count(), mv),
            one(sa.func.max(mv.c.id), mv, mv.c.stage == "champion"),
            one(sa.func.count(), mv, mv.c.stage == "retired"),
            one(sa.func.max(s.watermarks.c.updated_at), s.watermarks),
            one(sa.func.max(s.source_cursors.c.updated_at), s.source_cursors),
            one(sa.func.max(s.quarantine.c.id), s.quarantine),
            one(sa.func.max(s.series_states.c.updated_at), s.series_states),
            one(sa.func.max(s.calibration_offsets.c.updated_at), s.calibration_offsets),
            one(sa.func.max(s.calibration.c.updated_at), s.calibration),
            one(sa.func.count(), s.series_scalers),
            one(sa.func.max(s.anomaly_thresholds.c.updated_at), s.anomaly_thresholds),
            one(sa.func.max(s.anomaly_state.c.updated_at), s.anomaly_state),
            one(sa.func.count(), s.incidents),
            one(sa.func.count(), s.fleet_events),
        )
        with self.engine.connect() as conn:
            return tuple(conn.execute(q).one())

    def series_catalogue(self) -> list[tuple[int, str]]:
        """(id, name) of every series: the metrics filter, sort and bound them."""
        se = s.series
        with self.engine.connect() as conn:
            return [(sid, name) for sid, name in conn.execute(sa.select(se.c.id, se.c.name))]

    def latest_actuals(
        self, series_ids: Sequence[int], model: str | None
    ) -> dict[int, dict[str, Any]]:
        """series_id -> {ts, value, yhat_lower, yhat_upper}: the newest observed actual (quality
        'observed', value not NULL) and the band of `model`'s newest current forecast for that
        time (None when there is none, or when model is None). Series without an observed
        actual are absent.

        The newest forecast for time t comes from the newest origin before t: every origin of
        one model forecasts the same number of steps, so an older origin cannot reach t when
        the newest one does not. That origin's ledger row is read and the step for t picked
        from it here (joining the long view instead would unnest every origin)."""
        se, o, fo = s.series, s.observations, s.forecast_origins
        out: dict[int, dict[str, Any]] = {}

        def newest(col: Any) -> Any:  # of the series' newest observed actual
            return (
                sa.select(col)
                .where(o.c.series_id == se.c.id, o.c.quality == "observed", o.c.value.is_not(None))
                .order_by(o.c.ts.desc())
                .limit(1)
                .scalar_subquery()
            )

        for ids in _chunks(series_ids):
            # Its time and value each by a backward scan of the series' primary key: joined
            # back to observations on (series, time), PostgreSQL planned a hash join over a
            # sequential scan of the whole table until its first ANALYZE (about 50 s a
            # snapshot at 10,000 series).
            latest = (
                sa.select(
                    se.c.id.label("series_id"),
                    newest(o.c.ts).label("ts"),
                    newest(o.c.value).label("value"),
                )
                .where(se.c.id.in_(ids))
                .subquery("latest")
            )
            cols: list[Any] = [latest.c.series_id, latest.c.ts, latest.c.value]
            if model is not None:
                origin = (
                    sa.select(sa.func.max(fo.c.origin_ts))
                    .where(
                        fo.c.series_id == latest.c.series_id,
                        _current(fo, model),
                        fo.c.origin_ts < latest.c.ts,
                    )
                    .scalar_subquery()
                )
                cols.append(origin.label("origin_ts"))
            q = sa.select(*cols).where(latest.c.ts.is_not(None))
            with self.engine.connect() as conn:
                found = [r._mapping for r in conn.execute(q)]
                entries = (
                    self._entries(
                        conn, model, [(r["series_id"], r["origin_ts"], r["ts"]) for r in found]
                    )
                    if model is not None
                    else {}
                )
            for r in found:
                target, point = entries.get((r["series_id"], r.get("origin_ts")), (None, None))
                if target != r["ts"]:  # that origin forecast no step at that time
                    point = None
                out[r["series_id"]] = {
                    "ts": r["ts"],
                    "value": r["value"],
                    "yhat_lower": point[1] if point is not None and len(point) > 2 else None,
                    "yhat_upper": point[2] if point is not None and len(point) > 2 else None,
                }
        return out

    def _entries(
        self, conn: Any, model: str, wanted: Sequence[tuple[int, datetime | None, datetime]]
    ) -> dict[tuple[int, datetime], tuple[datetime, list[float] | None]]:
        """For each (series_id, origin_ts, t) of `wanted` whose origin has a current ledger
        row of `model`: (series_id, origin_ts) -> (target, entry) of the newest step whose
        target is at or before t (pairs with no such step are left out), entry its [yhat,
        yhat_lower, yhat_upper, raw_lower, raw_upper] ([yhat] for a baseline; None where
        the step has no forecast). The rows' horizons are decoded together (polars), not
        one JSON text at a time."""
        import polars as pl

        fo = s.forecast_origins
        at = {(sid, origin): t for sid, origin, t in wanted if origin is not None}
        if not at:
            return {}
        q = sa.select(
            fo.c.series_id, fo.c.origin_ts, fo.c.step_seconds, fo.c.n_steps, fo.c.points
        ).where(
            fo.c.series_id.in_(sorted({sid for sid, _ in at})),
            _current(fo, model),
            fo.c.origin_ts.in_(sorted({origin for _, origin in at})),
        )
        keys, targets, index, texts = [], [], [], []
        for sid, origin, step_s, n_steps, points in conn.execute(q):
            t = at.get((sid, origin))
            if t is None:
                continue
            k = min(int(n_steps), int((t - origin).total_seconds() // step_s))
            if k >= 1:
                keys.append((sid, origin))
                targets.append(origin + timedelta(seconds=k * step_s))
                index.append(k - 1)
                texts.append(points)
        if not keys:
            return {}
        decoded = pl.Series(texts, dtype=pl.String).str.json_decode(pl.List(pl.List(pl.Float64)))
        picked = pl.DataFrame({"p": decoded, "i": index}).select(pl.col("p").list.get(pl.col("i")))
        entries = picked.to_series().to_list()
        return {
            key: (target, entry) for key, target, entry in zip(keys, targets, entries, strict=True)
        }

    def newest_origin_forecasts(
        self, model: str, series_ids: Sequence[int], horizon_steps: Sequence[int]
    ) -> list[dict[str, Any]]:
        """The current forecast rows of `model` at its newest origin per series, only at the
        given horizon steps: series_id, origin_ts, target_ts, horizon_step, yhat, yhat_lower,
        yhat_upper, interval_level."""
        se, f, fo = s.series, s.forecasts, s.forecast_origins
        steps = sorted(set(horizon_steps))
        rows: list[dict[str, Any]] = []
        if not steps:
            return rows
        for ids in _chunks(series_ids):
            newest = (
                sa.select(sa.func.max(fo.c.origin_ts))
                .where(fo.c.series_id == se.c.id, _current(fo, model))
                .scalar_subquery()
            )
            origins = (
                sa.select(se.c.id.label("series_id"), newest.label("origin_ts"))
                .where(se.c.id.in_(ids))
                .subquery("origins")
            )
            q = (
                sa.select(
                    f.c.series_id,
                    f.c.origin_ts,
                    f.c.target_ts,
                    f.c.horizon_step,
                    f.c.yhat,
                    f.c.yhat_lower,
                    f.c.yhat_upper,
                    f.c.interval_level,
                )
                .join(
                    origins,
                    sa.and_(
                        f.c.series_id == origins.c.series_id, f.c.origin_ts == origins.c.origin_ts
                    ),
                )
                .where(_current(f, model), f.c.horizon_step.in_(steps))
                .order_by(f.c.series_id, f.c.horizon_step)
            )
            with self.engine.connect() as conn:
                rows.extend(dict(r._mapping) for r in conn.execute(q))
        return rows

    def newest_origins(self, model: str, series_ids: Sequence[int]) -> dict[int, datetime]:
        """series_id -> the newest origin_ts of `model`'s current forecasts, for the series
        that have any (what "forecasts stale" alerts compare with the newest actual)."""
        se, f = s.series, s.forecast_origins
        out: dict[int, datetime] = {}
        for ids in _chunks(series_ids):
            newest = (
                sa.select(sa.func.max(f.c.origin_ts))
                .where(f.c.series_id == se.c.id, _current(f, model))
                .scalar_subquery()
            )
            q = sa.select(se.c.id, newest.label("origin_ts")).where(se.c.id.in_(ids))
            with self.engine.connect() as conn:
                out.update({sid: ts for sid, ts in conn.execute(q) if ts is not None})
        return out

    def forecasts_at(
        self, model: str, series_ids: Sequence[int], now: datetime
    ) -> dict[int, dict[str, Any]]:
        """series_id -> {origin_ts, target_ts, yhat, yhat_lower, yhat_upper}: among `model`'s
        current forecasts of the series, the one with the newest target_ts <= now, from the
        newest origin that covers that target.

        That origin is the newest one with any target <= now: its targets run contiguously
        from step 1, and every origin of one model forecasts the same number of steps, so no
        older origin reaches a later target <= now. It is the newest origin before now, or
        the one before that when now is less than a step past the newest: both are found by
        the ledger's key, read, and the step picked here."""
        se, fo = s.series, s.forecast_origins
        out: dict[int, dict[str, Any]] = {}
        for ids in _chunks(series_ids):
            newest = (
                sa.select(sa.func.max(fo.c.origin_ts))
                .where(fo.c.series_id == se.c.id, _current(fo, model), fo.c.origin_ts < now)
                .scalar_subquery()
            )
            origins = (
                sa.select(se.c.id.label("series_id"), newest.label("o1"))
                .where(se.c.id.in_(ids))
                .subquery("origins")
            )
            before = (
                sa.select(sa.func.max(fo.c.origin_ts))
                .where(
                    fo.c.series_id == origins.c.series_id,
                    _current(fo, model),
                    fo.c.origin_ts < origins.c.o1,
                )
                .scalar_subquery()
            )
            q = sa.select(origins.c.series_id, origins.c.o1, before.label("o2")).where(
                origins.c.o1.is_not(None)
            )
            with self.engine.connect() as conn:
                found = conn.execute(q).all()
                # The newest origin first; the one before only where that has no step yet
                # (now less than a step past it): one horizon decoded per series, not two.
                entries = self._entries(conn, model, [(sid, o1, now) for sid, o1, _ in found])
                entries |= self._entries(
                    conn,
                    model,
                    [(sid, o2, now) for sid, o1, o2 in found if (sid, o1) not in entries],
                )
            for sid, o1, o2 in found:
                for origin in (o1, o2):
                    target, p = entries.get((sid, origin), (None, None))
                    if p is not None:
                        out[sid] = {
                            "origin_ts": origin,
                            "target_ts": target,
                            "yhat": p[0],
                            "yhat_lower": p[1] if len(p) > 2 else None,
                            "yhat_upper": p[2] if len(p) > 2 else None,
                        }
                        break
        return out

    def anomaly_counts(self, series_ids: Sequence[int]) -> dict[int, int]:
        """series_id -> rows in `anomalies` (every model), for the series that have any."""
        a = s.anomalies
        out: dict[int, int] = {}
        for ids in _chunks(series_ids):
            q = (
                sa.select(a.c.series_id, sa.func.count())
                .where(a.c.series_id.in_(ids))
                .group_by(a.c.series_id)
            )
            with self.engine.connect() as conn:
                out.update({sid: int(n) for sid, n in conn.execute(q)})
        return out

    def incident_counts(self, series_ids: Sequence[int]) -> dict[int, int]:
        """series_id -> rows in `incidents` (every model), for the series that have any."""
        i = s.incidents
        out: dict[int, int] = {}
        for ids in _chunks(series_ids):
            q = (
                sa.select(i.c.series_id, sa.func.count())
                .where(i.c.series_id.in_(ids))
                .group_by(i.c.series_id)
            )
            with self.engine.connect() as conn:
                out.update({sid: int(n) for sid, n in conn.execute(q)})
        return out

    def fleet_summary(self, model: str) -> dict[str, Any]:
        """For the metrics, over every series of `model`: series (with a scored point),
        in_incident (of them, with an incident open), newest (their newest scored time),
        events (fleet events of every model), newest_event_end (the model's newest event's
        end)."""
        a, f = s.anomaly_state, s.fleet_events
        q = sa.select(
            sa.select(sa.func.count()).where(a.c.model == model).scalar_subquery(),
            sa.select(sa.func.count())
            .where(a.c.model == model, a.c.incident_open.is_(True))
            .scalar_subquery(),
            sa.select(sa.func.max(a.c.ts)).where(a.c.model == model).scalar_subquery(),
            sa.select(sa.func.count()).select_from(f).scalar_subquery(),
            sa.select(sa.func.max(f.c.end_ts)).where(f.c.model == model).scalar_subquery(),
        )
        with self.engine.connect() as conn:
            n, open_, newest, events, event_end = conn.execute(q).one()
        return {
            "series": int(n),
            "in_incident": int(open_),
            "newest": newest,
            "events": int(events),
            "newest_event_end": event_end,
        }

    def mase_by_series(self, series_ids: Sequence[int]) -> list[tuple[int, str, float]]:
        """(series_id, model, mase) rows of series_accuracy; rows without a MASE are left out."""
        a = s.series_accuracy
        rows: list[tuple[int, str, float]] = []
        for ids in _chunks(series_ids):
            q = (
                sa.select(a.c.series_id, a.c.model, a.c.mase)
                .where(a.c.series_id.in_(ids), a.c.mase.is_not(None))
                .order_by(a.c.series_id, a.c.model)
            )
            with self.engine.connect() as conn:
                rows.extend((sid, model, float(mase)) for sid, model, mase in conn.execute(q))
        return rows

    def pooled_coverage(self, model: str) -> float | None:
        """`model`'s band coverage over every series in series_accuracy, weighted by n_scored;
        None when nothing is scored."""
        a = s.series_accuracy
        q = sa.select(sa.func.sum(a.c.coverage * a.c.n_scored), sa.func.sum(a.c.n_scored)).where(
            a.c.model == model, a.c.coverage.is_not(None), a.c.n_scored > 0
        )
        with self.engine.connect() as conn:
            hits, n = conn.execute(q).one()
        return float(hits) / float(n) if n else None

    def serving_models(self, limit: int = 100) -> list[dict[str, Any]]:
        """id, kind, stage of the champion and the newest candidates (not retired ones)."""
        mv = s.model_versions
        q = (
            sa.select(mv.c.id, mv.c.kind, mv.c.stage)
            .where(mv.c.stage.in_(("champion", "candidate")))
            .order_by(sa.case((mv.c.stage == "champion", 0), else_=1), mv.c.id.desc())
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def source_rows(self) -> dict[str, int]:
        """source -> rows_total of its cursor: observed points ingested, ever."""
        c = s.source_cursors
        with self.engine.connect() as conn:
            return {
                src: int(n)
                for src, n in conn.execute(
                    sa.select(c.c.source, c.c.rows_total).order_by(c.c.source)
                )
            }

    def source_ingest_times(self) -> dict[str, datetime]:
        """source -> updated_at of its cursor: the wall-clock time of its last committed batch
        (an empty batch that moves the cursor counts)."""
        c = s.source_cursors
        with self.engine.connect() as conn:
            return dict(
                conn.execute(sa.select(c.c.source, c.c.updated_at).order_by(c.c.source)).all()
            )

    def quarantine_counts(self) -> list[tuple[str, str, int]]:
        """(source, reason, rows) of the quarantine table."""
        q = s.quarantine
        stmt = (
            sa.select(q.c.source, q.c.reason, sa.func.count())
            .group_by(q.c.source, q.c.reason)
            .order_by(q.c.source, q.c.reason)
        )
        with self.engine.connect() as conn:
            return [(src, reason, int(n)) for src, reason, n in conn.execute(stmt)]
