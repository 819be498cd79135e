"""Export one trained model to ONNX, checked against PyTorch on real images:

    python export.py ckpt=models/cnn_resnet18_freeze_backbone_True_fold_0.pth
    python export.py ckpt=models:/resnet18_classifier/3 check_dir=data/test

Heavy libraries are imported inside main() so that --help and --cfg answer at once.
"""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> str:
    """Returns the path of model.onnx."""
    from src.runtime import heavy_imports

    with heavy_imports():
        from src.errors import run_job
        from src.exporting import export

    return str(run_job(export, cfg))


if __name__ == "__main__":
    from src.errors import check_overrides

    check_overrides(sys.argv)
    main()
