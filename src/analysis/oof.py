"""Out-of-fold (OOF) predictions as arrays: every training image once, with the class probabilities of the one
fold model that never trained on it. Read from `oof_predictions.csv`, or joined from the folds'
`val_predictions.csv` files (same columns: path, fold, true, predicted, confidence, prob_<class>...)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from src.errors import UserError

PROB_PREFIX = "prob_"
REQUIRED_COLUMNS = ("path", "fold", "true")
# The smallest positive float: log-probabilities stay finite where a probability underflowed to 0.
TINY = np.finfo(np.float64).tiny


@dataclass(frozen=True)
class OOF:
    """Paths, folds, integer labels and (N, C) probabilities of the OOF rows, classes in model order."""

    paths: list[str]
    folds: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(axis=1)

    @property
    def log_probs(self) -> np.ndarray:
        """log p: logits up to a per-row constant, which is what temperature scaling needs."""
        return np.log(np.clip(self.probs, TINY, None))

    @property
    def losses(self) -> np.ndarray:
        """Cross-entropy of each row, -log p(true class)."""
        return -self.log_probs[np.arange(len(self)), self.labels]


def read_predictions(path: Path) -> pd.DataFrame:
    """A predictions CSV as strings: class names such as `1` or `NA` must stay names, not numbers or NaN."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; pass an oof_predictions.csv or val_predictions.csv") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a predictions CSV ({err})") from None


def from_frame(frame: pd.DataFrame, source: str) -> OOF:
    """Check the columns and turn the rows into an OOF; `source` names the input in error messages."""
    classes = [c.removeprefix(PROB_PREFIX) for c in frame.columns if c.startswith(PROB_PREFIX)]
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing or len(classes) < 2:
        raise UserError(
            f"{source} lacks column(s) {', '.join(missing) or 'prob_<class> for 2+ classes'}; expected path, fold, "
            f"true, predicted, confidence and prob_<class> for every class (a val_predictions.csv or "
            f"oof_predictions.csv written by train.py)"
        )
    if frame.empty:
        raise UserError(f"{source} has no rows")
    unknown = sorted(set(frame["true"]) - set(classes))
    if unknown:
        raise UserError(f"{source} has true classes {unknown[:5]} without a prob_<class> column")
    try:
        probs = frame[[f"{PROB_PREFIX}{c}" for c in classes]].astype(np.float64).to_numpy()
        folds = frame["fold"].astype(int).to_numpy()
    except ValueError as err:
        raise UserError(f"{source} holds a probability or fold that is not a number ({err})") from None
    if not np.isfinite(probs).all() or (probs < 0).any() or (probs.sum(axis=1) <= 0).any():
        raise UserError(f"{source} holds probabilities that are negative, not finite or all 0 in a row")
    index = {c: i for i, c in enumerate(classes)}
    probs = probs / probs.sum(axis=1, keepdims=True)  # exact sums, which cleanlab checks
    labels = frame["true"].map(index).to_numpy(dtype=np.int64)
    return OOF(list(frame["path"]), folds, labels, probs, classes)


def read_oof(path: Path) -> OOF:
    """The OOF predictions of an `oof_predictions.csv`."""
    return from_frame(read_predictions(Path(path)), str(path))


def join_fold_predictions(files: Sequence[Path]) -> pd.DataFrame:
    """The folds' validation predictions as one OOF table sorted by path; the folds must agree on the classes
    and never predict an image twice, or the result is not out-of-fold evidence."""
    frames = [read_predictions(Path(f)) for f in files]
    if not frames:
        raise UserError("no val_predictions.csv to join")
    columns = list(frames[0].columns)
    for file, frame in zip(files[1:], frames[1:], strict=True):
        if list(frame.columns) != columns:
            raise UserError(f"{file} has columns {list(frame.columns)}, {files[0]} has {columns}; the folds disagree")
    joined = pd.concat(frames, ignore_index=True)
    twice = joined["path"][joined["path"].duplicated()].tolist()
    if twice:
        raise UserError(f"{len(twice)} images are predicted by more than one fold (e.g. {twice[0]}); the folds overlap")
    return joined.sort_values("path", kind="stable", ignore_index=True)
