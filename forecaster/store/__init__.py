"""The SQL store: the only package that runs SQL against our database.

`Store` is one object over one engine; its methods live in a module per concern
(`ingest`, `registry`, `prediction`, `evaluation`, `aggregates`, `jobs`, `service`), all built on `base.StoreBase`, which owns
the engine, transactions, the per-dialect insert helpers and the migrations. See `base` for
the write paths per dialect.

polars is imported inside the methods that build or take frames, not at module top: the
CLI's reads (`series list`, `models list`, `db current`) use none and start without it.
"""

from __future__ import annotations

from forecaster.store.aggregates import AggregateStore
from forecaster.store.base import (
    MIGRATIONS_DIR,
    StoreBase,
    connection_lost,
    create_engine,
    normalise_url,
)
from forecaster.store.evaluation import EvaluationStore
from forecaster.store.ingest import IngestStore
from forecaster.store.jobs import JobsStore
from forecaster.store.prediction import PredictionStore
from forecaster.store.registry import RegistryStore
from forecaster.store.service import ServiceStore

__all__ = [
    "MIGRATIONS_DIR",
    "Store",
    "StoreBase",
    "connection_lost",
    "create_engine",
    "normalise_url",
]


class Store(
    IngestStore,
    RegistryStore,
    PredictionStore,
    EvaluationStore,
    AggregateStore,
    JobsStore,
    ServiceStore,
):
    """Owns the engine. Reads open their own connection; writes take the connection of the
    caller's transaction (`with store.begin() as conn:`) so a job commits all or nothing."""
