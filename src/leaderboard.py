"""Leaderboard: fold runs sorted by best_val_accuracy, each configuration's CV mean ± std with a 95% interval and
out-of-fold accuracy, each configuration against the top one fold by fold (Nadeau–Bengio corrected t-test,
src/analysis/comparison.py), and the recommended model (the best complete configuration's fold ensemble), the way
the seed report's "Results & Analysis" read them off the MLflow UI.

    python -m src.leaderboard [--experiment pytorch-classification] [--format table|csv|markdown] [--top 20]
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
from typing import Any

from src.analysis.comparison import TEST_NAME, compare, cv_interval, verdict
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
CONFIG_COLUMNS = [
    "parent_run_id",
    "config",
    "data",
    "folds_done",
    "folds_missing",
    "cv_mean_val_accuracy",
    "ci95",
    "cv_std_val_accuracy",
    "oof_accuracy",
    "best_fold",
    "diff_vs_top",
    "p_vs_top",
]
FOLD_METRIC = re.compile(r"fold_(\d+)_best_val_accuracy")
CI_NOTE = (
    "ci95: t-interval of the CV mean with the Nadeau–Bengio corrected variance (1/k + 1/(k-1))·s², wider than "
    "s²/k because folds share training images; diff_vs_top: mean per-fold best_val_accuracy minus the top "
    f"configuration's over their shared folds, p: {TEST_NAME}."
)


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
            "folds_missing": int(r.data.metrics.get("folds_missing", 0)),
            "oof_accuracy": r.data.metrics.get("oof_accuracy", ""),
            "registered_model": r.data.tags.get("registered_model", ""),
            "ensemble_model_uri": r.data.tags.get("ensemble_model_uri", ""),
            "data_version": r.data.tags.get("data_version", ""),
            "split_digest": r.data.tags.get("split_digest", ""),
            "fold_scores": {int(m.group(1)): v for k, v in r.data.metrics.items() if (m := FOLD_METRIC.fullmatch(k))},
            "end_time": r.info.end_time or r.info.start_time or 0,
        }
        for run_id, r in parents.items()
        if "cv_mean_val_accuracy" in r.data.metrics
    ]
    return folds, with_comparisons(rank(configs))


def rank(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Configurations on the latest data first (the data version of the configuration that ended last: scores
    on other data say nothing about it, as the champion's rule has it), marked `latest_data`; within each, complete
    configurations by out-of-fold accuracy (ties: smaller spread), then the rest by CV mean."""
    latest = max(configs, key=lambda row: row["end_time"])["data_version"] if configs else ""
    for row in configs:
        row["latest_data"] = row["data_version"] == latest
    return sorted(
        configs,
        key=lambda row: (
            row["latest_data"],
            row["oof_accuracy"] != "",
            row["oof_accuracy"] if row["oof_accuracy"] != "" else row["cv_mean_val_accuracy"],
            -row["cv_std_val_accuracy"],
        ),
        reverse=True,
    )


def with_comparisons(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each configuration's 95% interval (`ci95`) and, against the first (top) one, the paired per-fold
    difference (`diff_vs_top`) and its p-value (`p_vs_top`), or why they cannot be compared."""
    top = configs[0] if configs else None
    for row in configs:
        low, high = cv_interval([row["fold_scores"][k] for k in sorted(row["fold_scores"])])
        row["ci95_low"], row["ci95_high"] = low, high
        row["ci95"] = "" if math.isnan(low) else f"{low:.4f} – {high:.4f}"
        row["diff_vs_top"] = row["p_vs_top"] = ""
        row["comparison"] = None
        if row is top:
            continue
        row["comparison"] = comparison = compare(top["fold_scores"], row["fold_scores"], same_split(top, row))
        if comparison.test is None:
            row["diff_vs_top"] = comparison.reason
        else:
            p = comparison.test.p
            row["diff_vs_top"], row["p_vs_top"] = comparison.test.difference, "n/a: no spread" if math.isnan(p) else p
    return configs


def same_split(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Folds of the same images: the same data version and split digest (the parents' tags)."""
    return all(a[key] and a[key] == b[key] for key in ("data_version", "split_digest"))


def top_two(configs: list[dict[str, Any]]) -> str:
    """Whether the top two configurations are distinguishable, in words; empty with fewer than two."""
    if len(configs) < 2:
        return ""
    return verdict(configs[0]["config"], configs[1]["config"], configs[1]["comparison"])


def recommendation(configs: list[dict[str, Any]]) -> str:
    """The fold ensemble of the best complete configuration: every fold's model, judged out of fold."""
    complete = [c for c in configs if c["oof_accuracy"] != "" and c.get("latest_data", True)]
    if not complete:
        on_latest = " on the latest data" if any(c["oof_accuracy"] != "" for c in configs) else ""
        return (
            f"No complete configuration{on_latest} yet: train every fold of one (fold=0..n_folds-1) to get its fold "
            "ensemble."
        )
    best = complete[0]
    where = [x for x in (best["registered_model"], f"runs:/{best['parent_run_id']}") if x]
    return (
        f"Recommended model: {' = '.join(where)} (fold ensemble)\n"
        f"  '{best['config']}', oof_accuracy {best['oof_accuracy']:.4f}, "
        f"cv_mean_val_accuracy {best['cv_mean_val_accuracy']:.4f} ± {best['cv_std_val_accuracy']:.4f}"
    )


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _cell(row: dict[str, Any], column: str) -> str:
    """`data`: the first 8 hex digits of the data version, `*` marking the latest data."""
    if column != "data":
        return _fmt(row[column])
    digits = row.get("data_version", "").rpartition(":")[2][:8]
    return f"{digits}{'*' if row.get('latest_data') else ''}" if digits else ""


def render(folds: list[dict[str, Any]], configs: list[dict[str, Any]], fmt: str, top: int) -> str:
    """The two tables and the recommendation as plain text, CSV or Markdown."""
    folds = folds[:top]
    recommended = recommendation(configs)
    sentence = top_two(configs)
    recommended = f"{sentence}\n{recommended}" if sentence else recommended
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[*FOLD_COLUMNS, "model_file", "registered_model"])
        writer.writeheader()
        writer.writerows(folds)
        return buffer.getvalue()
    if fmt == "markdown":

        def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(row, c) for c in columns) + " |" for row in rows]
            return "\n".join(lines)

        return (
            "## Fold runs by best_val_accuracy\n\n"
            + table(folds, FOLD_COLUMNS)
            + "\n\n## Configurations by cross-validation mean\n\n"
            + table(configs, CONFIG_COLUMNS)
            + f"\n\n{CI_NOTE}\n\n{recommended}\n"
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
    columns = ("config", "data", "folds_done", "cv_mean ± std", "ci95", "oof_accuracy", "best_fold", "diff_vs_top", "p")
    for column in (*columns, "parent_run_id"):
        config_table.add_column(column)
    for row in configs:
        config_table.add_row(
            row["config"],
            _cell(row, "data"),
            f"{row['folds_done']}" + (f" ({row['folds_missing']} missing)" if row["folds_missing"] else ""),
            f"{row['cv_mean_val_accuracy']:.4f} ± {row['cv_std_val_accuracy']:.4f}",
            row["ci95"],
            _fmt(row["oof_accuracy"]),
            str(row["best_fold"]),
            f"{row['diff_vs_top']:+.4f}" if isinstance(row["diff_vs_top"], float) else row["diff_vs_top"],
            _fmt(row["p_vs_top"]),
            row["parent_run_id"],
        )
    console.print(fold_table)
    console.print(config_table)
    console.print(CI_NOTE)
    console.print(recommended)
    return console.file.getvalue()


def main(argv: list[str] | None = None) -> None:
    from src.tracking.store import default_tracking_uri

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
