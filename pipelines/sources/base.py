"""The Source interface: read raw rows incrementally from a stored cursor.

A source knows nothing about the store. The ingest job hands it the cursor it saved after
the last committed batch (None on the very first read) and the current time from the clock;
the source yields batches, each carrying the cursor that resumes *after* it. The ingest job
commits a batch's rows and its cursor in one transaction, so a crash between batches
resumes exactly where the last commit left off, and re-reading is harmless because every
write is an upsert.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import polars as pl

# Columns of Batch.rows. Types are deliberately loose: parsing and validating is the job of
# forecaster.frames, which quarantines what it cannot read instead of losing it.
#   series: Utf8                                  (series name)
#   ts:     Utf8 | Datetime (tz-aware or naive=UTC) | Int64/Float64 (epoch seconds)
#   value:  Utf8 | Float64 | Int64
#   origin: Utf8  where the row came from, e.g. "data/a.csv:17", kept in quarantine
RAW_COLUMNS = ("series", "ts", "value", "origin")
# Optional: why the source could not read a row whole (a line over the length limit, quotes
# that do not balance, a field count unlike the header's); null for a row read as written.
# forecaster.frames quarantines such a row as bad_record with this text as its detail.
PROBLEM = "problem"

# The most an error message quotes of any one text (a path, a driver's message): a 20 MB
# header once became a 21 MB error line.
ERROR_TEXT_CHARS = 200


@dataclass(frozen=True, slots=True)
class Batch:
    rows: pl.DataFrame
    cursor: Mapping[str, Any]  # JSON-serialisable; resumes after this batch
    exhausted: bool = False  # True when the source will never yield more (end of a replay)
    note: str = ""  # human summary for logs/progress ("a.csv rows 0-50000")
    total_hint: int | None = field(default=None)  # rows expected in all, for progress bars


@runtime_checkable
class Source(Protocol):
    name: str

    def read(self, cursor: Mapping[str, Any] | None, now: datetime) -> Iterator[Batch]:
        """Yield the batches that are new since `cursor`, as of `now` (UTC)."""
        ...


def required_columns(config: Any) -> list[str]:
    """The columns a tabular source (file, SQL) must find: ts and value, and the series
    column when the user chose one (the default "series" is optional: without it the rows
    take series_name, or a name the source derives)."""
    needed = [config.ts_column, config.value_column]
    if config.series_column and "series_column" in config.model_fields_set:
        needed.append(config.series_column)
    return needed


def raw_frame(
    series: list[Any] | pl.Series,
    ts: list[Any] | pl.Series,
    value: list[Any] | pl.Series,
    origin: list[str] | pl.Series | str,
    problem: list[str | None] | pl.Series | None = None,
) -> pl.DataFrame:
    """Build a Batch.rows frame with the standard columns (and PROBLEM when given)."""
    n = len(series)
    if isinstance(origin, str):
        origin = [origin] * n
    columns: dict[str, Any] = {"series": series, "ts": ts, "value": value, "origin": origin}
    if problem is not None:
        columns[PROBLEM] = pl.Series(problem, dtype=pl.Utf8)
    return pl.DataFrame(columns).with_columns(
        pl.col("series").cast(pl.Utf8), pl.col("origin").cast(pl.Utf8)
    )


def clip(text: object, limit: int = ERROR_TEXT_CHARS) -> str:
    """`text` as an error message may quote it: control characters escaped (a NUL, a
    newline or a terminal escape sequence from a file name or a server must not reach a
    terminal or a log line as such) and cut at `limit` characters, the cut marked with an
    ellipsis and the original length."""
    s = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))
    if len(s) <= limit:
        return s
    return f"{s[:limit]}… ({len(s)} characters)"


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
