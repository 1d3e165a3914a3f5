"""Job runs (the scheduler's idempotency keys) and housekeeping."""

from __future__ import annotations

from forecaster.store.base import StoreBase


class JobsStore(StoreBase):
    pass
