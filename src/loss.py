"""Loss settings (conf/loss/): class weights from the training folds, and the advice an imbalanced split earns."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from src.errors import UserError

CLASS_WEIGHTS = ("none", "auto")
IMBALANCE_RATIO = 5.0


def class_weights(mode: str, train_counts: Sequence[int]) -> list[float] | None:
    """`none`: None; `auto`: inverse class frequency of the training folds, scaled to mean 1 (so the loss keeps
    its size and the lr stays comparable). Only training images count: the validation fold must not steer training.
    """
    mode = str(mode).lower()
    if mode not in CLASS_WEIGHTS:
        raise UserError(f"loss.class_weights={mode} is not one of {', '.join(CLASS_WEIGHTS)}")
    if mode == "none":
        return None
    counts = np.asarray(train_counts, dtype=np.float64)
    if (counts == 0).any():
        raise UserError("loss.class_weights=auto needs training images of every class; a class has none in this fold")
    inverse = 1.0 / counts
    return (inverse / inverse.mean()).tolist()


def imbalance_advice(train_counts: Sequence[int], classes: Sequence[str], used: set[str]) -> str | None:
    """A warning when the largest class has >= 5x the images of the smallest in the training folds, naming the
    remedies not yet in use (`used` holds the ones that are)."""
    counts = np.asarray(train_counts)
    if counts.size == 0 or counts.min() <= 0 or counts.max() < IMBALANCE_RATIO * counts.min():
        return None
    remedies = [
        r
        for r in (
            "loss.class_weights=auto",
            "data.sampler=balanced",
            "callbacks.model_checkpoint.monitor=val_balanced_accuracy",
        )
        if r not in used
    ]
    big, small = int(counts.argmax()), int(counts.argmin())
    message = (
        f"imbalanced classes: {classes[big]} has {counts[big]} training images, {classes[small]} only {counts[small]} "
        f"({counts[big] / counts[small]:.1f}x)"
    )
    return f"{message}; consider {', '.join(remedies)}" if remedies else message
