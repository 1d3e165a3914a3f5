"""The Ray backend past one node: a real multi-node cluster on this machine (Ray's own
`ray.cluster_utils.Cluster`: a head that runs no task and worker nodes of one CPU each, every
one its own raylet). A worker node is killed (its raylet and every process on it, no graceful
exit) in the middle of a sharded predict, and in the middle of a retrain on Ray Train across
two workers on two nodes: each job finishes, and the store equals an uninterrupted run's.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest

from forecaster.clock import FixedClock
from pipelines.dispatch import build_backend
from pipelines.jobs import Job
from pipelines.predict import PredictSummary, run_predict
from tests.pipelines.test_ray_backend import (  # the single-node module's data and oracle
    NOW,
    _assert_same,
    _rows,
    _settings,
    _store,
    bundled,  # noqa: F401 - fixture
    first_attempt_half,
    model,  # noqa: F401 - fixture
)

ray = pytest.importorskip("ray")  # test_ray_backend fails under CI=true without it

from pipelines.backends.ray import RayPredict, Shard  # noqa: E402

pytestmark = pytest.mark.slow
T = TypeVar("T")

# Node failure noticed within about a second (Ray's defaults take about 15 s).
_FAST_FAILURE = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 200,
    "health_check_failure_threshold": 5,
}


@pytest.fixture
def cluster():
    """A head with no CPU (the driver's node: it runs no task) and two worker nodes of one
    CPU each; the test may remove and add nodes."""
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={"num_cpus": 0, "_system_config": _FAST_FAILURE},
    )
    for module in (__name__, first_attempt_half.__module__):  # the faulty hooks
        ray.cloudpickle.register_pickle_by_value(sys.modules[module])
    try:
        for _ in range(2):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _alive_workers(settle: float = 30.0, expect: int | None = None) -> int:
    """Worker nodes the cluster's node table holds alive; with `expect`, polled for up to
    `settle` seconds until it says so (a killed node's task can be retried elsewhere before
    the table marks the node dead: its health checks run on their own clock)."""

    def alive() -> int:
        return sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0)

    found, deadline = alive(), time.monotonic() + settle
    while expect is not None and found != expect and time.monotonic() < deadline:
        time.sleep(0.2)
        found = alive()
    return found


def _kill_node(cluster, node_id: str) -> None:
    """The worker node `node_id` killed: raylet, object store and every worker on it."""
    node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
    cluster.remove_node(node, allow_graceful=False)


def _wait_to_be_killed(marker: str) -> None:
    """In a task or worker: write this node's id to the marker's .node file and wait there
    to be killed with the node."""
    Path(marker + ".node").write_text(ray.get_runtime_context().get_node_id())
    time.sleep(90)  # the test kills this node long before
    raise AssertionError("the node was not killed")


def _killing(cluster, job: Callable[[], T], marker: str, *, replace: bool) -> tuple[T, str | None]:
    """`job` run on a thread while this one waits for a task or worker to report its node
    (_wait_to_be_killed), kills that node and, with `replace`, adds a fresh one (as a
    cluster's autoscaler would; Ray starts a node from the main thread only). Returns the
    job's result and the killed node's id (None if none reported before the job ended)."""
    node_file = Path(marker + ".node")
    killed = None
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(job)
        while killed is None and not running.done():
            if node_file.exists() and (node_id := node_file.read_text()):
                killed = node_id
                _kill_node(cluster, node_id)
                if replace:
                    cluster.add_node(num_cpus=1)
            time.sleep(0.05)
        return running.result(timeout=600), killed


def _stalls_once(shard: Shard, *, marker: str, victim: int) -> PredictSummary:
    """A task body whose first attempt on the victim's shard commits half of it, then waits
    to be killed with its node."""
    done = first_attempt_half(shard, marker, victim)
    if done is None:
        _wait_to_be_killed(marker)
    return done


def test_a_node_killed_mid_predict_loses_and_duplicates_nothing(cluster, bundled, model, tmp_path):  # noqa: F811
    reference = _store(f"sqlite:///{tmp_path / 'ref.db'}", bundled, model)
    run_predict(reference, warmup_steps=72)
    url = f"sqlite:///{tmp_path / 'killed.db'}"
    store = _store(url, bundled, model)
    marker = str(tmp_path / "stalled")
    victim = min(t["id"] for t in store.prediction_targets())  # in the first shard of 5
    body = functools.partial(_stalls_once, marker=marker, victim=victim)
    predict = RayPredict(_settings(url, tmp_path, max_retries=2).compute, url, shard_fn=body)
    summary, killed = _killing(
        cluster, lambda: predict(store, warmup_steps=72), marker, replace=False
    )
    assert killed, "the stalled task never reported its node"
    assert _alive_workers(expect=1) == 1  # the shard's retry ran on the other node
    # The killed attempt committed half a shard (2 of 5 series), which its retry found done.
    assert summary.series_advanced == 23 - 2
    _assert_same(_rows(store), _rows(reference))
    store.close()
    reference.close()


def _stalls_mid_training(progress, *, marker: str) -> None:
    """A training worker's progress hook: at the first window of the first attempt, wait to
    be killed with the node (the other rank waits on it in DDP's all-reduce); once the
    marker exists, nothing."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    _wait_to_be_killed(marker)


def _retrain(cluster, url: str, tmp_path: Path, bundled, model, *, kill: bool) -> dict:  # noqa: F811
    """A retrain job on Ray Train across two workers, one per node: registered and
    promoted, its states built by Ray predict tasks. With `kill`, the node of a training
    worker is killed in the middle of its first epoch and a fresh node joins; Ray Train
    starts the worker group again."""
    store = _store(url, bundled, model, champion=False)
    settings = _settings(url, tmp_path, train_workers=2, num_cpus=1, max_retries=2)
    backend = build_backend(settings, store, FixedClock(NOW), workers=1)
    job = functools.partial(backend.run, Job(kind="retrain", scheduled_at=NOW))
    if kill:
        marker = str(tmp_path / f"{Path(url).stem}.stalled")
        backend.trainer.worker_progress = functools.partial(_stalls_mid_training, marker=marker)
        outcome, killed = _killing(cluster, job, marker, replace=True)
        assert killed is not None, "no training worker reported its node"
    else:
        outcome = job()
    backend.shutdown(wait=True)
    assert outcome.status == "succeeded", outcome.summary
    assert backend.trainer.last_world_size == 2
    version = store.model_version(outcome.detail["challenger_id"])
    rows = _rows(store)
    store.close()
    return {"version": version, "decision": outcome.detail["decision"], "rows": rows}


def test_a_node_killed_mid_retrain_on_ray_train_ends_as_an_uninterrupted_run(
    cluster,
    bundled,  # noqa: F811
    model,  # noqa: F811
    tmp_path,
):
    clean = _retrain(
        cluster, f"sqlite:///{tmp_path / 'clean.db'}", tmp_path, bundled, model, kill=False
    )
    hit = _retrain(cluster, f"sqlite:///{tmp_path / 'hit.db'}", tmp_path, bundled, model, kill=True)
    assert hit["decision"] == clean["decision"] == "promoted"
    # The same weights (trained again from the start, rank by rank on the same rows)...
    assert hit["version"]["sha256"] == clean["version"]["sha256"]
    assert hit["version"]["metrics"] == clean["version"]["metrics"]
    # ...and the same states and forecasts from them.
    _assert_same(hit["rows"], clean["rows"])
