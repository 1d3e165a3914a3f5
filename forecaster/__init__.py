"""forecaster: a streaming time-series forecasting service over a SQL store."""

from forecaster.config import Settings, load_settings
from forecaster.errors import (
    ConfigError,
    ForecasterError,
    SchemaOutOfDateError,
    SourceError,
    StoreError,
    UnknownSeriesError,
    UnknownSourceError,
)
from forecaster.store import Store

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ForecasterError",
    "SchemaOutOfDateError",
    "Settings",
    "SourceError",
    "Store",
    "StoreError",
    "UnknownSeriesError",
    "UnknownSourceError",
    "load_settings",
]
