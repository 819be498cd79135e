"""The run layer for training: build data, model, callbacks, tracking and trainer from the config,
fit one fold, export its best model and reports, and return `best_val_accuracy`.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from src import evaluation, tracking
from src.data import FoldDataModule
from src.errors import UserError
from src.features import attach_cached_features
from src.model import ImageClassifier, save_model_file

log = logging.getLogger(__name__)
# Lightning adds a console handler of its own on import; Hydra's root handler already prints and files.
logging.getLogger("lightning").handlers.clear()
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in record.getMessage()
)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")  # the frozen backbone, on purpose


class EpochHistory(L.Callback):
    """Collects one row of epoch-level metrics per training epoch (for the CSV and the curves)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k != "step"}
        self.rows.append({"epoch": trainer.current_epoch, **metrics, "lr": trainer.optimizers[0].param_groups[0]["lr"]})


def build_datamodule(cfg: DictConfig, fold: int) -> FoldDataModule:
    d = cfg.data
    return FoldDataModule(
        train_dir=d.train_dir,
        fold=fold,
        n_folds=cfg.n_folds,
        split_seed=cfg.split_seed,
        image_size=d.image_size,
        augment=d.augment,
        crop_scale=tuple(d.crop_scale),
        hflip=d.hflip,
        batch_size=cfg.batch_size,
        num_workers=d.num_workers,
    )


def build_model(cfg: DictConfig, classes: list[str]) -> ImageClassifier:
    return ImageClassifier(
        backbone=cfg.model.name,
        classes=classes,
        image_size=cfg.data.image_size,
        freeze_backbone=cfg.model.freeze_backbone,
        weights=cfg.model.weights,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
    )


def model_file(cfg: DictConfig, fold: int) -> Path:
    """The seed project's export name: models/cnn_<backbone>_freeze_backbone_<True|False>_fold_<k>.pth."""
    return (
        Path(cfg.model_dir) / f"cnn_{cfg.model.name}_freeze_backbone_{bool(cfg.model.freeze_backbone)}_fold_{fold}.pth"
    )


def train(cfg: DictConfig) -> float:
    """Train fold `cfg.fold` and return its best validation accuracy."""
    fold = cfg.fold
    out_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg, fold)
    datamodule.setup()
    model = build_model(cfg, datamodule.classes)
    attach_cached_features(cfg, model, datamodule)  # frozen backbone: train the head on cached features (#5)
    trainable, total = model.parameter_counts()
    log.info(
        "%s, %d classes, fold %d of %d: training %s of %s parameters (backbone %s)",
        cfg.model.name,
        len(datamodule.classes),
        fold,
        cfg.n_folds,
        f"{trainable:,}",
        f"{total:,}",
        "frozen" if cfg.model.freeze_backbone else "trained",
    )
    run = tracking.start_fold_run(cfg, fold) if cfg.logger else None
    with tracking.fold_guard(run):
        history = EpochHistory()
        callbacks = [instantiate(c) for c in cfg.callbacks.values() if c] + [history]
        trainer = L.Trainer(
            **cfg.trainer,
            max_epochs=cfg.epochs,
            deterministic=cfg.deterministic,
            logger=run.lightning_logger() if run else False,
            callbacks=callbacks,
            default_root_dir=out_dir,
        )
        trainer.fit(model, datamodule=datamodule)
        result = finish_fold(cfg, fold, trainer, model, datamodule, history, out_dir, run.run_id if run else None)
        if run:
            run.finish(result)
    log.info("best_val_accuracy=%.4f (fold %d) -> %s", result["best_val_accuracy"], fold, result["model_file"])
    print(f"best_val_accuracy: {result['best_val_accuracy']:.4f}")
    return result["best_val_accuracy"]


def finish_fold(
    cfg: DictConfig,
    fold: int,
    trainer: L.Trainer,
    model: ImageClassifier,
    datamodule: FoldDataModule,
    history: EpochHistory,
    out_dir: Path,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Reload the best checkpoint; write the exported model, history, curves, split and validation report."""
    checkpoint = trainer.checkpoint_callback
    if checkpoint is None or not checkpoint.best_model_path:
        raise UserError("no checkpoint was saved; keep callbacks.model_checkpoint and at least one validation epoch")
    best_state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(best_state)
    device = trainer.strategy.root_device
    pred = evaluation.predict(model, datamodule.val_dataloader(), device)
    classes = datamodule.classes
    val = evaluation.summary_metrics(pred, len(classes))
    report_text, report = evaluation.class_report(pred, classes)
    files = {
        "split": evaluation.write_csv(datamodule.split_rows(), out_dir / "split.csv"),
        "history": evaluation.write_csv(history.rows, out_dir / "history.csv"),
        "confusion_matrix": evaluation.plot_confusion_matrix(
            pred, classes, out_dir / "val_confusion_matrix.png", f"{cfg.model.name} fold {fold} (validation)"
        ),
    }
    for path in evaluation.plot_curves(history.rows, out_dir / "curves"):
        files[path.stem] = path
    (out_dir / "val_classification_report.txt").write_text(report_text)
    files["report"] = out_dir / "val_classification_report.txt"
    meta = {**model.model_meta(), "fold": fold, "best_val_accuracy": float(checkpoint.best_model_score)}
    if run_id:
        meta["mlflow_run_id"] = run_id
    exported = save_model_file(model_file(cfg, fold), model.native_state_dict(), meta)
    return {
        "best_val_accuracy": float(checkpoint.best_model_score),
        "val_metrics": val,
        "val_report": report,
        "model_file": exported,
        "checkpoint": Path(checkpoint.best_model_path),
        "files": files,
        "meta": meta,
        "model": model,
    }
