"""Chaos: SIGKILL the daemon again and again during a backtest, restart it each time, and
compare the store with an uninterrupted run's, row by row.

    python bench/chaos.py [--kills 50] [--per-round 12] [--seed 0] [--backend inline|ray]

The backtest is `forecaster backtest` (the daemon on a simulated clock) over three bundled
series, 2013-01-01 to 2013-02-24: daily ingest, predict and evaluate, the first model after
five weeks of history, a retrain every two weeks (tests/pipelines/chaos.py). Each kill waits
until a job of the next phase (ingest, predict, evaluate, retrain in turn) is running, then
0-80 ms more, then SIGKILLs the daemon (a retrain's process dies with it); the backtest is
restarted at once. A round is one fresh store: up to --per-round kills, then a run to the
end, then every table that holds data, forecasts or state is compared with the
uninterrupted run's (without wall-clock columns). Then the finished backtest is run again
and the replay's rows are sent again (its cursor rewound, `forecaster ingest`): after each,
the store must equal what it was and the counters /metrics serves from it must not move.
Rounds repeat until --kills kills.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.pipelines.chaos import PHASES, ChaosReport, chaos_round, reference_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--per-round", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--backend",
        choices=["inline", "ray"],
        default="inline",
        help="compute backend of the daemon (ray: a local Ray started by each run)",
    )
    args = ap.parse_args()
    rng = random.Random(args.seed)
    extra = "" if args.backend == "inline" else '[compute]\nbackend = "ray"\nnum_cpus = 1\n'

    report = ChaosReport()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="forecaster-chaos-") as root:
        ref_dir = Path(root) / "reference"
        ref_dir.mkdir()
        reference = reference_run(ref_dir, extra)
        print(
            f"uninterrupted run: {sum(map(len, reference.values())):,} rows in "
            f"{len(reference)} tables, {time.monotonic() - t0:.0f} s",
            flush=True,
        )
        while sum(report.kills.values()) < args.kills:
            tmp = Path(root) / f"round{report.rounds}"
            tmp.mkdir()
            left = args.kills - sum(report.kills.values())
            chaos_round(
                tmp,
                reference,
                kills=min(args.per_round, left),
                rng=rng,
                report=report,
                log=lambda line: print(f"  round {report.rounds}: {line}", flush=True),
                extra=extra,
            )
            if report.differences:
                break
    report.seconds = time.monotonic() - t0
    print()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"seed {args.seed}, backend {args.backend}, {report.seconds:.0f} s")
    print("| phase running at the kill | kills |")
    print("|---|---|")
    for phase in PHASES:
        print(f"| {phase} | {report.kills[phase]} |")
    print(f"| total | {sum(report.kills.values())} |")
    print()
    print(f"backtest processes started: {report.runs}; rounds (fresh stores): {report.rounds}")
    print(f"rows compared against the uninterrupted run: {report.rows_compared:,}")
    print(f"finished stores run again and sent their data again: {report.reruns // 2}")
    if report.differences:
        print("DIFFERENCES:")
        for d in report.differences:
            print("  " + d)
        sys.exit(1)
    print(
        "every round's store equals the uninterrupted run's, row for row, and stays so when "
        "run again or sent the same data again"
    )


if __name__ == "__main__":
    main()
