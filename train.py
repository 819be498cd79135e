"""Train one fold:        python train.py fold=3
Sweep folds and lr:     python train.py -m fold=0,1,2,3,4 lr=1e-3,1e-4
Built-in sample data:   python train.py experiment=sample

Heavy libraries are imported inside main() so that --help and --cfg answer at once.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Returns best_val_accuracy, so Hydra sweepers can optimise it."""
    from src.errors import run_job
    from src.training import train

    return run_job(train, cfg)


if __name__ == "__main__":
    main()
