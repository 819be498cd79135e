"""Loading a single logged model back: a fold run's exported file, or a pt2 model (logged by earlier versions)."""

from __future__ import annotations

from typing import Any

from src.errors import UserError
from src.tracking import registry, store


def load_logged_model(ref: str, uri: str) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """Network, metadata and origin tags for a single model at `models:/<name>@<alias>`,
    `models:/<name>/<version>` or `runs:/<id>/<path>`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from src.model import load_model_file

    store.use(uri)
    try:
        if ref.startswith("runs:/"):
            run_id = ref.removeprefix("runs:/").split("/", 1)[0]
            origin = {"training_run_id": run_id}
            if ref.endswith((".pth", ".ckpt")):
                with store.downloaded(ref, uri) as local:
                    net, meta = load_model_file(local)
                return net, meta, origin
        else:
            origin = registry.model_origin(ref, uri)
        with store.downloaded(ref, uri) as local:  # MLflow's own download into /tmp would stay there
            net = mlflow.pytorch.load_model(str(local), map_location="cpu")
            meta = mlflow.models.Model.load(str(local)).metadata or {}
    except MlflowException as err:
        raise UserError(
            f"ckpt={ref} was not found in the MLflow store {store.redact(uri)}: {err.message.splitlines()[0]}"
        ) from err
    if "classes" not in meta:
        raise UserError(f"ckpt={ref} was not logged by train.py (no classes in its metadata); pass a models/*.pth file")
    return net, meta, {**origin, "model_uri": ref}
