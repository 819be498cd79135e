"""The report's inputs from a Hydra multirun folder: each job folder holds `val_predictions.csv`,
`model/*.pth` and `.hydra/` (config.yaml with data.train_dir, overrides.yaml, hydra.yaml with the launch
folder). Jobs whose overrides differ only in `fold` are one configuration; its folds' predictions joined are
its out-of-fold (OOF) predictions."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from src.analysis.oof import join_fold_predictions, read_predictions
from src.errors import UserError

FOLD_OVERRIDE = re.compile(r"^\+{0,2}fold=")


@dataclass
class Configuration:
    """The fold jobs of one configuration: overrides (without fold), fold -> (predictions, model file)."""

    overrides: tuple[str, ...]
    image_root: Path
    n_folds: int
    folds: dict[int, tuple[Path, Path]] = field(default_factory=dict)

    def write_oof(self, path: Path) -> Path:
        """Join the folds' predictions into `path`; raises when a fold is missing."""
        missing = sorted(set(range(self.n_folds)) - set(self.folds))
        if missing:
            raise UserError(
                f"configuration {' '.join(self.overrides) or '(defaults)'} lacks fold(s) "
                f"{', '.join(map(str, missing))} of {self.n_folds}; out-of-fold analysis needs every fold"
            )
        join_fold_predictions([csv for csv, _ in self.folds.values()]).to_csv(path, index=False)
        return path

    @property
    def model_files(self) -> dict[int, Path]:
        return {k: model for k, (_, model) in self.folds.items()}


def _job_dir(csv: Path, top: Path) -> Path | None:
    """The Hydra job folder of a predictions file: the nearest folder at or above it with `.hydra/`."""
    for folder in [csv.parent, *csv.parent.parents]:
        if (folder / ".hydra" / "config.yaml").is_file():
            return folder
        if folder == top:
            return None
    return None


def _image_root(job: Path) -> Path:
    """data.train_dir of the job, a relative one taken from the folder the job was launched in."""
    try:
        train_dir = Path(str(OmegaConf.load(job / ".hydra" / "config.yaml").data.train_dir))
    except Exception as err:  # a missing key or an interpolation that only Hydra resolves
        raise UserError(f"{job / '.hydra' / 'config.yaml'} has no readable data.train_dir ({err})") from None
    if train_dir.is_absolute():
        return train_dir
    hydra_file = job / ".hydra" / "hydra.yaml"
    cwd = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.cwd") if hydra_file.is_file() else None
    return Path(cwd or ".") / train_dir


def _fold(csv: Path) -> int:
    folds = set(read_predictions(csv).get("fold", []))
    if len(folds) != 1:
        raise UserError(f"{csv} holds folds {sorted(folds)}; a val_predictions.csv holds exactly one")
    return int(folds.pop())


def sweep_configurations(folder: Path) -> list[Configuration]:
    """The configurations of a multirun folder, each with the latest job of every fold it ran."""
    folder = Path(folder)
    configurations: dict[tuple[str, ...], Configuration] = {}
    latest: dict[tuple[tuple[str, ...], int], float] = {}
    for csv in sorted(folder.rglob("val_predictions.csv")):
        job = _job_dir(csv, folder)
        models = sorted((csv.parent / "model").glob("*.pth"))
        if job is None or not models:
            continue
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
        key = tuple(sorted(str(o) for o in overrides if not FOLD_OVERRIDE.match(str(o))))
        n_folds = int(OmegaConf.select(OmegaConf.load(job / ".hydra" / "config.yaml"), "n_folds", default=0) or 0)
        config = configurations.setdefault(key, Configuration(key, _image_root(job), n_folds))
        fold, written = _fold(csv), csv.stat().st_mtime
        if latest.get((key, fold), -1.0) <= written:  # a re-run of a fold replaces the earlier one
            latest[key, fold] = written
            config.folds[fold] = (csv, models[-1])
    if not configurations:
        raise UserError(
            f"{folder} holds no fold jobs (folders with val_predictions.csv, model/*.pth and .hydra/); "
            f"pass a multirun/<date>/<time> folder written by `python train.py -m ...`"
        )
    return list(configurations.values())


def distinguishing_names(configurations: list[Configuration]) -> list[str]:
    """A folder name per configuration: the overrides not shared by all of them (`default` if none)."""
    shared = set.intersection(*(set(c.overrides) for c in configurations))
    names = []
    for config in configurations:
        name = ",".join(o for o in config.overrides if o not in shared) or "default"
        names.append(re.sub(r"[^\w.=,+-]", "_", name)[:150])
    return names
