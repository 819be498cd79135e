"""Serving: the fold-ensemble MLflow model, the predictor that predict.py, test.py and the served model share,
and ONNX export and runtime. Nothing here imports tracking or the run layer."""

from src.serving.ensemble_model import Predictor, load_image, preprocessing_from_meta
from src.serving.mlflow_model import ensemble_dir, log_ensemble_model

__all__ = ["Predictor", "ensemble_dir", "load_image", "log_ensemble_model", "preprocessing_from_meta"]
