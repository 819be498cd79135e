"""Log k fold model files as one MLflow pyfunc model (models-from-code) and find such a model after download."""

from __future__ import annotations

import base64
import functools
import io
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from src.serving import ensemble_model
from src.serving.ensemble_model import CONFIG_FILE, KIND, PROB_PREFIX, save_ensemble

ARTIFACT = "ensemble"  # the key (and folder under artifacts/) of the ensemble folder inside the MLflow model
REQUIREMENTS = ("torch", "torchvision", "pillow", "pandas", "numpy")


def pip_requirements() -> list[str]:
    """The model file's imports, pinned to the installed versions (local build tags such as +cu130 dropped);
    MLflow adds its own pin."""
    return list(_pinned())


@functools.cache
def _pinned() -> tuple[str, ...]:  # read once per process: every fold logs a model
    return tuple(f"{name}=={version(name).split('+')[0]}" for name in REQUIREMENTS)


def example_frame(size: int = 8) -> Any:
    """A one-row input: a small grey PNG, base64-encoded, as a client sends it."""
    import pandas as pd
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buffer, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode("ascii")]})


def signature(classes: Sequence[str]) -> Any:
    """Input: `image` (base64 string) or `path`, each optional; output: predicted, confidence, prob_<class>."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", "image", required=False), ColSpec("string", "path", required=False)])
    outputs = Schema(
        [
            ColSpec("string", "predicted"),
            ColSpec("double", "confidence"),
            *(ColSpec("double", f"{PROB_PREFIX}{name}") for name in classes),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def _as_model_file(path: Path, staging: Path, i: int) -> Path:
    """A torchvision-layout .pth for `path`: itself, or a Lightning .ckpt converted (read through src.model)."""
    from src.errors import UserError
    from src.model import load_model_file, save_model_file

    if path.suffix == ".pth":  # save_ensemble reads its metadata; building the network here would cost ~0.2 s
        if not path.is_file():
            raise UserError(f"model file {path} does not exist; pass models/*.pth files written by train.py")
        return path
    net, meta = load_model_file(path)  # UserError with a hint for a missing or unreadable file
    return save_model_file(staging / f"converted_{i}.pth", net.state_dict(), meta)


def log_ensemble_model(
    model_files: Sequence[str | Path],
    *,
    run_id: str | None = None,
    metrics: Mapping[str, float] | None = None,
    tta: str = "none",
    temperature: float = 1.0,
    name: str = "ensemble",
    input_example: bool = True,
    metas: Sequence[Mapping[str, Any]] | None = None,
    run_params: tuple[str, Mapping[str, str]] | None = None,
) -> Any:
    """Log the fold models as one MLflow model `name` of run `run_id` (default: the active run); return its
    ModelInfo. Register it with `mlflow.register_model(info.model_uri, ...)`.

    The model is the self-contained src/serving/ensemble_model.py with the files under artifacts/ensemble/
    (ensemble.json and model_<i>.pth); one file makes an ensemble of one. It carries the run's params, and
    `metrics` are logged to the run linked to it (MLflow's model metrics).

    Given `run_id` outside an active run, it is logged the way `mlflow.initialize_logged_model` documents: the
    run is not made active, so its status stays as it is (a fold run is closed only after its last artifact)
    and MLflow skips re-reading every metric history of the run to link the ones at step 0 (16 requests for a
    fold run). `input_example=False` logs no example, which also skips MLflow's check that loads and runs the
    model (~1 s). `metas`: the metadata of `model_files` (.pth) as written, and `run_params`: the run's
    (experiment id, params) as logged, to spare reading them back.
    """
    import mlflow
    from mlflow.entities import LoggedModelOutput, Metric

    from src.errors import UserError
    from src.model import native_kwargs

    active = mlflow.active_run()
    run_id = run_id or (active.info.run_id if active else None)
    if run_id is None:
        raise UserError("log_ensemble_model needs run_id=... or an active MLflow run (mlflow.start_run)")
    if active is not None and active.info.run_id != run_id:  # MLflow would link the model to the active run
        raise UserError(f"log_ensemble_model(run_id={run_id}) inside another active run; call it outside that run")
    client = mlflow.MlflowClient()
    if run_params is None:
        run = client.get_run(run_id)
        run_params = run.info.experiment_id, run.data.params
    experiment_id, params = run_params
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        files = [_as_model_file(Path(p), staging, i) for i, p in enumerate(model_files)]
        try:
            config = save_ensemble(
                staging / ARTIFACT,
                files,
                tta=tta,
                temperature=temperature,
                network_kwargs=native_kwargs,
                link=True,
                metas=[dict(m) for m in metas] if metas is not None and files == list(map(Path, model_files)) else None,
            )
        except ValueError as err:
            raise UserError(f"cannot make an ensemble of {len(files)} model files: {err}") from err
        model = mlflow.initialize_logged_model(
            name=name, source_run_id=run_id, params=dict(params), experiment_id=experiment_id
        )
        if metrics:
            now = int(time.time() * 1000)
            client.log_batch(
                run_id, metrics=[Metric(k, float(v), now, 0, model_id=model.model_id) for k, v in metrics.items()]
            )
        metadata = {k: config[k] for k in ("classes", "backbone", "preprocessing", "tta", "temperature")}
        with warnings.catch_warnings():
            # Left out on purpose (input_example=False): the signature is given, and the check would cost ~1 s.
            warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name=name,
                model_id=model.model_id,
                python_model=ensemble_model.__file__,
                artifacts={ARTIFACT: str(staging / ARTIFACT)},
                signature=signature(config["classes"]),
                input_example=example_frame() if input_example else None,
                pip_requirements=pip_requirements(),
                metadata={"kind": KIND, "n_models": len(files), **metadata},
            )
    if active is None:  # inside the active run, MLflow links them itself
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return info


def ensemble_dir(model_dir: str | Path) -> Path | None:
    """The ensemble folder inside a downloaded MLflow model (or the folder itself), if it is one of ours."""
    model_dir = Path(model_dir)
    for candidate in (model_dir / "artifacts" / ARTIFACT, model_dir):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    return None
