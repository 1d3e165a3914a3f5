"""The few settings a command that only reads or migrates the store needs (the database URL
and how to log), found without building the full Settings.

Building Settings (pydantic-settings, every section validated) and loading structlog were a
fifth of the start of `forecaster series list` (docs/benchmarks.md). When the configuration
holds nothing but the keys below, each with a value Settings takes as it is,
`light_settings` reads them with the same precedence (the --db option, then the
environment, then the TOML file, then the defaults) and gives what Settings would hold.
Anything else (a [sources] table, FORECASTER_SERIES__FREQ, a value Settings might refuse
or convert, a file that does not parse) makes it answer None: the caller then builds the
full Settings, which check everything and raise the ConfigError any other command raises.
tests/forecaster/test_config_light.py holds the two to the same answers.

This module imports neither pydantic nor anything of forecaster.config; forecaster.config
takes its defaults, the config file's lookup and the durations' text from here.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from forecaster.errors import ConfigError
from forecaster.masking import SecretUrl, remember_secrets, url_secrets

ENV_PREFIX = "FORECASTER_"
DEFAULT_CONFIG_FILE = Path("forecaster.toml")

DEFAULT_DATABASE_URL = "sqlite:///forecaster.db"
DEFAULT_LOG_LEVEL = "info"
DEFAULT_LOG_FORMAT = "console"
# The Literal values of Settings.log_level, .log_format and .device (a test keeps them equal).
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("console", "json")
DEVICES = ("auto", "cpu", "cuda")

# Settings' top-level keys (a test keeps them equal): an environment variable with the prefix
# that names none of them is ignored, as pydantic-settings ignores it.
SETTINGS_KEYS = frozenset(
    {
        "database_url",
        "device",
        "log_level",
        "log_format",
        "checkpoint_dir",
        "series",
        "training",
        "sources",
        "http",
        "metrics",
        "schedule",
        "retrain",
        "retention",
        "anomalies",
        "compute",
    }
)


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and value in choices


# The keys read here, each with the test of a value Settings takes unchanged.
_PLAIN: dict[str, Callable[[Any], bool]] = {
    "database_url": _text,
    "log_level": _one_of(LOG_LEVELS),
    "log_format": _one_of(LOG_FORMATS),
    "device": _one_of(DEVICES),
    "checkpoint_dir": _text,
}
# From the environment also the HTTP token, which deployments set beside the database URL
# (FORECASTER_HTTP__TOKEN; any text is a token). It is a secret to mask, nothing more here.
_PLAIN_ENV = {**_PLAIN, "http__token": _text}


def config_path(config_file: Path | str | None) -> Path | None:
    """The TOML file of this run: the one given, else ./forecaster.toml when it exists, else
    none. A file given that does not exist is a ConfigError."""
    path = Path(config_file) if config_file is not None else None
    if path is None and DEFAULT_CONFIG_FILE.is_file():
        path = DEFAULT_CONFIG_FILE
    if path is not None and not path.is_file():
        raise ConfigError("config_file", f"{path} does not exist", "Pass an existing TOML file.")
    return path


@dataclass(frozen=True)
class LightSettings:
    """What Settings would hold for these keys. database_url_configured: the URL came from
    the option, the environment or the file (Settings.model_fields_set has it), not the
    default."""

    database_url: str
    database_url_configured: bool
    log_level: str
    log_format: str


def light_settings(
    config_file: Path | str | None = None, database_url: str | None = None
) -> LightSettings | None:
    """The database URL and log settings of this run (database_url: the --db option's URL,
    which beats the rest), or None when the full Settings must be built to know them or to
    check the rest. Like Settings, it tells mask_secrets of the secrets it read. A config
    file given that does not exist raises the ConfigError load_settings raises."""
    path = config_path(config_file)
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as f:
                table = tomllib.load(f)
        except (OSError, ValueError):  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
            return None
        if not all(key in _PLAIN and _PLAIN[key](value) for key, value in table.items()):
            return None
        values.update(table)
    environment = _environment()
    if environment is None:
        return None
    values.update(environment)
    if database_url is not None:
        values["database_url"] = database_url
    url = values.get("database_url", DEFAULT_DATABASE_URL)
    secrets = url_secrets(url)
    if "http__token" in values:
        secrets.append(values["http__token"])
    remember_secrets(secrets)
    return LightSettings(
        database_url=SecretUrl(url),
        database_url_configured="database_url" in values,
        log_level=values.get("log_level", DEFAULT_LOG_LEVEL),
        log_format=values.get("log_format", DEFAULT_LOG_FORMAT),
    )


def _environment() -> dict[str, str] | None:
    """The FORECASTER_ variables, by key in lower case (pydantic-settings reads their names
    in any case), or None when one is not a plain value of _PLAIN_ENV, or two name the same
    key."""
    found: dict[str, str] = {}
    prefix = ENV_PREFIX.lower()
    for name, value in os.environ.items():
        key = name.lower()
        if not key.startswith(prefix):
            continue
        key = key[len(prefix) :]
        if key.split("__")[0] not in SETTINGS_KEYS:
            continue
        if key in found or key not in _PLAIN_ENV or not _PLAIN_ENV[key](value):
            return None
        found[key] = value
    return found


# -- durations as the config writes them ("15m", "1h", "7d") ---------------------------------

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")


def parse_duration(value: Any) -> Any:
    """'15m', '1h', '7d', '1w', '90s' or a number of seconds -> timedelta.

    Anything else is handed to pydantic, which also accepts ISO 8601 ('PT1H')."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    return value


def format_duration(td: timedelta) -> str:
    seconds = td.total_seconds()
    for unit in ("w", "d", "h", "m", "s"):
        n = seconds / _UNITS[unit]
        if n >= 1 and n == int(n):
            return f"{int(n)}{unit}"
    return f"{seconds}s"
