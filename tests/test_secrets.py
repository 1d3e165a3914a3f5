"""No secret ever printed: distinctive secrets planted in the database URL, the HTTP token and
a source's URL in the TOML file, then searched for in every output: log lines of both
formats at every level, tracebacks (a failed job's, a crash of the CLI itself, a thread's),
`config show`, error messages, and the settings' own repr."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import structlog

from forecaster.clock import FixedClock
from forecaster.config import Settings, load_settings, mask_url
from forecaster.errors import ConfigError
from forecaster.log import configure_logging, configure_logging_on_first_record
from forecaster.store import Store
from pipelines.jobs import Job, JobContext, run_job
from tests.conftest import FORECASTER
from tests.pipelines.sources.conftest import free_port

DB_PASSWORD = "pw-db-3e71c9"
TOKEN = "tok-http-b82f5a"
SOURCE_PASSWORD = "pw-src-4d09e6"
API_KEY = "tok-api-61c0ad"
SECRETS = (DB_PASSWORD, TOKEN, SOURCE_PASSWORD, API_KEY)
NOW = datetime(2024, 3, 2, tzinfo=UTC)


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def _toml(tmp_path: Path, database_url: str, *, extra: str = "") -> Path:
    """A config holding a password in the database URL and in a source's URL, and an http
    source whose header value comes from an environment variable."""
    path = tmp_path / "forecaster.toml"
    path.write_text(
        f'database_url = "{database_url}"\n'
        "[sources.warehouse]\n"
        'kind = "sql"\n'
        f'url = "postgresql://reader:{SOURCE_PASSWORD}@127.0.0.1:{free_port()}/dw"\n'
        'query = "SELECT series, ts, value FROM points WHERE ts > :since"\n'
        "[sources.api]\n"
        'kind = "http"\n'
        f'url = "http://reader:{SOURCE_PASSWORD}@127.0.0.1:{free_port()}/points"\n'
        'auth_env = "API_KEY"\n' + extra
    )
    return path


@pytest.fixture
def env(monkeypatch, tmp_path) -> None:
    for key in [k for k in os.environ if k.startswith("FORECASTER_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("FORECASTER_HTTP__TOKEN", TOKEN)
    monkeypatch.setenv("API_KEY", API_KEY)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def logs() -> Iterator[None]:
    """configure_logging changes the process: its root handler and exception hooks. Put
    them back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    hooks = sys.excepthook, threading.excepthook
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.excepthook, threading.excepthook = hooks
    structlog.reset_defaults()


def _failing_job(settings: Settings) -> None:
    """Fails the way a job talking to its database and sources does: every secret a local,
    and in the message (a driver quoting its URL) and its cause."""
    token = settings.http.token.get_secret_value() if settings.http.token else None
    source_url = settings.sources["warehouse"].url
    try:
        raise OSError(f"refused: {source_url} (header {API_KEY})")
    except OSError as cause:
        raise RuntimeError(f"cannot reach {settings.database_url} with {token}") from cause


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_no_log_line_shows_a_secret_at_any_level(fmt, env, logs, tmp_path, capsys):
    """The console renderer's traceback printed every frame's locals, the settings among
    them, and a value logged as it was went out as it was, in both formats."""
    url = f"postgresql://forecaster:{DB_PASSWORD}@db.internal:5432/fc"
    settings = load_settings(_toml(tmp_path, url))
    configure_logging("debug", fmt)
    log = structlog.get_logger("forecaster.test")
    log.debug("settings", settings=settings)
    log.info("connecting", url=settings.database_url, token=TOKEN)
    log.warning(f"source {settings.sources['warehouse'].url} is slow")
    logging.getLogger("sqlalchemy.pool").error("lost %s", settings.database_url)
    try:
        _failing_job(settings)
    except RuntimeError:
        log.exception("job failed", job="ingest:warehouse")
        logging.getLogger("forecaster.other").exception("job failed too")
        log.critical("giving up", exc_info=True)
    out = capsys.readouterr()
    text = out.out + out.err
    assert not _leaks(text), text
    assert text.count("job failed") == 2 and "giving up" in text
    assert "postgresql://forecaster:***@db.internal:5432/fc" in text  # masked, not dropped
    assert "cannot reach" in text and "refused" in text  # the exceptions and their cause
    if fmt == "json":
        lines = [json.loads(line) for line in out.err.splitlines()]
        failed = next(r for r in lines if r["event"] == "job failed")
        # a structured traceback, which the JSON lines lacked (exc_info came out as `true`)
        assert {e["exc_type"] for e in failed["exception"]} == {"RuntimeError", "OSError"}
        assert not any("locals" in f for e in failed["exception"] for f in e["frames"])
    else:
        assert text.count("Traceback (most recent call last)") >= 3


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_a_failed_job_logs_its_traceback_without_a_secret(fmt, env, logs, tmp_path, capsys):
    """The daemon's own path: run_job logs a failure with log.exception, each frame's
    locals holding the JobContext and its settings."""
    store_url = f"sqlite:///{tmp_path / 's.db'}"
    store = Store(store_url)
    store.upgrade()
    try:
        settings = load_settings(_toml(tmp_path, store_url))
        configure_logging("info", fmt)
        ctx = JobContext(settings=settings, store=store, clock=FixedClock(NOW))
        outcome = run_job(Job(kind="ingest", source="api", scheduled_at=NOW), ctx)
    finally:
        store.close()
    assert outcome.status == "failed"
    out = capsys.readouterr()
    assert "job failed" in out.err and "SourceError" in out.err
    assert not _leaks(out.out + out.err), out.err


def test_an_uncaught_exception_in_a_thread_is_logged_masked(env, logs, tmp_path, capsys):
    settings = load_settings(_toml(tmp_path, f"postgresql://u:{DB_PASSWORD}@h/db"))
    configure_logging("info", "console")
    thread = threading.Thread(target=_failing_job, args=(settings,), name="worker-1")
    thread.start()
    thread.join()
    err = capsys.readouterr().err
    assert "uncaught exception in thread worker-1" in err and "RuntimeError" in err
    assert not _leaks(err), err


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_logging_configured_on_the_first_record_logs_what_configuring_it_at_once_logs(
    fmt, env, logs, tmp_path, capsys
):
    """The read commands configure logging when the first record comes (structlog is not
    loaded otherwise): the same lines, levels and masking, uncaught exceptions included."""
    settings = load_settings(_toml(tmp_path, f"postgresql://u:{DB_PASSWORD}@h/db"))

    def emit() -> str:
        logging.getLogger("sqlalchemy.pool").info("below warning: not shown")
        logging.getLogger("forecaster.x").debug("below info: not shown")
        logging.getLogger("forecaster.x").warning("lost %s", settings.database_url)
        try:
            _failing_job(settings)
        except RuntimeError:
            sys.excepthook(*sys.exc_info())
        logging.getLogger("sqlalchemy.pool").error("gone %s", TOKEN)
        return re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z", "TS", capsys.readouterr().err)

    capsys.readouterr()
    configure_logging("info", fmt)
    now = emit()
    structlog.reset_defaults()
    configure_logging_on_first_record("info", fmt)
    assert logging.getLogger().handlers[0].__class__.__name__ == "_ConfigureOnFirstRecord"
    later = emit()
    assert later == now
    assert "lost" in now and "uncaught exception" in now and "gone" in now
    assert "not shown" not in now and not _leaks(now), now


def test_the_settings_repr_masks_every_secret(env, tmp_path):
    """A repr of the settings (a debugger, a log of the object, a traceback's locals from
    any printer) never shows the database's or a source's password; str() of the URL is
    still the whole URL, to connect with."""
    from rich.pretty import pretty_repr

    url = f"postgresql://forecaster:{DB_PASSWORD}@db.internal:5432/fc"
    settings = load_settings(_toml(tmp_path, url))
    for text in (repr(settings), str(settings), pretty_repr(settings)):
        assert not _leaks(text), text
        assert "postgresql://forecaster:***@db.internal:5432/fc" in text
    # each URL alone too, as a traceback's locals show it, yet whole where it is used
    assert repr(settings.database_url) == repr(mask_url(url))
    assert SOURCE_PASSWORD not in repr(settings.sources["warehouse"].url)
    assert str(settings.database_url) == url and settings.database_url == url
    assert f"{settings.sources['warehouse'].url}".count(SOURCE_PASSWORD) == 1


def test_settings_unpickled_in_another_process_mask_their_secrets(env, tmp_path):
    """A retrain runs in a spawned process that gets the settings pickled, never loading
    them itself: its logs must know the secrets all the same."""
    settings = load_settings(_toml(tmp_path, f"postgresql://u:{DB_PASSWORD}@h/db"))
    (tmp_path / "s.pkl").write_bytes(pickle.dumps(settings))
    code = (
        "import pickle, sys; from forecaster.log import mask_secrets; "
        "pickle.loads(open(sys.argv[1], 'rb').read()); print(mask_secrets(sys.argv[2]))"
    )
    line = " ".join(SECRETS)
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "s.pkl"), line],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.split() == ["***"] * len(SECRETS), result.stdout


def test_error_messages_are_masked_when_built(env, tmp_path):
    """A domain error is printed as it is (the CLI's one red line), whoever built it:
    `run --demo --fresh` named the database URL it refused in full."""
    from forecaster.errors import SourceError, StoreError

    load_settings(_toml(tmp_path, "sqlite:///x.db"))  # remembers the token and API key
    url = f"postgresql://forecaster:{DB_PASSWORD}@db/fc"
    errors = [
        ConfigError("--fresh", f"only a SQLite demo database can be deleted, not {url}", ""),
        StoreError(f"cannot reach {url}"),
        SourceError("api", f"HTTP 401: echoed {TOKEN} and {API_KEY}"),
    ]
    for exc in errors:
        assert not _leaks(str(exc)) and not _leaks(repr(exc)), repr(exc)
    assert "postgresql://forecaster:***@db/fc" in str(errors[0])


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("at postgresql://u:p@ss@h/db, then", "at postgresql://u:***@h/db, then"),
        ("'http://h:1/x?token=abc&y=1'", "'http://h:1/x?token=***&y=1'"),
        ("host=h password=abc dbname=d", "host=h password=*** dbname=d"),
        ("no secret: http://h:8080/x?mail=a@b", "no secret: http://h:8080/x?mail=a@b"),
        # a parser quoting a piece of a remembered password it split at a delimiter
        ("invalid literal for int(): 'pw-piece-77a1@h'", "invalid literal for int(): '***@h'"),
        ("header tok-remembered-1c2d", "header ***"),
    ],
)
def test_mask_secrets_in_free_text(text, masked):
    from forecaster.log import mask_secrets, remember_secrets

    remember_secrets(["p@ss:pw-piece-77a1", "tok-remembered-1c2d"])
    assert mask_secrets(text) == masked


# -- the real CLI, in a subprocess: every channel it has ----------------------------------------


def _cli(tmp_path: Path, fmt: str, *args: str, **extra: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORECASTER_", "CI"))}
    env.update(
        **extra,
        FORECASTER_HTTP__TOKEN=TOKEN,
        FORECASTER_LOG_LEVEL="debug",
        FORECASTER_LOG_FORMAT=fmt,
        API_KEY=API_KEY,
        COLUMNS="80",  # narrow: rich wraps long lines, which must not cut a secret in two
    )
    result = subprocess.run(
        [FORECASTER, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_the_cli_prints_no_secret_on_any_path(fmt, tmp_path):
    unreachable = f"postgresql://forecaster:{DB_PASSWORD}@127.0.0.1:{free_port()}/fc"
    config = _toml(tmp_path, unreachable)

    rc, out = _cli(tmp_path, fmt, "config", "show")
    assert rc == 0 and not _leaks(out), out
    assert json.loads(out)["database_url"].startswith("postgresql://forecaster:***@127.0.0.1:")

    for args in (["db", "upgrade"], ["series", "list"]):
        rc, out = _cli(tmp_path, fmt, *args)
        assert rc != 0 and "127.0.0.1" in out and not _leaks(out), out

    # The CLI crashing on a URL its parser splits at the password's '@' and ':' (SQLAlchemy
    # reads the port from it): the traceback quoted the rest of the password.
    config.write_text(config.read_text().replace(DB_PASSWORD, f"p@ss:{DB_PASSWORD}"))
    rc, out = _cli(tmp_path, fmt, "db", "current")
    assert rc == 1 and "uncaught exception" in out and "ValueError" in out, out
    assert not _leaks(out), out

    # A source failing on a working store: the error, the logs and the failed job's line.
    config.write_text(_toml(tmp_path, f"sqlite:///{tmp_path / 's.db'}").read_text())
    assert _cli(tmp_path, fmt, "db", "upgrade")[0] == 0
    for source in ("warehouse", "api"):
        rc, out = _cli(tmp_path, fmt, "ingest", "--source", source)
        assert rc == 1 and "127.0.0.1" in out and not _leaks(out), out


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_a_read_command_configured_by_the_environment_alone_prints_no_secret(fmt, tmp_path):
    """No config file: the read commands take the database URL without building the full
    settings (forecaster.config_light) and configure logging on the first record. Their
    errors and crashes are masked all the same."""
    unreachable = f"postgresql://forecaster:{DB_PASSWORD}@127.0.0.1:{free_port()}/fc"
    for args in (["series", "list"], ["db", "current"], ["models", "list"]):
        rc, out = _cli(tmp_path, fmt, *args, FORECASTER_DATABASE_URL=unreachable)
        assert rc == 1 and "127.0.0.1" in out and not _leaks(out), out
    crashing = unreachable.replace(DB_PASSWORD, f"p@ss:{DB_PASSWORD}")
    rc, out = _cli(tmp_path, fmt, "db", "current", FORECASTER_DATABASE_URL=crashing)
    assert rc == 1 and "uncaught exception" in out and "ValueError" in out, out
    assert not _leaks(out), out


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        # a source table that cannot be read: its whole table, URL included, was quoted
        ('[sources.broken]\nurl = "postgresql://u:{pw}@h/db"\n', "sources.broken.kind"),
        ('[sources.broken]\nkind = "sql"\nurl = "postgresql://u:{pw}@h/db"\n', "query"),
        # a key that does not exist holds anything, a credential included
        ('[http]\napi_key = "{pw}"\n', "http.api_key"),
        # a URL pasted into the wrong key is quoted back masked
        ('[http]\nport = "postgresql://u:{pw}@h/db"\n', "http.port"),
    ],
)
def test_a_config_error_names_the_key_and_prints_no_secret(tmp_path, extra, key):
    config = _toml(tmp_path, "sqlite:///x.db", extra=extra.format(pw=SOURCE_PASSWORD))
    for fmt in ("console", "json"):
        rc, out = _cli(tmp_path, fmt, "--config", str(config), "config", "show")
        assert rc == 2 and key in out and "Traceback" not in out, out
        assert not _leaks(out), out


def test_load_settings_errors_quote_no_secret(env, tmp_path):
    """The same, in-process: the message names the key and the fix, and no secret."""
    path = _toml(tmp_path, "sqlite:///x.db", extra=f'api_key = "{TOKEN}"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    # the line lands in the [sources.api] table above it
    assert err.value.key == "sources.api.api_key" and not _leaks(str(err.value))
    assert f"Remove it from [sources.api] in {path}" in str(err.value)
