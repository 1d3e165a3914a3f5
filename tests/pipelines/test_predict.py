"""Rolling prediction from saved state, against the store on SQLite and PostgreSQL."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
import sqlalchemy as sa
import torch

from forecaster import schema
from forecaster.checkpoints import save_checkpoint
from forecaster.config import SeriesDefaults
from forecaster.panel import Panel, Scalers
from forecaster.store import Store
from forecaster.training import TrainConfig, forward_window, train, trained_model
from pipelines import predict as predict_job
from pipelines.ingest import ingest_batch
from pipelines.predict import run_predict
from pipelines.sources.base import Batch, raw_frame

START = datetime(2024, 1, 1, tzinfo=UTC)
NOW = datetime(2025, 1, 1, tzinfo=UTC)
DAYS = 40
WARMUP = 72


def _values() -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(3)
    out = {}
    for s in range(2):
        t = torch.arange(DAYS * 24, dtype=torch.float32)
        v = 20 + 8 * torch.sin(2 * math.pi * t / 24 + s) + torch.randn(t.numel(), generator=g)
        out[f"sine.{s}"] = v.tolist()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model trained on the first 5 weeks (a module-wide fixture: training is the slow part)."""
    vals = _values()
    names = sorted(vals)
    panel = Panel(
        names=names,
        start=int(START.timestamp()),
        freq_seconds=3600,
        values=torch.tensor([vals[n][: 35 * 24] for n in names]),
    )
    # Two epochs of a toy model: its loss from every origin (origin_stride=1), so that its
    # forecasts are as good as the anomaly tests' bounds on false alarms assume.
    result = train(
        panel,
        TrainConfig(kind="gru", hidden=8, epochs=2, val_steps=168, stop_steps=168, origin_stride=1),
    )
    # The network serves every series here: the oracles compare with its own forecasts (the
    # per-series choice and the weights that follow tracked errors have their own tests).
    result.serving = ["model"] * len(names)
    result.serving_errors = []
    uri, sha = save_checkpoint(
        trained_model(result).to_checkpoint(), tmp_path_factory.mktemp("ckpt")
    )
    return result, uri, sha


def _ingest_days(store: Store, first: int, last: int, skip: tuple = ()) -> None:
    """Hours first*24 .. last*24 - 1 of every series, but the (series, hour) pairs in skip."""
    vals = _values()
    series, ts, value = [], [], []
    for name, v in vals.items():
        for h in range(first * 24, last * 24):
            if (name, h) in skip:
                continue
            series.append(name)
            ts.append((START + timedelta(hours=h)).isoformat())
            value.append(str(v[h]))
    ingest_batch(
        store, "t", Batch(raw_frame(series, ts, value, "t"), {"day": last}), SeriesDefaults(), NOW
    )


def _register(store: Store, trained, stage: str) -> int:
    """The trained checkpoint registered as a (new) model version."""
    _, uri, sha = trained
    with store.begin() as conn:
        return store.register_model_version(
            conn,
            kind="gru",
            config={},
            uri=uri,
            sha256=sha,
            trained_from=None,
            trained_to=None,
            metrics={},
            stage=stage,
        )


def _promote_with_states(store: Store, trained) -> int:
    """A second version whose states and first forecasts are built, then promoted: what the
    retraining policy does with a winning challenger."""
    version = _register(store, trained, "candidate")
    run_predict(store, warmup_steps=WARMUP, version_id=version)
    with store.begin() as conn:
        store.promote(conn, version)
    return version


def _setup(db_url, trained) -> Store:
    store = Store(db_url)
    store.upgrade()
    _register(store, trained, "champion")
    return store


def _forecasts(store: Store) -> list[tuple]:
    f = schema.forecasts
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                f.c.series_id,
                f.c.model,
                f.c.origin_ts,
                f.c.horizon_step,
                f.c.target_ts,
                f.c.yhat,
                f.c.yhat_lower,
                f.c.yhat_upper,
                f.c.interval_level,
                f.c.superseded,
            ).order_by(f.c.series_id, f.c.model, f.c.origin_ts, f.c.horizon_step, f.c.revision)
        ).all()
    return [tuple(r) for r in rows]


def _states(store: Store) -> list[tuple]:
    st, sn = schema.series_states, schema.state_snapshots
    with store.engine.connect() as conn:
        a = conn.execute(
            sa.select(st.c.model_version_id, st.c.series_id, st.c.state, st.c.state_ts).order_by(
                st.c.series_id
            )
        ).all()
        b = conn.execute(
            sa.select(sn.c.series_id, sn.c.window_id, sn.c.state).order_by(
                sn.c.series_id, sn.c.window_id
            )
        ).all()
    return [tuple(r) for r in a] + [tuple(r) for r in b]


def test_window_by_window_through_the_store_equals_one_pass(db_url, trained):
    result, _, _ = trained
    store = _setup(db_url, trained)
    _ingest_days(store, 0, 30)
    first = run_predict(store, warmup_steps=WARMUP)
    assert first.series_advanced == 2 and first.points_absorbed == 2 * WARMUP
    for day in range(30, DAYS):
        _ingest_days(store, day, day + 1)  # one window (a day) arrives
        s = run_predict(store, warmup_steps=WARMUP)
        assert s.points_absorbed == 2 * 24  # O(new points): only the day's 24 per series
    again = run_predict(store, warmup_steps=WARMUP)
    assert again.forecasts_written == 0 and again.points_absorbed == 0

    # One pass over the whole history from the same warm-up start, carried state.
    vals = _values()
    names = sorted(vals)
    values = torch.tensor([vals[n] for n in names])
    start = int(START.timestamp())
    lo = 30 * 24 - WARMUP
    scaled = result.scalers.transform(values)
    model = trained_model(result).model
    with torch.no_grad():
        pred, _, origins = forward_window(model, result.spec, scaled, start, lo, DAYS * 24, None)
    pred = result.scalers.inverse(pred)
    stored = pl.DataFrame(
        [(r[0], r[2], r[3], r[5]) for r in _forecasts(store) if r[1] == "v1"],
        schema={"series_id": pl.Int64, "origin": F_TS, "step": pl.Int64, "yhat": pl.Float64},
        orient="row",
    )
    assert stored.height == 2 * 11 * 24  # 11 origins: day 30's end, then one per new day
    ids = {r["name"]: r["id"] for r in store.prediction_targets()}
    for row in stored.iter_rows(named=True):
        s = names.index(next(n for n, i in ids.items() if i == row["series_id"]))
        t = (int(row["origin"].timestamp()) - start) // 3600
        want = float(
            pred[s, t - lo, row["step"] - 1, 1].clamp_min(0)
            if result.nonnegative
            else pred[s, t - lo, row["step"] - 1, 1]
        )
        assert row["yhat"] == pytest.approx(want, rel=1e-5, abs=1e-5)
    store.close()


F_TS = pl.Datetime("us", "UTC")


def test_a_crash_between_any_two_chunks_then_a_restart_equals_an_uninterrupted_run(
    db_url, trained, monkeypatch, tmp_path
):
    reference = _setup(f"sqlite:///{tmp_path / 'ref.db'}", trained)
    _ingest_days(reference, 0, 31)
    run_predict(reference, warmup_steps=WARMUP, chunk=1)

    store = _setup(db_url, trained)
    _ingest_days(store, 0, 31)
    real = Store.save_prediction
    calls = {"n": 0}

    def crash_second(self, conn, **kw):
        calls["n"] += 1
        written = real(self, conn, **kw)
        if calls["n"] == 2:
            raise RuntimeError("killed inside the second chunk's transaction")
        return written

    monkeypatch.setattr(Store, "save_prediction", crash_second)
    with pytest.raises(RuntimeError, match="killed"):
        run_predict(store, warmup_steps=WARMUP, chunk=1)
    assert len({r[0] for r in _forecasts(store)}) == 1  # the first chunk committed, the second not
    monkeypatch.setattr(Store, "save_prediction", real)
    run_predict(store, warmup_steps=WARMUP, chunk=1)
    run_predict(store, warmup_steps=WARMUP, chunk=1)  # a double fire changes nothing
    assert _forecasts(store) == _forecasts(reference)
    assert _states(store) == _states(reference)
    store.close()
    reference.close()


def test_views_have_the_same_columns_and_rows_on_both_dialects(db_url, trained, tmp_path):
    store = _setup(db_url, trained)
    _ingest_days(store, 0, 31)
    run_predict(store, warmup_steps=WARMUP)
    _ingest_days(store, 31, 32)  # actuals for the first forecasts
    with store.engine.connect() as conn:
        latest = conn.execute(
            sa.text("SELECT * FROM latest_forecasts ORDER BY series, model, target_ts")
        )
        cols_latest, n_latest = list(latest.keys()), len(latest.all())
        acc = conn.execute(
            sa.text(
                "SELECT series, model, horizon_step, actual, error, abs_error, inside_interval, pinball_loss "
                "FROM forecast_accuracy ORDER BY series, model, horizon_step"
            )
        ).all()
    assert cols_latest == [
        "series",
        "model",
        "model_version_id",
        "origin_ts",
        "target_ts",
        "horizon_step",
        "yhat",
        "yhat_lower",
        "yhat_upper",
        "interval_level",
        "created_at",
    ]
    # 2 series x 4 models (the version, its MSTL challenger, both naives) x 24 steps.
    assert n_latest == 2 * 4 * 24
    assert len(acc) == 2 * 4 * 24
    for _series, model, _step, _actual, err, abs_err, inside, pinball in acc:
        assert abs_err == pytest.approx(abs(err))
        if model == "v1":
            assert inside in (0, 1) and pinball >= 0
    # the same numbers on the other dialect: compare against a SQLite twin
    twin = _setup(f"sqlite:///{tmp_path / 'twin.db'}", trained)
    _ingest_days(twin, 0, 31)
    run_predict(twin, warmup_steps=WARMUP)
    _ingest_days(twin, 31, 32)
    with twin.engine.connect() as conn:
        acc_twin = conn.execute(
            sa.text(
                "SELECT series, model, horizon_step, actual, error, abs_error, inside_interval, pinball_loss "
                "FROM forecast_accuracy ORDER BY series, model, horizon_step"
            )
        ).all()
    for a, b in zip(acc, acc_twin, strict=True):
        assert a[:3] == b[:3] and a[6] == b[6]
        assert list(a[3:6]) == pytest.approx(list(b[3:6])) and (a[7] is None) == (b[7] is None)
    store.close()
    twin.close()


def test_no_champion_is_a_clear_error(sqlite_url):
    store = Store(sqlite_url)
    store.upgrade()
    with pytest.raises(predict_job.NoChampionError, match="forecaster train"):
        run_predict(store)


LATE = ("sine.0", 33 * 24 + 5)  # 05:00 on day 33; it arrives two days late, after day 35


def _late_point(store: Store, hour: int = LATE[1], shift: float = 0.0):
    ts = (START + timedelta(hours=hour)).isoformat()
    value = str(_values()[LATE[0]][hour] + shift)
    return ingest_batch(
        store,
        "t",
        Batch(raw_frame([LATE[0]], [ts], [value], "t"), {"late": hour}),
        SeriesDefaults(),
        NOW,
    )


def test_a_late_point_rewinds_the_state_as_if_it_had_arrived_on_time(db_url, trained, tmp_path):
    on_time = _setup(f"sqlite:///{tmp_path / 'on_time.db'}", trained)
    late = _setup(db_url, trained)
    for store, skip in ((on_time, ()), (late, (LATE,))):
        _ingest_days(store, 0, 30)
        run_predict(store, warmup_steps=WARMUP)
        for day in range(30, 36):
            _ingest_days(store, day, day + 1, skip=skip)
            assert run_predict(store, warmup_steps=WARMUP).series_rewound == 0
    assert _forecasts(late) != _forecasts(on_time)  # the missing point made a difference

    _late_point(late)
    summary = run_predict(late, warmup_steps=WARMUP)
    assert summary.series_rewound == 1 and summary.series_advanced == 0
    # Origins at or after the late point: the ends of days 33, 34 and 35, x 4 models (the
    # version, its challenger, both naives) x 24.
    assert summary.forecasts_written == 3 * 4 * 24

    current = [r for r in _forecasts(late) if not r[9]]
    want = _forecasts(on_time)
    assert [r[:5] for r in current] == [r[:5] for r in want]
    for got, ref in zip(current, want, strict=True):
        assert [x is None for x in got[5:8]] == [x is None for x in ref[5:8]]
        nums = [(a, b) for a, b in zip(got[5:8], ref[5:8], strict=True) if a is not None]
        assert [a for a, _ in nums] == pytest.approx([b for _, b in nums], rel=1e-5, abs=1e-5)
    stale = [r for r in _forecasts(late) if r[9]]
    ids = {r["name"]: r["id"] for r in late.prediction_targets()}
    # All but one: the daily naive of day 33's end could not copy the missing point.
    assert len(stale) == 3 * 4 * 24 - 1 and {r[0] for r in stale} == {ids[LATE[0]]}
    assert min(r[2] for r in stale) == START + timedelta(hours=34 * 24 - 1)  # end of day 33

    (got_states, want_states) = (_states(late), _states(on_time))
    assert [r[:2] for r in got_states] == [r[:2] for r in want_states]
    for got, ref in zip(got_states, want_states, strict=True):
        a = torch.frombuffer(bytearray(got[2]), dtype=torch.float32)
        b = torch.frombuffer(bytearray(ref[2]), dtype=torch.float32)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # Handled once: the mark is cleared with the commit, so a re-run does nothing...
    again = run_predict(late, warmup_steps=WARMUP)
    assert again.series_rewound == 0 and again.forecasts_written == 0
    # ...a source re-sending the same point changes nothing and marks nothing...
    _late_point(late)
    assert run_predict(late, warmup_steps=WARMUP).series_rewound == 0
    # ...and a point older than the lateness bound (7 days) is quarantined, not absorbed
    # (one that differs from the stored value: the same value is recognised as stored).
    result = _late_point(late, hour=20 * 24, shift=1.0)
    assert result.quarantined == {"too_late": 1}
    assert run_predict(late, warmup_steps=WARMUP).series_rewound == 0
    on_time.close()
    late.close()


def test_lags_read_from_window_copies_equal_lags_read_from_observations(
    db_url, trained, tmp_path, monkeypatch
):
    """A store that reads the head's lags from its window copies (schema.window_values)
    and one whose copies are wiped before every run (so it reads them from observations)
    store the same forecasts and states, bit for bit, through a late point in a window
    already copied and read again as a lag afterwards; and once the lags' windows are
    copied, a cycle reads only its new window's points from observations."""
    copies = _setup(db_url, trained)
    plain = _setup(f"sqlite:///{tmp_path / 'plain.db'}", trained)
    reads: list[list[tuple[datetime, datetime]]] = []
    real = Store.recent_values

    def spy(self, series_ids, spans, **kw):
        if self is copies:
            reads.append(list(spans))
        return real(self, series_ids, spans, **kw)

    monkeypatch.setattr(Store, "recent_values", spy)
    wv = schema.window_values
    late_hour = 32 * 24 + 5  # day 32: copied by day 33's cycle, its week lag on day 38
    for store in (copies, plain):
        _ingest_days(store, 0, 30)
    for day in range(29, DAYS):
        for store in (copies, plain):
            if day == 35:
                _late_point(store, hour=late_hour, shift=3.0)
            if day > 29:
                _ingest_days(store, day, day + 1)
            if store is plain:
                with store.begin() as conn:
                    conn.execute(sa.delete(wv))
            if store is copies:
                reads.clear()
            summary = run_predict(store, warmup_steps=WARMUP)
            assert summary.series_rewound == (1 if day == 35 else 0)
        if day >= 36:  # lags copied: only the day's own points come from observations
            first = START + timedelta(days=day)
            assert reads == [[(first, first + timedelta(hours=23))]]
    assert _forecasts(copies) == _forecasts(plain)
    assert _states(copies) == _states(plain)
    with copies.engine.connect() as conn:
        stored = conn.execute(sa.select(wv.c.series_id, wv.c.window_id, wv.c.points)).all()
    # Kept over the lags' reach: 22 days and one more window before the newest.
    day0 = int(START.timestamp()) // 86400
    assert min(w for _, w, _ in stored) == day0 + (DAYS - 1) - 23
    want = _values()
    ids = {r["id"]: r["name"] for r in copies.prediction_targets()}
    for sid, wid, points in stored:  # each copy equals the points, the late one included
        hours = range(
            wid * 24 - int(START.timestamp()) // 3600,
            (wid + 1) * 24 - int(START.timestamp()) // 3600,
        )
        vals = [
            want[ids[sid]][h] + (3.0 if (ids[sid], h) == (LATE[0], late_hour) else 0.0)
            for h in hours
        ]
        assert (
            torch.frombuffer(bytearray(points), dtype=torch.float32).tolist()
            == torch.tensor(vals).tolist()
        )
    copies.close()
    plain.close()


def _current(store: Store) -> dict[tuple, tuple]:
    """(series_id, model, origin_ts, step) -> (yhat, lower, upper) of the model's current
    rows (not the baselines')."""
    return {r[:4]: r[5:8] for r in _forecasts(store) if not r[9] and r[1].startswith("v")}


def test_blend_weights_tracked_through_the_store_depend_on_the_points_alone(
    db_url, trained, tmp_path
):
    """The trackers of the blend's members (forecaster.serving) travel in the saved states:
    predict run every day, run once over six days, or rewound by a late point serve the
    same weights; and they move the forecast away from the holdout's weights."""
    result, _, _ = trained
    model = trained_model(result)
    names = list(result.names)
    # The holdout found the network twice as accurate as the daily naive; on these series
    # the two score alike (about 1.1 each), so the naive's weight grows as days are tracked.
    model.meta["serving"] = dict.fromkeys(names, {"model": 16 / 17, "naive_daily": 1 / 17})
    model.meta["serving_errors"] = dict.fromkeys(names, {"model": 1.0, "naive_daily": 2.0})
    tracked = (result, *save_checkpoint(model.to_checkpoint(), tmp_path / "tracked"))
    del model.meta["serving_errors"]
    fixed = (result, *save_checkpoint(model.to_checkpoint(), tmp_path / "fixed"))
    daily = _setup(db_url, tracked)
    runs = {
        "late": _setup(f"sqlite:///{tmp_path / 'late.db'}", tracked),
        "bulk": _setup(f"sqlite:///{tmp_path / 'bulk.db'}", tracked),
        "fixed": _setup(f"sqlite:///{tmp_path / 'fixed.db'}", fixed),
    }
    for name, store in [("daily", daily), *runs.items()]:
        _ingest_days(store, 0, 30)
        run_predict(store, warmup_steps=WARMUP)
        if name == "bulk":
            _ingest_days(store, 30, 36)
            run_predict(store, warmup_steps=WARMUP)
            continue
        for day in range(30, 36):
            _ingest_days(store, day, day + 1, skip=(LATE,) if name == "late" else ())
            run_predict(store, warmup_steps=WARMUP)
    _late_point(runs["late"])
    assert run_predict(runs["late"], warmup_steps=WARMUP).series_rewound == 1

    want = _current(daily)
    last = max(k[2] for k in want)
    for name in ("late", "bulk"):
        got = _current(runs[name])
        keys = [k for k in want if name == "late" or k[2] == last]
        assert set(keys) <= set(got), name
        for k in keys:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-5), (name, k)
    fixed_now = _current(runs["fixed"])
    moved = [abs(want[k][0] - fixed_now[k][0]) for k in want if k[2] == last]
    assert max(moved) > 1e-3  # the tracked errors changed the weights
    # ...and the weights that served each newest forecast are recorded beside the state.
    recorded = daily.served_weights(1)
    assert set(recorded) == set(names)
    for weights in recorded.values():
        assert set(weights) == {"model", "naive_daily"}
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-5)
        assert weights["naive_daily"] > 1.5 / 17
    assert runs["fixed"].served_weights(1) == {}  # weights that do not move: not recorded
    daily.close()
    for store in runs.values():
        store.close()


def test_a_crash_while_re_forecasting_a_late_point_then_a_restart_loses_nothing(
    db_url, trained, monkeypatch, tmp_path
):
    reference = _setup(f"sqlite:///{tmp_path / 'ref.db'}", trained)
    store = _setup(db_url, trained)
    for s in (reference, store):
        _ingest_days(s, 0, 34, skip=(LATE,))
        run_predict(s, warmup_steps=WARMUP)
        _late_point(s)
    run_predict(reference, warmup_steps=WARMUP)

    real = Store.save_prediction

    def crash(self, conn, **kw):
        real(self, conn, **kw)
        raise RuntimeError("killed inside the re-forecast's transaction")

    monkeypatch.setattr(Store, "save_prediction", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run_predict(store, warmup_steps=WARMUP)
    monkeypatch.setattr(Store, "save_prediction", real)
    assert run_predict(store, warmup_steps=WARMUP).series_rewound == 1
    assert run_predict(store, warmup_steps=WARMUP).series_rewound == 0
    strip = lambda rows: [r[:5] + (round(r[5], 4), r[9]) for r in rows]  # noqa: E731
    assert strip(_forecasts(store)) == strip(_forecasts(reference))
    store.close()
    reference.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_predict_on_cuda_equals_predict_on_cpu(tmp_path, trained):
    stores = {}
    for device in ("cpu", "cuda"):
        store = _setup(f"sqlite:///{tmp_path / device}.db", trained)
        _ingest_days(store, 0, 30)
        run_predict(store, warmup_steps=WARMUP, device=device)
        _ingest_days(store, 30, 32)
        run_predict(store, warmup_steps=WARMUP, device=device)
        stores[device] = store
    cpu, gpu = (_forecasts(stores[d]) for d in ("cpu", "cuda"))
    assert [r[:5] for r in cpu] == [r[:5] for r in gpu]
    for a, b in zip(cpu, gpu, strict=True):
        nums = [(x, y) for x, y in zip(a[5:8], b[5:8], strict=True) if x is not None]
        assert [x for x, _ in nums] == pytest.approx([y for _, y in nums], rel=1e-4, abs=1e-4)
    predict_job._load.cache_clear()  # the cached model was moved to the GPU


@pytest.mark.parametrize(
    ("freq", "seasons", "warmup", "expected"),
    [
        (3600, None, None, 336),  # two weeks of hours
        (300, None, None, 2 * 2016),  # two weeks of 5-minute steps (was 336: 28 hours)
        (1800, None, timedelta(days=14), 672),  # the setting, in the model's own step
        (3600, (8, 40), None, 80),  # business hours: two of the model's weeks
    ],
)
def test_the_warm_up_is_two_weeks_in_the_models_own_steps(freq, seasons, warmup, expected):
    from forecaster.features import FeatureSpec
    from pipelines.predict import warmup_steps_for

    spec = FeatureSpec(freq_seconds=freq, seasons=seasons)
    assert warmup_steps_for(spec, warmup) == expected


def test_a_series_served_by_a_naive_gets_its_median_and_the_models_band_shape(
    sqlite_url, trained, tmp_path
):
    """The version's per-series choice (forecaster.serving) is what predict writes: a series
    served by the weekly naive has that naive's value as its median, the network's quantile
    offsets around it; the other series keeps the network's forecast."""
    result, uri, sha = trained
    model = trained_model(result)
    model.meta["serving"] = {"sine.0": "naive_weekly", "sine.1": "model"}
    uri2, sha2 = save_checkpoint(model.to_checkpoint(), tmp_path / "served")
    store = _setup(sqlite_url, (result, uri2, sha2))
    model.meta["serving"] = {"sine.0": "model", "sine.1": "model"}
    uri3, sha3 = save_checkpoint(model.to_checkpoint(), tmp_path / "plain")
    plain = Store(f"sqlite:///{tmp_path / 'plain.db'}")
    plain.upgrade()
    _register(plain, (result, uri3, sha3), "champion")
    for s in (store, plain):
        _ingest_days(s, 0, 21)
        run_predict(s, warmup_steps=WARMUP)
    f = schema.forecasts
    q = sa.select(
        f.c.model,
        f.c.horizon_step,
        f.c.yhat,
        f.c.raw_lower,
        f.c.raw_upper,
        schema.series.c.name,
    ).join(schema.series, schema.series.c.id == f.c.series_id)
    rows = {}
    for label, s in (("served", store), ("plain", plain)):
        with s.engine.connect() as conn:
            for m, h, y, lo, hi, name in conn.execute(q):
                rows[(label, m, name, h)] = (y, lo, hi)
    for h in range(1, 25):
        naive = rows[("served", "seasonal_naive_weekly", "sine.0", h)][0]
        y, lo, hi = rows[("served", "v1", "sine.0", h)]
        y0, lo0, hi0 = rows[("plain", "v1", "sine.0", h)]
        assert y == pytest.approx(naive)
        # (a model's values are stored at float32 precision: about 1e-6 at these sizes)
        assert (lo - y, hi - y) == pytest.approx((lo0 - y0, hi0 - y0), abs=1e-5)
        assert rows[("served", "v1", "sine.1", h)] == pytest.approx(
            rows[("plain", "v1", "sine.1", h)]
        )
    store.close()
    plain.close()


def test_a_series_served_by_the_challenger_gets_its_forecast_from_a_state_saved_with_the_networks(
    db_url, trained, tmp_path
):
    """The MSTL challenger (forecaster.stats) fitted with the version starts from the state
    its fit left and advances over the new points with the network's state, in the same
    rows: a series it serves gets exactly what one pass of the challenger over the same
    points gives from each origin, day by day through the store."""
    import numpy as np

    from forecaster import stats
    from forecaster.trained import TrainedModel

    result, uri, sha = trained
    model = trained_model(result)
    assert model.stat is not None  # fitted by default
    model.meta["serving"] = {"sine.0": "mstl", "sine.1": "model"}
    uri2, sha2 = save_checkpoint(model.to_checkpoint(), tmp_path / "mstl")
    store = _setup(db_url, (result, uri2, sha2))
    _ingest_days(store, 0, 36)
    run_predict(store, warmup_steps=WARMUP)
    for day in range(36, DAYS):
        _ingest_days(store, day, day + 1)
        run_predict(store, warmup_steps=WARMUP)
    with store.engine.connect() as conn:
        shapes = conn.execute(sa.select(schema.series_states.c.shape)).scalars().all()
    assert all(len(s) == 4 for s in shapes)  # the network's (parts, layers, hidden), + width

    loaded = TrainedModel.from_checkpoint(model.to_checkpoint())
    row = loaded.names.index("sine.0")
    params = loaded.stat.params.take(np.array([row]))
    fitted_to = int(loaded.stat.step[row])  # the epoch hour its fit's state holds up to
    values = np.array([_values()["sine.0"]])
    start_hour = int(START.timestamp()) // 3600
    held = fitted_to - start_hour + 1  # grid index of the first point the state has not seen
    _, pred = stats.update(
        params, loaded.stat.state[[row]], values[:, held:], fitted_to + 1, horizon=24
    )
    ids = {r["name"]: r["id"] for r in store.prediction_targets()}
    stored = [r for r in _forecasts(store) if r[1] == "v1" and r[0] == ids["sine.0"]]
    assert len(stored) == 5 * 24  # the end of day 35, then one origin per new day
    for _sid, _, origin, step, _, yhat, *_ in stored:
        t = (int(origin.timestamp()) // 3600) - start_hour
        want = pred[0, t - held, step - 1]
        assert yhat == pytest.approx(max(want, 0.0) if result.nonnegative else want, rel=1e-5)
    # The challenger's own forecasts are stored beside the version's, as model "mstl" (no
    # model_version_id, like the baselines), for every series: where it alone serves, the
    # same rows as the version's; elsewhere the network's band moved to its median (the
    # same width at every step).
    rows = _forecasts(store)
    with store.engine.connect() as conn:
        f = schema.forecasts
        versions = dict(conn.execute(sa.select(f.c.model, f.c.model_version_id).distinct()).all())
    assert versions["v1"] == 1 and versions["mstl"] is None
    mstl = {(r[0], r[2], r[3]): r[5:9] for r in rows if r[1] == "mstl"}
    served = {(r[0], r[2], r[3]): r[5:9] for r in rows if r[1] == "v1"}
    assert mstl.keys() == served.keys() and len(mstl) == 2 * 5 * 24
    for key, (yhat, lo, hi, level) in mstl.items():
        v_yhat, v_lo, v_hi, v_level = served[key]
        assert level == v_level == pytest.approx(0.8)
        if key[0] == ids["sine.0"]:
            assert (yhat, lo, hi) == pytest.approx((v_yhat, v_lo, v_hi), rel=1e-9, abs=1e-9)
        elif not result.nonnegative or v_lo > 0:  # a band cut at zero has a narrower width
            assert hi - lo == pytest.approx(v_hi - v_lo, rel=1e-6, abs=1e-6)
    assert {r[1] for r in rows} == {"v1", "mstl", "seasonal_naive_daily", "seasonal_naive_weekly"}
    store.close()


def _ingest_series(store: Store, name: str, values: list[float], first: int, last: int) -> None:
    """Hours first .. last - 1 of one series."""
    hours = range(first, last)
    ts = [(START + timedelta(hours=h)).isoformat() for h in hours]
    ingest_batch(
        store,
        "t",
        Batch(raw_frame([name] * len(ts), ts, [str(values[h]) for h in hours], "t"), {"h": last}),
        SeriesDefaults(),
        NOW,
    )


def test_a_series_new_to_the_model_is_served_at_once_with_its_own_scaler(db_url, trained):
    """A series that appears after training is forecast at the next predict: the same
    network, scaled by the robust scaler of its own stored points, fitted once and kept, so
    each later window is absorbed from its saved state like any other series'."""
    result, _, _ = trained
    store = _setup(db_url, trained)
    _ingest_days(store, 0, 30)
    # The same shape in other units (x10 + 500), stored from day 20 on only.
    new = [500 + 10 * v for v in _values()["sine.0"]]
    _ingest_series(store, "other.0", new, 20 * 24, 30 * 24)
    first = run_predict(store, warmup_steps=WARMUP)
    assert first.series_advanced == 3 and first.untrained_advanced == 1
    assert "1 of them new to the model" in first.line()
    sid = {r["name"]: r["id"] for r in store.prediction_targets()}["other.0"]
    scaler = store.series_scalers(1, [sid])[sid]
    own = Scalers.fit(torch.tensor([new[30 * 24 - WARMUP : 30 * 24]]))
    assert scaler["center"] == pytest.approx(float(own.center[0]), rel=1e-6)
    assert scaler["scale"] == pytest.approx(float(own.scale[0]), rel=1e-6)
    assert scaler["n_points"] == WARMUP
    assert store.untrained_series(1) == ["other.0"]
    for day in range(30, 33):
        _ingest_days(store, day, day + 1)
        _ingest_series(store, "other.0", new, day * 24, (day + 1) * 24)
        s = run_predict(store, warmup_steps=WARMUP)
        assert s.points_absorbed == 3 * 24 and s.untrained_advanced == 1
    assert store.series_scalers(1, [sid])[sid] == scaler  # fitted once

    # Oracle: one pass of the network over its values, scaled by that scaler.
    start = int(START.timestamp())
    lo, hi = 30 * 24 - WARMUP, 33 * 24
    stored_values = torch.tensor([new])
    stored_values[:, : 20 * 24] = float("nan")  # before the series was stored
    scaled = (stored_values - scaler["center"]) / scaler["scale"]
    with torch.no_grad():
        pred, _, _ = forward_window(
            trained_model(result).model, result.spec, scaled.float(), start, lo, hi, None
        )
    pred = pred * scaler["scale"] + scaler["center"]
    stored = [r for r in _forecasts(store) if r[0] == sid and r[1] == "v1"]
    assert len(stored) == 4 * 24  # day 30's end, then one origin per new day
    for _, _, origin, step, _, yhat, *_ in stored:
        t = (int(origin.replace(tzinfo=UTC).timestamp()) - start) // 3600
        want = float(pred[0, t - lo, step - 1, 1].clamp_min(0))
        assert yhat == pytest.approx(want, rel=1e-5, abs=1e-4)
    store.close()


def test_a_crash_after_a_new_series_scaler_is_kept_then_a_restart_equals_an_uninterrupted_run(
    db_url, trained, monkeypatch, tmp_path
):
    new = [500 + 10 * v for v in _values()["sine.0"]]
    reference = _setup(f"sqlite:///{tmp_path / 'ref.db'}", trained)
    store = _setup(db_url, trained)
    for s in (reference, store):
        _ingest_days(s, 0, 30)
        _ingest_series(s, "other.0", new, 20 * 24, 30 * 24)
    run_predict(reference, warmup_steps=WARMUP)
    real = Store.save_prediction

    def crash_on_the_new_series(self, conn, **kw):
        written = real(self, conn, **kw)
        if self.untrained_series(1):  # its scaler is kept: its chunk is the one dying
            raise RuntimeError("killed inside the new series' transaction")
        return written

    monkeypatch.setattr(Store, "save_prediction", crash_on_the_new_series)
    with pytest.raises(RuntimeError, match="killed"):
        run_predict(store, warmup_steps=WARMUP)
    monkeypatch.setattr(Store, "save_prediction", real)
    assert store.untrained_series(1) == ["other.0"]  # kept, though its chunk rolled back
    run_predict(store, warmup_steps=WARMUP)
    assert _forecasts(store) == _forecasts(reference)
    assert _states(store) == _states(reference)
    for s in (reference, store):  # and from then on, window by window
        _ingest_days(s, 30, 31)
        _ingest_series(s, "other.0", new, 30 * 24, 31 * 24)
        run_predict(s, warmup_steps=WARMUP)
    assert _forecasts(store) == _forecasts(reference)
    assert _states(store) == _states(reference)
    store.close()
    reference.close()
