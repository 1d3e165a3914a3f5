"""Pure polars transforms on fixed column names: raw rows -> a clean, regular series.

Columns in: series (Utf8), ts (Utf8 | Datetime | number of epoch seconds), value (Utf8 |
number), origin (Utf8). Columns out of `parse`: series, ts (Datetime("us", "UTC")), value
(Float64), origin. Nothing here touches the store, the clock or a file.
"""

from __future__ import annotations

import polars as pl

TS_DTYPE = pl.Datetime("us", "UTC")

_TZ_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z", "%Y-%m-%dT%H:%M%z", "%Y-%m-%d %H:%M%z")
_NAIVE_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d",
)


def parse_ts_expr(col: str = "ts", dtype: pl.DataType | None = None) -> pl.Expr:
    """An expression turning column `col` into Datetime("us", "UTC"); null where unreadable.

    Strings: ISO 8601 with an offset or 'Z' (converted to UTC), or without (taken as UTC),
    or epoch seconds. Numbers: epoch seconds. Datetimes: converted (naive taken as UTC)."""
    c = pl.col(col)
    if dtype is not None and dtype.is_temporal():
        if isinstance(dtype, pl.Datetime) and dtype.time_zone is not None:
            return c.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
        return c.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if dtype is not None and dtype.is_numeric():
        return (c.cast(pl.Float64) * 1e6).round(0).cast(pl.Int64, strict=False).cast(TS_DTYPE)
    s = c.cast(pl.Utf8).str.strip_chars().str.replace(r"[zZ]$", "+00:00")
    parsed = [s.str.to_datetime(f, strict=False, time_unit="us").dt.convert_time_zone("UTC") for f in _TZ_FORMATS]
    parsed += [s.str.to_datetime(f, strict=False, time_unit="us").dt.replace_time_zone("UTC") for f in _NAIVE_FORMATS]
    epoch = (s.cast(pl.Float64, strict=False) * 1e6).round(0).cast(pl.Int64, strict=False)
    parsed.append(pl.when(s.str.contains(r"^-?\d+(\.\d+)?$")).then(epoch.cast(TS_DTYPE)))
    return pl.coalesce(parsed)


def parse_ts(values: pl.Series) -> pl.Series:
    """parse_ts_expr applied to one Series (handy for sources computing a cursor)."""
    return pl.DataFrame({"ts": values}).select(parse_ts_expr("ts", values.dtype)).to_series()
