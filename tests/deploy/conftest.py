"""Helpers for the deploy/ tests: paths, and the external binaries they run (promtool,
prometheus, systemd-analyze), skipped with the reason when absent, except under CI=true."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import require_binary

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
