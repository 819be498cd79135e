"""The parent run of a configuration: the CV summary of its finished folds and, once every fold is
finished, the out-of-fold (OOF) evidence and the fold ensemble as a registered model.

Each fold run logs `reports/val_predictions.csv`, its validation images' class probabilities. Put
together, the folds' files hold a prediction for every training image made by a model that never
saw it: `oof/oof_predictions.csv` and the `oof_*` metrics are computed from them, with no retraining.

A sweep (or a `fold=all` job) that re-runs a configuration's folds completes its parent once, at its end
(`completing_at_end`): its first folds join the earlier run's other folds into a complete set, and completing
each of those mixed sets would redo the report and register an ensemble per fold.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from src.tracking import registry, store

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # the run description in the MLflow UI
PROB_PREFIX = "prob_"


@dataclass
class _Deferral:
    """Parents left to complete at the end of the process or job that began at `since_ms` in process `pid`."""

    since_ms: int
    pid: int
    depth: int = 1
    pending: dict[str, tuple[str, DictConfig]] = field(default_factory=dict)  # parent id -> (store, fold's cfg)


_deferral: _Deferral | None = None


@contextmanager
def completing_at_end() -> Iterator[None]:
    """Within it, a parent whose complete set of folds mixes runs from before it began with its own gets its
    CV summary at once and its OOF report and ensemble at its end (even if it ends in an error), each once,
    over the folds as they stand then. train.py runs every job inside one; nested ones defer to the outermost.
    Ctrl-C leaves them as they were: the next run of any of their folds completes them."""
    global _deferral
    if _deferral is not None and _deferral.pid == os.getpid():
        _deferral.depth += 1
    else:
        _deferral = _Deferral(since_ms=int(time.time() * 1000), pid=os.getpid())
    ending = "normally"
    try:
        yield
    except KeyboardInterrupt:
        ending = "interrupted"
        raise
    except BaseException:
        ending = "in an error"
        raise
    finally:
        _deferral.depth -= 1
        if _deferral.depth == 0:
            pending, _deferral = _deferral.pending, None
            if ending == "interrupted" and pending:
                log.info("interrupted: %d parent run(s) left without their new OOF report", len(pending))
            elif pending:
                _complete(pending, raise_failure=ending == "normally")


def _complete(pending: dict[str, tuple[str, DictConfig]], raise_failure: bool) -> None:
    """Each parent in turn; a failure is logged, and then ends the process in one line (unless it is ending
    in an error already)."""
    failures = []
    for parent_id, (uri, cfg) in pending.items():
        try:
            update_parent(uri, parent_id, cfg)
        except Exception as err:
            log.error("completing parent run %s failed: %s", parent_id, err)
            failures.append(f"completing parent run {parent_id} failed: {err}")
    if failures and raise_failure:
        raise SystemExit(f"error: {failures[0]}")


def _defer(uri: str, parent_id: str, cfg: DictConfig, fold_runs: list[Any]) -> bool:
    """True (and the parent noted as pending) when some of its fold runs predate the running sweep or job."""
    if _deferral is None or _deferral.pid != os.getpid():
        return False
    if all((run.info.start_time or 0) >= _deferral.since_ms for run in fold_runs):
        _deferral.pending.pop(parent_id, None)  # every fold is this sweep's own: no later job changes the set
        return False
    _deferral.pending[parent_id] = (uri, cfg)
    return True


def _children(client: Any, parent: Any) -> list[Any]:
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
        order_by=["attributes.end_time ASC"],
        max_results=10000,
    )


def _latest_per_fold(children: list[Any]) -> dict[int, Any]:
    """The latest FINISHED run of each fold (a re-run replaces the earlier one; failed runs never count)."""
    per_fold: dict[int, Any] = {}
    for child in children:
        if child.info.status == "FINISHED" and "best_val_accuracy" in child.data.metrics and "fold" in child.data.tags:
            per_fold[int(child.data.tags["fold"])] = child
    return per_fold


def update_parent(uri: str, parent_id: str, cfg: DictConfig) -> dict[str, float]:
    """Recompute the CV summary; when the configuration is complete, add OOF metrics and the ensemble."""
    from mlflow.entities import Metric, RunTag

    client = store.client(uri)
    with store.store_lock(uri):
        parent = client.get_run(parent_id)
        children = _children(client, parent)
        per_fold = _latest_per_fold(children)
        n_folds = int(parent.data.tags.get("n_folds") or parent.data.params.get("n_folds", 0))
        missing = sorted(set(range(n_folds)) - set(per_fold))
        _close_parent(client, parent_id, children)
        if not per_fold:
            return {}
        scores = {k: run.data.metrics["best_val_accuracy"] for k, run in sorted(per_fold.items())}
        values = list(scores.values())
        summary = {
            "cv_mean_val_accuracy": statistics.fmean(values),
            "cv_std_val_accuracy": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "folds_done": float(len(values)),
            "folds_missing": float(len(missing)),
            "best_fold": float(max(scores, key=scores.get)),
            **{f"fold_{k}_best_val_accuracy": v for k, v in scores.items()},
        }
        now = int(time.time() * 1000)
        tags = {"folds_missing": ",".join(map(str, missing))}
        if missing:
            tags[NOTE_TAG] = (
                f"{len(per_fold)} of {n_folds} folds finished; missing fold(s) {', '.join(map(str, missing))}. "
                f"Out-of-fold metrics and the fold ensemble come when every fold has finished."
            )
        client.log_batch(  # one request
            parent_id,
            metrics=[Metric(k, v, now, len(values)) for k, v in summary.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        if missing:
            return summary
        fold_runs = [per_fold[k] for k in range(n_folds)]
        key = ",".join(r.info.run_id for r in fold_runs)
        if parent.data.tags.get("oof_fold_runs") == key:
            return summary  # this exact set of folds is already summarised
        if _defer(uri, parent_id, cfg, fold_runs):
            log.info("MLflow: parent %s gets its OOF report and ensemble once this sweep or job ends", parent_id)
            return summary
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            model_files = _download_models(uri, fold_runs, work / "models")
            summary.update(_log_oof(client, parent_id, fold_runs, work))
            analysis = _log_analysis(client, parent, work / "oof" / "oof_predictions.csv", model_files, work, cfg)
            summary.update(analysis)
            client.set_tag(parent_id, "oof_fold_runs", key)
            _log_ensemble(uri, parent, model_files, summary, cfg, analysis.get("temperature", 1.0))
        _close_parent(client, parent_id, _children(client, parent))
    return summary


def _close_parent(client: Any, parent_id: str, children: list[Any]) -> None:
    """RUNNING while any fold runs; otherwise FINISHED at its last fold's end, so the parent spans its folds."""
    if not children or any(c.info.status == "RUNNING" for c in children):
        client.update_run(parent_id, status="RUNNING")
        return
    end = max(c.info.end_time or 0 for c in children) or None
    client.set_terminated(parent_id, "FINISHED", end_time=end)


def _read_predictions(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        classes = [c.removeprefix(PROB_PREFIX) for c in reader.fieldnames or [] if c.startswith(PROB_PREFIX)]
    return classes, rows


def _download_models(uri: str, fold_runs: list[Any], folder: Path) -> dict[int, Path]:
    """Fold k -> its exported model file (the fold run's own `exported/*.pth`)."""
    import mlflow

    files = {}
    for run in fold_runs:
        fold = int(run.data.tags["fold"])
        own = store.local_dir(run.info.artifact_uri)
        if own is not None and sorted((own / "exported").glob("*.pth")):  # read in place: a local store
            (files[fold],) = sorted((own / "exported").glob("*.pth"))
            continue
        local = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="exported", dst_path=str(folder / str(fold)), tracking_uri=uri
        )
        (files[fold],) = sorted(Path(local).glob("*.pth"))
    return files


def _log_oof(client: Any, parent_id: str, fold_runs: list[Any], work: Path) -> dict[str, float]:
    """Join the folds' validation predictions into `work/oof/oof_predictions.csv`; log it, its metrics and
    reports under `oof/`."""
    import mlflow
    import torch
    from mlflow.entities import Metric

    from src import evaluation

    rows: list[dict[str, str]] = []
    classes: list[str] = []
    for run in fold_runs:
        local = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id,
            artifact_path="reports/val_predictions.csv",
            dst_path=str(work / "val" / run.data.tags["fold"]),
            tracking_uri=client.tracking_uri,
        )
        fold_classes, fold_rows = _read_predictions(Path(local))
        if classes and fold_classes != classes:
            raise RuntimeError(f"fold runs of parent {parent_id} disagree on the classes")
        classes = fold_classes
        rows += fold_rows
    paths = [r["path"] for r in rows]
    if len(set(paths)) != len(paths):
        raise RuntimeError(f"fold runs of parent {parent_id} predicted some images twice; the folds overlap")
    index = {c: i for i, c in enumerate(classes)}
    probs = torch.tensor([[float(r[f"{PROB_PREFIX}{c}"]) for c in classes] for r in rows], dtype=torch.float64)
    targets = torch.tensor([index[r["true"]] for r in rows])
    pred = evaluation.Predictions(targets, probs.clamp_min(1e-12).log().float())
    metrics = evaluation.summary_metrics(pred, len(classes))
    report_text, _ = evaluation.class_report(pred, classes)
    out = work / "oof"
    out.mkdir()
    rows.sort(key=lambda r: r["path"])
    evaluation.write_csv(rows, out / "oof_predictions.csv")
    (out / "oof_classification_report.txt").write_text(report_text)
    evaluation.plot_confusion_matrix(pred, classes, out / "oof_confusion_matrix.png", "out-of-fold predictions")
    client.log_artifacts(parent_id, str(out), "oof")
    oof = {
        "oof_accuracy": metrics["accuracy"],
        "oof_f1": metrics["f1"],
        "oof_balanced_accuracy": metrics["balanced_accuracy"],
        "oof_log_loss": metrics["loss"],
        "oof_images": float(len(rows)),
    }
    now = int(time.time() * 1000)
    client.log_batch(parent_id, metrics=[Metric(k, v, now, 0) for k, v in oof.items()])
    client.set_tag(
        parent_id,
        NOTE_TAG,
        f"All {len(fold_runs)} folds finished. Out-of-fold accuracy {oof['oof_accuracy']:.4f} over "
        f"{len(rows)} training images (each predicted by the fold model that did not train on it); "
        f"see `oof/` and the `ensemble` model.",
    )
    log.info("MLflow: parent %s out-of-fold accuracy %.4f (%d images)", parent_id, oof["oof_accuracy"], len(rows))
    return oof


def _log_analysis(
    client: Any, parent: Any, oof_csv: Path, model_files: dict[int, Path], work: Path, cfg: DictConfig
) -> dict[str, float]:
    """The error analysis (src/analysis) as `analysis/`, its metrics, and a link from the parent's description.

    It reads what the folds left and retrains nothing; a failure here is logged and never fails the fold.
    """
    from mlflow.entities import Metric

    from src.analysis import write_report

    out = work / "analysis"
    try:
        metrics = write_report(oof_csv, model_files, Path(cfg.data.train_dir), out)
    except Exception as err:  # the analysis is an extra: the OOF metrics and the ensemble matter more
        log.warning("error analysis of parent %s failed: %s", parent.info.run_id, err)
        return {}
    run_id = parent.info.run_id
    client.log_artifacts(run_id, str(out), "analysis")
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    page = f"#/experiments/{parent.info.experiment_id}/runs/{run_id}/artifactPath/analysis/index.html"
    note = client.get_run(run_id).data.tags.get(NOTE_TAG, "")
    client.set_tag(
        run_id,
        NOTE_TAG,
        f"{note}\n\n**Error analysis**: [analysis/index.html]({page}) (Artifacts tab): top losses with "
        f"class-activation maps, confused classes, {int(metrics.get('n_label_issues', 0))} possible label issues, "
        f"calibration (ECE {metrics.get('ece', float('nan')):.3f}, "
        f"{metrics.get('ece_after_temperature', float('nan')):.3f} after temperature scaling).",
    )
    return metrics


def _log_ensemble(
    uri: str, parent: Any, model_files: dict[int, Path], metrics: dict[str, float], cfg: DictConfig, temperature: float
) -> None:
    """Log the k fold models as one MLflow model on the parent, with the temperature fitted on the OOF
    predictions; register it and maybe make it the champion."""
    import torch

    from src.serving import log_ensemble_model

    parent_id = parent.info.run_id
    files = [model_files[k] for k in sorted(model_files)]
    saved = torch.load(files[0], map_location="cpu", weights_only=True)
    classes = list(saved["classes"])
    tta = str((cfg.logger.get("ensemble") or {}).get("tta", "none"))
    store.use(uri)
    client = store.client(uri)
    scores = {k: v for k, v in metrics.items() if k.startswith("oof_")}  # also shown as the model's metrics
    info = log_ensemble_model(
        files, run_id=parent_id, metrics=scores, tta=tta, temperature=float(temperature), name="ensemble"
    )
    store.link_members(client.get_logged_model(info.model_id).artifact_location, files)  # no second copies
    client.set_tag(parent_id, "ensemble_model_uri", info.model_uri)
    settings = cfg.logger.get("registry") or {}
    if not settings.get("enabled", True):
        return
    name = registry.model_name(cfg)
    tags = {
        "parent_run_id": parent_id,
        "config": parent.info.run_name,
        "data_version": parent.data.tags.get("data_version", ""),
        "split_digest": parent.data.tags.get("split_digest", ""),
        "classes": json.dumps(classes),
        "n_folds": str(len(files)),
        "temperature": f"{temperature:.6f}",
        **{k: f"{metrics[k]:.6f}" for k in ("oof_accuracy", "oof_f1", "oof_balanced_accuracy", "oof_log_loss")},
        **{k: f"{metrics[k]:.6f}" for k in ("cv_mean_val_accuracy", "cv_std_val_accuracy")},
    }
    version = registry.register_ensemble(uri, info.model_uri, name, tags)
    client.set_tag(parent_id, "registered_model", f"models:/{name}/{version}")
    registry.promote_if_better(uri, name, version, tags)
