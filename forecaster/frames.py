"""Pure polars transforms on fixed column names: raw rows -> a clean, regular series.

Columns in: series (Utf8), ts (Utf8 | Datetime | number of epoch seconds), value (Utf8 |
number), origin (Utf8), optionally problem (Utf8: why the source could not read the row
whole, see pipelines.sources.base.PROBLEM). Columns out of `parse`: series, ts
(Datetime("us", "UTC")), value (Float64), origin. Nothing here touches the store, the clock
or a file.
"""

from __future__ import annotations

import hashlib

import polars as pl

from forecaster.reasons import (  # noqa: F401 - re-exported: frames' public names
    MAX_FIELD_CHARS,
    MAX_SERIES_NAME,
    QUARANTINE_TEXT_CHARS,
    REASONS,
)

TS_DTYPE = pl.Datetime("us", "UTC")

_TZ_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%z",
    "%Y-%m-%d %H:%M:%S%.f%z",
    "%Y-%m-%dT%H:%M%z",
    "%Y-%m-%d %H:%M%z",
)
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
    return pl.coalesce(_text_ts_parsers(c))


def _text_ts_parsers(c: pl.Expr) -> list[pl.Expr]:
    """Text -> Datetime("us", "UTC") by each accepted form in turn (null where it does not
    read); the first that reads wins."""
    s = c.cast(pl.Utf8).str.strip_chars().str.replace(r"[zZ]$", "+00:00")
    parsed = [
        s.str.to_datetime(f, strict=False, time_unit="us").dt.convert_time_zone("UTC")
        for f in _TZ_FORMATS
    ]
    parsed += [
        s.str.to_datetime(f, strict=False, time_unit="us").dt.replace_time_zone("UTC")
        for f in _NAIVE_FORMATS
    ]
    epoch = (s.cast(pl.Float64, strict=False) * 1e6).round(0).cast(pl.Int64, strict=False)
    parsed.append(pl.when(s.str.contains(r"^-?\d+(\.\d+)?$")).then(epoch.cast(TS_DTYPE)))
    return parsed


def parse_ts(values: pl.Series) -> pl.Series:
    """parse_ts_expr applied to one Series. Text is read by the first form alone where it
    reads (a batch usually has one form), and by the others only where it does not: a
    coalesce of every form parses every row ten times."""
    frame = pl.DataFrame({"ts": values})
    if values.dtype != pl.Utf8:
        return frame.select(parse_ts_expr("ts", values.dtype)).to_series().alias(values.name)
    parsers = _text_ts_parsers(pl.col("ts"))
    out = frame.select(parsers[0]).to_series()
    rest = out.is_null() & values.is_not_null()
    if rest.any():
        idx = rest.arg_true()
        out = out.scatter(idx, frame.filter(rest).select(pl.coalesce(parsers[1:])).to_series())
    return out.alias(values.name)


RAW_REQUIRED = ("series", "ts", "value")


def validate_raw(rows: pl.DataFrame) -> pl.DataFrame:
    """Check the raw columns exist; add an empty `origin` if absent."""
    for col in RAW_REQUIRED:
        if col not in rows.columns:
            raise ValueError(
                f"raw rows lack the column {col!r} (they have {rows.columns}); a source must "
                f"yield columns {list(RAW_REQUIRED)} plus optional 'origin' and 'problem'"
            )
    for col in ("origin", "problem"):
        if col not in rows.columns:
            rows = rows.with_columns(pl.lit(None, pl.Utf8).alias(col))
    return rows.select(
        "series", "ts", "value", pl.col("origin").cast(pl.Utf8), pl.col("problem").cast(pl.Utf8)
    )


def _as_text(col: str, dtype: pl.DataType) -> pl.Expr:
    c = pl.col(col)
    if isinstance(dtype, pl.Datetime):
        return c.dt.to_string("%Y-%m-%dT%H:%M:%S%.f%z")
    return c.cast(pl.Utf8)


def parse(rows: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Raw rows -> (good, bad).

    good: series, ts (UTC, us), value (finite Float64), origin, seq (arrival order), and
    ts_raw, value_raw (the text as read, so a row quarantined later keeps what arrived).
    bad: series, ts_raw, value_raw, origin, reason, detail (all Utf8), texts bounded as
    `bound_texts` does."""
    rows = validate_raw(rows)
    ts_dtype, value_dtype = rows.schema["ts"], rows.schema["value"]
    ts_len = _as_text("ts", ts_dtype).str.len_chars()
    value_len = _as_text("value", value_dtype).str.len_chars()
    # Over-long texts are not handed to the parsers at all (null: unreadable).
    ts_in = pl.when(ts_len <= MAX_FIELD_CHARS).then(pl.col("ts"))
    if value_dtype.is_numeric():
        value = pl.col("value").cast(pl.Float64)
    else:
        value = (
            pl.when(value_len <= MAX_FIELD_CHARS)
            .then(pl.col("value").cast(pl.Utf8))
            .str.strip_chars()
            .cast(pl.Float64, strict=False)
        )
    df = rows.with_columns(ts_in.alias("_ts_in"))
    df = df.with_columns(
        pl.col("series").cast(pl.Utf8).str.strip_chars().alias("series"),
        parse_ts(df["_ts_in"]).alias("_ts"),
        value.alias("_value"),
        _as_text("ts", ts_dtype).alias("ts_raw"),
        _as_text("value", value_dtype).alias("value_raw"),
        ts_len.alias("_ts_len"),
        value_len.alias("_value_len"),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("seq"),
    )
    reason = (
        pl.when(pl.col("problem").is_not_null())
        .then(pl.lit("bad_record"))
        .when(pl.col("series").is_null() | (pl.col("series") == ""))
        .then(pl.lit("missing_series"))
        .when(
            (pl.col("series").str.len_chars() > MAX_SERIES_NAME)
            | pl.col("series").str.contains("\x00", literal=True)
        )
        .then(pl.lit("bad_series"))
        .when(pl.col("_ts").is_null())
        .then(pl.lit("bad_ts"))
        .when(pl.col("_value").is_null())
        .then(pl.lit("bad_value"))
        .when(~pl.col("_value").is_finite())
        .then(pl.lit("non_finite"))
    )
    too_long = f"the text is {{}} characters, over the limit of {MAX_FIELD_CHARS}"
    detail = (
        pl.when(pl.col("reason") == "bad_record")
        .then(pl.col("problem"))
        .when((pl.col("reason") == "bad_ts") & (pl.col("_ts_len") > MAX_FIELD_CHARS))
        .then(pl.format(too_long, pl.col("_ts_len")))
        .when((pl.col("reason") == "bad_value") & (pl.col("_value_len") > MAX_FIELD_CHARS))
        .then(pl.format(too_long, pl.col("_value_len")))
    )
    df = df.with_columns(reason.alias("reason")).with_columns(detail.alias("detail"))
    good = df.filter(pl.col("reason").is_null()).select(
        "series",
        pl.col("_ts").alias("ts"),
        pl.col("_value").alias("value"),
        "origin",
        "seq",
        "ts_raw",
        "value_raw",
    )
    bad = df.filter(pl.col("reason").is_not_null()).select(
        "series", "ts_raw", "value_raw", "origin", "reason", pl.col("detail").cast(pl.Utf8)
    )
    return good, bound_texts(bad)


def bad_rows(
    good: pl.DataFrame, mask: pl.Expr, reason: str, detail: pl.Expr | str | None = None
) -> pl.DataFrame:
    """Rows of a parsed frame selected by `mask`, in the quarantine layout."""
    if not isinstance(detail, pl.Expr):
        detail = pl.lit(detail, pl.Utf8)
    return bound_texts(
        good.filter(mask).select(
            "series",
            "ts_raw",
            "value_raw",
            "origin",
            pl.lit(reason).alias("reason"),
            detail.cast(pl.Utf8).alias("detail"),
        )
    )


def bounded_text(text: str | None) -> str | None:
    """`text` if it is at most QUARANTINE_TEXT_CHARS long, else its first that many
    characters, an ellipsis, its length and the sha256 of its UTF-8 (to tell two long texts
    apart, or match one against the file it came from)."""
    if text is None or len(text) <= QUARANTINE_TEXT_CHARS:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{text[:QUARANTINE_TEXT_CHARS]}… ({len(text)} characters, sha256 {digest})"


_BAD_TEXTS = ("series", "ts_raw", "value_raw", "origin", "detail")


def bound_texts(bad: pl.DataFrame) -> pl.DataFrame:
    """A quarantine frame with every text cut by `bounded_text`."""
    if bad.is_empty():
        return bad
    longest = bad.select(pl.col(c).cast(pl.Utf8).str.len_chars().max() for c in _BAD_TEXTS)
    long = [
        c
        for c, n in zip(_BAD_TEXTS, longest.row(0), strict=True)
        if n and n > QUARANTINE_TEXT_CHARS
    ]
    return bad.with_columns(
        pl.Series(c, [bounded_text(v) for v in bad[c].cast(pl.Utf8).to_list()], dtype=pl.Utf8)
        for c in long
    )


def empty_bad() -> pl.DataFrame:
    return pl.DataFrame(
        schema={c: pl.Utf8 for c in ("series", "ts_raw", "value_raw", "origin", "reason", "detail")}
    )


def dedupe(good: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Collapse rows with the same (series, ts).

    Same value: keep one, silently. Different values: the latest in arrival order wins and
    each replaced value is returned as a `conflicting_duplicate` quarantine row."""
    winner = good.group_by("series", "ts").agg(
        pl.col("seq").max().alias("_win_seq"),
        pl.col("value").sort_by("seq").last().alias("_win"),
        pl.col("origin").sort_by("seq").last().alias("_win_origin"),
    )
    df = good.join(winner, on=["series", "ts"], how="left")
    kept = df.filter(pl.col("seq") == pl.col("_win_seq")).drop("_win_seq", "_win", "_win_origin")
    replaced = df.filter(
        (pl.col("seq") != pl.col("_win_seq")) & (pl.col("value") != pl.col("_win"))
    )
    bad = bad_rows(
        replaced,
        pl.lit(True),
        "conflicting_duplicate",
        pl.format(
            "replaced by {} from {}", pl.col("_win"), pl.col("_win_origin").fill_null("a later row")
        ),
    )
    return kept.sort("series", "ts"), bad


def truncate_to_freq(ts: pl.Expr, freq_us: int) -> pl.Expr:
    """Floor a UTC timestamp to a multiple of freq since the epoch."""
    epoch_us = ts.dt.epoch("us")
    return ((epoch_us // freq_us) * freq_us).cast(TS_DTYPE)


def resample(good: pl.DataFrame, freq_us: int, aggregate: str) -> pl.DataFrame:
    """Put every point on the freq grid (aligned to the epoch), aggregating points that share
    a bucket with `aggregate` (mean, sum, last, min, max). Keeps the first origin."""
    mean = pl.col("value").mean()
    agg = {
        # Finite values can have an infinite sum (two of 1e308): then sum the shares instead.
        "mean": pl.when(mean.is_finite()).then(mean).otherwise((pl.col("value") / pl.len()).sum()),
        "sum": pl.col("value").sum(),
        "last": pl.col("value").sort_by("seq").last(),
        "min": pl.col("value").min(),
        "max": pl.col("value").max(),
    }[aggregate]
    bucketed = good.with_columns(truncate_to_freq(pl.col("ts"), freq_us).alias("ts"))
    return (
        bucketed.group_by("series", "ts")
        .agg(agg.alias("value"), pl.col("origin").sort_by("seq").first(), pl.col("seq").min())
        .sort("series", "ts")
    )


def fill_gaps(
    points: pl.DataFrame, previous: pl.DataFrame, freq_us: int, policy: str
) -> pl.DataFrame:
    """Make each series regular from just after its previous watermark to its newest point.

    points: series, ts (on the grid), value. previous: series, prev_ts, prev_value (the
    stored watermark; absent series start at their first point). Points at or before the
    watermark are late corrections: passed through, no filling. Returns series, ts, value,
    quality in ('observed', 'ffill', 'interpolated', 'missing')."""
    if points.is_empty():
        return points.select("series", "ts", "value").with_columns(quality=pl.lit("observed"))
    pts = points.select("series", "ts", "value").join(previous, on="series", how="left")
    late = pts.filter(pl.col("ts") <= pl.col("prev_ts")).select(
        "series", "ts", "value", pl.lit("observed").alias("quality")
    )
    new = pts.filter(pl.col("prev_ts").is_null() | (pl.col("ts") > pl.col("prev_ts")))
    if new.is_empty():
        return late
    bounds = new.group_by("series").agg(
        pl.coalesce(
            pl.col("prev_ts").first() + pl.duration(microseconds=freq_us), pl.col("ts").min()
        ).alias("lo"),
        pl.col("ts").max().alias("hi"),
        pl.col("prev_ts").first(),
        pl.col("prev_value").first(),
    )
    grid = bounds.select(
        "series",
        pl.datetime_ranges(
            "lo", "hi", interval=f"{freq_us}us", time_unit="us", time_zone="UTC"
        ).alias("ts"),
    ).explode("ts")
    df = grid.join(new.select("series", "ts", "value"), on=["series", "ts"], how="left")
    observed = pl.col("value").is_not_null()
    if policy == "null":
        return pl.concat(
            [
                late,
                df.with_columns(
                    pl.when(observed)
                    .then(pl.lit("observed"))
                    .otherwise(pl.lit("missing"))
                    .alias("quality")
                ),
            ]
        )
    # Seed each series with its stored last point so fills continue across batches.
    seed = bounds.filter(pl.col("prev_ts").is_not_null()).select(
        "series",
        pl.col("prev_ts").alias("ts"),
        pl.col("prev_value").alias("value"),
        pl.lit(True).alias("_seed"),
    )
    df = pl.concat([seed, df.with_columns(pl.lit(False).alias("_seed"))], how="diagonal").sort(
        "series", "ts"
    )
    if policy == "ffill":
        filled = pl.col("value").forward_fill().over("series")
        fill_quality = "ffill"
    else:
        filled = pl.col("value").interpolate_by("ts").over("series")
        fill_quality = "interpolated"
    df = df.with_columns(
        filled.alias("value"),
        pl.when(observed).then(pl.lit("observed")).otherwise(pl.lit(fill_quality)).alias("quality"),
    ).filter(~pl.col("_seed"))
    # What cannot be filled (a gap before the first value ever seen) stays missing.
    df = df.with_columns(
        pl.when(pl.col("value").is_null())
        .then(pl.lit("missing"))
        .otherwise(pl.col("quality"))
        .alias("quality")
    ).drop("_seed")
    return pl.concat([late, df])


def assign_windows(points: pl.DataFrame, window_us: int) -> pl.DataFrame:
    """Add window_id = floor(epoch / window): epoch-aligned, so ids are stable across restarts."""
    return points.with_columns((pl.col("ts").dt.epoch("us") // window_us).alias("window_id"))
