"""The Model Registry: a version per finished fold (kind=fold), a version per complete configuration's
fold ensemble (kind=cv_ensemble), and the `champion` alias, which only an ensemble can hold.

The champion moves when a complete configuration beats it on out-of-fold accuracy (ties: the lower
spread of the fold scores), comparing like with like only: the same class list and the same data
version. On new data (or new classes) the first complete configuration takes the alias and the log
says why, since a score on other data says nothing about this one.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from omegaconf import DictConfig

from src.tracking import store

log = logging.getLogger(__name__)

CHAMPION = "champion"


def model_name(cfg: DictConfig) -> str:
    """`logger.registry.name`, else `<backbone>_classifier` (the seed's `resnet18_classifier`)."""
    settings = cfg.logger.get("registry") or {}
    return settings.get("name") or f"{cfg.model.name}_classifier"


def model_origin(ref: str, uri: str) -> dict[str, str]:
    """Training run, and registry name and version, of a `models:/` reference: `<name>/<version>`,
    `<name>@<alias>`, or a logged model's `models:/m-<id>` (what MLflow prints, and a fold run's `model_uri`)."""
    from src.errors import UserError

    name, slash, version = ref.removeprefix("models:/").strip("/").partition("/")
    if not slash and "@" not in name:
        model = store.client(uri).get_logged_model(name)
        return {"training_run_id": model.source_run_id or "", "model_id": model.model_id}
    name, _, alias = name.partition("@")
    if not alias and not version.isdigit():
        raise UserError(
            f"ckpt={ref}: give a version number or an alias, e.g. models:/{name}/1 or models:/{name}@{CHAMPION}"
        )
    client = store.client(uri)
    mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    return {"training_run_id": mv.run_id, "model_name": name, "model_version": str(mv.version)}


def register_fold(uri: str, model_uri: str, name: str, fold: int, best: float, run_id: str) -> str:
    """A version for one fold's model; it never becomes the champion."""
    import mlflow

    store.use(uri)
    tags = {"kind": "fold", "fold": str(fold), "best_val_accuracy": f"{best:.6f}", "run_id": run_id}
    return str(mlflow.register_model(model_uri, name, tags=tags).version)


def register_ensemble(uri: str, model_uri: str, name: str, tags: dict[str, str]) -> str:
    """A version for a configuration's fold ensemble, tagged kind=cv_ensemble plus `tags`."""
    import mlflow

    store.use(uri)
    return str(mlflow.register_model(model_uri, name, tags={"kind": "cv_ensemble", **tags}).version)


def _why_not_comparable(current: Any, candidate: dict[str, str]) -> str | None:
    """The reason the current champion cannot be compared with the candidate, or None if it can."""
    tags = current.tags
    if tags.get("kind") != "cv_ensemble":
        return f"the current {CHAMPION} (version {current.version}) is a single fold, not a fold ensemble"
    if json.loads(tags.get("classes", "[]")) != json.loads(candidate["classes"]):
        return f"the classes changed since the current {CHAMPION} (version {current.version})"
    if tags.get("data_version") != candidate.get("data_version"):
        return (
            f"the data changed (data version {candidate.get('data_version', '?')[:12]} "
            f"vs {tags.get('data_version', '?')[:12]} of version {current.version})"
        )
    return None


def promote_if_better(uri: str, name: str, version: str, candidate: dict[str, str]) -> bool:
    """Point `champion` at `version` when it beats the current one (see the module docstring)."""
    from mlflow.exceptions import MlflowException

    client = store.client(uri)
    with store.store_lock(uri):
        try:
            current = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            current = None
        if current is None:
            reason = f"it is the first fold ensemble of {name}"
        elif (why := _why_not_comparable(current, candidate)) is not None:
            reason = why
        else:
            new = (float(candidate["oof_accuracy"]), -float(candidate["cv_std_val_accuracy"]))
            old = (float(current.tags["oof_accuracy"]), -float(current.tags.get("cv_std_val_accuracy", "inf")))
            if new <= old:
                log.info(
                    "MLflow: %s version %s stays %s (oof_accuracy %.4f); version %s has %.4f",
                    name, current.version, CHAMPION, old[0], version, new[0],
                )  # fmt: skip
                return False
            reason = f"oof_accuracy {new[0]:.4f} beats {old[0]:.4f} of version {current.version}"
        client.set_registered_model_alias(name, CHAMPION, version)
    log.info("MLflow: %s version %s is the new %s: %s", name, version, CHAMPION, reason)
    return True
