"""Hydra callbacks that read the MLflow store after a sweep."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from src.tracking.runs import RUN_TYPE_TAG
from src.tracking.store import client as _client
from src.tracking.store import tracking_uri

log = logging.getLogger(__name__)


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
        # Ties go to the earliest trial, as Optuna's own "best trial" does.
        best = max(scored, key=lambda p: (p.data.metrics["cv_mean_val_accuracy"], -(p.info.start_time or 0)))
        for parent in scored:
            client.set_tag(parent.info.run_id, "best_trial", str(parent is best).lower())
        m = best.data.metrics
        message = (
            f"Best trial: {best.info.run_name} (MLflow parent run {best.info.run_id}): "
            f"cv_mean_val_accuracy {m['cv_mean_val_accuracy']:.4f} ± {m.get('cv_std_val_accuracy', 0.0):.4f}"
        )
        log.info(message)
        print(message)
