"""Test-only parts for tests/test_launchers.py: a callback the CLI loads by name, and a loky job."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import lightning as L
import torch


class RecordLoaderWorkers(L.Callback):
    """Writes, after each training epoch, the live child processes (the loaders' persistent workers) to `path`."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        children = multiprocessing.active_children()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"workers": len(children), "names": [c.name for c in children]}))


def first_batch_in_this_process(root: str, paths: list[str]) -> dict[str, object]:
    """Load one batch through `make_loader` with a real worker process; run inside a joblib (loky) worker."""
    from src.data import ImageDataset, build_transform, make_loader

    dataset = ImageDataset(Path(root), paths, list(range(len(paths))), build_transform(32))
    x, y = next(iter(make_loader(dataset, batch_size=len(paths), num_workers=1)))
    return {
        "start_method": multiprocessing.get_start_method(allow_none=True),
        "shape": tuple(x.shape),
        "targets": torch.as_tensor(y).tolist(),
    }
