"""Calibration of OOF probabilities: expected calibration error (ECE), temperature scaling and a reliability
diagram. OOF files hold probabilities; their logs are logits up to a per-row constant, which softmax ignores,
so scaling log p by 1/T is exactly temperature scaling of the logits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.calibration import calibration_curve
from torchmetrics.functional.classification import multiclass_calibration_error

from src.analysis.oof import TINY

# Temperatures searched: from 20x sharper to 20x flatter than the model's own probabilities.
TEMPERATURE_BOUNDS = (0.05, 20.0)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: the gap between confidence and accuracy in `n_bins` equal-width confidence bins,
    weighted by the share of images in each bin (torchmetrics' definition)."""
    preds = torch.tensor(np.asarray(probs, dtype=np.float64))
    target = torch.tensor(np.asarray(labels, dtype=np.int64))
    return float(multiclass_calibration_error(preds, target, preds.shape[1], n_bins=n_bins, norm="l1"))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T that minimises the mean negative log-likelihood of softmax(logits / T).

    `logits` may be log-probabilities. T > 1 means the model was over-confident. The search runs over log T
    (bounded, TEMPERATURE_BOUNDS), where the NLL is smooth and both directions are scaled alike.
    """
    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(logits))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / math.exp(log_t), axis=1)[rows, labels].mean())

    low, high = (math.log(t) for t in TEMPERATURE_BOUNDS)
    return float(math.exp(minimize_scalar(nll, bounds=(low, high), method="bounded").x))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the same ranking of classes in every row, sharper (T < 1) or flatter (T > 1)."""
    return softmax(np.log(np.clip(probs, TINY, None)) / temperature, axis=1)


def reliability_diagram(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, n_bins: int = 15, title: str = ""
) -> Path:
    """Accuracy against confidence per confidence bin for each named (probs, labels) pair, over a histogram of
    the confidences; a calibrated model lies on the diagonal."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    edges = np.linspace(0, 1, n_bins + 1)
    for name, (probs, labels) in curves.items():
        confidence = probs.max(axis=1)
        correct = (probs.argmax(axis=1) == labels).astype(int)
        accuracy, mean_confidence = calibration_curve(
            correct, confidence, n_bins=n_bins, strategy="uniform", pos_label=1
        )
        ece = expected_calibration_error(probs, labels, n_bins)
        (line,) = top.plot(mean_confidence, accuracy, marker="o", label=f"{name} (ECE {ece:.3f})")
        bottom.hist(confidence, bins=edges, histtype="step", color=line.get_color(), linewidth=1.5)
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    top.set_title(title or "reliability of out-of-fold predictions")
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path)
    return path
