"""Speed: the frozen-backbone feature cache (equivalence, invalidation, refusals, concurrent jobs) and channels-last."""

from __future__ import annotations

import csv
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import DictConfig, open_dict
from PIL import Image

from src import data, features
from src.data import FoldDataModule, build_transform, scan_image_folder
from src.errors import UserError
from src.evaluation import predict
from src.model import ChannelsLast, ImageClassifier, build_network, load_model_file
from src.training import train
from tests.conftest import run_cli, tiny_overrides

MODEL_FILE = "cnn_resnet18_freeze_backbone_True_fold_0.pth"


def read_history(out_dir: Path) -> list[dict[str, float]]:
    with (out_dir / "history.csv").open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every image decode of the data pipeline (num_workers=0 keeps them in this process)."""
    calls: list[str] = []
    original = data.load_image

    def counting(path: str | Path) -> Image.Image:
        calls.append(str(path))
        return original(path)

    monkeypatch.setattr(data, "load_image", counting)
    return calls


def run_fold(cfg: DictConfig, out_dir: Path) -> float:
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        cfg.model_dir = str(out_dir / "models")
    return train(cfg)


def test_cached_and_uncached_runs_agree(make_cfg: Callable[..., DictConfig], image_root: Path, tmp_path: Path) -> None:
    # One persistent loader worker for images, as data.num_workers=auto gives, none for cached features: the
    # loaders draw from generators of their own, so the two still shuffle alike.
    epochs, common = 3, ("data.num_workers=1", "epochs=3")
    plain = run_fold(make_cfg("cache_features=false", *common), tmp_path / "plain")
    cached = run_fold(make_cfg("cache_features=true", *common), tmp_path / "cached")
    assert cached == pytest.approx(plain)
    history_plain, history_cached = read_history(tmp_path / "plain"), read_history(tmp_path / "cached")
    assert len(history_plain) == epochs
    for row_plain, row_cached in zip(history_plain, history_cached, strict=True):
        assert row_cached == pytest.approx(row_plain, rel=1e-5, abs=1e-6)

    # The exported file is the whole network in both cases, and the two networks predict alike.
    net_plain, meta_plain = load_model_file(tmp_path / "plain/models" / MODEL_FILE)
    net_cached, meta_cached = load_model_file(tmp_path / "cached/models" / MODEL_FILE)
    assert meta_cached == meta_plain
    state_plain, state_cached = net_plain.state_dict(), net_cached.state_dict()
    assert state_cached.keys() == state_plain.keys() and any(k.startswith("layer4.") for k in state_cached)
    for key, value in state_plain.items():
        assert torch.allclose(state_cached[key].float(), value.float(), rtol=1e-5, atol=1e-6), key
    loader = FoldDataModule(str(image_root / "train"), 0, 2, image_size=32, num_workers=0).val_dataloader()
    pred_plain, pred_cached = predict(net_plain, loader), predict(net_cached, loader)
    assert torch.equal(pred_cached.predicted, pred_plain.predicted)
    assert torch.allclose(pred_cached.logits, pred_plain.logits, rtol=1e-5, atol=1e-5)


def test_images_are_decoded_once_per_epoch_and_once_in_all_with_the_cache(
    make_cfg: Callable[..., DictConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = count_decodes(monkeypatch)
    epochs, n_images, n_val = 2, 18, 9
    run_fold(make_cfg("cache_features=false", f"epochs={epochs}"), tmp_path / "plain")
    # Without the cache every epoch decodes its images (a real count, not a bound: a cache left on would decode
    # each image once): the training images but one (batches of 4 drop a last batch of one) and the validation
    # images, which are decoded once more for the final validation report.
    n_trained = n_images - n_val - 1
    assert len(decodes) == epochs * (n_trained + n_val) + n_val
    decodes.clear()
    run_fold(make_cfg("cache_features=true", "epochs=1"), tmp_path / "cold")
    assert sorted(decodes) == sorted({*decodes}) and len(decodes) == n_images  # each image once, for the cache
    decodes.clear()
    run_fold(make_cfg("cache_features=auto", "epochs=1"), tmp_path / "warm")
    assert decodes == []  # the next run (or fold, or sweep job) reads every feature from disk


def test_a_change_to_image_size_weights_or_bytes_recomputes(
    image_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path(shutil.copytree(image_root / "train", tmp_path / "train"))
    paths = scan_image_folder(root).paths
    torch.manual_seed(0)
    backbone = build_network("resnet18", 3, None)[0].eval()
    cache = tmp_path / "cache"

    def run(module: torch.nn.Module = backbone, size: int = 32, where: Path = cache) -> tuple[torch.Tensor, int]:
        return features.cached_features(module, "resnet18", root, paths, build_transform(size), where, 4, 0)

    first, computed = run()
    assert computed == len(paths) and first.shape == (len(paths), 512)
    again, computed = run()
    assert computed == 0 and torch.equal(again, first)

    changed = root / paths[0]
    Image.fromarray(np.full((32, 32, 3), 7, dtype=np.uint8)).save(changed)
    after, computed = run()
    assert computed == 1
    assert torch.equal(after[1:], first[1:]) and not torch.allclose(after[0], first[0])
    fresh, _ = run(where=tmp_path / "fresh-cache")  # what no cache at all gives (up to batch-size rounding)
    assert torch.allclose(after, fresh, rtol=1e-5, atol=1e-6)

    assert run(size=48)[1] == len(paths)
    keys = {
        features.entry_folder(cache, features.cache_key("resnet18", backbone, build_transform(32, **look)))
        for look in ({}, {"resize_size": 36}, {"interpolation": "bicubic"}, {"mean": (0.5, 0.5, 0.5)})
    }
    assert len(keys) == 4  # resize, interpolation and normalisation are part of the key
    other = build_network("resnet18", 3, None)[0].eval()
    other.load_state_dict(backbone.state_dict())
    assert run(other)[1] == 0  # same weights in another object: same entries
    with torch.no_grad():
        other.layer4[1].bn2.running_var.mul_(1.5)
    assert run(other)[1] == len(paths)

    folder = features.entry_folder(cache, features.cache_key("resnet18", backbone, build_transform(32)))
    entry = sorted(folder.glob("*.npy"))[0]
    entry.write_bytes(entry.read_bytes()[:40])  # a truncated entry is computed again, never read
    assert run()[1] == 0  # this process read it before it broke: what it holds is still that content's feature
    monkeypatch.setattr(features, "_held", {})  # as in a later process
    assert run()[1] == 1
    assert not list(cache.rglob("*.tmp"))


def test_auto_and_true_refuse_where_features_change(
    make_cfg: Callable[..., DictConfig], caplog: pytest.LogCaptureFixture
) -> None:
    features._say_once.cache_clear()
    assert features.use_feature_cache(make_cfg())  # tiny: frozen backbone, no augmentation
    assert not features.use_feature_cache(make_cfg("cache_features=false"))
    assert not features.use_feature_cache(make_cfg("model.freeze_backbone=false"))
    with caplog.at_level(logging.INFO, logger="src.features"):
        assert not features.use_feature_cache(make_cfg("data.augment=true"))
        assert not features.use_feature_cache(make_cfg("data.augment=true", "fold=1"))
    assert [r.getMessage() for r in caplog.records if "data.augment=basic" in r.getMessage()] == [
        "feature cache off: data.augment=basic makes every epoch's images differ (cache_features=auto)"
    ]
    for varying in ("data.augment=trivial", "data.random_erasing=0.25", "data.mixup_alpha=0.2", "data.cutmix_alpha=1"):
        assert not features.use_feature_cache(make_cfg(varying))
        with pytest.raises(UserError, match=varying) as err:
            features.use_feature_cache(make_cfg("cache_features=true", varying))
    assert features.use_feature_cache(make_cfg("data.augment=none", "data.sampler=balanced", "data.mix_prob=0.5"))
    with pytest.raises(UserError, match="data.augment=basic") as err:
        train(make_cfg("cache_features=true", "data.augment=true"))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="model.freeze_backbone=false"):
        features.use_feature_cache(make_cfg("cache_features=true", "model.freeze_backbone=false"))
    with pytest.raises(UserError, match="auto, true, false"):
        features.use_feature_cache(make_cfg("cache_features=maybe"))


def test_parallel_sweep_jobs_share_one_cache(image_root: Path, tmp_path: Path) -> None:
    overrides = [*tiny_overrides(image_root, tmp_path), "logger=none", "cache_features=true", "fold=0,1"]
    result = run_cli("train.py", "-m", *overrides, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("best_val_accuracy: ") == 2
    cache = tmp_path / "feature-cache"
    assert len(list(cache.rglob("*.npy"))) == 18 and not list(cache.rglob("*.tmp"))
    logs = "".join(p.read_text() for p in (tmp_path / "multirun").rglob("train.log"))
    # One job computed the features; the other waited for its lock and read them.
    assert sorted(int(n) for n in re.findall(r"(\d+) computed now", logs)) == [0, 18]


def test_channels_last_trains_on_images_and_features(image_root: Path, make_cfg: Callable[..., DictConfig]) -> None:
    assert make_cfg("trainer=gpu").callbacks.channels_last._target_ == "src.model.ChannelsLast"
    model = ImageClassifier("resnet18", ["cat", "dog", "fox"], image_size=32, freeze_backbone=False, weights=None)
    dm = FoldDataModule(str(image_root / "train"), fold=0, n_folds=2, image_size=32, batch_size=4, num_workers=0)
    options = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    L.Trainer(max_epochs=1, callbacks=[ChannelsLast()], enable_model_summary=False, **options).fit(model, dm)
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 512)
    dm.features = torch.randn(18, 512)
    L.Trainer(max_epochs=1, callbacks=[ChannelsLast()], enable_model_summary=False, **options).fit(model, dm)


def test_features_that_are_not_vectors_are_refused(image_root: Path, tmp_path: Path) -> None:
    root = image_root / "train"
    paths = scan_image_folder(root).paths[:2]
    maps = torch.nn.Conv2d(3, 4, 1)  # (N, 4, H, W): an entry holds one vector, so these cannot be cached
    with pytest.raises(UserError, match=r"shape \(4, 32, 32\), not vectors.*cache_features=false") as err:
        features.cached_features(maps, "maps", root, paths, build_transform(32), tmp_path / "cache", 2, 0)
    assert "\n" not in str(err.value)
