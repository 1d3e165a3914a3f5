"""Reads for the daemon's HTTP app: what /metrics and /readyz show, straight from SQL."""

from __future__ import annotations

from forecaster.store.base import StoreBase


class ServiceStore(StoreBase):
    pass
