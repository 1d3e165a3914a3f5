"""Kill the daemon with SIGKILL at chosen moments of a backtest, restart it each time, and
compare the store with an uninterrupted run's, table by table and row by row. Then run the
finished backtest again and send the replay's rows again: neither may change a row or move a
counter of /metrics.

Shared by tests/pipelines/test_daemon.py (a few kills) and bench/chaos.py (50 and more).
The backtest is the daemon on a simulated clock over a replay, holding the clock while a
retrain runs, so two uninterrupted runs write the same rows: any difference after kills
is a lost, duplicated or changed row.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from forecaster import schema
from forecaster.clock import WallClock
from forecaster.config import MetricsSettings
from forecaster.metrics import SqlCollector
from forecaster.store import Store

FORECASTER = str(Path(sys.executable).with_name("forecaster"))
SERIES = '["flights.JFK", "flights.LGA", "flights.EWR"]'
PHASES = ("ingest", "predict", "evaluate", "retrain")
# Every table that holds data, forecasts or state.
TABLES = (
    "observations",
    "windows",
    "watermarks",
    "forecasts",
    "series_states",
    "state_snapshots",
    "calibration",
    "anomalies",
    "series_accuracy",
    "model_versions",
    "job_runs",
    "quarantine",
    "source_cursors",
)
# Wall-clock columns, and what only says where a file or an error went.
VOLATILE = {"created_at", "updated_at", "started_at", "finished_at", "uri", "detail"}


def write_config(
    tmp: Path,
    *,
    end: str = "2013-02-24T00:00:00Z",
    extra: str = "",
    url: str | None = None,
    training: str = "",
) -> Path:
    """Three series; daily jobs, a retrain every two weeks, no accuracy-triggered retrain
    (its timing would depend on where a kill lands). training: more lines of [training]."""
    path = tmp / "forecaster.toml"
    path.write_text(
        f"""database_url = "{url or f"sqlite:///{tmp / 'store.db'}"}"
checkpoint_dir = "{tmp / "checkpoints"}"
[sources.nycflights]
kind = "replay"
interval = "1d"
series_filter = {SERIES}
end = {end}
[training]
hidden = 8
{training}
[retrain]
epochs = 2
degrade_ratio = 100.0
[http]
port = 0
[schedule]
predict_interval = "1d"
evaluate_interval = "1d"
retrain_interval = "14d"
{extra}"""
    )
    return path


def backtest_cmd(cfg: Path, *, to: str = "2013-02-24") -> list[str]:
    return [FORECASTER, "--config", str(cfg), "backtest", "--source", "nycflights"] + [
        "--from",
        "2013-01-01",
        "--to",
        to,
    ]


def upgrade(tmp: Path, url: str | None = None) -> None:
    store = Store(url or f"sqlite:///{tmp / 'store.db'}")
    store.upgrade()
    store.close()


def snapshot(db: Path | str) -> dict[str, list[tuple]]:
    """Every table in TABLES, without its VOLATILE columns, in primary-key order; `db` a
    SQLite file or a database URL."""
    store = Store(db if isinstance(db, str) else f"sqlite:///{db}")
    out = {}
    with store.engine.connect() as conn:
        for name in TABLES:
            table = schema.metadata.tables.get(name)
            if table is None:  # the forecasts view (the ledger unnested): its rows, by key
                table = schema.views.tables[name]
                key = ("series_id", "model", "origin_ts", "horizon_step", "revision")
                order = [table.c[k] for k in key]
            else:
                order = list(table.primary_key.columns)
            cols = [c for c in table.columns if c.name not in VOLATILE]
            rows = conn.execute(sa.select(*cols).order_by(*order)).all()
            out[name] = [tuple(r) for r in rows]
    store.close()
    return out


def counters(db: Path | str) -> dict[tuple[str, tuple], float]:
    """The counters /metrics serves from the store (rows ingested and quarantined per source,
    anomalies per series), by sample name and labels."""
    store = Store(db if isinstance(db, str) else f"sqlite:///{db}")
    try:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in SqlCollector(store, MetricsSettings(), WallClock()).collect()
            if fam.type == "counter"
            for s in fam.samples
        }
    finally:
        store.close()


def resend_cmd(cfg: Path, db: Path | str, source: str = "nycflights") -> list[str]:
    """Rewind the replay's stored cursor to its start, so that `forecaster ingest` (the
    command returned) sends every row it sent before once more, as a source that delivers
    at least once may."""
    store = Store(db if isinstance(db, str) else f"sqlite:///{db}")
    try:
        cursor = store.get_cursor(source)
        assert cursor is not None, f"{source} never ingested: nothing to send again"
        with store.begin() as conn:
            store.save_cursor(conn, source, {**cursor, "emitted_until": None}, rows_added=0)
    finally:
        store.close()
    return [FORECASTER, "--config", str(cfg), "ingest", "--source", source]


def compare(got: dict[str, list[tuple]], want: dict[str, list[tuple]], what: str) -> list[str]:
    """One line per table of `want` whose rows differ in `got`."""
    out = []
    for table, rows in want.items():
        if got[table] != rows:
            extra = [r for r in got[table] if r not in rows]
            missing = [r for r in rows if r not in got[table]]
            out.append(
                f"{what}: {table}: {len(missing)} rows missing, {len(extra)} unexpected; "
                f"missing {missing[:3]}, unexpected {extra[:3]}"
            )
    return out


def run_again(tmp: Path, cfg: Path, report: ChaosReport) -> None:
    """After a backtest finished: the same backtest again, then the replay's rows sent again;
    after each the store equals what it was, row for row, and no counter moved."""
    db = tmp / "store.db"
    want, counted = snapshot(db), counters(db)
    for what, cmd in (
        ("the backtest run again", lambda: backtest_cmd(cfg)),
        ("the replay's rows sent again", lambda: resend_cmd(cfg, db)),
    ):
        done = subprocess.run(cmd(), cwd=tmp, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            report.differences.append(f"{what} exited {done.returncode}: {done.stdout[-2000:]}")
            return
        report.differences += compare(snapshot(db), want, what)
        if counters(db) != counted:
            report.differences.append(f"{what}: counters moved, {counted} -> {counters(db)}")
        report.reruns += 1


def running_jobs(db: Path) -> list[str]:
    """job_ids of the runs marked running, read without taking a write lock."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5) as conn:
            return [
                j for (j,) in conn.execute("SELECT job_id FROM job_runs WHERE status = 'running'")
            ]
    except sqlite3.Error:
        return []


def phase_of(job_id: str) -> str:
    return job_id.split(":", 1)[0]


@dataclass
class ChaosReport:
    kills: Counter[str] = field(default_factory=Counter)  # phase running when killed
    runs: int = 0  # backtest processes started, restarts included
    rounds: int = 0  # fresh stores brought to the end
    rows_compared: int = 0
    differences: list[str] = field(default_factory=list)
    seconds: float = 0.0
    reruns: int = 0  # finished stores run again or sent their data again, and compared


def wait_for_phase(db: Path, proc: subprocess.Popen, phase: str, timeout: float) -> str | None:
    """Poll until a job of `phase` runs; its job_id, or None when the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for job in running_jobs(db):
            if phase_of(job) == phase:
                return job
        time.sleep(0.002)
    return None


def chaos_round(
    tmp: Path,
    reference: dict[str, list[tuple]],
    *,
    kills: int,
    rng: random.Random,
    report: ChaosReport,
    log: Callable[[str], None] = lambda _: None,
    first_phase: str | None = None,
    extra: str = "",
    again: bool = True,
) -> None:
    """One fresh store: up to `kills` SIGKILLs, each while a job of a phase (taken in turn
    from PHASES, starting at first_phase or a random one) runs, after a random 0-80 ms more; then a run to
    the end and the comparison with `reference`. A round ends early when the phase waited
    for does not come up before the backtest's end (the retrains are few). again: then
    run_again (the finished backtest run again and its data sent again change nothing)."""
    cfg = write_config(tmp, extra=extra)
    upgrade(tmp)
    db = tmp / "store.db"
    start = PHASES.index(first_phase) if first_phase else rng.randrange(len(PHASES))
    done = 0
    while done < kills:
        phase = PHASES[(start + done) % len(PHASES)]
        proc = subprocess.Popen(
            backtest_cmd(cfg), cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        report.runs += 1
        job = wait_for_phase(db, proc, phase, timeout=300)
        if job is None:  # the run ended before that phase came up again: the round is over
            if proc.wait(timeout=300) != 0:
                report.differences.append(f"a backtest exited {proc.returncode}")
                return
            break
        time.sleep(rng.uniform(0, 0.08))
        proc.kill()
        proc.wait(timeout=60)
        done += 1
        report.kills[phase] += 1
        log(f"kill {sum(report.kills.values()):3d}: during {job}")
    final = subprocess.run(backtest_cmd(cfg), cwd=tmp, capture_output=True, text=True, timeout=600)
    report.runs += 1
    if final.returncode != 0:
        report.differences.append(f"the last run exited {final.returncode}: {final.stdout[-2000:]}")
        return
    report.rows_compared += sum(len(rows) for rows in reference.values())
    report.differences += compare(snapshot(db), reference, f"round {report.rounds}")
    if again and not report.differences:
        run_again(tmp, cfg, report)
    report.rounds += 1


def reference_run(tmp: Path, extra: str = "") -> dict[str, list[tuple]]:
    cfg = write_config(tmp, extra=extra)
    upgrade(tmp)
    done = subprocess.run(backtest_cmd(cfg), cwd=tmp, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the uninterrupted backtest failed:\n{done.stdout[-3000:]}")
    return snapshot(tmp / "store.db")
