"""Label issues: images whose given class the OOF probabilities contradict (cleanlab's confident learning).

OOF probabilities come from a model that never trained on the image, so a wrong label cannot have been
memorised: where the other folds' model is confident of another class, the label is the first suspect.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from cleanlab.filter import find_label_issues as cleanlab_label_issues
from cleanlab.rank import get_self_confidence_for_each_label

from src.analysis.gallery import image_grid, short_name, thumbnail
from src.analysis.oof import OOF, from_frame

COLUMNS = ["path", "given", "suggested", "score"]


def find_label_issues(oof: OOF | pd.DataFrame) -> pd.DataFrame:
    """The likely mislabelled rows, most suspicious first: path, given and suggested class, and score (the
    OOF probability of the given class, cleanlab's self-confidence; low is suspicious).

    `oof` is an OOF or the rows of an oof_predictions.csv. The suggestion is the likeliest class other than the
    given one.
    """
    if isinstance(oof, pd.DataFrame):
        oof = from_frame(oof, "the OOF rows")
    if len(np.unique(oof.labels)) < 2:
        return pd.DataFrame(columns=COLUMNS)
    ranked = cleanlab_label_issues(
        oof.labels, oof.probs, return_indices_ranked_by="self_confidence", n_jobs=1
    )  # n_jobs=1: no process pool inside a training job or a test
    ranked = np.asarray(ranked, dtype=np.int64)
    others = oof.probs[ranked].copy()
    others[np.arange(len(ranked)), oof.labels[ranked]] = -1.0
    score = get_self_confidence_for_each_label(oof.labels, oof.probs)
    return pd.DataFrame(
        {
            "path": [oof.paths[i] for i in ranked],
            "given": [oof.classes[k] for k in oof.labels[ranked]],
            "suggested": [oof.classes[k] for k in others.argmax(axis=1)],
            "score": score[ranked],
        },
        columns=COLUMNS,
    )


def write_label_issues(issues: pd.DataFrame, image_root: Path, out_dir: Path, max_images: int = 24) -> list[Path]:
    """label_issues.csv (every issue) and label_issues.png (the first `max_images`, given → suggested)."""
    written = [out_dir / "label_issues.csv"]
    issues.to_csv(written[0], index=False)
    shown = issues.head(max_images)
    if len(shown):
        images = [thumbnail(Path(image_root) / p) for p in shown["path"]]
        captions = [
            f"{short_name(r.given)}\n→ {short_name(r.suggested)}\np(given) {r.score:.3f}\n{short_name(r.path, lines=1)}"
            for r in shown.itertuples()
        ]
        title = f"{len(issues)} possible label issues (given → suggested), most suspicious first"
        written.append(image_grid(images, captions, out_dir / "label_issues.png", title=title))
    return written
