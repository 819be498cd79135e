"""The run layer for training: build data, model, callbacks, tracking and trainer from the config,
fit one fold, export its best model and reports, and return `best_val_accuracy`.
"""

from __future__ import annotations

import copy
import functools
import importlib
import logging
import os
import shutil
import statistics
import tempfile
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict

from src import evaluation, file_memo, files, finetune, loss, plots, tracking, tuning
from src.data import FoldDataModule, available_cpus, resolve_augment, resolve_num_workers
from src.errors import UserError, positive_number, warn_once
from src.features import attach_cached_features
from src.model import ImageClassifier, save_model_file
from src.preprocessing import Preprocessing, resolve_preprocessing

log = logging.getLogger(__name__)
# Lightning adds a console handler of its own on import; Hydra's root handler already prints and files.
logging.getLogger("lightning").handlers.clear()
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in record.getMessage()
)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")  # the frozen backbone, on purpose


class EpochHistory(L.Callback):
    """One row of epoch-level metrics per epoch, rewritten to `history.csv` after every epoch; the curves of the
    finished history handed to src/plots.py's helper as training ends (`curves`), to draw while the fold is
    closed (not from a ddp_spawn worker, whose helper would outlive it: the fold's process draws them then).

    The file (not process memory) is the record: it survives ddp_spawn workers, and the rows
    travel in checkpoints so a resumed fold continues its history.
    """

    def __init__(self, path: Path) -> None:
        self.path, self.rows, self.lr = Path(path), [], None
        self.curves: Future | None = None
        self.pid = os.getpid()  # the process that finishes the fold; a ddp_spawn worker gets a pickled copy

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The lr this epoch trains with: Lightning steps epoch schedulers before on_train_epoch_end.
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k != "step"}
        self.rows.append({"epoch": trainer.current_epoch, **metrics, "lr": self.lr})
        if trainer.is_global_zero:
            evaluation.write_csv(self.rows, self.path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.rows and os.getpid() == self.pid:
            self.curves = plots.later(plots.save_curves, list(self.rows), self.path.parent / "curves")

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict["rows"])


def parallel_jobs() -> int:
    """How many jobs of this sweep train side by side on this machine: the joblib launcher's n_jobs, else 1.

    joblib counts a negative n_jobs back from the CPU count (-1: all, -2: all but one); SLURM jobs have their own.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    in_sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    n_jobs = HydraConfig.get().launcher.get("n_jobs") if in_sweep else None
    if not isinstance(n_jobs, int) or n_jobs == 0:
        return 1
    return n_jobs if n_jobs > 0 else max(1, available_cpus() + 1 + n_jobs)


def preprocessing(cfg: DictConfig) -> Preprocessing:
    """The run's evaluation preprocessing: explicit data.* settings, else the weights' own, else the defaults."""
    d = cfg.data
    return resolve_preprocessing(
        cfg.model.name,
        cfg.model.weights,
        d.get("image_size"),
        d.get("resize_size"),
        d.get("interpolation"),
        d.get("mean"),
        d.get("std"),
    )


def with_resolved_data(cfg: DictConfig) -> DictConfig:
    """A copy of `cfg` whose data.* preprocessing holds the resolved values and data.augment its name, so that
    the MLflow params, the saved config and the run's identity record what ran, not `null` or `true`."""
    prep = preprocessing(cfg)
    log.info(
        "preprocessing (%s): resize %d, crop %d, %s, mean %s, std %s",
        prep.source,
        prep.resize_size,
        prep.crop_size,
        prep.interpolation,
        list(prep.mean),
        list(prep.std),
    )
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.data.image_size = prep.crop_size
        cfg.data.resize_size = prep.resize_size
        cfg.data.interpolation = prep.interpolation
        cfg.data.mean = list(prep.mean)
        cfg.data.std = list(prep.std)
        cfg.data.augment = resolve_augment(cfg.data.get("augment"))
    return cfg


def build_datamodule(cfg: DictConfig, fold: int) -> FoldDataModule:
    d, prep = cfg.data, preprocessing(cfg)
    return FoldDataModule(
        train_dir=d.train_dir,
        fold=fold,
        n_folds=cfg.n_folds,
        split_seed=cfg.split_seed,
        image_size=prep.crop_size,
        augment=d.augment,
        crop_scale=tuple(d.crop_scale),
        hflip=d.hflip,
        batch_size=cfg.batch_size,
        num_workers=resolve_num_workers(d.num_workers, parallel_jobs()),
        groups=d.groups,
        near_duplicate_distance=d.near_duplicate_distance,
        hash_cache_dir=cfg.feature_cache_dir,
        resize_size=prep.resize_size,
        interpolation=prep.interpolation,
        mean=prep.mean,
        std=prep.std,
        random_erasing=d.get("random_erasing", 0.0),
        mixup_alpha=d.get("mixup_alpha", 0.0),
        cutmix_alpha=d.get("cutmix_alpha", 0.0),
        mix_prob=d.get("mix_prob", 1.0),
        sampler=d.get("sampler", "none"),
        seed=cfg.seed,
        decode_cache=d.decode_cache,
        decode_ram_budget=d.decode_ram_budget,
    )


def build_model(
    cfg: DictConfig, datamodule: FoldDataModule, schedule: finetune.Gradual | None = None
) -> ImageClassifier:
    if schedule is not None:
        scheduler = functools.partial(finetune.scheduler, schedule=schedule)
    else:
        scheduler = instantiate(cfg.scheduler) if cfg.scheduler else None
    prep = preprocessing(cfg)
    return ImageClassifier(
        backbone=cfg.model.name,
        classes=datamodule.classes,
        image_size=prep.crop_size,
        freeze_backbone=cfg.model.freeze_backbone,
        weights=cfg.model.weights,
        mean=prep.mean,
        std=prep.std,
        resize_size=prep.resize_size,
        interpolation=prep.interpolation,
        optimizer=instantiate(cfg.optimizer),
        scheduler=scheduler,
        label_smoothing=float(cfg.loss.label_smoothing),
        class_weights=loss.class_weights(cfg.loss.class_weights, datamodule.train_class_counts()),
        backbone_lr_mult=schedule.backbone_lr_mult if schedule else None,
    )


def prepare_model(cfg: DictConfig, datamodule: FoldDataModule) -> ImageClassifier:
    """The model of a fold, frozen for gradual fine-tuning's head epochs, with cached features attached where
    they apply (a frozen backbone trains the head on them: src/features.py)."""
    schedule = finetune.plan(cfg)
    model = build_model(cfg, datamodule, schedule)
    if schedule is None:
        attach_cached_features(cfg, model, datamodule)
    elif schedule.head_epochs:
        finetune.set_frozen(model, True)
        finetune.attach_head_features(cfg, model, datamodule)
    return model


def prepare_fold(cfg: DictConfig, fold: int) -> tuple[FoldDataModule, ImageClassifier]:
    """Datamodule and model of `fold`, as training builds them (the lr finder's view of a fold)."""
    datamodule = build_datamodule(cfg, fold)
    datamodule.setup()
    return datamodule, prepare_model(cfg, datamodule)


def model_file(cfg: DictConfig, fold: int) -> Path:
    """The seed project's export name: models/cnn_<backbone>_freeze_backbone_<True|False>_fold_<k>.pth."""
    return (
        Path(cfg.model_dir) / f"cnn_{cfg.model.name}_freeze_backbone_{bool(cfg.model.freeze_backbone)}_fold_{fold}.pth"
    )


def publish_copy(source: Path, target: Path) -> None:
    """Give a run's own model file the seed's shared name too (last writer wins): a hard link (a copy across
    file systems) put in place atomically (src.files.link), so parallel jobs never mix files. Model files are
    replaced, never written in place, so the link costs no disk."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.resolve() != source.resolve():
        files.link(source, target, copy=True)


def validation_rows(
    pred: evaluation.Predictions, classes: list[str], datamodule: FoldDataModule, fold: int
) -> list[dict[str, Any]]:
    """One row per validation image: path, fold, true and predicted class, confidence and every class's
    probability; the folds' rows together are the out-of-fold predictions (src/tracking/summary.py)."""
    paths = [datamodule.images.paths[i] for i in datamodule.indices(train=False)]
    probs = pred.logits.double().softmax(dim=1)
    return [
        {
            "path": path,
            "fold": fold,
            "true": classes[t],
            "predicted": classes[int(p.argmax())],
            "confidence": float(p.max()),
            **{f"prob_{c}": float(v) for c, v in zip(classes, p.tolist(), strict=True)},
        }
        for path, t, p in zip(paths, pred.targets.tolist(), probs, strict=True)
    ]


def _warn_about_additions(cfg: DictConfig) -> None:
    """`+epoch=3` (Hydra's advice for a key the config lacks) adds a top-level setting nothing reads: say so once,
    with the setting that was probably meant, instead of training with the default."""
    import difflib

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    for override in HydraConfig.get().overrides.task:
        key = override.partition("=")[0]
        if key.startswith("+") and not key.startswith("++") and "." not in key and "/" not in key:
            name = key.removeprefix("+")
            if name not in cfg:  # a config group merged elsewhere, such as +experiment=sample
                continue
            known = [k for k in cfg if k != name]
            guess = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {guess[0]}={cfg[name]}?" if guess else ""
            warn_once(log, f"{override} adds a setting that train.py does not read{hint}")


# What a job imports on first use. train.py imports them with its heavy imports (src.runtime.heavy_imports),
# whose frozen objects no collection walks: imported inside the first job instead, the objects they create
# made it run ~0.45 s of full garbage collections (MLflow's store, model and system-metrics stack, ~2,000
# modules; scikit-learn's splitters), measured on 2 CPU cores.
FIRST_USE_MODULES = ("sklearn.model_selection", "src.analysis.duplicates")
MLFLOW_MODULES = (
    "mlflow.pyfunc",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "mlflow.system_metrics.system_metrics_monitor",
    "src.serving.mlflow_model",
    "src.tracking.fold_logger",
)


def import_first_use_modules(cfg: DictConfig) -> None:
    """Import the modules a job of `cfg` would import on first use (MLflow's only with an MLflow logger)."""
    for name in FIRST_USE_MODULES + (MLFLOW_MODULES if OmegaConf.select(cfg, "logger") else ()):
        importlib.import_module(name)


def train(cfg: DictConfig) -> float:
    """Train `cfg.fold` and return its best_val_accuracy; `fold=all` trains every fold and returns the CV mean."""
    _warn_about_additions(cfg)
    tune = cfg.get("tune")
    if tune not in (None, "lr_find"):
        raise UserError(f"tune={tune} is not supported; use tune=lr_find or leave it out")
    positive_number("batch_size", cfg.batch_size, integer=True)
    if not tuning.is_auto(cfg):
        positive_number("lr", cfg.lr, other=", or auto (the lr finder's suggestion)")
    if tune == "lr_find":
        cfg = with_resolved_data(cfg)  # resolved as the folds resolve it: lr=auto finds this run's cache entry
        datamodule = build_datamodule(cfg, 0)
        return tuning.lr_find(cfg, data_version(datamodule), prepare_fold)
    if cfg.fold == "all":
        return train_all_folds(cfg)
    if not isinstance(cfg.fold, int):
        raise UserError(f"fold={cfg.fold} must be an integer in [0, {cfg.n_folds}) or `all`")
    return train_fold(cfg)


def train_all_folds(cfg: DictConfig) -> float:
    """Every fold in this job, each in `<output_dir>/fold_<k>/` and its own MLflow child run."""
    base = Path(cfg.paths.output_dir)
    scores = []
    with tracking.completing_at_end():  # re-run folds: the parent's OOF report and ensemble once, at the end
        for fold in range(cfg.n_folds):
            fold_cfg = copy.deepcopy(cfg)
            with open_dict(fold_cfg):
                fold_cfg.fold = fold
                fold_cfg.paths.output_dir = str(base / f"fold_{fold}")
            scores.append(train_fold(fold_cfg))
    mean, std = statistics.fmean(scores), statistics.pstdev(scores)
    log.info("cv_mean_val_accuracy=%.4f ± %.4f over %d folds", mean, std, len(scores))
    print(f"cv_mean_val_accuracy: {mean:.4f}")
    return mean


def _strategy_for(cfg: DictConfig) -> dict[str, Any]:
    """`ddp` re-runs the command line in each new process, which restarts a whole Hydra sweep
    (Lightning #11300); inside `-m`, the same DDP runs as `ddp_spawn`, which forks instead."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    trainer_cfg = dict(cfg.trainer)
    in_sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if in_sweep and str(trainer_cfg.get("strategy", "")).startswith("ddp") and trainer_cfg["strategy"] != "ddp_spawn":
        log.info("trainer.strategy=%s inside a Hydra sweep: running it as ddp_spawn", trainer_cfg["strategy"])
        trainer_cfg["strategy"] = "ddp_spawn"
    return trainer_cfg


def _check_checkpoint(ckpt: Path) -> None:
    """A checkpoint that cannot be read stops with one line, before Lightning's traceback would."""
    try:
        torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UserError(
            f"cannot resume from {ckpt}: it is unreadable ({type(err).__name__}), e.g. cut short by a crash; "
            f"start the fold afresh with resume=false (move or delete that file first to keep it out of the way)"
        ) from err


def data_identity(cfg: DictConfig, datamodule: FoldDataModule) -> dict[str, str]:
    """The data version and split digest that belong to a configuration's identity (src/tracking)."""
    return data_version(datamodule) if cfg.logger else {}


def data_version(datamodule: FoldDataModule) -> dict[str, str]:
    """The data version and split digest of `datamodule`'s images (the same for every fold of a split)."""
    from src.tracking.data_version import training_data

    datamodule.setup()
    images = datamodule.images
    labels = [images.classes[t] for t in images.targets]
    return training_data(images.root, images.paths, labels, datamodule.split_rows())


def _resume_point(cfg: DictConfig, fold: int, data: dict[str, str]) -> tuple[str | None, str | None, str | None]:
    """(checkpoint, MLflow run id, output folder) to continue, for `resume=true` or `ckpt_path=`.

    Every DDP process asks, so all of them start from the same checkpoint.
    """
    if cfg.ckpt_path:
        ckpt = Path(cfg.ckpt_path)
        if not ckpt.is_file():
            raise UserError(f"ckpt_path={ckpt} does not exist; pass <run folder>/checkpoints/last.ckpt")
        _check_checkpoint(ckpt)
        out_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
        run_id = tracking.unfinished_run_in(cfg, data, out_dir) if cfg.logger and out_dir else None
        return str(ckpt), run_id, str(out_dir) if out_dir else None
    if not cfg.logger:
        raise UserError(
            "resume=true finds the interrupted fold in MLflow; with logger=none pass "
            "ckpt_path=<run folder>/checkpoints/last.ckpt instead"
        )
    run_id, out_dir = tracking.find_interrupted_fold(cfg, fold, data)
    ckpt = Path(out_dir) / "checkpoints" / "last.ckpt" if out_dir else None
    if ckpt is None or not ckpt.is_file():
        log.info("resume=true: no interrupted run of fold %d with a last.ckpt; training it afresh", fold)
        return None, None, None
    _check_checkpoint(ckpt)
    log.info("resume=true: continuing MLflow run %s from %s", run_id, ckpt)
    return str(ckpt), run_id, out_dir


def train_fold(cfg: DictConfig) -> float:
    """Train fold `cfg.fold` and return its best validation accuracy.

    Under DDP every process runs this; only global rank 0 creates the MLflow run, exports and reports.
    """
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    fold, rank_zero = cfg.fold, rank_zero_only.rank == 0
    cfg = with_resolved_data(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg, fold)
    file_memo.use_store(cfg.feature_cache_dir)  # which images are readable, and their sha256, from earlier runs
    datamodule.setup()
    if rank_zero and cfg.data.audit_duplicates:  # duplicates across folds or shared with test inflate scores
        from src.analysis.duplicates import audit_duplicates

        audit_duplicates(
            datamodule.images,
            datamodule.folds,
            cfg.data.test_dir,
            cfg.paths.output_dir,
            cfg.data.near_duplicate_distance,
            cfg.feature_cache_dir,
        )
    if rank_zero:
        _warn_about_setup(cfg, datamodule)
    data = data_identity(cfg, datamodule)
    model_cfg, found = tuning.resolve_lr(cfg, data or data_version(datamodule), prepare_fold)
    model = prepare_model(model_cfg, datamodule)
    file_memo.save()
    trainable, total = model.parameter_counts()
    log.info(
        "%s, %d classes, fold %d of %d: training %s of %s parameters (backbone %s)",
        cfg.model.name,
        len(datamodule.classes),
        fold,
        cfg.n_folds,
        f"{trainable:,}",
        f"{total:,}",
        "frozen" if model.freeze_backbone else "trained",
    )
    if found:
        log.info("lr=auto: training with lr=%.3g from the lr finder (%s)", found["lr"], found["plot"])
    resume_from = run_id = None
    if cfg.resume or cfg.ckpt_path:
        resume_from, run_id, prior_dir = _resume_point(cfg, fold, data)
        if prior_dir:  # keep writing into the interrupted fold's folder
            cfg = copy.deepcopy(cfg)
            with open_dict(cfg):
                cfg.paths.output_dir = prior_dir
    run = None
    if rank_zero and cfg.logger:
        run = tracking.reopen_fold_run(cfg, fold, run_id) if run_id else tracking.start_fold_run(cfg, fold, data)
        if found and not run_id:
            run.client.log_param(run.run_id, "lr_found", f"{found['lr']:.6g}")
            with tempfile.TemporaryDirectory() as tmp:
                plot = shutil.copyfile(found["plot"], Path(tmp) / "lr_find.png")
                run.artifacts.log_artifact(str(plot), "reports")
    out_dir = Path(cfg.paths.output_dir)
    with tracking.fold_guard(run):
        history = EpochHistory(out_dir / "history.csv")
        callbacks = [instantiate(c) for c in cfg.callbacks.values() if c] + [history]
        if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress bar callback then
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        schedule = finetune.plan(cfg)
        if schedule is not None:
            callbacks.append(finetune.GradualUnfreeze(schedule))
        trainer = L.Trainer(
            **_strategy_for(cfg),
            max_epochs=cfg.epochs,
            deterministic=cfg.deterministic,
            logger=run.lightning_logger() if run else False,
            callbacks=callbacks,
            default_root_dir=out_dir,
        )
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from)
        if not trainer.is_global_zero:
            return float(trainer.checkpoint_callback.best_model_score or 0.0)
        result = finish_fold(
            cfg, fold, trainer, model, datamodule, out_dir, run.run_id if run else None, history.curves
        )
        if run:
            run.finish(result)
        plots.settle(result["figures"])
        if hasattr(trainer.checkpoint_callback, "remove_last"):
            trainer.checkpoint_callback.remove_last()
    log.info("best_val_accuracy=%.4f (fold %d) -> %s", result["best_val_accuracy"], fold, result["model_file"])
    print(f"best_val_accuracy: {result['best_val_accuracy']:.4f}")
    return result["best_val_accuracy"]


def _warn_about_setup(cfg: DictConfig, datamodule: FoldDataModule) -> None:
    """Warnings about settings that train poorly: a head on random features, and imbalanced classes."""
    if cfg.model.freeze_backbone and cfg.model.weights is None:
        warn_once(
            log,
            "model.freeze_backbone=true with model.weights=null trains a head on random features; "
            "give pretrained weights or set model.freeze_backbone=false",
        )
    monitor = OmegaConf.select(cfg, "callbacks.model_checkpoint.monitor")
    used = {
        f"loss.class_weights={cfg.loss.class_weights}",
        f"data.sampler={cfg.data.get('sampler')}",
        f"callbacks.model_checkpoint.monitor={monitor}",
    }
    advice = loss.imbalance_advice(datamodule.train_class_counts(), datamodule.classes, used)
    if advice:
        warn_once(log, advice)


def finish_fold(
    cfg: DictConfig,
    fold: int,
    trainer: L.Trainer,
    model: ImageClassifier,
    datamodule: FoldDataModule,
    out_dir: Path,
    run_id: str | None = None,
    curves: Future | None = None,
) -> dict[str, Any]:
    """Reload the best checkpoint; write the exported model, history, curves, split and validation report."""
    checkpoint = trainer.checkpoint_callback
    if checkpoint is None or not checkpoint.best_model_path:
        raise UserError("no checkpoint was saved; keep callbacks.model_checkpoint and at least one validation epoch")
    history = evaluation.read_csv(out_dir / "history.csv")
    # Drawn in a helper process while this job goes on (src/plots.py): the curves from when training ended, where
    # the history callback ran in this process (not in a ddp_spawn worker).
    figures = [curves or plots.later(plots.save_curves, history, out_dir / "curves")]
    model.load_checkpoint_weights(torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True))
    device = trainer.strategy.root_device
    pred = evaluation.predict(model, datamodule.val_dataloader(), device)
    classes = datamodule.classes
    val = evaluation.summary_metrics(pred, len(classes))
    report_text, report = evaluation.class_report(pred, classes)
    written = {
        "val_predictions": evaluation.write_csv(
            validation_rows(pred, classes, datamodule, fold), out_dir / "val_predictions.csv"
        ),
        "split": evaluation.write_csv(datamodule.split_rows(), out_dir / "split.csv"),
        "history": out_dir / "history.csv",
        "confusion_matrix": out_dir / "val_confusion_matrix.png",
        **{f"curves_{metric}": path for metric, path in plots.curve_paths(out_dir / "curves").items()},
    }
    title = f"{cfg.model.name} fold {fold} (validation)"
    counts = evaluation.confusion_counts(pred, len(classes))
    figures.append(plots.later(plots.save_confusion_matrix, counts, list(classes), written["confusion_matrix"], title))
    (out_dir / "val_classification_report.txt").write_text(report_text)
    written["report"] = out_dir / "val_classification_report.txt"
    # best_val_accuracy is the validation accuracy of the kept checkpoint: its score when the checkpoint monitors
    # val_accuracy, else (e.g. monitor=val_balanced_accuracy) the accuracy of the reloaded model on the fold.
    # ddp_spawn brings the best path back to this process but not its score; the history has it.
    score = checkpoint.best_model_score
    if checkpoint.monitor != "val_accuracy":
        best = val["accuracy"]
    elif score is not None:
        best = float(score)
    else:
        best = max(r["val_accuracy"] for r in history if r.get("val_accuracy") is not None)
    meta = {**model.model_meta(), "fold": fold, "best_val_accuracy": best}
    if run_id:
        meta["mlflow_run_id"] = run_id
    exported = save_model_file(out_dir / "model" / model_file(cfg, fold).name, model.native_state_dict(), meta)
    publish_copy(exported, model_file(cfg, fold))
    return {
        "best_val_accuracy": best,
        "val_metrics": val,
        "val_report": report,
        "model_file": exported,
        "checkpoint": Path(checkpoint.best_model_path),
        "files": written,
        "figures": figures,
        "meta": meta,
        "model": model,
    }
