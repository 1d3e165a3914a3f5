"""Where jobs get "now": the wall clock live, a simulated clock when replaying.

No job reads the system time directly, so a backtest runs the very same code as the service."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, tz-aware UTC."""
        ...


class WallClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class FixedClock:
    """A clock that moves only when told to (tests, backtests)."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("FixedClock needs a tz-aware start time")
        self._now = start.astimezone(UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta) -> datetime:
        self._now += delta
        return self._now

    def set(self, when: datetime) -> None:
        """Move to `when` (a simulated scheduler steps from fire to fire); never back."""
        if when.tzinfo is None:
            raise ValueError("FixedClock.set needs a tz-aware time")
        when = when.astimezone(UTC)
        if when < self._now:
            raise ValueError(f"a clock does not run backwards: {when} < {self._now}")
        self._now = when
