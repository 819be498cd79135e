"""MLflow models of single folds: logging the trained network, and loading any logged model back."""

from __future__ import annotations

from typing import Any

from src.errors import UserError
from src.tracking import store

# What a served fold model needs besides its weights (src.serving.preprocessing_from_meta reads the sizes).
META_KEYS = ("backbone", "classes", "image_size", "resize_size", "crop_size", "interpolation", "mean", "std")


def log_pytorch_model(result: dict[str, Any]) -> Any:
    """Log the plain torchvision network with `mlflow.pytorch.log_model` in the pt2 format.

    pt2 (torch.export) is chosen deliberately: loading it runs no pickled code and needs
    none of this project's classes, and the batch dimension stays dynamic because the
    example batch has two images; the image size is fixed, as it is for the model itself.
    """
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from src.model import native_network

    meta = result["meta"]
    net = native_network(meta["backbone"], len(meta["classes"]), result["model"].native_state_dict())
    size = meta["image_size"]
    example = torch.zeros(2, 3, size, size).numpy()
    with torch.inference_mode():
        output = net(torch.from_numpy(example)).numpy()
    return mlflow.pytorch.log_model(
        net,
        name="model",
        serialization_format="pt2",
        input_example=example.astype(np.float32),
        signature=infer_signature(example, output),
        metadata={k: meta[k] for k in META_KEYS if k in meta},
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )


def load_logged_model(ref: str, uri: str) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """Network, metadata and origin tags for a single model at `models:/<name>@<alias>`,
    `models:/<name>/<version>` or `runs:/<id>/<path>`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from src.model import load_model_file

    store.use(uri)
    client = store.client(uri)
    try:
        if ref.startswith("runs:/"):
            run_id = ref.removeprefix("runs:/").split("/", 1)[0]
            origin = {"training_run_id": run_id}
            if ref.endswith((".pth", ".ckpt")):
                local = mlflow.artifacts.download_artifacts(ref, tracking_uri=uri)
                net, meta = load_model_file(local)
                return net, meta, origin
        else:
            name, _, rest = ref.removeprefix("models:/").partition("/")
            name, _, alias = name.partition("@")
            mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, rest)
            origin = {"training_run_id": mv.run_id, "model_name": name, "model_version": str(mv.version)}
        net = mlflow.pytorch.load_model(ref, map_location="cpu")
        meta = mlflow.models.get_model_info(ref).metadata or {}
    except MlflowException as err:
        raise UserError(
            f"ckpt={ref} was not found in the MLflow store {store.redact(uri)}: {err.message.splitlines()[0]}"
        ) from err
    if "classes" not in meta:
        raise UserError(f"ckpt={ref} was not logged by train.py (no classes in its metadata); pass a models/*.pth file")
    return net, meta, {**origin, "model_uri": ref}
