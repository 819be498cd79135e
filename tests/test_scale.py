"""Scaling out: DDP on two CPU processes, DDP inside a sweep, the SLURM launcher config, fold=all,
Optuna over the CV mean, and resuming an interrupted fold."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from tests.conftest import run_cli, tiny_overrides
from tests.test_tracking import children_of, runs_by_type, train

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def validation_accuracy(model_path: Path, image_root: Path, split_csv: Path, fold: int) -> tuple[float, int]:
    """The exported model's accuracy recomputed over every image of validation fold `fold`, and their number."""
    from src.data import ImageDataset, build_transform, make_loader
    from src.evaluation import predict, summary_metrics
    from src.model import load_model_file

    net, meta = load_model_file(model_path)
    with split_csv.open() as f:
        rows = [r for r in csv.DictReader(f) if int(r["fold"]) == fold]
    classes = list(meta["classes"])
    transform = build_transform(meta["image_size"], mean=meta["mean"], std=meta["std"])
    dataset = ImageDataset(
        image_root / "train", [r["path"] for r in rows], [classes.index(r["class"]) for r in rows], transform
    )
    return summary_metrics(predict(net, make_loader(dataset, 64, 0)), len(classes))["accuracy"], len(rows)


def test_ddp_on_two_cpu_processes_logs_once_and_scores_like_one_device(image_root: Path, tmp_path: Path) -> None:
    """DDP splits each batch over two processes, so the weights differ from one device's a little; the split,
    the validation set and how best_val_accuracy is measured on it must not."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train(image_root, tmp_path, uri, "fold=0", "epochs=2", *DDP)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = runs_by_type(client, "fold")  # rank 1 created no run of its own
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [0, 1]
    single = run_cli("train.py", *tiny_overrides(image_root, tmp_path / "single"), "fold=0", "epochs=2", "logger=none")
    assert single.returncode == 0, single.stderr[-3000:]

    name = "cnn_resnet18_freeze_backbone_True_fold_0.pth"
    ddp_dir, single_dir = tmp_path, tmp_path / "single"
    split = (ddp_dir / "outputs" / "split.csv").read_text()
    assert split == (single_dir / "outputs" / "split.csv").read_text()  # the same folds
    for out in (ddp_dir, single_dir):
        saved = torch.load(out / "models" / name, weights_only=True)
        accuracy, n_val = validation_accuracy(out / "models" / name, image_root, out / "outputs" / "split.csv", 0)
        assert n_val == 9  # half of 18 images: each validation image counted once, none padded in or left out
        assert saved["best_val_accuracy"] == pytest.approx(accuracy, abs=1e-6), out
        with (out / "outputs" / "history.csv").open() as f:
            assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]
    ddp = torch.load(ddp_dir / "models" / name, weights_only=True)
    reference = torch.load(single_dir / "models" / name, weights_only=True)
    assert ddp.keys() - {"mlflow_run_id"} == reference.keys()
    assert {k: v.shape for k, v in ddp["state_dict"].items()} == {
        k: v.shape for k, v in reference["state_dict"].items()
    }
    assert {k: ddp[k] for k in ("classes", "image_size", "backbone", "fold")} == {
        k: reference[k] for k in ("classes", "image_size", "backbone", "fold")
    }
    assert ddp["mlflow_run_id"] == run.info.run_id
    assert run.data.metrics["best_val_accuracy"] == pytest.approx(ddp["best_val_accuracy"])


def test_ddp_inside_a_sweep_runs_as_ddp_spawn(image_root: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train(image_root, tmp_path, uri, "fold=0,1", *DDP, sweep=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "running it as ddp_spawn" in result.stdout + result.stderr
    client = MlflowClient(uri)
    (parent,) = runs_by_type(client, "cv_parent")
    assert sorted(c.data.tags["fold"] for c in children_of(client, parent.info.run_id)) == ["0", "1"]


def test_slurm_launcher_config_composes() -> None:
    result = run_cli("train.py", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra")
    assert result.returncode == 0, result.stderr[-3000:]
    launcher = yaml.safe_load(result.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["partition"] == "gpu" and launcher["gpus_per_node"] == 1 and launcher["timeout_min"] == 240


def test_fold_all_trains_every_fold_as_children_and_returns_the_cv_mean(image_root: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train(image_root, tmp_path, uri, "fold=all")
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    (parent,) = runs_by_type(client, "cv_parent")
    children = children_of(client, parent.info.run_id)
    assert len(children) == 2
    for child in children:  # config/ like any other fold: the resolved config and Hydra's own files
        configs = {a.path for a in client.list_artifacts(child.info.run_id, "config")}
        assert {"config/resolved_config.yaml", "config/overrides.yaml", "config/config.yaml"} <= configs
        resolved = client.download_artifacts(child.info.run_id, "config/resolved_config.yaml", str(tmp_path))
        assert f"fold: {child.data.tags['fold']}" in Path(resolved).read_text()
    assert "oof_accuracy" in client.get_run(parent.info.run_id).data.metrics
    printed = float(result.stdout.split("cv_mean_val_accuracy: ")[1].split()[0])
    assert abs(printed - client.get_run(parent.info.run_id).data.metrics["cv_mean_val_accuracy"]) < 1e-4
    assert (tmp_path / "outputs" / "fold_0" / "history.csv").is_file()
    assert (tmp_path / "outputs" / "fold_1" / "history.csv").is_file()


def test_optuna_searches_the_cv_mean_and_tags_the_best_trial(image_root: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train(image_root, tmp_path, uri, "hparams_search=optuna", "hydra.sweeper.n_trials=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Best trial: " in result.stdout
    results = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    client = MlflowClient(uri)
    parents = runs_by_type(client, "cv_parent")
    assert 1 <= len(parents) <= 2 and all(len(children_of(client, p.info.run_id)) >= 2 for p in parents)
    (best,) = [p for p in parents if p.data.tags.get("best_trial") == "true"]
    assert abs(best.data.metrics["cv_mean_val_accuracy"] - results["best_value"]) < 1e-6
    # the trial Optuna calls best, ties included (tiny data often ties)
    assert float(best.data.params["lr"]) == pytest.approx(results["best_params"]["lr"])
    assert int(best.data.params["batch_size"]) == results["best_params"]["batch_size"]


def test_resume_continues_a_killed_fold_in_the_same_run(image_root: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stop = "+callbacks.stop._target_=tests.helpers.SignalAfterFirstEpoch"
    killed = train(image_root, tmp_path, uri, "fold=0", "epochs=3", stop)
    assert killed.returncode != 0
    client = MlflowClient(uri)
    (run,) = runs_by_type(client, "fold")
    assert run.info.status == "KILLED"
    resumed = train(image_root, tmp_path / "again", uri, "fold=0", "epochs=3", stop, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (run,) = runs_by_type(client, "fold")
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [0, 1, 2]
    with (Path(run.data.tags["hydra_output_dir"]) / "history.csv").open() as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1", "2"]
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).data.metrics["folds_done"] == 1


def test_resume_without_mlflow_needs_a_checkpoint_path(image_root: Path, tmp_path: Path) -> None:
    base = [*tiny_overrides(image_root, tmp_path), "logger=none", "fold=0", "epochs=3"]
    result = run_cli("train.py", *base, "resume=true")
    assert result.returncode == 2 and "ckpt_path=" in result.stderr
    killed = run_cli("train.py", *base, "+callbacks.stop._target_=tests.helpers.SignalAfterFirstEpoch")
    assert killed.returncode != 0
    last = tmp_path / "outputs" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)  # unfinished: last.ckpt is there, the head and optimizer alone
    assert saved["epoch"] == 0 and saved["optimizer_states"] and len(saved["frozen_backbone"]["sha256"]) == 64
    assert not any(k.startswith("backbone.") for k in saved["state_dict"])
    resumed = run_cli(
        "train.py",
        *tiny_overrides(image_root, tmp_path / "b"),
        "logger=none",
        "fold=0",
        "epochs=3",
        f"ckpt_path={last}",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with (tmp_path / "outputs" / "history.csv").open() as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1", "2"]
    assert not last.exists() and (last.parent / "best.ckpt").is_file()  # finished: last.ckpt is gone
