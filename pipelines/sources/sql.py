"""A user's SQL database (anything SQLAlchemy reaches: SQLite, PostgreSQL, ...), read with a query.

The query binds `:since`, the watermark: cursor["since"], or `start` on the very first read,
bound as a timezone-aware UTC datetime. Write it to return only newer rows, in time order:

    SELECT sensor AS series, taken_at AS ts, reading AS value
    FROM readings WHERE taken_at > :since ORDER BY taken_at

The ORDER BY matters: the cursor after each batch is the latest ts read so far, so rows out
of order would be skipped after a restart. Rows sharing the last ts of a batch are read again
by the next batch's query after a crash (the ingest upserts make that harmless). On SQLite,
timestamps are text: :since arrives as 'YYYY-MM-DD HH:MM:SS.ffffff' (what SQLAlchemy's
DateTime stores); compare with `datetime(ts) > datetime(:since)` if yours look different.
With epoch-second columns, compare with the epoch of :since (e.g. `to_timestamp(ts) > :since`
on PostgreSQL). Values pass through as the driver returns them (numbers, datetimes, text).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import polars as pl
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from forecaster.config import SqlSource, mask_url
from forecaster.errors import SourceError
from forecaster.frames import parse_ts
from forecaster.store import normalise_url
from pipelines.sources import loose_column
from pipelines.sources.base import Batch, clip, raw_frame, required_columns


class SqlSourceReader:
    """Runs `config.query` with :since and streams the rows in batches of batch_rows."""

    def __init__(self, name: str, config: SqlSource) -> None:
        self.name = name
        self.config = config

    def read(self, cursor: Mapping[str, Any] | None, now: datetime) -> Iterator[Batch]:
        since = (cursor or {}).get("since")
        start = _utc(since) if since else _utc(self.config.start)
        where = mask_url(self.config.url)
        try:
            engine = sa.create_engine(normalise_url(self.config.url))
        except (sa_exc.NoSuchModuleError, ImportError) as exc:  # names a dialect or driver
            raise SourceError(self.name, f"bad database URL {where}: {clip(exc)}") from exc
        except (sa_exc.ArgumentError, ValueError) as exc:
            # Not the message: it may quote a piece of the URL ("invalid literal for int():
            # 'pa'" for a password holding ':').
            raise SourceError(
                self.name, f"bad database URL {where}: it cannot be parsed; fix `url`"
            ) from exc
        try:
            yield from self._stream(engine, start, since)
        except sa_exc.SQLAlchemyError as exc:
            # exc.orig is the driver's own message, without SQLAlchemy's echo of the parameters.
            lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            detail = clip(lines[0] if lines else type(exc).__name__)
            raise SourceError(self.name, f"query on {where} failed: {detail}") from exc
        finally:
            engine.dispose()

    def _stream(self, engine: sa.Engine, start: datetime, since: str | None) -> Iterator[Batch]:
        stmt = sa.text(self.config.query)
        params: dict[str, Any] = {}
        if "since" in stmt.compile().binds:
            stmt = stmt.bindparams(sa.bindparam("since", type_=sa.DateTime(timezone=True)))
            params["since"] = start
        with engine.connect() as conn:
            size = self.config.batch_rows
            # stream_results: a server-side cursor where the driver has one (PostgreSQL), so a
            # big first read does not land in memory at once.
            result = conn.execution_options(stream_results=True, max_row_buffer=size).execute(
                stmt, params
            )
            keys = list(result.keys())
            self._check_columns(keys)
            parts = result.partitions(size)
            part = next(parts, None)
            n = 0
            while part is not None:
                following = next(parts, None)
                rows = self._frame(keys, part, n, start)
                # Mid-stream, hold the watermark just below the batch's last ts, so a restart
                # re-reads rows that share it with the next batch instead of skipping them.
                since = _advance(since, rows["ts"], hold_last=following is not None)
                yield Batch(
                    rows=rows,
                    cursor={"since": since},
                    note=f"{self.name} rows {n + 1}-{n + rows.height}",
                )
                n += rows.height
                part = following

    def _check_columns(self, keys: list[str]) -> None:
        missing = [c for c in required_columns(self.config) if c not in keys]
        if missing:
            raise SourceError(
                self.name,
                f"the query returns no column {missing[0]!r} (it returns: {clip(', '.join(keys))}); "
                "alias it in the SELECT or set ts_column/value_column/series_column",
            )

    def _frame(self, keys: list[str], part: Sequence[Any], n: int, start: datetime) -> pl.DataFrame:
        cfg = self.config
        cols = list(zip(*part, strict=True)) if part else [() for _ in keys]
        by_name = dict(zip(keys, cols, strict=True))
        if cfg.series_column and cfg.series_column in by_name:
            series = [None if v is None else str(v) for v in by_name[cfg.series_column]]
        else:
            series = [cfg.series_name or self.name] * len(part)
        # Row k of the query's answer for this :since, which is how to find it again.
        prefix = f"{mask_url(cfg.url)}?since={start.isoformat()}#"
        origin = pl.select(
            pl.lit(prefix) + pl.int_range(n + 1, n + 1 + len(part)).cast(pl.Utf8)
        ).to_series()
        return raw_frame(
            series,
            loose_column(list(by_name[cfg.ts_column])),
            loose_column(list(by_name[cfg.value_column])),
            origin,
        )


def _advance(since: str | None, ts: pl.Series, *, hold_last: bool) -> str | None:
    """The watermark after a batch: its latest ts (or, with hold_last, the latest before that)."""
    parsed = parse_ts(ts).drop_nulls()
    if parsed.is_empty():
        return since
    top = parsed.max()
    if hold_last:
        top = parsed.filter(parsed < top).max()
    if top is None:
        return since
    if since is not None and _utc(since) >= top:
        return since
    return top.isoformat()


def _utc(value: str | datetime) -> datetime:
    ts = datetime.fromisoformat(value) if isinstance(value, str) else value
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
