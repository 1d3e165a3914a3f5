"""The prediction store's bulk paths (recent points, forecast inserts), both dialects, each
checked against a naive reference or the rows it was given."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
import sqlalchemy as sa

from forecaster import frames as F
from forecaster import schema
from forecaster.store import Store

DAY = 86400
T0 = datetime(2013, 1, 1, tzinfo=UTC)


@pytest.fixture
def store(db_url):
    st = Store(db_url)
    st.upgrade()
    yield st
    st.close()


def _series(store, names):
    with store.begin() as conn:
        ids = store.resolve_series(
            conn, names, create=True, source="t", freq_seconds=3600, window_seconds=DAY
        )
    return [ids[n] for n in names]


def test_recent_values_reads_exactly_the_points_inside_the_spans(store):
    a, b, other = _series(store, ["a", "b", "c"])
    rows = [
        (sid, T0 + timedelta(hours=h), None if (sid, h) == (a, 30) else sid * 1000 + h + 1 / 3)
        for sid in (a, b, other)
        for h in range(72)
        if (sid, h) != (b, 40)  # a gap: nothing stored
    ]
    pts = pl.DataFrame(
        rows, schema={"series_id": pl.Int64, "ts": F.TS_DTYPE, "value": pl.Float64}, orient="row"
    ).with_columns(quality=pl.lit("observed"))
    with store.begin() as conn:
        store.upsert_observations(conn, F.assign_windows(pts, DAY * 10**6))
    h = lambda k: T0 + timedelta(hours=k)  # noqa: E731
    spans = [(h(60), h(71)), (h(28), h(42)), (h(36), h(50)), (h(5), h(5)), (h(9), h(8))]
    got = store.recent_values([b, a, a], spans).sort("series_id", "ts")

    def inside(ts):
        return any(lo <= ts <= hi for lo, hi in spans)

    want = sorted((sid, ts, v) for sid, ts, v in rows if sid in (a, b) and inside(ts))
    assert got.schema == pl.Schema({"series_id": pl.Int64, "ts": F.TS_DTYPE, "value": pl.Float64})
    assert got.rows() == want  # each point once, though two spans overlap; NULL kept; exact
    assert store.recent_values([a], []).height == 0
    assert store.recent_values([], spans).height == 0


def _forecasts(sids, origin, models=("v", "seasonal_naive_daily"), steps=3):
    rows = []
    for sid in sids:
        for m in models:
            for k in range(1, steps + 1):
                y = math.pi * sid + k / 7
                band = m == "v"
                rows.append(
                    {
                        "series_id": sid,
                        "model": m,
                        "model_version_id": None,
                        "origin_ts": origin,
                        "horizon_step": k,
                        "target_ts": origin + timedelta(hours=k),
                        "yhat": y,
                        "yhat_lower": y - 0.1 if band else None,
                        "yhat_upper": y + 0.1 if band else None,
                        "interval_level": 0.8 if band else None,
                        "raw_lower": y - 0.05 if band else None,
                        "raw_upper": y + 0.05 if band else None,
                    }
                )
    return rows


# The long view's columns as compared here: its key first (series, model, origin, step,
# revision), superseded last.
_COLUMNS = (
    "series_id",
    "model",
    "origin_ts",
    "horizon_step",
    "revision",
    "model_version_id",
    "target_ts",
    "yhat",
    "yhat_lower",
    "yhat_upper",
    "interval_level",
    "raw_lower",
    "raw_upper",
    "superseded",
)


def _stored(store) -> list[tuple]:
    f = schema.forecasts
    cols = [f.c[k] for k in _COLUMNS]
    with store.engine.connect() as conn:
        got = conn.execute(sa.select(*cols).order_by(*cols[:5])).all()
    return [tuple(r) for r in got]


def _save(store, forecasts, reissued=()):
    with store.begin() as conn:
        return store.save_prediction(
            conn,
            version_id=0,
            states=[],
            snapshots=[],
            forecasts=forecasts,
            keep_snapshots=7,
            reissued=reissued,
        )


def _as_stored(rows, revision=0, superseded=False):
    keys = _COLUMNS
    out = [{**r, "revision": revision, "superseded": superseded} for r in rows]
    return [tuple(r[k] for k in keys) for r in out]


def test_forecast_inserts_are_exactly_once_and_count_only_new_rows(store):
    a, b, c = _series(store, ["a", "b", "c"])
    first = _forecasts([a, b], T0)
    assert _save(store, pl.DataFrame(first)) == 12
    assert _stored(store) == sorted(_as_stored(first))  # every value as given, floats exact
    assert _save(store, pl.DataFrame(first)) == 0  # the same keys again: a no-op
    # Rows (not a frame) are taken too; only the new series' rows count.
    assert _save(store, _forecasts([b, c], T0)) == 6
    assert len(_stored(store)) == 18
    assert _save(store, []) == 0


def test_a_reissue_supersedes_the_current_rows_and_numbers_the_next_revision(store):
    a, b = _series(store, ["a", "b"])
    t1 = T0 + timedelta(hours=1)
    _save(store, _forecasts([a, b], T0) + _forecasts([a, b], t1))
    again = [{**r, "yhat": r["yhat"] + 1} for r in _forecasts([a, b], T0) + _forecasts([a], t1)]
    for revision in (1, 2):
        # Re-issued at (a, T0) only: b's and a's t1 rows in the batch are stored keys, kept.
        assert _save(store, pl.DataFrame(again), reissued=[(a, T0)]) == 6
        rows = _stored(store)
        current = [r for r in rows if not r[-1]]
        assert len(current) == len({r[:4] for r in rows}) == 24  # one current row per key
        assert {r[4] for r in current if (r[0], r[2]) == (a, T0)} == {revision}
        assert all(r[4] == 0 for r in current if (r[0], r[2]) != (a, T0))
        assert sum(1 for r in rows if r[-1]) == 6 * revision


@pytest.mark.parametrize(
    "target",
    [
        lambda origin, k: origin + timedelta(hours=k, minutes=1 if k == 2 else 0),  # off-grid
        lambda origin, k: origin + timedelta(hours=k * (2 if k == 3 else 1)),  # two steps
        lambda origin, k: origin - timedelta(hours=k),  # before the origin
    ],
    ids=["off_grid", "uneven_steps", "backwards"],
)
def test_forecasts_off_one_grid_are_refused_with_their_key_and_nothing_is_stored(store, target):
    """The ledger stores a target as origin + step x step_seconds: rows of one origin whose
    targets are not on one grid of whole seconds cannot be stored as given, so the write
    is refused, naming the series, model, origin and step, and nothing of it lands."""
    (a,) = _series(store, ["a"])
    rows = [
        {**r, "target_ts": target(r["origin_ts"], r["horizon_step"])} for r in _forecasts([a], T0)
    ]
    with pytest.raises(
        ValueError, match=rf"series {a}, model (v|seasonal_naive_daily), origin .*step \d"
    ):
        _save(store, rows)
    assert _stored(store) == []
    assert _save(store, _forecasts([a], T0)) == 6  # the same keys on the grid: stored
