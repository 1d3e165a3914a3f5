"""Rows/s into SQLite and PostgreSQL: the store's write path vs the raw driver, same rows.

    python bench/ingest.py [--rows 200000] [--pg postgresql://postgres@127.0.0.1:5432/postgres]

Each figure is the best of --repeat runs into a fresh table. Rows are observations
(series_id, ts, value, quality, window_id) for 20 series on an hourly grid.
- raw:    sqlite3 executemany of plain INSERTs / psycopg COPY with write_row, from
          ready-made Python tuples (the raw driver gets its input for free).
- store:  Store.upsert_observations from a polars frame (conversion included): SQLite
          Core insert().on_conflict_do_update executemany; PostgreSQL COPY into a temp
          table + INSERT ... SELECT ... ON CONFLICT, all in one transaction.
- store (re-upsert): the same rows again, every one a conflict (idempotent re-ingest).
- ingest_batch: the whole job from raw text rows (parse, dedupe, resample, windows,
          watermarks, cursor), for scale.
- window of N series (--series, default 10,000): the job as the daemon runs it at scale,
          one day-long window of hourly points for every series, timed after one such
          window is stored (series known, watermarks set); seconds, not rows/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta

import polars as pl

from forecaster.config import SeriesDefaults
from forecaster.frames import TS_DTYPE, assign_windows
from forecaster.store import Store
from pipelines.ingest import ingest_batch
from pipelines.sources.base import Batch, raw_frame


def make_rows(n: int) -> pl.DataFrame:
    n_series = 20
    per = n // n_series
    start = datetime(2013, 1, 1, tzinfo=UTC)
    ts = pl.datetime_range(
        start,
        start + (per - 1) * (datetime(2013, 1, 1, 1) - datetime(2013, 1, 1)),
        "1h",
        eager=True,
        time_zone="UTC",
    ).cast(TS_DTYPE)
    df = pl.DataFrame(
        {
            "series_id": pl.Series(range(1, n_series + 1)).repeat_by(per).explode().cast(pl.Int64),
            "ts": pl.concat([ts] * n_series),
        }
    ).with_columns(value=(pl.int_range(pl.len()) % 97).cast(pl.Float64), quality=pl.lit("observed"))
    return assign_windows(df, 86400 * 10**6)


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = fn()
        best = min(best, t)
    return best


def fresh_store(url: str) -> Store:
    st = Store(url)
    st.upgrade()
    with st.begin() as conn:
        st.resolve_series(
            conn,
            [f"s{i}" for i in range(1, 21)],
            create=True,
            source="b",
            freq_seconds=3600,
            window_seconds=86400,
        )
    return st


def time_store_upsert(url: str, rows: pl.DataFrame, twice: bool) -> float:
    """Seconds for one Store.upsert_observations of `rows` into a fresh store; with `twice`,
    the rows are stored once beforehand, so every row is a conflict."""
    st = fresh_store(url)
    if twice:
        with st.begin() as conn:
            st.upsert_observations(conn, rows)
    t = time.perf_counter()
    with st.begin() as conn:
        st.upsert_observations(conn, rows)
    dt = time.perf_counter() - t
    st.close()
    return dt


def bench_sqlite(rows: pl.DataFrame, repeat: int) -> dict[str, float]:
    tuples = rows.with_columns(pl.col("ts").dt.to_string("%Y-%m-%d %H:%M:%S%.6f")).rows()
    out = {}

    def raw() -> float:
        with tempfile.TemporaryDirectory() as d:
            st = fresh_store(f"sqlite:///{d}/b.db")
            st.close()
            con = sqlite3.connect(f"{d}/b.db")
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            t = time.perf_counter()
            con.executemany(
                "INSERT INTO observations (series_id, ts, value, quality, window_id) VALUES (?,?,?,?,?)",
                tuples,
            )
            con.commit()
            dt = time.perf_counter() - t
            con.close()
            return dt

    def store(twice: bool) -> float:
        with tempfile.TemporaryDirectory() as d:
            return time_store_upsert(f"sqlite:///{d}/b.db", rows, twice)

    out["raw"] = timed(raw, repeat)
    out["store"] = timed(lambda: store(False), repeat)
    out["store (re-upsert)"] = timed(lambda: store(True), repeat)
    out["ingest_batch"] = timed(lambda: job(f"sqlite:///{tempfile.mkdtemp()}/j.db", rows), repeat)
    return out


def job(url: str, rows: pl.DataFrame) -> float:
    st = Store(url)
    st.upgrade()
    raw = raw_frame(
        ("s" + rows["series_id"].cast(pl.Utf8)).to_list(),
        rows["ts"].dt.to_string("%Y-%m-%dT%H:%M:%SZ"),
        rows["value"].cast(pl.Utf8),
        "bench",
    )
    t = time.perf_counter()
    ingest_batch(st, "bench", Batch(raw, {"n": 1}), SeriesDefaults(), datetime.now(UTC))
    dt = time.perf_counter() - t
    st.close()
    return dt


def window_batches(n_series: int) -> list[Batch]:
    """Two consecutive day-long windows of hourly points for n_series series, as raw text."""
    start = datetime(2013, 1, 1, tzinfo=UTC)
    out = []
    for day in range(2):
        ts = pl.datetime_range(
            start + day * timedelta(days=1),
            start + day * timedelta(days=1) + timedelta(hours=23),
            "1h",
            eager=True,
            time_zone="UTC",
        ).dt.to_string("%Y-%m-%dT%H:%M:%SZ")
        names = pl.Series([f"s{i}" for i in range(n_series)]).repeat_by(24).explode()
        values = (pl.int_range(n_series * 24, eager=True) % 97).cast(pl.Utf8)
        raw = raw_frame(names.to_list(), pl.concat([ts] * n_series), values, "bench")
        out.append(Batch(raw, {"day": day}))
    return out


def window_job(url: str, n_series: int) -> float:
    """Seconds to ingest the second window of n_series series, the first one stored."""
    first, second = window_batches(n_series)
    st = Store(url)
    st.upgrade()
    now = datetime.now(UTC)
    ingest_batch(st, "bench", first, SeriesDefaults(), now)
    t = time.perf_counter()
    ingest_batch(st, "bench", second, SeriesDefaults(), now)
    dt = time.perf_counter() - t
    st.close()
    return dt


def bench_pg(rows: pl.DataFrame, repeat: int, admin: str) -> dict[str, float]:
    import psycopg

    tuples = rows.rows()
    dsn = admin.replace("postgresql+psycopg://", "postgresql://")
    out = {}

    def with_db(fn):
        name = f"fc_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        url = dsn.rsplit("/", 1)[0] + "/" + name
        try:
            return fn(url)
        finally:
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')

    def raw(url: str) -> float:
        fresh_store(url).close()
        with psycopg.connect(url) as con:
            t = time.perf_counter()
            with (
                con.cursor() as cur,
                cur.copy(
                    "COPY observations (series_id, ts, value, quality, window_id) FROM STDIN"
                ) as cp,
            ):
                for r in tuples:
                    cp.write_row(r)
            con.commit()
            return time.perf_counter() - t

    out["raw"] = timed(lambda: with_db(raw), repeat)
    out["store"] = timed(lambda: with_db(lambda u: time_store_upsert(u, rows, False)), repeat)
    out["store (re-upsert)"] = timed(
        lambda: with_db(lambda u: time_store_upsert(u, rows, True)), repeat
    )
    out["ingest_batch"] = timed(lambda: with_db(lambda u: job(u, rows)), repeat)
    return out


def with_pg_db(admin: str, fn):
    import psycopg

    dsn = admin.replace("postgresql+psycopg://", "postgresql://")
    name = f"fc_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        return fn(dsn.rsplit("/", 1)[0] + "/" + name)
    finally:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--pg",
        default=os.environ.get(
            "FORECASTER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    ap.add_argument("--no-pg", action="store_true")
    ap.add_argument("--series", type=int, default=10_000, help="series in the window job")
    args = ap.parse_args()
    rows = make_rows(args.rows)
    print(
        f"# {rows.height} rows, best of {args.repeat}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, polars {pl.__version__}"
    )
    results = {"SQLite": bench_sqlite(rows, args.repeat)}
    if not args.no_pg:
        try:
            results["PostgreSQL"] = bench_pg(rows, args.repeat, args.pg)
        except Exception as exc:  # a bench without a server still reports SQLite
            print(f"# PostgreSQL skipped: {exc}")
    print(f"| {'database':<10} | {'path':<18} | {'rows/s':>10} | {'vs raw':>6} |")
    print(f"|{'-' * 12}|{'-' * 20}|{'-' * 12}|{'-' * 8}|")
    for db, res in results.items():
        for path, secs in res.items():
            print(
                f"| {db:<10} | {path:<18} | {rows.height / secs:>10,.0f} | {res['raw'] / secs:>5.2f}x |"
            )
    n = args.series
    print(
        f"\n# one day-long window of {n:,} hourly series ({n * 24:,} rows), best of {args.repeat}"
    )
    print(f"| {'database':<10} | {'seconds':>8} |")
    print(f"|{'-' * 12}|{'-' * 10}|")
    sqlite = timed(lambda: window_job(f"sqlite:///{tempfile.mkdtemp()}/w.db", n), args.repeat)
    print(f"| {'SQLite':<10} | {sqlite:>8.2f} |")
    if "PostgreSQL" in results:
        pg = timed(lambda: with_pg_db(args.pg, lambda u: window_job(u, n)), args.repeat)
        print(f"| {'PostgreSQL':<10} | {pg:>8.2f} |")


if __name__ == "__main__":
    main()
