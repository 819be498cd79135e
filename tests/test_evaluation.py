"""Evaluation: one definition of the macro averages in the metrics and the report, readable confusion
matrices for many classes with long names, and the CSV files the runs and the CV report share."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, recall_score
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from src.evaluation import (
    Predictions,
    class_report,
    confusion_counts,
    plot_confusion_matrix,
    predict,
    read_csv,
    summary_metrics,
    write_csv,
)
from src.plots import confusion_matrix_figure

CLASSES = ["cat", "dog", "fox", "owl"]


def predictions(targets: list[int], predicted: list[int], num_classes: int = len(CLASSES)) -> Predictions:
    """Logits whose argmax is `predicted`."""
    return Predictions(torch.tensor(targets), torch.nn.functional.one_hot(torch.tensor(predicted), num_classes) * 4.0)


def report_macro(text: str) -> list[float]:
    (line,) = [line for line in text.splitlines() if line.strip().startswith("macro avg ")]
    return [float(v) for v in line.split()[2:5]]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true:UserWarning")
@pytest.mark.parametrize(
    "predicted",
    [
        [0, 0, 0, 1, 1, 2, 2, 2],  # owl has no test images and is never predicted: a perfect model
        [0, 0, 3, 1, 0, 2, 2, 1],  # owl has no test images but is predicted once
    ],
)
def test_a_class_without_test_images_counts_the_same_in_metrics_and_report(predicted: list[int]) -> None:
    targets = [0, 0, 0, 1, 1, 2, 2, 2]
    pred = predictions(targets, predicted)
    metrics = summary_metrics(pred, len(CLASSES))
    text, report = class_report(pred, CLASSES)

    macro = report["macro avg"]
    assert metrics["f1"] == pytest.approx(macro["f1-score"])
    assert metrics["precision"] == pytest.approx(macro["precision"])
    assert metrics["recall"] == pytest.approx(macro["recall"]) == pytest.approx(metrics["balanced_accuracy"])
    assert report_macro(text) == pytest.approx([macro["precision"], macro["recall"], macro["f1-score"]], abs=1e-4)
    # The stated definition: the mean over the classes that have images in the set (scikit-learn's own
    # balanced accuracy, and its macro scores restricted to those labels).
    present = sorted(set(targets))
    assert metrics["f1"] == pytest.approx(f1_score(targets, predicted, labels=present, average="macro"))
    assert metrics["precision"] == pytest.approx(
        precision_score(targets, predicted, labels=present, average="macro", zero_division=0)
    )
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(targets, predicted))
    assert metrics["accuracy"] == pytest.approx(np.mean(np.equal(targets, predicted)))
    # The absent class is still listed, with support 0, and the report says why it is not averaged.
    assert report["owl"]["support"] == 0 and "no images of owl" in text
    if predicted[2] == 0:
        assert metrics["f1"] == 1.0 and macro["f1-score"] == 1.0


def test_with_every_class_present_the_metrics_match_the_epoch_metrics() -> None:
    """Validation folds are stratified, so every class is there: the per-epoch torchmetrics values agree."""
    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(4), 5)
    predicted = np.where(rng.random(20) < 0.6, targets, rng.integers(0, 4, 20))
    pred = predictions(targets.tolist(), predicted.tolist())
    metrics = summary_metrics(pred, 4)
    assert metrics["f1"] == pytest.approx(multiclass_f1_score(pred.logits, pred.targets, 4, average="macro").item())
    assert metrics["balanced_accuracy"] == pytest.approx(
        multiclass_accuracy(pred.logits, pred.targets, 4, average="macro").item()
    )
    assert metrics["recall"] == pytest.approx(recall_score(targets, predicted, average="macro"))
    _, report = class_report(pred, CLASSES)
    assert report["accuracy"] == pytest.approx(metrics["accuracy"])
    assert confusion_counts(pred, 4).sum() == 20 and np.trace(confusion_counts(pred, 4)) == (targets == predicted).sum()


LONG_WORDS = ["immunohistochemistry", "hubble_deep_field", "electron_micrograph", "x"]


def class_names(n: int) -> list[str]:
    return [f"{LONG_WORDS[i % len(LONG_WORDS)]}_{i}" for i in range(n)]


def assert_labels_readable(fig) -> None:
    """Tick labels: none overlaps another on its axis, all lie inside the figure, in a readable size."""
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    page = fig.bbox
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        labels = [label for label in labels if label.get_text()]
        boxes = [label.get_window_extent(renderer) for label in labels]
        for label, box in zip(labels, boxes, strict=True):
            assert label.get_fontsize() >= 6
            assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, label
        for (a, box_a), (b, box_b) in itertools.combinations(zip(labels, boxes, strict=True), 2):
            assert not box_a.overlaps(box_b), (a.get_text(), b.get_text())
    title = ax.title.get_window_extent(renderer)
    assert page.x0 <= title.x0 and title.x1 <= page.x1 and title.y1 <= page.y1


@pytest.mark.parametrize("n", [2, 12, 40, 100])
def test_confusion_matrix_labels_stay_apart_and_inside_for_up_to_100_long_names(n: int, tmp_path: Path) -> None:
    classes = class_names(n)
    rng = np.random.default_rng(n)
    targets = np.repeat(np.arange(n), 3)
    predicted = np.where(rng.random(targets.size) < 0.7, targets, rng.integers(0, n, targets.size))
    pred = predictions(targets.tolist(), predicted.tolist(), n)
    title = "resnet18 fold 0 (validation)"

    fig = confusion_matrix_figure(confusion_counts(pred, n), classes, title)
    fig.canvas.draw()
    assert_labels_readable(fig)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == classes  # whole names, none dropped

    path = plot_confusion_matrix(pred, classes, tmp_path / "cm.png", title)
    assert path.stat().st_size < 2_000_000
    with Image.open(path) as image:
        assert np.allclose(image.size, fig.get_size_inches() * fig.dpi, atol=1)  # the figure that was checked


def test_csv_rows_round_trip_with_missing_cells(tmp_path: Path) -> None:
    """history.csv: a metric missing in one epoch is an empty cell, read back as absent from that row."""
    rows = [{"epoch": 0, "train_loss": 1.5}, {"epoch": 1, "train_loss": 1.0, "val_loss": 0.5}]
    path = write_csv(rows, tmp_path / "sub" / "history.csv")
    assert path.read_text().splitlines() == ["epoch,train_loss,val_loss", "0,1.5,", "1,1.0,0.5"]
    assert read_csv(path) == [{"epoch": 0.0, "train_loss": 1.5}, {"epoch": 1.0, "train_loss": 1.0, "val_loss": 0.5}]


def _draw_in_loky_worker(prefix: str) -> list[bool]:
    """In a joblib (loky) worker, whose start method a spawned helper could not use: figures are drawn at once."""
    from src import plots

    history = [{"epoch": 0, "train_loss": 1.0, "val_loss": 1.2}, {"epoch": 1, "train_loss": 0.5, "val_loss": 0.7}]
    futures = [plots.later(plots.save_curves, history, Path(prefix))]
    plots.wait(futures)
    return [plots._helper is None, *(Path(f"{prefix}_{m}.png").is_file() for m in ("loss", "accuracy"))]


def test_figures_drawn_by_the_helper_are_written_once_waited_for(tmp_path: Path) -> None:
    from joblib import Parallel, delayed

    from src import plots

    history = [{"epoch": 0, "train_accuracy": 0.5, "val_accuracy": 0.4}, {"epoch": 1, "train_accuracy": 0.9}]
    counts = np.array([[3, 1], [0, 4]])
    futures = [
        plots.later(plots.save_curves, history, tmp_path / "curves"),
        plots.later(plots.save_confusion_matrix, counts, ["cat", "dog"], tmp_path / "cm.png", "t"),
    ]
    plots.wait(futures)
    plots.wait(futures)  # a second wait (the run, then the job's end) finds them settled
    assert futures[1].result() == tmp_path / "cm.png"
    for name in ("curves_loss.png", "curves_accuracy.png", "cm.png"):
        assert Image.open(tmp_path / name).size[0] > 100, name
    in_workers = (delayed(_draw_in_loky_worker)(str(tmp_path / f"w{i}")) for i in range(2))
    results = Parallel(n_jobs=2, backend="loky")(in_workers)
    assert all(all(result) for result in results), results


def test_predict_leaves_the_network_as_it_found_it_and_trainable() -> None:
    """predict runs channels-last on CPU; afterwards the parameters are the same values, in the default layout,
    and ordinary tensors a fit can train (not inference tensors), and the logits match a plain forward pass."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images = torch.randn(6, 3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.arange(6) % 3), batch_size=4)
    pred = predict(net, loader)
    with torch.no_grad():
        expected = net.eval()(images)
    torch.testing.assert_close(pred.logits, expected, rtol=1e-4, atol=1e-4)
    for name, value in net.state_dict().items():
        assert value.is_contiguous(), name
        assert not value.is_inference(), name
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    net.train()
    net(images).sum().backward()  # an inference tensor among the parameters would fail here
    assert net.conv1.weight.grad is not None


def test_class_names_no_installed_font_draws_are_named_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Instead of matplotlib's warning per glyph and figure: one line naming the characters drawn as boxes."""
    import logging
    import warnings

    from src import plots

    monkeypatch.setattr(plots, "_covered", None)
    monkeypatch.setattr(plots, "_reported", set())
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        for i in range(2):
            # 狗 where no CJK font is installed; a private-use character that no font has, everywhere
            plots.save_confusion_matrix(np.eye(2, dtype=int), ["狗\U000f0000", "café"], tmp_path / f"{i}.png", "test")
    said = [r.getMessage() for r in caplog.records if "no installed font" in r.getMessage()]
    assert len(said) == 1 and "\U000f0000" in said[0] and "é" not in said[0], said
    assert not [w for w in caught if "Glyph" in str(w.message)]
    assert (tmp_path / "1.png").stat().st_size > 0
