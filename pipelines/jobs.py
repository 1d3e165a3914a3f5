"""The daemon's jobs: plain serialisable dataclasses run by one function.

`run_job(job, ctx)` claims the job's (job_id, scheduled_at) row in `job_runs` (INSERT ... ON
CONFLICT DO NOTHING), runs it and records how it ended. A double fire finds the row taken
and does nothing; a missed or killed run loses nothing, because every job works from stored
watermarks (ingest from the source cursor, predict from each state's state_ts, evaluate from
the scored forecasts), so the next run does what this one did not.

A Job holds only names, times and flags, so any backend can ship it: a thread of the
daemon, a separate process, or a Ray task later, each building its own context from the
settings.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar

import structlog

from forecaster.clock import Clock
from forecaster.config import Settings
from forecaster.store import Store, connection_lost

log = structlog.get_logger(__name__)
T = TypeVar("T")

Kind = Literal["ingest", "predict", "evaluate", "retrain", "housekeeping"]
# Order of jobs due at the same instant: data in, then forecasts, scores, the rest.
ORDER: tuple[Kind, ...] = ("ingest", "predict", "evaluate", "retrain", "housekeeping")


@dataclass(frozen=True, kw_only=True)
class Job:
    kind: Kind
    scheduled_at: datetime  # the fire time: with job_id, the idempotency key
    source: str | None = None  # ingest: which source
    trigger: str = (
        "schedule"  # schedule | window (predict after ingest) | degraded | start | manual
    )
    full: bool = False  # retrain: from scratch instead of fine-tuning

    @property
    def job_id(self) -> str:
        """The schedule's name of this job: "ingest:<source>", "predict", ... A triggered
        run has its own name, so it never takes the slot of the scheduled one."""
        name = f"{self.kind}:{self.source}" if self.source else self.kind
        return name if self.trigger == "schedule" else f"{name}:{self.trigger}"


@dataclass
class JobOutcome:
    job_id: str
    kind: Kind
    scheduled_at: datetime
    status: str  # succeeded | failed | skipped (claimed before, or nothing to do)
    seconds: float = 0.0
    summary: str = ""
    windows_completed: int = 0  # ingest: windows whose last slot arrived (predict follows)
    degraded: bool = False  # evaluate: the champion is worse than the baseline allows
    mase: float | None = None  # evaluate: the champion's MASE over the degrade window
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobContext:
    """What a job needs, built once per worker from the settings."""

    settings: Settings
    store: Store
    clock: Clock
    sources: dict[str, Any] = field(default_factory=dict)  # readers, kept for their caches
    # e.g. on_progress for a retrain; the Ray backend's "predict" (run_predict over shards)
    # and "trainer" (training on Ray Train) replace the inline ones
    extra: dict[str, Any] = field(default_factory=dict)
    # Set when the worker shuts down: a running ingest ends after its current batch (whose
    # cursor commits with it) instead of reading the rest of a big file first.
    stopping: threading.Event = field(default_factory=threading.Event)

    def source(self, name: str) -> Any:
        from pipelines.sources import build_source

        if name not in self.sources:
            self.sources[name] = build_source(name, self.settings.sources[name])
        return self.sources[name]


def run_job(job: Job, ctx: JobContext) -> JobOutcome:
    """Claim, run and record one job. Never raises for the job's own failure: the outcome
    says failed, the log has the traceback, and job_runs has the error's first line."""
    started = ctx.clock.now()
    outcome = JobOutcome(job.job_id, job.kind, job.scheduled_at, "skipped")
    claimed = _retrying(
        job, "claim", lambda: ctx.store.claim_job_run(job.job_id, job.scheduled_at, started)
    )
    if not claimed:
        outcome.summary = "already run for this fire time"
        return outcome
    # A redo of a killed run whose work had committed finds nothing left to do: that run
    # still succeeded (and its follow-ups are still due), as an uninterrupted one would have.
    redo_of_work = _retrying(
        job, "claim", lambda: ctx.store.left_work(job.job_id, job.scheduled_at)
    )
    t0 = time.perf_counter()
    status, detail = "succeeded", None
    try:
        with ctx.store.working_for(job.job_id, job.scheduled_at):
            _retrying(job, "run", lambda: _RUNNERS[job.kind](job, ctx, outcome))
        status = outcome.status if outcome.status != "skipped" else "succeeded"
        if outcome.detail.get("nothing_to_do") and not redo_of_work:
            status = "skipped"
        outcome.detail["redo_of_work"] = redo_of_work
    except Exception as exc:  # the scheduler must outlive any one job
        status, detail = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        outcome.summary = detail
        log.exception("job failed", job=job.job_id, scheduled_at=job.scheduled_at.isoformat())
    outcome.status = status
    outcome.seconds = time.perf_counter() - t0
    _retrying(
        job,
        "record",
        lambda: ctx.store.finish_job_run(
            job.job_id,
            job.scheduled_at,
            status=status,
            finished_at=ctx.clock.now(),
            detail=detail or outcome.summary[:500] or None,
        ),
    )
    log.info(
        "job done",
        job=job.job_id,
        status=status,
        seconds=round(outcome.seconds, 3),
        summary=outcome.summary,
    )
    return outcome


# How long a job waits out a database that went away (a restart, a failover, a full
# connection pool) before it fails: first retry after BACKOFF[0] s, doubling to the cap.
BACKOFF = (0.5, 30.0)
DB_OUTAGE_LIMIT = 600.0


def _retrying(job: Job, what: str, fn: Callable[[], T]) -> T:
    """fn(), again with exponential backoff while the database is unreachable, for at most
    DB_OUTAGE_LIMIT seconds. Safe because each step is idempotent: a claim is an INSERT ON
    CONFLICT, every job works from stored watermarks, a finish is an UPDATE."""
    delay, cap = BACKOFF
    deadline = time.monotonic() + DB_OUTAGE_LIMIT
    while True:
        try:
            return fn()
        except Exception as exc:
            if not connection_lost(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning(
                "database unavailable, retrying",
                job=job.job_id,
                step=what,
                retry_in_s=delay,
                error=str(exc).splitlines()[0][:200],
            )
            time.sleep(delay)
            delay = min(delay * 2, cap)


# -- the jobs ------------------------------------------------------------------------------


def _ingest(job: Job, ctx: JobContext, outcome: JobOutcome) -> None:
    from pipelines.ingest import run_ingest

    assert job.source is not None, "an ingest job names its source"
    defaults = ctx.settings.series_defaults_for(job.source)
    summary = run_ingest(
        ctx.store,
        ctx.source(job.source),
        defaults,
        now=ctx.clock.now(),
        should_stop=ctx.stopping.is_set,
    )
    outcome.summary = summary.line()
    outcome.windows_completed = summary.windows_completed
    outcome.detail = {
        "rows_read": summary.rows_read,
        "observed": summary.observed,
        "exhausted": summary.exhausted,
        "stopped": summary.stopped,
        "nothing_to_do": summary.rows_read == 0,
    }


def _predict(job: Job, ctx: JobContext, outcome: JobOutcome) -> None:
    from pipelines.predict import NoChampionError, run_predict

    predict = ctx.extra.get("predict", run_predict)
    try:
        # A duration: run_predict counts it in the model's own steps (a source may override
        # the global frequency).
        summary = predict(ctx.store, warmup=ctx.settings.retrain.warmup, device=ctx.settings.device)
    except NoChampionError as exc:
        outcome.summary = str(exc)
        outcome.detail = {"nothing_to_do": True}
        return
    outcome.summary = summary.line()
    outcome.detail = {
        "series_advanced": summary.series_advanced,
        "series_rewound": summary.series_rewound,
        "forecasts_written": summary.forecasts_written,
        "nothing_to_do": summary.forecasts_written == 0 and summary.series_advanced == 0,
    }


def _evaluate(job: Job, ctx: JobContext, outcome: JobOutcome) -> None:
    from pipelines.evaluate import run_evaluate

    r = ctx.settings.retrain
    summary = run_evaluate(
        ctx.store, accuracy_window=r.degrade_window, anomalies=ctx.settings.anomalies
    )
    outcome.summary = summary.line()
    outcome.mase = summary.mase
    outcome.degraded = summary.mase is not None and summary.mase > r.degrade_ratio
    outcome.detail = {"scored": summary.scored, "nothing_to_do": summary.scored == 0}


def _retrain(job: Job, ctx: JobContext, outcome: JobOutcome) -> None:
    from pipelines.retrain import run_retrain

    result = run_retrain(
        ctx.store,
        ctx.settings,
        now=ctx.clock.now(),
        full=job.full,
        on_progress=ctx.extra.get("on_progress"),
        config_override=ctx.extra.get("config_override"),
        run_key=f"{job.job_id}@{job.scheduled_at.isoformat()}",
        trainer=ctx.extra.get("trainer"),
        predict=ctx.extra.get("predict"),
    )
    outcome.summary = result.line()
    outcome.detail = {
        "decision": result.decision,
        "challenger_id": result.challenger_id,
        "challenger_mase": result.challenger_mase,
        "champion_mase": result.champion_mase,
        "nothing_to_do": result.decision == "skipped",
    }


def _housekeeping(job: Job, ctx: JobContext, outcome: JobOutcome) -> None:
    keep = ctx.settings.retention
    now = ctx.clock.now()

    def cutoff(age: timedelta | None) -> datetime | None:
        return None if age is None else now - age

    deleted = ctx.store.housekeep(
        {
            "observations": cutoff(keep.observations),
            "forecasts": cutoff(keep.forecasts),
            "job_runs": cutoff(keep.job_runs),
        }
    )
    outcome.summary = "housekeeping: " + (
        ", ".join(f"{n} {t} rows deleted" for t, n in deleted.items()) or "nothing to delete"
    )
    outcome.detail = {"deleted": deleted, "nothing_to_do": not any(deleted.values())}


_RUNNERS = {
    "ingest": _ingest,
    "predict": _predict,
    "evaluate": _evaluate,
    "retrain": _retrain,
    "housekeeping": _housekeeping,
}
