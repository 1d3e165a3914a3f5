"""Jobs as dataclasses run by one function: claimed once per fire time, failures recorded,
abandoned runs redone, housekeeping by retention; the schedules the daemon runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from forecaster.clock import FixedClock
from forecaster.config import load_settings
from forecaster.errors import ConfigError
from forecaster.store import Store
from pipelines.jobs import Job, JobContext, run_job
from pipelines.scheduler import SimulatedScheduler, schedules

T0 = datetime(2013, 1, 1, tzinfo=UTC)


@pytest.fixture
def ctx(db_url, tmp_path):
    store = Store(db_url)
    store.upgrade()
    settings = load_settings(
        None,
        database_url=db_url,
        checkpoint_dir=str(tmp_path / "ckpt"),
        sources={
            "fl": {
                "kind": "replay",
                "speed": 1.0,
                "interval": "1d",
                "start": T0,
                "series_filter": ["flights.JFK", "flights.LGA"],
            }
        },
    )
    yield JobContext(settings=settings, store=store, clock=FixedClock(T0))
    store.close()


def _anchor(ctx) -> None:
    """The replay pins data time to clock time at its first read (as the daemon's first
    fire does at the start of a simulated run)."""
    run_job(Job(kind="ingest", source="fl", scheduled_at=ctx.clock.now()), ctx)


def test_a_fire_time_is_claimed_once(ctx):
    _anchor(ctx)
    ctx.clock.set(T0 + timedelta(days=3))
    job = Job(kind="ingest", source="fl", scheduled_at=ctx.clock.now())
    first = run_job(job, ctx)
    assert first.status == "succeeded" and first.detail["rows_read"] > 0
    assert first.windows_completed > 0
    again = run_job(job, ctx)  # a double fire of the same slot
    assert again.status == "skipped" and again.summary == "already run for this fire time"
    runs = ctx.store.job_runs()
    assert [(r["job_id"], r["status"]) for r in runs] == [
        ("ingest:fl", "skipped"),  # the anchoring read at T0: nothing due yet
        ("ingest:fl", "succeeded"),
    ]
    assert runs[1]["finished_at"] == ctx.clock.now()  # job times come from the clock


def test_a_failing_job_is_recorded_and_does_not_raise(ctx):
    bad = Job(kind="ingest", source="nope", scheduled_at=ctx.clock.now())
    outcome = run_job(bad, ctx)
    assert outcome.status == "failed" and "nope" in outcome.summary
    (row,) = ctx.store.job_runs()
    assert row["status"] == "failed" and row["detail"].startswith("KeyError")


def test_a_run_left_running_by_a_killed_process_is_redone(ctx):
    when = ctx.clock.now()
    assert ctx.store.claim_job_run("evaluate", when, when)  # then the process dies
    assert not ctx.store.claim_job_run("evaluate", when, when)  # still running: taken
    assert ctx.store.abandon_running(when) == 1  # the next start
    outcome = run_job(Job(kind="evaluate", scheduled_at=when), ctx)
    assert outcome.status == "skipped"  # nothing to score, but it ran this time
    assert outcome.summary != "already run for this fire time"
    assert [r["status"] for r in ctx.store.job_runs()] == ["skipped"]


def test_a_killed_run_whose_work_committed_is_recorded_as_its_uninterrupted_run_would_be(ctx):
    """The kill lands after the ingest's transactions committed, before its row was
    finished: the redo finds nothing left, and still records succeeded (the uninterrupted
    run's status), with its follow-up (predict) still due. A killed run that committed
    nothing and finds nothing is skipped, as before."""
    _anchor(ctx)
    ctx.clock.set(T0 + timedelta(days=3))
    when = ctx.clock.now()
    assert ctx.store.claim_job_run("ingest:fl", when, when)
    with ctx.store.working_for("ingest:fl", when):
        from pipelines.ingest import run_ingest

        done = run_ingest(
            ctx.store, ctx.source("fl"), ctx.settings.series_defaults_for("fl"), now=when
        )
    assert done.rows_read > 0  # committed; then the process dies before finish_job_run
    assert ctx.store.abandon_running(when) == 1
    assert ctx.store.left_work("ingest:fl", when)
    redo = run_job(Job(kind="ingest", source="fl", scheduled_at=when), ctx)
    assert redo.detail["rows_read"] == 0 and redo.detail["redo_of_work"]
    assert redo.status == "succeeded"

    later = when + timedelta(hours=1)  # nothing new is due an hour later
    assert ctx.store.claim_job_run("ingest:fl", later, later)
    assert ctx.store.abandon_running(later) == 1
    assert not ctx.store.left_work("ingest:fl", later)
    redo = run_job(Job(kind="ingest", source="fl", scheduled_at=later), ctx)
    assert redo.status == "skipped" and not redo.detail["redo_of_work"]
    statuses = {r["scheduled_at"]: r["status"] for r in ctx.store.job_runs()}
    assert statuses[when] == "succeeded" and statuses[later] == "skipped"

    # Statements that change nothing are no work: a DELETE of nothing (housekeeping with
    # nothing old enough), a cursor moved by an empty read.
    assert ctx.store.claim_job_run("housekeeping", later, later)
    with ctx.store.working_for("housekeeping", later):
        assert ctx.store.housekeep({"observations": T0 - timedelta(days=1)}) == {"observations": 0}
        nothing_new = run_ingest(
            ctx.store, ctx.source("fl"), ctx.settings.series_defaults_for("fl"), now=when
        )
        assert nothing_new.rows_read == 0
    assert not ctx.store.left_work("housekeeping", later)


def test_predict_without_a_model_is_skipped_not_failed(ctx):
    outcome = run_job(Job(kind="predict", scheduled_at=ctx.clock.now()), ctx)
    assert outcome.status == "skipped" and "forecaster train" in outcome.summary


def test_housekeeping_deletes_what_retention_lets_go(ctx):
    _anchor(ctx)
    ctx.clock.set(T0 + timedelta(days=10))
    run_job(Job(kind="ingest", source="fl", scheduled_at=ctx.clock.now()), ctx)
    before = ctx.store.read_observations()
    settings = ctx.settings.model_copy(
        update={
            "retention": ctx.settings.retention.model_copy(
                update={"observations": timedelta(days=4)}
            )
        }
    )
    keep = JobContext(settings=settings, store=ctx.store, clock=ctx.clock)
    outcome = run_job(Job(kind="housekeeping", scheduled_at=ctx.clock.now()), keep)
    after = ctx.store.read_observations()
    cutoff = ctx.clock.now() - timedelta(days=4)
    assert outcome.detail["deleted"]["observations"] == before.height - after.height > 0
    assert after["ts"].min() >= cutoff
    assert before.filter(before["ts"] >= cutoff).height == after.height


def test_schedules_fire_on_epoch_multiples_in_a_fixed_order(ctx):
    by_id = {s.job_id: s for s in schedules(ctx.settings)}
    assert set(by_id) == {"ingest:fl", "predict", "evaluate", "retrain", "housekeeping"}
    assert by_id["predict"].fire_time(T0 + timedelta(minutes=59, seconds=3)) == T0
    assert by_id["retrain"].every is None  # the default cron, Sundays 03:00 UTC
    clock = FixedClock(T0)
    sim = SimulatedScheduler(ctx.settings, clock, start=T0)
    when, due = sim.pop_due()
    assert when == T0 and [s.job_id for s in due] == [
        "ingest:fl",
        "predict",
        "evaluate",
        "housekeeping",
    ]
    fires = []
    while not fires or fires[-1][0] < datetime(2013, 1, 8, tzinfo=UTC):
        fires.append(sim.pop_due())
    assert len(fires) == 7 * 24  # hourly predict and evaluate, daily ingest, one retrain
    retrains = [w for w, d in fires if any(s.kind == "retrain" for s in d)]
    assert retrains == [datetime(2013, 1, 6, 3, tzinfo=UTC)]  # the first Sunday
    assert clock.now() == fires[-1][0]


def test_a_bad_cron_is_a_config_error():
    settings = load_settings(None, schedule={"retrain_cron": "every sunday"})
    with pytest.raises(ConfigError, match="schedule.retrain_cron"):
        schedules(settings)


def test_readiness_names_what_is_not_ready(tmp_path):
    from forecaster.clock import WallClock
    from pipelines.daemon import Daemon

    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = Store(url)
    store.upgrade("0005")
    daemon = Daemon(load_settings(None, database_url=url), store, WallClock(), serve_http=False)
    assert daemon.readiness() == {
        "database": True,
        "migrations": False,
        "scheduler": False,
        "champion": False,
    }
    store.upgrade()
    assert daemon.readiness()["migrations"] is True
    gone = Store(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    away = Daemon(load_settings(None, database_url=gone.url), gone, WallClock(), serve_http=False)
    assert away.readiness()["database"] is False
    store.close()


def test_backtest_refuses_what_it_cannot_replay_with_a_clear_message(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    cfg = tmp_path / "forecaster.toml"
    cfg.write_text(
        f'database_url = "sqlite:///{tmp_path / "s.db"}"\n'
        '[sources.files]\nkind = "file"\npath = "/nowhere/*.csv"\n'
    )
    Store(f"sqlite:///{tmp_path / 's.db'}").upgrade()
    runner = CliRunner()
    base = ["--config", str(cfg), "backtest", "--from", "2013-01-01", "--to", "2013-02-01"]
    not_replay = runner.invoke(app, [*base, "--source", "files"])
    assert not_replay.exit_code != 0 and "Use a replay source" in not_replay.output
    unknown = runner.invoke(app, [*base, "--source", "nope"])
    assert unknown.exit_code != 0 and "nope" in unknown.output
    backwards = runner.invoke(
        app,
        [
            "--config",
            str(cfg),
            "backtest",
            "--source",
            "files",
            "--from",
            "2013-02-01",
            "--to",
            "2013-01-01",
        ],
    )
    assert backwards.exit_code != 0 and "must be after --from" in backwards.output
