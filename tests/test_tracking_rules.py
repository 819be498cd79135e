"""Tracking rules without training: a configuration's identity, the champion's rules, redacted
credentials, the lock's place, and a fold run that stays open until its last artifact (real sqlite stores)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient
from omegaconf import DictConfig, open_dict

from src.tracking import identity, registry, store
from src.tracking.runs import start_fold_run

DATA = {"data_version": "0f343b0931126a20f133d67c2b018a3b", "split_digest": "82c9b6c24a998f23"}


def test_identity_counts_what_changes_a_result_and_nothing_else(make_cfg: Callable[..., DictConfig]) -> None:
    base = identity.config_hash(make_cfg(), DATA)
    # Display, output and speed settings never split a configuration.
    for override in (
        "trainer.enable_progress_bar=true",
        "trainer.devices=2",
        "data.num_workers=3",
        "cache_features=false",
        "model_dir=elsewhere",
        "fold=1",
        "callbacks.rich_progress_bar=null",
    ):
        assert identity.config_hash(make_cfg(override), DATA) == base, override
    # Anything that can change a result does: callbacks included, and the data version and split.
    for override in ("callbacks=early_stopping", "callbacks.model_checkpoint.monitor=val_loss", "seed=1", "lr=0.1"):
        assert identity.config_hash(make_cfg(override), DATA) != base, override
    assert identity.config_hash(make_cfg(), {**DATA, "data_version": "sha256:1234"}) != base
    # A setting that follows the fold (e.g. a callback given `${fold}`) does not split the folds.
    per_fold = [make_cfg(f"fold={k}", "+callbacks.tag.fold=${fold}") for k in (0, 1)]
    assert len({identity.config_hash(c, DATA) for c in per_fold}) == 1
    assert identity.config_hash(make_cfg(), {**DATA, "split_digest": "ffff"}) != base


def test_credentials_are_redacted_everywhere_they_could_be_shown(make_cfg: Callable[..., DictConfig]) -> None:
    assert store.redact("postgresql://mlflow:s3cret@db.internal:5432/mlflow") == (
        "postgresql://mlflow:***@db.internal:5432/mlflow"
    )
    assert store.redact("see https://user:tok-123@mlflow.example.org/x") == "see https://user:***@mlflow.example.org/x"
    assert store.redact("https://ghp_token@host/path") == "https://***@host/path"
    assert store.redact("sqlite:////tmp/mlflow.db and http://127.0.0.1:5000") == (
        "sqlite:////tmp/mlflow.db and http://127.0.0.1:5000"
    )
    cfg = make_cfg("logger=mlflow", "+logger.tracking_uri=postgresql://u:hunter2@db/x")
    assert "hunter2" not in json.dumps(identity.all_params(cfg))
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "store %s", ("https://u:hunter2@h",), None)
    store.RedactingFilter().filter(record)
    assert "hunter2" not in record.getMessage()


def test_the_lock_of_a_server_store_is_per_user_and_a_sqlite_lock_sits_by_its_database(tmp_path: Path) -> None:
    lock = store.lock_path("https://user:token@mlflow.example.org")
    assert not lock.is_relative_to(tempfile.gettempdir()) and "token" not in str(lock)
    assert oct(os.stat(lock.parent).st_mode & 0o777) == oct(0o700)
    assert store.lock_path(f"sqlite:///{tmp_path}/m.db") == tmp_path / "m.db.lock"


@pytest.fixture
def registry_store(tmp_path: Path) -> tuple[str, MlflowClient]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("resnet18_classifier")
    return uri, client


def _version(client: MlflowClient, tmp_path: Path, **tags: str) -> str:
    source = tmp_path / f"model-{len(client.search_model_versions())}"
    source.mkdir()
    return client.create_model_version("resnet18_classifier", str(source), tags=tags).version


def _ensemble(oof: float, std: float = 0.01, classes: str = '["a", "b"]', data: str = "v1") -> dict[str, str]:
    return {
        "kind": "cv_ensemble",
        "oof_accuracy": str(oof),
        "cv_std_val_accuracy": str(std),
        "classes": classes,
        "data_version": data,
    }


def test_champion_moves_only_to_a_better_ensemble_on_the_same_data(
    registry_store: tuple[str, MlflowClient], tmp_path: Path
) -> None:
    uri, client = registry_store

    def champion() -> str:
        return client.get_model_version_by_alias("resnet18_classifier", registry.CHAMPION).version

    def offer(tags: dict[str, str]) -> tuple[str, bool]:
        version = _version(client, tmp_path, **tags)
        return version, registry.promote_if_better(uri, "resnet18_classifier", version, tags)

    first, moved = offer(_ensemble(0.80))
    assert moved and champion() == first
    assert offer(_ensemble(0.75))[1] is False and champion() == first  # worse
    assert offer(_ensemble(0.80, std=0.02))[1] is False and champion() == first  # tie, larger spread
    better, moved = offer(_ensemble(0.80, std=0.005))  # tie, smaller spread
    assert moved and champion() == better
    best, moved = offer(_ensemble(0.90))
    assert moved and champion() == best
    # Other data or other classes: no comparison; the first on the new data takes the alias.
    new_data, moved = offer(_ensemble(0.50, data="v2"))
    assert moved and champion() == new_data
    assert offer(_ensemble(0.40, data="v2"))[1] is False and champion() == new_data
    new_classes, moved = offer(_ensemble(0.30, classes='["a", "b", "c"]', data="v2"))
    assert moved and champion() == new_classes


def test_a_registry_reference_names_its_version_or_alias(
    registry_store: tuple[str, MlflowClient], tmp_path: Path
) -> None:
    """registry.model_origin: `<name>/<version>` and `<name>@<alias>` name a version; a stage or a typo
    (`/abc`, `/latest`) is one line saying what to give, before MLflow's message about stages."""
    from src.errors import UserError

    uri, client = registry_store
    version = _version(client, tmp_path, **_ensemble(0.8))
    origin = registry.model_origin(f"models:/resnet18_classifier/{version}", uri)
    assert (origin["model_name"], origin["model_version"]) == ("resnet18_classifier", str(version))
    for ref in ("models:/resnet18_classifier/abc", "models:/resnet18_classifier/latest"):
        with pytest.raises(UserError, match=r"give a version number or an alias, e\.g\. models:/resnet18_classifier/1"):
            registry.model_origin(ref, uri)


def test_a_fold_run_stays_open_after_fit_until_its_last_artifact(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = make_cfg("logger=mlflow")
    with open_dict(cfg):
        cfg.logger.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        cfg.logger.system_metrics = False
    run = start_fold_run(cfg, 0, DATA)
    logger = run.lightning_logger()
    logger.log_metrics({"val_accuracy": 0.5}, step=0)
    logger.finalize("success")  # what Lightning does at the end of fit
    client = MlflowClient(cfg.logger.tracking_uri)
    assert client.get_run(run.run_id).info.status == "RUNNING"
    assert client.get_run(run.parent_id).info.status == "RUNNING"


def test_a_process_keeps_its_parent_until_it_is_deleted(make_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    """src.tracking.runs.parent_run: the folds of one configuration in one process share the parent found first,
    marked RUNNING again by id; a parent deleted meanwhile is replaced, and a deleted experiment is one line."""
    from src.errors import UserError

    cfg = make_cfg("logger=mlflow")
    with open_dict(cfg):
        cfg.logger.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        cfg.logger.system_metrics = False
    client = MlflowClient(cfg.logger.tracking_uri)
    first = start_fold_run(cfg, 0, DATA)
    client.set_terminated(first.parent_id, "FINISHED")  # as the parent's summary leaves it after a fold
    second = start_fold_run(cfg, 1, DATA)
    assert second.parent_id == first.parent_id
    assert client.get_run(first.parent_id).info.status == "RUNNING"
    client.delete_run(first.parent_id)
    third = start_fold_run(cfg, 2, DATA)
    assert third.parent_id != first.parent_id
    assert client.get_run(third.run_id).data.tags["mlflow.parentRunId"] == third.parent_id
    client.delete_experiment(third.experiment_id)
    with pytest.raises(UserError, match="is deleted"):
        start_fold_run(cfg, 3, DATA)


def test_epoch_metrics_reach_the_store_in_batches_and_all_by_the_end_of_fit(tmp_path: Path) -> None:
    """FoldLogger holds metrics back for up to `flush_every_s` and sends the rest when fit ends (even failed);
    with 0 it sends each at once, with names cleaned as Lightning's logger cleans them."""
    from src.tracking.fold_logger import FoldLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id

    def history(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]

    batched = FoldLogger(experiment_name="e", tracking_uri=uri, run_id=run_id, flush_every_s=3600)
    for epoch in range(3):
        batched.log_metrics({"val_accuracy": epoch / 10, "note": "not a number"}, step=epoch)
    assert history("val_accuracy") == []
    batched.finalize("failed")
    assert history("val_accuracy") == [(0, 0.0), (1, 0.1), (2, 0.2)] and history("note") == []
    eager = FoldLogger(experiment_name="e", tracking_uri=uri, run_id=run_id, flush_every_s=0)
    with pytest.warns(RuntimeWarning, match="special characters"):
        eager.log_metrics({"val loss%": 0.5}, step=3)
    assert history("val loss") == [(3, 0.5)]
    assert client.get_run(run_id).info.status == "RUNNING"
