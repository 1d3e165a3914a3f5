"""The service's own path in bench/accuracy.py: a SQLite store, the jobs, the SQL views.

What a user does with a new dataset, step by step, with the settings' defaults (only the
frequency and the horizon set; the seasons too for business-hours data, whose open slots
are laid on consecutive steps as bench/accuracy_ours.py explains): ingest the history
(pipelines.ingest.ingest_batch), `forecaster train` (pipelines.train.run_training with
pipelines.train.train_config), predict; then at each origin ingest the new block, evaluate,
predict, and read the champion's rows of the `latest_forecasts` view. The in-memory API
(model `lstm`) runs the same code without a store; this checks that the store path serves
what the API forecasts, calibration and all.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import weakref
from datetime import timedelta

import polars as pl
import sqlalchemy as sa

from bench.accuracy_ours import Ours
from forecaster.config import SeriesDefaults, Settings, TrainingSettings
from forecaster.log import configure_logging
from forecaster.store import Store
from pipelines.evaluate import run_evaluate
from pipelines.ingest import ingest_batch
from pipelines.predict import run_predict
from pipelines.sources.base import Batch, raw_frame
from pipelines.train import run_training, train_config

SOURCE = "bench"


class Service(Ours):
    """The store and the jobs in a temporary directory, removed when the run ends."""

    def __init__(self) -> None:
        super().__init__("lstm")

    def fit(self, history: pl.DataFrame, spec) -> None:  # noqa: ANN001 - bench Spec
        configure_logging("warning")
        self.spec, self._pos, self._last = spec, {}, {}
        # Each series' newest ingested time on the store's grid (series, _last).
        self._newest = pl.DataFrame(schema={"series": pl.String, "_last": pl.Datetime("us", "UTC")})
        self.tmp = tempfile.mkdtemp(prefix="accuracy-service-")
        weakref.finalize(self, shutil.rmtree, self.tmp, True)
        session = spec.session is not None
        self.settings = Settings(
            database_url=f"sqlite:///{self.tmp}/store.db",
            checkpoint_dir=f"{self.tmp}/checkpoints",
            device="cpu",
            series=SeriesDefaults(
                freq=timedelta(seconds=spec.freq_s),
                seasons=tuple(spec.seasons) if session else None,
                allowed_lateness=timedelta(days=3650),
                max_backfill=None,
            ),
            training=TrainingSettings(horizon=spec.horizon),
        )
        self.store = Store(self.settings.database_url)
        self.store.upgrade()
        self._ingest(self._grid(history))
        config = train_config(self.settings, self.store)
        if session:  # open slots on consecutive steps: the clock's calendar means nothing
            config = dataclasses.replace(config, calendar=False)
        version = run_training(self.store, config, checkpoint_dir=self.settings.checkpoint_dir)
        self.model = f"v{version.version_id}"
        run_predict(self.store)

    def update(self, new: pl.DataFrame) -> None:
        if not new.height:
            return
        self._ingest(self._grid(new))
        run_evaluate(
            self.store,
            accuracy_window=self.settings.retrain.degrade_window,
            anomalies=self.settings.anomalies,
        )
        run_predict(self.store)

    def forecast(self, h: int) -> pl.DataFrame:
        view = sa.table(
            "latest_forecasts",
            *(
                sa.column(c)
                for c in ("series", "model", "target_ts", "yhat", "yhat_lower", "yhat_upper")
            ),
        )
        query = sa.select(
            view.c.series, view.c.target_ts, view.c.yhat, view.c.yhat_lower, view.c.yhat_upper
        ).where(view.c.model == self.model)
        with self.store.engine.connect() as conn:
            rows = conn.execute(query).all()
        frame = pl.DataFrame(
            [(r[0], str(r[1]), *r[2:]) for r in rows],
            schema={
                "series": pl.String,
                "ts": pl.String,  # SQLite's view gives text
                "yhat": pl.Float64,
                "yhat_lower": pl.Float64,
                "yhat_upper": pl.Float64,
            },
            orient="row",
        ).with_columns(pl.col("ts").str.to_datetime(time_unit="us", time_zone="UTC"))
        last = self._newest
        frame = (
            frame.join(last, on="series")
            .filter(pl.col("ts") > pl.col("_last"))
            .sort("series", "ts")
            .group_by("series", maintain_order=True)
            .head(h)
        )
        return self._slots(frame, h)

    def _ingest(self, frame: pl.DataFrame) -> None:
        seen = pl.concat([self._newest, frame.select("series", pl.col("ts").alias("_last"))])
        self._newest = seen.group_by("series").agg(pl.col("_last").max())
        raw = raw_frame(frame["series"], frame["ts"], frame["value"], "bench")
        now = frame["ts"].max()
        ingest_batch(self.store, SOURCE, Batch(raw, {"until": str(now)}), self.settings.series, now)
