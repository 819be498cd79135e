"""Test runs: one MLflow run per `test.py`, linked by tags to the training run and model version it scored."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from src.tracking import store
from src.tracking.data_version import dvc_data_version, log_dataset
from src.tracking.runs import RUN_TYPE_TAG, git_tags


def log_test_run(
    cfg: DictConfig, ref: str, metrics: dict[str, float], files: dict[str, Path], origin: dict[str, str]
) -> str:
    """Record a test run with its metrics and reports; returns its run id."""
    from mlflow.entities import Metric

    uri = store.tracking_uri(cfg)
    client = store.client(uri)
    with store.store_lock(uri):
        experiment_id = store.experiment_id(client, cfg.logger.experiment_name)
    data = dvc_data_version(cfg.data.test_dir)
    tags: dict[str, Any] = {
        RUN_TYPE_TAG: "test",
        "ckpt": store.redact(ref),
        "data.test_dir": str(cfg.data.test_dir),
        "hydra_output_dir": str(Path(cfg.paths.output_dir).resolve()),
        **origin,
        **git_tags(),
        **data,
    }
    run = client.create_run(experiment_id, run_name=f"test {ref.rstrip('/').rsplit('/', 1)[-1]}", tags=tags)
    run_id = run.info.run_id
    if "data_version" in data:
        log_dataset(client, run_id, Path(cfg.data.test_dir), data["data_version"], "testing", "test")
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"test_{k}", v, now, 0) for k, v in metrics.items()])
    for path in files.values():
        client.log_artifact(run_id, str(path), "reports")
    client.set_terminated(run_id, "FINISHED")
    return run_id
