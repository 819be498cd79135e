"""Gradual fine-tuning (`finetune=gradual`): first the head on a frozen backbone, then the whole network.

Phase 1 (`finetune.head_epochs` epochs) trains the head alone, with the backbone frozen and its BatchNorm
in eval mode, on cached backbone features where the feature cache applies (src/features.py). Phase 2
unfreezes the backbone and trains everything with discriminative learning rates (backbone at
lr × `finetune.backbone_lr_mult`) under a warm-up + cosine schedule. Both phases are one `trainer.fit`,
so a fold keeps one MLflow run, one history and one set of checkpoints.

The optimizer holds the head and backbone groups from the start (ImageClassifier.backbone_lr_mult) and
the schedule is a LambdaLR with one factor per group, so nothing is added or rebuilt at the switch.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
from omegaconf import DictConfig, open_dict
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from src.errors import UserError
from src.features import attach_cached_features
from src.model import ImageClassifier

log = logging.getLogger(__name__)

MODES = ("none", "gradual")


@functools.cache
def _say_once(message: str) -> None:
    """Every fold (and the lr finder) asks for the plan; a sweep runs many in one process: one line is enough."""
    log.info(message)


@dataclass(frozen=True)
class Gradual:
    """The schedule of one gradual fine-tuning run, in epochs."""

    head_epochs: int
    warmup_epochs: int
    backbone_lr_mult: float
    epochs: int

    def factor(self, epoch: int, backbone: bool) -> float:
        """The lr multiplier of the head (or backbone) group in `epoch`: constant for the head in phase 1
        (the backbone is frozen then), then a linear warm-up and a cosine decay over phase 2 for both."""
        if epoch < self.head_epochs:
            return 0.0 if backbone else 1.0
        step, length = epoch - self.head_epochs, max(1, self.epochs - self.head_epochs)
        warmup = min(self.warmup_epochs, length - 1)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, length - warmup)))

    def lr_lambdas(self) -> list[Callable[[int], float]]:
        """Per-group factors, head first (the order of ImageClassifier's param groups)."""
        return [lambda e: self.factor(e, backbone=False), lambda e: self.factor(e, backbone=True)]


def plan(cfg: DictConfig) -> Gradual | None:
    """The gradual schedule that `cfg.finetune` asks for, or None for `finetune=none` (today's training)."""
    ft = cfg.get("finetune") or {}
    mode = str(ft.get("name", "none"))
    if mode not in MODES:
        raise UserError(f"finetune={mode} is not one of {', '.join(MODES)}")
    if mode == "none":
        return None
    if cfg.model.freeze_backbone:
        raise UserError(
            "finetune=gradual trains the backbone after finetune.head_epochs, but model.freeze_backbone=true "
            "keeps it frozen; drop model.freeze_backbone=true (or use finetune=none)"
        )
    if cfg.get("scheduler"):
        raise UserError("finetune=gradual brings its own warm-up + cosine schedule; use scheduler=none with it")
    head_epochs, warmup, mult = int(ft.head_epochs), int(ft.warmup_epochs), float(ft.backbone_lr_mult)
    if head_epochs < 0 or warmup < 0 or mult <= 0:
        raise UserError("finetune.head_epochs and finetune.warmup_epochs must be >= 0, finetune.backbone_lr_mult > 0")
    if cfg.model.weights is None and head_epochs:
        _say_once(
            "finetune=gradual with model.weights=null: no pretrained features to keep, so the whole network "
            f"trains from the first epoch (finetune.head_epochs={head_epochs} ignored)"
        )
        head_epochs = 0
    return Gradual(head_epochs, warmup, mult, int(cfg.epochs))


def scheduler(optimizer: Optimizer, schedule: Gradual) -> LambdaLR:
    """The per-group warm-up + cosine schedule, stepped once per epoch."""
    return LambdaLR(optimizer, schedule.lr_lambdas())


def attach_head_features(cfg: DictConfig, model: ImageClassifier, datamodule: L.LightningDataModule) -> bool:
    """Phase 1's frozen backbone makes the same features every epoch: give the datamodule cached features
    when the cache applies to a frozen backbone (cache_features, data.augment), as a head-only run would."""
    frozen = copy.deepcopy(cfg)
    with open_dict(frozen):
        frozen.model.freeze_backbone = True
    return attach_cached_features(frozen, model, datamodule)


class GradualUnfreeze(L.Callback):
    """Freezes the backbone (eval mode) for the head epochs, then unfreezes it once, at the phase change.

    With cached features the loaders are rebuilt for the first phase-2 epoch (images instead of features,
    for training and validation alike) through `reload_dataloaders_every_n_epochs`, switched off again once
    both have been rebuilt.
    """

    def __init__(self, schedule: Gradual) -> None:
        self.schedule = schedule

    def on_fit_start(self, trainer: L.Trainer, pl_module: ImageClassifier) -> None:
        # After a checkpoint is restored and before any loader is built: a resumed fold starts in its own phase.
        if trainer.current_epoch < self.schedule.head_epochs:
            set_frozen(pl_module, True)
        else:
            self._drop_features(trainer)
            set_frozen(pl_module, False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: ImageClassifier) -> None:
        if trainer.current_epoch == self.schedule.head_epochs - 1 and trainer.current_epoch + 1 < trainer.max_epochs:
            if self._drop_features(trainer):
                trainer.reload_dataloaders_every_n_epochs = 1
            set_frozen(pl_module, False)
            trainable, _ = pl_module.parameter_counts()
            log.info(
                "finetune=gradual: epoch %d on trains the whole network (%s parameters), backbone lr = lr x %g",
                trainer.current_epoch + 1,
                f"{trainable:,}",
                self.schedule.backbone_lr_mult,
            )
        elif trainer.current_epoch == self.schedule.head_epochs:
            trainer.reload_dataloaders_every_n_epochs = 0

    @staticmethod
    def _drop_features(trainer: L.Trainer) -> bool:
        datamodule = trainer.datamodule
        if getattr(datamodule, "features", None) is None:
            return False
        datamodule.features = None
        return True


def set_frozen(module: ImageClassifier, frozen: bool) -> None:
    """Freeze (or unfreeze) the backbone: no gradients, BatchNorm statistics kept (eval mode)."""
    module.freeze_backbone = frozen  # ImageClassifier.train() keeps a frozen backbone in eval mode
    module.backbone.requires_grad_(not frozen)
    module.backbone.train(not frozen and module.training)
