"""Load: 10,000 series replayed fast through the daemon's own jobs, for a bounded number of
windows. Prints, per window: the ingest, predict and evaluate job times, the /metrics scrape
time over real HTTP (the median of 5 scrapes of one running server, default [metrics] bound
of 500 series and all series, served from the snapshot the live daemon's refresher keeps;
and the time that refresher takes to read it after the jobs), and the process's RSS; then
the RSS curve's start and end.

    python bench/load.py [--series 10000] [--windows 12] [--history-weeks 5]
                         [--profile-evaluate] [--evaluate-repeats K] [--pg [URL]]

Data and model as bench/predict.py (the bundled panel tiled to --series, a one-epoch LSTM
as champion). Each window: ingest_batch of 24 new points per series (as the ingest job
writes them), then `run_job` of a predict and an evaluate job (claims, job_runs, the same
code the daemon runs) on a simulated clock at the window's end, then GET /metrics from the
daemon's HttpApp. A window is a day of data: the replay speed these jobs could keep up with
is 86,400 s over the window's total wall time.

With --pg the store is a fresh PostgreSQL database on that server (created and dropped
here; default the test server, postgresql://postgres@127.0.0.1:5432/postgres) instead of a
SQLite file.

With --evaluate-repeats K, the last window's evaluate job also runs on K copies of the store
as it stood just before that job (SQLite's backup API; with --pg, CREATE DATABASE ...
TEMPLATE, the bench's own connections closed first), one after the other, and the median
and spread of those K times are printed: one job timed K times on the same data, for A/B
comparisons of the evaluate code on a noisy machine (run each side with PYTHONPATH).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from predict import (  # noqa: E402
    STEP,
    WINDOW,
    ingest,
    machine,
    pg_admin,
    pg_database,
    pg_drop,
    small_model,
    tiled,
)

from forecaster.checkpoints import save_checkpoint  # noqa: E402
from forecaster.clock import FixedClock  # noqa: E402
from forecaster.config import MetricsSettings, Settings  # noqa: E402
from forecaster.log import configure_logging  # noqa: E402
from forecaster.metrics import ServiceMetrics  # noqa: E402
from forecaster.store import Store  # noqa: E402
from pipelines.http import HttpApp  # noqa: E402
from pipelines.jobs import Job, JobContext, run_job  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


class Scraped:
    """A running /metrics server as the live daemon runs it: the SQL snapshot kept current in
    the background (here: refreshed by hand after each window's jobs, timed), scrapes served
    from it."""

    def __init__(self, store: Store, clock: FixedClock, max_series: int) -> None:
        self.metrics = ServiceMetrics(
            store, MetricsSettings(max_series=max_series), clock, job_ids=["predict", "evaluate"]
        )
        self.app = HttpApp(host="127.0.0.1", port=0, token=None, metrics=self.metrics,
                           readiness=dict)  # fmt: skip
        self.app.start()

    def refresh(self) -> float:
        """Seconds to read the snapshot after the jobs wrote (the refresher thread's work)."""
        t0 = time.perf_counter()
        self.metrics.collector.refresh()
        self.metrics.collector.background = True
        return time.perf_counter() - t0

    def scrape(self, repeat: int = 5) -> tuple[float, int]:
        """The median seconds of `repeat` GET /metrics over loopback, and the body's bytes."""
        timings = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            r = httpx.get(f"{self.app.url}/metrics", timeout=60)
            timings.append(time.perf_counter() - t0)
            r.raise_for_status()
        return sorted(timings)[len(timings) // 2], len(r.content)

    def stop(self) -> None:
        self.app.stop()


def evaluate_copies(
    store: Store, settings: Settings, clock: FixedClock, end: datetime, tmp: str, args
) -> list[float]:
    """The evaluate job's seconds on `args.evaluate_repeats` copies of `store` as it is now,
    each copy made, timed and removed in turn."""
    seconds = []
    src = store.engine.url.database
    for k in range(args.evaluate_repeats):
        if args.pg:
            url = pg_copy(store, args.pg, f"{src}_copy{k}")
        else:
            path = f"{tmp}/copy{k}.db"
            with sqlite3.connect(src) as a, sqlite3.connect(path) as b:
                a.backup(b)
            url = f"sqlite:///{path}"
        copy = Store(url)
        ctx = JobContext(
            settings=settings.model_copy(update={"database_url": url}), store=copy, clock=clock
        )
        out = run_job(Job(kind="evaluate", scheduled_at=end), ctx)
        assert out.status == "succeeded", (out.status, out.summary)
        seconds.append(out.seconds)
        copy.close()
        if args.pg:
            pg_drop(args.pg, f"{src}_copy{k}")
        else:
            os.remove(path)
    return seconds


def pg_copy(store: Store, admin: str, name: str) -> str:
    """A copy of `store`'s PostgreSQL database named `name` (CREATE DATABASE ... TEMPLATE,
    which needs no other session on the source: the bench's own are closed first and come
    back on its next query); its URL."""
    src = store.engine.url.database
    store.engine.dispose()
    with pg_admin(admin) as c:
        c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (src,),
        )
        c.execute(f'CREATE DATABASE "{name}" TEMPLATE "{src}"')
    return store.engine.url.set(database=name).render_as_string(hide_password=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--series", type=int, default=10_000)
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--history-weeks", type=int, default=5)
    ap.add_argument(
        "--profile-evaluate",
        action="store_true",
        help="profile the first and the last window's evaluate job: where its time went",
    )
    ap.add_argument(
        "--evaluate-repeats",
        type=int,
        default=0,
        help="time the last window's evaluate job again on this many copies of the store",
    )
    ap.add_argument(
        "--pg",
        nargs="?",
        const="postgresql://postgres@127.0.0.1:5432/postgres",
        help="run on a fresh database of this PostgreSQL server instead of SQLite",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the daemon's serving process (schedule.torch_threads)
    configure_logging("warning", "console")  # the jobs' own lines would drown the table
    n_hist = args.history_weeks * 7 * WINDOW
    names, start, values = tiled(args.series, n_hist + args.windows * WINDOW)
    print(machine(torch.device("cpu")))
    print(f"database: {'PostgreSQL' if args.pg else 'SQLite'}")
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="forecaster-load-"))
        url = stack.enter_context(pg_database(args.pg)) if args.pg else f"sqlite:///{tmp}/store.db"
        store = Store(url)
        store.upgrade()
        settings = Settings(database_url=url, checkpoint_dir=f"{tmp}/ckpt")
        t0 = time.perf_counter()
        ingest(store, names, start, values[:, :n_hist], "history")
        print(
            f"history: {args.series:,} series x {n_hist} points in {time.perf_counter() - t0:.0f} s"
        )
        trained = small_model("lstm", names, values[:, :n_hist])
        uri, sha = save_checkpoint(trained.to_checkpoint(), Path(tmp) / "ckpt")
        with store.begin() as conn:
            store.register_model_version(
                conn,
                kind="lstm",
                config={},
                uri=uri,
                sha256=sha,
                trained_from=None,
                trained_to=None,
                metrics={},
                stage="champion",
            )
        clock = FixedClock(datetime.fromtimestamp(start + n_hist * STEP, UTC))
        servers = {500: Scraped(store, clock, 500), args.series: Scraped(store, clock, args.series)}
        rows = []
        for w in range(args.windows + 1):  # window 0: the cold start (states from scratch)
            a = n_hist + (w - 1) * WINDOW
            t_ingest = 0.0
            if w > 0:
                t_ingest = ingest(
                    store, names, start + a * STEP, values[:, a : a + WINDOW], f"w{w}"
                )
            end = datetime.fromtimestamp(start + (a + WINDOW if w else n_hist) * STEP, UTC)
            clock.set(end)
            ctx = JobContext(settings=settings, store=store, clock=clock)
            times = {}
            repeats: list[float] = []
            for kind in ("predict", "evaluate"):
                if kind == "evaluate" and w == args.windows and args.evaluate_repeats:
                    repeats = evaluate_copies(store, settings, clock, end, tmp, args)
                profiler = None
                if kind == "evaluate" and args.profile_evaluate and w in (1, args.windows):
                    profiler = cProfile.Profile()
                    profiler.enable()
                out = run_job(Job(kind=kind, scheduled_at=end), ctx)
                if profiler is not None:
                    profiler.disable()
                    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
                assert out.status in ("succeeded", "skipped"), (kind, out.status, out.summary)
                times[kind] = out.seconds
            r500 = servers[500].refresh()
            s500, _ = servers[500].scrape()
            r_all = servers[args.series].refresh()
            s_all, b_all = servers[args.series].scrape()
            rows.append(
                (w, t_ingest, times["predict"], times["evaluate"], s500, s_all, r_all, b_all,
                 rss_mb())
            )  # fmt: skip
            print(
                f"window {w:3d}: ingest {t_ingest:6.2f} s  predict {times['predict']:6.2f} s  "
                f"evaluate {times['evaluate']:6.2f} s  /metrics {s500:5.3f} s (500; snapshot "
                f"{r500:.2f} s) {s_all:5.3f} s (all, {b_all / 1e6:.1f} MB; snapshot {r_all:.2f} s)"
                f"  RSS {rows[-1][-1]:7.1f} MB",
                flush=True,
            )
        for server in servers.values():
            server.stop()
        store.close()
    steady = rows[1:]
    print()
    print(
        "| window | ingest s | predict s | evaluate s | /metrics s (500 series) | "
        "/metrics s (all) | snapshot s (all, in the background) | RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for w, ti, tp, te, s5, sa, ra, _, rss in rows:
        print(
            f"| {w if w else 'cold'} | {ti:.2f} | {tp:.2f} | {te:.2f} | {s5:.3f} | {sa:.3f} | "
            f"{ra:.2f} | {rss:.0f} |"
        )
    worst = max(ti + tp + te for _, ti, tp, te, *_ in steady)
    print()
    print(
        f"RSS after the first steady window {steady[0][-1]:.0f} MB, after the last "
        f"{steady[-1][-1]:.0f} MB ({steady[-1][-1] - steady[0][-1]:+.0f} MB over "
        f"{len(steady) - 1} windows)"
    )
    print(
        f"slowest window's jobs: {worst:.1f} s (a day of data: keeps up with a replay up to "
        f"{86400 / worst:,.0f}x real time; the live intervals are 5 min ingest, 1 h predict "
        f"and evaluate)"
    )
    print(
        f"slowest /metrics scrape (median of 5 per window): {max(r[4] for r in rows):.3f} s "
        f"(500 series), {max(r[5] for r in rows):.3f} s (all {args.series:,}); slowest "
        f"background snapshot {max(r[6] for r in rows):.2f} s"
    )
    if repeats:
        print(
            f"last window's evaluate on {len(repeats)} copies of the store: median "
            f"{statistics.median(repeats):.2f} s (min {min(repeats):.2f}, max "
            f"{max(repeats):.2f}; the run above {rows[-1][3]:.2f} s)"
        )
    print(f"pid {os.getpid()}")


if __name__ == "__main__":
    main()
