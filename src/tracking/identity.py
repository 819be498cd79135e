"""A configuration's identity: everything that can change a result, and nothing else.

Folds of one identity share a parent run and a CV summary. The identity is the resolved config
minus output, display and speed-only settings, plus the data version and a digest of the split, so
a fold re-run on changed data or with other callbacks (early stopping, another monitor) starts a new
parent instead of joining an old one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from src.tracking.store import redact

# Settings that say where results go, how they are shown, or how fast they come, never what they are.
NOT_IDENTITY = (
    "fold",
    "paths",
    "logger",
    "model_dir",
    "feature_cache_dir",
    "cache_features",  # the same numbers with and without the cache (tests/test_features.py)
    "resume",
    "ckpt_path",
    "tune",  # tune=lr_find trains nothing
    "lr_find.cache_dir",
    "data.num_workers",
    "data.decode_ram_budget",  # ram or disk: the same pixels either way
    "data.audit_duplicates",  # a report, not a change to training
    "data.near_duplicate_distance",  # matters only with data.groups=auto, where the split digest records it
    "data.train_dir",  # the data version and split digest stand for the data itself
    "data.test_dir",  # training never reads it
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.default_root_dir",
    "callbacks.rich_progress_bar",
    "callbacks.channels_last",
    "callbacks.model_checkpoint.dirpath",
    "callbacks.model_checkpoint.filename",
    "callbacks.model_checkpoint.save_last",
    "callbacks.model_checkpoint._target_",  # which files are kept, not what is trained
    "callbacks.model_checkpoint.best_weights_only",
)
# Left out of a parent's name too: paths and presets, which name no hyper-parameter.
NOT_IN_NAME = (*NOT_IDENTITY, "experiment", "hydra", "trainer")


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'name': 'resnet18'}} -> {'model.name': 'resnet18'}."""
    flat = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _excluded(key: str, keys: tuple[str, ...]) -> bool:
    return any(key == x or key.startswith(f"{x}.") for x in keys)


def identity(cfg: DictConfig, data: dict[str, str]) -> dict[str, Any]:
    """The flattened config that makes folds belong together, with the data version and split digest.

    It is resolved with `fold` blanked, so a setting that interpolates `${fold}` keeps folds together.
    """
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.fold = None
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    kept = {k: v for k, v in flat.items() if v is not None and not _excluded(k, NOT_IDENTITY)}
    return {**kept, **{f"data.{k}": v for k, v in data.items()}}


def config_hash(cfg: DictConfig, data: dict[str, str]) -> str:
    return hashlib.sha1(json.dumps(identity(cfg, data), sort_keys=True, default=str).encode()).hexdigest()[:16]


def all_params(cfg: DictConfig) -> dict[str, str]:
    """Every resolved setting as an MLflow param (credentials redacted, at most 6000 characters each)."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    return as_params(flat)


def as_params(values: dict[str, Any]) -> dict[str, str]:
    return {k: redact("null" if v is None else str(v))[:6000] for k, v in values.items()}


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def parent_name(cfg: DictConfig, digest: str) -> str:
    """`resnet18 lr=0.001 #3f2a1c`: the backbone, what the command line changed (fold and paths left out),
    and the start of the identity hash, which tells apart configurations whose overrides read alike
    (other data, other config files)."""
    parts = []
    for override in _task_overrides():
        key, _, raw = override.lstrip("+~").partition("=")
        if any(key == x or key.startswith((f"{x}.", f"{x}/")) for x in NOT_IN_NAME):
            continue
        value = OmegaConf.select(cfg, key, default=raw)
        parts.append(f"{key}={raw if isinstance(value, DictConfig) else value}")
    return " ".join([str(cfg.model.name), *sorted(parts), f"#{digest[:6]}"])
