"""forecaster: a streaming time-series forecasting service over a SQL store."""

from forecaster.config import Settings, load_settings
from forecaster.errors import (
    CheckpointError,
    ConfigError,
    ForecasterError,
    SchemaOutOfDateError,
    SourceError,
    StoreError,
    UnknownModelVersionError,
    UnknownSeriesError,
    UnknownSourceError,
)
from forecaster.store import Store

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ForecasterError",
    "SchemaOutOfDateError",
    "Settings",
    "SourceError",
    "Store",
    "StoreError",
    "UnknownModelVersionError",
    "UnknownSeriesError",
    "UnknownSourceError",
    "load_settings",
]
