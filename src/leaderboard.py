"""Leaderboard: fold runs sorted by best_val_accuracy, each configuration's CV mean ± std, and the
recommended model, the way the seed report's "Results & Analysis" read them off the MLflow UI.

    python -m src.leaderboard [--experiment pytorch-classification] [--format table|csv|markdown] [--top 20]
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Any

from src.errors import UserError
from src.tracking import PARENT_TAG, RUN_TYPE_TAG, check_reachable

FOLD_COLUMNS = [
    "run_id",
    "config",
    "fold",
    "best_val_accuracy",
    "backbone",
    "freeze_backbone",
    "lr",
    "batch_size",
    "epochs",
]
CONFIG_COLUMNS = ["parent_run_id", "config", "folds_done", "cv_mean_val_accuracy", "cv_std_val_accuracy", "best_fold"]


def collect(uri: str, experiment: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(fold rows sorted by best_val_accuracy, configuration rows sorted by CV mean) of finished runs."""
    from mlflow import MlflowClient

    check_reachable(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(
            f"no MLflow experiment {experiment!r} at {uri}; train first (python train.py) or pass --experiment"
        )
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=50000)
    parents = {r.info.run_id: r for r in runs if r.data.tags.get(RUN_TYPE_TAG) == "cv_parent"}
    folds = []
    for r in runs:
        if r.data.tags.get(RUN_TYPE_TAG) != "fold" or "best_val_accuracy" not in r.data.metrics:
            continue
        p = r.data.params
        parent = parents.get(r.data.tags.get(PARENT_TAG, ""))
        folds.append(
            {
                "run_id": r.info.run_id,
                "config": parent.info.run_name if parent else "",
                "fold": int(r.data.tags.get("fold", -1)),
                "best_val_accuracy": r.data.metrics["best_val_accuracy"],
                "backbone": p.get("model.name", ""),
                "freeze_backbone": p.get("model.freeze_backbone", ""),
                "lr": p.get("lr", ""),
                "batch_size": p.get("batch_size", ""),
                "epochs": p.get("epochs", ""),
                "model_file": r.data.tags.get("model_file", ""),
                "registered_model": r.data.tags.get("registered_model", ""),
            }
        )
    folds.sort(key=lambda row: row["best_val_accuracy"], reverse=True)
    configs = [
        {
            "parent_run_id": run_id,
            "config": r.info.run_name,
            "folds_done": int(r.data.metrics["folds_done"]),
            "cv_mean_val_accuracy": r.data.metrics["cv_mean_val_accuracy"],
            "cv_std_val_accuracy": r.data.metrics.get("cv_std_val_accuracy", 0.0),
            "best_fold": int(r.data.metrics.get("best_fold", -1)),
        }
        for run_id, r in parents.items()
        if "cv_mean_val_accuracy" in r.data.metrics
    ]
    configs.sort(key=lambda row: row["cv_mean_val_accuracy"], reverse=True)
    return folds, configs


def _file_holds_run(path: str, run_id: str) -> bool:
    """Whether models/<file>.pth still holds this run's export (a later run of the same fold replaces it)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("mlflow_run_id") == run_id
    except Exception:  # missing, moved or unreadable: not this run's file any more
        return False


def recommendation(best: dict[str, Any] | None) -> str:
    if best is None:
        return "No finished fold runs yet."
    where = [f"runs:/{best['run_id']}/exported/{Path(best['model_file']).name}"] if best["model_file"] else []
    if best["registered_model"]:
        where.insert(0, best["registered_model"])
    if best["model_file"] and _file_holds_run(best["model_file"], best["run_id"]):
        where.insert(0, best["model_file"])
    return (
        f"Recommended model: {' = '.join(where) or '(none recorded)'}\n"
        f"  fold {best['fold']} of '{best['config']}', best_val_accuracy {best['best_val_accuracy']:.4f}, "
        f"run {best['run_id']}"
    )


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render(folds: list[dict[str, Any]], configs: list[dict[str, Any]], fmt: str, top: int) -> str:
    """The two tables and the recommendation as plain text, CSV or Markdown."""
    folds = folds[:top]
    recommended = recommendation(folds[0] if folds else None)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[*FOLD_COLUMNS, "model_file", "registered_model"])
        writer.writeheader()
        writer.writerows(folds)
        return buffer.getvalue()
    if fmt == "markdown":

        def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |" for row in rows]
            return "\n".join(lines)

        return (
            "## Fold runs by best_val_accuracy\n\n"
            + table(folds, FOLD_COLUMNS)
            + "\n\n## Configurations by cross-validation mean\n\n"
            + table(configs, CONFIG_COLUMNS)
            + f"\n\n{recommended}\n"
        )
    from rich.console import Console
    from rich.table import Table

    console = Console(file=io.StringIO(), width=160, force_terminal=False)
    fold_table = Table(title="Fold runs by best_val_accuracy")
    for column in FOLD_COLUMNS:
        fold_table.add_column(column, justify="right" if column != "config" else "left")
    for row in folds:
        fold_table.add_row(*(_fmt(row[c]) for c in FOLD_COLUMNS))
    config_table = Table(title="Configurations: mean ± std over folds")
    for column in ("config", "folds_done", "cv_mean ± std", "best_fold", "parent_run_id"):
        config_table.add_column(column)
    for row in configs:
        config_table.add_row(
            row["config"],
            str(row["folds_done"]),
            f"{row['cv_mean_val_accuracy']:.4f} ± {row['cv_std_val_accuracy']:.4f}",
            str(row["best_fold"]),
            row["parent_run_id"],
        )
    console.print(fold_table)
    console.print(config_table)
    console.print(recommended)
    return console.file.getvalue()


def main(argv: list[str] | None = None) -> None:
    from src.tracking import default_tracking_uri

    parser = argparse.ArgumentParser(description="Rank MLflow fold runs and configurations.")
    parser.add_argument("--experiment", default="pytorch-classification")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    parser.add_argument("--format", choices=["table", "csv", "markdown"], default="table")
    parser.add_argument("--top", type=int, default=20, help="fold rows to show")
    args = parser.parse_args(argv)
    try:
        folds, configs = collect(args.tracking_uri or default_tracking_uri(), args.experiment)
    except UserError as err:
        sys.exit(f"error: {err}")
    sys.stdout.write(render(folds, configs, args.format, args.top))


if __name__ == "__main__":
    main()
