"""Loading a single logged model back: a fold run's exported file, or a pt2 model (logged by earlier versions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from src.errors import UserError
from src.tracking import store


def load_logged_model(ref: str, uri: str) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """Network, metadata and origin tags of a fold run's exported file, `runs:/<id>/exported/<file>.pth` (or a
    Lightning `.ckpt` logged as a file)."""
    from mlflow.exceptions import MlflowException

    from src.model import load_model_file

    store.use(uri)
    try:
        with store.downloaded(ref, uri) as local:
            net, meta = load_model_file(local)
    except MlflowException as err:
        raise UserError(
            f"ckpt={ref} was not found in the MLflow store {store.redact(uri)}: {err.message.splitlines()[0]}"
        ) from err
    return net, meta, {"training_run_id": ref.removeprefix("runs:/").split("/", 1)[0], "model_uri": ref}


def pt2_network(folder: Path, metadata: dict[str, Any], ref: str) -> tuple[Any, dict[str, Any]]:
    """Network and metadata of a pt2 MLflow model (how earlier versions of train.py logged each fold), from its
    local folder and its MLmodel's metadata."""
    import mlflow

    if "classes" not in metadata:
        raise UserError(f"ckpt={ref} was not logged by train.py (no classes in its metadata); pass a models/*.pth file")
    return mlflow.pytorch.load_model(str(folder), map_location="cpu"), metadata
