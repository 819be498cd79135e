"""Analysis: what went wrong in a configuration, from its out-of-fold predictions, fold models and images.

Top-loss gallery with Grad-CAM, confused pairs, per-class scores across folds, label issues (cleanlab) and
calibration (ECE, temperature scaling), written as files and one index.html. Nothing here imports tracking or
the run layer except the command line (`python -m src.analysis`), which reads MLflow runs and sweep folders.
"""

from src.analysis.calibration import apply_temperature, expected_calibration_error, fit_temperature
from src.analysis.label_issues import find_label_issues
from src.analysis.oof import OOF, join_fold_predictions, read_oof
from src.analysis.report import write_report

__all__ = [
    "OOF",
    "apply_temperature",
    "expected_calibration_error",
    "find_label_issues",
    "fit_temperature",
    "join_fold_predictions",
    "read_oof",
    "write_report",
]
