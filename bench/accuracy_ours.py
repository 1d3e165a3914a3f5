"""The service's own models in bench/accuracy.py, through the in-memory API (forecaster.api):
fitted once on the rows before the first origin, then at each origin given the new block
(`update`: the saved states advance over it only) before `forecast`, as the daemon does.

Business-hours data (a Spec with a session) has only its open slots as rows: they are laid
on a gap-free grid of consecutive steps (what `[series] seasons` describes to the service),
with the spec's seasons in steps and no wall-clock calendar features, and mapped back to
the open slots with Spec.next_steps.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl

from forecaster.api import Forecaster

_BASE = datetime(2000, 1, 3, tzinfo=UTC)  # a Monday: the pseudo-grid of session data


class Ours:
    """kind: lstm, gru, rnn; options: TrainConfig fields (epochs, hidden, ...)."""

    def __init__(self, kind: str = "lstm", **options) -> None:
        self.kind, self.options = kind, options

    def fit(self, history: pl.DataFrame, spec) -> None:  # noqa: ANN001 - bench Spec
        self.spec = spec
        session = spec.session is not None
        self.fc = Forecaster(
            self.kind,
            horizon=spec.horizon,
            freq=spec.freq_s,
            seasons=tuple(spec.seasons),
            **({"calendar": False} if session else {}),
            **self.options,
        )
        self._pos: dict[str, int] = {}
        self._last: dict[str, datetime] = {}
        self.fc.fit(self._grid(history))

    def update(self, new: pl.DataFrame) -> None:
        if new.height:
            self.fc.update(self._grid(new))

    def forecast(self, h: int) -> pl.DataFrame:
        return self._slots(self.fc.forecast().sort("series", "ts"), h)

    def _slots(self, out: pl.DataFrame, h: int) -> pl.DataFrame:
        """Forecasts (series, ts, yhat, yhat_lower, yhat_upper; each series' steps in
        order) as the harness wants them: quantile columns, and for session data the
        pseudo-grid's steps mapped back to the next open slots (Spec.next_steps)."""
        if self.spec.session is None:
            return out.select(
                "series",
                "ts",
                pl.col("yhat_lower").alias("q0.1"),
                pl.col("yhat").alias("q0.5"),
                pl.col("yhat_upper").alias("q0.9"),
            )
        rows = []
        for (name,), part in out.group_by("series", maintain_order=True):
            slots = self.spec.next_steps(self._last[name], h)
            rows.append(
                pl.DataFrame(
                    {
                        "series": name,
                        "ts": slots,
                        "q0.1": part["yhat_lower"].to_numpy()[:h],
                        "q0.5": part["yhat"].to_numpy()[:h],
                        "q0.9": part["yhat_upper"].to_numpy()[:h],
                    }
                )
            )
        return pl.concat(rows).with_columns(pl.col("ts").dt.cast_time_unit("us"))

    def _grid(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Session data onto consecutive steps (each series continuing where it stopped)."""
        frame = frame.select("series", "ts", "value").sort("series", "ts")
        if self.spec.session is None:
            return frame
        parts = []
        step = timedelta(seconds=self.spec.freq_s)
        for (name,), part in frame.group_by("series", maintain_order=True):
            first = self._pos.get(name, -1) + 1
            pos = np.arange(first, first + part.height)
            self._pos[name] = int(pos[-1])
            self._last[name] = part["ts"][-1]
            parts.append(
                part.with_columns(
                    pl.Series("ts", [_BASE + int(i) * step for i in pos]).dt.cast_time_unit("us")
                )
            )
        return pl.concat(parts)
