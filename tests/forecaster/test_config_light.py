"""forecaster.config_light, the read commands' settings: whenever it answers, it answers what
the full Settings hold (URL, where it came from, log level and format, secrets known to the
masking); whenever Settings would refuse the configuration, it does not answer, so the full
Settings are built and raise their error."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, get_args
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forecaster import config_light
from forecaster.config import Settings, load_settings
from forecaster.config_light import light_settings
from forecaster.errors import ConfigError
from forecaster.masking import mask_secrets


@pytest.fixture(autouse=True)
def _forget_planted_secrets():
    """These tests plant tokens such as "json" or "sqlite:///a.db": remembered by the
    process-wide masker (forecaster.masking), they would mask those words in every later
    test's output. Restore what was remembered before."""
    from forecaster import masking

    before = set(masking._known)
    yield
    masking._known.clear()
    masking._known.update(before)
    masking._known_pattern = (-1, None)


def test_it_knows_the_settings_keys_values_and_defaults():
    fields = Settings.model_fields
    assert config_light.SETTINGS_KEYS == set(fields)
    assert get_args(fields["log_level"].annotation) == config_light.LOG_LEVELS
    assert get_args(fields["log_format"].annotation) == config_light.LOG_FORMATS
    assert get_args(fields["device"].annotation) == config_light.DEVICES
    assert fields["database_url"].default == config_light.DEFAULT_DATABASE_URL
    assert fields["log_level"].default == config_light.DEFAULT_LOG_LEVEL
    assert fields["log_format"].default == config_light.DEFAULT_LOG_FORMAT
    assert Settings.model_config["env_prefix"] == config_light.ENV_PREFIX


def _both(
    tmp_path: Path, env: dict[str, str], toml: str | bytes | None, override: str | None
) -> tuple[Any, Any]:
    """(light_settings, load_settings or the ConfigError it raised) for this environment
    (nothing else with the prefix), this ./forecaster.toml (None: no file) and --db URL."""
    path = tmp_path / "forecaster.toml"
    path.unlink(missing_ok=True)
    if toml is not None:
        path.write_bytes(toml.encode() if isinstance(toml, str) else toml)
    clean = {k: v for k, v in os.environ.items() if not k.lower().startswith("forecaster_")}
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
            light = light_settings(None, override)
            overrides = {} if override is None else {"database_url": override}
            try:
                full: Any = load_settings(None, **overrides)
            except ConfigError as exc:
                full = exc
    finally:
        os.chdir(cwd)
    return light, full


def _check(light: Any, full: Any) -> None:
    if isinstance(full, ConfigError):
        assert light is None, f"Settings refuse it ({full}), the light settings took it"
        return
    if light is None:
        return  # the full Settings are built: always right, only slower
    assert light.database_url == full.database_url
    assert type(light.database_url) is type(full.database_url)  # masked in repr alike
    assert light.database_url_configured == ("database_url" in full.model_fields_set)
    assert (light.log_level, light.log_format) == (full.log_level, full.log_format)


URL = "postgresql://fc:pw-light-5e0b@db.internal/fc"

CASES: list[tuple[dict[str, str], str | bytes | None, str | None, bool]] = [
    # (environment, ./forecaster.toml, --db, the light settings answer)
    ({}, None, None, True),
    ({}, None, "sqlite:///opt.db", True),
    ({"FORECASTER_DATABASE_URL": URL}, None, None, True),
    ({"forecaster_database_url": URL}, None, None, True),  # any case, as pydantic-settings
    ({"FORECASTER_DATABASE_URL": URL}, 'database_url = "sqlite:///file.db"\n', None, True),
    ({"FORECASTER_DATABASE_URL": URL}, 'database_url = "sqlite:///f.db"\n', "sqlite:///o", True),
    ({}, 'database_url = "sqlite:///file.db"\nlog_level = "debug"\n', None, True),
    ({}, 'device = "cpu"\ncheckpoint_dir = "ck"\nlog_format = "json"\n', None, True),
    ({"FORECASTER_LOG_LEVEL": "warning", "FORECASTER_LOG_FORMAT": "json"}, None, None, True),
    ({"FORECASTER_HTTP__TOKEN": "tok-light-77c1", "FORECASTER_DEVICE": "cuda"}, None, None, True),
    ({"FORECASTER_CHECKPOINT_DIR": "/var/ck"}, None, None, True),
    ({"FORECASTER_DATABASE_URL": ""}, None, None, True),
    ({"FORECASTER_FUZZ_EXAMPLES": "9", "FORECASTER_TEST_PG": "x"}, None, None, True),  # ignored
    # anything else: the full settings
    ({"FORECASTER_DATABASE_URL": URL, "forecaster_database_url": "x"}, None, None, False),
    ({"FORECASTER_LOG_LEVEL": "INFO"}, None, None, False),
    ({"FORECASTER_DEVICE": "gpu"}, None, None, False),
    ({"FORECASTER_SERIES__FREQ": "15m"}, None, None, False),
    ({"FORECASTER_SERIES__FREQ": "7m"}, None, None, False),
    ({"FORECASTER_HTTP__PORT": "80"}, None, None, False),
    ({"FORECASTER_HTTP__FOO": "1"}, None, None, False),
    ({"FORECASTER_HTTP": "1"}, None, None, False),
    ({"FORECASTER_DATABASE_URL__X": "1"}, None, None, False),
    ({}, '[sources.csv]\nkind = "file"\npath = "x.csv"\n', None, False),
    ({}, '[series]\nfreq = "7m"\n', None, False),
    ({}, 'databse_url = "sqlite:///x.db"\n', None, False),
    ({}, "database_url = 5\n", None, False),
    ({}, 'log_level = "INFO"\n', None, False),
    ({}, 'database_url = "sqlite:///x.db\n', None, False),  # not TOML
    ({}, b'database_url = "sqlite:///\xff.db"\n', None, False),  # not UTF-8
    ({}, '[http]\ntoken = "tok"\n', None, False),
]


@pytest.mark.parametrize(("env", "toml", "override", "answers"), CASES)
def test_it_answers_what_the_settings_hold_or_leaves_it_to_them(
    tmp_path, env, toml, override, answers
):
    light, full = _both(tmp_path, env, toml, override)
    _check(light, full)
    assert (light is not None) == answers


def test_the_secrets_it_reads_are_masked_as_the_settings_mask_them(tmp_path):
    env = {"FORECASTER_DATABASE_URL": URL, "FORECASTER_HTTP__TOKEN": "tok-light-9a4e"}
    light, _ = _both(tmp_path, env, None, None)
    assert light is not None and repr(light.database_url) == repr(
        "postgresql://fc:***@db.internal/fc"
    )
    assert mask_secrets("pw-light-5e0b and tok-light-9a4e") == "*** and ***"


def test_a_config_file_given_that_does_not_exist_is_the_same_error(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as light:
        light_settings(missing)
    with pytest.raises(ConfigError) as full:
        load_settings(missing)
    assert str(light.value) == str(full.value)


_KEYS = ["DATABASE_URL", "LOG_LEVEL", "LOG_FORMAT", "DEVICE", "CHECKPOINT_DIR", "HTTP__TOKEN"]
_KEYS += ["HTTP__PORT", "SERIES__FREQ", "FOO"]
_VALUES = ["sqlite:///a.db", "", "info", "json", "cpu", "INFO", "15m", "7m", "80", "[1]", "null"]
_LINES = [f'{k} = "{v}"' for k in ("database_url", "log_level", "device") for v in _VALUES[:6]]
_LINES += ["log_format = 1", "checkpoint_dir = []", '[series]\nfreq = "15m"', "[http]"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    env=st.dictionaries(
        st.builds(
            lambda k, lower: f"FORECASTER_{k}".lower() if lower else f"FORECASTER_{k}",
            st.sampled_from(_KEYS),
            st.booleans(),
        ),
        st.sampled_from(_VALUES),
        max_size=4,
    ),
    lines=st.none() | st.lists(st.sampled_from(_LINES), max_size=3, unique=True),
    override=st.none() | st.just("sqlite:///opt.db"),
)
def test_any_mix_of_environment_file_and_option(tmp_path, env, lines, override):
    toml = None if lines is None else "\n".join(lines) + "\n"
    _check(*_both(tmp_path, env, toml, override))
