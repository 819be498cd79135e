"""Image files through the predictor: find them, decode them in DataLoader workers, keep going past broken ones."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from src.data import IMAGE_EXTENSIONS, is_junk, make_loader, walk_files
from src.serving.ensemble_model import Predictor, load_image


def _hidden(path: Path, root: Path | None) -> bool:
    parts = path.relative_to(root).parts if root is not None and path.is_relative_to(root) else (path.name,)
    return any(is_junk(part) for part in parts)


def collect_images(spec: str) -> tuple[list[Path], list[Path]]:
    """(image files, skipped files) named by a folder (searched recursively), a file or a glob pattern.

    Image files are recognised by extension in any case (.JPG); hidden files (or files in hidden or __MACOSX
    folders below the folder searched), broken links and other extensions are skipped; symlinked folders are
    followed. Files that fail to decode are found later, while predicting. Both lists are sorted.
    """
    root = Path(spec).expanduser()
    images, skipped = [], []
    if root.is_dir():
        (candidates, skipped), base = walk_files(root), root  # broken links are skipped files too
    elif root.is_file():
        candidates, base = [root], None
    else:
        candidates, base = [Path(p) for p in glob.glob(str(root), recursive=True) if Path(p).is_file()], None
    for path in sorted(candidates):
        ok = path.suffix.lower() in IMAGE_EXTENSIONS and not _hidden(path, base)
        (images if ok else skipped).append(path)
    return images, sorted(skipped)


class ImageFiles(Dataset):
    """Preprocessed images by path. A file that cannot be decoded gives a zero image flagged as failed, so that
    one broken file among thousands is reported at the end instead of stopping the run."""

    def __init__(self, paths: Sequence[str | Path], predictor: Predictor) -> None:
        self.paths, self.preprocess = [Path(p) for p in paths], predictor.preprocess
        self.shape = self.preprocess(Image.new("RGB", (8, 8))).shape  # (3, crop, crop)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        try:
            return self.preprocess(load_image(self.paths[index])), index, True
        except Exception:  # Pillow raises many types for broken files; any of them means skip
            return torch.zeros(self.shape), index, False


@dataclass
class FilePredictions:
    """Log-probabilities (N, C) of the files that decoded, their positions in the input list, and the failures."""

    log_probs: torch.Tensor
    indices: list[int]
    failed: list[int]


def predict_files(
    predictor: Predictor, paths: Sequence[str | Path], batch_size: int, num_workers: int, progress: bool = True
) -> FilePredictions:
    """Run the predictor over image files, decoding in `num_workers` loader processes, with a Rich progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    loader = make_loader(ImageFiles(paths, predictor), batch_size, num_workers)
    outputs, indices, failed = [], [], []
    columns = (TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("predict", total=len(paths))
        for x, index, ok in loader:
            if ok.any():
                outputs.append(predictor.log_probs(x[ok]))
                indices.extend(index[ok].tolist())
            failed.extend(index[~ok].tolist())
            bar.advance(task, len(index))
    log_probs = torch.cat(outputs) if outputs else torch.empty(0, len(predictor.classes))
    return FilePredictions(log_probs, indices, failed)
