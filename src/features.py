"""Frozen-backbone feature cache: compute each image's backbone features once, then train only the head.

A frozen backbone in eval mode maps an image to the same feature vector in every epoch, fold and
sweep job, so with deterministic transforms its forward pass is pure repetition, and it is almost
all of the cost of a head-only run. The cache keeps one `.npy` file per image on disk:

    <feature_cache_dir>/<key of backbone and transform>/<sha256 of the image bytes>.npy

The folder key covers the backbone name, a digest of every weight and buffer of the backbone, the
full transform (size, resize/crop, interpolation, mean/std) and the library versions that decode and
transform images. A change to any of them, or to an image's bytes, lands on a new path and is
computed afresh; nothing is updated in place, so nothing stale can be read. Files are written to a
temporary name and renamed, so readers see whole files or none; a lock per folder makes concurrent
sweep jobs wait for each other rather than compute the same features twice.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from filelock import FileLock
from omegaconf import DictConfig
from torch import nn
from torchvision.transforms import v2

from src import file_memo
from src.data import FoldDataModule, ImageDataset, make_loader, resolve_augment
from src.errors import UserError
from src.evaluation import predict
from src.model import ImageClassifier, digest_module

log = logging.getLogger(__name__)

# Part of every key: bump it when load_image/to_rgb or the stored layout change what an entry means.
CACHE_FORMAT = 2  # 2: photos turned upright as their EXIF orientation says
CHOICES = ("auto", "true", "false")


@functools.cache
def _say_once(message: str) -> None:
    """A sweep runs many jobs in one process; the reason the cache is off is worth one line, not one per job."""
    log.info(message)


def training_randomness(data: DictConfig) -> str:
    """The data settings that make training images differ from epoch to epoch (`data.augment=basic, ...`), or ''."""
    augment = resolve_augment(data.get("augment"))
    parts = [f"data.augment={augment}"] if augment != "none" else []
    parts += [f"data.{k}={data.get(k)}" for k in ("random_erasing", "mixup_alpha", "cutmix_alpha") if data.get(k)]
    return ", ".join(parts)


def use_feature_cache(cfg: DictConfig) -> bool:
    """Decide `cache_features=auto|true|false`; refuse `true` where cached features would be wrong."""
    choice = str(cfg.get("cache_features", "auto")).lower()
    if choice not in CHOICES:
        raise UserError(f"cache_features={cfg.cache_features} is not one of auto, true, false")
    if choice == "false":
        return False
    if not cfg.model.freeze_backbone:
        if choice == "true":
            raise UserError(
                "cache_features=true needs a frozen backbone, but model.freeze_backbone=false trains it, "
                "so its features change every step; set model.freeze_backbone=true or cache_features=auto"
            )
        return False
    varying = training_randomness(cfg.data)
    if varying:
        if choice == "true":
            raise UserError(
                f"cache_features=true needs deterministic training images, but {varying} changes them every epoch; "
                f"set data.augment=none, data.random_erasing=0, data.mixup_alpha=0, data.cutmix_alpha=0, "
                f"or cache_features=auto"
            )
        _say_once(f"feature cache off: {varying} makes every epoch's images differ (cache_features=auto)")
        return False
    return True


def cache_key(
    backbone_name: str, backbone: nn.Module, transform: v2.Transform, weights_sha256: str | None = None
) -> dict[str, object]:
    """Everything a cached feature depends on besides the image bytes (`weights_sha256`: the backbone's digest,
    when the caller already has it)."""
    return {
        "format": CACHE_FORMAT,
        "backbone": backbone_name,
        "weights_sha256": weights_sha256 or digest_module(backbone),
        "transform": repr(transform),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__},
    }


def entry_folder(cache_dir: Path, key: dict[str, object]) -> Path:
    """The folder of one backbone + transform; its `key.json` says what went into the name."""
    return Path(cache_dir) / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder, then rename: a reader never sees half a file."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        try:
            f.write(data)
        except BaseException:
            f.close()
            os.unlink(f.name)
            raise
    os.replace(f.name, path)


def _npy_bytes(array: np.ndarray) -> bytes:
    """The `.npy` file of one feature vector, serialised in memory so that it can be written atomically."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32))
    return buffer.getvalue()


def _read_entry(path: Path) -> np.ndarray | None:
    """A stored feature vector, or None when missing or unreadable (then it is computed again)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return array if array.ndim == 1 and array.dtype == np.float32 else None


_held: dict[str, np.ndarray] = {}  # entries this process has read or written, by path


def _entry(path: Path) -> np.ndarray | None:
    """`_read_entry`, once per process: an entry never changes (its path is the key of its content), and the jobs
    of a sweep read the same ones (20,000 files: ~1.5 s per job)."""
    array = _held.get(str(path))
    if array is None and (array := _read_entry(path)) is not None:
        _held[str(path)] = array
    return array


def cached_features(
    backbone: nn.Module,
    backbone_name: str,
    root: Path,
    paths: Sequence[str],
    transform: v2.Transform,
    cache_dir: Path,
    batch_size: int,
    num_workers: int,
    device: torch.device | str = "cpu",
    weights_sha256: str | None = None,
) -> tuple[torch.Tensor, int]:
    """(features, number computed now): row i holds the backbone features of `root/paths[i]`.

    Only images without a valid entry go through the backbone (in eval mode, as in training, so a
    feature does not depend on the batch it was computed in). The global torch RNG is left as it
    was, so a run shuffles and initialises exactly as it would without the cache.
    """
    key = cache_key(backbone_name, backbone, transform, weights_sha256)
    folder = entry_folder(cache_dir, key)
    folder.mkdir(parents=True, exist_ok=True)
    digests = [file_memo.sha256(Path(root) / p) for p in paths]
    with FileLock(folder / ".lock"):
        if not (folder / "key.json").is_file():
            _write_atomic(folder / "key.json", json.dumps(key, indent=2).encode())
        entries = {d: _entry(folder / f"{d}.npy") for d in set(digests)}
        todo = {d: p for d, p in zip(digests, paths, strict=True) if entries[d] is None}
        if todo:
            dataset = ImageDataset(Path(root), list(todo.values()), [0] * len(todo), transform)
            home = next(backbone.parameters()).device
            with torch.random.fork_rng(devices=[]):  # DataLoader iterators draw a seed from the global RNG
                computed = predict(backbone, make_loader(dataset, batch_size, num_workers), device).logits
            backbone.to(home)
            if computed.ndim != 2:  # an entry is one vector; anything else would be rejected on every read
                raise UserError(
                    f"the {backbone_name} backbone gives features of shape {tuple(computed.shape[1:])}, not vectors, "
                    f"so they cannot be cached; run with cache_features=false"
                )
            for digest, row in zip(todo, computed.numpy(), strict=True):
                entries[digest] = _held[str(folder / f"{digest}.npy")] = row
                _write_atomic(folder / f"{digest}.npy", _npy_bytes(row))
    features = torch.from_numpy(np.stack([entries[d] for d in digests]))
    log.info(
        "feature cache %s: %d images, %d computed now, %d reused",
        folder,
        len(paths),
        len(todo),
        len(paths) - len(todo),
    )
    return features, len(todo)


def feature_device(cfg: DictConfig) -> torch.device:
    """Where the features are computed: the GPU when the trainer would use one."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    use_cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return torch.device("cuda" if use_cuda else "cpu")


def attach_cached_features(cfg: DictConfig, model: ImageClassifier, datamodule: FoldDataModule) -> bool:
    """When `use_feature_cache(cfg)`, give `datamodule` the cached features of all its images.

    Its loaders then yield (feature, target) batches, which the model sends to its head alone; the
    model itself is untouched, so checkpoints and the exported file still hold the whole network.
    """
    if not use_feature_cache(cfg):
        return False
    datamodule.setup()
    images = datamodule.images
    datamodule.features, _ = cached_features(
        model.backbone,
        cfg.model.name,
        images.root,
        images.paths,
        datamodule.eval_transform,
        Path(cfg.feature_cache_dir),
        datamodule.batch_size,
        datamodule.num_workers,
        feature_device(cfg),
        model.backbone_digest(),
    )
    log.info("training the head on cached %s features (cache_features=%s)", cfg.model.name, cfg.cache_features)
    return True
