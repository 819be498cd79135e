"""Speed: the decoded-image store (data.decode_cache) gives the same split and predictions, and is never misread."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, open_dict
from PIL import Image

from src import decoded
from src.data import FoldDataModule, resize_step, scan_image_folder
from src.evaluation import predict
from src.model import ImageClassifier
from src.training import train
from tests.conftest import CLASSES, write_images


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny classes plus images of other sizes, aspect ratios and modes (grey, RGBA, 16-bit grey), and a JPEG
    whose EXIF orientation turns it upright."""
    root = write_images(tmp_path_factory.mktemp("mixed"), per_class=5)
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (40, 57), dtype=np.uint8)).save(root / "cat" / "grey.png")
    Image.fromarray(rng.integers(0, 255, (71, 33, 4), dtype=np.uint8)).save(root / "dog" / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (31, 45), dtype=np.uint16)).save(root / "fox" / "grey16.png")
    Image.fromarray(rng.integers(0, 255, (90, 64, 3), dtype=np.uint8)).save(root / "fox" / "tall.jpg", quality=90)
    sideways = Image.Exif()
    sideways[0x0112] = 6  # a phone photo: stored 70x30, shown 30x70
    Image.fromarray(rng.integers(0, 255, (30, 70, 3), dtype=np.uint8)).save(root / "cat" / "phone.jpg", exif=sideways)
    return root


def test_the_store_gives_the_same_split_and_predictions(mixed_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ImageClassifier("resnet18", list(CLASSES), 32, weights=None)
    results = {}
    for mode, uint8 in (("none", False), ("ram", False), ("disk", True)):
        dm = FoldDataModule(
            str(mixed_root), 0, 2, image_size=32, num_workers=0, decode_cache=mode, hash_cache_dir=str(tmp_path)
        )
        dm.uint8_batches = uint8  # as on a GPU: the model scales and normalises uint8 batches itself
        batch, _ = next(iter(dm.val_dataloader()))
        assert batch.dtype == (torch.uint8 if uint8 else torch.float32)
        results[mode] = dm.split_rows(), predict(model, dm.val_dataloader())
    rows, pred = results["none"]
    for mode in ("ram", "disk"):
        assert results[mode][0] == rows
        assert torch.equal(results[mode][1].targets, pred.targets)
        assert torch.equal(results[mode][1].logits, pred.logits), mode  # bit for bit, not approximately


def test_a_store_of_another_format_is_ignored(
    mixed_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = scan_image_folder(mixed_root)
    resize = resize_step(32)

    def build() -> tuple[decoded.DecodedImages, int]:
        return decoded.build_store("disk", mixed_root, images.paths, resize, tmp_path)

    with monkeypatch.context() as m:
        m.setattr(decoded, "DECODE_FORMAT", 0)
        old, written = build()
    assert written == len(images.paths) and old.file.is_file()
    store, written = build()
    assert written == len(images.paths) and store.file != old.file  # another version: another folder
    # An index from another version under this version's name is not read either: the store is written again.
    shutil.copy(old.file.with_suffix(".index.npz"), store.file.with_suffix(".index.npz"))
    assert build()[1] == len(images.paths)
    again, written = build()
    assert written == 0 and again.file == store.file
    for i, path in enumerate(images.paths):
        assert torch.equal(again[i], decoded.decode_resized(mixed_root / path, resize)), path


def test_ram_over_budget_falls_back_to_disk_and_trains_with_augmentation(
    make_cfg: Callable[..., DictConfig], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_cfg("data.decode_cache=ram", "data.decode_ram_budget=1000", "data.augment=true")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="src.decoded"):
        score = train(cfg)
    assert 0.0 <= score <= 1.0
    assert "more than the RAM budget" in caplog.text and "data.decode_cache=disk: 18 images" in caplog.text
    assert len(list((tmp_path / "feature-cache" / "decoded").glob("*/*.u8"))) == 1
