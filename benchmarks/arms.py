"""The measured arms that run in their own processes: bare PyTorch baselines, test.py's run layer, an epoch timer.

`python -m benchmarks.arms <arm> '<json kwargs>'` prints one JSON line with the result. Each arm runs in a
fresh process so that its peak memory and its threads are its own.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Subset

from benchmarks.job_timer import IN_STEPS

ROOT = Path(__file__).resolve().parents[1]


class EpochTimer(L.Callback):
    """Seconds of each training epoch, first batch to last optimizer step; validation and checkpoints excluded.

    Added to a real `train.py` run as `+callbacks.epoch_timer={_target_:benchmarks.arms.EpochTimer,path:...}`.
    """

    def __init__(self, path: str) -> None:
        self.path, self.epochs = Path(path), []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start, self.end, self.images = time.perf_counter(), None, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.end, self.images = time.perf_counter(), self.images + len(batch[1])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append({"seconds": self.end - self.start, "images": self.images})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path.write_text(json.dumps(self.epochs))


class StepTimer(L.Callback):
    """Seconds inside training and validation steps (batch start to batch end: forward, loss, backward,
    optimizer step, metric updates), summed over the job; JobTimer subtracts them from the job's wall time.

    Added as `+callbacks.step_timer={_target_:benchmarks.arms.StepTimer}`.
    """

    def _start(self, *args: Any) -> None:
        self.start = time.perf_counter()

    def _end(self, *args: Any) -> None:
        IN_STEPS["seconds"] += time.perf_counter() - self.start
        IN_STEPS["steps"] += 1

    on_train_batch_start = on_validation_batch_start = _start
    on_train_batch_end = on_validation_batch_end = _end


def bare_train(
    train_dir: str,
    image_size: int,
    batch_size: int,
    epochs: int,
    lr: float,
    fold: int = 0,
    n_folds: int = 5,
    split_seed: int = 42,
    num_workers: int = 0,
    seed: int = 42,
    fused: bool | None = None,
) -> dict[str, Any]:
    """torchvision ImageFolder + DataLoader + a plain Adam loop over the same fold, model and transform;
    `fused=True` gives it the fused Adam that train.py's optimizer configs use."""
    from src.data import assign_folds, build_transform

    torch.manual_seed(seed)
    dataset = torchvision.datasets.ImageFolder(train_dir, transform=build_transform(image_size))
    folds = assign_folds(np.asarray(dataset.targets), dataset.classes, n_folds, split_seed)
    train_set = Subset(dataset, np.flatnonzero(folds != fold).tolist())
    loader = DataLoader(
        train_set, batch_size, shuffle=True, num_workers=num_workers, persistent_workers=num_workers > 0
    )
    net = torchvision.models.resnet18(num_classes=len(dataset.classes)).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, fused=fused)
    criterion = nn.CrossEntropyLoss()
    epoch_stats = []
    for _ in range(epochs):
        start, images = time.perf_counter(), 0
        for x, y in loader:
            optimizer.zero_grad()
            criterion(net(x), y).backward()
            optimizer.step()
            images += len(y)
        epoch_stats.append({"seconds": time.perf_counter() - start, "images": images})
    return {"epochs": epoch_stats}


def bare_infer(ckpt: str, test_dir: str, batch_size: int, num_workers: int) -> dict[str, Any]:
    """Load the exported file into plain torchvision and run it over the images under torch.inference_mode."""
    from src.data import build_transform

    start = time.perf_counter()
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    net = torchvision.models.get_model(saved["backbone"], num_classes=len(saved["classes"]))
    net.load_state_dict(saved["state_dict"])
    net.eval()
    transform = build_transform(
        saved["image_size"],
        mean=saved["mean"],
        std=saved["std"],
        resize_size=saved.get("resize_size"),
        interpolation=saved.get("interpolation", "bilinear"),
    )
    dataset = torchvision.datasets.ImageFolder(test_dir, transform=transform)
    predicted, loop_start = [], time.perf_counter()
    with torch.inference_mode():
        for x, _ in DataLoader(dataset, batch_size, num_workers=num_workers):
            predicted.append(net(x).argmax(1))
    end = time.perf_counter()
    return {"seconds": end - start, "predict_seconds": end - loop_start, "images": len(torch.cat(predicted))}


def ours_test(ckpt: str, test_dir: str, out_dir: str) -> dict[str, Any]:
    """test.py's run layer, end to end (load, scan, predict, metrics, reports), after the imports test.py does."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from src.serving import files
    from src.testing import evaluate

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("test", overrides=[f"ckpt={ckpt}", f"data.test_dir={test_dir}", "logger=none"])
    with open_dict(cfg):
        cfg.paths.output_dir = out_dir
    predict, predict_seconds = files.predict_files, []

    def timed_predict(*args: Any, **kwargs: Any) -> files.FilePredictions:
        start = time.perf_counter()
        try:
            return predict(*args, **kwargs)
        finally:
            predict_seconds.append(time.perf_counter() - start)

    files.predict_files = timed_predict  # the prediction stage alone, as evaluate() calls it
    start = time.perf_counter()
    metrics = evaluate(cfg)
    seconds = time.perf_counter() - start
    images = json.loads((Path(out_dir) / "test_metrics.json").read_text())["n_images"]
    return {
        "seconds": seconds,
        "predict_seconds": sum(predict_seconds),
        "images": images,
        "accuracy": metrics["accuracy"],
    }


ARMS = {"bare_train": bare_train, "bare_infer": bare_infer, "ours_test": ours_test}

if __name__ == "__main__":
    result = ARMS[sys.argv[1]](**json.loads(sys.argv[2]))
    print("RESULT " + json.dumps(result))
