"""Quality benchmark: plain settings against the recommended recipe, same epochs and seed, 5-fold CV.

    python benchmarks/quality.py             # about 15 minutes on 2 CPU cores; table + .cache/benchmark/quality.json
    python benchmarks/quality.py --quick     # 2 epochs, a smoke run of the script (its numbers mean little)

Two data sets, both written offline from scikit-learn's digits (src.sample_data), trained from scratch at 32 px:
  digits       the sample training split as it is (1,437 images, 10 balanced classes)
  imbalanced   the same with half the classes (the last five in folder order) cut to 10% of their images

Each (data set, settings) pair is one `train.py fold=all` process: every fold in turn, the same split and seed.
The scores are read back from each fold's `val_predictions.csv` (the best checkpoint's predictions on its
validation fold), so accuracy and balanced accuracy (the mean per-class recall) come from the same predictions
whichever metric picked the checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run import measured  # noqa: E402
from src.sample_data import write_digits  # noqa: E402

# The sample experiment's from-scratch setting; the recipe keeps its own choices (optimizer, schedule,
# augmentation, loss, EMA, imbalance handling) and only takes the data set's size and the from-scratch weights.
# data.hflip=false: a mirrored digit is another digit (or none), as a user with text or digits would set it.
COMMON = ["logger=none", "data.audit_duplicates=false", "data.hflip=false", "n_folds=5", "fold=all"]
SETTINGS = {
    "plain": ["experiment=sample"],
    "recipe": [
        "experiment=recipe",
        "model.weights=null",
        "data.image_size=32",
        "data.near_duplicate_distance=0",
        "batch_size=64",
    ],
}


def write_datasets(work: Path) -> dict[str, Path]:
    """The digits' training split, and an imbalanced copy with the last half of the classes at 10%."""
    digits = work / "digits"
    if not (digits / "train").is_dir():
        write_digits(digits)
    imbalanced = work / "imbalanced" / "train"
    shutil.rmtree(imbalanced, ignore_errors=True)
    classes = sorted(p for p in (digits / "train").iterdir() if p.is_dir())
    for i, class_dir in enumerate(classes):
        images = sorted(class_dir.iterdir())
        keep = images if i < len(classes) // 2 else images[: max(5, len(images) // 10)]
        (imbalanced / class_dir.name).mkdir(parents=True)
        for image in keep:
            shutil.copy(image, imbalanced / class_dir.name / image.name)
    return {"digits": digits / "train", "imbalanced": imbalanced}


def fold_scores(run_dir: Path) -> list[dict[str, float]]:
    """Accuracy and balanced accuracy of every fold's best checkpoint, from its validation predictions."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    scores = []
    for fold_dir in sorted(run_dir.glob("fold_*"), key=lambda p: int(p.name.split("_")[1])):
        with (fold_dir / "val_predictions.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        true, predicted = [r["true"] for r in rows], [r["predicted"] for r in rows]
        scores.append(
            {"accuracy": accuracy_score(true, predicted), "balanced_accuracy": balanced_accuracy_score(true, predicted)}
        )
    return scores


def summarise(scores: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in ("accuracy", "balanced_accuracy"):
        values = [s[metric] for s in scores]
        out[f"{metric}_mean"], out[f"{metric}_std"] = statistics.fmean(values), statistics.pstdev(values)
    return out


def verdict(plain: dict[str, float], recipe: dict[str, float], metric: str) -> str:
    """Whether the recipe's mean beats plain by more than one standard deviation (the larger of the two)."""
    gain = recipe[f"{metric}_mean"] - plain[f"{metric}_mean"]
    std = max(plain[f"{metric}_std"], recipe[f"{metric}_std"])
    return f"{gain:+.4f} ({'> 1 std' if gain > std else 'within 1 std' if gain > -std else 'worse'}, std {std:.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "benchmark" / "quality")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data", default="digits,imbalanced", help="comma-separated data sets")
    parser.add_argument("--settings", default="plain,recipe", help="comma-separated settings")
    parser.add_argument("--quick", action="store_true", help="2 epochs: check the script, not the models")
    args = parser.parse_args()
    epochs = 2 if args.quick else args.epochs
    args.workdir.mkdir(parents=True, exist_ok=True)
    datasets = write_datasets(args.workdir)
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPUs, Python "
        f"{platform.python_version()}",
        "epochs": epochs,
        "seed": args.seed,
        "runs": {},
    }
    for data in args.data.split(","):
        for name in args.settings.split(","):
            run_dir = args.workdir / "runs" / data / name
            shutil.rmtree(run_dir, ignore_errors=True)
            overrides = [
                *SETTINGS[name],
                *COMMON,
                f"data.train_dir={datasets[data]}",
                f"epochs={epochs}",
                f"seed={args.seed}",
                f"hydra.run.dir={run_dir}",
                f"model_dir={run_dir}/models",
                f"feature_cache_dir={args.workdir}/cache",
            ]
            start = time.perf_counter()
            command = [sys.executable, str(ROOT / "train.py"), *overrides]
            run = measured(command, ROOT, args.workdir / f"{data}_{name}.log")
            scores = fold_scores(run_dir)
            results["runs"][f"{data}/{name}"] = {
                **summarise(scores),
                "folds": scores,
                "seconds": round(time.perf_counter() - start, 1),
                "cpu_busy_before": run["cpu_busy_before"],
                "overrides": overrides,
            }
            r = results["runs"][f"{data}/{name}"]
            print(
                f"{data:>10} {name:>6}: accuracy {r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f}, balanced "
                f"{r['balanced_accuracy_mean']:.4f} ± {r['balanced_accuracy_std']:.4f} ({r['seconds']:.0f} s)",
                flush=True,
            )
    out = args.workdir.parent / "quality.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\n{epochs} epochs, seed {args.seed}, 5-fold CV mean ± std ({results['machine']})\n")
    print("| data | settings | accuracy | balanced accuracy | time (s) |")
    print("|---|---|---|---|---|")
    for key, r in results["runs"].items():
        data, name = key.split("/")
        print(
            f"| {data} | {name} | {r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f} | "
            f"{r['balanced_accuracy_mean']:.4f} ± {r['balanced_accuracy_std']:.4f} | {r['seconds']:.0f} |"
        )
    for data in args.data.split(","):
        plain, recipe = results["runs"].get(f"{data}/plain"), results["runs"].get(f"{data}/recipe")
        if plain and recipe:
            print(
                f"\n{data}: recipe - plain: accuracy {verdict(plain, recipe, 'accuracy')}, "
                f"balanced accuracy {verdict(plain, recipe, 'balanced_accuracy')}"
            )
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
