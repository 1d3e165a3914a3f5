"""Settings: TOML file + environment, errors that name the key, secrets masked."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from typer.testing import CliRunner

from forecaster.config import load_settings, mask_url
from forecaster.errors import ConfigError
from pipelines.cli import app

TOML = """
database_url = "postgresql://forecaster:s3cret-pw@db.internal:5432/fc"

[series]
freq = "15m"
window = "1d"
gap_policy = "ffill"

[sources.meters]
kind = "file"
path = "/data/meters/*.csv"
series_column = "meter"

[sources.meters.series]
freq = "5m"
window = "1h"
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for key in list(__import__("os").environ):
        if key.startswith("FORECASTER_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_defaults_work_without_any_file():
    s = load_settings()
    assert s.database_url == "sqlite:///forecaster.db"
    assert s.series.freq == timedelta(hours=1) and s.series.points_per_window == 24
    assert s.sources["nycflights"].kind == "replay"


def test_toml_file_and_per_source_overrides(tmp_path):
    (tmp_path / "f.toml").write_text(TOML)
    s = load_settings(tmp_path / "f.toml")
    assert s.series.freq == timedelta(minutes=15) and s.series.gap_policy == "ffill"
    assert s.series_defaults_for("meters").freq == timedelta(minutes=5)
    assert s.sources["meters"].series_column == "meter"


def test_environment_beats_the_file(tmp_path, monkeypatch):
    (tmp_path / "f.toml").write_text(TOML)
    monkeypatch.setenv("FORECASTER_SERIES__GAP_POLICY", "interpolate")
    monkeypatch.setenv("FORECASTER_DEVICE", "cpu")
    s = load_settings(tmp_path / "f.toml")
    assert s.series.gap_policy == "interpolate" and s.device == "cpu"
    assert s.series.freq == timedelta(minutes=15)


def test_bad_value_names_the_key_and_the_env_variable(monkeypatch):
    monkeypatch.setenv("FORECASTER_SERIES__GAP_POLICY", "guess")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert exc.value.key == "series.gap_policy"
    assert "FORECASTER_SERIES__GAP_POLICY" in str(exc.value) and "'guess'" in str(exc.value)


def test_window_must_be_a_multiple_of_freq(tmp_path):
    (tmp_path / "f.toml").write_text('[series]\nfreq = "7m"\nwindow = "1h"\n')
    with pytest.raises(ConfigError, match="whole multiple of freq"):
        load_settings(tmp_path / "f.toml")


def test_unknown_key_is_refused(tmp_path):
    (tmp_path / "f.toml").write_text('databse_url = "sqlite:///x.db"\n')
    with pytest.raises(ConfigError, match="databse_url"):
        load_settings(tmp_path / "f.toml")


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql+psycopg://u:p%40ss@h:5432/db?sslmode=require",
            "postgresql+psycopg://u:***@h:5432/db?sslmode=require",
        ),
        ("sqlite:///x.db", "sqlite:///x.db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
    ],
)
def test_mask_url(url, masked):
    assert mask_url(url) == masked


def test_config_show_masks_secrets(tmp_path, monkeypatch):
    (tmp_path / "f.toml").write_text(TOML)
    monkeypatch.setenv("API_TOKEN", "tok-very-secret")
    result = CliRunner().invoke(app, ["--config", str(tmp_path / "f.toml"), "config", "show"])
    assert result.exit_code == 0, result.output
    assert "s3cret-pw" not in result.output
    shown = json.loads(result.output)
    assert shown["database_url"] == "postgresql://forecaster:***@db.internal:5432/fc"
    assert shown["series"]["freq"] == "15m"
    assert shown["sources"]["meters"]["series"]["freq"] == "5m"


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    (tmp_path / "f.toml").write_text('[series]\ngap_policy = "guess"\n')
    result = CliRunner().invoke(app, ["--config", str(tmp_path / "f.toml"), "config", "show"])
    assert result.exit_code == 2
    assert "series.gap_policy" in result.output and "Traceback" not in result.output
