"""Cross-validation report of the `dvc repro` pipeline: one metrics file, curves and the best model from the folds.

    python -m src.cv_report --runs outputs/dvc/train --n-folds 5 --out outputs/dvc/cv

reads `<runs>/fold_<k>/model/*.pth` (each exported model records its `fold` and `best_val_accuracy`)
and `<runs>/fold_<k>/history.csv` for k in 0..n_folds-1, and writes to `--out`:

    metrics.json     cv_mean_val_accuracy, cv_std_val_accuracy, best_fold, fold_<k>_best_val_accuracy
                     (the names of MLflow's CV summary, so both read the same)
    history.csv      every epoch's metrics averaged over the folds: the cross-validated learning curve
    folds/fold_<k>.csv  each fold's own history, one curve per fold in `dvc plots show`
    best_model.pth   a copy of the best fold's model, the one the test stage scores

It reads files only, so it works the same with or without MLflow tracking.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from src.errors import UserError
from src.evaluation import read_csv, write_csv


def fold_model(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The exported model of one fold's run and its metadata (without the weights)."""
    import torch

    models = sorted((run_dir / "model").glob("*.pth"))
    if len(models) != 1:
        raise UserError(
            f"expected one exported model in {run_dir}/model, found {len(models)}; run `dvc repro` to retrain the folds"
        )
    saved = torch.load(models[0], map_location="cpu", weights_only=True)
    return models[0], {k: v for k, v in saved.items() if k != "state_dict"}


def mean_history(histories: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Per epoch, the mean of each metric over the folds that reached that epoch (early stopping may end some)."""
    rows = []
    for epoch in range(max(len(h) for h in histories)):
        at_epoch = [h[epoch] for h in histories if epoch < len(h)]
        keys = [k for k in dict.fromkeys(k for row in at_epoch for k in row) if k != "epoch"]
        row = {"epoch": epoch}
        row.update({k: statistics.fmean(r[k] for r in at_epoch if k in r) for k in keys})
        rows.append(row)
    return rows


def cv_report(runs: Path, n_folds: int, out: Path) -> dict[str, float]:
    """Aggregate folds 0..n_folds-1 under `runs` into `out`; return the metrics."""
    run_dirs = [runs / f"fold_{k}" for k in range(n_folds)]
    missing = [str(d) for d in run_dirs if not d.is_dir()]
    if missing:
        raise UserError(
            f"no run of {', '.join(missing)}; params.yaml `folds` must list 0..{n_folds - 1} for n_folds={n_folds}"
        )
    scores, models, histories = {}, {}, []
    for k, run_dir in enumerate(run_dirs):
        models[k], meta = fold_model(run_dir)
        if meta.get("fold") != k:
            raise UserError(f"{models[k]} was trained on fold {meta.get('fold')}, not {k}; run `dvc repro` again")
        scores[k] = float(meta["best_val_accuracy"])
        histories.append(read_csv(run_dir / "history.csv"))
    best = max(scores, key=scores.get)
    metrics = {
        "cv_mean_val_accuracy": statistics.fmean(scores.values()),
        "cv_std_val_accuracy": statistics.pstdev(scores.values()),
        "best_fold": best,
        **{f"fold_{k}_best_val_accuracy": v for k, v in scores.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_csv(mean_history(histories), out / "history.csv")
    shutil.rmtree(out / "folds", ignore_errors=True)  # no curve of a fold from an earlier, larger n_folds
    for k, history in enumerate(histories):
        write_csv(history, out / "folds" / f"fold_{k}.csv")
    shutil.copyfile(models[best], out / "best_model.pth")
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description="Aggregate the folds of a dvc repro run.")
    parser.add_argument("--runs", type=Path, required=True, help="folder with one fold_<k>/ run folder per fold")
    parser.add_argument("--n-folds", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        metrics = cv_report(args.runs, args.n_folds, args.out)
    except UserError as err:
        sys.exit(f"error: {err}")
    print(
        f"cv_mean_val_accuracy: {metrics['cv_mean_val_accuracy']:.4f} "
        f"(std {metrics['cv_std_val_accuracy']:.4f}, best fold {metrics['best_fold']})"
    )


if __name__ == "__main__":
    main()
