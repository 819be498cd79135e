"""Evaluation: predictions, metrics, per-class report, confusion matrix and training curves.

Plain functions over tensors and lists; they write files and know nothing of MLflow.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


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


def _cell_inches(n: int) -> float:
    """The side of one matrix cell: room for counts up to 50 classes, then just for a tick label."""
    return 0.5 if n <= 20 else 0.3 if n <= 50 else 0.2


def confusion_matrix_figure(counts: np.ndarray, classes: Sequence[str], title: str) -> Figure:
    """The confusion matrix (rows: true class, columns: predicted), sized to the number of classes.

    Each class gets a cell of fixed size and tick labels in a font whose line fits that cell; column labels
    stand vertically, so long names never run into each other, and the margins are measured from the
    rendered labels, so all of them lie inside the figure. Counts are written in the cells up to 30
    classes; beyond that a colour bar reads them.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(classes)
    cell = _cell_inches(n)
    font = min(10.0, cell * 72 * 0.6)
    side = max(2.0, n * cell)
    fig = Figure(figsize=(side, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    image = ax.imshow(counts, cmap="Blues", interpolation="nearest", vmin=0)
    ax.set_xticks(range(n), list(classes), rotation=90, fontsize=font)
    ax.set_yticks(range(n), list(classes), fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    colorbar = None
    if n <= 30:
        threshold = counts.max() / 2 if counts.size else 0
        for i, j in np.ndindex(counts.shape):
            color = "white" if counts[i, j] > threshold else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=0.8 * font, color=color)
    else:
        colorbar = fig.add_axes((0.0, 0.0, 0.01, 1.0))
        fig.colorbar(image, cax=colorbar)
    _fit_margins(fig, ax, colorbar, side)
    return fig


def _fit_margins(fig: Figure, ax: Axes, colorbar: Axes | None, side: float, pad: float = 0.1) -> None:
    """Size the figure to a `side`-inch square of cells plus what its labels, title and colour bar need.

    Text sizes are in points, so the margins measured once hold at the final figure size.
    """
    renderer = fig.canvas.get_renderer()
    inner, outer = ax.get_window_extent(renderer), ax.get_tightbbox(renderer)
    left, bottom = (inner.x0 - outer.x0) / fig.dpi + pad, (inner.y0 - outer.y0) / fig.dpi + pad
    right, top = (outer.x1 - inner.x1) / fig.dpi + pad, (outer.y1 - inner.y1) / fig.dpi + pad
    gap, bar = 0.15, 0.2
    if colorbar is not None:
        bar_labels = (colorbar.get_tightbbox(renderer).x1 - colorbar.get_window_extent(renderer).x1) / fig.dpi
        right = max(right, gap + bar + bar_labels + pad)
    width, height = left + side + right, bottom + side + top
    fig.set_size_inches(width, height)
    ax.set_position((left / width, bottom / height, side / width, side / height))
    if colorbar is not None:
        colorbar.set_position(((left + side + gap) / width, bottom / height, bar / width, side / height))


def plot_confusion_matrix(pred: Predictions, classes: Sequence[str], path: Path, title: str) -> Path:
    """Save the confusion matrix of `pred` as a PNG (layout: `confusion_matrix_figure`)."""
    confusion_matrix_figure(confusion_counts(pred, len(classes)), classes, title).savefig(path, dpi=100)
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
