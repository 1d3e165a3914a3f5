"""A panel: many series on one regular grid, as a (series, time) array, with their scalers.

DataFrames stop here: the store hands over a long frame (series, ts, value) once, and the
numeric code works on the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import Tensor


@dataclass(frozen=True)
class Panel:
    names: list[str]
    start: int  # epoch seconds of grid index 0
    freq_seconds: int
    values: Tensor  # (S, N) float32, NaN = missing or outside the series' span

    @property
    def n_steps(self) -> int:
        return int(self.values.shape[1])

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, freq_seconds: int) -> Panel:
        """Long frame (series, ts UTC, value) -> panel over the union of the series' spans."""
        for col in ("series", "ts", "value"):
            if col not in frame.columns:
                raise ValueError(f"the frame lacks column {col!r} (it has {frame.columns})")
        if frame.is_empty():
            raise ValueError("no observations: ingest some data first (`forecaster ingest`)")
        epoch = frame["ts"].dt.epoch("s")
        if (epoch % freq_seconds != 0).any():
            raise ValueError(
                f"timestamps are not on the {freq_seconds}s grid; ingest resamples them"
            )
        start = int(epoch.min())
        n = int((epoch.max() - start) // freq_seconds) + 1
        names = sorted(frame["series"].unique().to_list())
        row = {name: i for i, name in enumerate(names)}
        values = np.full((len(names), n), np.nan, dtype=np.float32)
        rows = frame["series"].replace_strict(row, return_dtype=pl.Int64).to_numpy()
        cols = ((epoch - start) // freq_seconds).to_numpy()
        values[rows, cols] = frame["value"].fill_null(np.nan).to_numpy().astype(np.float32)
        return cls(
            names=names, start=start, freq_seconds=freq_seconds, values=torch.from_numpy(values)
        )


@dataclass(frozen=True)
class Scalers:
    """Per-series robust scaling fitted on training data only: (y - median) / IQR."""

    center: Tensor  # (S,)
    scale: Tensor  # (S,)

    @classmethod
    def fit(cls, values: Tensor) -> Scalers:
        """values (S, N) with NaN; a series with no spread gets its std, or 1."""
        q = torch.nanquantile(
            values.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), dim=1
        )
        center = torch.nan_to_num(q[1], nan=0.0)
        iqr = q[2] - q[0]
        std = (
            torch.from_numpy(np.nanstd(values.double().numpy(), axis=1)) if values.shape[1] else iqr
        )
        scale = torch.where(iqr > 0, iqr, torch.where(std > 0, std, torch.ones_like(iqr)))
        return cls(center=center.float(), scale=torch.nan_to_num(scale, nan=1.0).float())

    def transform(self, values: Tensor) -> Tensor:
        return (values - self.center.unsqueeze(1)) / self.scale.unsqueeze(1)

    def inverse(self, scaled: Tensor) -> Tensor:
        """Any (S, ...) tensor back to the series' units."""
        shape = (-1,) + (1,) * (scaled.dim() - 1)
        return scaled * self.scale.view(shape) + self.center.view(shape)

    def to_dict(self, names: list[str]) -> dict[str, tuple[float, float]]:
        return {
            n: (float(c), float(s)) for n, c, s in zip(names, self.center, self.scale, strict=True)
        }

    @classmethod
    def from_dict(cls, d: dict[str, tuple[float, float]], names: list[str]) -> Scalers:
        missing = [n for n in names if n not in d]
        if missing:
            raise KeyError(f"no scaler for series {missing[:5]}: the model was not trained on them")
        return cls(
            center=torch.tensor([d[n][0] for n in names], dtype=torch.float32),
            scale=torch.tensor([d[n][1] for n in names], dtype=torch.float32),
        )
