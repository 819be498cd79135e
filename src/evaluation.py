"""Evaluation: predictions, metrics, per-class report, confusion counts (their figures: src/plots.py).

Plain functions over tensors and lists; they write files and know nothing of MLflow.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from src import plots


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


def predict(net: nn.Module, loader: DataLoader, device: torch.device | str = "cpu") -> Predictions:
    """Run `net` over `loader` in eval mode and keep logits and targets on the CPU.

    On CPU a convolutional network runs in channels-last memory format, as the served ensemble does (1.1-1.35x
    the images/s of the default for ResNet18 at 32-224 px), and is put back afterwards, so a network saved after
    predicting is laid out as before. Moves and layout changes happen outside inference mode: done
    inside, they would turn the parameters into inference tensors that a later fit cannot train.
    """
    graph = isinstance(net, torch.fx.GraphModule)
    if not graph:  # torch.export modules are frozen in eval mode
        net.eval()
    net.to(device)
    convertible = torch.device(device).type == "cpu" and not graph and any(p.dim() == 4 for p in net.parameters())
    channels_last = False  # switched on at the first batch of images: cached features (N, D) need no conversion
    targets, logits = [], []
    try:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if convertible and x.dim() == 4:
                if not channels_last:
                    net.to(memory_format=torch.channels_last)
                    channels_last = True
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                logits.append(net(x).float().cpu())
            targets.append(torch.as_tensor(y))
    finally:
        if channels_last:
            net.to(memory_format=torch.contiguous_format)
    return Predictions(torch.cat(targets), torch.cat(logits))


def confusion_counts(pred: Predictions, num_classes: int) -> np.ndarray:
    """counts[i, j]: images of class i predicted as class j, for every trained class."""
    t, p = pred.targets.numpy().astype(np.int64), pred.predicted.numpy().astype(np.int64)
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_scores(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support of each class from the confusion counts; 0 where a ratio is 0/0."""
    tp = np.diag(counts).astype(np.float64)
    support, predicted = counts.sum(axis=1), counts.sum(axis=0)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)

    return {
        "precision": ratio(tp, predicted),
        "recall": ratio(tp, support),
        "f1-score": ratio(2 * tp, support + predicted),
        "support": support,
    }


def macro_average(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """The unweighted mean over the classes that have images in the scored set.

    A class without images has no recall, and its F1 would be 0 however good the model is, so it is left
    out; predicting it is still an error, counted in the recall of each image's true class.
    """
    present = scores["support"] > 0
    return {k: float(scores[k][present].mean()) if present.any() else 0.0 for k in ("precision", "recall", "f1-score")}


def summary_metrics(pred: Predictions, num_classes: int) -> dict[str, float]:
    """Accuracy (fraction correct), loss, and macro F1/precision/recall and balanced accuracy (= macro recall).

    Macro averages run over the classes that have images in the scored set (`macro_average`), the same
    numbers as the "macro avg" row of `class_report`.
    """
    macro = macro_average(per_class_scores(confusion_counts(pred, num_classes)))
    return {
        "accuracy": (pred.predicted == pred.targets).double().mean().item(),
        "loss": nn.functional.cross_entropy(pred.logits, pred.targets).item(),
        "f1": macro["f1-score"],
        "balanced_accuracy": macro["recall"],
        "precision": macro["precision"],
        "recall": macro["recall"],
    }


def class_report(pred: Predictions, classes: Sequence[str], digits: int = 4) -> tuple[str, dict[str, Any]]:
    """Per-class precision/recall/F1/support, as text and as a dict in scikit-learn's layout.

    Every trained class has a row (support 0 when the set has none of its images); "macro avg" is
    `macro_average`, so it equals summary_metrics' f1/precision/recall.
    """
    counts = confusion_counts(pred, len(classes))
    scores = per_class_scores(counts)
    total = int(counts.sum())
    keys = ("precision", "recall", "f1-score")
    report: dict[str, Any] = {
        name: {**{k: float(scores[k][i]) for k in keys}, "support": int(scores["support"][i])}
        for i, name in enumerate(classes)
    }
    report["accuracy"] = float(np.trace(counts) / total) if total else 0.0
    report["macro avg"] = {**macro_average(scores), "support": total}
    weights = scores["support"] / total if total else scores["support"] * 0.0
    report["weighted avg"] = {**{k: float((scores[k] * weights).sum()) for k in keys}, "support": total}

    width = max(len(n) for n in [*classes, "weighted avg"])
    line = "{:>{w}s} " + " {:>9.{d}f}" * 3 + " {:>9}\n"
    text = "{:>{w}s} ".format("", w=width) + "".join(f" {h:>9}" for h in (*keys, "support")) + "\n\n"
    for name in classes:
        row = report[name]
        text += line.format(name, *(row[k] for k in keys), row["support"], w=width, d=digits)
    text += "\n" + "{:>{w}s} ".format("accuracy", w=width) + " " * 20
    text += f" {report['accuracy']:>9.{digits}f} {total:>9}\n"
    for avg in ("macro avg", "weighted avg"):
        row = report[avg]
        text += line.format(avg, *(row[k] for k in keys), row["support"], w=width, d=digits)
    absent = [name for name, n in zip(classes, scores["support"], strict=True) if n == 0]
    if absent:
        kept = len(classes) - len(absent)
        text += f"\nmacro avg: over the {kept} classes with images; no images of {', '.join(absent)}\n"
    return text, report


def plot_confusion_matrix(pred: Predictions, classes: Sequence[str], path: Path, title: str) -> Path:
    """Save the confusion matrix of `pred` as a PNG now (layout: `plots.confusion_matrix_figure`)."""
    return plots.save_confusion_matrix(confusion_counts(pred, len(classes)), list(classes), path, title)


def write_csv(rows: Sequence[dict[str, Any]], path: Path, fields: Sequence[str] | None = None) -> Path:
    """Rows of dicts as a CSV with `fields` as columns (default: the union of their keys, in first-seen order),
    so a file with no rows still has its header."""
    fields = list(fields or dict.fromkeys(k for row in rows for k in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict[str, float]]:
    """A numeric CSV (such as history.csv) back as rows of floats, the reverse of `write_csv`.

    An empty cell (a metric not logged that epoch) is left out of its row, as `write_csv` wrote it.
    """
    with Path(path).open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
