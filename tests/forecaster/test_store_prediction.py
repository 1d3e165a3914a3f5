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


def test_a_stored_forecast_is_kept_where_a_writer_beside_stored_it_after_the_check(
    store, monkeypatch
):
    """On SQLite save_prediction writes the keys it found new; a key stored after that check
    (a writer beside this one: here, the check told to find nothing) keeps its stored row,
    the new keys are stored, and nothing is refused. PostgreSQL checks nothing first: its
    insert keeps every stored key (ON CONFLICT DO NOTHING) and counts the points it stored."""
    a, b = _series(store, ["a", "b"])
    first = _forecasts([a], T0)
    _save(store, pl.DataFrame(first))
    monkeypatch.setattr(type(store), "_new_origins", lambda self, conn, ledger: ledger)
    again = [{**r, "yhat": r["yhat"] + 1.0} for r in _forecasts([a, b], T0)]
    written = _save(store, pl.DataFrame(again))
    if store.dialect == "postgresql":
        assert written == 6  # b's points only
    assert _stored(store) == sorted(
        _as_stored(first) + _as_stored([r for r in again if r["series_id"] == b])
    )


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


def test_scored_forecasts_are_the_views_rows_joined_to_their_observed_actuals(store):
    """The evaluate job's reader decodes ledger rows itself; the `forecasts` view joined to
    `observations` by its key is the contract it must equal: current revisions only, steps
    without a forecast left out, only observed actuals with a value (not filled, missing
    or absent ones), targets from `since` on, a baseline's rows without a band, and the
    series filter."""
    a, b = _series(store, ["a", "b"])
    h = lambda k: T0 + timedelta(hours=k)  # noqa: E731
    quality = {(a, 2): "filled", (b, 3): "missing"}
    rows = [
        (
            sid,
            h(k),
            None if quality.get((sid, k)) == "missing" else sid + k / 3,
            quality.get((sid, k), "observed"),
        )
        for sid in (a, b)
        for k in range(1, 9)
        if (sid, k) != (a, 5)  # no point stored at all
    ]
    pts = pl.DataFrame(
        rows,
        schema={"series_id": pl.Int64, "ts": F.TS_DTYPE, "value": pl.Float64, "quality": pl.String},
        orient="row",
    )
    with store.begin() as conn:
        store.upsert_observations(conn, F.assign_windows(pts, DAY * 10**6))
    first = _forecasts([a, b], h(0), steps=6)
    gap = [
        r
        for r in _forecasts([a, b], h(3), steps=6)
        if not (r["series_id"] == b and r["horizon_step"] == 2)
    ]
    _save(store, first + gap)
    # A late point: the origin at hour 3 is issued again; its first revision is superseded.
    again = [{**r, "yhat": r["yhat"] + 1.0} for r in _forecasts([a], h(3), steps=6)]
    _save(store, again, reissued=[(a, h(3))])

    oracle = sa.text(
        "SELECT f.series_id, f.origin_ts, f.target_ts, f.horizon_step, f.yhat, f.yhat_lower, "
        "f.yhat_upper, f.raw_lower, f.raw_upper, f.interval_level, o.value AS actual "
        "FROM forecasts AS f JOIN observations AS o ON o.series_id = f.series_id "
        "AND o.ts = f.target_ts WHERE f.model = :model AND f.superseded = false "
        "AND f.target_ts >= :since AND o.quality = 'observed' AND o.value IS NOT NULL"
    )
    key = ["series_id", "origin_ts", "horizon_step"]
    checked = 0
    for model in ("v", "seasonal_naive_daily"):
        for since in (h(0), h(5)):
            for ids in (None, [b]):
                got = store.scored_forecasts(model, since, ids).sort(key)
                with store.engine.connect() as conn:
                    want = [
                        r
                        for r in conn.execute(
                            oracle.bindparams(
                                sa.bindparam("model", model),
                                sa.bindparam("since", since, type_=schema.UTCDateTime),
                            )
                        ).all()
                        if ids is None or r[0] in ids
                    ]
                want = sorted((r[0], _utc(r[1]), _utc(r[2]), *r[3:]) for r in want)
                assert got.rows() == want, (model, since, ids)
                checked += len(want)
    assert checked > 20
    # By hand, one origin: the second revision's values, at hours 4, 6, 7 and 8 (5: no
    # point stored; 9: past the stored points).
    v = store.scored_forecasts("v", h(0)).filter(
        pl.col("series_id") == a, pl.col("origin_ts") == h(3)
    )
    assert v.sort("horizon_step")["horizon_step"].to_list() == [1, 3, 4, 5]
    assert v.sort("horizon_step")["yhat"].to_list() == [
        math.pi * a + k / 7 + 1.0 for k in (1, 3, 4, 5)
    ]
    # The points alone, of the forecasts made before a time: the view's current rows of
    # the origins before it, with an actual or without (b's step 2 at hour 3 has no row).
    view = sa.text(
        "SELECT series_id, origin_ts, target_ts, horizon_step, yhat, yhat_lower, yhat_upper, "
        "raw_lower, raw_upper, interval_level FROM forecasts WHERE model = 'v' "
        "AND superseded = false AND target_ts >= :since AND origin_ts < :before"
    )
    for before in (h(3), h(4)):
        got = store.forecast_points("v", h(2), None, before).sort(key)
        with store.engine.connect() as conn:
            want = conn.execute(
                view.bindparams(
                    sa.bindparam("since", h(2), type_=schema.UTCDateTime),
                    sa.bindparam("before", before, type_=schema.UTCDateTime),
                )
            ).all()
        want = sorted((r[0], _utc(r[1]), _utc(r[2]), *r[3:]) for r in want)
        assert got.rows() == want and len(want) == {h(3): 10, h(4): 21}[before], before


def _utc(ts):
    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts)
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def test_a_models_points_are_written_at_float32_and_a_baselines_as_exact_doubles(store):
    """ledger_rows (what predict writes): a model's values, which the network computes at
    single precision, as the shortest text of their float32 (half the bytes of a double's);
    a baseline's, copies of stored observations, read back as the very same doubles; and a
    model's value beyond float32's range as the double it is."""
    import numpy as np

    from forecaster.store.prediction import ledger_rows

    (a,) = _series(store, ["a"])
    single = np.array([[0.3, 1234.5678, -7.1]], dtype=np.float32)
    yhat = single.astype(np.float64)
    yhat_far = np.array([[1e39, 2.0, 3.0]])
    band = tuple(yhat + d for d in (-1.0, 1.0, -2.0, 2.0))
    naive = np.array([[0.1, 16777217.0, 1e300]])
    origin_us = int(T0.timestamp()) * 1_000_000
    ids = np.array([a])
    frames_ = [
        ledger_rows(ids, "mstl", None, origin_us, 3600, yhat, band, 0.8),
        ledger_rows(ids, "other", None, origin_us, 3600, yhat_far, band, 0.8),
        ledger_rows(ids, "seasonal_naive_daily", None, origin_us, 3600, naive, None, None),
    ]
    assert "0.3," in frames_[0]["points"][0] and "0.30000001" not in frames_[0]["points"][0]
    _save(store, pl.concat(frames_))
    f = schema.forecasts
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(f.c.model, f.c.horizon_step, f.c.yhat, f.c.yhat_lower, f.c.raw_upper)
        ).all()
    got = {(m, h): (y, lo, hi) for m, h, y, lo, hi in rows}
    for h in range(3):
        y, lo, hi = got[("mstl", h + 1)]
        assert np.float32(y) == single[0, h] and y == pytest.approx(yhat[0, h], rel=1e-7)
        assert np.float32(lo) == np.float32(band[0][0, h])
        assert np.float32(hi) == np.float32(band[3][0, h])
        assert got[("seasonal_naive_daily", h + 1)][0] == naive[0, h]  # exact
    assert got[("other", 1)][0] == 1e39


def test_prediction_targets_of_some_series_are_exactly_theirs(store):
    """A shard's lookup (by its ids' range, then picked): the series asked for, not those
    between them, in the same order and with the same fields as the whole fleet's."""
    a, b, c, d = _series(store, ["d", "c", "b", "a"])  # names ordered against ids
    every = store.prediction_targets()
    assert [t["name"] for t in every] == ["a", "b", "c", "d"]
    some = store.prediction_targets([a, c])
    assert some == [t for t in every if t["id"] in {a, c}]
    assert [t["name"] for t in some] == ["b", "d"]
    assert store.prediction_targets([]) == []
    assert store.prediction_targets([b]) == [t for t in every if t["id"] == b]


def _version(store) -> int:
    with store.begin() as conn:
        return store.register_model_version(
            conn,
            kind="lstm",
            config={},
            uri="file:///none",
            sha256="0" * 64,
            trained_from=None,
            trained_to=None,
            metrics={},
        )


def test_states_read_back_as_saved_and_snapshots_pruned_per_series_and_version(store):
    """load_states returns the asked series' states of one version only, bytes, shape and
    time as saved; each save keeps the newest `keep_snapshots` windows of the series it
    wrote, of its own version, and leaves every other series' and version's snapshots."""
    ids = _series(store, [f"s{i}" for i in range(5)])
    v1, v2 = _version(store), _version(store)
    shapes = {ids[0]: [2, 1, 3], ids[1]: [2, 1, 3], ids[2]: [1, 1, 4]}  # two share a shape

    def state(sid, version, w):
        return bytes([sid % 256, version, w % 256]) * 4

    def save(version, series, w, keep=2):
        with store.begin() as conn:
            store.save_prediction(
                conn,
                version_id=version,
                states=[
                    {
                        "series_id": sid,
                        "state": state(sid, version, w),
                        "shape": shapes.get(sid, [1, 1, 1]),
                        "state_ts": T0 + timedelta(days=w, hours=sid % 3),
                    }
                    for sid in series
                ],
                snapshots=[
                    {
                        "series_id": sid,
                        "window_id": w,
                        "state": state(sid, version, w),
                        "shape": [1, 1, 1],
                        "state_ts": T0 + timedelta(days=w),
                    }
                    for sid in series
                ],
                forecasts=[],
                keep_snapshots=keep,
            )

    for w in range(5):
        save(v1, ids[:3], w)
        save(v2, ids[:4], w, keep=7)
    save(v1, ids[3:], 9)  # other series, a later window: prunes none of the first three's

    got = store.load_states(v1, [ids[0], ids[2], ids[4], 10**6])
    assert got == {
        sid: (state(sid, v1, w), shapes.get(sid, [1, 1, 1]), T0 + timedelta(days=w, hours=sid % 3))
        for sid, w in ((ids[0], 4), (ids[2], 4), (ids[4], 9))
    }
    assert all(ts.tzinfo is not None and ts.utcoffset() == timedelta(0) for *_, ts in got.values())
    assert store.load_states(v2, [ids[4]]) == {}
    assert store.load_states(v1, []) == {}

    sn = schema.state_snapshots
    with store.engine.connect() as conn:
        kept = conn.execute(sa.select(sn.c.model_version_id, sn.c.series_id, sn.c.window_id)).all()
    windows: dict[tuple[int, int], list[int]] = {}
    for version, sid, w in kept:
        windows.setdefault((version, sid), []).append(w)
    assert (
        {k: sorted(v) for k, v in windows.items()}
        == {
            **{(v1, sid): [3, 4] for sid in ids[:3]},  # newest - keep < window <= newest
            **{(v1, sid): [9] for sid in ids[3:]},
            **{(v2, sid): [0, 1, 2, 3, 4] for sid in ids[:4]},  # its own keep: 7
        }
    )


def test_window_copies_are_stored_dropped_from_a_late_window_pruned_and_housekept(store):
    """save_prediction stores window copies after dropping a series' copies from its late
    window on and, with windows_kept_from, the older copies of the series it wrote;
    housekeeping drops the copies of windows that start before the observations' cutoff."""
    a, b, c = _series(store, ["a", "b", "c"])
    day0 = int(T0.timestamp()) // DAY

    def blob(sid, w):
        return bytes([sid % 256, w % 256]) * 48

    def save(windows, stale=(), kept_from=None):
        with store.begin() as conn:
            store.save_prediction(
                conn,
                version_id=0,
                states=[],
                snapshots=[],
                forecasts=[],
                keep_snapshots=7,
                windows=[(sid, w, 3600, blob(sid, w)) for sid, w in windows],
                windows_stale_from=stale,
                windows_kept_from=kept_from,
            )

    def stored():
        return {
            (sid, w): p for sid, w, _, p in store.window_values([a, b, c], range(day0, day0 + 30))
        }

    save([(sid, day0 + d) for sid in (a, b, c) for d in range(10)])
    assert stored() == {
        (sid, day0 + d): blob(sid, day0 + d) for sid in (a, b, c) for d in range(10)
    }
    assert store.window_values([a], [day0 + 3, day0 + 40]) == [
        (a, day0 + 3, 3600, blob(a, day0 + 3))
    ]
    # a's late point in window 6: its copies from 6 on go, then window 6 comes back fresh;
    # a and b keep windows from 2 on, c (not written) all of its own.
    save([(a, day0 + 6), (b, day0 + 10)], stale=[(a, day0 + 6)], kept_from=day0 + 2)
    want = {(a, day0 + d) for d in range(2, 7)} | {(b, day0 + d) for d in range(2, 11)}
    want |= {(c, day0 + d) for d in range(10)}
    assert set(stored()) == want
    store.housekeep({"observations": T0 + timedelta(days=4, hours=1)})  # windows 0-4 start before
    assert set(stored()) == {k for k in want if k[1] >= day0 + 5}
