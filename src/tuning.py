"""The learning-rate finder: `tune=lr_find` runs it and reports; `lr=auto` trains every fold with its suggestion.

Fold jobs of a sweep are separate processes, so the suggestion is computed once, on fold 0's training split,
and cached under `lr_find.cache_dir` by the configuration's identity with `lr` blanked (src/tracking/identity.py:
the same settings and data give the same file). A file lock makes parallel jobs wait for the first one instead of
running the finder again. Entries are written whole (temporary name, then rename) and never changed in place.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from filelock import FileLock
from omegaconf import DictConfig, open_dict

from src.errors import UserError

log = logging.getLogger(__name__)

# (cfg, fold) -> (datamodule, model) ready to fit: the run layer's own builder, so the finder sees what training sees.
Prepare = Callable[[DictConfig, int], tuple[L.LightningDataModule, L.LightningModule]]


def is_auto(cfg: DictConfig) -> bool:
    return str(cfg.lr).lower() == "auto"


def cache_key(cfg: DictConfig, data: dict[str, str]) -> str:
    """The identity hash of `cfg` with `lr`, `fold` and `tune` blanked, plus the data version and split digest.

    `epochs` and `callbacks` are blanked too: the finder runs its own steps with no callbacks, so a longer run or
    an EMA reuses the same suggestion instead of drawing a new one."""
    from src.tracking.identity import config_hash

    keyed = copy.deepcopy(cfg)
    with open_dict(keyed):
        keyed.lr = None
        keyed.tune = None
        keyed.epochs = None
        keyed.callbacks = None
    return config_hash(keyed, data)


def _with_lr(cfg: DictConfig, lr: float) -> DictConfig:
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.lr = float(lr)
    return cfg


def run_finder(cfg: DictConfig, prepare: Prepare, out_dir: Path) -> dict[str, Any]:
    """Lightning's lr range test on fold 0's training split; returns the suggestion, curve and plot path."""
    from lightning.pytorch.tuner import Tuner

    settings = cfg.lr_find
    datamodule, model = prepare(_with_lr(cfg, settings.min_lr), 0)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = L.Trainer(
        accelerator=cfg.trainer.get("accelerator", "auto"),
        devices=1,
        max_epochs=-1,  # the finder stops after lr_find.num_training steps
        precision=cfg.trainer.get("precision", "32-true"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=out_dir,
    )
    finder = Tuner(trainer).lr_find(
        model,
        datamodule=datamodule,
        min_lr=float(settings.min_lr),
        max_lr=float(settings.max_lr),
        num_training=int(settings.num_training),
        update_attr=False,
    )
    suggestion = finder.suggestion() if finder is not None else None
    if suggestion is None:
        raise UserError(
            "the lr finder gave no suggestion (too few steps or a flat loss); raise lr_find.num_training "
            "or set lr=<value>"
        )
    plot = out_dir / "lr_find.png"
    figure = finder.plot(suggest=True, show=False)
    figure.savefig(plot, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return {"lr": float(suggestion), "lrs": finder.results["lr"], "losses": finder.results["loss"], "plot": str(plot)}


def cached_lr(cfg: DictConfig, data: dict[str, str], prepare: Prepare, refresh: bool = False) -> dict[str, Any]:
    """The finder's result for this configuration: read from the cache, or computed once (under a lock) and stored."""
    key = cache_key(cfg, data)
    folder = Path(cfg.lr_find.cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    entry = folder / f"{key}.json"
    with FileLock(folder / f"{key}.lock"):
        if entry.is_file() and not refresh:
            result = json.loads(entry.read_text())
            log.info("lr=auto: %.3g from the lr finder cache %s", result["lr"], entry)
            return result
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            result = run_finder(cfg, prepare, Path(tmp))
            plot = folder / f"{key}.png"
            shutil.copyfile(result["plot"], f"{plot}.tmp")
            os.replace(f"{plot}.tmp", plot)
        result = {**result, "plot": str(plot), "key": key}
        entry.with_suffix(".json.tmp").write_text(json.dumps(result))
        os.replace(entry.with_suffix(".json.tmp"), entry)
    log.info("lr finder: suggests lr=%.3g (fold 0's training split), cached as %s", result["lr"], entry)
    return result


def resolve_lr(cfg: DictConfig, data: dict[str, str], prepare: Prepare) -> tuple[DictConfig, dict[str, Any] | None]:
    """`cfg` with `lr=auto` replaced by the finder's suggestion (and that result), or `cfg` unchanged and None."""
    if not is_auto(cfg):
        return cfg, None
    result = cached_lr(cfg, data, prepare)
    return _with_lr(cfg, result["lr"]), result


def lr_find(cfg: DictConfig, data: dict[str, str], prepare: Prepare) -> float:
    """`tune=lr_find`: run the finder afresh (refreshing the cache), print the suggestion, save the plot in the
    run folder and, with a logger, record both in an MLflow run of its own (tag run_type=lr_find)."""
    result = cached_lr(cfg, data, prepare, refresh=True)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = out_dir / "lr_find.png"
    shutil.copyfile(result["plot"], plot)
    (out_dir / "lr_find.json").write_text(json.dumps({k: v for k, v in result.items() if k != "plot"}, indent=1))
    if cfg.logger:
        _log_run(cfg, data, result, [plot, out_dir / "lr_find.json"])
    print(f"lr_find suggestion: {result['lr']:.3g} (plot: {plot}); train with lr={result['lr']:.3g} or lr=auto")
    return result["lr"]


def _log_run(cfg: DictConfig, data: dict[str, str], result: dict[str, Any], files: list[Path]) -> None:
    from src.tracking import store
    from src.tracking.runs import RUN_TYPE_TAG, git_tags

    uri = store.tracking_uri(cfg)
    client = store.client(uri)
    with store.store_lock(uri):
        experiment_id = store.experiment_id(client, cfg.logger.experiment_name)
    tags = {
        RUN_TYPE_TAG: "lr_find",
        "lr_find_key": result["key"],
        "backbone": str(cfg.model.name),
        **git_tags(),
        **data,
    }
    run = client.create_run(experiment_id, run_name=f"lr_find {cfg.model.name}", tags=tags)
    for name in ("min_lr", "max_lr", "num_training"):
        client.log_param(run.info.run_id, f"lr_find.{name}", str(cfg.lr_find[name]))
    client.log_metric(run.info.run_id, "lr_suggestion", result["lr"])
    for path in files:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id, "FINISHED")
    log.info("MLflow: lr_find run %s", run.info.run_id)
