"""Tracking: MLflow runs for folds nested under one parent per configuration, the CV summary with
out-of-fold evidence and the fold ensemble, the Model Registry, and test runs.

    store         which MLflow store, one client per store, the lock, credentials redacted
    identity      what makes folds one configuration (and so one parent)
    data_version  the DVC md5 or content digest of the data, and the split
    runs          fold runs: create, log, close (FINISHED only after the last artifact), resume
    summary       the parent: CV summary, OOF predictions and metrics, the ensemble model
    registry      model versions (kind=fold | cv_ensemble) and the `champion` alias
    models        log and load single-fold MLflow models
    testrun       test.py's runs
    callbacks     Hydra callbacks (TagBestTrial for Optuna searches)
"""

from src.tracking.callbacks import TagBestTrial
from src.tracking.models import load_logged_model
from src.tracking.runs import (
    PARENT_TAG,
    RUN_TYPE_TAG,
    FoldRun,
    find_interrupted_fold,
    fold_guard,
    reopen_fold_run,
    start_fold_run,
    unfinished_run_in,
)
from src.tracking.store import check_reachable, redact, store_lock, tracking_uri
from src.tracking.summary import completing_at_end, update_parent
from src.tracking.testrun import log_test_run

__all__ = [
    "PARENT_TAG",
    "RUN_TYPE_TAG",
    "FoldRun",
    "TagBestTrial",
    "check_reachable",
    "completing_at_end",
    "find_interrupted_fold",
    "fold_guard",
    "load_logged_model",
    "log_test_run",
    "redact",
    "reopen_fold_run",
    "start_fold_run",
    "store_lock",
    "tracking_uri",
    "unfinished_run_in",
    "update_parent",
]
