"""Shared fixtures: tiny real PNG image folders, configs composed in-process, and the real CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "fox")


@pytest.fixture(autouse=True)
def _fresh_warnings() -> None:
    """Each test warns as a new process would: src.errors.warn_once remembers what this process has said."""
    from src import errors

    errors._warned.clear()


def write_images(root: Path, per_class: int, size: int = 32, seed: int = 0) -> Path:
    """Class k is a noisy image tinted by channel k, so a model can learn it in an epoch or two."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
            pixels[..., k] += 150
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/train with 6 images per class and data/test with 3."""
    root = tmp_path_factory.mktemp("data")
    write_images(root / "train", per_class=6)
    write_images(root / "test", per_class=3, seed=1)
    return root


TINY_EXPERIMENT = """# @package _global_
# Small, offline and quiet: 32 px, random init, 2 folds, 1 epoch.
data:
  image_size: 32
  num_workers: 0
model:
  weights: null
n_folds: 2
epochs: 1
batch_size: 4
trainer:
  accelerator: cpu
  enable_progress_bar: false
  enable_model_summary: false
callbacks:
  rich_progress_bar: null
"""


def tiny_overrides(image_root: Path, tmp_path: Path) -> list[str]:
    """Overrides that make a run small, offline and confined to tmp_path (sweep folders show the rest)."""
    conf = tmp_path.parent / "tiny-conf"
    if not conf.exists():
        (conf / "experiment").mkdir(parents=True)
        (conf / "experiment" / "tiny.yaml").write_text(TINY_EXPERIMENT)
    return [
        f"hydra.searchpath=[file://{conf}]",
        "experiment=tiny",
        f"data.train_dir={image_root / 'train'}",
        f"data.test_dir={image_root / 'test'}",
        f"model_dir={tmp_path}/models",
        f"feature_cache_dir={tmp_path}/feature-cache",
        f"hydra.run.dir={tmp_path}/outputs",
        f"hydra.sweep.dir={tmp_path}/multirun",
    ]


@pytest.fixture
def make_cfg(image_root: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose conf/config.yaml (or test.yaml) in-process, the way the CLI would."""

    def make(*overrides: str, config_name: str = "config") -> DictConfig:
        base = tiny_overrides(image_root, tmp_path)
        if config_name != "config":
            base = [o for o in base if o.startswith(("data.", "hydra.run", "hydra.searchpath"))]
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name, overrides=[*base, "logger=none", *overrides], return_hydra_config=True)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "outputs")
            del cfg["hydra"]
        return cfg

    return make


def run_cli(
    script: str, *overrides: str, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    """Run train.py / test.py as a user would, from `cwd`."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None) if env is None or "MLFLOW_TRACKING_URI" not in env else None
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
