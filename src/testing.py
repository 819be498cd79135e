"""The run layer for test.py: load a trained model, score it on a labelled folder, report and track."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from src import evaluation
from src.data import ImageDataset, build_transform, make_loader, resolve_num_workers, scan_image_folder
from src.errors import UserError
from src.model import load_model_file

log = logging.getLogger(__name__)


def load_any(ref: str, cfg: DictConfig) -> tuple[torch.nn.Module, dict[str, Any], dict[str, str]]:
    """(network, metadata, tags linking to its origin) for a file path or an MLflow URI."""
    if ref.startswith(("models:/", "runs:/")):
        from src import tracking

        return tracking.load_logged_model(ref, tracking.tracking_uri(cfg))
    return (*load_model_file(ref), {"model_file": str(Path(ref).resolve())})


def print_report(metrics: dict[str, float], report: dict[str, Any], classes: list[str], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    summary = Table(title=title)
    for name in metrics:
        summary.add_column(name, justify="right")
    summary.add_row(*(f"{v:.4f}" for v in metrics.values()))
    per_class = Table(title="per class")
    for column in ("class", "precision", "recall", "f1", "support"):
        per_class.add_column(column, justify="right")
    for name in classes:
        row = report[name]
        per_class.add_row(
            name, f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1-score']:.4f}", str(int(row["support"]))
        )
    console = Console()
    console.print(summary)
    console.print(per_class)


def test(cfg: DictConfig) -> dict[str, float]:
    """Score `cfg.ckpt` on `cfg.data.test_dir`; write reports to the run folder; return the metrics."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise UserError(
            "pass the model to score: ckpt=models/<file>.pth, ckpt=<run dir>/checkpoints/best.ckpt "
            "or ckpt=models:/<name>@champion"
        )
    ref = str(cfg.ckpt)
    if cfg.logger and ref.startswith(("models:/", "runs:/")):
        from src.tracking import check_reachable, tracking_uri

        check_reachable(tracking_uri(cfg))
    net, meta, origin = load_any(ref, cfg)
    classes = list(meta["classes"])
    images = scan_image_folder(cfg.data.test_dir, "data.test_dir")
    unknown = [c for c in images.classes if c not in classes]
    if unknown:
        raise UserError(
            f"data.test_dir has classes the model was not trained on: {', '.join(unknown)}; "
            f"the model knows {', '.join(classes)}; remove those folders or train on them"
        )
    index = {name: i for i, name in enumerate(classes)}
    targets = [index[images.classes[t]] for t in images.targets]
    transform = build_transform(meta["image_size"], mean=meta["mean"], std=meta["std"])
    loader = make_loader(
        ImageDataset(images.root, images.paths, targets, transform),
        cfg.batch_size,
        resolve_num_workers(cfg.data.num_workers),
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pred = evaluation.predict(net, loader, device)
    metrics = evaluation.summary_metrics(pred, len(classes))
    report_text, report = evaluation.class_report(pred, classes)

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "metrics": out_dir / "test_metrics.json",
        "report": out_dir / "test_classification_report.txt",
        "confusion_matrix": evaluation.plot_confusion_matrix(
            pred, classes, out_dir / "test_confusion_matrix.png", f"{meta['backbone']} (test)"
        ),
        "predictions": evaluation.write_csv(
            [
                {"path": p, "true": classes[t], "predicted": classes[k], "confidence": round(c, 6)}
                for p, t, k, c in zip(
                    images.paths, targets, pred.predicted.tolist(), pred.confidence.tolist(), strict=True
                )
            ],
            out_dir / "test_predictions.csv",
        ),
    }
    files["metrics"].write_text(json.dumps({**metrics, "n_images": len(targets), "ckpt": ref}, indent=2))
    files["report"].write_text(report_text)
    print_report(metrics, report, classes, f"{ref} on {cfg.data.test_dir} ({len(targets)} images)")
    if cfg.logger:
        from src import tracking

        run_id = tracking.log_test_run(cfg, ref, metrics, files, origin)
        log.info("MLflow: test run %s", run_id)
    log.info("reports written to %s", out_dir)
    return metrics
