"""Sources: where raw rows come from (files, HTTP JSON, SQL, Prometheus, a replayed data set).

`build_source` imports the implementation module only for the kind asked for, so a
deployment reading CSV files never imports httpx or a database driver.
"""

from __future__ import annotations

import importlib
import json
import re
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


def invalid_url(masked: str) -> str:
    """The problem to report for a URL httpx refuses. Not httpx's own message: that quotes
    pieces of the URL, a password's among them ("Invalid port: 'pa'" for u:pa/ss@h)."""
    return (
        f"{masked} is not a valid URL; fix `url` (write any '/', '@', ':', '?' or '#' in a "
        "password as %2F, %40, %3A, %3F, %23)"
    )


def no_surrogates(text: str) -> str:
    """JSON may escape a lone surrogate (\\ud800), which no UTF-8 string can hold: U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(v: Any) -> str | None:
    if v is None:
        return v
    if isinstance(v, str):
        return no_surrogates(v)
    if isinstance(v, dict | list):
        return json.dumps(v, default=str)  # ASCII: surrogates come out escaped
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return str(v)
