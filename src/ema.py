"""An exponential moving average of the weights that starts short and grows to `decay`.

A plain EMA with decay 0.999 averages over ~1,000 steps; a small data set trains for a few hundred, so the
average would still be mostly the random initialisation when validation reads it. As timm's ModelEmaV3 does,
the decay warms up as min(decay, (1 + n) / (10 + n)) over the n updates so far: early averages follow the
weights closely, later ones settle at `decay`. Lightning's WeightAveraging does the rest (validation, checkpoints
and the exported model use the averaged weights).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging


def warmup_ema(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor, decay: float) -> torch.Tensor:
    """One EMA update with the warmed-up decay; module-level so that ddp_spawn can pickle it."""
    n = float(num_averaged)
    rate = min(decay, (1.0 + n) / (10.0 + n))
    return averaged + (current - averaged) * (1.0 - rate)


class WarmupEMA(EMAWeightAveraging):
    """Lightning's EMAWeightAveraging with timm's decay warm-up (`warmup: false` gives the plain EMA)."""

    def __init__(self, decay: float = 0.999, warmup: bool = True, **kwargs: Any) -> None:
        super().__init__(decay=decay, **kwargs)
        if warmup:
            self._kwargs["avg_fn"] = functools.partial(warmup_ema, decay=decay)
