"""From settings to a TrainConfig: defaults left to the data, the optimizer's knobs, seasons
per source."""

from __future__ import annotations

import pytest
import torch

from forecaster.config import Settings
from forecaster.errors import ConfigError
from forecaster.panel import Panel
from forecaster.store import Store
from forecaster.training import TrainConfig, train
from pipelines.train import seasons_for, train_config


def _settings(tmp_path, **extra) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path / 's.db'}",
        sources={
            "desk": {
                "kind": "file",
                "path": str(tmp_path / "d.csv"),
                "series": {"seasons": [8, 40]},
            },
            "web": {"kind": "file", "path": str(tmp_path / "w.csv")},
        },
        **extra,
    )


def _store_with(tmp_path, sources: list[str]) -> Store:
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.upgrade()
    with store.begin() as conn:
        for i, src in enumerate(sources):
            store.resolve_series(
                conn,
                [f"{src}.{i}"],
                create=True,
                source=src,
                freq_seconds=3600,
                window_seconds=86400,
            )
    return store


def test_defaults_are_left_to_the_data_and_weight_decay_is_a_setting(tmp_path):
    settings = _settings(tmp_path, training={"weight_decay": 0.05, "lr": 1e-3})
    config = train_config(settings)
    assert config.epochs is None and config.patience is None and config.val_steps is None
    assert (config.weight_decay, config.lr) == (0.05, 1e-3)
    assert train_config(settings, epochs=3, window=None).epochs == 3
    desc = Settings.model_fields["training"].annotation.model_fields["lr"].description
    assert "AdamW" in desc


def test_the_optimizer_gets_the_weight_decay(monkeypatch):
    g = torch.Generator().manual_seed(0)
    panel = Panel(["a"], 1356998400, 3600, 10 + torch.randn(1, 4 * 168, generator=g))
    seen = []
    real = torch.optim.AdamW

    class Spy(real):  # records what train() builds; a real AdamW all the same
        def __init__(self, params, **kw):
            seen.append(kw)
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    train(panel, TrainConfig(kind="gru", hidden=4, epochs=1, weight_decay=0.123))
    assert seen and seen[0]["weight_decay"] == 0.123


def test_seasons_follow_the_series_sources(tmp_path):
    settings = _settings(tmp_path)
    store = _store_with(tmp_path, ["desk", "desk"])
    assert seasons_for(settings, store) == (8, 40)
    assert train_config(settings, store).seasons == (8, 40)
    store.close()
    (tmp_path / "s.db").unlink()
    store = _store_with(tmp_path, ["web"])
    assert seasons_for(settings, store) is None  # a day and a week of the frequency
    store.close()
    (tmp_path / "s.db").unlink()
    store = _store_with(tmp_path, ["desk", "web"])
    with pytest.raises(ConfigError, match="different seasons"):
        seasons_for(settings, store)
    assert seasons_for(settings, store, series=["web.1"]) is None
    store.close()


def test_seasons_are_checked_in_the_settings(tmp_path):
    with pytest.raises(Exception, match="seasons"):
        Settings(series={"seasons": [40, 8]})
