"""A trained model with everything needed to use it: network, feature spec, scalers, series.

The unit that goes into a checkpoint and comes back out of one; inference builds on it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from forecaster.checkpoints import Checkpoint
from forecaster.errors import CheckpointError
from forecaster.features import FeatureSpec
from forecaster.models import ModelConfig, build_model
from forecaster.panel import Scalers

# Bumped whenever the networks' parameters or the features change meaning: a checkpoint
# from another architecture is refused with a message, not loaded into the wrong shapes.
ARCHITECTURE = 2


@dataclass(frozen=True)
class Challenger:
    params: Any  # forecaster.stats.StatParams, all series
    state: Any  # np.ndarray (S, width): each series' state after its step
    step: Any  # np.ndarray (S,): the epoch-grid step each state holds up to


@dataclass
class TrainedModel:
    model: nn.Module
    model_config: ModelConfig
    spec: FeatureSpec
    scalers: Scalers
    names: list[str]  # the series the scalers were fitted on, in scaler order
    nonnegative: bool = False
    window: int = 168  # TBPTT window the model was trained with (steps)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def holdout_corrections(self) -> dict[int, float]:
        """horizon step -> the band correction (in band widths) measured on the training
        holdout; empty for a checkpoint from before holdout calibration."""
        return {h + 1: float(c) for h, c in enumerate(self.meta.get("calibration") or [])}

    @functools.cached_property
    def stat(self) -> Challenger | None:
        """The statistical challenger fitted with this version (forecaster.stats), in the
        scalers' series order; None for a version without one."""
        kept = self.meta.get("stat")
        if not kept:
            return None
        import numpy as np

        from forecaster.stats import StatParams

        return Challenger(
            params=StatParams.from_dict(kept["params"]),
            state=np.asarray(kept["state"], dtype=np.float64),
            step=np.asarray(kept["step"], dtype=np.int64),
        )

    def to_checkpoint(self) -> Checkpoint:
        meta = {
            **self.meta,
            "spec": self.spec.to_dict(),
            "names": list(self.names),
            "nonnegative": self.nonnegative,
            "window": self.window,
            "architecture": ARCHITECTURE,
        }
        return Checkpoint(
            kind=self.model_config.kind,
            config=self.model_config.to_dict(),
            state_dict={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            scalers=self.scalers.to_dict(self.names),
            meta=meta,
        )

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> TrainedModel:
        meta = dict(ckpt.meta)
        arch = meta.pop("architecture", 1)
        if arch != ARCHITECTURE:
            raise CheckpointError(
                f"of a {ckpt.kind} model",
                f"it holds architecture {arch}, this code runs architecture {ARCHITECTURE}; "
                "retrain with `forecaster train`",
            )
        config = ModelConfig.from_dict(ckpt.config)
        model = build_model(config)
        model.load_state_dict(ckpt.state_dict)
        spec = FeatureSpec(**meta.pop("spec"))
        names = list(meta.pop("names"))
        return cls(
            model=model.eval(),
            model_config=config,
            spec=spec,
            scalers=Scalers.from_dict({k: tuple(v) for k, v in ckpt.scalers.items()}, names),
            names=names,
            nonnegative=bool(meta.pop("nonnegative", False)),
            window=int(meta.pop("window", 168)),
            meta=meta,
        )
