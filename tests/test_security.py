"""Security properties, checked on the real thing: the HTTP app's binding and token, secrets
kept out of logs, `config show` and error messages, checkpoints never unpickled, and SQL
always parameterised."""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from forecaster.clock import FixedClock
from forecaster.config import (
    HttpSettings,
    MetricsSettings,
    SeriesDefaults,
    load_settings,
    mask_url,
)
from forecaster.metrics import ServiceMetrics
from forecaster.store import Store
from pipelines.http import HttpApp
from pipelines.ingest import ingest_batch
from pipelines.sources.base import Batch, raw_frame
from tests.pipelines.sources.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "tok-3f9c1a7e-http"
DB_PASSWORD = "pw-db-81d2c0"
SOURCE_TOKEN = "tok-src-5e6b7a"
QUERY_TOKEN = "tok-query-9a4c2f"
URL_PASSWORD = "pw-url-77aa01"
SQL_PASSWORD = "pw-sql-c4d5e6"
SECRETS = (TOKEN, DB_PASSWORD, SOURCE_TOKEN, QUERY_TOKEN, URL_PASSWORD, SQL_PASSWORD)
NOW = datetime(2024, 3, 2, tzinfo=UTC)


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


# -- HTTP: where it listens, and what the token guards ---------------------------------------


@pytest.fixture
def store(sqlite_url: str) -> Iterator[Store]:
    st = Store(sqlite_url)
    st.upgrade()
    rows = raw_frame(["a"] * 3, ["2024-03-01T00:00:00Z", "2024-03-01T01:00:00Z", "x"], "1", "t")
    ingest_batch(st, "t", Batch(rows, {"n": 1}), SeriesDefaults(), NOW)
    yield st
    st.close()


def _app(store: Store, *, host: str, token: str | None) -> HttpApp:
    kwargs: dict[str, Any] = {}
    if "overview" in inspect.signature(HttpApp).parameters:
        kwargs["overview"] = lambda series: (200, "<html>overview</html>")
    app = HttpApp(
        host=host,
        port=0,
        token=token,
        metrics=ServiceMetrics(store, MetricsSettings(), FixedClock(NOW), job_ids=["predict"]),
        readiness=lambda: {"database": True},
        **kwargs,
    )
    app.start()
    return app


def _routes() -> set[str]:
    """Every path pipelines/http.py names (a string literal starting with '/'), plus '/' and
    paths it does not know: whatever routes are added, each is checked."""
    tree = ast.parse((ROOT / "pipelines" / "http.py").read_text())
    found = {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and re.fullmatch(r"/[\w./-]*", node.value)
    }
    assert {"/healthz", "/metrics", "/readyz"} <= found, found
    return found | {"/", "/nope", "/metrics/../readyz", "//metrics", "/healthz/../metrics"}


def _non_loopback_address() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks a route
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


def test_http_binds_loopback_unless_configured(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./forecaster.toml
    for key in [k for k in os.environ if k.startswith("FORECASTER_")]:
        monkeypatch.delenv(key)
    assert load_settings().http.host == "127.0.0.1"
    app = _app(store, host=load_settings().http.host, token=None)
    try:
        assert app._server is not None and app._server.server_address[0] == "127.0.0.1"
        assert httpx.get(f"http://127.0.0.1:{app.port}/healthz").status_code == 200
        other = _non_loopback_address()
        if other is not None:  # the same port on the machine's other address is not served
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{other}:{app.port}/healthz", timeout=2)
    finally:
        app.stop()
    monkeypatch.setenv("FORECASTER_HTTP__HOST", "0.0.0.0")
    assert load_settings().http.host == "0.0.0.0"  # only when asked for
    assert HttpSettings().host == "127.0.0.1"


def test_the_token_guards_every_route_and_method_but_healthz(store):
    app = _app(store, host="127.0.0.1", token=TOKEN)
    try:
        for path in sorted(_routes()):
            url = f"{app.url}{path}"
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
                r = httpx.get(url, headers=headers)
                if path == "/healthz":
                    assert r.status_code == 200 and r.text == "ok\n"
                else:
                    assert r.status_code == 401, (path, headers, r.status_code)
                    assert r.headers["www-authenticate"] == "Bearer"
                assert not _leaks(r.text)
            r = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code != 401, path
            # No other method is ever answered with content without the token.
            for method in ("POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"):
                r = httpx.request(method, url)
                assert not 200 <= r.status_code < 300, (method, path, r.status_code)
        assert httpx.get(f"{app.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    finally:
        app.stop()


# -- secrets: never in `config show`, logs or error messages ---------------------------------


class _EchoServer:
    """A real HTTP server that refuses every request, echoing what it was sent (as some do)."""

    def __init__(self) -> None:
        self.status = 401

        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if outer.status == 200:
                    body = json.dumps([{"series": "a", "ts": "never", "value": 1}]).encode()
                else:
                    body = json.dumps({"path": self.path, "headers": dict(self.headers)}).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def echo() -> Iterator[_EchoServer]:
    server = _EchoServer()
    yield server
    server.close()


def _config(tmp_path: Path, database_url: str, echo_port: int) -> Path:
    path = tmp_path / "f.toml"
    path.write_text(
        f'database_url = "{database_url}"\n'
        "[sources.api]\n"
        'kind = "http"\n'
        f'url = "http://reader:{URL_PASSWORD}@127.0.0.1:{echo_port}/points?token={QUERY_TOKEN}"\n'
        'auth_header = "X-Api-Key"\n'
        'auth_env = "API_KEY"\n'
        "[sources.warehouse]\n"
        'kind = "sql"\n'
        f'url = "postgresql://reader:{SQL_PASSWORD}@127.0.0.1:{free_port()}/dw"\n'
        'query = "SELECT series, ts, value FROM points WHERE ts > :since"\n'
        "[sources.prom]\n"
        'kind = "prometheus"\n'
        f'url = "http://admin:{URL_PASSWORD}@127.0.0.1:{free_port()}"\n'
        'query = "up"\n'
    )
    return path


def _cli(tmp_path: Path, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `forecaster` CLI in a subprocess, logging everything (debug, JSON lines)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FORECASTER_", "API_KEY", "CI"))
    }
    env.update(
        FORECASTER_HTTP__TOKEN=TOKEN,
        FORECASTER_LOG_LEVEL="debug",
        FORECASTER_LOG_FORMAT="json",
        API_KEY=SOURCE_TOKEN,
        COLUMNS="200",
    )
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
        check=False,
    )


def test_config_show_masks_every_secret(tmp_path, echo):
    url = f"postgresql://forecaster:{DB_PASSWORD}@db.internal:5432/fc?sslmode=require"
    result = _cli(tmp_path, _config(tmp_path, url, echo.port), "config", "show")
    assert result.returncode == 0, result.stderr
    assert not _leaks(result.stdout + result.stderr)
    shown = json.loads(result.stdout)
    assert (
        shown["database_url"] == "postgresql://forecaster:***@db.internal:5432/fc?sslmode=require"
    )
    assert shown["http"]["token"] == "*** (set)"
    assert shown["sources"]["api"]["url"] == (
        f"http://reader:***@127.0.0.1:{echo.port}/points?token=***"
    )
    assert shown["sources"]["api"]["auth_env"] == "API_KEY (value not shown)"
    assert shown["sources"]["warehouse"]["url"].startswith("postgresql://reader:***@127.0.0.1:")


@pytest.mark.parametrize(
    "password",
    [DB_PASSWORD, f"{DB_PASSWORD}/x", f"{DB_PASSWORD}@x", f"{DB_PASSWORD}?x", f"{DB_PASSWORD}#x"],
    ids=["plain", "slash", "at", "question", "hash"],
)
def test_an_unreachable_database_never_shows_its_password(tmp_path, echo, password):
    """Passwords with '/', '@', '?' or '#' unescaped, as SQLAlchemy accepts them: `config
    show` used to print those in full (mask_url stopped at the first '/')."""
    url = f"postgresql://forecaster:{password}@127.0.0.1:{free_port()}/fc"
    config = _config(tmp_path, url, echo.port)
    commands = [["config", "show"], ["series", "list"]]
    if password == DB_PASSWORD:  # the failing paths differ by command, not by password
        commands += [["db", "current"], ["db", "upgrade"], ["ingest", "--source", "api"]]
    for args in commands:
        result = _cli(tmp_path, config, *args)
        out = result.stdout + result.stderr
        assert not _leaks(out), (args, out[-2000:])
        if args[0] != "config":
            assert result.returncode != 0, args
            assert "127.0.0.1" in out, out[-2000:]  # it names what it could not reach


def test_a_refused_source_logs_and_says_nothing_secret(tmp_path, echo):
    """401 and 500 answers echo the request (URL, header with the token): the error line,
    the logs and the quarantine (origins name the URL) keep every secret out."""
    config = _config(tmp_path, f"sqlite:///{tmp_path / 's.db'}", echo.port)
    assert _cli(tmp_path, config, "db", "upgrade").returncode == 0
    for status in (401, 500):
        echo.status = status
        result = _cli(tmp_path, config, "ingest", "--source", "api")
        out = result.stdout + result.stderr
        assert result.returncode == 1, out
        assert f"HTTP {status}" in out
        assert not _leaks(out), out[-2000:]
    echo.status = 200  # answered: one unreadable row, quarantined with its origin
    result = _cli(tmp_path, config, "ingest", "--source", "api")
    assert result.returncode == 0, result.stderr
    assert not _leaks(result.stdout + result.stderr)
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    rows, counts = store.list_quarantine()
    store.close()
    assert counts == {"bad_ts": 1}
    assert rows[0]["origin"] == f"http://reader:***@127.0.0.1:{echo.port}/points?token=***#0"
    listed = _cli(tmp_path, config, "quarantine", "list")
    assert listed.returncode == 0 and not _leaks(listed.stdout + listed.stderr)

    # A SQL source whose database is unreachable: the error names it masked.
    result = _cli(tmp_path, config, "ingest", "--source", "warehouse")
    out = result.stdout + result.stderr
    assert result.returncode == 1 and "postgresql://reader:***@127.0.0.1:" in out, out[-2000:]
    assert not _leaks(out)
    # Prometheus behind a password in its URL, unreachable.
    result = _cli(tmp_path, config, "ingest", "--source", "prom")
    assert result.returncode == 1 and not _leaks(result.stdout + result.stderr)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        # SQLAlchemy reads these passwords with the characters unescaped; mask_url stopped at
        # the first '/', '?' or '#' (showing all of it) or the first '@' (showing the rest).
        ("postgresql://u:pa/ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:pa?ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:pa#ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://:pw@h/db", "postgresql://:***@h/db"),
        # libpq takes a password as a query parameter; APIs take tokens there.
        (
            "postgresql://u@h/db?password=pw&sslmode=require",
            "postgresql://u@h/db?password=***&sslmode=require",
        ),
        ("http://h:9090/api?token=t&x=1", "http://h:9090/api?token=***&x=1"),
        ("https://h/x?api_key=k#f", "https://h/x?api_key=***#f"),
        ("http://u:pa/ss@h:1/x", "http://u:***@h:1/x"),
        # no secret: unchanged
        ("http://h:8080/x?mail=a@b", "http://h:8080/x?mail=a@b"),
        ("sqlite:////srv/a@b/x.db", "sqlite:////srv/a@b/x.db"),
        ("postgresql://u@h:5432/db", "postgresql://u@h:5432/db"),
    ],
)
def test_mask_url_hides_every_password_a_client_would_read(url, masked):
    assert mask_url(url) == masked


@pytest.mark.parametrize("kind", ["http", "prometheus"])
def test_a_url_httpx_refuses_is_a_clear_error_without_its_password(kind):
    """httpx.InvalidURL escaped the sources raw, saying "Invalid port: 'pw-url'": a piece of
    the password, unmasked, in a traceback."""
    from forecaster.config import HttpJsonSource, PrometheusSource
    from forecaster.errors import SourceError
    from pipelines.sources import build_source

    url = f"http://reader:{URL_PASSWORD}/x@127.0.0.1:{free_port()}"
    cfg = HttpJsonSource(url=url) if kind == "http" else PrometheusSource(url=url, query="up")
    with pytest.raises(SourceError, match="is not a valid URL; fix `url`") as err:
        list(build_source("s", cfg).read(None, NOW))
    assert not _leaks(str(err.value)) and err.value.__suppress_context__
    assert "pw-url" not in str(err.value)


def test_tracebacks_never_print_local_variables():
    """A traceback that escapes the CLI would print each frame's locals (settings, URLs)
    if Typer's show_locals were on."""
    from pipelines.cli import app

    assert app.pretty_exceptions_show_locals is False


# -- checkpoints: verified by hash, never unpickled -----------------------------------------


_UNPICKLERS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py") if ".venv" not in p.parts)


@pytest.mark.parametrize(
    "path",
    _python_files("forecaster", "pipelines", "bench", "migrations"),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_no_code_unpickles(path):
    """No pickle-family import; torch.load only with weights_only=True; numpy never with
    allow_pickle=True. (Ray serialises its own task arguments; that is not a file we load.)"""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = {a.name.split(".")[0] for a in node.names}
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
            assert not names & _UNPICKLERS, f"{path}:{node.lineno} imports {names & _UNPICKLERS}"
        if isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
            torch_load = func.endswith("torch.load") and not func.startswith("safetensors")
            if torch_load or func == "load" and "weights_only" in kwargs:
                assert kwargs.get("weights_only") == "True", f"{path}:{node.lineno}: {func}"
            if func.endswith(("np.load", "numpy.load")):
                assert kwargs.get("allow_pickle", "False") == "False", f"{path}:{node.lineno}"


def test_a_tampered_registered_checkpoint_is_refused_by_the_serving_path(tmp_path):
    """Through the registry row's sha256, as predict and retrain load a champion."""
    import torch

    from forecaster.checkpoints import Checkpoint, load_checkpoint, local_path, save_checkpoint
    from forecaster.errors import CheckpointError

    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.upgrade()
    uri, sha = save_checkpoint(
        Checkpoint("gru", {"hidden": 2}, {"w": torch.ones(2, 2)}, {"a": (0.0, 1.0)}), tmp_path
    )
    with store.begin() as conn:
        vid = store.register_model_version(
            conn,
            kind="gru",
            config={},
            uri=uri,
            sha256=sha,
            metrics={},
            trained_from=None,
            trained_to=None,
        )
    version = store.model_version(vid)
    assert version["sha256"] == sha and load_checkpoint(version["uri"], version["sha256"])
    path = local_path(uri)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    assert hashlib.sha256(bytes(data)).hexdigest() != sha
    with pytest.raises(CheckpointError, match="altered or replaced"):
        load_checkpoint(version["uri"], version["sha256"])
    store.close()


# -- SQL is parameterised --------------------------------------------------------------------


# Text that reads as SQL (statements, not a word in a message: "alias it in the SELECT").
_SQL = re.compile(
    r"\bSELECT\b.*\bFROM\b|\bINSERT\s+INTO\b|\bUPDATE\s+\S+\s+SET\b|\bDELETE\s+FROM\b|"
    r"\b(CREATE|DROP|ALTER|TRUNCATE)\s+(TEMP\s+)?(TABLE|INDEX|VIEW|DATABASE|SCHEMA)\b|"
    r"\bCOPY\b.*\bFROM\b|\bPRAGMA\s+\w|\bWHERE\b.*(=|<|>|\bIN\b|\bLIKE\b)|\bON\s+CONFLICT\b",
    re.DOTALL,
)
# SQL calls whose first argument is SQL text.
_RAW_SQL_CALLS = {"execute", "executemany", "exec_driver_sql", "text", "copy"}


def _literal_text(node: ast.AST) -> str:
    """The literal pieces of a string-building expression."""
    parts = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant)]
    return " ".join(p for p in parts if isinstance(p, str))


def _builds_text(node: ast.AST) -> bool:
    """An f-string, a % format, a .format() call, or + / join over a non-literal."""
    for n in ast.walk(node):
        if isinstance(n, ast.JoinedStr) and any(
            isinstance(v, ast.FormattedValue) for v in n.values
        ):
            return True
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mod | ast.Add):
            if not all(isinstance(x, ast.Constant) for x in (n.left, n.right)):
                if _literal_text(n):
                    return True
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
            if n.func.attr in ("format", "join") and _literal_text(n.func.value):
                return True
    return False


def _sql_users() -> list[Path]:
    files = _python_files("forecaster", "pipelines", "migrations")
    return [p for p in files if re.search(r"sqlalchemy|psycopg|sqlite3", p.read_text())]


@pytest.mark.parametrize("path", _sql_users(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_sql_text_is_built_from_values(path):
    """SQL text is literal: values are bound (SQLAlchemy constructs, :name / %(name)s
    parameters), never formatted in. Nothing is allow-listed today: table and column names
    come from forecaster.schema objects, which SQLAlchemy quotes itself."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        # 1. no string that reads as SQL is put together from pieces
        if isinstance(node, ast.JoinedStr | ast.BinOp | ast.Call) and _builds_text(node):
            text = _literal_text(node)
            if isinstance(node, ast.Call) and not (
                isinstance(node.func, ast.Attribute) and node.func.attr in ("format", "join")
            ):
                continue  # a call merely containing a built string is judged at that string
            assert not _SQL.search(text), f"{path}:{node.lineno}: SQL built from values: {text!r}"
        # 2. what a raw-SQL call receives is a literal, or a name bound to one
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            if name in _RAW_SQL_CALLS and node.args:
                arg = node.args[0]
                assert not _builds_text(arg), f"{path}:{node.lineno}: {ast.unparse(arg)}"


def test_the_sql_check_catches_what_it_is_for():
    """The checker itself, on code that does what the store must never do."""
    bad = [
        "conn.exec_driver_sql(f\"SELECT * FROM series WHERE name = '{name}'\")",
        'conn.execute(sa.text("DELETE FROM series WHERE id = %s" % sid))',
        'cur.execute("INSERT INTO t VALUES ({})".format(v))',
        'q = "SELECT * FROM t WHERE a = " + value',
    ]
    good = [
        'conn.exec_driver_sql("TRUNCATE _obs_in")',
        'conn.execute(sa.text("SELECT 1 WHERE :a = :a"), {"a": a})',
        "conn.execute(sa.select(t).where(t.c.name == name))",
        'log.info(f"selected {n} rows")',
    ]
    for src in bad:
        tree = ast.parse(src)
        assert any(_builds_text(n) and _SQL.search(_literal_text(n)) for n in ast.walk(tree)), src
    for src in good:
        tree = ast.parse(src)
        assert not any(_builds_text(n) and _SQL.search(_literal_text(n)) for n in ast.walk(tree)), (
            src
        )


def test_hostile_names_are_bound_not_run(tmp_path):
    """`'; DROP TABLE observations; --` as a series name through the real ingest: stored
    verbatim, and every table is still there."""
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.upgrade()
    names = ["'; DROP TABLE observations; --", 'x"); DROP TABLE series; --', "a' OR '1'='1"]
    ts = [(datetime(2024, 3, 1, tzinfo=UTC) + timedelta(hours=i)).isoformat() for i in range(3)]
    ingest_batch(store, "t", Batch(raw_frame(names, ts, "1", "t"), {"n": 1}), SeriesDefaults(), NOW)
    counts = store.table_counts()
    assert counts["series"] == 3 and counts["observations"] == 3
    assert sorted(store.read_observations()["series"].unique()) == sorted(names)
    assert store.read_observations("a' OR '1'='1").height == 1
    store.close()
