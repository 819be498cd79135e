"""Analysis: what went wrong in a configuration, from its out-of-fold predictions, fold models and images.

Top-loss gallery with Grad-CAM, confused pairs, per-class scores across folds, label issues (cleanlab) and
calibration (ECE, temperature scaling), written as files and one index.html. Nothing here imports tracking or
the run layer except the command line (`python -m src.analysis`), which reads MLflow runs and sweep folders.
"""

import importlib

_EXPORTS = {
    "OOF": "oof",
    "apply_temperature": "calibration",
    "expected_calibration_error": "calibration",
    "find_label_issues": "label_issues",
    "fit_temperature": "calibration",
    "join_fold_predictions": "oof",
    "read_oof": "oof",
    "write_report": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    """The public names, imported on first use: every training job imports `src.analysis.duplicates`, and the
    report's libraries (pytorch-grad-cam, cleanlab, sklearn's calibration) cost its process ~0.4 s for nothing."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
