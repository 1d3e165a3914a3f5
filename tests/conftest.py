"""Shared fixtures: real SQLite files and a real PostgreSQL database per test session.

PostgreSQL: FORECASTER_TEST_PG (default postgresql+psycopg://postgres@127.0.0.1:5432/postgres)
names an admin connection; a fresh database is created per session and dropped after. Without
a reachable server the tests skip with the reason, except under CI=true, where they fail.

The suite runs in parallel processes (pytest-xdist, `-n auto` in pyproject.toml), each with
its own session database. The one test that stops the whole PostgreSQL server takes the
server for itself (`server_to_myself`): every test holds a shared lock on a file while it
runs (set-up and tear-down included), that test an exclusive one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get(
    "FORECASTER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() == "true"
FORECASTER = str(Path(sys.executable).with_name("forecaster"))

# One lock file per user, shared by every pytest process on the machine (xdist workers, and
# a second suite run beside the first).
_SERVER_LOCK = Path(tempfile.gettempdir()) / f"forecaster-tests-{os.getuid()}.lock"
_server_lock_fd: int | None = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Each test (set-up, call, tear-down) under a shared lock: none runs while a test that
    stops the PostgreSQL server holds it exclusively (server_to_myself)."""
    global _server_lock_fd
    _server_lock_fd = os.open(_SERVER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(_server_lock_fd, fcntl.LOCK_SH)
        yield
    finally:
        # LOCK_UN releases it even where a forked child still holds a copy of the fd.
        fcntl.flock(_server_lock_fd, fcntl.LOCK_UN)
        os.close(_server_lock_fd)
        _server_lock_fd = None


@contextmanager
def server_to_myself() -> Iterator[None]:
    """The calling test alone on the machine's services while the block runs: its shared
    lock becomes an exclusive one once every other test that holds it has finished, and no
    other test starts meanwhile."""
    assert _server_lock_fd is not None, "only inside a test"
    fcntl.flock(_server_lock_fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(_server_lock_fd, fcntl.LOCK_SH)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 20 s; nothing when it has exited already."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def serving_demo(
    args: list[str], cwd: Path, *, timeout: float = 240
) -> Iterator[tuple[subprocess.Popen, list[str]]]:
    """`forecaster ARGS run --demo` as a subprocess, once its replay is done and it says it
    is still serving: the process and the lines it printed so far (its URLs among them).
    Stopped (stop) at exit; its output is in cwd/demo.log."""
    log = cwd / "demo.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [FORECASTER, *args, "run", "--demo"],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while "still serving" not in (text := log.read_text()):
            if proc.poll() is not None:
                pytest.fail(f"the demo exited early:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the demo did not finish its replay in {timeout:.0f} s:\n{text[-3000:]}"
                )
            time.sleep(0.25)
        yield proc, text.splitlines()
    finally:
        stop(proc)


def served_url(lines: list[str], what: str) -> str:
    """The URL on the demo's line starting `what http://` ("serving" or "overview")."""
    line = next((x for x in lines if x.startswith(f"{what} http://")), None)
    assert line is not None, f"no '{what} http://' line in:\n" + "\n".join(lines)
    return line.split()[1]


def require_binary(name: str, package: str = "prometheus") -> str:
    """The path of an external binary a test runs (promtool, prometheus, systemd-analyze).
    Without it the test skips with the reason, except under CI=true, where it fails."""
    found = shutil.which(name)
    if found is None:
        reason = f"{name} is not installed (apt-get install {package})"
        if IN_CI:
            pytest.fail(f"CI=true requires {name}: {reason}")
        pytest.skip(reason)
    return found


def _pg_unavailable_reason() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install -e '.[test]')"
    dsn = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("select 1")
    except Exception as exc:  # any failure to reach it is a reason to skip
        return f"no PostgreSQL reachable at {PG_ADMIN_URL}: {exc}"
    return None


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database for this test session."""
    reason = _pg_unavailable_reason()
    if reason:
        if IN_CI:
            pytest.fail(f"CI=true requires PostgreSQL: {reason}")
        pytest.skip(reason)
    import psycopg

    admin = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"forecaster_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A PostgreSQL database emptied of all tables before each test."""
    import psycopg

    dsn = pg_server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        # A connection a previous test left open would block the DROP: end them first.
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    yield pg_server_url


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request) -> str:
    """The same test on a real SQLite file and on a real PostgreSQL database."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")
