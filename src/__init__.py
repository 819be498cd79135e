"""Image classification with PyTorch Lightning, Hydra, MLflow and DVC."""
