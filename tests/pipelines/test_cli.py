"""The `forecaster` command line as a user meets it, on real SQLite files (and PostgreSQL for
the newest forecasts): data printed literally, no database made by a typo, the demo's store
found, versions as they are printed, a taken port in one line, and a quick start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from forecaster import schema
from forecaster.store import Store
from pipelines.cli import app
from tests.conftest import FORECASTER
from tests.forecaster.test_metrics import _roll
from tests.pipelines.test_predict import trained  # noqa: F401

HOSTILE = ["[bold]b[/bold]", ":x:", "val[/x]ue", "[red]"]


def _cli(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


def _csv(path: Path, names: list[str], extra: str = "") -> Path:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    lines = ["series,ts,value"]
    for name in names:
        for h in range(48):
            ts = (start + timedelta(hours=h)).strftime("%Y-%m-%dT%H:%M:%SZ")
            lines.append(f"{name},{ts},{h % 7}")
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def _source_config(tmp: Path, csv: Path, database: str | None = None) -> Path:
    cfg = tmp / "src.toml"
    db = f'database_url = "{database}"\n' if database else ""
    cfg.write_text(f'{db}[sources.csv]\nkind = "file"\npath = "{csv}"\n')
    return cfg


@pytest.fixture
def hostile_store(tmp_path) -> str:
    """A store holding series with markup and emoji codes in their names, and a quarantined
    value that looks like markup."""
    db = f"sqlite:///{tmp_path / 's.db'}"
    csv = _csv(tmp_path / "in.csv", HOSTILE, extra="plain,2024-01-01T00:00:00Z,[red]oops\n")
    cfg = _source_config(tmp_path, csv, db)
    assert _cli("--db", db, "db", "upgrade").exit_code == 0
    result = _cli("-c", str(cfg), "ingest", "-s", "csv")
    assert result.exit_code == 0, result.output
    return db


def test_names_and_values_from_the_data_print_literally(hostile_store):
    listed = _cli("--db", hostile_store, "series", "list")
    assert listed.exit_code == 0, listed.output
    for name in HOSTILE:
        assert name in listed.stdout
    assert "❌" not in listed.stdout
    quarantined = _cli("--db", hostile_store, "quarantine", "list")
    assert quarantined.exit_code == 0, quarantined.output
    assert "[red]oops" in quarantined.stdout


@pytest.mark.parametrize("name", ["val[/x]ue2", ":x:2", "[/]"])
def test_an_error_naming_user_data_is_one_literal_line(hostile_store, name):
    result = _cli("--db", hostile_store, "forecasts", "show", name)
    assert result.exit_code == 1
    assert result.stderr == f"error: no series named {name!r} in the store; " + (
        "`forecaster series list` shows them\n"
    )
    unknown = _cli("--db", hostile_store, "ingest", "-s", name)
    assert unknown.exit_code == 1
    assert f"no source named {name!r}" in unknown.stderr
    assert len(unknown.stderr.splitlines()) == 1


READ_COMMANDS = [
    ["series", "list"],
    ["models", "list"],
    ["models", "promote", "v1"],
    ["forecasts", "show", "flights.JFK"],
    ["accuracy"],
    ["anomalies"],
    ["quarantine", "list"],
    ["plot", "flights.JFK", "-o", "p.png"],
    ["db", "current"],
    ["db", "downgrade", "base"],
    ["predict"],
    ["evaluate"],
    ["ingest", "-s", "nycflights"],
]


@pytest.mark.parametrize("command", READ_COMMANDS, ids=" ".join)
def test_a_missing_sqlite_file_is_named_not_created(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    typo = tmp_path / "forecastr.db"
    result = _cli("--db", str(typo), *command)
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        f"error: no database at {typo}: `forecaster db upgrade` creates it there, or point "
        "--db / database_url at an existing one\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_db_upgrade_creates_the_database(tmp_path):
    db = tmp_path / "new.db"
    result = _cli("--db", str(db), "db", "upgrade")
    assert result.exit_code == 0, result.output
    assert db.is_file() and "-> " in result.stdout


def test_the_demo_store_is_found_when_no_database_is_configured(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FORECASTER_DATABASE_URL", raising=False)
    cfg = _source_config(tmp_path, _csv(tmp_path / "in.csv", ["demo.a"]))
    assert _cli("--db", "forecaster-demo.db", "db", "upgrade").exit_code == 0
    filled = _cli("-c", str(cfg), "--db", "forecaster-demo.db", "ingest", "-s", "csv")
    assert filled.exit_code == 0, filled.output

    found = _cli("series", "list")
    assert found.exit_code == 0, found.output
    assert "demo.a" in found.stdout and "1 series" in found.stdout
    assert found.stderr == (
        "forecaster: no database is configured and ./forecaster.db does not exist: using the "
        "demo's store ./forecaster-demo.db (--db PATH chooses another)\n"
    )
    assert not (tmp_path / "forecaster.db").exists()

    # A configured database is never swapped for the demo's.
    monkeypatch.setenv("FORECASTER_DATABASE_URL", f"sqlite:///{tmp_path / 'mine.db'}")
    mine = _cli("series", "list")
    assert mine.exit_code == 1
    assert mine.stderr.startswith(f"error: no database at {tmp_path / 'mine.db'}: ")
    assert len(mine.stderr.splitlines()) == 1
    monkeypatch.delenv("FORECASTER_DATABASE_URL")

    # Once ./forecaster.db exists (db upgrade makes it, never the demo's), it is the store.
    assert _cli("db", "upgrade").exit_code == 0
    own = _cli("series", "list")
    assert own.exit_code == 0 and "0 series" in own.stdout and own.stderr == ""


def _register(store: Store, stage: str) -> int:
    with store.begin() as conn:
        return store.register_model_version(
            conn,
            kind="gru",
            config={},
            uri="file:///nowhere.safetensors",
            sha256="0" * 64,
            trained_from=None,
            trained_to=None,
            metrics={},
            stage=stage,
        )


def test_versions_are_taken_as_printed(tmp_path):
    db = f"sqlite:///{tmp_path / 's.db'}"
    store = Store(db)
    store.upgrade()
    first, second = _register(store, "champion"), _register(store, "candidate")

    listed = _cli("--db", db, "models", "list")
    assert f"v{first}" in listed.stdout and f"v{second}" in listed.stdout
    promoted = _cli("--db", db, "models", "promote", f"v{second}")
    assert promoted.exit_code == 0, promoted.output
    assert promoted.stdout == f"model version v{second} is the champion\n"
    assert store.champion()["id"] == second
    assert _cli("--db", db, "models", "promote", str(first)).exit_code == 0
    assert store.champion()["id"] == first

    unknown = _cli("--db", db, "models", "promote", "v99")
    assert unknown.exit_code == 1
    assert unknown.stderr == (
        "error: no model version 99 in the registry; `forecaster models list` shows them\n"
    )
    bad = _cli("--db", db, "models", "promote", "x1")
    assert bad.exit_code == 2
    assert bad.stderr.startswith("error: 'x1' is not a model version: give it as v8 or 8")
    for option in (["plot", "s", "-o", str(tmp_path / "p.png")], ["forecasts", "show", "s"]):
        wrong = _cli("--db", db, *option, "--model", "v99")
        assert wrong.exit_code == 1 and "no model version 99" in wrong.stderr
    assert store.champion()["id"] == first
    store.close()


def _table_rows(text: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in text.splitlines()
        if line.startswith("│")
    ]


@pytest.mark.slow
def test_forecasts_show_is_each_models_newest_forecast(db_url, trained):  # noqa: F811
    """Against a reference read of every forecast row, on a store with re-issued
    (superseded) forecasts at the newest origins."""
    store = _roll(db_url, trained)
    f, se = schema.forecasts, schema.series
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(se.c.name, f.c.model, f.c.origin_ts, f.c.horizon_step, f.c.yhat)
            .join(se, se.c.id == f.c.series_id)
            .where(f.c.superseded.is_(False))
        ).all()
    series = sorted({r.name for r in rows})
    assert series
    for name in series:
        mine = [r for r in rows if r.name == name]
        want = []
        for model in sorted({r.model for r in mine}):
            newest = max(r.origin_ts for r in mine if r.model == model)
            at = [r for r in mine if r.model == model and r.origin_ts == newest]
            want += [
                [model, f"{newest:%Y-%m-%d %H:%M}", str(r.horizon_step), f"{r.yhat:.2f}"]
                for r in sorted(at, key=lambda r: r.horizon_step)
            ]
        shown = _cli("--db", db_url, "forecasts", "show", name)
        assert shown.exit_code == 0, shown.output
        got = [[r[0], r[1], r[3], r[4]] for r in _table_rows(shown.stdout)]
        assert got == want
        assert len(got) < len(mine)  # the newest origin only, not the history
    store.close()


def _taken_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "names"),
    [
        ("port", ["--port", "http.port", "FORECASTER_HTTP__PORT", "already in use"]),
        (["--host", "192.0.2.1"], ["--host", "http.host", "FORECASTER_HTTP__HOST", "192.0.2.1"]),
    ],
    ids=["taken-port", "foreign-host"],
)
def test_an_address_that_cannot_be_bound_is_one_line(tmp_path, args, names):
    db = tmp_path / "s.db"
    assert _cli("--db", str(db), "db", "upgrade").exit_code == 0
    holder, port = _taken_port()
    with holder:
        options = ["--port", str(port)] if args == "port" else [*args, "--port", "0"]
        proc = subprocess.run(
            [FORECASTER, "--db", str(db), "run", *options],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for name in names:
        assert name in lines[0]


# Not pydantic: typer itself imports it to parse a subcommand's options. structlog: the
# error classes mask their messages with forecaster.masking, which needs no logging library.
HEAVY = {"torch", "polars", "sqlalchemy", "alembic", "matplotlib", "apscheduler"}
HEAVY |= {"prometheus_client", "pydantic_settings", "numpy", "structlog"}


def _loaded(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> set[str]:
    """Modules the real `forecaster ARGS` imports (python -X importtime)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", FORECASTER, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def _imported(args: list[str], cwd: Path) -> set[str]:
    """Top-level packages the real `forecaster ARGS` imports."""
    return {name.split(".")[0] for name in _loaded(args, cwd)}


def test_help_imports_no_heavy_library(tmp_path):
    assert _imported(["--help"], tmp_path) & HEAVY == set()
    assert _imported(["run", "--help"], tmp_path) & HEAVY == set()


def test_read_commands_import_neither_torch_nor_plotting_nor_the_daemon(hostile_store, tmp_path):
    for command in (["series", "list"], ["models", "list"], ["quarantine", "list"]):
        loaded = _imported(["--db", hostile_store, *command], tmp_path)
        assert "sqlalchemy" in loaded  # the check sees what the command imports
        assert loaded & {"torch", "matplotlib", "alembic", "apscheduler", "prometheus_client"} == (
            set()
        )
    # These read rows with SQLAlchemy alone: polars (a tenth of a second or more to import)
    # loads only where the store builds frames.
    for command in (
        ["series", "list"],
        ["models", "list"],
        ["db", "current"],
        ["quarantine", "list"],
    ):
        loaded = _imported(["--db", hostile_store, *command], tmp_path)
        assert "sqlalchemy" in loaded, command
        assert loaded & {"torch", "polars", "numpy"} == set(), command
    assert _imported(["config", "show"], tmp_path) & {"torch", "sqlalchemy", "polars"} == set()


# What building the full settings, writing a log line or the ORM need: a read command whose
# configuration holds no more than the database URL and how to log loads none of it (it
# reads them with forecaster.config_light and configures logging on the first record),
# nor the PostgreSQL driver for a SQLite store.
NOT_FOR_READING = {"pydantic_settings", "structlog", "forecaster.config", "sqlalchemy.orm"}
NOT_FOR_READING |= {"psycopg", "torch", "polars", "numpy"}


def test_read_commands_build_no_settings_and_load_no_logging_library(hostile_store, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FORECASTER_")}
    for command in (
        ["series", "list"],
        ["models", "list"],
        ["quarantine", "list"],
        ["forecasts", "show", ":x:"],
        ["accuracy"],
        ["anomalies"],
        ["db", "current"],
    ):
        loaded = _loaded(["--db", hostile_store, *command], tmp_path, env)
        assert "forecaster.store" in loaded, command  # the check sees what the command imports
        assert loaded & NOT_FOR_READING == set(), command
    # The URL from the environment (a deployment's, beside its HTTP token), or from the file.
    deployed = {**env, "FORECASTER_DATABASE_URL": hostile_store, "FORECASTER_HTTP__TOKEN": "t"}
    assert _loaded(["models", "list"], tmp_path, deployed) & NOT_FOR_READING == set()
    (tmp_path / "forecaster.toml").write_text(f'database_url = "{hostile_store}"\n')
    assert _loaded(["series", "list"], tmp_path, env) & NOT_FOR_READING == set()
    # Anything more in it, and the full settings check it all, as for every other command.
    (tmp_path / "forecaster.toml").write_text(f'database_url = "{hostile_store}"\n[series]\n')
    assert "forecaster.config" in _loaded(["series", "list"], tmp_path, env)
