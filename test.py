"""Score a trained model or a fold ensemble on data/test:

    python test.py ckpt=models/cnn_resnet18_freeze_backbone_True_fold_3.pth
    python test.py ckpt=models:/resnet18_classifier@champion
    python test.py ckpt=runs:/<parent run id> tta=hflip

Heavy libraries are imported inside main() so that --help and --cfg answer at once.
"""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="test")
def main(cfg: DictConfig) -> float:
    """Returns the test accuracy."""
    from src.runtime import heavy_imports

    with heavy_imports():
        from src.errors import run_job
        from src.testing import evaluate

    return run_job(evaluate, cfg)["accuracy"]


if __name__ == "__main__":
    from src.errors import check_overrides

    check_overrides(sys.argv)
    main()
