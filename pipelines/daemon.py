"""The daemon: schedules, the retraining policy, the HTTP app and the metrics, wired together.

One process per deployment. The scheduler only dispatches; jobs run on the compute backend
(serving jobs on threads, retraining in a separate process), record themselves in
`job_runs` and are driven by stored watermarks, so SIGTERM, SIGKILL or a double fire never
loses or duplicates anything. Live, the scheduler is APScheduler on the wall clock; in a
replay, the demo or a backtest, the same triggers step a simulated clock (`run_simulated`),
so the very same jobs and policy run, only faster.

The retraining policy (DESIGN.md decision 13): scheduled (cron or interval), and triggered
when the evaluate job finds the champion's MAE over `retrain.degrade_window` above the best
seasonal naive's times `retrain.degrade_ratio`, at most once per `retrain.cooldown`. With no
champion yet, the first model is trained as soon as `retrain.min_history` is stored.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog

from forecaster.clock import Clock, FixedClock
from forecaster.config import Settings
from forecaster.errors import SchemaOutOfDateError
from forecaster.metrics import ServiceMetrics
from forecaster.store import Store
from pipelines.dispatch import build_backend
from pipelines.jobs import Job, JobOutcome, Kind, run_job
from pipelines.scheduler import LiveScheduler, SimulatedScheduler, schedules

log = structlog.get_logger(__name__)

TRIGGERED = ("predict:window", "retrain:degraded", "retrain:start", "evaluate:end")


@dataclass
class RunRecord:
    """What the daemon saw of its jobs, for the closing summary and the tests."""

    outcomes: list[JobOutcome] = field(default_factory=list)
    missed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    replay_done: bool = False

    def by_job(self) -> dict[str, list[JobOutcome]]:
        out: dict[str, list[JobOutcome]] = defaultdict(list)
        for o in self.outcomes:
            out[o.job_id].append(o)
        return dict(out)


class Daemon:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        clock: Clock,
        *,
        simulated: bool = False,
        serve_http: bool = True,
        on_outcome: Callable[[JobOutcome], None] | None = None,
    ) -> None:
        import torch

        torch.set_num_threads(settings.schedule.torch_threads)
        self.settings = settings
        self.store = store
        self.clock = clock
        self.record = RunRecord()
        self._on_outcome = on_outcome
        self._lock = threading.Lock()
        self._retrains: list[Future[JobOutcome]] = []
        self._pending: list[tuple[Kind, str | None, datetime, str]] = []  # simulated follow-ups
        self._bootstrapping = False  # a simulated run trains its first model in the foreground
        self.scheduler: LiveScheduler | SimulatedScheduler | None = None
        self.backend = build_backend(
            settings, store, clock, workers=settings.schedule.workers, simulated=simulated
        )
        job_ids = sorted({s.job_id for s in schedules(settings)} | set(TRIGGERED))
        self.metrics = ServiceMetrics(store, settings.metrics, clock, job_ids=job_ids)
        self.http: Any = None
        if serve_http:
            from pipelines.http import HttpApp
            from pipelines.overview import Overview

            token = settings.http.token
            overview = Overview(store, clock, timings=lambda: job_table(self.record))
            self.http = HttpApp(
                host=settings.http.host,
                port=settings.http.port,
                token=token.get_secret_value() if token is not None else None,
                metrics=self.metrics,
                readiness=self.readiness,
                overview=overview.page,
            )

    # -- health ---------------------------------------------------------------------------

    def readiness(self) -> dict[str, bool]:
        checks = {"database": False, "migrations": False, "scheduler": False, "champion": False}
        try:
            self.store.check_schema()
            checks["database"] = checks["migrations"] = True
        except SchemaOutOfDateError:
            checks["database"] = True  # reachable, but not at the code's revision
        except Exception:  # noqa: BLE001 - readiness reports, it does not raise
            pass
        checks["scheduler"] = self.scheduler is not None and self.scheduler.running
        if checks["database"]:
            try:
                checks["champion"] = self.store.champion() is not None
            except Exception:  # noqa: BLE001
                checks["champion"] = False
        return checks

    # -- running jobs ---------------------------------------------------------------------

    def fire(self, kind: Kind, source: str | None, when: datetime, trigger: str) -> JobOutcome:
        """Run one job to its end on the backend (the live scheduler's threads call this)."""
        job = Job(kind=kind, source=source, scheduled_at=when, trigger=trigger)
        future = self.backend.submit(job)
        if kind == "retrain":
            with self._lock:
                self._retrains.append(future)
        try:
            outcome = future.result()
        except Exception as exc:  # a killed retrain process, a backend shut down
            outcome = JobOutcome(job.job_id, kind, when, "failed", summary=str(exc))
            log.error("job lost", job=job.job_id, error=str(exc))
        self._finished(outcome)
        self._after(outcome)
        return outcome

    def _finished(self, outcome: JobOutcome) -> None:
        if outcome.kind != "retrain":  # evidence that retraining does not stall serving
            outcome.detail["during_retrain"] = self._retrain_running()
        with self._lock:
            self.record.outcomes.append(outcome)
        if outcome.summary != "already run for this fire time":
            self.metrics.job_finished(
                outcome.job_id, outcome.seconds, outcome.status != "failed", time.time()
            )
        if outcome.detail.get("exhausted"):
            self.record.replay_done = True
        if self._on_outcome is not None:
            self._on_outcome(outcome)

    def _missed(self, job_id: str) -> None:
        with self._lock:
            self.record.missed[job_id] += 1
        self.metrics.job_missed(job_id)
        log.warning("job fire missed", job=job_id)

    def _after(self, outcome: JobOutcome) -> None:
        """Follow-ups: predict when a window completed; retrain when accuracy degraded or
        when there is still no model."""
        if outcome.kind == "ingest" and outcome.status in ("succeeded", "skipped"):
            # After a restart the ingest of the resumed fire is found done: its predict may
            # not be, so ask for it (its own claim makes a second run a no-op).
            again = outcome.summary == "already run for this fire time" or bool(
                outcome.detail.get("redo_of_work")
            )
            if outcome.windows_completed > 0 or again:
                self._soon("predict", None, outcome.scheduled_at, "window")
            if (
                self.settings.retrain.enabled
                and not self._bootstrapping
                and self._no_champion_and_idle()
            ):
                self._soon("retrain", None, outcome.scheduled_at, "start")
        if outcome.kind == "evaluate" and outcome.degraded and self._cooled_down():
            log.info("accuracy degraded: retraining", mase=outcome.mase)
            self._soon("retrain", None, outcome.scheduled_at, "degraded")

    def _no_champion_and_idle(self) -> bool:
        """No model yet, none training, and enough history stored to train one."""
        if self.store.champion() is not None or self._retrain_running():
            return False
        return self._history_stored() >= self.settings.retrain.min_history

    def _retrain_running(self) -> bool:
        with self._lock:
            self._retrains = [f for f in self._retrains if not f.done()]
            return bool(self._retrains)

    def _cooled_down(self) -> bool:
        if not self.settings.retrain.enabled or self._retrain_running():
            return False
        last = self.store.last_job_run("retrain")
        return last is None or self.clock.now() - last["scheduled_at"] >= (
            self.settings.retrain.cooldown
        )

    def _soon(self, kind: Kind, source: str | None, when: datetime, trigger: str) -> None:
        if isinstance(self.scheduler, LiveScheduler):
            self.scheduler.run_soon(kind, source, when, trigger)
        else:
            self._pending.append((kind, source, when, trigger))

    # -- live -----------------------------------------------------------------------------

    def run_live(
        self, stop: threading.Event, *, on_started: Callable[[Daemon], None] | None = None
    ) -> None:
        """Serve until `stop` is set (SIGTERM/SIGINT), then shut down cleanly: running
        serving jobs finish (or roll back whole), a running retrain is stopped."""
        abandoned = self.store.abandon_running(self.clock.now())
        if abandoned:
            log.info("runs left running by a stopped daemon marked abandoned", runs=abandoned)
        self.scheduler = LiveScheduler(
            self.settings,
            self.clock,
            on_fire=self.fire,
            on_missed=self._missed,
            threads=self.settings.schedule.workers + 1,  # one more waits on a retrain
        )
        if self.http is not None:
            # Live: /metrics serves a snapshot kept current in the background (simulated runs
            # read it at the scrape instead: their jobs follow each other too fast to chase).
            self.metrics.start_refresher()
            self.http.start()
        self.scheduler.start()
        if on_started is not None:
            on_started(self)
        if self.settings.retrain.enabled and self.store.champion() is None:
            self.scheduler.run_soon(
                "retrain", None, self.clock.now().replace(microsecond=0), "start"
            )
        try:
            stop.wait()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        log.info("stopping: letting running jobs finish")
        # An ingest stops after the batch it is committing instead of reading on: the
        # scheduler's shutdown below waits for it.
        self.backend.begin_stopping()
        if self._retrain_running():
            log.info("stopping the running retrain (the champion keeps serving)")
            self.backend.stop_retrain()
        if self.scheduler is not None and isinstance(self.scheduler, LiveScheduler):
            self.scheduler.shutdown(wait=True)
        self.backend.shutdown(wait=True)
        if self.http is not None:
            self.http.stop()
        self.metrics.stop_refresher()
        log.info("stopped")

    # -- simulated (replay, demo, backtest) -----------------------------------------------

    def run_simulated(
        self,
        stop: threading.Event,
        *,
        start: datetime,
        end: datetime | None,
        speed: float = 0.0,
        until_end: bool = True,
        wait_for_retrain: bool = False,
        bootstrap: Callable[[], None] | None = None,
        on_started: Callable[[Daemon], None] | None = None,
    ) -> None:
        """Step the clock through the schedule from `start` until the replay is done (or
        `end`, or `stop`). speed: simulated seconds per wall second (0: as fast as the jobs
        go). wait_for_retrain: hold the clock while a retrain runs (a deterministic
        backtest) instead of serving on (the live behaviour, which the demo shows).
        bootstrap: called once when no champion exists and enough history is stored (the
        demo trains its first model there, in the foreground, with a progress bar)."""
        assert isinstance(self.clock, FixedClock), "a simulated run needs a FixedClock"
        self.store.abandon_running(self.clock.now())
        if until_end and self._replay_finished():
            # Run again on a store whose replay ran to its end: only the fires of the resume
            # instant are due (to finish what a kill may have left), none past the end.
            self.record.replay_done = True
        self._bootstrapping = bootstrap is not None
        sched = SimulatedScheduler(self.settings, self.clock, start=start)
        self.scheduler = sched
        if self.http is not None:
            self.http.start()
        if on_started is not None:
            on_started(self)
        wall0, sim0 = time.monotonic(), start
        while not stop.is_set():
            nxt = sched.pop_due()
            if nxt is None:
                break
            when, due = nxt
            if end is not None and when > end:
                break
            if speed > 0:  # pace: a simulated second per 1/speed wall seconds
                ahead = (when - sim0).total_seconds() / speed - (time.monotonic() - wall0)
                if ahead > 0 and stop.wait(ahead):
                    break
            for s in due:
                self._run_sim(
                    Job(kind=s.kind, source=s.source, scheduled_at=when), wait_for_retrain
                )
            ran = {s.kind for s in due}
            while self._pending and not stop.is_set():
                kind, source, fire, trigger = self._pending.pop(0)
                if kind == "predict" and "predict" in ran and fire == when:
                    continue  # the scheduled predict of this instant ran after the ingest
                job = Job(kind=kind, source=source, scheduled_at=fire, trigger=trigger)
                self._run_sim(job, wait_for_retrain)
            if bootstrap is not None and self.store.champion() is None:
                if self._history_stored() >= self.settings.retrain.min_history:
                    bootstrap()
                    if self.store.champion() is not None:
                        bootstrap, self._bootstrapping = None, False
            if self.record.replay_done and until_end:
                break
        self._drain_retrains(stop)
        if not stop.is_set() and self.record.replay_done:
            # The last actuals of the replay: score them once more before the summary.
            self._run_sim(Job(kind="evaluate", scheduled_at=self.clock.now(), trigger="end"), True)

    def _run_sim(self, job: Job, wait_for_retrain: bool) -> None:
        if job.kind == "retrain":
            if self._retrain_running():  # one at a time; the policy asks again later
                busy = JobOutcome(job.job_id, "retrain", job.scheduled_at, "skipped")
                busy.summary = "a retrain is already running"
                self._finished(busy)
                return
            future = self.backend.submit(job)
            with self._lock:
                self._retrains.append(future)
            future.add_done_callback(self._retrain_done)
            if wait_for_retrain:
                future.result()
            return
        outcome = self.backend.run(job)
        self._finished(outcome)
        self._after(outcome)

    def _retrain_done(self, future: Future[JobOutcome]) -> None:
        try:
            outcome = future.result()
        except Exception as exc:  # noqa: BLE001 - the process died; counted as a failure
            outcome = JobOutcome("retrain", "retrain", self.clock.now(), "failed", summary=str(exc))
        self._finished(outcome)

    def _drain_retrains(self, stop: threading.Event) -> None:
        while self._retrain_running() and not stop.is_set():
            stop.wait(0.2)

    def _replay_finished(self) -> bool:
        """A replay source already emitted everything (the flag a fresh ingest would set)."""
        from pipelines.ingest import source_finished
        from pipelines.sources import build_source

        now = self.clock.now()
        return any(
            source_finished(self.store, build_source(name, cfg), now)
            for name, cfg in sorted(self.settings.sources.items())
            if cfg.kind == "replay"
        )

    def _history_stored(self) -> timedelta:
        rows = self.store.list_series()
        spans = [r["watermark"] - r["first_ts"] for r in rows if r["watermark"] and r["first_ts"]]
        return max(spans, default=timedelta(0))


def job_table(record: RunRecord) -> list[dict[str, Any]]:
    """Per job: runs, how they ended, missed fires and durations (seconds)."""
    rows = []
    for job_id, outs in sorted(record.by_job().items()):
        secs = sorted(o.seconds for o in outs if o.summary != "already run for this fire time")
        rows.append(
            {
                "job": job_id,
                "runs": len(outs),
                "succeeded": sum(o.status == "succeeded" for o in outs),
                "skipped": sum(o.status == "skipped" for o in outs),
                "failed": sum(o.status == "failed" for o in outs),
                "missed": record.missed.get(job_id, 0),
                "mean_s": sum(secs) / len(secs) if secs else 0.0,
                "p95_s": secs[max(0, math.ceil(0.95 * len(secs)) - 1)] if secs else 0.0,
                "max_s": secs[-1] if secs else 0.0,
            }
        )
    return rows


def run_foreground(job: Job, daemon: Daemon, **context: Any) -> JobOutcome:
    """Run a job on the caller's thread with extra context (the demo's first training
    shows a progress bar this way)."""
    import torch

    from pipelines.jobs import JobContext

    ctx = JobContext(
        settings=daemon.settings, store=daemon.store, clock=daemon.clock, extra=dict(context)
    )
    serving = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # nothing else runs: use every core
    try:
        outcome = run_job(job, ctx)
    finally:
        torch.set_num_threads(serving)
    daemon._finished(outcome)
    return outcome


def serving_while_training(
    record: RunRecord, kind: str = "predict"
) -> dict[str, tuple[int, float]]:
    """Runs and mean seconds of a serving job while a retrain ran and while none did."""
    out = {}
    for label, flag in (("during a retrain", True), ("otherwise", False)):
        secs = [
            o.seconds
            for o in record.outcomes
            if o.kind == kind
            and o.status == "succeeded"
            and bool(o.detail.get("during_retrain")) is flag
        ]
        out[label] = (len(secs), sum(secs) / len(secs) if secs else 0.0)
    return out
