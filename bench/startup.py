"""Start-up of the `forecaster` command: `--help` and the read-only commands, each the median
wall and CPU time of a fresh process (the installed console script, as a user runs it).

    python bench/startup.py [--runs 15] [--db PATH] [--compare DIR]

The store, unless --db names one (the demo's ./forecaster-demo.db, say): a temporary SQLite
file made by `db upgrade` and `ingest -s nycflights` (the bundled year of 23 hourly series,
201k points), with one registered model version, so `models list` has a row. Every command
runs in an empty temporary directory (no ./forecaster.toml) with no FORECASTER_ variable
set, i.e. configured by --db alone; `config show` builds the full settings by nature.

Each copy of the sources runs through PYTHONPATH (this checkout's: the directory above
bench/). --compare DIR also times another copy (e.g. `git archive HEAD~3 forecaster
pipelines migrations | tar -x -C DIR`) with the same interpreter and packages; its runs
alternate with this checkout's, so load on the machine hits both alike. Wall time varies
with the machine's load (compare columns of one run); CPU time (user + system) much less.
With PYTHONDONTWRITEBYTECODE set, the project's own modules are compiled on every start
(the header says so).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORECASTER = str(Path(sys.executable).with_name("forecaster"))
ROOT = Path(__file__).resolve().parent.parent

COMMANDS = [
    ["--help"],
    ["series", "list"],
    ["models", "list"],
    ["quarantine", "list"],
    ["forecasts", "show", "flights.JFK"],
    ["accuracy"],
    ["anomalies"],
    ["db", "current"],
    ["config", "show"],
]


def _environment(pythonpath: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FORECASTER_")}
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def _run(args: list[str], cwd: str, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one `forecaster ARGS`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([FORECASTER, *args], cwd=cwd, env=env, capture_output=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"forecaster {' '.join(args)} failed:\n{proc.stderr.decode()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def make_store(directory: Path) -> str:
    """A demo-like store: the bundled dataset ingested, one model version registered."""
    db = str(directory / "startup.db")
    env, cwd = _environment(None), str(directory)
    for args in (["db", "upgrade"], ["ingest", "-s", "nycflights"]):
        subprocess.run(
            [FORECASTER, "--db", db, *args], cwd=cwd, env=env, check=True, capture_output=True
        )
    from forecaster.store import Store

    store = Store(f"sqlite:///{db}", create=False)
    try:
        with store.begin() as conn:
            store.register_model_version(
                conn,
                kind="lstm",
                config={},
                uri="file:///nowhere.safetensors",
                sha256="0" * 64,
                trained_from=None,
                trained_to=None,
                metrics={"model": {"mase": 0.9}, "seasonal_naive_weekly": {"mase": 1.0}},
                stage="champion",
            )
    finally:
        store.close()
    return db


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=15, help="runs per command (median reported)")
    ap.add_argument("--db", help="an existing store (SQLite path or URL) instead of a new one")
    ap.add_argument("--compare", metavar="DIR", help="another copy of the sources to time too")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "cwd"
        work.mkdir()
        db = args.db or make_store(Path(tmp))
        variants = {"this checkout": _environment(str(ROOT))}
        if args.compare:
            variants[f"{args.compare}"] = _environment(str(Path(args.compare).resolve()))
        times: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for round_ in range(args.runs + 1):  # round 0 warms the file cache, not counted
            for command in COMMANDS:
                full = command if command == ["--help"] else ["--db", db, *command]
                # each copy goes first every other round: no order effect favours either
                for name in list(variants)[:: 1 if round_ % 2 else -1]:
                    measured = _run(full, str(work), variants[name])
                    if round_:
                        times.setdefault((" ".join(command), name), []).append(measured)

    compiled = "; PYTHONDONTWRITEBYTECODE set" if os.environ.get("PYTHONDONTWRITEBYTECODE") else ""
    print(f"# median of {args.runs} runs, seconds (wall / CPU); {_machine()}{compiled}")
    names = list(variants)
    cells = [f"{n} wall" for n in names] + [f"{n} CPU" for n in names]
    if len(names) == 2:
        cells += ["wall change", "CPU change"]
    print("| command | " + " | ".join(cells) + " |")
    print("|---|" + "---:|" * len(cells))
    for command in COMMANDS:
        key = " ".join(command)
        wall = [statistics.median(w for w, _ in times[key, n]) for n in names]
        cpu = [statistics.median(c for _, c in times[key, n]) for n in names]
        row = [f"{x:.3f}" for x in wall + cpu]
        if len(names) == 2:
            row += [f"{wall[0] / wall[1] - 1:+.0%}", f"{cpu[0] / cpu[1] - 1:+.0%}"]
        print(f"| `{key}` | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
