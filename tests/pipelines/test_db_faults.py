"""Database faults. PostgreSQL: the test's own database goes away in the middle of a run
(its connections terminated, new ones refused), or the whole server is stopped and started
again (pg_ctlcluster; CI only, or with FORECASTER_TEST_PG_RESTART=1, since it disturbs
every other user of the server), and comes back: the daemon waits it out with backoff and
the store ends as an uninterrupted run's; /readyz says not ready meanwhile.
SQLite: a database locked by another writer, and a full disk (a file-size limit), give a
clear error and no partial write."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    IN_CI,
    PG_ADMIN_URL,
    _pg_unavailable_reason,
    served_url,
    server_to_myself,
    serving_demo,
)
from tests.pipelines import chaos

pytestmark = pytest.mark.slow


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@contextmanager
def _databases() -> Iterator[Callable[[], str]]:
    """Make fresh PostgreSQL databases of the caller's own; all dropped at the end."""
    reason = _pg_unavailable_reason()
    if reason:
        if IN_CI:
            pytest.fail(f"CI=true requires PostgreSQL: {reason}")
        pytest.skip(reason)
    import psycopg

    made: list[str] = []
    base = PG_ADMIN_URL.rpartition("/")[0]

    def make() -> str:
        name = f"forecaster_fault_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(_libpq(PG_ADMIN_URL), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"{base}/{name}"

    try:
        yield make
    finally:
        with psycopg.connect(_libpq(PG_ADMIN_URL), autocommit=True) as conn:
            for name in made:
                conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_databases() -> Iterator[Callable[[], str]]:
    """Make fresh PostgreSQL databases of the test's own; all dropped at the end."""
    with _databases() as make:
        yield make


# No statistical challenger in these backtests: what they check is the store after a
# database fault (tests/pipelines/test_daemon.py kills backtests that fit it).
TRAINING = 'challenger = "none"'


@pytest.fixture(scope="module")
def pg_reference(tmp_path_factory) -> dict[str, list[tuple]]:
    """An uninterrupted backtest on PostgreSQL (run once for the module's faults): the
    store each faulted run must end as."""
    tmp = tmp_path_factory.mktemp("reference")
    with _databases() as make:
        url = make()
        chaos.upgrade(tmp, url)
        cfg = chaos.write_config(tmp, url=url, training=TRAINING)
        done = subprocess.run(chaos.backtest_cmd(cfg), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:]
        return chaos.snapshot(url)


@contextmanager
def _outage(url: str) -> Iterator[None]:
    """The database away: every connection to it terminated, new ones refused, until the
    block exits. (A server restart would do the same to every database of the server.)"""
    import psycopg

    name = url.rpartition("/")[2]
    with psycopg.connect(_libpq(PG_ADMIN_URL), autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (name,),
        )
        try:
            yield
        finally:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


RESTART_OPT_IN = "FORECASTER_TEST_PG_RESTART"


@contextmanager
def _server_down(url: str) -> Iterator[None]:
    """The whole PostgreSQL server stopped (pg_ctlcluster, fast shutdown: every connection
    dropped) until the block exits, then started again and waited for."""
    del url  # every database of the server goes down
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    ctl = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]
    subprocess.run([*ctl, "stop", "--mode", "fast"], check=True, timeout=120)
    try:
        yield
    finally:
        subprocess.run([*ctl, "start"], check=True, timeout=120)
        for _ in range(120):
            ready = subprocess.run(["pg_isready", "-h", "127.0.0.1", "-q"], timeout=10)
            if ready.returncode == 0:
                break
            time.sleep(0.5)


def _fault(kind: str) -> Callable[[str], AbstractContextManager[None]]:
    if kind == "database_away":
        return _outage
    if not (IN_CI or os.environ.get(RESTART_OPT_IN)):
        pytest.skip(f"restarts the whole PostgreSQL server: set {RESTART_OPT_IN}=1 (CI does)")
    usable = shutil.which("pg_ctlcluster") and os.path.isdir("/etc/postgresql")
    local = "@127.0.0.1" in PG_ADMIN_URL or "@localhost" in PG_ADMIN_URL
    if not (usable and local and os.geteuid() == 0):
        reason = "needs root, pg_ctlcluster and the PostgreSQL server on this machine"
        if IN_CI:
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)
    return _server_down


def _succeeded(url: str, job: str) -> int:
    import psycopg

    try:
        with psycopg.connect(_libpq(url), connect_timeout=2) as conn:
            row = conn.execute(
                "SELECT count(*) FROM job_runs WHERE job_id = %s AND status = 'succeeded'",
                (job,),
            ).fetchone()
            return int(row[0])
    except psycopg.Error:
        return 0


@pytest.mark.parametrize("kind", ["database_away", "server_restart"])
def test_postgresql_going_away_mid_run_loses_nothing(kind, pg_databases, tmp_path, request):
    fault = _fault(kind)
    reference = request.getfixturevalue("pg_reference")  # once the fault is known to run
    # A server restart cuts every test's connections: the other test processes wait.
    with server_to_myself() if kind == "server_restart" else nullcontext():
        _run_through(fault, pg_databases(), tmp_path, reference)


def _run_through(
    fault: Callable[[str], AbstractContextManager[None]],
    url: str,
    tmp_path: Path,
    reference: dict[str, list[tuple]],
) -> None:
    """A backtest on `url` with `fault` for 4 s after its fifth predict: it retries through
    and ends with the store of the uninterrupted reference."""
    run_dir = tmp_path / "outage"
    run_dir.mkdir()
    chaos.upgrade(run_dir, url)
    cfg = chaos.write_config(run_dir, url=url, training=TRAINING)
    log = run_dir / "backtest.log"
    with log.open("w") as out:
        proc = subprocess.Popen(chaos.backtest_cmd(cfg), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while _succeeded(url, "predict") < 5:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no predict ran"
            time.sleep(0.05)
        with fault(url):
            time.sleep(4)  # several retries: 0.5 + 1 + 2 s
            assert proc.poll() is None, f"the daemon gave up:\n{log.read_text()[-3000:]}"
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "database unavailable, retrying" in text
    got = chaos.snapshot(url)
    for table, rows in reference.items():
        assert got[table] == rows, f"{table} differs after the outage"


def test_readyz_says_not_ready_while_postgresql_is_away(pg_databases, tmp_path):
    url = pg_databases()
    chaos.upgrade(tmp_path, url)
    cfg = chaos.write_config(tmp_path, url=url, end="2013-02-12T00:00:00Z", training=TRAINING)
    # The demo keeps its own SQLite file unless told the database on the command line.
    args = ["--config", str(cfg), "--database-url", url]
    with serving_demo(args, tmp_path) as (_, lines):
        base = served_url(lines, "serving").removesuffix("/metrics")

        def ready() -> tuple[int, dict]:
            r = httpx.get(f"{base}/readyz", timeout=10)
            return r.status_code, r.json()

        assert ready()[0] == 200
        with _outage(url):
            status, body = ready()
            assert status == 503 and body["checks"]["database"] is False, body
            assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200  # alive
        deadline = time.monotonic() + 30
        while ready()[0] != 200:
            assert time.monotonic() < deadline, "not ready again after the database came back"
            time.sleep(0.25)


def _ingest(cfg: Path, cwd: Path, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chaos.FORECASTER, "--config", str(cfg), "ingest", "--source", "nycflights", "--once"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def _count(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608


def test_a_locked_sqlite_database_gives_a_clear_error_and_writes_nothing(tmp_path):
    db = tmp_path / "store.db"
    # The URL's timeout: wait 2 s for the writer's lock, not the default 30 s.
    url = f"sqlite:///{db}?timeout=2"
    cfg = chaos.write_config(tmp_path, end="2013-01-10T00:00:00Z", url=url)
    chaos.upgrade(tmp_path)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another writer, holding the lock
    try:
        refused = _ingest(cfg, tmp_path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "database is locked" in refused.stderr and "Traceback" not in refused.stderr
    assert _count(db, "observations") == 0 and _count(db, "source_cursors") == 0
    again = _ingest(cfg, tmp_path)
    assert again.returncode == 0, again.stderr
    assert _count(db, "observations") > 0


def test_a_full_disk_gives_a_clear_error_and_no_partial_write(tmp_path):
    cfg = chaos.write_config(tmp_path, end="2013-03-01T00:00:00Z")
    chaos.upgrade(tmp_path)
    db = tmp_path / "store.db"
    size = db.stat().st_size

    def small_disk() -> None:  # the file may not grow past 64 KiB more than it is
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 65536, size + 65536))

    full = _ingest(cfg, tmp_path, preexec_fn=small_disk)
    assert full.returncode == 1, full.stdout + full.stderr
    assert "Traceback" not in full.stderr
    assert "full" in full.stderr or "disk" in full.stderr, full.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # Batches that committed before the disk filled are whole; the failed one left nothing:
    # every stored window is complete up to the cursor, and a retry finishes the rest.
    before = _count(db, "observations")
    again = _ingest(cfg, tmp_path)
    assert again.returncode == 0, again.stderr
    assert _count(db, "observations") > before
    reference = tmp_path / "reference"
    reference.mkdir()
    ref_cfg = chaos.write_config(reference, end="2013-03-01T00:00:00Z")
    chaos.upgrade(reference)
    assert _ingest(ref_cfg, reference).returncode == 0
    assert (
        chaos.snapshot(db)["observations"] == chaos.snapshot(reference / "store.db")["observations"]
    )
