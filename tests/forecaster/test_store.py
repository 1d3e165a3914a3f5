"""The store on a real SQLite file and a real PostgreSQL database: same tests, both dialects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import polars as pl
import pytest
import sqlalchemy as sa

from forecaster import frames as F
from forecaster import schema
from forecaster.errors import SchemaOutOfDateError
from forecaster.store import Store

DAY = 86400


@pytest.fixture
def store(db_url):
    st = Store(db_url)
    st.upgrade()
    yield st
    st.close()


def _sid(store, name="a"):
    with store.begin() as conn:
        return store.resolve_series(
            conn, [name], create=True, source="t", freq_seconds=3600, window_seconds=DAY
        )[name]


def _obs(sid, hours, values, quality="observed"):
    ts = [datetime(2013, 1, 1, tzinfo=UTC) + timedelta(hours=h) for h in hours]
    df = pl.DataFrame(
        {
            "series_id": [sid] * len(hours),
            "ts": ts,
            "value": values,
            "quality": [quality] * len(hours),
        },
        schema_overrides={"ts": F.TS_DTYPE, "value": pl.Float64, "series_id": pl.Int64},
    )
    return F.assign_windows(df, DAY * 10**6)


def test_check_schema_refuses_an_empty_database(db_url):
    st = Store(db_url)
    with pytest.raises(SchemaOutOfDateError, match="forecaster db upgrade"):
        st.check_schema()
    st.upgrade()
    st.check_schema()
    st.close()


def test_resolve_series_creates_once(store):
    with store.begin() as conn:
        ids = store.resolve_series(
            conn, ["x", "y", "x"], create=True, source="s", freq_seconds=60, window_seconds=3600
        )
        again = store.resolve_series(
            conn, ["y", "z"], create=False, source="s", freq_seconds=60, window_seconds=3600
        )
    assert set(ids) == {"x", "y"} and again == {"y": ids["y"]}


def test_observations_upsert_is_idempotent_and_utc(store):
    sid = _sid(store)
    pts = _obs(sid, range(48), [float(i) for i in range(48)])
    for _ in range(2):
        with store.begin() as conn:
            store.upsert_observations(conn, pts)
    got = store.read_observations("a")
    assert got.height == 48
    assert got["ts"].to_list() == pts["ts"].to_list()
    assert got["ts"].dtype == F.TS_DTYPE


def test_filled_point_never_overwrites_an_observed_one(store):
    sid = _sid(store)
    with store.begin() as conn:
        store.upsert_observations(conn, _obs(sid, [0, 1], [5.0, 6.0]))
        store.upsert_observations(conn, _obs(sid, [1], [None], quality="missing"))
        store.upsert_observations(conn, _obs(sid, [2], [None], quality="missing"))
        store.upsert_observations(conn, _obs(sid, [2], [7.0]))
    got = store.read_observations("a")
    assert got.select("value", "quality").rows() == [
        (5.0, "observed"),
        (6.0, "observed"),
        (7.0, "observed"),
    ]


def test_non_utc_datetimes_are_converted_not_relabelled(store):
    sid = _sid(store)
    plus2 = timezone(timedelta(hours=2))
    with store.begin() as conn:
        conn.execute(
            sa.insert(schema.watermarks),
            {
                "series_id": sid,
                "ts": datetime(2013, 1, 1, 12, tzinfo=plus2),
                "last_value": 1.0,
                "updated_at": datetime.now(UTC),
            },
        )
    with store.engine.connect() as conn:
        marks = store.watermarks_frame(conn, [sid])
    assert marks["prev_ts"].to_list() == [datetime(2013, 1, 1, 10, tzinfo=UTC)]


def test_watermarks_only_move_forward(store):
    sid = _sid(store)
    t = datetime(2013, 1, 2, tzinfo=UTC)
    for ts, v in [(t, 1.0), (t - timedelta(hours=5), 2.0), (t + timedelta(hours=1), 3.0)]:
        with store.begin() as conn:
            store.upsert_watermarks(
                conn, pl.DataFrame({"series_id": [sid], "ts": [ts], "last_value": [v]})
            )
    with store.engine.connect() as conn:
        marks = store.watermarks_frame(conn, [sid])
    assert marks.select("prev_ts", "prev_value").rows() == [(t + timedelta(hours=1), 3.0)]


def test_windows_count_points_and_completeness(store):
    sid = _sid(store)
    pts = _obs(sid, range(30), [1.0] * 20 + [None] * 10, quality="observed")
    pts = pts.with_columns(
        pl.when(pl.col("value").is_null())
        .then(pl.lit("missing"))
        .otherwise(pl.col("quality"))
        .alias("quality")
    )
    with store.begin() as conn:
        store.upsert_observations(conn, pts)
        store.upsert_watermarks(
            conn, pl.DataFrame({"series_id": [sid], "ts": [pts["ts"].max()], "last_value": [None]})
        )
        n = store.refresh_windows(conn, pts, freq_seconds=3600, window_seconds=DAY)
    assert n == 2
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                schema.windows.c.n_points, schema.windows.c.n_observed, schema.windows.c.complete
            ).order_by(schema.windows.c.window_id)
        ).all()
    assert [tuple(r) for r in rows] == [(24, 20, True), (6, 0, False)]


def test_windows_recount_every_stored_point_of_the_touched_windows_only(store):
    """Series touched over different spans: each touched window is recounted from all its
    stored points (not only the batch's), an untouched window between two touched ones is
    left alone, and one series' range never counts another's points."""
    a, b = _sid(store, "a"), _sid(store, "b")
    stored = pl.concat([_obs(a, range(72), [1.0] * 72), _obs(b, range(48), [2.0] * 48)])
    with store.begin() as conn:
        store.upsert_observations(conn, stored)
        store.upsert_watermarks(
            conn,
            pl.DataFrame(
                {
                    "series_id": [a, b],
                    "ts": [stored["ts"].max(), stored.filter(pl.col("series_id") == b)["ts"].max()],
                    "last_value": [None, None],
                }
            ),
        )
        touched = pl.concat([_obs(a, [0, 50], [1.0, 1.0]), _obs(b, [30], [2.0])])
        assert store.refresh_windows(conn, touched, freq_seconds=3600, window_seconds=DAY) == 3
    w = schema.windows
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(w.c.series_id, w.c.n_points, w.c.complete).order_by(
                w.c.series_id, w.c.window_id
            )
        ).all()
    assert [tuple(r) for r in rows] == [(a, 24, True), (a, 24, True), (b, 24, True)]
    with store.engine.connect() as conn:
        ids = conn.execute(sa.select(w.c.window_id).where(w.c.series_id == a)).scalars().all()
    assert sorted(ids)[1] - sorted(ids)[0] == 2  # windows 0 and 2 of a; 1 untouched


def test_quarantine_stores_each_row_once(store):
    bad = pl.DataFrame(
        {
            "series": ["a", None],
            "ts_raw": ["x", "2013"],
            "value_raw": ["1", "2"],
            "origin": ["f:2", "f:3"],
            "reason": ["bad_ts", "missing_series"],
            "detail": [None, None],
        }
    )
    with store.begin() as conn:
        assert store.insert_quarantine(conn, "src", bad) == 2
    with store.begin() as conn:
        assert store.insert_quarantine(conn, "src", bad) == 0
    rows, counts = store.list_quarantine(source="src")
    assert counts == {"bad_ts": 1, "missing_series": 1} and len(rows) == 2


def test_cursor_round_trip_and_rows_total(store):
    assert store.get_cursor("s") is None
    with store.begin() as conn:
        store.save_cursor(conn, "s", {"since": "2013-01-01T00:00:00+00:00"}, rows_added=5)
    with store.begin() as conn:
        store.save_cursor(
            conn, "s", {"since": "2013-01-02T00:00:00+00:00", "n": [1, 2]}, rows_added=7
        )
    assert store.get_cursor("s") == {"since": "2013-01-02T00:00:00+00:00", "n": [1, 2]}
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(schema.source_cursors.c.rows_total)).scalar_one() == 12


def test_a_failed_transaction_writes_nothing(store):
    sid = _sid(store)
    with pytest.raises(RuntimeError), store.begin() as conn:
        store.upsert_observations(conn, _obs(sid, range(5), [1.0] * 5))
        store.save_cursor(conn, "s", {"k": 1}, rows_added=5)
        raise RuntimeError("crash inside the transaction")
    assert store.read_observations().height == 0
    assert store.get_cursor("s") is None


def test_a_new_champion_starts_from_the_old_ones_corrections_and_offset(store):
    """copy_calibration gives the target the source's per-step corrections and pooled
    offset where it has none of its own, and never overwrites what it has."""
    with store.begin() as conn:
        store.save_calibration(
            conn, "v1", [{"horizon_step": h, "correction": 0.1 * h, "n_scored": 5} for h in (1, 2)]
        )
        store.save_calibration_offset(conn, "v1", 0.7, 10, pl.DataFrame())
        assert store.copy_calibration(conn, "v1", "v2") == 2
    assert store.calibration_for("v2") == pytest.approx({1: 0.1, 2: 0.2})
    assert store.calibration_offset("v2") == pytest.approx(0.7)
    with store.begin() as conn:
        store.save_calibration_offset(conn, "v2", -0.3, 4, pl.DataFrame())
        store.save_calibration_offset(conn, "v1", 0.9, 1, pl.DataFrame())
        assert store.copy_calibration(conn, "v1", "v2") == 0
    assert store.calibration_offset("v2") == pytest.approx(-0.3)
    assert store.calibration_offset("v3") == 0.0


def test_sqlite_waits_30_s_for_a_lock_unless_the_url_says_how_long(tmp_path):
    """A URL's own ?timeout=SECONDS is the driver's, and no pragma overrides it."""
    from forecaster.store import create_engine

    for query, waits_ms in (("", 30000), ("?timeout=1.5", 1500)):
        engine = create_engine(f"sqlite:///{tmp_path / 'w.db'}{query}")
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == waits_ms
        engine.dispose()


@pytest.mark.parametrize("model", ["v1", "odd\\model\twith tab"])
def test_a_bulk_written_frame_reads_back_exactly(store, model):
    """Frames written in bulk (accuracy_days here; on PostgreSQL COPY's text format written
    by polars, or row by row where a string holds what that format escapes) read back
    value for value: floats to the bit, NaN and infinities included, timestamps in UTC."""
    a = schema.accuracy_days
    with store.begin() as conn:
        ids = store.resolve_series(
            conn, ["s"], create=True, source="t", freq_seconds=3600, window_seconds=86400
        )
        days = [datetime(2024, 1, d, tzinfo=UTC) for d in (1, 2, 3)]
        frame = pl.DataFrame(
            {
                "series_id": [ids["s"]] * 3,
                "model": [model] * 3,
                "day": days,
                "n": [1, 2, 3],
                "abs_err": [0.1, 1 / 3, float("inf")],
                "naive_abs_err": [2.0**-1074, 1.7976931348623157e308, 123456.789e-7],
                "inside": [0, 1, 2],
                "n_points": [5, 0, 7],
            },
            schema_overrides={"day": F.TS_DTYPE},
        )
        store.add_accuracy_days(conn, frame, days[0])
    with store.engine.connect() as conn:
        got = conn.execute(sa.select(a).order_by(a.c.day)).all()
    assert [tuple(r) for r in got] == frame.rows()
