"""The training job: observations from the store -> a trained model -> checkpoint -> registry.

The checkpoint file is written before the registry row that points at it. The first model
of a store becomes the champion; later ones are registered as candidates (the retraining
policy that promotes a challenger only when it beats the champion builds on this).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import polars as pl

from forecaster.checkpoints import save_checkpoint
from forecaster.config import Settings
from forecaster.errors import ConfigError, UnknownSeriesError
from forecaster.panel import Panel
from forecaster.store import Store
from forecaster.training import Progress, TrainConfig, TrainResult, train, trained_model


@dataclass
class TrainedVersion:
    version_id: int
    stage: str
    uri: str
    sha256: str
    result: TrainResult


def train_config(
    settings: Settings,
    store: Store | None = None,
    *,
    series: list[str] | None = None,
    **overrides: Any,
) -> TrainConfig:
    """The TrainConfig the [training] settings describe (None where they leave a default to
    the data), with the seasons of the stored series' sources, then `overrides` (CLI
    options, the retraining policy's) where they are not None."""
    t = settings.training
    chosen: dict[str, Any] = {
        "kind": t.kind,
        "hidden": t.hidden,
        "layers": t.layers,
        "dropout": t.dropout,
        "horizon": t.horizon,
        "quantiles": tuple(t.quantiles),
        "window": t.window,
        "epochs": t.epochs,
        "lr": t.lr,
        "weight_decay": t.weight_decay,
        "patience": t.patience,
        "val_steps": t.val_steps,
        "stop_steps": t.stop_steps,
        "refit_epochs": t.refit_epochs,
        "bidirectional": t.bidirectional,
        "origin_stride": t.origin_stride,
        "challenger": t.challenger,
        "seed": t.seed,
        "device": settings.device,
        "seasons": seasons_for(settings, store, series),
    }
    chosen.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**chosen)


def seasons_for(
    settings: Settings, store: Store | None, series: list[str] | None = None
) -> tuple[int, int] | None:
    """The (daily, weekly) seasons in steps the series' sources set ([series] or a source's
    own [sources.<name>.series]); None: derived from the frequency. One model has one pair."""
    sources = (
        {r["source"] for r in store.list_series() if not series or r["name"] in series}
        if (store is not None)
        else set()
    )
    found = {
        (settings.series_defaults_for(src) if src in settings.sources else settings.series).seasons
        for src in sources or {None}
    }
    if len(found) > 1:
        raise ConfigError(
            "series.seasons",
            f"the series' sources set different seasons ({sorted(found, key=str)})",
            "Train one model per kind of calendar with --series, or give them one [series] "
            "seasons.",
        )
    return found.pop()


def load_panel(
    store: Store,
    series: list[str] | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Panel:
    """Every stored series (or the named ones) as one panel, optionally only the points
    between since and until; they must share a frequency."""
    known = {r["name"]: r for r in store.list_series()}
    names = series or sorted(known)
    for name in names:
        if name not in known:
            raise UnknownSeriesError(name)
    freqs = {known[n]["freq_seconds"] for n in names}
    if len(freqs) > 1:
        raise ConfigError(
            "training",
            f"the series have different frequencies ({sorted(freqs)} s)",
            "Train one model per frequency with --series.",
        )
    frame = store.read_observations(since=since, until=until)
    frame = frame.filter(pl.col("series").is_in(names))
    if frame.is_empty():
        raise ConfigError(
            "training",
            "no stored points to train on",
            "Ingest a source first (`forecaster ingest`).",
        )
    return Panel.from_frame(frame, freqs.pop())


def run_training(
    store: Store,
    config: TrainConfig,
    *,
    checkpoint_dir: str,
    series: list[str] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> TrainedVersion:
    panel = load_panel(store, series)
    result = train(panel, config, on_progress=on_progress)
    trained = trained_model(result)
    uri, sha = save_checkpoint(trained.to_checkpoint(), checkpoint_dir)
    with store.begin() as conn:
        stage = "champion" if store.champion() is None else "candidate"
        version_id = register_trained(
            store,
            conn,
            config,
            result,
            panel,
            uri=uri,
            sha256=sha,
            metrics=result.metrics,
            stage=stage,
        )
    return TrainedVersion(version_id=version_id, stage=stage, uri=uri, sha256=sha, result=result)


def data_until(panel: Panel) -> str:
    """The time of the panel's newest step: what a version was trained on, up to."""
    last = panel.start + (panel.n_steps - 1) * panel.freq_seconds
    return datetime.fromtimestamp(last, UTC).isoformat()


def register_trained(
    store: Store,
    conn: Any,  # the caller's transaction (store.begin())
    config: TrainConfig,
    result: TrainResult,
    panel: Panel,
    *,
    uri: str,
    sha256: str,
    metrics: dict[str, Any],
    stage: str,
    parent_id: int | None = None,
) -> int:
    """Register a checkpoint written from `result`: its model and training configs, the span
    it trained on (up to the end of its training tail) and its metrics."""
    step = panel.freq_seconds
    # A refit model has learnt from every point; one without, up to its training tail.
    learned_end = panel.n_steps if result.refit_epochs else result.train_end
    return store.register_model_version(
        conn,
        kind=config.kind,
        config={"model": result.model_config.to_dict(), "training": _jsonable(asdict(config))},
        uri=uri,
        sha256=sha256,
        trained_from=datetime.fromtimestamp(panel.start, UTC),
        trained_to=datetime.fromtimestamp(panel.start + (learned_end - 1) * step, UTC),
        metrics={
            **metrics,
            "data_until": data_until(panel),
            # What serves each series (forecaster.serving): in SQL, in /metrics, on the page.
            "serving": dict(zip(result.names, result.serving, strict=True)),
        },
        stage=stage,
        parent_id=parent_id,
    )


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
