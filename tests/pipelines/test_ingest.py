"""The ingest job end to end: real files and the bundled replay into a real store."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from forecaster import schema
from forecaster.clock import FixedClock
from forecaster.config import ReplaySource, SeriesDefaults
from forecaster.store import Store
from pipelines.cli import app
from pipelines.ingest import ingest_batch, run_ingest
from pipelines.sources import build_source
from pipelines.sources.base import Batch, raw_frame

T0 = datetime(2024, 1, 1, tzinfo=UTC)
NOW = datetime(2024, 6, 1, tzinfo=UTC)


@pytest.fixture
def store(db_url):
    st = Store(db_url)
    st.upgrade()
    yield st
    st.close()


def _iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_csv(path, rows):
    lines = ["series,ts,value"] + [",".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def test_malformed_rows_are_quarantined_with_reasons_and_the_rest_ingested(tmp_path, monkeypatch):
    """1% of the rows of each bad kind: each lands in quarantine with its reason, every good
    row is stored, the command exits 0 and prints a summary line."""
    rng = random.Random(7)
    series = [f"meter.{i}" for i in range(5)]
    hours = 2000
    # file 1: the first half, clean; it sets the watermarks.
    first = [
        (s, _iso(T0 + timedelta(hours=h)), str(h % 24)) for h in range(hours // 2) for s in series
    ]
    (tmp_path / "in").mkdir()
    good = [
        (s, _iso(T0 + timedelta(hours=h)), f"{(h * 7) % 50}.5")
        for h in range(hours // 2, hours)
        for s in series
    ]
    n_bad = len(good) // 100  # 1% of each kind
    bad_kinds = {
        "bad_ts": lambda i: (
            "meter.0",
            rng.choice(["2024-13-01T00:00Z", "yesterday", "", "12:00"]),
            "1",
        ),
        "bad_value": lambda i: (
            "meter.1",
            _iso(T0 + timedelta(hours=hours + i)),
            rng.choice(["abc", "", "1;5", "0x1g"]),
        ),
        "non_finite": lambda i: (
            "meter.2",
            _iso(T0 + timedelta(hours=hours + i)),
            rng.choice(["NaN", "inf", "-Infinity"]),
        ),
        "missing_series": lambda i: ("", _iso(T0 + timedelta(hours=i)), "1"),
        "unknown_series": lambda i: (f"intruder.{i}", _iso(T0 + timedelta(hours=hours - 1)), "1"),
        "too_late": lambda i: ("meter.3", _iso(T0 - timedelta(days=30, hours=i)), "1"),
        "future": lambda i: ("meter.4", _iso(NOW + timedelta(days=1 + i)), "1"),
    }
    rows = list(good)
    expected = Counter()
    for reason, make in bad_kinds.items():
        for i in range(n_bad):
            rows.insert(rng.randrange(len(rows)), make(i))
            expected[reason] += 1
    # Conflicting duplicates: a row re-sent with another value later in the file; the later
    # value wins and the earlier one is quarantined.
    dupes = rng.sample(range(len(good)), n_bad)
    for i in dupes:
        s, ts, v = good[i]
        rows.insert(0, (s, ts, "999"))  # earlier in the file, so replaced
        expected["conflicting_duplicate"] += 1
    cfg = tmp_path / "f.toml"
    cfg.write_text(
        f'database_url = "sqlite:///{tmp_path / "s.db"}"\n'
        '[series]\nauto_create = false\nallowed_lateness = "7d"\n'
        f'[sources.meters]\nkind = "file"\npath = "{tmp_path / "in" / "*.csv"}"\nbatch_rows = 100000\n'
    )
    st = Store(f"sqlite:///{tmp_path / 's.db'}")
    st.upgrade()
    with st.begin() as conn:
        st.resolve_series(
            conn, series, create=True, source="meters", freq_seconds=3600, window_seconds=86400
        )

    # "now" comes from the wall clock in the CLI: the data is in 2024, NOW-relative future
    # rows are in 2024-06 and later, so pin the check to the data rather than the date (the
    # command imports WallClock when it runs).
    import forecaster.clock

    monkeypatch.setattr(forecaster.clock, "WallClock", lambda: FixedClock(NOW))
    runner = CliRunner()
    _write_csv(tmp_path / "in" / "a_first.csv", first)
    result = runner.invoke(app, ["--config", str(cfg), "ingest", "--source", "meters", "--once"])
    assert result.exit_code == 0, result.output
    assert "0 quarantined" in result.output
    _write_csv(tmp_path / "in" / "b_second.csv", rows)  # a new file arrives
    result = runner.invoke(app, ["--config", str(cfg), "ingest", "--source", "meters", "--once"])
    assert result.exit_code == 0, result.output
    total_bad = sum(expected.values())
    assert f"{total_bad} quarantined" in result.output
    assert "meters:" in result.output and "points stored" in result.output

    _, counts = st.list_quarantine(source="meters")
    assert counts == dict(expected)
    obs = st.read_observations()
    assert obs.height == len(series) * hours
    assert set(obs["quality"]) == {"observed"}
    want = {(s, ts, float(v)) for s, ts, v in first + good}
    got = {(s, _iso(ts), v) for s, ts, v in obs.select("series", "ts", "value").rows()}
    assert got == want

    again = runner.invoke(app, ["--config", str(cfg), "ingest", "--source", "meters", "--once"])
    assert again.exit_code == 0 and "0 rows read" in again.output
    assert st.list_quarantine(source="meters")[1] == dict(expected)
    st.close()


def _replay(batch_rows=5_000, **kw):
    cfg = ReplaySource(
        batch_rows=batch_rows, series_filter=["flights.EWR", "flights.JFK", "flights.LGA.DL"], **kw
    )
    return build_source("replay", cfg)


def _snapshot(store: Store) -> dict[str, list]:
    out = {}
    with store.engine.connect() as conn:
        for t in (schema.observations, schema.windows, schema.watermarks):
            cols = [c for c in t.c if c.name != "updated_at"]
            out[t.name] = conn.execute(sa.select(*cols).order_by(*t.primary_key.columns)).all()
        out["cursor"] = conn.execute(sa.select(schema.source_cursors.c.cursor)).all()
    return out


def test_crash_inside_a_batch_then_restart_ingests_exactly_the_missing_rows(
    store, db_url, monkeypatch, tmp_path
):
    defaults = SeriesDefaults()
    reference = Store(f"sqlite:///{tmp_path / 'ref.db'}")
    reference.upgrade()
    full = run_ingest(reference, _replay(), defaults, now=NOW)
    assert full.exhausted and full.batches >= 4

    calls = {"n": 0}
    real_save = Store.save_cursor

    def crash_on_third(self, conn, source, cursor, rows_added):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("power cut inside the transaction")
        return real_save(self, conn, source, cursor, rows_added)

    monkeypatch.setattr(Store, "save_cursor", crash_on_third)
    with pytest.raises(RuntimeError, match="power cut"):
        run_ingest(store, _replay(), defaults, now=NOW)
    committed = store.read_observations().height
    monkeypatch.setattr(Store, "save_cursor", real_save)

    rest = run_ingest(store, _replay(), defaults, now=NOW)
    assert rest.exhausted
    assert committed + rest.rows_read == full.rows_read  # exactly the missing rows, no more
    a, b = _snapshot(store), _snapshot(reference)
    assert a["observations"] == b["observations"]
    assert a["windows"] == b["windows"] and a["watermarks"] == b["watermarks"]
    assert a["cursor"] == b["cursor"]
    reference.close()


def test_replay_to_the_end_loads_every_row_and_a_second_run_adds_none(store):
    from pipelines.datasets import load_nycflights13_hourly

    data = load_nycflights13_hourly()
    src = build_source("nycflights", ReplaySource())
    first = run_ingest(store, src, SeriesDefaults(), now=NOW)
    assert first.exhausted and first.rows_read == data.height
    assert first.observed == data.height and first.filled == 0 and not first.quarantined
    counts = store.table_counts()
    assert counts["observations"] == data.height
    assert counts["series"] == data["series"].n_unique()
    second = run_ingest(store, src, SeriesDefaults(), now=NOW)
    assert second.rows_read == 0
    assert store.table_counts() == counts
    stored = store.read_observations().select("series", "ts", "value").sort("series", "ts")
    assert stored.equals(data.select("series", "ts", "value").sort("series", "ts"))


def test_paced_replay_emits_only_what_the_clock_allows(store):
    clock = FixedClock(NOW)
    src = _replay(speed=3600.0)  # an hour of data per wall second
    first = run_ingest(store, src, SeriesDefaults(), now=clock.now())
    assert first.rows_read <= 3  # the first read anchors the clock: at most the first hour
    clock.advance(timedelta(seconds=10))
    second = run_ingest(store, src, SeriesDefaults(), now=clock.now())
    assert second.rows_read == 3 * 10


def _batch(points, cursor):
    series, ts, values = zip(*points, strict=True)
    return Batch(
        raw_frame(list(series), [_iso(t) for t in ts], [str(v) for v in values], "t"), cursor
    )


def test_gap_policy_continues_across_batches(store):
    defaults = SeriesDefaults(gap_policy="interpolate")
    ingest_batch(store, "s", _batch([("a", T0, 0.0)], {"n": 1}), defaults, NOW)
    ingest_batch(store, "s", _batch([("a", T0 + timedelta(hours=4), 8.0)], {"n": 2}), defaults, NOW)
    obs = store.read_observations("a")
    assert obs.select("value", "quality").rows() == [
        (0.0, "observed"),
        (2.0, "interpolated"),
        (4.0, "interpolated"),
        (6.0, "interpolated"),
        (8.0, "observed"),
    ]


def test_a_late_point_within_the_bound_replaces_the_filled_one_and_recounts_its_window(store):
    defaults = SeriesDefaults(gap_policy="null", allowed_lateness=timedelta(days=2))
    ingest_batch(
        store,
        "s",
        _batch([("a", T0, 1.0), ("a", T0 + timedelta(hours=30), 2.0)], {"n": 1}),
        defaults,
        NOW,
    )
    late = T0 + timedelta(hours=5)
    result = ingest_batch(store, "s", _batch([("a", late, 9.0)], {"n": 2}), defaults, NOW)
    assert result.observed == 1 and not result.quarantined
    obs = store.read_observations("a")
    assert obs.filter(pl.col("ts") == late).select("value", "quality").rows() == [(9.0, "observed")]
    with store.engine.connect() as conn:
        w = conn.execute(
            sa.select(schema.windows.c.n_observed, schema.windows.c.complete).order_by(
                schema.windows.c.window_id
            )
        ).all()
    assert [tuple(r) for r in w] == [(2, True), (1, False)]
    too_late = ingest_batch(
        store, "s", _batch([("a", T0 - timedelta(days=3), 5.0)], {"n": 3}), defaults, NOW
    )
    assert too_late.quarantined == Counter({"too_late": 1})


def test_points_after_the_watermark_are_stored_even_where_a_writer_beside_stored_one(
    store, monkeypatch
):
    """Points after their series' watermark are new keys, which PostgreSQL takes by a COPY
    straight into observations; where one is stored after all (another writer's, here put
    there by hand), the batch goes the upsert's way: every point stored once, the batch's
    value where it is observed, nothing refused."""
    import forecaster.store.ingest as store_ingest

    copied = []
    real = store_ingest.pg_copy_new

    def spy(conn, fresh, copy):
        ok = real(conn, fresh, copy)
        copied.append((fresh.height, ok))
        return ok

    monkeypatch.setattr(store_ingest, "pg_copy_new", spy)
    defaults = SeriesDefaults(gap_policy="null")
    first = [("a", T0 + timedelta(hours=h), float(h)) for h in range(3)]
    first += [("b", T0 + timedelta(hours=h), 10.0 + h) for h in range(3)]
    ingest_batch(store, "s", _batch(first, {"n": 1}), defaults, NOW)
    o = schema.observations
    with store.begin() as conn:  # a writer beside: a's point at 05:00 is stored already
        a_id = conn.execute(sa.select(schema.series.c.id).where(schema.series.c.name == "a"))
        conn.execute(
            sa.insert(o).values(
                series_id=a_id.scalar_one(),
                ts=T0 + timedelta(hours=5),
                value=-1.0,
                quality="observed",
                window_id=0,
            )
        )
    second = [("a", T0 + timedelta(hours=h), float(h)) for h in range(3, 6)]
    second += [("b", T0 + timedelta(hours=h), 10.0 + h) for h in range(3, 6)]
    result = ingest_batch(store, "s", _batch(second, {"n": 2}), defaults, NOW)
    assert result.observed == 6 and not result.quarantined
    for name, base in (("a", 0.0), ("b", 10.0)):
        obs = store.read_observations(name)
        assert obs.select("value", "quality").rows() == [
            (base + h, "observed") for h in range(6)
        ], name
    if store.dialect == "postgresql":
        assert copied == [(6, True), (6, False)]
    else:
        assert copied == []


def test_a_stray_early_point_of_a_new_series_is_quarantined_not_gap_filled(store):
    """Epoch 0 among a new series' 2024 points would be filled hourly up to 2024 (472,000
    rows); year 1, 17.7 million. Past series.max_backfill before the series' newest point it
    is quarantined too_late; the rest is stored, and the bound is a setting."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    points = [("a", epoch, 1.0), ("a", T0, 2.0), ("a", T0 + timedelta(hours=2), 3.0)]
    points += [("b", T0 - timedelta(days=700), 4.0), ("b", T0, 5.0)]  # inside two years
    result = ingest_batch(store, "s", _batch(points, {"n": 1}), SeriesDefaults(), NOW)
    assert result.quarantined == Counter({"too_late": 1})
    (row,), counts = store.list_quarantine()
    assert row["series"] == "a" and row["ts_raw"] == _iso(epoch)
    assert "series.max_backfill" in row["detail"]
    assert store.read_observations("a").height == 3  # T0 .. T0 + 2 h
    assert store.read_observations("b").height == 700 * 24 + 1
    unbounded = SeriesDefaults(max_backfill=None)
    again = ingest_batch(
        store,
        "s",
        _batch([("c", T0 - timedelta(days=800), 1.0), ("c", T0, 2.0)], {"n": 2}),
        unbounded,
        NOW,
    )
    assert not again.quarantined and store.read_observations("c").height == 800 * 24 + 1
