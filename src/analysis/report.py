"""The error-analysis report of one configuration, from its OOF predictions, its k fold models and the training
images: what the model gets most wrong and where it looks, which classes it mixes up, which labels look wrong
and how far its confidence can be trusted. Files only, no tracking: the caller logs `out_dir` where it likes.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_fscore_support

from src.analysis import calibration
from src.analysis.cam import explain
from src.analysis.gallery import image_grid, short_name, thumbnail
from src.analysis.label_issues import find_label_issues, write_label_issues
from src.analysis.oof import OOF, read_oof
from src.errors import UserError

SCORES = ("precision", "recall", "f1")
HTML_ROWS = 20  # rows of each table shown in index.html; the CSV files hold them all


def confused_pairs(oof: OOF) -> pd.DataFrame:
    """Every (true, predicted) pair of different classes that occurs, with its count and the share of the true
    class's images it takes, most frequent first."""
    wrong = oof.labels != oof.predicted
    support = np.bincount(oof.labels, minlength=len(oof.classes))
    pairs = pd.DataFrame({"true": oof.labels[wrong], "predicted": oof.predicted[wrong]})
    frame = pairs.value_counts().reset_index(name="count")
    frame["share_of_true"] = frame["count"] / support[frame["true"].to_numpy()]
    frame = frame.sort_values(["count", "share_of_true"], ascending=False, ignore_index=True)
    names = np.asarray(oof.classes, dtype=object)
    return frame.assign(true=names[frame["true"].to_numpy()], predicted=names[frame["predicted"].to_numpy()])


def per_class(oof: OOF) -> pd.DataFrame:
    """Precision, recall, F1 and support of each class over all OOF rows, and the mean and (population) std of
    each score over the folds, each fold scored on its own rows (0 where a ratio is 0/0)."""
    labels = list(range(len(oof.classes)))

    def scores(mask: np.ndarray) -> np.ndarray:
        p, r, f, s = precision_recall_fscore_support(
            oof.labels[mask], oof.predicted[mask], labels=labels, zero_division=0
        )
        return np.stack([p, r, f, s])

    overall = scores(np.ones(len(oof), dtype=bool))
    per_fold = np.stack([scores(oof.folds == k) for k in np.unique(oof.folds)])
    frame = pd.DataFrame({"class": oof.classes, **{k: overall[i] for i, k in enumerate(SCORES)}})
    frame["support"] = overall[3].astype(int)
    for i, k in enumerate(SCORES):
        frame[f"{k}_fold_mean"] = per_fold[:, i].mean(axis=0)
        frame[f"{k}_fold_std"] = per_fold[:, i].std(axis=0)
    return frame


def top_losses(oof: OOF, top_k: int) -> pd.DataFrame:
    """The `top_k` rows with the highest loss, -log p(true class): confident mistakes first."""
    order = np.argsort(-oof.losses, kind="stable")[:top_k]
    return pd.DataFrame(
        {
            "path": [oof.paths[i] for i in order],
            "fold": oof.folds[order],
            "true": [oof.classes[k] for k in oof.labels[order]],
            "predicted": [oof.classes[k] for k in oof.predicted[order]],
            "confidence": oof.confidence[order],
            "loss": oof.losses[order],
            "row": order,
        }
    )


def _fold_images(rows: pd.DataFrame, oof: OOF, model_file: Path, image_root: Path) -> list[np.ndarray]:
    """The images as the fold model saw them (resized, centre-cropped), with the Grad-CAM of the class it
    predicted drawn over them where the network has a convolutional map (see src.analysis.cam)."""
    from src.model import load_model_file
    from src.serving.ensemble_model import preprocessing_from_meta

    net, meta = load_model_file(model_file)
    if list(meta["classes"]) != oof.classes:
        raise UserError(f"{model_file} predicts classes {list(meta['classes'])}, the OOF file has {oof.classes}")
    paths = [Path(image_root) / p for p in rows["path"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"image {missing[0]} does not exist; point the analysis at the training image folder")
    return explain([net], preprocessing_from_meta(meta), paths, oof.predicted[rows["row"].to_numpy()])


def top_losses_figure(
    rows: pd.DataFrame, oof: OOF, model_files: Mapping[int, Path], image_root: Path, path: Path
) -> Path:
    """The top-loss gallery; a fold without a model file shows its images without a CAM."""
    images: dict[int, np.ndarray] = {}
    for fold, group in rows.groupby("fold", sort=True):
        if int(fold) in model_files:
            shown = _fold_images(group, oof, Path(model_files[int(fold)]), image_root)
        else:
            shown = [thumbnail(Path(image_root) / p) for p in group["path"]]
        images.update(zip(group.index, shown, strict=True))
    captions = [
        f"true: {short_name(r.true)}\npred: {short_name(r.predicted)} ({r.confidence:.2f})\n"
        f"loss {r.loss:.2f} · fold {r.fold}"
        for r in rows.itertuples()
    ]
    title = "highest-loss out-of-fold images (Grad-CAM of the predicted class, from the model that held each out)"
    return image_grid(
        [images[i] for i in rows.index], captions, path, title=title, alerts=list(rows["true"] != rows["predicted"])
    )


def _table(frame: pd.DataFrame, rows: int = HTML_ROWS) -> str:
    if frame.empty:
        return "<p>none</p>"
    more = f"<p>{len(frame) - rows} more rows in the CSV file.</p>" if len(frame) > rows else ""
    return frame.head(rows).to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0) + more


def _html(summary: Mapping[str, str], sections: list[tuple[str, str]]) -> str:
    items = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary.items())
    body = "".join(f"<h2>{html.escape(title)}</h2>\n{content}\n" for title, content in sections)
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:110em}table{border-collapse:collapse;margin:.5em 0}"
        "th,td{padding:.2em .8em;text-align:left;border-bottom:1px solid #ddd}img{max-width:100%}"
    )
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>What went wrong</title><style>{style}</style>"
        f"</head><body>\n<h1>What went wrong: out-of-fold error analysis</h1>\n<table>{items}</table>\n{body}"
        f"</body></html>\n"
    )


def _link(name: str) -> str:
    return f"<a href='{name}'>{name}</a>"


def _image(name: str, alt: str) -> str:
    return f"<p><img src='{name}' alt='{html.escape(alt)}'></p>"


def write_report(
    oof_csv: Path, model_files: dict[int, Path], image_root: Path, out_dir: Path, *, top_k: int = 24
) -> dict[str, float]:
    """Write the error-analysis report of `oof_csv` into `out_dir` (index.html and the files it shows) and return
    its metrics: n_label_issues, ece, ece_after_temperature and temperature.

    `model_files[k]` is fold k's model, the one that never saw fold k's images, so it draws their CAMs.
    """
    from src.plots import confusion_matrix_figure

    oof = read_oof(Path(oof_csv))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    pairs = confused_pairs(oof)
    pairs.to_csv(out_dir / "confused_pairs.csv", index=False)
    classes = per_class(oof)
    classes.to_csv(out_dir / "per_class.csv", index=False)
    counts = np.bincount(oof.labels * len(oof.classes) + oof.predicted, minlength=len(oof.classes) ** 2)
    confusion = counts.reshape(len(oof.classes), len(oof.classes))
    confusion_matrix_figure(confusion, oof.classes, "out-of-fold predictions").savefig(out_dir / "confusion_matrix.png")

    temperature = calibration.fit_temperature(oof.log_probs, oof.labels)
    scaled = calibration.apply_temperature(oof.probs, temperature)
    ece = calibration.expected_calibration_error(oof.probs, oof.labels)
    ece_after = calibration.expected_calibration_error(scaled, oof.labels)
    calibration.reliability_diagram(
        {"out-of-fold": (oof.probs, oof.labels), f"after temperature T={temperature:.2f}": (scaled, oof.labels)},
        out_dir / "reliability.png",
    )

    issues = find_label_issues(oof)
    write_label_issues(issues, image_root, out_dir)

    losses = top_losses(oof, top_k)
    losses.drop(columns="row").to_csv(out_dir / "top_losses.csv", index=False)
    top_losses_figure(losses, oof, model_files, image_root, out_dir / "top_losses.png")

    metrics = {
        "n_label_issues": float(len(issues)),
        "ece": ece,
        "ece_after_temperature": ece_after,
        "temperature": temperature,
    }
    accuracy = float((oof.predicted == oof.labels).mean())
    summary = {
        "images": f"{len(oof)} in {len(np.unique(oof.folds))} folds, {len(oof.classes)} classes",
        "out-of-fold accuracy": f"{accuracy:.4f} ({int((oof.predicted != oof.labels).sum())} errors)",
        "out-of-fold log loss": f"{oof.losses.mean():.4f}",
        "possible label issues": f"{len(issues)} ({len(issues) / len(oof):.1%} of the images)",
        "expected calibration error": f"{ece:.4f}, {ece_after:.4f} after temperature scaling",
        "temperature": f"{temperature:.3f} (above 1: over-confident; below 1: under-confident)",
    }
    shown_pairs = pairs.assign(share_of_true=pairs["share_of_true"].map("{:.1%}".format))
    sections = [
        (
            f"Highest losses (top {len(losses)})",
            "<p>Each image was predicted by the fold model that never trained on it; the heat map shows where "
            "that model looked for the class it predicted (none for architectures without a convolutional map)."
            "</p>"
            + _image("top_losses.png", "highest-loss images")
            + f"<p>All listed in {_link('top_losses.csv')}.</p>",
        ),
        ("Most confused pairs", _table(shown_pairs) + f"<p>All pairs: {_link('confused_pairs.csv')}.</p>"),
        ("Confusion matrix", _image("confusion_matrix.png", "out-of-fold confusion matrix")),
        (
            "Per class, lowest F1 first",
            _table(classes.sort_values("f1", kind="stable"))
            + f"<p>Every class in class order: {_link('per_class.csv')}; fold_mean and fold_std are over the folds, "
            "each scored on its own images.</p>",
        ),
        (
            f"Possible label issues ({len(issues)})",
            "<p>Ranked by cleanlab (confident learning) on the out-of-fold probabilities; score is the probability "
            "of the given label, lowest first. Check these images before training longer.</p>"
            + (_image("label_issues.png", "possible label issues") if len(issues) else "")
            + _table(issues)
            + f"<p>All issues: {_link('label_issues.csv')}.</p>",
        ),
        (
            "Calibration",
            f"<p>ECE {ece:.4f} before and {ece_after:.4f} after temperature scaling with T = {temperature:.3f} "
            "(probabilities = softmax(log p / T), fitted on the out-of-fold predictions; the ranking of classes, "
            "and so every prediction, is unchanged).</p>"
            + (
                "<p>Temperature scaling minimises the log loss, not the ECE; with few images or confidently wrong "
                "labels it can raise the ECE.</p>"
                if ece_after > ece
                else ""
            )
            + _image("reliability.png", "reliability diagram"),
        ),
    ]
    (out_dir / "index.html").write_text(_html(summary, sections), encoding="utf-8")
    return metrics
