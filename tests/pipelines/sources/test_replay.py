"""ReplaySourceReader: exactly-once emission through a simulated ingest loop, pacing, cuts."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_series_equal

from forecaster.config import ReplaySource
from forecaster.errors import ConfigError, SourceError
from pipelines.datasets import load_nycflights13_hourly
from pipelines.sources.base import RAW_COLUMNS, Batch, Source
from pipelines.sources.replay import ReplaySourceReader, replay_time

T0 = datetime(2030, 5, 1, 12, tzinfo=UTC)  # wall clock of the first read
FIRST = datetime(2013, 1, 1, 10, tzinfo=UTC)
LAST = datetime(2014, 1, 1, 5, tzinfo=UTC)
N_SERIES = 23


@pytest.fixture(scope="module")
def dataset() -> pl.DataFrame:
    return load_nycflights13_hourly()


def reader(**settings: Any) -> ReplaySourceReader:
    return ReplaySourceReader("flights", ReplaySource(**settings))


def roundtrip(cursor: Mapping[str, Any]) -> dict[str, Any]:
    """What the store hands back: the cursor as JSON, parsed again."""
    return json.loads(json.dumps(cursor))


def ingest(
    source: ReplaySourceReader,
    clock: list[datetime],
    cursor: Mapping[str, Any] | None = None,
) -> tuple[list[Batch], Mapping[str, Any] | None]:
    """Poll once per clock tick, committing each batch's cursor like the ingest job, until
    the source says it is exhausted."""
    batches: list[Batch] = []
    for now in clock:
        for batch in source.read(cursor, now):
            batches.append(batch)
            cursor = roundtrip(batch.cursor)
        if batches and batches[-1].exhausted:
            break
    return batches, cursor


def emitted(batches: list[Batch]) -> pl.DataFrame:
    return pl.concat([b.rows for b in batches])


def test_is_a_source() -> None:
    assert isinstance(reader(), Source)


def test_unpaced_replay_emits_everything_once_in_order(dataset: pl.DataFrame) -> None:
    source = reader(speed=0, batch_rows=10_000)
    batches = list(source.read(None, T0))
    rows = emitted(batches)
    assert rows.columns == list(RAW_COLUMNS)
    assert rows.schema["ts"] == pl.Datetime("us", "UTC")
    assert rows.schema["value"] == pl.Float64
    assert rows.schema["series"] == pl.Utf8 and rows.schema["origin"] == pl.Utf8
    assert rows.drop("origin").equals(dataset)
    assert [b.exhausted for b in batches] == [False] * (len(batches) - 1) + [True]
    before = 0
    for batch in batches:
        assert batch.total_hint == dataset.height - before
        before += batch.rows.height

    again = list(source.read(roundtrip(batches[-1].cursor), T0 + timedelta(days=1)))
    assert len(again) == 1 and again[0].exhausted and again[0].rows.height == 0
    assert again[0].rows.columns == list(RAW_COLUMNS)


def test_paced_ingest_loop_emits_every_row_exactly_once(dataset: pl.DataFrame) -> None:
    # A week of data per wall second, polled every 1.5 s: about 10.5 days of data per poll.
    source = reader(speed=7 * 24 * 3600, batch_rows=1000)
    clock = [T0 + timedelta(seconds=1.5 * i) for i in range(40)]
    batches, cursor = ingest(source, clock)
    assert batches[-1].exhausted and batches[-1].rows.height > 0
    assert not any(b.exhausted for b in batches[:-1])
    assert emitted(batches).drop("origin").equals(dataset)
    assert cursor is not None and cursor["emitted_until"] == LAST.isoformat()


def test_pacing_emits_ten_hours_for_ten_wall_seconds_at_3600x(dataset: pl.DataFrame) -> None:
    source = reader(speed=3600)
    first = list(source.read(None, T0))
    assert emitted(first)["ts"].unique().to_list() == [FIRST]
    cursor = roundtrip(first[-1].cursor)
    assert cursor["anchor_wall"] == T0.isoformat()
    assert cursor["anchor_data"] == FIRST.isoformat()

    assert list(source.read(cursor, T0 + timedelta(seconds=0.5))) == []
    rows = emitted(list(source.read(cursor, T0 + timedelta(seconds=10))))
    hours = [FIRST + timedelta(hours=h) for h in range(1, 11)]
    assert rows["ts"].unique().sort().to_list() == hours
    assert rows.height == 10 * N_SERIES


def test_batches_cut_on_timestamp_boundaries() -> None:
    source = reader(speed=0, batch_rows=50)  # 23 rows per timestamp: two fit, not three
    batches = list(source.read(None, T0))
    seen: set[datetime] = set()
    for batch in batches:
        assert batch.rows.height == 46 or batch.exhausted
        stamps = set(batch.rows["ts"].to_list())
        assert not stamps & seen
        seen |= stamps
        assert batch.cursor["emitted_until"] == max(stamps).isoformat()
        first, last = min(stamps), max(stamps)
        assert batch.note == f"{first:%Y-%m-%d %H:%M} .. {last:%Y-%m-%d %H:%M}"


def test_a_timestamp_larger_than_batch_rows_travels_whole() -> None:
    source = reader(speed=0, batch_rows=5, end=FIRST + timedelta(hours=2))
    batches = list(source.read(None, T0))
    assert [b.rows.height for b in batches] == [N_SERIES] * 3
    assert [b.rows["ts"].n_unique() for b in batches] == [1, 1, 1]
    assert batches[-1].exhausted


def test_origin_names_the_dataset_and_timestamp() -> None:
    rows = list(reader(speed=0, end=FIRST).read(None, T0))[0].rows
    assert set(rows["origin"]) == {"nycflights13:2013-01-01T10:00:00+00:00"}


def test_series_filter() -> None:
    wanted = ["flights.JFK", "flights.LGA.WN"]
    batches = list(reader(speed=0, series_filter=wanted).read(None, T0))
    rows = emitted(batches)
    assert sorted(rows["series"].unique()) == wanted
    assert rows.height == 2 * 8756
    assert batches[-1].exhausted


def test_unknown_series_in_filter_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="flights.XYZ"):
        list(reader(series_filter=["flights.EWR", "flights.XYZ"]).read(None, T0))


def test_start_and_end_bound_the_replay_and_anchor_it() -> None:
    start = datetime(2013, 2, 8, 0, tzinfo=UTC)
    end = datetime(2013, 2, 10, 0, tzinfo=UTC)
    source = reader(speed=3600, start=start, end=end)
    first = list(source.read(None, T0))
    assert emitted(first)["ts"].unique().to_list() == [start]
    assert first[-1].cursor["anchor_data"] == start.isoformat()
    assert first[-1].total_hint == 49 * N_SERIES

    rest = list(source.read(roundtrip(first[-1].cursor), T0 + timedelta(days=1)))
    rows = emitted(rest)
    assert rows["ts"].min() == start + timedelta(hours=1)
    assert rows["ts"].max() == end
    assert rest[-1].exhausted


def test_naive_start_is_taken_as_utc() -> None:
    source = reader(speed=0, start=datetime(2013, 6, 1), end=datetime(2013, 6, 1, 1))
    rows = emitted(list(source.read(None, T0)))
    assert rows["ts"].unique().sort().to_list() == [
        datetime(2013, 6, 1, 0, tzinfo=UTC),
        datetime(2013, 6, 1, 1, tzinfo=UTC),
    ]


def test_start_before_the_data_still_persists_its_anchor() -> None:
    start = datetime(2013, 1, 1, 0, tzinfo=UTC)  # data starts ten hours later
    source = reader(speed=3600, start=start)
    first = list(source.read(None, T0))
    assert len(first) == 1 and first[0].rows.height == 0 and not first[0].exhausted
    cursor = roundtrip(first[0].cursor)
    assert cursor == {
        "anchor_wall": T0.isoformat(),
        "anchor_data": start.isoformat(),
        "emitted_until": None,
    }
    assert list(source.read(cursor, T0 + timedelta(seconds=5))) == []  # 05:00, still nothing
    rows = emitted(list(source.read(cursor, T0 + timedelta(seconds=11))))
    assert rows["ts"].unique().sort().to_list() == [FIRST, FIRST + timedelta(hours=1)]


def test_restart_from_a_mid_cursor_resumes_exactly(dataset: pl.DataFrame) -> None:
    batches = list(reader(speed=0, batch_rows=5000).read(None, T0))
    middle = len(batches) // 2
    done = emitted(batches[: middle + 1])
    # A new process: a fresh reader, the cursor as stored, a later wall clock.
    resumed = list(
        reader(speed=0, batch_rows=5000).read(
            roundtrip(batches[middle].cursor), T0 + timedelta(hours=3)
        )
    )
    assert pl.concat([done, emitted(resumed)]).drop("origin").equals(dataset)
    assert resumed[0].total_hint == dataset.height - done.height
    assert resumed[-1].exhausted


def test_paced_restart_catches_up_to_the_wall_clock() -> None:
    source = reader(speed=3600)
    cursor = roundtrip(list(source.read(None, T0))[-1].cursor)
    # Down for a minute: the replay is an hour further on, which one read delivers.
    rows = emitted(list(reader(speed=3600).read(cursor, T0 + timedelta(minutes=1))))
    assert rows["ts"].n_unique() == 60
    assert rows["ts"].max() == FIRST + timedelta(hours=60)


def test_unreadable_cursor_is_a_source_error() -> None:
    with pytest.raises(SourceError, match="cursor"):
        list(reader().read({"anchor_wall": "yesterday"}, T0))


def test_replay_time() -> None:
    cursor = {"anchor_wall": T0.isoformat(), "anchor_data": FIRST.isoformat()}
    assert replay_time(cursor, T0 + timedelta(seconds=10), 0) is None
    assert replay_time(cursor, T0 + timedelta(seconds=10), 2.0) == FIRST + timedelta(seconds=20)
    assert replay_time(cursor, T0 + timedelta(seconds=10), 3600) == FIRST + timedelta(hours=10)
    assert replay_time(cursor, T0 - timedelta(hours=1), 3600) == FIRST  # clock stepped back
    assert replay_time(cursor, T0 + timedelta(days=365), 1e9) is None  # beyond year 9999
    naive_now = (T0 + timedelta(seconds=1)).replace(tzinfo=None)
    assert replay_time(cursor, naive_now, 60) == FIRST + timedelta(minutes=1)


def test_a_disruption_rewrites_only_its_series_and_span(dataset: pl.DataFrame) -> None:
    start = datetime(2013, 2, 8, 0, tzinfo=UTC)
    end = datetime(2013, 2, 9, 0, tzinfo=UTC)
    hit_from, hit_to = start + timedelta(hours=3), start + timedelta(hours=5)
    disruption = {"series": ["flights.J*"], "start": hit_from, "end": hit_to, "scale": 10.0}
    plain = emitted(list(reader(start=start, end=end).read(None, T0)))
    broken = emitted(
        list(
            reader(
                start=start,
                end=end,
                disruptions=[disruption, {**disruption, "scale": 1.0, "offset": 7.0}],
            ).read(None, T0)
        )
    )
    both = plain.join(broken, on=["series", "ts"], suffix="_broken")
    assert both.height == plain.height == broken.height
    jfk = pl.col("series").str.starts_with("flights.J")  # flights.JFK and its 6 carriers
    inside = jfk & pl.col("ts").is_between(hit_from, hit_to)
    changed = both.filter(inside)
    assert changed.height == 3 * 7
    assert (changed["value_broken"] == changed["value"] * 10.0 + 7.0).all()
    untouched = both.filter(~inside)
    assert_series_equal(untouched["value_broken"], untouched["value"], check_names=False)


def test_a_disruption_that_matches_nothing_or_changes_nothing_is_refused() -> None:
    when = {"start": datetime(2013, 2, 8, tzinfo=UTC), "end": datetime(2013, 2, 9, tzinfo=UTC)}
    with pytest.raises(ConfigError, match="match nothing"):
        list(reader(disruptions=[{"series": ["flights.XYZ"], **when, "scale": 2}]).read(None, T0))
    with pytest.raises(ValueError, match="changes nothing"):
        reader(disruptions=[{"series": ["*"], **when}])
    with pytest.raises(ValueError, match="end comes before"):
        reader(
            disruptions=[{"series": ["*"], "start": when["end"], "end": when["start"], "offset": 1}]
        )
