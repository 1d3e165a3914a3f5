"""The real daemon as a subprocess: the demo on a small replay serves /metrics that promtool
accepts and a real Prometheus scrapes; SIGTERM stops it cleanly; SIGTERM or SIGKILL in the
middle of a predict job, then a restart, leaves the store an uninterrupted run leaves; so do
SIGKILLs during ingest, predict, evaluate and retrain in one run (bench/chaos.py: 50+)."""

from __future__ import annotations

import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_binary, served_url, serving_demo
from tests.pipelines import chaos
from tests.pipelines.sources.conftest import free_port

pytestmark = pytest.mark.slow
FORECASTER = str(Path(sys.executable).with_name("forecaster"))
SERIES = '["flights.JFK", "flights.LGA", "flights.EWR"]'


def _config(tmp: Path, *, end: str, extra: str = "") -> Path:
    path = tmp / "forecaster.toml"
    path.write_text(
        f"""database_url = "sqlite:///{tmp / "store.db"}"
checkpoint_dir = "{tmp / "checkpoints"}"
[sources.nycflights]
kind = "replay"
interval = "1d"
series_filter = {SERIES}
end = {end}
[training]
hidden = 8
[retrain]
epochs = 2
[http]
port = 0
{extra}"""
    )
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """`forecaster run --demo` on three series up to 2013-02-20, serving after the replay."""
    tmp = tmp_path_factory.mktemp("demo")
    cfg = _config(tmp, end="2013-02-20T00:00:00Z")
    with serving_demo(["--config", str(cfg)], tmp) as (proc, lines):
        yield proc, served_url(lines, "serving").removesuffix("/metrics"), tmp


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_metrics_over_http_hold_the_forecasts_and_pass_promtool(demo):
    _, url, tmp = demo
    assert httpx.get(f"{url}/healthz").text.strip() == "ok"
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    s = _samples(r.text)
    assert s[("forecaster_series", ())] == 3
    for series in ("flights.JFK", "flights.LGA", "flights.EWR"):
        steps = [
            s[("forecaster_forecast", (("horizon_step", str(h)), ("q", "0.5"), ("series", series)))]
            for h in (1, 6, 12, 24)
        ]
        assert all(math.isfinite(v) and v >= 0 for v in steps)
        lo = s[("forecaster_forecast_band_lower", (("series", series),))]
        mid = s[("forecaster_forecast_median", (("series", series),))]
        hi = s[("forecaster_forecast_band_upper", (("series", series),))]
        assert 0 <= lo <= mid <= hi
    jobs = {k[1][0][1]: v for k, v in s.items() if k[0] == "forecaster_job_duration_seconds_count"}
    assert jobs["predict"] > 10 and jobs["ingest:nycflights"] > 10 and jobs["evaluate"] > 10
    failures = [v for k, v in s.items() if k[0] == "forecaster_job_failures_total"]
    assert failures and all(v == 0 for v in failures)
    assert any(k[0] == "forecaster_model_info" and ("stage", "champion") in k[1] for k in s)
    promtool = require_binary("promtool")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=r.content, capture_output=True, timeout=30
    )
    assert check.returncode == 0, (check.stdout + check.stderr).decode()


def test_a_real_prometheus_scrapes_the_forecast_band(demo, tmp_path):
    _, url, _ = demo
    binary = require_binary("prometheus")
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: forecaster\n    static_configs:\n"
        f"      - targets: ['{url.removeprefix('http://')}']\n"
    )
    prom = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={prom}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("wb"),
    )
    query = 'forecaster_forecast_band_upper{series="flights.JFK"} - forecaster_forecast_band_lower{series="flights.JFK"}'
    try:
        deadline, result = time.monotonic() + 40, []
        while time.monotonic() < deadline and not result:
            try:
                r = httpx.get(f"http://{prom}/api/v1/query", params={"query": query}, timeout=2)
                result = r.json()["data"]["result"] if r.status_code == 200 else []
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        assert result, (tmp_path / "prometheus.log").read_text()[-2000:]
        width = float(result[0]["value"][1])
        assert width >= 0  # the band's width through PromQL, from the daemon's scrape
        both = httpx.get(
            f"http://{prom}/api/v1/query",
            params={"query": '{__name__=~"forecaster_forecast_band_.*", series="flights.JFK"}'},
        ).json()["data"]["result"]
        assert {m["metric"]["__name__"] for m in both} == {
            "forecaster_forecast_band_lower",
            "forecaster_forecast_band_upper",
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_sigterm_stops_the_daemon_cleanly(demo):
    proc, url, _ = demo
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=1)


# -- a signal in the middle of a predict job, then a restart ----------------------------------


def _config_backtest(tmp: Path) -> Path:
    return chaos.write_config(tmp)


_backtest_cmd = chaos.backtest_cmd
_upgrade = chaos.upgrade


def _wait_for_running_predict(db: Path, proc: subprocess.Popen, after: int) -> bool:
    """Poll the store until a predict job is running (after `after` predicts finished)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5) as conn:
                rows = conn.execute(
                    "SELECT status FROM job_runs WHERE job_id LIKE 'predict%'"
                ).fetchall()
        except sqlite3.Error:
            rows = []
        done = sum(1 for (st,) in rows if st == "succeeded")
        if done >= after and any(st == "running" for (st,) in rows):
            return True
        time.sleep(0.002)
    return False


_snapshot = chaos.snapshot


@pytest.fixture(scope="module")
def uninterrupted(chaos_backtest) -> dict[str, list[tuple]]:
    """The store of the uninterrupted backtest (_config_backtest's: tests/pipelines/conftest)."""
    tmp, _ = chaos_backtest
    return _snapshot(tmp / "store.db")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_signal_during_predict_then_a_restart_equals_an_uninterrupted_run(
    sig, uninterrupted, tmp_path
):
    cfg = _config_backtest(tmp_path)
    _upgrade(tmp_path)
    proc = subprocess.Popen(
        _backtest_cmd(cfg), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    caught = _wait_for_running_predict(tmp_path / "store.db", proc, after=5)
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    assert caught, "the backtest never ran a predict job the test could interrupt"
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    interrupted = _snapshot(tmp_path / "store.db")
    assert interrupted["forecasts"] != uninterrupted["forecasts"]  # it stopped part way
    again = subprocess.run(
        _backtest_cmd(cfg), cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stdout[-3000:]
    final = _snapshot(tmp_path / "store.db")
    for table, rows in uninterrupted.items():
        assert final[table] == rows, f"{table} differs after the {sig.name} and restart"
    assert os.path.exists(tmp_path / "store.db")


def test_sigkills_during_each_phase_then_restarts_equal_an_uninterrupted_run(
    uninterrupted, tmp_path
):
    """One kill while an ingest, a predict, an evaluate and a retrain runs, in that order,
    each followed by a restart: the store ends as the uninterrupted run's, row for row."""
    report = chaos.ChaosReport()
    chaos.chaos_round(
        tmp_path, uninterrupted, kills=4, rng=random.Random(0), report=report, first_phase="ingest"
    )
    assert report.differences == []
    assert dict(report.kills) == {phase: 1 for phase in chaos.PHASES}
    assert report.rows_compared == sum(len(rows) for rows in uninterrupted.values())


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc (Linux)")
def test_a_retrain_process_dies_with_a_killed_daemon(tmp_path):
    cfg = _config_backtest(tmp_path)
    _upgrade(tmp_path)
    proc = subprocess.Popen(
        _backtest_cmd(cfg), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline, workers = time.monotonic() + 120, []
    while time.monotonic() < deadline and proc.poll() is None and not workers:
        workers = [
            c
            for c in _children(proc.pid)
            if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
        ]
        time.sleep(0.05)
    assert workers, "the backtest never started a retrain process"
    running = False  # wait until the worker has claimed its job: it is training now
    while time.monotonic() < deadline and not running:
        try:
            with sqlite3.connect(f"file:{tmp_path / 'store.db'}?mode=ro", uri=True) as conn:
                running = (
                    conn.execute(
                        "SELECT count(*) FROM job_runs WHERE job_id = 'retrain' AND status = 'running'"
                    ).fetchone()[0]
                    > 0
                )
        except sqlite3.Error:
            pass
        time.sleep(0.01)
    assert running, "the retrain process never started its job"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 1.0  # an orphan would live on until its job ended
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "an orphaned retrain process kept running"
