"""Predict the classes of image files and write predictions.csv:

    python predict.py ckpt=models/cnn_resnet18_freeze_backbone_True_fold_0.pth input=photos/
    python predict.py ckpt=models:/resnet18_classifier@champion input='photos/**/*.jpg' tta=hflip
    python predict.py ckpt=runs:/<parent run id> input=photo.png      # a configuration's fold ensemble

Heavy libraries are imported inside main() so that --help and --cfg answer at once.
"""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> str:
    """Returns the path of predictions.csv."""
    from src.runtime import heavy_imports

    with heavy_imports():
        from src.errors import run_job
        from src.predicting import predict

    return str(run_job(predict, cfg))


if __name__ == "__main__":
    from src.errors import check_overrides

    check_overrides(sys.argv)
    main()
