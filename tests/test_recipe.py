"""The training recipe for few images: gradual fine-tuning, loss options, EMA, class imbalance, the lr finder."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
from conftest import write_images
from omegaconf import DictConfig, OmegaConf

from src import loss, tuning
from src.features import digest_module
from src.model import ImageClassifier
from src.training import _warn_about_setup as warn_about_setup
from src.training import build_datamodule, prepare_model, train

CLASSES = ["cat", "dog", "fox"]


class PhaseProbe(L.Callback):
    """Records, per epoch, the input kind, backbone digest, trainability and the groups' lrs, into a JSON file."""

    def __init__(self, path: str) -> None:
        self.path, self.rows = Path(path), []

    def on_train_start(self, trainer: L.Trainer, pl_module: ImageClassifier) -> None:
        self.start = digest_module(pl_module.backbone)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: ImageClassifier, batch: tuple, batch_idx: int
    ) -> None:
        self.ndim = batch[0].ndim

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: ImageClassifier, batch: tuple, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.val_ndim = batch[0].ndim

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: ImageClassifier) -> None:
        groups = trainer.optimizers[0].param_groups
        self.rows.append(
            {
                "ndim": self.ndim,
                "val_ndim": self.val_ndim,
                "backbone": digest_module(pl_module.backbone),
                "start": self.start,
                "trains": all(p.requires_grad for p in pl_module.backbone.parameters()),
                "initial_lrs": [g["initial_lr"] for g in groups],
            }
        )
        self.path.write_text(json.dumps(self.rows))


def fold_cfg(make_cfg: Callable[..., DictConfig], tmp_path: Path, *overrides: str) -> DictConfig:
    return make_cfg(f"lr_find.cache_dir={tmp_path}/lr-cache", *overrides)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_gradual_trains_the_head_on_features_then_everything_at_its_own_lr(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    probe = tmp_path / "probe.json"
    cfg = fold_cfg(
        make_cfg,
        tmp_path,
        "finetune=gradual",
        "finetune.head_epochs=2",
        "finetune.backbone_lr_mult=0.25",
        "epochs=3",
        "lr=0.01",
        f"model.weights={weights}",
        f"+callbacks.probe={{_target_: tests.test_recipe.PhaseProbe, path: '{probe}'}}",
        "+callbacks.model_checkpoint.save_top_k=-1",  # keep the head epoch's checkpoint too
    )
    train(cfg)
    head_phase, second_head_epoch, full_phase = json.loads(probe.read_text())
    assert second_head_epoch["backbone"] == head_phase["start"] and not second_head_epoch["trains"]
    # Every checkpoint holds the backbone, the head epochs' too: it trains afterwards, so no digest could rebuild it.
    saved = sorted((tmp_path / "outputs" / "checkpoints").glob("best*.ckpt"))
    assert len(saved) == 3
    for path in saved:
        assert "backbone.conv1.weight" in torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    # Phase 1: cached features, frozen backbone (weights and BatchNorm statistics unchanged).
    assert head_phase["ndim"] == head_phase["val_ndim"] == 2 and not head_phase["trains"]
    assert head_phase["backbone"] == head_phase["start"]
    # Phase 2: images, the whole network trains; the backbone group runs at lr x backbone_lr_mult.
    assert full_phase["ndim"] == full_phase["val_ndim"] == 4 and full_phase["trains"]
    assert full_phase["backbone"] != head_phase["backbone"]
    assert full_phase["initial_lrs"] == pytest.approx([0.01, 0.0025])
    # One history across both phases.
    assert [int(r["epoch"]) for r in read_rows(tmp_path / "outputs" / "history.csv")] == [0, 1, 2]


def test_gradual_refuses_a_frozen_backbone_and_says_so_without_weights(
    make_cfg: Callable[..., DictConfig], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from src.errors import UserError
    from src.finetune import plan

    with pytest.raises(UserError, match="model.freeze_backbone=true"):
        plan(make_cfg("finetune=gradual", "model.freeze_backbone=true"))
    with pytest.raises(UserError, match="scheduler=none"):
        plan(make_cfg("finetune=gradual", "scheduler=cosine"))
    with caplog.at_level(logging.INFO, logger="src.finetune"):
        schedule = plan(make_cfg("finetune=gradual", "finetune.head_epochs=3"))
    assert schedule.head_epochs == 0 and "whole network trains from the first epoch" in caplog.text


@pytest.fixture
def imbalanced_root(tmp_path: Path) -> Path:
    """cat and dog with 10 images, fox with 2: 5 : 5 : 1 in each training half of a 2-fold split."""
    root = write_images(tmp_path / "imbalanced", per_class=10, seed=3)
    for path in sorted((root / "fox").iterdir())[2:]:
        path.unlink()
    return root


def test_class_weights_come_from_the_training_folds_and_imbalance_is_named(
    make_cfg: Callable[..., DictConfig], imbalanced_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_cfg(f"data.train_dir={imbalanced_root}", "loss.class_weights=auto")
    datamodule = build_datamodule(cfg, 0)
    datamodule.setup()
    counts = datamodule.train_class_counts()
    assert counts.tolist() == [5, 5, 1]  # the training half only, not 10, 10, 2
    model = prepare_model(cfg, datamodule)
    expected = torch.tensor([1 / 5, 1 / 5, 1.0])
    assert torch.allclose(model.criterion.weight, expected / expected.mean())
    assert model.criterion.weight.mean().item() == pytest.approx(1.0)

    with caplog.at_level(logging.WARNING, logger="src.training"):
        warn_about_setup(cfg, datamodule)
    assert "fox only 1" in caplog.text and "5.0x" in caplog.text
    assert "data.sampler=balanced" in caplog.text and "loss.class_weights=auto" not in caplog.text
    assert "model.freeze_backbone=true with model.weights=null trains a head on random features" in caplog.text
    assert loss.imbalance_advice([4, 4, 1], CLASSES, set()) is None


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_soft_targets_and_label_smoothing_share_one_loss() -> None:
    torch.manual_seed(0)
    model = ImageClassifier("resnet18", CLASSES, image_size=32, weights=None, label_smoothing=0.2)
    features, hard = torch.randn(4, 512), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        logits = model(features)
    one_hot = torch.nn.functional.one_hot(hard, 3).float()
    mixed = 0.7 * one_hot + 0.3 * one_hot.roll(1, dims=0)
    expected = torch.nn.functional.cross_entropy(logits, 0.8 * mixed + 0.2 / 3)
    assert model.criterion(logits, mixed).item() == pytest.approx(expected.item(), rel=1e-6)
    assert model.criterion(logits, one_hot).item() == pytest.approx(model.criterion(logits, hard).item(), rel=1e-6)
    model.eval()
    with torch.no_grad():
        model._step((features, mixed), model.train_metrics, "train")  # metrics take the soft targets' top class
    assert model.train_metrics["train_accuracy"].compute() == (logits.argmax(1) == mixed.argmax(1)).float().mean()


def test_ema_weights_are_validated_checkpointed_and_exported(
    make_cfg: Callable[..., DictConfig], imbalanced_root: Path, tmp_path: Path
) -> None:
    cfg = fold_cfg(
        make_cfg,
        tmp_path,
        f"data.train_dir={imbalanced_root}",
        "callbacks=ema",
        "callbacks.ema.decay=0.5",
        "callbacks.model_checkpoint.monitor=val_balanced_accuracy",
        "model.freeze_backbone=false",
        "epochs=2",
    )
    out = tmp_path / "outputs"
    # A full best checkpoint keeps the raw weights beside the averaged ones: the export holds the averaged.
    train(OmegaConf.merge(cfg, {"callbacks": {"model_checkpoint": {"best_weights_only": False}}}))
    checkpoint = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    exported = torch.load(next((out / "model").glob("*.pth")), map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(exported["fc.weight"], averaged["head.weight"])
    assert torch.equal(exported["layer1.0.conv1.weight"], averaged["backbone.layer1.0.conv1.weight"])
    assert not torch.equal(exported["layer1.0.conv1.weight"], raw["backbone.layer1.0.conv1.weight"])
    # The default weights-only best still holds the averaged weights (the averaging state shows EMA wrote them).
    out = tmp_path / "outputs-weights-only"
    best = train(OmegaConf.merge(cfg, {"paths": {"output_dir": str(out)}}))
    checkpoint = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert "averaging_state" in checkpoint and "optimizer_states" not in checkpoint
    assert "current_model_state" not in checkpoint
    exported = torch.load(next((out / "model").glob("*.pth")), map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(exported["fc.weight"], checkpoint["state_dict"]["head.weight"])
    # best_val_accuracy is the accuracy of the kept (balanced-accuracy-best) checkpoint on the validation fold.
    rows = read_rows(out / "val_predictions.csv")
    assert best == pytest.approx(sum(r["true"] == r["predicted"] for r in rows) / len(rows))


def test_lr_find_suggests_and_lr_auto_reuses_the_cached_value(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    finder = ("lr_find.num_training=14", "lr_find.min_lr=1e-4", "lr_find.max_lr=1.0")
    suggestion = train(fold_cfg(make_cfg, tmp_path, "tune=lr_find", *finder))
    assert 1e-4 <= suggestion <= 1.0
    assert (tmp_path / "outputs" / "lr_find.png").stat().st_size > 0
    (entry,) = (tmp_path / "lr-cache").glob("*.json")
    assert json.loads(entry.read_text())["lr"] == suggestion

    # Another fold with lr=auto reads the cached value (marked here) instead of running the finder again.
    entry.write_text(json.dumps({**json.loads(entry.read_text()), "lr": 0.0123}))
    train(fold_cfg(make_cfg, tmp_path, "lr=auto", "fold=1", *finder))
    (history,) = read_rows(tmp_path / "outputs" / "history.csv")
    assert float(history["lr"]) == pytest.approx(0.0123)
    assert tuning.cache_key(make_cfg("lr=auto", "fold=1"), {}) == tuning.cache_key(make_cfg("lr=0.5"), {})
    assert tuning.cache_key(make_cfg("lr=auto"), {}) != tuning.cache_key(make_cfg("lr=auto", "batch_size=8"), {})
