"""The run layer for test.py: load a trained model or fold ensemble, score it on a labelled folder, report and track."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from src import evaluation, file_memo
from src.data import class_name, resolve_num_workers, scan_image_folder
from src.errors import UserError, positive_number

log = logging.getLogger(__name__)


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


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Score `cfg.ckpt` (a model or a fold ensemble) on `cfg.data.test_dir`; write reports; return the metrics.

    Predictions go through the same Predictor as predict.py and the served model. Metrics take logits; an
    ensemble's "logits" are the log of its mean probabilities, since softmax(log p) = p: accuracy, F1 and the
    report follow its argmax, and `loss` is the ensemble's negative log-likelihood. For one model without TTA the
    log-probabilities are log_softmax(logits), which gives the same metrics as the logits themselves.
    """
    from src.predicting import build_predictor, load_model
    from src.serving.files import predict_files

    if OmegaConf.is_missing(cfg, "ckpt"):
        raise UserError(
            "pass the model to score: ckpt=models/<file>.pth, ckpt=<run dir>/checkpoints/best.ckpt, "
            "ckpt=models:/<name>@champion or ckpt=runs:/<parent run id> (its fold ensemble)"
        )
    positive_number("batch_size", cfg.batch_size, integer=True)
    ref = str(cfg.ckpt)
    model = load_model(ref, cfg)  # a bad ckpt is the first thing to report
    file_memo.use_store(cfg.get("feature_cache_dir"))  # read only: training's scans checked these images already
    images = scan_image_folder(cfg.data.test_dir, "data.test_dir")
    predictor = build_predictor(model, cfg, len(images.paths))  # the count decides whether ONNX pays
    classes = list(predictor.classes)
    index = {class_name(name): i for i, name in enumerate(classes)}  # a model's classes from a decomposed `café`
    unknown = [c for c in images.classes if c not in index]
    if unknown:
        raise UserError(
            f"data.test_dir has classes the model was not trained on: {', '.join(unknown)}; "
            f"the model knows {', '.join(classes)}; remove those folders or train on them"
        )
    targets = [index[images.classes[t]] for t in images.targets]
    result = predict_files(
        predictor,
        [images.root / p for p in images.paths],
        cfg.batch_size,
        resolve_num_workers(cfg.data.num_workers),
        progress=False,
    )
    if result.failed:
        raise UserError(f"{images.paths[result.failed[0]]} in data.test_dir could not be decoded; remove or fix it")
    pred = evaluation.Predictions(torch.as_tensor(targets)[result.indices], result.log_probs)
    metrics = evaluation.summary_metrics(pred, len(classes))
    report_text, report = evaluation.class_report(pred, classes)
    n_models, tta = len(predictor.nets), predictor.tta
    origin = {**model.origin, "n_models": str(n_models), "tta": tta}
    backbone = model.meta.get("backbone", "model")
    title = f"{backbone} ensemble of {n_models}" if n_models > 1 else str(backbone)

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "metrics": out_dir / "test_metrics.json",
        "report": out_dir / "test_classification_report.txt",
        "confusion_matrix": evaluation.plot_confusion_matrix(
            pred, classes, out_dir / "test_confusion_matrix.png", f"{title} (test)"
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
    summary = {**metrics, "n_images": len(targets), "ckpt": ref, "n_models": n_models, "tta": tta}
    files["metrics"].write_text(json.dumps(summary, indent=2))
    files["report"].write_text(report_text)
    setting = f", {n_models} models" if n_models > 1 else ""
    setting += f", tta={tta}" if tta != "none" else ""
    print_report(metrics, report, classes, f"{ref}{setting} on {cfg.data.test_dir} ({len(targets)} images)")
    if cfg.logger:
        from src import tracking

        run_id = tracking.log_test_run(cfg, ref, metrics, files, origin)
        log.info("MLflow: test run %s", run_id)
    log.info("reports written to %s", out_dir)
    return metrics
