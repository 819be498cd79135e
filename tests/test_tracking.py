"""MLflow against real stores: nested fold runs, CV summary, artifacts, registry, test runs,
faults, parallel jobs, a real `mlflow server`, and the leaderboard."""

from __future__ import annotations

import contextlib
import csv
import json
import re
import statistics
import time
from pathlib import Path

import mlflow
import pytest
import sqlalchemy
import torch
from mlflow import MlflowClient

from src.leaderboard import collect, render
from src.sample_data import write_digits
from src.tracking.store import local_dir
from tests.conftest import run_cli, tiny_overrides
from tests.helpers import free_port, mlflow_server

EXPERIMENT = "pytorch-classification"


def runs_by_type(client: MlflowClient, run_type: str) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("run_type") == run_type]


def children_of(client: MlflowClient, parent_id: str) -> list:
    return [r for r in runs_by_type(client, "fold") if r.data.tags["mlflow.parentRunId"] == parent_id]


def all_artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= all_artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def train(image_root: Path, tmp_path: Path, uri: str, *overrides: str, sweep: bool = False):
    args = ["-m"] if sweep else []
    result = run_cli("train.py", *args, *tiny_overrides(image_root, tmp_path), f"logger.tracking_uri={uri}", *overrides)
    return result


@pytest.fixture(scope="module")
def sweep_store(image_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A 2-fold x 2-lr sweep, 2 epochs each, logged to a fresh sqlite store."""
    tmp = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    result = train(image_root, tmp, uri, "fold=0,1", "lr=1e-3,1e-4", "epochs=2", sweep=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return uri, tmp


def test_each_configuration_is_one_parent_with_its_folds_nested(sweep_store: tuple[str, Path]) -> None:
    client = MlflowClient(sweep_store[0])
    parents = runs_by_type(client, "cv_parent")
    names = sorted(p.info.run_name for p in parents)
    assert re.fullmatch(r"resnet18 epochs=2 lr=0\.0001 #[0-9a-f]{6}", names[0]), names
    assert re.fullmatch(r"resnet18 epochs=2 lr=0\.001 #[0-9a-f]{6}", names[1]), names
    for parent in parents:
        assert "fold" not in parent.data.params and parent.data.params["model.name"] == "resnet18"
        children = children_of(client, parent.info.run_id)
        assert sorted(c.data.tags["fold"] for c in children) == ["0", "1"]
        for child in children:
            assert child.info.status == "FINISHED"
            assert child.info.run_name == f"{parent.info.run_name} fold={child.data.tags['fold']}"
            params = child.data.params
            for key in (
                "fold",
                "model.name",
                "model.freeze_backbone",
                "model.weights",
                "lr",
                "batch_size",
                "epochs",
                "optimizer._target_",
                "n_folds",
                "split_seed",
                "seed",
                "data.image_size",
                "callbacks.model_checkpoint.monitor",
            ):
                assert key in params, key
            assert params["lr"] == parent.data.params["lr"]
            tags = child.data.tags
            assert len(tags["mlflow.source.git.commit"]) == 40 and tags["git_dirty"] in ("true", "false")
            assert Path(tags["hydra_output_dir"]).is_dir() and tags["config_hash"] == parent.data.tags["config_hash"]
            assert tags["data_version"] == parent.data.tags["data_version"] and len(tags["split_digest"]) == 16
            (dataset,) = client.get_run(child.info.run_id).inputs.dataset_inputs
            assert dataset.dataset.digest in tags["data_version"] and dataset.dataset.name == "train"
            assert any(k.startswith("system/cpu") for k in child.data.metrics)
        # The parent spans its folds in the UI: it starts with the first and ends with the last.
        assert parent.info.status == "FINISHED"
        assert parent.info.start_time <= min(c.info.start_time for c in children)
        assert parent.info.end_time == max(c.info.end_time for c in children)


def test_parent_summarises_cross_validation(sweep_store: tuple[str, Path]) -> None:
    client = MlflowClient(sweep_store[0])
    for parent in runs_by_type(client, "cv_parent"):
        scores = {
            int(c.data.tags["fold"]): c.data.metrics["best_val_accuracy"]
            for c in children_of(client, parent.info.run_id)
        }
        m = parent.data.metrics
        assert m["folds_done"] == 2
        assert m["cv_mean_val_accuracy"] == pytest.approx(statistics.fmean(scores.values()))
        assert m["cv_std_val_accuracy"] == pytest.approx(statistics.pstdev(scores.values()))
        assert scores[int(m["best_fold"])] == max(scores.values())
        assert m["fold_0_best_val_accuracy"] == pytest.approx(scores[0])


def test_fold_runs_have_epoch_metrics_and_artifacts(sweep_store: tuple[str, Path]) -> None:
    client = MlflowClient(sweep_store[0])
    child = runs_by_type(client, "fold")[0]
    for metric in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_f1", "lr"):
        assert [m.step for m in client.get_metric_history(child.info.run_id, metric)] == [0, 1], metric
    best = max(m.value for m in client.get_metric_history(child.info.run_id, "val_accuracy"))
    assert child.data.metrics["best_val_accuracy"] == pytest.approx(best)
    artifacts = all_artifacts(client, child.info.run_id)
    fold = child.data.tags["fold"]
    expected = {
        "config/config.yaml",
        "config/overrides.yaml",
        "config/hydra.yaml",
        "reports/split.csv",
        "reports/history.csv",
        "reports/curves_loss.png",
        "reports/curves_accuracy.png",
        "reports/val_confusion_matrix.png",
        "reports/val_classification_report.txt",
        "reports/val_predictions.csv",
        "config/resolved_config.yaml",
        f"exported/cnn_resnet18_freeze_backbone_True_fold_{fold}.pth",
    }
    assert expected <= artifacts, expected - artifacts
    # The exported artifact is this run's own file, written in its own folder; models/ holds a copy.
    own = Path(child.data.tags["hydra_output_dir"]) / "model" / f"cnn_resnet18_freeze_backbone_True_fold_{fold}.pth"
    local = client.download_artifacts(child.info.run_id, f"exported/{own.name}", str(sweep_store[1] / "dl"))
    assert Path(local).read_bytes() == own.read_bytes()
    saved = torch.load(own, weights_only=True)
    assert saved["mlflow_run_id"] == child.info.run_id
    assert not list((sweep_store[1] / "models").glob(".*.tmp"))
    models = client.search_logged_models(
        [child.info.experiment_id], filter_string=f"source_run_id = '{child.info.run_id}'"
    )
    assert len(models) == 1 and models[0].name == "model"
    # The run lists the model as its output, and the fold's final metrics are the model's metrics too.
    assert [o.model_id for o in child.outputs.model_outputs] == [models[0].model_id]
    model_metrics = {m.key: m.value for m in models[0].metrics}
    assert model_metrics["best_val_accuracy"] == pytest.approx(child.data.metrics["best_val_accuracy"])
    assert models[0].params == child.data.params
    # Artifacts live beside the database, not under the folder the sweep ran from.
    artifact_dir = local_dir(client.get_run(child.info.run_id).info.artifact_uri)
    assert artifact_dir.is_relative_to(sweep_store[1] / "mlruns" / "pytorch-classification"), artifact_dir
    # One copy on disk: the exported artifact and the fold's MLflow model are hard links to the run's own file.
    assert (local_dir(client.get_run(child.info.run_id).info.artifact_uri) / "exported" / own.name).samefile(own)
    (in_model,) = local_dir(models[0].artifact_location).rglob("model_0.pth")
    assert in_model.samefile(own)


def test_a_file_is_linked_in_place_or_left_as_it_was(tmp_path: Path) -> None:
    """src.tracking.store._link_in_place: the copy becomes a hard link to the source, with no temporary name left;
    where no link can be made (here: no source), the copy stays as it was."""
    from src.tracking.store import _link_in_place

    source, copy = tmp_path / "model.pth", tmp_path / "artifacts" / "model.pth"
    copy.parent.mkdir()
    source.write_bytes(b"weights")
    copy.write_bytes(b"weights")
    assert _link_in_place(source, copy) and copy.samefile(source)
    assert sorted(p.name for p in copy.parent.iterdir()) == ["model.pth"]
    other = tmp_path / "artifacts" / "other.pth"
    other.write_bytes(b"kept")
    assert not _link_in_place(tmp_path / "missing.pth", other)
    assert other.read_bytes() == b"kept"
    assert sorted(p.name for p in other.parent.iterdir()) == ["model.pth", "other.pth"]


def test_a_new_sqlite_store_is_a_copy_of_the_store_mlflow_makes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """src.tracking.store.seed_sqlite_store: a new store gets the tables, indexes and rows of one MLflow makes
    itself, with its own Default experiment; an existing file is left alone, and without a cache folder it
    can write, MLflow makes the store as before."""
    import sqlite3

    from src.tracking import store

    def dump(database: Path) -> list[str]:
        """Its statements' lines, sorted: MLflow orders some indexes and constraints differently in each process."""
        with contextlib.closing(sqlite3.connect(database)) as db:
            lines = [line.strip().rstrip(",").strip() for sql in db.iterdump() for line in sql.splitlines()]
        return sorted(re.sub(r",\d{13},\d{13},", ",<time>,<time>,", line) for line in lines)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "first").mkdir()
    monkeypatch.chdir(tmp_path / "first")  # MLflow puts the Default experiment's artifacts under the working folder
    store.client(f"sqlite:///{tmp_path / 'first.db'}").search_experiments()
    assert [p.name for p in (tmp_path / "cache" / "image-classification" / "mlflow-stores").iterdir()] == [
        f"empty-mlflow-{mlflow.__version__}-sqlalchemy-{sqlalchemy.__version__}.db"
    ]
    monkeypatch.chdir(tmp_path)
    store.client(f"sqlite:///{tmp_path / 'seeded.db'}").search_experiments()
    MlflowClient(f"sqlite:///{tmp_path / 'made.db'}").search_experiments()
    made = dump(tmp_path / "made.db")
    assert any(f"'Default','{tmp_path}/mlruns/0'" in line for line in made)
    assert dump(tmp_path / "seeded.db") == made
    assert [line.replace(f"{tmp_path}/first/", f"{tmp_path}/") for line in dump(tmp_path / "first.db")] == made
    assert not list(tmp_path.glob(".*.tmp"))

    (tmp_path / "other.db").write_bytes(b"not a store")
    store.seed_sqlite_store(f"sqlite:///{tmp_path / 'other.db'}")
    assert (tmp_path / "other.db").read_bytes() == b"not a store"
    store.seed_sqlite_store(f"sqlite:///{tmp_path / 'options.db'}?timeout=20")
    assert not list(tmp_path.glob("options.db*"))

    (empty,) = (tmp_path / "cache" / "image-classification" / "mlflow-stores").iterdir()
    empty.write_bytes(b"damaged")  # a bad empty store is not copied, and is made again next time
    for name in ("after-damage", "remade"):
        store.client(f"sqlite:///{tmp_path / name}.db").search_experiments()
        assert dump(tmp_path / f"{name}.db") == made
    assert store._is_empty_store(empty)

    (tmp_path / "read-only").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "read-only"))  # a file, so no folder can be made in it
    store.client(f"sqlite:///{tmp_path / 'unseeded'}.db").search_experiments()
    assert dump(tmp_path / "unseeded.db") == made


def test_out_of_fold_predictions_cover_every_image_once(sweep_store: tuple[str, Path], image_root: Path) -> None:
    client = MlflowClient(sweep_store[0])
    n_images = len(list((image_root / "train").rglob("*.png")))
    for parent in runs_by_type(client, "cv_parent"):
        local = client.download_artifacts(parent.info.run_id, "oof/oof_predictions.csv", str(sweep_store[1] / "oof"))
        with open(local, newline="") as f:
            rows = list(csv.DictReader(f))
        assert sorted(r["path"] for r in rows) == sorted(
            p.relative_to(image_root / "train").as_posix() for p in (image_root / "train").rglob("*.png")
        )
        assert len(rows) == n_images and {r["fold"] for r in rows} == {"0", "1"}
        correct = sum(r["true"] == r["predicted"] for r in rows) / len(rows)
        m = parent.data.metrics
        assert m["oof_accuracy"] == pytest.approx(correct)
        assert {"oof_f1", "oof_balanced_accuracy", "oof_log_loss"} <= m.keys() and m["folds_missing"] == 0
        probs = [[float(r[k]) for k in r if k.startswith("prob_")] for r in rows]
        assert all(abs(sum(p) - 1) < 1e-6 for p in probs)
        assert {"oof/oof_confusion_matrix.png", "oof/oof_classification_report.txt"} <= all_artifacts(
            client, parent.info.run_id
        )


def test_registry_versions_and_champion_alias(sweep_store: tuple[str, Path]) -> None:
    client = MlflowClient(sweep_store[0], registry_uri=sweep_store[0])
    every = client.search_model_versions("name = 'resnet18_classifier'")
    versions = [v for v in every if v.tags["kind"] == "fold"]
    ensembles = [v for v in every if v.tags["kind"] == "cv_ensemble"]
    assert len(versions) == 4 and len(ensembles) == 2
    parents = {p.info.run_id: p for p in runs_by_type(client, "cv_parent")}
    for v in ensembles:
        parent = parents[v.tags["parent_run_id"]]
        assert v.run_id == parent.info.run_id
        assert float(v.tags["oof_accuracy"]) == pytest.approx(parent.data.metrics["oof_accuracy"])
        assert json.loads(v.tags["classes"]) == ["cat", "dog", "fox"]
        assert v.tags["data_version"] == parent.data.tags["data_version"]
    # One copy of each network on disk: an ensemble's members are hard links to its folds' exported files.
    exported = {f.stat().st_ino for f in (sweep_store[1] / "mlruns").rglob("exported/*.pth")}
    for v in ensembles:
        model = client.get_logged_model(v.source.removeprefix("models:/"))
        members = sorted(local_dir(model.artifact_location).rglob("model_*.pth"))
        assert len(members) == 2 and all(m.stat().st_ino in exported for m in members), members
    # The champion is a fold ensemble, the better one on out-of-fold accuracy (ties: lower fold spread).
    champion = client.get_model_version_by_alias("resnet18_classifier", "champion")
    assert champion.tags["kind"] == "cv_ensemble"
    best = max(ensembles, key=lambda v: (float(v.tags["oof_accuracy"]), -float(v.tags["cv_std_val_accuracy"])))
    assert (float(champion.tags["oof_accuracy"]), champion.tags["cv_std_val_accuracy"]) == (
        float(best.tags["oof_accuracy"]),
        best.tags["cv_std_val_accuracy"],
    )
    fold_runs = {r.info.run_id: r for r in runs_by_type(client, "fold")}
    for v in versions:
        assert v.tags["run_id"] in fold_runs and v.run_id == v.tags["run_id"]
        assert float(v.tags["best_val_accuracy"]) == pytest.approx(
            fold_runs[v.run_id].data.metrics["best_val_accuracy"]
        )
        assert v.tags["fold"] == fold_runs[v.run_id].data.tags["fold"]
        assert not v.current_stage or v.current_stage == "None"


def test_test_py_from_the_registry_records_a_linked_test_run(sweep_store: tuple[str, Path], image_root: Path) -> None:
    uri, tmp = sweep_store
    out = tmp / "test-run"
    result = run_cli(
        "test.py",
        "ckpt=models:/resnet18_classifier@champion",
        f"logger.tracking_uri={uri}",
        f"data.test_dir={image_root / 'test'}",
        f"hydra.run.dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri, registry_uri=uri)
    champion = client.get_model_version_by_alias("resnet18_classifier", "champion")
    (test_run,) = runs_by_type(client, "test")
    tags = test_run.data.tags
    assert tags["training_run_id"] == champion.run_id and tags["model_version"] == str(champion.version)
    assert tags["model_name"] == "resnet18_classifier"
    assert {"test_accuracy", "test_loss", "test_f1"} <= test_run.data.metrics.keys()
    assert {
        "reports/test_predictions.csv",
        "reports/test_confusion_matrix.png",
        "reports/test_classification_report.txt",
    } <= all_artifacts(client, test_run.info.run_id)

    def score(ckpt: str, run_dir: str) -> None:
        result = run_cli(
            "test.py",
            f"ckpt={ckpt}",
            "logger=none",
            f"data.test_dir={image_root / 'test'}",
            f"hydra.run.dir={tmp / run_dir}",
            env={"MLFLOW_TRACKING_URI": uri},
        )
        assert result.returncode == 0, result.stderr[-3000:]

    score(f"models:/resnet18_classifier/{champion.version}", "test-run-2")
    assert (tmp / "test-run-2" / "test_metrics.json").read_text() == (out / "test_metrics.json").read_text().replace(
        "models:/resnet18_classifier@champion", f"models:/resnet18_classifier/{champion.version}"
    )
    fold_run = runs_by_type(client, "fold")[0]  # a single fold's MLflow model scores too
    score(f"runs:/{fold_run.info.run_id}/model", "test-run-fold")
    by_run = json.loads((tmp / "test-run-fold" / "test_metrics.json").read_text())
    assert by_run["n_images"] == 9
    logged = fold_run.data.tags["model_uri"]  # models:/m-<id>: the same model as MLflow prints it
    assert logged.startswith("models:/m-")
    score(logged, "test-run-logged")
    by_id = json.loads((tmp / "test-run-logged" / "test_metrics.json").read_text())
    assert {k: v for k, v in by_id.items() if k != "ckpt"} == {k: v for k, v in by_run.items() if k != "ckpt"}
    # A fold's exported file, given as a file, names its training run too (train.py writes it into the file).
    (exported,) = (Path(fold_run.data.tags["hydra_output_dir"]) / "model").glob("*.pth")
    result = run_cli(
        "test.py",
        f'ckpt="{exported}"',  # a sweep folder's name holds `=` and `,`: quoted, as README says
        f"logger.tracking_uri={uri}",
        f"data.test_dir={image_root / 'test'}",
        f"hydra.run.dir={tmp / 'test-run-file'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (file_run,) = [r for r in runs_by_type(client, "test") if r.data.tags.get("model_file") == str(exported.resolve())]
    assert file_run.data.tags["training_run_id"] == fold_run.info.run_id


def test_a_rerun_fold_joins_its_parent_and_replaces_the_fold(sweep_store: tuple[str, Path], image_root: Path) -> None:
    uri, tmp = sweep_store
    result = train(image_root, tmp / "rerun", uri, "fold=0", "lr=1e-3", "epochs=2", "seed=7")
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    parents = runs_by_type(client, "cv_parent")
    assert len(parents) == 3  # seed is part of the configuration: a new parent
    result = train(image_root, tmp / "rerun2", uri, "fold=0", "lr=1e-3", "epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    parents = runs_by_type(client, "cv_parent")
    (parent,) = [p for p in parents if p.info.run_name.startswith("resnet18 epochs=2 lr=0.001 #")]
    children = sorted(children_of(client, parent.info.run_id), key=lambda r: r.info.end_time)
    assert len(children) == 3 and children[-1].data.tags["fold"] == "0"
    parent = client.get_run(parent.info.run_id)
    assert parent.data.metrics["folds_done"] == 2
    assert parent.data.metrics["fold_0_best_val_accuracy"] == pytest.approx(
        children[-1].data.metrics["best_val_accuracy"]
    )


def test_a_configuration_run_again_is_completed_once_from_its_new_folds(image_root: Path, tmp_path: Path) -> None:
    """A sweep or `fold=all` job that re-runs every fold builds the OOF report and ensemble once, from its own
    folds, not once per fold from a mix of new and earlier folds; a sweep that fails part-way still completes
    its parent (at exit) over the folds as they then stand."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)

    def ensembles() -> int:
        versions = client.search_model_versions("name = 'resnet18_classifier'")
        return sum(v.tags["kind"] == "cv_ensemble" for v in versions)

    def summarised_folds() -> tuple[str, str]:
        (parent,) = runs_by_type(client, "cv_parent")
        latest = {}
        for run in sorted(children_of(client, parent.info.run_id), key=lambda r: r.info.start_time):
            if run.info.status == "FINISHED":
                latest[run.data.tags["fold"]] = run.info.run_id
        return parent.data.tags["oof_fold_runs"], ",".join(latest[k] for k in sorted(latest))

    for n, (overrides, sweep) in enumerate([(["fold=0,1"], True), (["fold=all"], False), (["fold=0,1"], True)]):
        result = train(image_root, tmp_path / f"run{n}", uri, *overrides, sweep=sweep)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ensembles() == n + 1
        summarised, latest = summarised_folds()
        assert summarised == latest
    # Fold 0 is re-run, then the sweep fails on fold=5: the parent is completed with the new fold 0 at exit.
    result = train(image_root, tmp_path / "run3", uri, "fold=0,5", sweep=True)
    assert result.returncode != 0 and "fold=5" in result.stderr
    assert ensembles() == 4
    summarised, latest = summarised_folds()
    assert summarised == latest


def test_leaderboard_ranks_runs_and_recommends_a_model(sweep_store: tuple[str, Path]) -> None:
    folds, configs = collect(sweep_store[0], EXPERIMENT)
    scores = [row["best_val_accuracy"] for row in folds]
    assert scores == sorted(scores, reverse=True) and len(folds) >= 4
    # Complete configurations first, by out-of-fold accuracy; incomplete ones after, by CV mean.
    complete = [c for c in configs if c["oof_accuracy"] != ""]
    assert configs[: len(complete)] == complete and len(complete) >= 2
    assert [c["oof_accuracy"] for c in complete] == sorted((c["oof_accuracy"] for c in complete), reverse=True)
    rest = [c["cv_mean_val_accuracy"] for c in configs[len(complete) :]]
    assert rest == sorted(rest, reverse=True)
    csv_text = render(folds, configs, "csv", 20)
    assert csv_text.splitlines()[0].startswith("run_id,config,fold,best_val_accuracy")
    markdown = render(folds, configs, "markdown", 20)
    assert "| run_id |" in markdown and "Recommended model: " in markdown and folds[0]["run_id"] in markdown
    best = configs[0]
    assert best["oof_accuracy"] == max(c["oof_accuracy"] for c in configs if c["oof_accuracy"] != "")
    table = render(folds, configs, "table", 20)
    assert f"runs:/{best['parent_run_id']}" in table and "(fold ensemble)" in table
    assert best["registered_model"].startswith("models:/resnet18_classifier/") and best["registered_model"] in table


def test_a_crash_fails_its_fold_and_the_sweep_goes_on(image_root: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train(
        image_root,
        tmp_path,
        uri,
        "fold=0,1",
        "epochs=2",
        "+callbacks.crash._target_=tests.helpers.CrashAfterFirstEpoch",
        "+callbacks.crash.fold=${fold}",
        sweep=True,
    )
    assert result.returncode != 0 and "injected crash" in result.stderr
    client = MlflowClient(uri)
    status = {r.data.tags["fold"]: r.info.status for r in runs_by_type(client, "fold")}
    assert status == {"0": "FAILED", "1": "FINISHED"}
    (parent,) = runs_by_type(client, "cv_parent")
    assert parent.data.metrics["folds_done"] == 1 and parent.data.metrics["best_fold"] == 1
    # An incomplete configuration gets no out-of-fold metrics, no ensemble and never the champion.
    assert parent.data.tags["folds_missing"] == "0" and "oof_accuracy" not in parent.data.metrics
    assert "1 of 2 folds finished" in parent.data.tags["mlflow.note.content"]
    versions = MlflowClient(uri, registry_uri=uri).search_model_versions("name = 'resnet18_classifier'")
    assert [v.tags["kind"] for v in versions] == ["fold"]
    assert not MlflowClient(uri, registry_uri=uri).get_registered_model("resnet18_classifier").aliases


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_fold_leaves_it_killed(image_root: Path, tmp_path: Path, signum: str) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train(
        image_root,
        tmp_path,
        uri,
        "fold=0",
        "epochs=3",
        *(stop := ["+callbacks.stop._target_=tests.helpers.SignalAfterFirstEpoch", f"+callbacks.stop.signum={signum}"]),
    )
    assert result.returncode != 0
    client = MlflowClient(uri)
    (run,) = runs_by_type(client, "fold")
    assert run.info.status == "KILLED"
    (parent,) = runs_by_type(client, "cv_parent")
    assert "folds_done" not in parent.data.metrics
    if signum == "SIGTERM":  # a checkpoint cut short by the kill: resuming says what to do in one line
        (last,) = (tmp_path / "outputs").rglob("last.ckpt")
        last.write_bytes(last.read_bytes()[:1000])
        resumed = train(image_root, tmp_path, uri, "fold=0", "epochs=3", *stop, "resume=true")
        assert resumed.returncode == 2, resumed.stderr[-3000:]
        assert "Traceback" not in resumed.stderr and "resume=false" in resumed.stderr
        assert len(resumed.stderr.strip().splitlines()) == 1, resumed.stderr


def test_parallel_jobs_share_one_parent_in_sqlite(tmp_path: Path) -> None:
    """Hydra's joblib launcher with 2 workers on the built-in digits (both folds at once)."""
    write_digits(tmp_path / "digits")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train(
        tmp_path / "digits",
        tmp_path,
        uri,
        "fold=0,1",
        "epochs=2",
        "batch_size=64",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        sweep=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    (parent,) = runs_by_type(client, "cv_parent")
    children = children_of(client, parent.info.run_id)
    assert sorted(c.data.tags["fold"] for c in children) == ["0", "1"]
    for child in children:
        assert len(client.get_metric_history(child.info.run_id, "val_accuracy")) == 2
        assert child.data.metrics["best_val_accuracy"] > 0.25  # 10 digit classes, chance is 0.1
    assert client.get_run(parent.info.run_id).data.metrics["folds_done"] == 2


def test_tracking_server_with_proxied_artifacts_parallel_jobs_and_redacted_credentials(
    image_root: Path, tmp_path: Path
) -> None:
    secret = "tok-s3cret"
    with mlflow_server(tmp_path) as uri:
        # The server ignores the credentials; the point is that they never reach the records or the logs.
        secret_uri = uri.replace("http://", f"http://alice:{secret}@")
        result = train(
            image_root,
            tmp_path,
            secret_uri,
            "fold=0,1",
            "epochs=1",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            sweep=True,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        client = MlflowClient(uri, registry_uri=uri)
        (parent,) = runs_by_type(client, "cv_parent")
        children = children_of(client, parent.info.run_id)
        assert len(children) == 2 and client.get_run(parent.info.run_id).data.metrics["folds_done"] == 2
        for child in children:
            assert child.info.artifact_uri.startswith("mlflow-artifacts:/")
            assert "reports/history.csv" in all_artifacts(client, child.info.run_id)
        assert list((tmp_path / "mlartifacts").rglob("history.csv"))  # stored by the server, not the client
        scratch = tmp_path / "tmpdir"  # the process's temporary folder: a downloaded model must not stay there
        scratch.mkdir()
        tested = run_cli(
            "test.py",
            "ckpt=models:/resnet18_classifier@champion",
            f"logger.tracking_uri={secret_uri}",
            f"data.test_dir={image_root / 'test'}",
            f"hydra.run.dir={tmp_path / 'test'}",
            env={"TMPDIR": str(scratch)},
        )
        assert tested.returncode == 0, tested.stderr[-3000:]
        assert not list(scratch.rglob("*.pth")), list(scratch.rglob("*"))[:5]
        assert len(runs_by_type(client, "test")) == 1
        assert "alice:***@" in client.get_run(children[0].info.run_id).data.params["logger.tracking_uri"]
        for run in [parent, *children, *runs_by_type(client, "test")]:
            record = client.get_run(run.info.run_id).data
            assert secret not in json.dumps([record.params, record.tags])
        stored = [p.read_text(errors="ignore") for p in (tmp_path / "mlartifacts").rglob("*.yaml")]
        assert stored and not any(secret in text for text in stored)
        for output in (result, tested):
            assert secret not in output.stdout + output.stderr
        for log in (tmp_path / "multirun").rglob("*.log"):
            assert secret not in log.read_text()


def test_a_server_that_is_down_fails_before_training(image_root: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    result = train(image_root, tmp_path, f"http://127.0.0.1:{free_port()}", "fold=0")
    assert result.returncode == 2 and "not reachable" in result.stderr and "mlflow server" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "outputs" / "checkpoints").exists()
    assert time.monotonic() - start < 60
