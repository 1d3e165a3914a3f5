"""The ingest job: source -> frames -> quarantine -> store, one transaction per batch.

A batch's observations, windows, watermarks, quarantined rows and the source cursor that
resumes after it commit together or not at all. A crash anywhere therefore resumes at the
last committed batch, and because every write is an upsert keyed on (series, ts) (and on a
fingerprint for quarantine), reading a batch twice stores it once.

Points sent again as they are stored (the same file under another name, a source that
delivers at least once, a poll that overlaps the last) are recognised as already stored,
however old: not quarantined too_late, not counted as ingested, not late, and no window
completes again. A re-sent point that differs from what is stored is data: within the
lateness bound a late correction, beyond it too_late.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import polars as pl
import structlog

from forecaster import frames
from forecaster.config import SeriesDefaults, format_duration
from forecaster.store import Store
from pipelines.sources.base import Batch, Source

log = structlog.get_logger(__name__)

# A point this far past the clock is refused: one bad timestamp from the future would
# otherwise push the watermark ahead and make every honest point after it "too late".
FUTURE_TOLERANCE = timedelta(minutes=5)


@dataclass
class BatchResult:
    rows_read: int
    observed: int  # points stored as observed
    filled: int  # points added by the gap policy (including left-missing ones)
    quarantined: Counter[str]
    windows: int  # windows recounted
    series: int  # distinct series in the batch
    windows_completed: int = 0  # windows whose last slot this batch stored
    unchanged: int = 0  # points (on the freq grid) sent again exactly as stored


@dataclass
class IngestSummary:
    source: str
    batches: int = 0
    rows_read: int = 0
    observed: int = 0
    filled: int = 0
    windows: int = 0
    windows_completed: int = 0
    unchanged: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    exhausted: bool = False
    stopped: bool = False  # should_stop ended the pass (the source may have more)

    def add(self, r: BatchResult) -> None:
        self.batches += 1
        self.rows_read += r.rows_read
        self.observed += r.observed
        self.filled += r.filled
        self.windows += r.windows
        self.windows_completed += r.windows_completed
        self.unchanged += r.unchanged
        self.quarantined.update(r.quarantined)

    def merge(self, other: IngestSummary) -> None:
        self.batches += other.batches
        self.rows_read += other.rows_read
        self.observed += other.observed
        self.filled += other.filled
        self.windows += other.windows
        self.windows_completed += other.windows_completed
        self.unchanged += other.unchanged
        self.quarantined.update(other.quarantined)
        self.exhausted = other.exhausted
        self.stopped = self.stopped or other.stopped

    def line(self) -> str:
        q = sum(self.quarantined.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.quarantined.items()))
        return (
            f"{self.source}: {self.rows_read} rows read in {self.batches} batches, "
            f"{self.observed} points stored, {self.unchanged} already stored, "
            f"{self.filled} gap points filled, {q} quarantined"
            + (f" ({reasons})" if reasons else "")
        )


def ingest_batch(
    store: Store, source: str, batch: Batch, defaults: SeriesDefaults, now: datetime
) -> BatchResult:
    """Validate, normalise and store one batch with its cursor, in one transaction."""
    freq_us = int(defaults.freq / timedelta(microseconds=1))
    window_us = int(defaults.window / timedelta(microseconds=1))
    lateness_us = int(defaults.allowed_lateness / timedelta(microseconds=1))
    horizon = now + max(FUTURE_TOLERANCE, defaults.freq)
    if batch.rows.is_empty():  # nothing new, but the cursor may still move (end of replay)
        with store.begin() as conn:
            store.save_cursor(conn, source, batch.cursor, rows_added=0)
        return BatchResult(0, 0, 0, Counter(), 0, 0)

    good, bad_parse = frames.parse(batch.rows)
    bad = [
        bad_parse,
        frames.bad_rows(good, pl.col("ts") > horizon, "future", f"clock was {now.isoformat()}"),
    ]
    good = good.filter(pl.col("ts") <= horizon)
    good, bad_dupes = frames.dedupe(good)
    bad.append(bad_dupes)

    with store.begin() as conn:
        ids = store.resolve_series(
            conn,
            good["series"].unique().to_list(),
            create=defaults.auto_create,
            source=source,
            freq_seconds=int(defaults.freq.total_seconds()),
            window_seconds=int(defaults.window.total_seconds()),
        )
        id_frame = pl.DataFrame(
            {"series": list(ids), "series_id": list(ids.values())},
            schema={"series": pl.Utf8, "series_id": pl.Int64},
        )
        good = good.join(id_frame, on="series", how="left")
        bad.append(frames.bad_rows(good, pl.col("series_id").is_null(), "unknown_series"))
        good = good.filter(pl.col("series_id").is_not_null())

        previous = store.watermarks_frame(conn, good["series_id"].unique().to_list()).join(
            id_frame, on="series_id"
        )
        good = good.join(previous.select("series", "prev_ts"), on="series", how="left")
        too_late = (
            pl.col("ts") < pl.col("prev_ts") - pl.duration(microseconds=lateness_us)
        ).fill_null(False)
        good, unchanged = _drop_stored(store, conn, good, too_late, id_frame, freq_us, defaults)
        bad.append(
            frames.bad_rows(
                good,
                too_late,
                "too_late",
                pl.format("watermark {}", pl.col("prev_ts").dt.to_string("%Y-%m-%dT%H:%M:%S%z")),
            )
        )
        good = good.filter(~too_late)
        if defaults.max_backfill is not None:
            # A new series is gap-filled from its first point on: one stray early timestamp
            # (epoch 0, year 1) would mean millions of filler rows.
            reach = pl.duration(microseconds=int(defaults.max_backfill.total_seconds() * 1e6))
            too_old = pl.col("prev_ts").is_null() & (
                pl.col("ts") < pl.col("ts").max().over("series") - reach
            )
            detail = (
                f"over {format_duration(defaults.max_backfill)} before the new series' newest "
                "point (series.max_backfill)"
            )
            bad.append(frames.bad_rows(good, too_old, "too_late", detail))
            good = good.filter(~too_old)
        good = good.drop("prev_ts")

        points = frames.resample(good, freq_us, defaults.aggregate)
        # A sum of finite values may overflow: its rows are quarantined, never stored as inf.
        overflow = points.filter(~pl.col("value").is_finite())
        if overflow.height:
            good = good.with_columns(frames.truncate_to_freq(pl.col("ts"), freq_us).alias("_b"))
            good = good.join(
                overflow.select("series", pl.col("ts").alias("_b"), pl.lit(True).alias("_over")),
                on=["series", "_b"],
                how="left",
            )
            detail = (
                f"the {defaults.aggregate} of its {format_duration(defaults.freq)} bucket overflows"
            )
            bad.append(
                frames.bad_rows(good, pl.col("_over").fill_null(False), "non_finite", detail)
            )
            points = points.filter(pl.col("value").is_finite())
        points = frames.fill_gaps(points, previous.drop("series_id"), freq_us, defaults.gap_policy)
        points = frames.assign_windows(points, window_us).join(id_frame, on="series")
        # Late data: points at or before the stored watermark that change what is stored
        # mark their series, so predict rewinds its state to before them (pipelines.predict).
        late = points.join(previous.select("series_id", "prev_ts"), on="series_id").filter(
            pl.col("ts") <= pl.col("prev_ts")
        )
        changed = store.late_changes(conn, late)
        # What is stored as sent is not stored again: it would count as ingested and, at a
        # window's last slot, complete that window again (a predict for nothing).
        key = ["series_id", "ts"]
        resent = late.select(key).join(changed, on=key, how="anti")
        points = points.join(resent, on=key, how="anti", maintain_order="left")
        unchanged += resent.height
        late = changed
        store.upsert_observations(conn, points, after=previous)
        store.mark_late(conn, late.group_by("series_id").agg(pl.col("ts").min().alias("late_from")))

        newest = (
            points.sort("ts")
            .group_by("series_id")
            .agg(pl.col("ts").last(), pl.col("value").last().alias("last_value"))
        )
        store.upsert_watermarks(conn, newest)
        n_windows = store.refresh_windows(
            conn,
            points,
            freq_seconds=int(defaults.freq.total_seconds()),
            window_seconds=int(defaults.window.total_seconds()),
        )
        quarantined = pl.concat([b for b in bad if not b.is_empty()] or [frames.empty_bad()])
        store.insert_quarantine(conn, source, quarantined)
        observed = int((points["quality"] == "observed").sum())
        store.save_cursor(conn, source, batch.cursor, rows_added=observed)

    return BatchResult(
        rows_read=batch.rows.height,
        observed=observed,
        filled=points.height - observed,
        quarantined=Counter(quarantined["reason"].to_list()),
        windows=n_windows,
        series=int(points["series_id"].n_unique()) if points.height else 0,
        windows_completed=int(
            ((points["ts"].dt.epoch("us") + freq_us) % window_us == 0).sum() if points.height else 0
        ),
        unchanged=unchanged,
    )


def _drop_stored(
    store: Store,
    conn: Any,  # the batch's transaction (only the store names SQLAlchemy's types)
    good: pl.DataFrame,
    too_late: pl.Expr,
    id_frame: pl.DataFrame,
    freq_us: int,
    defaults: SeriesDefaults,
) -> tuple[pl.DataFrame, int]:
    """`good` without its too_late rows whose freq bucket, aggregated as the ingest would,
    equals the observed point stored there (a re-send, not late data), and how many such
    points there were. The other too_late rows stay, for quarantine."""
    old = good.filter(too_late)
    if old.is_empty():
        return good, 0
    buckets = (
        frames.resample(old, freq_us, defaults.aggregate)
        .join(id_frame, on="series")
        .with_columns(quality=pl.lit("observed"))
    )
    changed = store.late_changes(conn, buckets)
    stored = buckets.select("series", "series_id", "ts").join(
        changed, on=["series_id", "ts"], how="anti"
    )
    if stored.is_empty():
        return good, 0
    bucket = frames.truncate_to_freq(pl.col("ts"), freq_us).alias("_bucket")
    keys = stored.select("series", pl.col("ts").alias("_bucket"), pl.lit(True).alias("_stored"))
    good = (
        good.with_columns(bucket)
        .join(keys, on=["series", "_bucket"], how="left", maintain_order="left")
        .filter(~(too_late & pl.col("_stored").fill_null(False)))
        .drop("_bucket", "_stored")
    )
    return good, stored.height


def source_finished(store: Store, source: Source, now: datetime) -> bool:
    """Whether `source` has emitted all it ever will, going by its stored cursor: a replay
    that ran to its end. Reads at most its first batch and writes nothing."""
    cursor = store.get_cursor(source.name)
    if cursor is None:
        return False
    for batch in source.read(cursor, now):
        return batch.exhausted and batch.rows.is_empty()
    return False


def run_ingest(
    store: Store,
    source: Source,
    defaults: SeriesDefaults,
    *,
    now: datetime,
    on_batch: Callable[[Batch, BatchResult], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> IngestSummary:
    """Read every batch the source has as of `now`, committing each as it comes.

    should_stop is asked after each committed batch; when it says yes the pass ends there
    (a SIGTERM need not wait for the rest of a big file). The cursor committed with the
    batch makes the next pass resume right after it."""
    summary = IngestSummary(source=source.name)
    for batch in source.read(store.get_cursor(source.name), now):
        result = ingest_batch(store, source.name, batch, defaults, now)
        summary.add(result)
        summary.exhausted = batch.exhausted
        log.debug("batch ingested", source=source.name, note=batch.note, rows=result.rows_read)
        if on_batch is not None:
            on_batch(batch, result)
        if should_stop is not None and should_stop() and not batch.exhausted:
            summary.stopped = True
            log.info("ingest stopped", source=source.name, batches=summary.batches)
            break
    return summary
