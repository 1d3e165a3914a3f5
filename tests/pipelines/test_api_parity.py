"""The jobs and the in-memory API are one code path: what `forecaster train`, then ingest,
evaluate and predict store in `latest_forecasts` is what forecaster.api forecasts from the
same data, bands (calibration included) and all."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from forecaster.api import Forecaster
from forecaster.config import Settings, TrainingSettings
from forecaster.store import Store
from pipelines.evaluate import run_evaluate
from pipelines.ingest import ingest_batch
from pipelines.predict import run_predict
from pipelines.sources.base import Batch, raw_frame
from pipelines.train import run_training, train_config

START = datetime(2024, 1, 1, tzinfo=UTC)
OPTIONS = {"hidden": 8, "epochs": 3, "horizon": 24}


def _data(days: int = 33) -> pl.DataFrame:
    rng = np.random.default_rng(3)
    t = np.arange(days * 24)
    parts = [
        pl.DataFrame(
            {
                "series": name,
                "ts": [START + timedelta(hours=int(h)) for h in t],
                "value": level
                + 0.3 * level * np.sin(2 * np.pi * t / 24)
                + rng.normal(0, 1, t.size),
            }
        )
        for name, level in (("a", 20.0), ("b", 300.0))
    ]
    return pl.concat(parts).with_columns(pl.col("ts").dt.cast_time_unit("us"))


def _ingest(store: Store, settings: Settings, frame: pl.DataFrame) -> None:
    now = frame["ts"].max()
    raw = raw_frame(frame["series"], frame["ts"], frame["value"], "parity")
    ingest_batch(store, "parity", Batch(raw, {"until": str(now)}), settings.series, now)


def _served(store: Store, model: str, after: datetime) -> pl.DataFrame:
    """The model's rows of the latest_forecasts view for the targets after `after`."""
    rows = [
        {k: r[k] for k in ("series", "yhat", "yhat_lower", "yhat_upper")}
        | {"ts": r["target_ts"].astimezone(UTC)}
        for name in ("a", "b")
        for r in store.latest_forecasts(name)
        if r["model"] == model and r["target_ts"].astimezone(UTC) > after
    ]
    return pl.DataFrame(rows).with_columns(pl.col("ts").dt.cast_time_unit("us"))


def _same(api: pl.DataFrame, stored: pl.DataFrame) -> None:
    joined = api.join(stored, on=["series", "ts"], suffix="_db")
    assert joined.height == api.height == stored.height == 2 * OPTIONS["horizon"]
    for col in ("yhat", "yhat_lower", "yhat_upper"):
        np.testing.assert_allclose(
            joined[f"{col}_db"].to_numpy(), joined[col].to_numpy(), rtol=1e-5, atol=1e-6
        )


def test_the_jobs_store_what_the_api_forecasts(db_url, tmp_path):
    data = _data()
    cut = START + timedelta(days=30)
    history = data.filter(pl.col("ts") < cut)
    api = Forecaster("gru", **OPTIONS).fit(history)

    settings = Settings(
        database_url=db_url,
        checkpoint_dir=str(tmp_path / "ckpt"),
        device="cpu",
        training=TrainingSettings(kind="gru", **OPTIONS),
    )
    store = Store(db_url)
    store.upgrade()
    try:
        _ingest(store, settings, history)
        version = run_training(
            store, train_config(settings, store), checkpoint_dir=settings.checkpoint_dir
        )
        model = f"v{version.version_id}"
        run_predict(store)
        columns = ("series", "ts", "yhat", "yhat_lower", "yhat_upper")
        _same(api.forecast().select(columns), _served(store, model, history["ts"].max()))
        # Day by day: the API's update against the jobs' ingest, evaluate (scores the day's
        # actuals, moves the bands) and predict from the saved states.
        for day in range(3):
            lo, hi = cut + timedelta(days=day), cut + timedelta(days=day + 1)
            new = data.filter((pl.col("ts") >= lo) & (pl.col("ts") < hi))
            api.update(new)
            _ingest(store, settings, new)
            run_evaluate(store, anomalies=settings.anomalies)
            run_predict(store)
            _same(api.forecast().select(columns), _served(store, model, new["ts"].max()))
        # The bands moved with the scores (the pooled offset), the same in both.
        assert api._offset != 0.0 and store.calibration_offset(model) == pytest.approx(api._offset)
    finally:
        store.close()


@pytest.fixture(autouse=True)
def _quiet():
    from forecaster.log import configure_logging

    configure_logging("warning")
