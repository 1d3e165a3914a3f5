"""Sources: where raw rows come from (files, HTTP JSON, SQL, Prometheus, a replayed data set).

`build_source` imports the implementation module only for the kind asked for, so a
deployment reading CSV files never imports httpx or a database driver.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import polars as pl

from forecaster.errors import ConfigError
from pipelines.sources.base import RAW_COLUMNS, Batch, Source

__all__ = ["RAW_COLUMNS", "Batch", "Source", "build_source"]

# kind -> (module, class); imported on first use.
_READERS: dict[str, tuple[str, str]] = {
    "file": ("pipelines.sources.file", "FileSourceReader"),
    "http": ("pipelines.sources.http_json", "HttpJsonSourceReader"),
    "sql": ("pipelines.sources.sql", "SqlSourceReader"),
    "prometheus": ("pipelines.sources.prometheus", "PrometheusSourceReader"),
    "replay": ("pipelines.sources.replay", "ReplaySourceReader"),
}


def build_source(name: str, config: Any) -> Source:
    """The reader for one configured source (`config` is one of forecaster.config's *Source)."""
    kind = getattr(config, "kind", None)
    if kind not in _READERS:
        raise ConfigError(
            f"sources.{name}.kind",
            f"unknown source kind {kind!r}",
            f"Use one of: {', '.join(sorted(_READERS))}.",
        )
    module_name, class_name = _READERS[kind]
    reader = getattr(importlib.import_module(module_name), class_name)
    return reader(name, config)


def loose_column(values: Sequence[Any]) -> pl.Series:
    """Python values from JSON or a database -> one column a Batch may carry.

    Homogeneous values keep their type (numbers, datetimes, text); a mix becomes text so
    that nothing is lost and the ingest job can quarantine what it cannot parse."""
    kinds = {_kind(v) for v in values if v is not None}
    try:
        if kinds <= {"int"}:
            return pl.Series(values, dtype=pl.Int64)
        if kinds <= {"int", "float"}:
            return pl.Series([None if v is None else float(v) for v in values], dtype=pl.Float64)
        if kinds == {"datetime"}:
            return pl.Series(values)
    except (TypeError, ValueError, OverflowError, pl.exceptions.PolarsError):
        pass  # an int beyond 64 bits, naive mixed with aware datetimes...: keep it as text
    return pl.Series([_text(v) for v in values], dtype=pl.Utf8)


def _kind(v: Any) -> str:
    if isinstance(v, bool):  # before int: bool is an int subclass, but not a number here
        return "other"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float | Decimal):
        return "float"
    if hasattr(v, "isoformat") and hasattr(v, "year"):
        return "datetime"
    return "other"


def _text(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, dict | list):
        return json.dumps(v, default=str)
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return str(v)
