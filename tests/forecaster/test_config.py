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


# -- errors name the key as written, and its environment variable --------------------------

BAD = "@@bad@@"


def _rows_that_refuse(bad: str) -> list[tuple[str, str]]:
    """(key, environment variable) of every key outside the sources whose value `bad` is
    refused (numbers, durations, choices, flags; any text is a valid str)."""
    from forecaster.config_reference import reference_sections

    rows = [r for _, rs in reference_sections() for r in rs if r.env and "<" not in r.key]
    return [(r.key, r.env) for r in rows if not r.type.startswith(("str", "secret"))]


@pytest.mark.parametrize("where", ["env", "toml"])
def test_every_nested_key_is_named_with_its_environment_variable(tmp_path, monkeypatch, where):
    """An error in http.port was reported as `port` / FORECASTER_PORT, a key that does not
    exist: every 'http' in the location was dropped as if it were a source's kind."""
    checked: set[str] = set()
    for key, env in _rows_that_refuse(BAD):
        table, _, name = key.rpartition(".")
        path = None
        if where == "env":
            monkeypatch.setenv(env, BAD)
        else:
            path = tmp_path / "f.toml"
            path.write_text((f"[{table}]\n" if table else "") + f'{name} = "{BAD}"\n')
        try:
            with pytest.raises(ConfigError) as exc:
                load_settings(path)
        finally:
            monkeypatch.delenv(env, raising=False)
        assert exc.value.key == key, (key, str(exc.value))
        assert env in str(exc.value), str(exc.value)
        if path is not None:
            assert f"Fix it in {path}" in str(exc.value)
        checked.add(table)
    assert checked >= {"", "series", "training", "http", "metrics", "schedule", "retrain"}
    assert checked >= {"retention", "compute"}


@pytest.mark.parametrize("kind", ["file", "http", "sql", "prometheus", "replay"])
def test_a_source_key_is_named_even_when_the_source_is_named_like_a_kind(tmp_path, kind):
    """`[sources.http]` lost its name too: the location's 'http' was dropped as a kind."""
    from forecaster.config_reference import SOURCE_KINDS

    cls = next(k for k in SOURCE_KINDS if k.model_fields["kind"].default == kind)
    required = [n for n, f in cls.model_fields.items() if f.is_required()]
    lines = [f"[sources.{kind}]", f'kind = "{kind}"', *(f'{n} = "x"' for n in required)]
    (tmp_path / "f.toml").write_text("\n".join([*lines, 'interval = "soon"', ""]))
    with pytest.raises(ConfigError) as exc:
        load_settings(tmp_path / "f.toml")
    assert exc.value.key == f"sources.{kind}.interval", str(exc.value)
    assert f"FORECASTER_SOURCES__{kind.upper()}__INTERVAL" in str(exc.value)


def test_a_toml_syntax_error_is_a_config_error(tmp_path):
    (tmp_path / "f.toml").write_text('[series]\nfreq = 1h"\n')
    with pytest.raises(ConfigError, match=r"f.toml is not valid TOML: .*line 2") as exc:
        load_settings(tmp_path / "f.toml")
    assert exc.value.key == "config_file"
    result = CliRunner().invoke(app, ["--config", str(tmp_path / "f.toml"), "config", "show"])
    assert result.exit_code == 2 and "not valid TOML" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("env", "value", "key"),
    [
        ("FORECASTER_METRICS__SERIES", "a*,b", "metrics.series"),
        ("FORECASTER_METRICS__HORIZON_STEPS", "1 6", "metrics.horizon_steps"),
        ("FORECASTER_TRAINING__QUANTILES", "0.1,0.5,0.9", "training.quantiles"),
        ("FORECASTER_SERIES", "freq=1h", "series"),
    ],
)
def test_a_non_json_environment_value_for_a_list_or_table_is_a_config_error(
    monkeypatch, env, value, key
):
    """pydantic-settings raised SettingsError naming only the top-level field, with a raw
    traceback."""
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert exc.value.key == key and f"{env} is not JSON" in str(exc.value)
    assert f"Set it to a JSON {'table' if key == 'series' else 'list'}" in str(exc.value)
    assert value not in str(exc.value)  # a value that does not parse is not quoted
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 2 and env in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("toml", "key", "fix"),
    [
        ('databse_url = "x"\n', "databse_url", "correct its spelling to 'database_url'"),
        ("[http]\nprot = 1\n", "http.prot", "Remove it from [http] in"),
        ('[sources.a]\nkind = "sql"\nurl = "x"\n', "sources.a.query", "Add it to [sources.a]"),
        ('[sources.a]\nurl = "x"\n', "sources.a.kind", "Fix [sources.a] in"),
        ('[series]\nfreq = "7m"\n', "series", "Fix [series] in"),
    ],
)
def test_errors_say_what_to_do(tmp_path, toml, key, fix):
    (tmp_path / "f.toml").write_text(toml)
    with pytest.raises(ConfigError) as exc:
        load_settings(tmp_path / "f.toml")
    assert exc.value.key == key and fix in str(exc.value), str(exc.value)


def test_a_list_of_a_source_from_the_environment_says_json(monkeypatch):
    """A source's keys from the environment are not decoded by pydantic-settings."""
    monkeypatch.setenv("FORECASTER_SOURCES__RAW__KIND", "replay")
    monkeypatch.setenv("FORECASTER_SOURCES__RAW__SERIES_FILTER", "a")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert exc.value.key == "sources.raw.series_filter"
    assert "written in JSON" in str(exc.value)
    assert "Fix the environment variable FORECASTER_SOURCES__RAW__SERIES_FILTER" in str(exc.value)
