"""Tracking: MLflow runs for folds (nested under one parent per configuration), the
cross-validation summary, the Model Registry, and test runs.

A configuration's identity is its resolved config minus `fold` and output/logging
settings; every fold run of that identity becomes a child of one parent run, whether
the folds came from one sweep or from separate commands.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from src.errors import UserError

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
RUN_TYPE_TAG = "run_type"  # cv_parent | fold | test
CHAMPION = "champion"
# Keys that say where or how a run is logged, not what is trained.
NOT_IDENTITY = (
    "fold",
    "paths",
    "logger",
    "callbacks",
    "model_dir",
    "feature_cache_dir",
    "data.num_workers",
    "resume",
    "ckpt_path",
)
# Keys left out of a parent's name: the above, paths to data, and settings that name no hyper-parameter.
NOT_IN_NAME = (*NOT_IDENTITY, "experiment", "data.train_dir", "data.test_dir", "hydra", "trainer")


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db as an absolute path (Hydra's output folders
    must not each get a store of their own)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def tracking_uri(cfg: DictConfig) -> str:
    """`logger.tracking_uri`, else the default above."""
    return OmegaConf.select(cfg, "logger.tracking_uri") or default_tracking_uri()


@functools.cache
def _client(uri: str) -> Any:
    """One client per store. Creating it creates a new sqlite store's tables, so parallel jobs take turns."""
    from mlflow import MlflowClient

    with store_lock(uri):
        return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_reachable(uri: str) -> None:
    """Fail before any training when an HTTP tracking server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
    except requests.RequestException as err:
        raise UserError(
            f"MLflow tracking server {uri} is not reachable ({type(err).__name__}); start it with "
            f"`mlflow server --backend-store-uri sqlite:///mlflow.db --artifacts-destination ./mlartifacts "
            f"--host 127.0.0.1 --port 5000`, or run with logger=none"
        ) from err


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """One process at a time creates parents, writes summaries and moves aliases in a store.

    Parallel jobs on one machine (joblib launcher, several shells) share the lock file.
    """
    from filelock import FileLock

    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///") + ".lock")
    else:
        path = Path(tempfile.gettempdir()) / f"mlflow-{hashlib.sha1(uri.encode()).hexdigest()[:12]}.lock"
    with FileLock(str(path), timeout=600):
        yield


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


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The flattened, resolved config that makes folds belong together."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    return {k: v for k, v in flat.items() if not any(k == x or k.startswith(f"{x}.") for x in NOT_IDENTITY)}


def config_hash(cfg: DictConfig) -> str:
    return hashlib.sha1(json.dumps(identity(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sweep_dir() -> str | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return str(Path(HydraConfig.get().sweep.dir).resolve())
    return None


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def parent_name(cfg: DictConfig) -> str:
    """`resnet18 lr=0.001`: the backbone plus what the command line changed, fold and paths left out."""
    parts = []
    for override in _task_overrides():
        key, _, raw = override.lstrip("+~").partition("=")
        if any(key == x or key.startswith(f"{x}.") or key.startswith(f"{x}/") for x in NOT_IN_NAME):
            continue
        value = OmegaConf.select(cfg, key, default=raw)
        parts.append(f"{key}={raw if isinstance(value, DictConfig) else value}")
    return " ".join([str(cfg.model.name), *sorted(parts)])


def _git_tags() -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    try:
        return {
            "mlflow.source.git.commit": git("rev-parse", "HEAD"),
            "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower(),
        }
    except (OSError, subprocess.SubprocessError):
        return {}


def _as_params(values: dict[str, Any]) -> dict[str, str]:
    """MLflow param values: strings of at most 6000 characters."""
    return {k: ("null" if v is None else str(v))[:6000] for k, v in values.items()}


def _log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # created by a parallel job in the meantime
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise UserError(
            f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore`) "
            f"or pick another logger.experiment_name"
        )
    return experiment.experiment_id


def _parent_run(client: Any, experiment_id: str, cfg: DictConfig, digest: str) -> str:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.config_hash = '{digest}' and tags.{RUN_TYPE_TAG} = 'cv_parent'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if runs:
        return runs[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=parent_name(cfg),
        tags={RUN_TYPE_TAG: "cv_parent", "config_hash": digest, "backbone": str(cfg.model.name), **_git_tags()},
    )
    _log_params(client, run.info.run_id, _as_params(identity(cfg)))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


class _Terminated(SystemExit):
    """SIGTERM turned into an exception so the fold's run is closed as KILLED."""


@dataclass
class FoldRun:
    """The MLflow child run of one fold, and its parent."""

    uri: str
    cfg: DictConfig
    fold: int
    experiment_id: str
    parent_id: str
    run_id: str

    @property
    def client(self) -> Any:
        return _client(self.uri)

    def lightning_logger(self) -> Any:
        from lightning.pytorch.loggers import MLFlowLogger

        return MLFlowLogger(
            experiment_name=self.cfg.logger.experiment_name, tracking_uri=self.uri, run_id=self.run_id, log_model=False
        )

    def finish(self, result: dict[str, Any]) -> None:
        """Log reports, the exported file and the MLflow model; register it; close the run; update the parent."""
        import mlflow

        client = self.client
        best = result["best_val_accuracy"]
        client.log_metric(self.run_id, "best_val_accuracy", best)
        for name, value in result["val_metrics"].items():
            client.log_metric(self.run_id, f"final_val_{name}", value)
        out_dir = Path(self.cfg.paths.output_dir)
        hydra_dir = out_dir / ".hydra"
        if hydra_dir.is_dir():
            client.log_artifacts(self.run_id, str(hydra_dir), "config")
        for path in result["files"].values():
            client.log_artifact(self.run_id, str(path), "reports")
        client.log_artifact(self.run_id, str(result["model_file"]), "exported")
        version = None
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        with mlflow.start_run(run_id=self.run_id):
            info = log_pytorch_model(result)
        client.set_tag(self.run_id, "model_file", str(Path(result["model_file"]).resolve()))
        registry = self.cfg.logger.get("registry") or {}
        if registry.get("enabled", True):
            name = registry.get("name") or f"{self.cfg.model.name}_classifier"
            version = self._register(info.model_uri, name, best)
            client.set_tag(self.run_id, "registered_model", f"models:/{name}/{version}")
        client.set_terminated(self.run_id, "FINISHED")
        update_cv_summary(self.uri, self.parent_id)
        log.info(
            "MLflow: run %s (parent %s)%s",
            self.run_id,
            self.parent_id,
            f", registered version {version}" if version else "",
        )

    def _register(self, model_uri: str, name: str, best: float) -> str:
        import mlflow

        client = self.client
        mv = mlflow.register_model(
            model_uri, name, tags={"fold": str(self.fold), "best_val_accuracy": f"{best:.6f}", "run_id": self.run_id}
        )
        with store_lock(self.uri):
            try:
                champion = client.get_model_version_by_alias(name, CHAMPION)
                current = float(champion.tags.get("best_val_accuracy", "-1"))
            except mlflow.exceptions.MlflowException:
                current = float("-inf")
            if best > current:
                client.set_registered_model_alias(name, CHAMPION, mv.version)
                log.info("MLflow: %s version %s is the new %s (%.4f > %.4f)", name, mv.version, CHAMPION, best, current)
        return mv.version


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
        metadata={k: meta[k] for k in ("backbone", "classes", "image_size", "mean", "std")},
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )


def update_cv_summary(uri: str, parent_id: str) -> dict[str, Any]:
    """Recompute the parent's CV metrics from its finished children (latest run per fold wins)."""
    client = _client(uri)
    with store_lock(uri):
        parent = client.get_run(parent_id)
        children = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'FINISHED'",
            order_by=["attributes.end_time ASC"],
            max_results=10000,
        )
        per_fold: dict[int, float] = {}
        for child in children:
            if "best_val_accuracy" in child.data.metrics and "fold" in child.data.tags:
                per_fold[int(child.data.tags["fold"])] = child.data.metrics["best_val_accuracy"]
        if not per_fold:
            return {}
        scores = list(per_fold.values())
        summary = {
            "cv_mean_val_accuracy": statistics.fmean(scores),
            "cv_std_val_accuracy": statistics.pstdev(scores) if len(scores) > 1 else 0.0,
            "folds_done": float(len(scores)),
            "best_fold": float(max(per_fold, key=per_fold.get)),
            **{f"fold_{k}_best_val_accuracy": v for k, v in sorted(per_fold.items())},
        }
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client.log_batch(parent_id, metrics=[Metric(k, v, now, len(scores)) for k, v in summary.items()])
    return summary


def start_fold_run(cfg: DictConfig, fold: int) -> FoldRun:
    """Create the fold's child run under its configuration's parent (creating the parent if needed)."""
    from src.data import dvc_data_version

    uri = tracking_uri(cfg)
    check_reachable(uri)
    client = _client(uri)
    digest = config_hash(cfg)
    with store_lock(uri):  # also serialises the creation of a new sqlite store's tables
        experiment_id = _experiment_id(client, cfg.logger.experiment_name)
        parent_id = _parent_run(client, experiment_id, cfg, digest)
    sweep_dir = _sweep_dir()
    if sweep_dir:
        client.set_tag(parent_id, "hydra_sweep_dir", sweep_dir)

    tags = {
        PARENT_TAG: parent_id,
        RUN_TYPE_TAG: "fold",
        "fold": str(fold),
        "config_hash": digest,
        "backbone": str(cfg.model.name),
        "hydra_output_dir": str(Path(cfg.paths.output_dir).resolve()),
        **_git_tags(),
        **dvc_data_version(cfg.data.train_dir),
    }
    run = client.create_run(experiment_id, run_name=f"{client.get_run(parent_id).info.run_name} fold={fold}", tags=tags)
    params = {
        k: v for k, v in flatten(OmegaConf.to_container(cfg, resolve=True)).items() if not k.startswith("callbacks.")
    }
    _log_params(client, run.info.run_id, _as_params(params))
    return FoldRun(uri, cfg, fold, experiment_id, parent_id, run.info.run_id)


def _fold_runs(cfg: DictConfig, extra_filter: str) -> list[Any]:
    client = _client(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.logger.experiment_name)
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.{RUN_TYPE_TAG} = 'fold' and tags.config_hash = '{config_hash(cfg)}' and {extra_filter}",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )


def find_interrupted_fold(cfg: DictConfig, fold: int) -> tuple[str | None, str | None]:
    """(run id, output folder) of this configuration's latest run of `fold`, if that run did not finish."""
    runs = _fold_runs(cfg, f"tags.fold = '{fold}'")
    if not runs or runs[0].info.status == "FINISHED":
        return None, None
    return runs[0].info.run_id, runs[0].data.tags.get("hydra_output_dir")


def unfinished_run_in(cfg: DictConfig, output_dir: Path) -> str | None:
    """The unfinished fold run of this configuration that wrote to `output_dir`, if any."""
    runs = _fold_runs(cfg, f"tags.hydra_output_dir = '{Path(output_dir).resolve()}'")
    return runs[0].info.run_id if runs and runs[0].info.status != "FINISHED" else None


def reopen_fold_run(cfg: DictConfig, fold: int, run_id: str) -> FoldRun:
    """Mark an interrupted fold run RUNNING again, to continue logging into it."""
    uri = tracking_uri(cfg)
    check_reachable(uri)
    client = _client(uri)
    run = client.get_run(run_id)
    client.update_run(run_id, status="RUNNING")
    return FoldRun(uri, cfg, fold, run.info.experiment_id, run.data.tags[PARENT_TAG], run_id)


@contextlib.contextmanager
def fold_guard(run: FoldRun | None) -> Iterator[None]:
    """Close the fold's run as KILLED (Ctrl-C, SIGTERM) or FAILED (any error) and keep it out of the summary."""

    def on_sigterm(signum: int, frame: Any) -> None:
        raise _Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except BaseException as err:
        if run is not None:
            # Lightning turns Ctrl-C into sys.exit(1) raised while handling the KeyboardInterrupt,
            # and its own SIGTERM handling into SIGTERMException (a SystemExit).
            killed = isinstance(err, (KeyboardInterrupt, _Terminated)) or type(err).__name__ == "SIGTERMException"
            killed = killed or (isinstance(err, SystemExit) and isinstance(err.__context__, KeyboardInterrupt))
            with contextlib.suppress(Exception):  # the store may be what failed; the error below matters more
                run.client.set_terminated(run.run_id, "KILLED" if killed else "FAILED")
                update_cv_summary(run.uri, run.parent_id)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _use(uri: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def load_logged_model(ref: str, uri: str) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """Network, metadata and origin tags for `models:/<name>@<alias>`, `models:/<name>/<version>`
    or `runs:/<id>/<path>`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from src.model import load_model_file

    _use(uri)
    client = _client(uri)
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
        raise UserError(f"ckpt={ref} was not found in the MLflow store {uri}: {err.message.splitlines()[0]}") from err
    if "classes" not in meta:
        raise UserError(f"ckpt={ref} was not logged by train.py (no classes in its metadata); pass a models/*.pth file")
    return net, meta, {**origin, "model_uri": ref}


def log_test_run(
    cfg: DictConfig, ref: str, metrics: dict[str, float], files: dict[str, Path], origin: dict[str, str]
) -> str:
    """Record a test run linked by tags to the training run and model version it scored."""
    from src.data import dvc_data_version

    uri = tracking_uri(cfg)
    client = _client(uri)
    with store_lock(uri):
        experiment_id = _experiment_id(client, cfg.logger.experiment_name)
    tags = {
        RUN_TYPE_TAG: "test",
        "ckpt": ref,
        "data.test_dir": str(cfg.data.test_dir),
        "hydra_output_dir": str(Path(cfg.paths.output_dir).resolve()),
        **origin,
        **_git_tags(),
        **dvc_data_version(cfg.data.test_dir),
    }
    run = client.create_run(experiment_id, run_name=f"test {ref.rsplit('/', 1)[-1]}", tags=tags)
    run_id = run.info.run_id
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"test_{k}", v, now, 0) for k, v in metrics.items()])
    for path in files.values():
        client.log_artifact(run_id, str(path), "reports")
    client.set_terminated(run_id, "FINISHED")
    return run_id


class TagBestTrial(Callback):
    """Hydra callback for hyper-parameter searches: after the sweep, tag and print its best parent run."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("logger"):
            return
        uri = tracking_uri(config)
        client = _client(uri)
        experiment = client.get_experiment_by_name(config.logger.experiment_name)
        sweep_dir = str(Path(config.hydra.sweep.dir).resolve())
        parents = (
            client.search_runs(
                [experiment.experiment_id] if experiment else [],
                filter_string=f"tags.{RUN_TYPE_TAG} = 'cv_parent' and tags.hydra_sweep_dir = '{sweep_dir}'",
                max_results=10000,
            )
            if experiment
            else []
        )
        scored = [p for p in parents if "cv_mean_val_accuracy" in p.data.metrics]
        if not scored:
            return
        best = max(scored, key=lambda p: p.data.metrics["cv_mean_val_accuracy"])
        for parent in scored:
            client.set_tag(parent.info.run_id, "best_trial", str(parent is best).lower())
        m = best.data.metrics
        message = (
            f"Best trial: {best.info.run_name} (MLflow parent run {best.info.run_id}): "
            f"cv_mean_val_accuracy {m['cv_mean_val_accuracy']:.4f} ± {m.get('cv_std_val_accuracy', 0.0):.4f}"
        )
        log.info(message)
        print(message)
