"""The `forecaster` command line (it lives in pipelines/ because it drives the jobs). Settings
are built here, once, and passed down.

This module holds the apps, the options every command shares, and the db and config
commands; `cli_show` (reading the store) and `cli_run` (ingest, training, the daemon) add
theirs. Starting is kept cheap, for `--help` and the read commands alike: at import only
typer and rich load; pydantic, SQLAlchemy, polars, torch and the rest load inside the
commands that use them.

Everything printed is literal: the consoles interpret no markup and no emoji codes, so a
series named `val[/x]ue` or `:x:` prints as it is (styles come from rich.text.Text).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from forecaster.errors import ForecasterError

if TYPE_CHECKING:
    from rich.progress import Progress

    from forecaster.config import Settings
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
models_app = typer.Typer(help="Trained model versions.", no_args_is_help=True)
forecasts_app = typer.Typer(help="Stored forecasts.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")
app.add_typer(series_app, name="series")
app.add_typer(quarantine_app, name="quarantine")
app.add_typer(models_app, name="models")
app.add_typer(forecasts_app, name="forecasts")

# Piped output (logs, CI, `| grep`) gets wide lines instead of rich's 80-column default.
out = Console(
    soft_wrap=True,
    width=None if sys.stdout.isatty() else 200,
    markup=False,
    emoji=False,
    highlight=False,
)
err = Console(stderr=True, markup=False, emoji=False, highlight=False)


def _exit_without_collecting() -> None:
    """After a command that trained or forecast, half a million objects (torch,
    statsforecast) made the interpreter's garbage collections at exit take over a second, on
    every such command: the exit skips them. Registered at import, so it runs after every
    other exit handler (they flush logs, close stores and join threads before it); what it
    leaves, the OS reclaims."""
    import atexit
    import gc

    atexit.register(gc.freeze)


_exit_without_collecting()

# The quickstart's store (pipelines.demo.DEMO_DATABASE), found by the commands that follow it.
DEMO_FILE = "forecaster-demo.db"


class UsageError(ForecasterError, ValueError):
    """A command-line value that cannot mean anything (exit status 2)."""


class _State:
    config_file: Path | None = None
    database_url: str | None = None


_state = _State()


def database_url_of(value: str) -> str:
    """--db takes a database URL or the path of a SQLite file."""
    return value if "://" in value else f"sqlite:///{value}"


@app.callback()
def main(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="TOML config file (default: ./forecaster.toml if present)"
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--db",
            "--database-url",
            help="the store: a SQLite file's path or a database URL (sqlite:///PATH, "
            "postgresql://USER@HOST/DB); overrides database_url",
            show_default=False,
        ),
    ] = None,
) -> None:
    _state.config_file = config
    _state.database_url = database_url_of(database_url) if database_url else None


def _settings(*, demo_fallback: bool = True) -> Settings:
    """The settings of this run. demo_fallback: commands that use an existing store take
    the demo's when none is configured (_demo_url)."""
    from forecaster.config import load_settings
    from forecaster.log import configure_logging

    overrides: dict[str, Any] = {}
    if _state.database_url:
        overrides["database_url"] = _state.database_url
    settings = load_settings(_state.config_file, **overrides)
    configure_logging(settings.log_level, settings.log_format)
    if not demo_fallback:
        return settings
    demo = _demo_url(settings.database_url, "database_url" in settings.model_fields_set)
    return settings if demo is None else settings.model_copy(update={"database_url": demo})


def _database_url(*, demo_fallback: bool = True) -> str:
    """The store of this run, for the commands that need no other setting (the read
    commands, db): the same URL, logging and errors as _settings().database_url, without
    building the full settings when the configuration holds no more than the database
    URL and how to log (forecaster.config_light says when)."""
    from forecaster.config_light import light_settings
    from forecaster.log import configure_logging_on_first_record

    light = light_settings(_state.config_file, _state.database_url)
    if light is None:
        return _settings(demo_fallback=demo_fallback).database_url
    configure_logging_on_first_record(light.log_level, light.log_format)
    demo = _demo_url(light.database_url, light.database_url_configured) if demo_fallback else None
    return light.database_url if demo is None else demo


def _demo_url(database_url: str, configured: bool) -> str | None:
    """After the quickstart (`run --demo` writes ./forecaster-demo.db), `series list`,
    `accuracy` and the rest read the demo's store instead of an empty new one: when no
    database is configured (option, file or environment) and ./forecaster.db does not
    exist but ./forecaster-demo.db does. Said once on stderr, so it is never a surprise.
    The demo's URL then, else None."""
    if configured:
        return None
    default = Path(database_url.removeprefix("sqlite:///"))
    if default.exists() or not Path(DEMO_FILE).is_file():
        return None
    err.print(
        f"forecaster: no database is configured and ./{default} does not exist: using the "
        f"demo's store ./{DEMO_FILE} (--db PATH chooses another)",
        soft_wrap=True,
    )
    return f"sqlite:///{DEMO_FILE}"


@contextmanager
def _errors() -> Iterator[None]:
    """Turn our errors into one red line and an exit status, not a traceback."""
    try:
        yield
    except ForecasterError as exc:
        err.print(Text.assemble(("error:", "red"), " ", str(exc)), soft_wrap=True)
        raise typer.Exit(2 if isinstance(exc, ValueError) else 1) from None


@contextmanager
def _store(where: Settings | str, *, check: bool = True, create: bool = False) -> Iterator[Store]:
    """The store of the settings (or of a database URL, _database_url's). create=False
    (every command but `db upgrade` and the demo): a SQLite file that does not exist is an
    error naming it, not a new empty one."""
    from forecaster.store import Store

    store = Store(where if isinstance(where, str) else where.database_url, create=create)
    try:
        if check:
            store.check_schema()
        yield store
    finally:
        store.close()


@contextmanager
def _progress(console: Console | None = None) -> Iterator[Progress]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        TextColumn("{task.description}", markup=False),  # source names and notes are data
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console or err,
        transient=False,
    ) as progress:
        yield progress


def _version_id(text: str) -> int:
    """A model version as the CLI prints it ("v8") or as its bare id ("8")."""
    digits = text.strip().lower().removeprefix("v")
    if not (digits.isascii() and digits.isdigit()):
        raise UsageError(
            f"{text!r} is not a model version: give it as v8 or 8 "
            "(`forecaster models list` shows them)"
        )
    return int(digits)


# -- db -----------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Create or migrate the schema to the newest revision."""
    with _errors():
        with _store(_database_url(demo_fallback=False), check=False, create=True) as store:
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
        with _store(_database_url(demo_fallback=False), check=False) as store:
            before = store.current_revision()
            store.downgrade(revision)
            after = store.current_revision()
        out.print(f"database schema: {before or 'empty'} -> {after or 'empty'}")


@db_app.command("current")
def db_current() -> None:
    """Show the schema revision of the database and of the code."""
    with _errors():
        with _store(_database_url(), check=False) as store:
            out.print(
                f"database: {store.current_revision() or 'empty'}  code: {store.head_revision()}"
            )


# -- config -------------------------------------------------------------------------------


def _humanise(data: Any, model: Any) -> Any:
    from forecaster.config import format_duration

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
    import json

    from forecaster.config import public_dict

    with _errors():
        settings = _settings()
        out.print_json(json.dumps(_humanise(public_dict(settings), settings)))


@config_app.command("reference")
def config_reference() -> None:
    """Print every configuration key with its type, default, environment variable and
    description, as Markdown (the README's configuration reference)."""
    from forecaster.config_reference import reference_markdown

    print(reference_markdown(), end="")


# The commands of the other modules register themselves on the apps above.
from pipelines import cli_run, cli_show  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover
    # Run as a script, this file is __main__, a second copy: the commands registered on the
    # imported pipelines.cli, whose app is the one to run.
    from pipelines.cli import app as _app

    _app()
