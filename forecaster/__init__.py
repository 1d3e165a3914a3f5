"""forecaster: a streaming time-series forecasting service over a SQL store."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from forecaster.config import Settings, load_settings
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

# Importing any submodule (forecaster.clock, forecaster.errors) runs this file: the store
# (SQLAlchemy, polars) and the settings (pydantic) load on first use, so `forecaster --help`
# does not pay for them.
_LAZY = {
    "Store": "forecaster.store",
    "Settings": "forecaster.config",
    "load_settings": "forecaster.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'forecaster' has no attribute {name!r}")
