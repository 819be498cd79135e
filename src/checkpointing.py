"""Fold checkpoints: `best` holds weights only, `last` what resume needs, and only while a fold is unfinished.

With a frozen backbone both hold the head alone plus the backbone's digest (`ImageClassifier.on_save_checkpoint`),
so a save costs kilobytes; with full fine-tuning `best` is the network and `last` adds the optimizer state.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger(__name__)
# Checkpoint entries a weights-only `best` leaves out: optimizer, schedules, callback states and the raw weights
# that weight averaging keeps beside the averaged ones ("averaging_state", its step count, stays).
RESUME_ONLY = ("optimizer_states", "lr_schedulers", "callbacks", "current_model_state")


class FoldCheckpoint(ModelCheckpoint):
    """ModelCheckpoint with a weights-only `best` and a `last` refreshed after every validation.

    Lightning writes `last` only in a step that also wrote a top-k checkpoint, which leaves a stale `last` (and
    epochs to redo on resume) whenever the monitored metric stops improving; here it always follows the fold.
    `remove_last` deletes it once the fold is finished: `best` and the exported model are what remain.
    """

    def __init__(self, *args: Any, best_weights_only: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.best_weights_only = best_weights_only
        self._last_step: int | None = None

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if self.save_weights_only or not self.best_weights_only or filepath == self.last_model_path:
            super()._save_checkpoint(trainer, filepath)
            return
        # Lightning's weights-only dump skips the callbacks' on_save_checkpoint, where weight averaging (EMA) puts
        # its averaged weights into the state dict: dump everything, then leave out what only resuming needs.
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        for key in RESUME_ONLY:
            checkpoint.pop(key, None)
        trainer.strategy.save_checkpoint(checkpoint, filepath)
        trainer.strategy.barrier("FoldCheckpoint.save_best")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_step = trainer.global_step

    def _refresh_last(self, trainer: L.Trainer) -> None:
        if (
            self.save_last
            and self._last_step != trainer.global_step
            and trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and not trainer.fast_dev_run
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def remove_last(self) -> None:
        """The fold is finished (model exported, run closed): `last` would only be a second copy on disk."""
        if self.last_model_path and Path(self.last_model_path).is_file():
            Path(self.last_model_path).unlink()
            log.info("fold finished: removed %s (only an unfinished fold resumes)", self.last_model_path)
