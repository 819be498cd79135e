"""Train one fold:        python train.py fold=3
Sweep folds and lr:     python train.py -m fold=0,1,2,3,4 lr=1e-3,1e-4
Built-in sample data:   python train.py experiment=sample

Heavy libraries are imported inside main() so that --help and --cfg answer at once.
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

# Jobs that a launcher starts in a fresh interpreter (submitit locally or on SLURM) import `src` too.
_REPO = str(Path(__file__).resolve().parent)
if _REPO not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_REPO, os.environ.get("PYTHONPATH")]))


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Returns best_val_accuracy, so Hydra sweepers can optimise it."""
    from src.runtime import heavy_imports, start_plot_helper

    start_plot_helper()
    with heavy_imports():
        from src.errors import run_job
        from src.training import import_first_use_modules, train

        import_first_use_modules(cfg)

    return run_job(train, cfg)


if __name__ == "__main__":
    from src.errors import check_overrides
    from src.runtime import compose_each_job_once
    from src.tracking.summary import completing_at_end

    check_overrides(sys.argv)

    # A sweep that re-runs folds: each parent's OOF report and ensemble once, at its end.
    with compose_each_job_once(), completing_at_end():
        main()
