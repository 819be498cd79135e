"""Fold runs: one MLflow child run per fold, nested under its configuration's parent run.

A fold run is RUNNING while it trains and is closed FINISHED only after its last metric and
artifact, so `resume=true` and the CV summary never take a half-logged run for a finished one.
A crash, Ctrl-C or SIGTERM closes it FAILED or KILLED instead.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src import plots
from src.tracking import identity as ident
from src.tracking import registry, store, summary
from src.tracking.data_version import log_dataset

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
RUN_TYPE_TAG = "run_type"  # cv_parent | fold | test


@functools.cache
def git_tags() -> dict[str, str]:
    """The commit and dirty flag of the code this process imported at its start: read once, not per sweep job."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    try:
        return {
            "mlflow.source.git.commit": git("rev-parse", "HEAD"),
            "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower(),
        }
    except (OSError, subprocess.SubprocessError):
        return {}


def log_params(mlflow_client: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[i : i + 100])


def _sweep_dir() -> str | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return str(Path(HydraConfig.get().sweep.dir).resolve())
    return None


# The parents this process found or created: (store, experiment, config hash) -> (experiment id, parent run, the
# sweep folder it was tagged with). The next fold of a sweep marks its parent RUNNING again by id; only when that
# fails (the parent or its experiment deleted meanwhile) does it look the parent up again.
_parents: dict[tuple[str, str, str], tuple[str, Any, str | None]] = {}


def parent_run(cfg: DictConfig, data: dict[str, str], uri: str) -> tuple[str, Any, str]:
    """(experiment id, parent run, config hash) of this configuration, creating the parent on first use."""
    from mlflow.exceptions import MlflowException

    client = store.client(uri)
    digest = ident.config_hash(cfg, data)
    key = (uri, str(cfg.logger.experiment_name), digest)
    parent = None
    if key in _parents:
        experiment_id, parent, tagged = _parents[key]
        try:
            client.update_run(parent.info.run_id, status="RUNNING")  # its end time moves with its folds (summary.py)
        except MlflowException:
            parent = None
    if parent is None:
        experiment_id, parent = _find_or_create_parent(cfg, data, uri, digest)
        tagged = parent.data.tags.get("hydra_sweep_dir")
    sweep_dir = _sweep_dir()
    if sweep_dir and tagged != sweep_dir:
        client.set_tag(parent.info.run_id, "hydra_sweep_dir", sweep_dir)
        tagged = sweep_dir
    _parents[key] = experiment_id, parent, tagged
    return experiment_id, parent, digest


def _find_or_create_parent(cfg: DictConfig, data: dict[str, str], uri: str, digest: str) -> tuple[str, Any]:
    """(experiment id, parent run) of config hash `digest` in the store, marked RUNNING; created if there is none."""
    client = store.client(uri)
    with store.store_lock(uri):  # also serialises the creation of a new sqlite store's tables
        experiment_id = store.experiment_id(client, cfg.logger.experiment_name)
        runs = client.search_runs(
            [experiment_id],
            filter_string=f"tags.config_hash = '{digest}' and tags.{RUN_TYPE_TAG} = 'cv_parent'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        if runs:
            parent = runs[0]
            client.update_run(parent.info.run_id, status="RUNNING")
        else:
            parent = client.create_run(
                experiment_id,
                run_name=ident.parent_name(cfg, digest),
                tags={
                    RUN_TYPE_TAG: "cv_parent",
                    "config_hash": digest,
                    "backbone": str(cfg.model.name),
                    "n_folds": str(cfg.n_folds),
                    **{k: v for k, v in data.items() if k in ("data_version", "split_digest")},
                    **git_tags(),
                },
            )
            log_params(client, parent.info.run_id, ident.as_params(ident.identity(cfg, data)))
    return experiment_id, parent


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
    artifact_uri: str
    params: dict[str, str] | None = field(default=None, repr=False)  # as logged: spares reading them back
    monitor: Any = field(default=None, repr=False)

    @property
    def client(self) -> Any:
        return store.client(self.uri)

    def lightning_logger(self) -> Any:
        from src.tracking.fold_logger import FoldLogger

        return FoldLogger(
            experiment_name=self.cfg.logger.experiment_name,
            tracking_uri=self.uri,
            run_id=self.run_id,
            log_model=False,
            flush_every_s=float(OmegaConf.select(self.cfg, "logger.metrics_every_s", default=5.0)),
        )

    @functools.cached_property
    def artifacts(self) -> Any:
        """The run's artifact repository, from its known location: MlflowClient.log_artifact(s) would read the
        run back to find it."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
        from mlflow.utils.uri import add_databricks_profile_info_to_artifact_uri

        return get_artifact_repository(
            add_databricks_profile_info_to_artifact_uri(self.artifact_uri, self.uri), self.uri
        )

    def start_system_metrics(self, resume: bool = False) -> None:
        """CPU, memory, disk and (where present) GPU use, sampled by MLflow while the fold trains; `resume`
        continues the steps of a reopened run (MLflow reads the run back for them)."""
        if not OmegaConf.select(self.cfg, "logger.system_metrics", default=True):
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=5, samples_before_logging=1, resume_logging=resume, tracking_uri=self.uri
            )
            self.monitor.start()
        except Exception as err:  # a missing psutil/GPU library must not stop training
            log.warning("system metrics are off: %s", err)
            self.monitor = None

    def stop_system_metrics(self) -> None:
        """Stop sampling and log the samples of the last, unfinished interval (MLflow's monitor drops them,
        which leaves a fold shorter than one interval without any system metrics)."""
        if self.monitor is not None:
            with contextlib.suppress(Exception):
                self.monitor.finish()
                if metrics := self.monitor.aggregate_metrics():
                    self.monitor.publish_metrics(metrics)
                    self.monitor.mlflow_logger.flush()
            self.monitor = None

    def _log_config(self) -> None:
        """The resolved config and Hydra's overrides as `config/`, credentials redacted."""
        from hydra.core.hydra_config import HydraConfig

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "config"
            folder.mkdir()
            (folder / "resolved_config.yaml").write_text(
                store.redact(OmegaConf.to_yaml(self.cfg, resolve=True)) if self.cfg else ""
            )
            hydra_dir = Path(HydraConfig.get().runtime.output_dir) / ".hydra" if HydraConfig.initialized() else None
            for path in sorted(hydra_dir.glob("*.yaml")) if hydra_dir and hydra_dir.is_dir() else []:
                (folder / path.name).write_text(store.redact(path.read_text()))
            self.artifacts.log_artifacts(str(folder), "config")

    def finish(self, result: dict[str, Any]) -> None:
        """Log metrics, config, reports, the exported file and the MLflow model; register the model (while the
        figures are drawn); log the figures and close the run FINISHED; then update the parent (CV summary,
        out-of-fold report, ensemble, champion)."""
        from src.serving import log_ensemble_model

        client = self.client
        best = result["best_val_accuracy"]
        metrics = {"best_val_accuracy": best, **{f"final_val_{k}": v for k, v in result["val_metrics"].items()}}
        self._log_config()
        files = [Path(p) for p in result["files"].values()]
        for path in files:
            if path.suffix != ".png":
                self.artifacts.log_artifact(str(path), "reports")
        model_file = Path(result["model_file"])
        store.log_linked(self.artifacts, model_file, "exported")
        store.use(self.uri)
        # The exported file as an ensemble of one: no tracing, and the same loader as the fold ensemble; the
        # final metrics are the model's too.
        info = log_ensemble_model(
            [model_file],
            run_id=self.run_id,
            metrics=metrics,
            name="model",
            input_example=False,
            metas=[result["meta"]],
            run_params=(self.experiment_id, self.params) if self.params is not None else None,
        )
        store.link_members(client.get_logged_model(info.model_id).artifact_location, [model_file])  # one copy on disk
        client.set_tag(self.run_id, "model_uri", info.model_uri)
        version = None
        settings = self.cfg.logger.get("registry") or {}
        if settings.get("enabled", True):
            name = registry.model_name(self.cfg)
            version = registry.register_fold(self.uri, info.model_uri, name, self.fold, best, self.run_id)
            client.set_tag(self.run_id, "registered_model", f"models:/{name}/{version}")
        self.stop_system_metrics()
        plots.wait(result.get("figures", []))  # drawn by src/plots.py's helper meanwhile
        for path in files:
            if path.suffix == ".png":
                self.artifacts.log_artifact(str(path), "reports")
        client.set_terminated(self.run_id, "FINISHED")
        log.info("MLflow: run %s (parent %s)%s", self.run_id, self.parent_id, f", version {version}" if version else "")
        summary.update_parent(self.uri, self.parent_id, self.cfg)


def start_fold_run(cfg: DictConfig, fold: int, data: dict[str, str]) -> FoldRun:
    """Create the fold's child run under its configuration's parent (creating the parent if needed).

    `data` holds `data_version` and `split_digest` (src/tracking/data_version.py), part of the identity.
    """
    uri = store.tracking_uri(cfg)
    store.check_reachable(uri)
    client = store.client(uri)
    experiment_id, parent, digest = parent_run(cfg, data, uri)
    parent_id = parent.info.run_id
    tags = {
        PARENT_TAG: parent_id,
        RUN_TYPE_TAG: "fold",
        "fold": str(fold),
        "config_hash": digest,
        "backbone": str(cfg.model.name),
        "hydra_output_dir": str(Path(cfg.paths.output_dir).resolve()),
        **git_tags(),
        **data,
    }
    name = f"{parent.info.run_name} fold={fold}"
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    params = ident.all_params(cfg)
    log_params(client, run.info.run_id, params)
    if "data_version" in data:
        log_dataset(client, run.info.run_id, Path(cfg.data.train_dir), data["data_version"], "training", "train")
    fold_run = FoldRun(uri, cfg, fold, experiment_id, parent_id, run.info.run_id, run.info.artifact_uri, params)
    fold_run.start_system_metrics()
    return fold_run


def _fold_runs(cfg: DictConfig, data: dict[str, str], extra_filter: str) -> list[Any]:
    client = store.client(store.tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.logger.experiment_name)
    if experiment is None:
        return []
    digest = ident.config_hash(cfg, data)
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.{RUN_TYPE_TAG} = 'fold' and tags.config_hash = '{digest}' and {extra_filter}",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )


def find_interrupted_fold(cfg: DictConfig, fold: int, data: dict[str, str]) -> tuple[str | None, str | None]:
    """(run id, output folder) of this configuration's latest run of `fold`, if that run did not finish."""
    runs = _fold_runs(cfg, data, f"tags.fold = '{fold}'")
    if not runs or runs[0].info.status == "FINISHED":
        return None, None
    return runs[0].info.run_id, runs[0].data.tags.get("hydra_output_dir")


def unfinished_run_in(cfg: DictConfig, data: dict[str, str], output_dir: Path) -> str | None:
    """The unfinished fold run of this configuration that wrote to `output_dir`, if any."""
    runs = _fold_runs(cfg, data, f"tags.hydra_output_dir = '{Path(output_dir).resolve()}'")
    return runs[0].info.run_id if runs and runs[0].info.status != "FINISHED" else None


def reopen_fold_run(cfg: DictConfig, fold: int, run_id: str) -> FoldRun:
    """Mark an interrupted fold run RUNNING again, to continue logging into it."""
    uri = store.tracking_uri(cfg)
    store.check_reachable(uri)
    client = store.client(uri)
    run = client.get_run(run_id)
    client.update_run(run_id, status="RUNNING")
    parent_id = run.data.tags[PARENT_TAG]
    client.update_run(parent_id, status="RUNNING")
    fold_run = FoldRun(uri, cfg, fold, run.info.experiment_id, parent_id, run_id, run.info.artifact_uri)
    fold_run.start_system_metrics(resume=True)
    return fold_run


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
            run.stop_system_metrics()
            with contextlib.suppress(Exception):  # the store may be what failed; the error below matters more
                if run.client.get_run(run.run_id).info.status == "RUNNING":
                    run.client.set_terminated(run.run_id, "KILLED" if killed else "FAILED")
                summary.update_parent(run.uri, run.parent_id, run.cfg)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
