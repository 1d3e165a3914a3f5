"""The Ray backend: rolling prediction fanned out over series shards, retraining on Ray Train.

Chosen with `[compute] backend = "ray"` (extra forecaster[ray]); the jobs are the inline
backend's, run by `pipelines.jobs.run_job` on the driver (the daemon), which claims the
job_runs row as always. Two of them reach into the cluster, through `JobContext.extra`:

- predict: `RayPredict` has run_predict's signature. The driver pins the model version,
  cuts the series into shards of `compute.shard_size` and starts one task per shard; each
  task runs `run_predict(series_ids=shard)` in its worker.
- retrain: `RayTrain` has `forecaster.training.train`'s signature. It runs that very loop on
  `compute.train_workers` Ray Train workers (TorchTrainer, DDP: each rank its own rows of
  series, gradients all-reduced); rank 0's weights come back as a Ray Train checkpoint, and
  run_retrain scores, saves and registers them as it does an inline result.

Workers write their shard's results to the store themselves rather than return them:
- a task's forecasts, states, window-edge snapshots and watermark-driven progress commit in
  the same transaction as inline (a shard is at most `chunk` series of one group: one
  transaction), so a task killed half way leaves whole chunks or nothing, and Ray's retry
  (`compute.max_retries`) re-reads the states and does exactly what is missing: no
  duplicate, no gap, whatever attempt died where;
- returning them would ship every forecast row (72 per series and step) and state through
  the object store to one driver, which would then be the single writer and bottleneck,
  and a driver crash between a task's end and the driver's commit would lose finished work.
The price: every worker needs the database (PostgreSQL in production; a SQLite file only
works with a one-machine cluster, its writers serialised by SQLite's lock), and the URL
travels in the task's arguments.

Resources come from `[compute]` and are checked against `ray.cluster_resources()` before
anything is submitted: a request no node can meet (a GPU on a CPU-only cluster) would wait
forever, so it fails at once with a ConfigError naming the setting.

CUDA and processes: Ray workers are fresh processes the raylet starts (not forks of the
driver), each reserving the GPUs it asked for (Ray sets CUDA_VISIBLE_DEVICES); nothing here
forks. A task with num_gpus = 0 runs on CPU whatever `device` says, so it never touches a
GPU it has not reserved, and the driver never initialises CUDA for these jobs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import ray
import structlog
import torch
from torch import Tensor

from forecaster.checkpoints import load_checkpoint, save_checkpoint
from forecaster.clock import Clock, FixedClock
from forecaster.config import ComputeSettings, Settings
from forecaster.errors import ConfigError
from forecaster.holdout import ServedErrors
from forecaster.panel import Panel
from forecaster.store import Store
from forecaster.trained import TrainedModel
from forecaster.training import (
    DataParallel,
    Spans,
    TrainConfig,
    TrainResult,
    train,
    trained_model,
)
from pipelines.jobs import Job, JobContext, JobOutcome, run_job
from pipelines.predict import NoChampionError, PredictSummary, run_predict

log = structlog.get_logger(__name__)
_RESULT_FILE = "train_result.json"


def connect(compute: ComputeSettings) -> bool:
    """Join (or start) the cluster of `compute.ray_address`; True if this call started Ray
    in this process (then it is ours to shut down)."""
    if ray.is_initialized():
        return False
    ray.init(address=compute.ray_address, logging_level="warning", log_to_driver=False)
    return True


def check_resources(compute: ComputeSettings, *, count: int = 1) -> None:
    """Fail fast unless `count` bundles of (num_cpus, num_gpus) fit the cluster's nodes."""
    need = {"CPU": compute.num_cpus, "GPU": compute.num_gpus}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    for res, key in (("GPU", "num_gpus"), ("CPU", "num_cpus")):
        if need[res] <= 0:
            continue
        fits = sum(int(n.get(res, 0.0) // need[res]) for n in nodes)
        if fits < count:
            where = compute.ray_address or "started locally"
            raise ConfigError(
                f"compute.{key}",
                f"{count} task(s) of {need[res]:g} {res} each were asked for, but the Ray "
                f"cluster ({where}) has {total.get(res, 0.0):g} {res} in all, room for "
                f"{fits}; Ray would wait for them forever",
                f"Lower compute.{key} (FORECASTER_COMPUTE__{key.upper()})"
                + (", or add a GPU worker (deploy/ray/)" if res == "GPU" else "")
                + (", or compute.train_workers" if count > 1 else ""),
            )


# -- rolling prediction ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Shard:
    """One prediction task's arguments: plain data, so a retried task gets the same."""

    database_url: str
    series_ids: tuple[int, ...]
    version_id: int
    # The daemon's job run: the shard's transactions mark it, as inline ones do, so a redo
    # of a predict killed after its shards committed knows its work landed.
    job_run: tuple[str, datetime] | None = None
    warmup: timedelta | None = None
    warmup_steps: int | None = None
    keep_snapshots: int
    chunk: int
    device: str
    threads: int


_stores: dict[str, Store] = {}
_stores_lock = threading.Lock()


def worker_store(url: str) -> Store:
    """The worker process's store for `url`, opened once (workers are reused across tasks)."""
    with _stores_lock:
        if url not in _stores:
            _worker_logging()
            _stores[url] = Store(url)
        return _stores[url]


def _worker_logging() -> None:
    """A Ray worker is another process: without this its logs would use structlog's
    defaults, whose tracebacks print local variables (a shard's database URL among them)
    and mask nothing."""
    from forecaster.log import configure_logging

    configure_logging()


def predict_shard(shard: Shard) -> PredictSummary:
    """The body of a prediction task: run_predict over the shard's series, in its worker."""
    torch.set_num_threads(shard.threads)
    store = worker_store(shard.database_url)
    with store.working_for(*shard.job_run) if shard.job_run else contextlib.nullcontext():
        return run_predict(
            store,
            warmup=shard.warmup,
            warmup_steps=shard.warmup_steps,
            keep_snapshots=shard.keep_snapshots,
            chunk=shard.chunk,
            version_id=shard.version_id,
            device=shard.device,
            series_ids=shard.series_ids,
        )


def _run_body(body: Callable[[Shard], PredictSummary], shard: Shard) -> PredictSummary:
    return body(shard)


def merge(parts: Sequence[PredictSummary], version_id: int) -> PredictSummary:
    out = PredictSummary(version_id=version_id)
    for p in parts:
        out.series_advanced += p.series_advanced
        out.points_absorbed += p.points_absorbed
        out.forecasts_written += p.forecasts_written
        out.series_rewound += p.series_rewound
        out.untrained_advanced += p.untrained_advanced
        out.skipped_freq += p.skipped_freq
    return out


class RayPredict:
    """run_predict over shards of series, one Ray task per shard (see the module docstring).
    shard_fn is the task's body (tests pass one that dies on its first attempt)."""

    def __init__(
        self,
        compute: ComputeSettings,
        database_url: str,
        *,
        shard_fn: Callable[[Shard], PredictSummary] = predict_shard,
    ) -> None:
        check_resources(compute)
        self.compute = compute
        self.database_url = database_url
        self._body = shard_fn
        self._task = ray.remote(_run_body)

    def __call__(
        self,
        store: Store,
        *,
        warmup: timedelta | None = None,
        warmup_steps: int | None = None,
        keep_snapshots: int = 7,
        chunk: int = 2048,
        version_id: int | None = None,
        device: str = "cpu",
    ) -> PredictSummary:
        c = self.compute
        # Pinned here: a promotion while the shards run must not split them between models.
        version = store.champion() if version_id is None else store.model_version(version_id)
        if version is None:
            raise NoChampionError()
        ids = sorted(t["id"] for t in store.prediction_targets() if t["watermark"] is not None)
        size = min(c.shard_size, chunk)  # a shard is one chunk: one transaction per group
        refs = [
            self._task.options(
                num_cpus=c.num_cpus,
                num_gpus=c.num_gpus,
                max_retries=c.max_retries,
                name=f"forecaster-predict-shard-{i // size}",
            ).remote(
                self._body,
                Shard(
                    database_url=self.database_url,
                    series_ids=tuple(ids[i : i + size]),
                    version_id=version["id"],
                    job_run=store.working_run(),
                    warmup=warmup,
                    warmup_steps=warmup_steps,
                    keep_snapshots=keep_snapshots,
                    chunk=chunk,
                    device=device if c.num_gpus > 0 else "cpu",
                    threads=max(1, int(c.num_cpus)),
                ),
            )
            for i in range(0, len(ids), size)
        ]
        summary = merge(ray.get(refs), version["id"])
        log.info("ray predict done", shards=len(refs), line=summary.line())
        return summary


# -- retraining on Ray Train ----------------------------------------------------------------


def rank_rows(n_series: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous share of n_series rows (sizes differ by at most one)."""
    base, extra = divmod(n_series, world)
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (1 if rank < extra else 0))


def data_parallel(
    n_series: int, *, rank: int, world: int, device: torch.device, kind: str
) -> DataParallel:
    """This rank's DataParallel over the torch.distributed process group already set up
    (by Ray Train, or by a test): DDP on `device`, a float64 all-reduce for the means."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    def mean(value: float, weight: float) -> float:
        t = torch.tensor([value * weight, weight], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t[0] / t[1])

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        return DistributedDataParallel(
            model,  # train() has put it on `device`
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=kind == "seq2seq",  # its decoder may skip a layer
        )

    return DataParallel(rows=rank_rows(n_series, rank, world), wrap=wrap, mean=mean, main=rank == 0)


def _train_loop(cfg: dict[str, Any]) -> None:
    """One Ray Train worker: `forecaster.training.train` on this rank's rows, under DDP."""
    import ray.train
    import ray.train.torch

    _worker_logging()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    panel: Panel = cfg["panel"]
    device = ray.train.torch.get_device()  # the GPU this worker reserved, or the CPU
    config: TrainConfig = replace(cfg["config"], device=str(device))
    torch.set_num_threads(cfg["threads"])
    parallel = data_parallel(
        len(panel.names), rank=rank, world=world, device=device, kind=config.kind
    )
    result = train(
        panel,
        config,
        init_state_dict=cfg["init"],
        parallel=parallel,
        on_progress=cfg.get("worker_progress"),
    )
    metrics = {"best_epoch": result.best_epoch, "world_size": world}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        _, sha = save_checkpoint(trained_model(result).to_checkpoint(), d)
        plain = {k: getattr(result, k) for k in _PLAIN}
        spans = {f.name: getattr(result.spans, f.name) for f in dataclasses.fields(result.spans)}
        plain["spans"] = {k: v.tolist() if isinstance(v, Tensor) else v for k, v in spans.items()}
        served = result.served_holdout
        plain["served_holdout"] = None if served is None else served.to_dict()
        Path(d, _RESULT_FILE).write_text(json.dumps({"sha256": sha, **plain, **metrics}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


# TrainResult's fields that travel as JSON; the rest come back from the checkpoint.
_PLAIN = (
    "metrics",
    "history",
    "best_epoch",
    "train_end",
    "test_start",
    "test_steps",
    "window",
    "seconds",
    "points_per_s",
    "calibration",
    "refit_epochs",
    "serving",
    "serving_errors",
    "stat",
)


class RayTrain:
    """`forecaster.training.train` on Ray Train's TorchTrainer (same signature), DDP across
    `compute.train_workers` workers, each reserving (num_cpus, num_gpus). Progress is not
    forwarded (the workers are other processes); `worker_progress`, a picklable callable, is
    called with each Progress inside every worker (tests inject faults with it, as RayPredict's
    shard_fn). `last_world_size` says how many ranks the last run had."""

    def __init__(
        self,
        compute: ComputeSettings,
        *,
        worker_progress: Callable[[Any], None] | None = None,
    ) -> None:
        check_resources(compute, count=compute.train_workers)
        self.compute = compute
        self.worker_progress = worker_progress
        self.last_world_size = 0

    def __call__(
        self,
        panel: Panel,
        config: TrainConfig,
        *,
        on_progress: Any = None,
        init_state_dict: dict[str, Tensor] | None = None,
    ) -> TrainResult:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        c = self.compute
        workers = min(c.train_workers, len(panel.names))  # every rank needs a series
        check_resources(c, count=workers)
        resources = {"CPU": c.num_cpus} | ({"GPU": c.num_gpus} if c.num_gpus > 0 else {})
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={
                "panel": panel,
                "config": config,
                "init": init_state_dict,
                "threads": max(1, int(c.num_cpus)),
                "worker_progress": self.worker_progress,
            },
            scaling_config=ScalingConfig(
                num_workers=workers, use_gpu=c.num_gpus > 0, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=f"forecaster-retrain-{uuid.uuid4().hex[:8]}",
                storage_path=c.storage_path,
                failure_config=FailureConfig(max_failures=c.max_retries),
            ),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"Ray Train run ended without a checkpoint: {result.error}")
        with result.checkpoint.as_directory() as d:
            plain = json.loads(Path(d, _RESULT_FILE).read_text())
            sha = plain.pop("sha256")
            path = Path(d, sha[:2], f"{sha}.safetensors")
            trained = TrainedModel.from_checkpoint(load_checkpoint(path.as_uri(), sha))
        self.last_world_size = plain.pop("world_size")
        spans = plain.pop("spans")
        served = plain.pop("served_holdout", None)
        return TrainResult(
            spans=Spans(
                **{k: torch.tensor(v) if isinstance(v, list) else v for k, v in spans.items()}
            ),
            model=trained.model.cpu().eval(),
            model_config=trained.model_config,
            spec=trained.spec,
            scalers=trained.scalers,
            names=trained.names,
            nonnegative=trained.nonnegative,
            served_holdout=None if served is None else ServedErrors.from_dict(served),
            **{k: plain[k] for k in _PLAIN},
        )


# -- the backend ----------------------------------------------------------------------------


class RayBackend:
    """The dispatcher's `ray` backend. Jobs run on the driver's threads (retrains on their
    own, so serving never waits for one); predict and retrain reach into the cluster."""

    name = "ray"

    def __init__(
        self,
        settings: Settings,
        store: Store,
        clock: Clock,
        *,
        workers: int,
        simulated: bool = False,
    ) -> None:
        self._owns_ray = connect(settings.compute)
        self.predict = RayPredict(settings.compute, settings.database_url)
        self.trainer = RayTrain(settings.compute)
        self._settings, self._store, self._simulated = settings, store, simulated
        self._ctx = self._context(clock)
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="forecaster-job")
        self._retrains = ThreadPoolExecutor(1, thread_name_prefix="forecaster-retrain")
        self._retrain_stopped = False

    def _context(self, clock: Clock) -> JobContext:
        extra = {"predict": self.predict, "trainer": self.trainer}
        return JobContext(settings=self._settings, store=self._store, clock=clock, extra=extra)

    def submit(self, job: Job) -> Future[JobOutcome]:
        if job.kind == "retrain":
            # A simulated retrain sees the time it was fired at, as the inline child does.
            ctx = self._context(FixedClock(job.scheduled_at)) if self._simulated else self._ctx
            return self._retrains.submit(run_job, job, ctx)
        return self._threads.submit(run_job, job, self._ctx)

    def run(self, job: Job) -> JobOutcome:
        return run_job(job, self._ctx)

    def stop_retrain(self) -> None:
        """A Ray Train run cannot be interrupted from here: stop waiting for it. If this
        process started Ray, shutdown() ends the run with the cluster; it then loses only
        its own work (no registry row points at an unfinished checkpoint)."""
        self._retrain_stopped = True
        self._retrains.shutdown(wait=False, cancel_futures=True)

    def begin_stopping(self) -> None:
        self._ctx.stopping.set()

    def shutdown(self, *, wait: bool) -> None:
        self._threads.shutdown(wait=wait, cancel_futures=not wait)
        wait_retrain = wait and not self._retrain_stopped
        self._retrains.shutdown(wait=wait_retrain, cancel_futures=not wait_retrain)
        if self._owns_ray:
            ray.shutdown()
