"""Stopping an ingest part-way: after the batch being stored commits, with its cursor, so the
next run resumes right after it and every row ends up stored exactly once."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from forecaster.clock import FixedClock
from forecaster.config import FileSource, SeriesDefaults, load_settings
from forecaster.store import Store
from pipelines.ingest import run_ingest
from pipelines.jobs import Job, JobContext, run_job
from pipelines.sources import build_source
from tests.conftest import FORECASTER

T0 = datetime(2024, 1, 1, tzinfo=UTC)
NOW = datetime(2030, 1, 1, tzinfo=UTC)
SERIES = 20


def _big_csv(path: Path, hours: int) -> tuple[int, int]:
    """SERIES series of hourly points, time-ordered; returns (rows, sum of the values)."""
    total = 0
    with path.open("w") as f:
        f.write("series,ts,value\n")
        for h in range(hours):
            ts = (T0 + timedelta(hours=h)).strftime("%Y-%m-%dT%H:%M:%SZ")
            for s in range(SERIES):
                value = (h * 7 + s) % 101
                total += value
                f.write(f"m{s},{ts},{value}\n")
    return hours * SERIES, total


def _stored(db: Path) -> tuple[int, int, int, int]:
    """(observations, distinct (series, ts), sum of values, quarantined rows)."""
    with sqlite3.connect(db, timeout=30) as c:
        n, keys, total = c.execute(
            "SELECT count(*), count(DISTINCT series_id || ' ' || ts), sum(value) FROM observations"
        ).fetchone()
        quarantined = c.execute("SELECT count(*) FROM quarantine").fetchone()[0]
    return n, keys, int(total or 0), quarantined


def _rows_read(line: str) -> int:
    """The `N rows read` of an ingest summary line."""
    return int(line.split(": ", 1)[1].split(" rows read", 1)[0])


def test_sigterm_ends_a_one_shot_ingest_after_the_batch_it_is_storing(tmp_path):
    """`forecaster ingest --once` on a big valid file exits within seconds of a SIGTERM
    (it used to read the whole file first); the next run reads the rest, and the store
    ends with every row once."""
    rows, value_sum = _big_csv(tmp_path / "big.csv", hours=5000)
    db = tmp_path / "s.db"
    cfg = tmp_path / "forecaster.toml"
    cfg.write_text(
        f'database_url = "sqlite:///{db}"\n'
        f'[sources.s]\nkind = "file"\npath = "{tmp_path / "big.csv"}"\nbatch_rows = 1000\n'
    )
    cmd = [FORECASTER, "-c", str(cfg), "ingest", "--source", "s", "--once"]
    subprocess.run([FORECASTER, "-c", str(cfg), "db", "upgrade"], check=True, timeout=60)

    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and first.poll() is None:
            with sqlite3.connect(db, timeout=30) as c:
                if c.execute("SELECT count(*) FROM source_cursors").fetchone()[0]:
                    break  # the first batch has committed
            time.sleep(0.02)
        assert first.poll() is None, "the ingest ended before it could be stopped"
        first.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        out, errors = first.communicate(timeout=60)
        waited = time.monotonic() - signalled
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, errors
    assert waited < 5, f"took {waited:.1f} s to stop after SIGTERM"
    read_first = _rows_read(out.strip().splitlines()[-1])
    assert 0 < read_first < rows // 2, out  # stopped early, not at the end of the file
    assert "SIGTERM: stopped after" in errors
    assert "resumes after them" in errors
    assert _stored(db)[0] == read_first  # what it read is stored, not a row more

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    line = second.stdout.strip().splitlines()[-1]
    assert _rows_read(line) == rows - read_first, line  # resumed right after the first run
    assert " 0 already stored" in line, line  # nothing was read twice
    assert "SIGTERM" not in second.stderr
    assert _stored(db) == (rows, rows, value_sum, 0)


@pytest.fixture
def store(sqlite_url):
    st = Store(sqlite_url)
    st.upgrade()
    yield st
    st.close()


def test_run_ingest_stops_after_the_batch_should_stop_sees_and_the_next_pass_resumes(
    store, tmp_path
):
    rows, value_sum = _big_csv(tmp_path / "in.csv", hours=100)  # 2000 rows
    source = build_source("f", FileSource(path=str(tmp_path / "in.csv"), batch_rows=300))
    defaults = SeriesDefaults()
    asked: list[int] = []

    def after_two_batches() -> bool:
        asked.append(1)
        return len(asked) == 2

    first = run_ingest(store, source, defaults, now=NOW, should_stop=after_two_batches)
    assert (first.batches, first.rows_read, first.stopped) == (2, 600, True)
    assert store.get_cursor("f") is not None
    rest = run_ingest(store, source, defaults, now=NOW, should_stop=lambda: False)
    assert (rest.rows_read, rest.unchanged, rest.stopped) == (rows - 600, 0, False)
    frame = store.read_observations()
    assert frame.height == rows and frame["value"].sum() == value_sum


def test_an_ingest_job_of_a_stopping_worker_ends_after_one_batch(sqlite_url, tmp_path):
    """The daemon's ingest job asks the worker's `stopping` event: a shutdown does not wait
    for the rest of a big file, and the job's next run reads it."""
    rows, _ = _big_csv(tmp_path / "in.csv", hours=100)
    store = Store(sqlite_url)
    store.upgrade()
    settings = load_settings(
        None,
        database_url=sqlite_url,
        sources={"f": {"kind": "file", "path": str(tmp_path / "in.csv"), "batch_rows": 300}},
    )
    ctx = JobContext(settings=settings, store=store, clock=FixedClock(NOW))
    try:
        ctx.stopping.set()
        stopped = run_job(Job(kind="ingest", source="f", scheduled_at=NOW), ctx)
        assert stopped.status == "succeeded"
        assert stopped.detail["rows_read"] == 300 and stopped.detail["stopped"]
        ctx.stopping.clear()
        later = NOW + timedelta(minutes=5)
        rest = run_job(Job(kind="ingest", source="f", scheduled_at=later), ctx)
        assert rest.detail["rows_read"] == rows - 300 and not rest.detail["stopped"]
        assert store.read_observations().height == rows
    finally:
        store.close()


def test_a_daemon_shutting_down_tells_its_jobs_to_stop_first(sqlite_url, tmp_path):
    """Daemon.shutdown sets the jobs' `stopping` before the scheduler waits for them."""
    from pipelines.daemon import Daemon

    settings = load_settings(None, database_url=sqlite_url)
    store = Store(sqlite_url)
    store.upgrade()
    daemon = Daemon(settings, store, FixedClock(NOW), serve_http=False)
    ctx = daemon.backend._ctx
    assert not ctx.stopping.is_set()
    daemon.shutdown()
    assert ctx.stopping.is_set()
    store.close()
