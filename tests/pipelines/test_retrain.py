"""The retraining policy on real data (two bundled series, a tiny model): a first model is
promoted with its states built; a crippled challenger is not promoted; a better one is,
after its states; a retrain killed half way is finished, not trained twice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from forecaster import schema
from forecaster.clock import FixedClock
from forecaster.config import load_settings
from forecaster.store import Store
from pipelines import retrain as retrain_module
from pipelines.evaluate import run_evaluate
from pipelines.jobs import Job, JobContext, run_job
from pipelines.retrain import run_retrain

T0 = datetime(2013, 1, 1, tzinfo=UTC)
# One epoch from scratch at lr 1: AdamW moves every weight by about 1, a wrecked model
# (about 4x the champion's holdout MASE) whose training loss is still finite.
CRIPPLED = {"lr": 1.0, "epochs": 1}


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
        training={"hidden": 8},
        retrain={
            "epochs": 3,
            "history": "8w",
            "min_history": "4w",
            "holdout": "3d",
            "warmup": "1w",
            "min_gain": 0.0,
        },
    )
    context = JobContext(settings=settings, store=store, clock=FixedClock(T0))
    run_job(Job(kind="ingest", source="fl", scheduled_at=T0), context)  # anchors the replay
    yield context
    store.close()


def _ingest_until(ctx, day: int) -> None:
    ctx.clock.set(T0 + timedelta(days=day))
    run_job(Job(kind="ingest", source="fl", scheduled_at=ctx.clock.now()), ctx)


def _states(store: Store, version: int) -> dict[int, datetime]:
    st = schema.series_states
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(st.c.series_id, st.c.state_ts).where(st.c.model_version_id == version)
        )
        return {sid: ts for sid, ts in rows}


def _retrain(ctx, **kw):
    return run_retrain(ctx.store, ctx.settings, now=ctx.clock.now(), **kw)


def test_too_little_history_is_skipped(ctx):
    _ingest_until(ctx, 20)
    outcome = _retrain(ctx)
    assert outcome.decision == "skipped" and "needs" in outcome.reason
    assert ctx.store.list_model_versions() == []


def test_the_first_model_is_promoted_with_its_states_built(ctx):
    _ingest_until(ctx, 30)
    outcome = _retrain(ctx)
    assert outcome.decision == "promoted" and outcome.reason == "the first model"
    champion = ctx.store.champion()
    assert champion["id"] == outcome.challenger_id
    marks = {t["id"]: t["watermark"] for t in ctx.store.prediction_targets()}
    assert _states(ctx.store, champion["id"]) == marks  # built up to every watermark
    assert len(ctx.store.latest_forecasts("flights.JFK")) > 0  # it serves at once
    again = run_job(Job(kind="predict", scheduled_at=ctx.clock.now()), ctx)
    assert again.detail["forecasts_written"] == 0  # nothing new to absorb


def test_a_crippled_challenger_is_not_promoted(ctx):
    _ingest_until(ctx, 30)
    first = _retrain(ctx)
    _ingest_until(ctx, 37)
    run_job(Job(kind="predict", scheduled_at=ctx.clock.now()), ctx)
    outcome = _retrain(ctx, full=True, config_override=CRIPPLED)
    assert outcome.decision == "kept" and "not better" in outcome.reason
    assert outcome.challenger_mase > outcome.champion_mase
    assert ctx.store.champion()["id"] == first.challenger_id
    loser = ctx.store.model_version(outcome.challenger_id)
    assert loser["stage"] == "candidate"
    assert loser["metrics"]["holdout"]["challenger"] == pytest.approx(outcome.challenger_mase)
    assert _states(ctx.store, outcome.challenger_id) == {}  # never served, no states


def test_a_better_challenger_is_promoted_after_its_states_are_built(ctx):
    _ingest_until(ctx, 30)
    weak = _retrain(ctx, full=True, config_override=CRIPPLED)  # a wrecked first champion
    assert weak.decision == "promoted"
    for day in range(31, 38):  # a week of forecasts scored: the champion's bands calibrated
        _ingest_until(ctx, day)
        run_job(Job(kind="predict", scheduled_at=ctx.clock.now()), ctx)
        run_evaluate(ctx.store, prior_weight=5)
    weak_calibration = ctx.store.calibration_for(f"v{weak.challenger_id}")
    assert len(weak_calibration) == 24
    outcome = _retrain(ctx, full=True)
    assert outcome.decision == "promoted", outcome.line()
    # The new champion's first bands use the old champion's corrections.
    assert ctx.store.calibration_for(f"v{outcome.challenger_id}") == weak_calibration
    assert outcome.challenger_mase < outcome.champion_mase
    assert ctx.store.champion()["id"] == outcome.challenger_id
    assert ctx.store.model_version(weak.challenger_id)["stage"] == "retired"
    marks = {t["id"]: t["watermark"] for t in ctx.store.prediction_targets()}
    assert _states(ctx.store, outcome.challenger_id) == marks


def test_a_retrain_killed_after_registering_is_finished_not_repeated(ctx, monkeypatch):
    _ingest_until(ctx, 30)

    def killed(*_a, **_k):
        raise RuntimeError("killed while building the states")

    monkeypatch.setattr(retrain_module, "run_predict", killed)
    with pytest.raises(RuntimeError, match="killed"):
        _retrain(ctx, run_key="retrain@x")
    (version,) = ctx.store.list_model_versions()
    assert version["stage"] == "candidate" and ctx.store.champion() is None
    monkeypatch.undo()
    outcome = _retrain(ctx, run_key="retrain@x")
    assert outcome.decision == "promoted" and outcome.challenger_id == version["id"]
    assert [v["id"] for v in ctx.store.list_model_versions()] == [version["id"]]
    again = _retrain(ctx, run_key="retrain@x")
    assert again.decision == "promoted" and again.reason == "promoted before the restart"
