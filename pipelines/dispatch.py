"""The compute dispatcher: where a job runs. One small interface, backends beside it.

`inline` (the default) runs serving jobs (ingest, predict, evaluate, housekeeping) on a
thread pool of the daemon and retraining in a separate process (spawned, never forked, so
CUDA is never initialised in a process that forks, DESIGN.md decision 2), with one torch
thread less than the machine has: predictions keep a core while a challenger trains.

`ray` (`[compute] backend = "ray"`, the optional extra forecaster[ray]) lives in
`pipelines.backends.ray`: the same jobs, run by the same `pipelines.jobs.run_job`, with
rolling prediction fanned out over series shards as Ray tasks and retraining on Ray Train.
`build_backend` picks one from the settings.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import gc
import multiprocessing
import os
import signal
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Protocol

from forecaster.clock import Clock, FixedClock, WallClock
from forecaster.config import Settings
from forecaster.errors import ConfigError
from forecaster.store import Store
from pipelines.jobs import Job, JobContext, JobOutcome, run_job


class Backend(Protocol):
    name: str

    def submit(self, job: Job) -> Future[JobOutcome]:
        """Start the job; the future's result is its outcome (run_job never raises for the
        job's own failure)."""
        ...

    def run(self, job: Job) -> JobOutcome:
        """Run a serving job on the caller's thread (the simulated scheduler does)."""
        ...

    def stop_retrain(self) -> None:
        """Stop a running retrain (it loses only its own work); serving jobs go on."""
        ...

    def begin_stopping(self) -> None:
        """Tell running serving jobs to stop at their next safe point (an ingest after the
        batch it is committing), before the scheduler waits for them."""
        ...

    def shutdown(self, *, wait: bool) -> None:
        """Stop taking jobs; with wait, let running ones finish (their transactions commit
        or roll back whole either way)."""
        ...


def build_backend(
    settings: Settings, store: Store, clock: Clock, *, workers: int, simulated: bool = False
) -> Backend:
    """The backend `settings.compute.backend` names (ray is imported only when chosen)."""
    if settings.compute.backend == "ray":
        try:
            from pipelines.backends.ray import RayBackend
        except ImportError as exc:
            raise ConfigError(
                "compute.backend",
                f"'ray' needs Ray, which is not importable ({exc})",
                "Install the extra: pip install 'forecaster[ray]', or set backend = 'inline'",
            ) from exc
        return RayBackend(settings, store, clock, workers=workers, simulated=simulated)
    return InlineBackend(settings, store, clock, workers=workers, simulated=simulated)


class InlineBackend:
    name = "inline"

    def __init__(
        self,
        settings: Settings,
        store: Store,
        clock: Clock,
        *,
        workers: int,
        simulated: bool = False,
        retrain_in_process: bool = True,
    ) -> None:
        self._settings = settings
        self._simulated = simulated
        self._ctx = JobContext(settings=settings, store=store, clock=clock)
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="forecaster-job")
        self._retrain_in_process = retrain_in_process
        self._procs: Executor | None = None

    def submit(self, job: Job) -> Future[JobOutcome]:
        if job.kind == "retrain" and self._retrain_in_process:
            if self._procs is None:
                self._procs = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker,
                    initargs=(os.getpid(),),
                )
            return self._procs.submit(_run_in_child, job, self._settings, self._simulated)
        return self._threads.submit(run_job, job, self._ctx)

    def run(self, job: Job) -> JobOutcome:
        """Run a serving job on the caller's thread (the simulated scheduler does, so a
        backtest is deterministic)."""
        return run_job(job, self._ctx)

    def stop_retrain(self) -> None:
        """Kill a running retrain: it loses only its own work (at most a checkpoint file no
        registry row points at); its job_runs row is marked abandoned at the next start."""
        if self._procs is not None:
            _kill_children(self._procs)
            self._procs.shutdown(wait=False, cancel_futures=True)
            self._procs = None

    def begin_stopping(self) -> None:
        self._ctx.stopping.set()

    def shutdown(self, *, wait: bool) -> None:
        self._threads.shutdown(wait=wait, cancel_futures=not wait)
        if self._procs is not None:
            if not wait:
                self.stop_retrain()
            else:
                self._procs.shutdown(wait=True)


def _die_with_parent(parent: int) -> None:
    """A retrain process must not outlive a daemon killed with SIGKILL: an orphan would go
    on training and promoting beside the restarted daemon's own retrains. Linux delivers
    SIGKILL to it when its parent dies (elsewhere the worker exits at its next job)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _init_worker(parent: int) -> None:
    """The retrain process's start: _die_with_parent, and an exit that skips the collector
    (a second and more once torch is loaded, which the daemon's shutdown waits for; see
    pipelines.cli)."""
    _die_with_parent(parent)
    atexit.register(gc.freeze)


def _run_in_child(job: Job, settings: Settings, simulated: bool) -> JobOutcome:
    """A retrain in its own process: its own store connection, its own clock."""
    import torch

    from forecaster.log import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    clock: Clock = FixedClock(job.scheduled_at) if simulated else WallClock()
    store = Store(settings.database_url)
    try:
        return run_job(job, JobContext(settings=settings, store=store, clock=clock))
    finally:
        store.close()


def _kill_children(pool: Executor) -> None:
    # A retrain killed half way leaves at most a checkpoint file no row points at.
    for proc in list(getattr(pool, "_processes", {}).values()):
        proc.kill()
