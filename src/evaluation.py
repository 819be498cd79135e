"""Evaluation: predictions, metrics, per-class report, confusion matrix and training curves.

Plain functions over tensors and lists; they write files and know nothing of MLflow.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader


@dataclass
class Predictions:
    """Everything a report is made of: targets, logits and the loss over one data set."""

    targets: torch.Tensor
    logits: torch.Tensor

    @property
    def predicted(self) -> torch.Tensor:
        return self.logits.argmax(dim=1)

    @property
    def confidence(self) -> torch.Tensor:
        return self.logits.softmax(dim=1).max(dim=1).values


@torch.inference_mode()
def predict(net: nn.Module, loader: DataLoader, device: torch.device | str = "cpu") -> Predictions:
    """Run `net` over `loader` in eval mode and keep logits and targets on the CPU."""
    if not isinstance(net, torch.fx.GraphModule):  # torch.export modules are frozen in eval mode
        net.eval()
    net.to(device)
    targets, logits = [], []
    for x, y in loader:
        logits.append(net(x.to(device, non_blocking=True)).float().cpu())
        targets.append(torch.as_tensor(y))
    return Predictions(torch.cat(targets), torch.cat(logits))


def summary_metrics(pred: Predictions, num_classes: int) -> dict[str, float]:
    """Accuracy (fraction correct), loss, macro F1/precision/recall and balanced accuracy."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    p, t, n = pred.logits, pred.targets, num_classes
    return {
        "accuracy": multiclass_accuracy(p, t, n, average="micro").item(),
        "loss": nn.functional.cross_entropy(p, t).item(),
        "f1": multiclass_f1_score(p, t, n, average="macro").item(),
        "balanced_accuracy": multiclass_accuracy(p, t, n, average="macro").item(),
        "precision": multiclass_precision(p, t, n, average="macro").item(),
        "recall": multiclass_recall(p, t, n, average="macro").item(),
    }


def class_report(pred: Predictions, classes: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """scikit-learn's per-class precision/recall/F1/support, as text and as a dict."""
    from sklearn.metrics import classification_report

    kwargs = dict(labels=list(range(len(classes))), target_names=list(classes), digits=4, zero_division=0)
    y, p = pred.targets.numpy(), pred.predicted.numpy()
    return classification_report(y, p, **kwargs), classification_report(y, p, output_dict=True, **kwargs)


def plot_confusion_matrix(pred: Predictions, classes: Sequence[str], path: Path, title: str) -> Path:
    """Save the confusion matrix (rows: true class, columns: predicted) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(
        pred.targets.numpy(),
        pred.predicted.numpy(),
        labels=list(range(len(classes))),
        display_labels=list(classes),
        ax=ax,
        colorbar=False,
        xticks_rotation=45 if len(classes) > 8 else "horizontal",
    )
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(history: Sequence[dict[str, float]], path_prefix: Path) -> list[Path]:
    """Loss and accuracy per epoch, train vs validation: `<prefix>_loss.png`, `<prefix>_accuracy.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    epochs = [row["epoch"] for row in history]
    for metric in ("loss", "accuracy"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for stage in ("train", "val"):
            key = f"{stage}_{metric}"
            points = [(e, row[key]) for e, row in zip(epochs, history, strict=True) if row.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=stage)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(f"{path_prefix}_{metric}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Rows of dicts as a CSV with the union of their keys, in first-seen order."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict[str, float]]:
    """A numeric CSV (such as history.csv) back as rows of floats; empty cells become None."""
    with Path(path).open(newline="") as f:
        return [{k: float(v) if v not in ("", None) else None for k, v in row.items()} for row in csv.DictReader(f)]
