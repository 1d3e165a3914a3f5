"""`forecaster train` and `forecaster models list` as a user runs them, on a real SQLite store."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from forecaster.checkpoints import load_checkpoint
from forecaster.store import Store
from forecaster.trained import TrainedModel
from pipelines.cli import app


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    lines = ["series,ts,value"]
    for s in range(2):
        for h in range(5 * 168):
            ts = (start + timedelta(hours=h)).strftime("%Y-%m-%dT%H:%M:%SZ")
            lines.append(f"sine.{s},{ts},{10 + 5 * math.sin(2 * math.pi * h / 24 + s):.4f}")
    (tmp_path / "sine.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "forecaster.toml").write_text(
        f'database_url = "sqlite:///{tmp_path / "s.db"}"\ncheckpoint_dir = "{tmp_path / "ckpt"}"\n'
        f"[training]\nhidden = 8\nval_steps = 168\n"
        f'[sources.sine]\nkind = "file"\npath = "{tmp_path / "sine.csv"}"\n'
    )
    runner = CliRunner()
    for args in (["db", "upgrade"], ["ingest", "--source", "sine"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    return tmp_path


def test_train_registers_a_champion_then_candidates(workdir):
    runner = CliRunner()
    first = runner.invoke(app, ["train", "--model", "gru", "--epochs", "2"])
    assert first.exit_code == 0, first.output
    assert "MASE" in first.output and "seasonal naive daily" in first.output
    assert "registered model version 1 as champion" in first.output
    second = runner.invoke(app, ["train", "--model", "seq2seq", "--epochs", "1"])
    assert second.exit_code == 0, second.output
    assert "registered model version 2 as candidate" in second.output

    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0
    assert (
        "champion" in listed.output and "candidate" in listed.output and "seq2seq" in listed.output
    )

    store = Store(f"sqlite:///{workdir / 's.db'}")
    v1 = store.model_version(1)
    # Each version's statistical challenger is registered with it: its holdout MASE listed.
    assert "MSTL MASE" in " ".join(listed.output.split())
    assert f"{v1['metrics']['mstl']['mase']:.3f}" in listed.output
    trained = TrainedModel.from_checkpoint(load_checkpoint(v1["uri"], v1["sha256"]))
    assert trained.names == ["sine.0", "sine.1"] and trained.model_config.kind == "gru"
    assert v1["trained_to"] < datetime(2024, 2, 5, tzinfo=UTC)  # the held-out week is not in it
    store.close()


def test_unknown_series_and_model_are_clear_errors(workdir):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--series", "nope", "--epochs", "1"])
    assert result.exit_code == 1 and "no series named 'nope'" in result.output
    result = runner.invoke(app, ["train", "--model", "transformer", "--epochs", "1"])
    assert result.exit_code == 2 and "unknown model 'transformer'" in result.output
