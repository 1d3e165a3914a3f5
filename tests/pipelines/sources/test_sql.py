"""SqlSourceReader against a real SQLite file and a real PostgreSQL database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest
import sqlalchemy as sa

from forecaster.config import SqlSource
from forecaster.errors import SourceError
from forecaster.frames import parse_ts
from pipelines.sources import RAW_COLUMNS, build_source
from pipelines.sources.sql import SqlSourceReader

QUERY = "SELECT sensor AS series, taken_at AS ts, reading AS value FROM readings WHERE taken_at > :since ORDER BY taken_at"
T0 = datetime(2024, 1, 1, tzinfo=UTC)

meta = sa.MetaData()
readings = sa.Table(
    "readings",
    meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("sensor", sa.String(20)),
    sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reading", sa.Float),
)


def insert(url: str, rows: list[tuple[str, datetime, float | None]]) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            meta.create_all(conn)
            conn.execute(
                readings.insert(), [{"sensor": s, "taken_at": t, "reading": v} for s, t, v in rows]
            )
    finally:
        engine.dispose()


def reader(url: str, **kw: Any) -> SqlSourceReader:
    src = build_source("db", SqlSource(url=url, query=kw.pop("query", QUERY), **kw))
    assert isinstance(src, SqlSourceReader)
    return src


def hours(*hs: int) -> list[datetime]:
    return [T0 + timedelta(hours=h) for h in hs]


def test_incremental_reads(db_url: str, now: datetime) -> None:
    insert(db_url, [("a", t, float(i)) for i, t in enumerate(hours(0, 1, 2, 3, 4))])
    src = reader(db_url, batch_rows=2)
    batches = list(src.read(None, now))
    assert [b.rows.height for b in batches] == [2, 2, 1]
    rows = pl.concat([b.rows for b in batches])
    assert rows.columns == list(RAW_COLUMNS)
    assert parse_ts(rows["ts"]).to_list() == hours(0, 1, 2, 3, 4)
    assert rows["value"].dtype == pl.Float64 and rows["value"].to_list() == [0, 1, 2, 3, 4]
    assert datetime.fromisoformat(batches[-1].cursor["since"]) == hours(4)[0]
    cursor = batches[-1].cursor

    assert list(src.read(cursor, now)) == []
    insert(db_url, [("b", t, 9.0) for t in hours(5, 6)])
    rows = pl.concat([b.rows for b in src.read(cursor, now)])
    assert rows["series"].to_list() == ["b", "b"]
    assert parse_ts(rows["ts"]).to_list() == hours(5, 6)


def test_a_restart_mid_stream_never_skips_rows_sharing_a_timestamp(
    db_url: str, now: datetime
) -> None:
    t = hours(0, 1, 1, 1, 2)
    insert(db_url, [(f"s{i}", ts, 1.0) for i, ts in enumerate(t)])
    src = reader(db_url, batch_rows=2)
    first = next(iter(src.read(None, now)))  # s0 (0h), s1 (1h); s2, s3 also at 1h
    resumed = pl.concat([b.rows for b in src.read(first.cursor, now)])
    assert {"s2", "s3", "s4"} <= set(resumed["series"].to_list())


def test_series_name_null_values_and_start(db_url: str, now: datetime) -> None:
    insert(db_url, [("a", t, None) for t in hours(0, 10)])
    q = "SELECT taken_at AS ts, reading AS value FROM readings WHERE taken_at > :since ORDER BY taken_at"
    src = reader(db_url, query=q, series_name="boiler", start=hours(5)[0])
    rows = pl.concat([b.rows for b in src.read(None, now)])
    assert rows["series"].to_list() == ["boiler"]
    assert rows["value"].to_list() == [None]
    assert parse_ts(rows["ts"]).to_list() == hours(10)


def test_sql_errors_and_missing_columns(db_url: str, now: datetime) -> None:
    insert(db_url, [("a", T0, 1.0)])
    with pytest.raises(SourceError, match="query on .* failed"):
        list(reader(db_url, query="SELECT * FROM no_such_table WHERE 1 = :since").read(None, now))
    q = "SELECT sensor AS series, reading AS value FROM readings WHERE taken_at > :since"
    with pytest.raises(SourceError, match="no column 'ts'.*series, value"):
        list(reader(db_url, query=q).read(None, now))


def test_unreachable_database_does_not_leak_the_password(now: datetime) -> None:
    url = "postgresql://reader:hunter2-pw@127.0.0.1:1/metrics"
    with pytest.raises(SourceError) as err:
        list(reader(url).read(None, now))
    assert "hunter2" not in str(err.value) and "reader:***@" in str(err.value)


def test_query_without_since_reads_everything(db_url: str, now: datetime) -> None:
    insert(db_url, [("a", t, 1.0) for t in hours(0, 1)])
    q = "SELECT sensor AS series, taken_at AS ts, reading AS value FROM readings ORDER BY taken_at"
    batches = list(reader(db_url, query=q).read({"since": hours(5)[0].isoformat()}, now))
    assert sum(b.rows.height for b in batches) == 2
    assert batches[-1].cursor["since"] == hours(5)[0].isoformat()  # never moves back
