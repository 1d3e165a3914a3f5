"""Helpers for the deploy/ tests: paths, and the external binaries they run (promtool,
prometheus, systemd-analyze), skipped with the reason when absent, except under CI=true."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_binary, serving_demo

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"


binary = require_binary  # the deploy tests' name for it


def run(args: list[str], *, cwd: Path = ROOT, timeout: float = 60) -> str:
    """Run a binary; fail with its output unless it exits 0. Returns stdout + stderr."""
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{out}"
    return out


# Grafana variables in the dashboard's queries, and what a test puts in their place.
INTERVALS = ("$__rate_interval", "$__interval", "$__range")


def dashboard_queries(series: str) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and annotation of the dashboard, with $series
    replaced by `series` (and Grafana's interval variables by 5m)."""
    board = json.loads((GRAFANA / "dashboards" / "forecaster.json").read_text())
    found = [
        (f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"])
        for p in board["panels"]
        for t in p.get("targets", [])
    ]
    found += [(f"annotation {a['name']!r}", a["expr"]) for a in board["annotations"]["list"]]
    out = []
    for where, expr in found:
        for var in INTERVALS:
            expr = expr.replace(var, "5m")
        expr = expr.replace("${series}", series).replace("$series", series)
        assert "$" not in expr, f"{where}: an unreplaced variable in {expr}"
        out.append((where, expr))
    return out


# -- the demo daemon the end-to-end and browser tests read ----------------------------------

DEMO_SERIES = ["flights.EWR", "flights.JFK", "flights.LGA"]
DISRUPTED = "flights.LGA"


def demo_config(tmp: Path) -> Path:
    """Three series up to 2013-02-20: the first model is trained on 2013-02-06 and serves for
    two weeks, so there are forecasts, scores and anomalies to show; the last twelve hours of
    flights.LGA disrupted (ten times its values). No accuracy-triggered retrain: one that
    finished at the end of the replay would leave a champion with nothing scored yet (no
    MASE, no coverage), depending on timing."""
    path = tmp / "forecaster.toml"
    path.write_text(
        f"""database_url = "sqlite:///{tmp / "store.db"}"
checkpoint_dir = "{tmp / "checkpoints"}"
[sources.nycflights]
kind = "replay"
interval = "1d"
series_filter = {json.dumps(DEMO_SERIES)}
end = 2013-02-20T00:00:00Z
[[sources.nycflights.disruptions]]
series = ["{DISRUPTED}"]
start = 2013-02-19T12:00:00Z
end = 2013-02-20T00:00:00Z
scale = 10.0
[training]
hidden = 8
[retrain]
epochs = 2
degrade_ratio = 100.0
[http]
port = 0
"""
    )
    return path


@pytest.fixture(scope="package")
def demo_lines(tmp_path_factory) -> Iterator[list[str]]:
    """`forecaster run --demo` on demo_config, serving after its replay: the lines it printed
    (its URLs among them). One daemon for the package: test_end_to_end's Prometheus scrapes
    it and test_overview_browser's browser reads its page; stopped after the last of them."""
    tmp = tmp_path_factory.mktemp("demo")
    with serving_demo(["--config", str(demo_config(tmp))], tmp, timeout=180) as (_, lines):
        yield lines
