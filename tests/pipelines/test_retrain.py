"""The retraining policy on real data (two bundled series, a tiny model): a first model is
promoted with its states built; a crippled challenger is not promoted; a better one is,
after its states; a retrain killed half way is finished, not trained twice. Versions are
compared on what they serve (forecaster.holdout), replayed as the predict job serves it."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
import torch

from forecaster import schema, training
from forecaster.clock import FixedClock
from forecaster.config import load_settings
from forecaster.holdout import stat_forecasts
from forecaster.store import Store
from pipelines import retrain as retrain_module
from pipelines.evaluate import run_evaluate
from pipelines.jobs import Job, JobContext, run_job
from pipelines.retrain import _load, run_retrain
from pipelines.train import load_panel

T0 = datetime(2013, 1, 1, tzinfo=UTC)
# One epoch from scratch at lr 1: AdamW moves every weight by about 1, a wrecked model
# (about 4x the champion's holdout MASE) whose training loss is still finite.
CRIPPLED = {"lr": 1.0, "epochs": 1}


@contextmanager
def _serving(monkeypatch, member: str):
    """Within: a trained version serves `member` for every series (instead of the
    per-series choice); a wrecked network must be what is served to lose."""
    with monkeypatch.context() as m:
        m.setattr(
            training,
            "holdout_choices",
            lambda *a, **k: [[member] * len(a[2].names) for _ in a[6]],
        )
        yield


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


def test_a_crippled_challenger_is_not_promoted(ctx, monkeypatch):
    _ingest_until(ctx, 30)
    first = _retrain(ctx)
    _ingest_until(ctx, 37)
    run_job(Job(kind="predict", scheduled_at=ctx.clock.now()), ctx)
    with _serving(monkeypatch, "model"):
        outcome = _retrain(ctx, full=True, config_override=CRIPPLED)
    assert outcome.decision == "kept" and "not better" in outcome.reason
    assert outcome.challenger_mase > outcome.champion_mase
    assert ctx.store.champion()["id"] == first.challenger_id
    loser = ctx.store.model_version(outcome.challenger_id)
    assert loser["stage"] == "candidate"
    assert loser["metrics"]["holdout"]["challenger"] == pytest.approx(outcome.challenger_mase)
    assert _states(ctx.store, outcome.challenger_id) == {}  # never served, no states


def test_a_better_challenger_is_promoted_after_its_states_are_built(ctx, monkeypatch):
    _ingest_until(ctx, 30)
    with _serving(monkeypatch, "model"):  # a wrecked first champion, serving its network
        weak = _retrain(ctx, full=True, config_override=CRIPPLED)
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


def test_the_champion_is_scored_on_what_predict_served(ctx, monkeypatch):
    """Retraining replays what the champion serves; for a version served by its MSTL state
    that replay gives, at each origin the predict job ran, the very forecasts it stored
    (its state rolled on from the fit, over the same points)."""
    _ingest_until(ctx, 30)
    with _serving(monkeypatch, "mstl"):
        first = _retrain(ctx)
    assert first.decision == "promoted"
    for day in range(31, 35):
        _ingest_until(ctx, day)
        run_job(Job(kind="predict", scheduled_at=ctx.clock.now()), ctx)
    f, s = schema.forecasts, schema.series
    with ctx.store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(s.c.name, f.c.origin_ts, f.c.horizon_step, f.c.yhat)
            .join(s, s.c.id == f.c.series_id)
            .where(f.c.model == f"v{first.challenger_id}", f.c.origin_ts >= T0 + timedelta(days=30))
        ).all()
    # Two series, 24 steps from five daily origins: the promotion's and four predict runs'.
    assert len(rows) == 2 * 5 * 24
    trained = _load(ctx.store.champion())
    panel = load_panel(ctx.store, until=ctx.clock.now())
    origins = torch.arange(panel.n_steps)
    c = trained.stat
    rows_of = [trained.names.index(n) for n in panel.names]
    replayed = stat_forecasts(
        c.params.take(rows_of),
        c.state[rows_of],
        c.step[rows_of],
        panel.values,
        panel.start // panel.freq_seconds,
        origins[int(c.step.min()) - panel.start // panel.freq_seconds :],
        trained.spec.horizon,
    ).clamp_min(0.0)
    first_origin = int(c.step.min()) - panel.start // panel.freq_seconds
    for name, origin_ts, step, yhat in rows:
        origin = int((origin_ts.replace(tzinfo=UTC).timestamp() - panel.start) // 3600)
        expected = float(replayed[panel.names.index(name), origin - first_origin, step - 1])
        assert yhat == pytest.approx(expected, rel=1e-4, abs=1e-3), (name, origin_ts, step)
