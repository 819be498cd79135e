"""Data: scan an ImageFolder tree, split it into stratified folds, load and transform images.

Nothing here knows about models or tracking. The split is a pure function of the
file list, `n_folds` and `split_seed`, so the same settings give the same folds on
any machine.
"""

from __future__ import annotations

import csv
import logging
import multiprocessing
import os
import unicodedata
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    TensorDataset,
    WeightedRandomSampler,
    default_collate,
)
from torchvision.transforms import v2

from src import file_memo
from src.errors import UserError, warn_once
from src.preprocessing import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from src.decoded import DecodedImages

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
DATA_HINT = "run `dvc pull` to fetch the data, or `make data` to write the built-in sample digits"


@dataclass
class ImageFolder:
    """The usable images of a `root/<class>/<image>` tree and the files that were skipped."""

    root: Path
    classes: list[str]
    paths: list[str]
    targets: np.ndarray
    skipped: list[str] = field(default_factory=list)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.targets, minlength=len(self.classes))
        return dict(zip(self.classes, counts.tolist(), strict=True))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is flattened onto white.

    `Image.convert("RGB")` alone clips 16-bit grey (I;16, I) to 255 and keeps the
    arbitrary colour stored under fully transparent pixels, so both are handled here.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Decode one image file as RGB, upright: turned as its EXIF orientation says, as a photo viewer shows it (a
    phone stores most photos sideways plus that tag)."""
    with Image.open(path) as image:
        image.load()  # decode before the file closes; to_rgb may return this very image
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image)


def _check_image(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            if image.format != "PNG":
                image.load()
        return True
    except Image.DecompressionBombError as err:  # a valid image, larger than Pillow decodes
        warn_once(log, f"skipped {path}: {err}; shrink it (e.g. to 8000 px on its longer side)")
        return False
    except Exception:  # Pillow raises many types for broken files; any of them means skip.
        return False


def _is_readable_image(path: Path) -> bool:
    """Cheap validity check: headers and checksums for all files, a reduced decode for JPEG.

    PNG `verify()` walks every chunk CRC, which catches truncation without decoding;
    a JPEG is only proven whole by decoding it, done at 1/8 scale via `draft`. Checked once per file and
    process (src/file_memo.py): every job of a sweep scans the same folder.
    """
    return file_memo.remembered(path, "readable_image", _check_image)


def is_junk(name: str) -> bool:
    """Hidden files and folders (.DS_Store, .ipynb_checkpoints) and the resource forks macOS zips add (__MACOSX)."""
    return name.startswith(".") or name == "__MACOSX"


def class_name(folder_name: str) -> str:
    """A class folder's name in Unicode's composed form (NFC): macOS and some zip tools write `café` decomposed,
    which would otherwise be another class than the `café` a model was trained on elsewhere."""
    return unicodedata.normalize("NFC", folder_name)


def walk_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files, broken links) under `folder`, sorted, following symlinked folders as `find -L` does; a real
    folder is entered once, so a link loop ends. A broken link, socket or pipe is no file to read."""
    files, broken, seen = [], [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        try:
            stat = os.stat(dirpath)
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath, name)
            (files if path.is_file() else broken).append(path)
    return sorted(files), sorted(broken)


def scan_image_folder(root: str | Path, what: str = "data.train_dir") -> ImageFolder:
    """List `root/<class>/*` images; classes are the sorted sub-folder names.

    Hidden files, non-image files, broken links and unreadable images are skipped and listed once; symlinked
    folders are followed.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{what}={root} does not exist; {DATA_HINT}, or point {what} at your own ImageFolder tree")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    class_dirs = sorted((p for p in folders if not is_junk(p.name)), key=lambda p: class_name(p.name))
    if not class_dirs:
        raise UserError(f"{what}={root} has no class folders; expected {root}/<class>/<image>; {DATA_HINT}")
    if ignored := [p.name for p in folders if is_junk(p.name)]:
        warn_once(log, f"{what}: hidden and __MACOSX folders in {root} are not classes: left out {', '.join(ignored)}")
    classes, paths, targets, skipped = [], [], [], []
    for class_dir in class_dirs:
        files, broken = walk_files(class_dir)
        skipped.extend(path.relative_to(root).as_posix() for path in broken)
        good = []
        for path in files:
            rel = path.relative_to(root).as_posix()
            if any(is_junk(part) for part in path.relative_to(class_dir).parts) or (
                path.suffix.lower() not in IMAGE_EXTENSIONS or not _is_readable_image(path)
            ):
                skipped.append(rel)
            else:
                good.append(rel)
        if not good:
            raise UserError(f"class folder {class_dir} has no readable images; add images to it or remove the folder")
        classes.append(class_name(class_dir.name))
        paths.extend(good)
        targets.extend([len(classes) - 1] * len(good))
    if len(set(classes)) < len(classes):
        raise UserError(f"{what}={root} has class folders whose names differ only in Unicode form; merge them")
    if skipped:
        shown = ", ".join(skipped[:20]) + (f" ... and {len(skipped) - 20} more" if len(skipped) > 20 else "")
        warn_once(
            log,
            f"skipped {len(skipped)} files in {root} that are hidden, not images, broken links or unreadable: {shown}",
        )
    return ImageFolder(root, classes, paths, np.asarray(targets, dtype=np.int64), skipped)


def assign_folds(
    targets: np.ndarray,
    classes: Sequence[str],
    n_folds: int,
    split_seed: int,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Fold index of every sample from scikit-learn's StratifiedKFold, or StratifiedGroupKFold with `groups`.

    Without groups the split is the one this project always made; with them a group never straddles folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if n_folds < 2:
        raise UserError(f"n_folds={n_folds} must be at least 2")
    counts = np.bincount(targets, minlength=len(classes))
    small = [f"{c} ({n})" for c, n in zip(classes, counts, strict=True) if n < n_folds]
    if small:
        raise UserError(
            f"every class needs at least n_folds={n_folds} images, but these have fewer: {', '.join(small)}; "
            f"add images or lower n_folds"
        )
    folds = np.empty(len(targets), dtype=np.int64)
    if groups is None:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=split_seed)
        for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(targets)), targets)):
            folds[val_idx] = k
        return folds
    n_groups = len(np.unique(groups))
    if n_groups < n_folds:
        raise UserError(f"data.groups gives {n_groups} groups, fewer than n_folds={n_folds}; lower n_folds")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=split_seed)
    for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(targets)), targets, groups)):
        folds[val_idx] = k
    return folds


def read_groups(path: str | Path, images: ImageFolder) -> np.ndarray:
    """The group of every training image from a CSV with the columns path,group (paths relative to the
    training folder, as in split.csv, or absolute); rows for other files are ignored."""
    file, root = Path(path), images.root.resolve()
    fix = "give a CSV with the header path,group and one row per image of data.train_dir, or data.groups=auto"
    if not file.is_file():
        raise UserError(f"data.groups={path} does not exist; {fix}")
    groups: dict[str, str] = {}
    try:
        with file.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not {"path", "group"} <= set(reader.fieldnames or []):
                raise UserError(f"data.groups={path} has no path and group columns in its first line; {fix}")
            for line, row in enumerate(reader, start=2):
                rel, group = (row.get("path") or "").strip(), (row.get("group") or "").strip()
                if not rel or not group:
                    raise UserError(f"data.groups={path} line {line} lacks a path or a group; {fix}")
                resolved = Path(rel).resolve()  # absolute, or relative to the current folder (data/train/...)
                rel = resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else Path(rel).as_posix()
                if groups.setdefault(rel, group) != group:
                    raise UserError(
                        f"data.groups={path} line {line} gives {rel} a second group; keep one path,group row per image"
                    )
    except (csv.Error, UnicodeDecodeError) as err:
        raise UserError(f"data.groups={path} is not a readable CSV ({err}); {fix}") from None
    missing = [p for p in images.paths if p not in groups]
    if missing:
        raise UserError(
            f"data.groups={path} has no group for {len(missing)} of the {len(images.paths)} images in "
            f"{images.root} (e.g. {missing[0]}); add a path,group row for each, paths relative to data.train_dir"
        )
    return np.asarray([groups[p] for p in images.paths])


def resolve_groups(
    groups: str | None, images: ImageFolder, near_duplicate_distance: int = 4, cache_dir: str | Path | None = None
) -> np.ndarray | None:
    """`data.groups`: null (no groups), `auto` (exact and near-duplicate images grouped) or a path,group CSV."""
    if groups is None:
        return None
    if str(groups) == "auto":
        from src.analysis.duplicates import duplicate_groups

        labels = duplicate_groups(images, near_duplicate_distance, cache_dir)
    else:
        labels = read_groups(groups, images)
    _, sizes = np.unique(labels, return_counts=True)
    log.info(
        "data.groups=%s: %d images in %d groups (%d images share a group); StratifiedGroupKFold keeps each in one fold",
        groups,
        len(labels),
        len(sizes),
        int(sizes[sizes > 1].sum()),
    )
    return labels


AUGMENTS = ("none", "basic", "trivial", "randaugment")
SAMPLERS = ("none", "balanced")


def resolve_augment(augment: str | bool | None) -> str:
    """`data.augment` as one of AUGMENTS; the booleans of older configs and params.yaml mean none and basic."""
    if augment is None or isinstance(augment, bool):
        return "basic" if augment else "none"
    value = str(augment).strip().lower()
    value = {"true": "basic", "false": "none"}.get(value, value)
    if value not in AUGMENTS:
        raise UserError(f"data.augment={augment} is not one of {', '.join(AUGMENTS)}")
    return value


def resize_step(resize_size: int, interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR) -> v2.Resize:
    """The evaluation transform's resize: the shorter side to `resize_size`, antialiased, on a uint8 tensor.

    The decoded-image store (src/decoded.py) runs exactly this step once per image, which is what keeps
    predictions with and without the store equal.
    """
    return v2.Resize(resize_size, interpolation=interpolation, antialias=True)


def to_float(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """uint8 images (one or a batch) to normalised float32: the last step of every transform."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def build_transform(
    image_size: int,
    train: bool = False,
    augment: str | bool = "none",
    crop_scale: Sequence[float] = (0.08, 1.0),
    hflip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resize_size: int | None = None,
    interpolation: str | v2.InterpolationMode = "bilinear",
    random_erasing: float = 0.0,
    decoded: bool = False,
) -> v2.Compose:
    """Resize the short side to `resize_size` (default `image_size`), centre-crop `image_size`, normalise.

    A training transform with `augment` other than none takes a random resized crop and flip instead (basic),
    then TrivialAugmentWide (trivial) or RandAugment (randaugment) on the uint8 image; `random_erasing` is the
    probability of erasing a random rectangle of the normalised training tensor.
    `decoded`: the input is a uint8 image the store has already resized with `resize_step`; then the resize
    is skipped and the result stays uint8 (FoldDataModule adds `to_float` unless the model converts it on a GPU),
    and erasing fills with black rather than the mean colour.
    """
    augment = resolve_augment(augment)
    mode = v2.InterpolationMode(interpolation)
    if train and augment != "none":
        spatial = [v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=mode, antialias=True)]
        spatial += [v2.RandomHorizontalFlip()] if hflip else []
        # Their rotations and shears run on tensors, which take nearest or bilinear only.
        policy_mode = mode if mode in (v2.InterpolationMode.NEAREST, v2.InterpolationMode.BILINEAR) else "bilinear"
        if augment == "trivial":
            spatial.append(v2.TrivialAugmentWide(interpolation=v2.InterpolationMode(policy_mode)))
        elif augment == "randaugment":
            spatial.append(v2.RandAugment(interpolation=v2.InterpolationMode(policy_mode)))
    else:
        spatial = [] if decoded else [resize_step(resize_size or image_size, mode)]
        spatial += [v2.CenterCrop(image_size)]
    if not 0.0 <= random_erasing <= 1.0:
        raise UserError(f"data.random_erasing={random_erasing} must be a probability in [0, 1]")
    erase = [v2.RandomErasing(p=random_erasing)] if train and random_erasing > 0 else []
    if decoded:
        return v2.Compose([*spatial, *erase])
    return v2.Compose([v2.ToImage(), *spatial, *to_float(mean, std).transforms, *erase])


def check_mixing(mixup_alpha: float, cutmix_alpha: float, mix_prob: float) -> bool:
    """Whether MixUp or CutMix is on; raises on values they cannot take."""
    if mixup_alpha < 0 or cutmix_alpha < 0 or not 0.0 <= mix_prob <= 1.0:
        raise UserError(
            f"data.mixup_alpha={mixup_alpha} and data.cutmix_alpha={cutmix_alpha} must be >= 0 (0: off) "
            f"and data.mix_prob={mix_prob} a probability in [0, 1]"
        )
    return mixup_alpha > 0 or cutmix_alpha > 0


class MixCollate:
    """Collate a training batch, then mix it with MixUp or CutMix (one drawn per batch when both are on) with
    probability `mix_prob`. Every batch then carries soft targets, (N, C) float rows summing to 1, one-hot when
    unmixed, so a loader never yields two target shapes. A class, not a closure: loader workers pickle it."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, mix_prob: float = 1.0):
        check_mixing(mixup_alpha, cutmix_alpha, mix_prob)
        mixes = [v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []
        mixes += [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else []
        if not mixes:
            raise UserError("MixCollate needs data.mixup_alpha > 0 or data.cutmix_alpha > 0")
        self.mix = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
        self.num_classes, self.mix_prob = num_classes, mix_prob

    def __call__(self, samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = default_collate(samples)
        if float(torch.rand(())) < self.mix_prob:
            return self.mix(x, y)
        return x, nn.functional.one_hot(y, self.num_classes).float()


def balanced_sampler(targets: np.ndarray, num_classes: int, seed: int) -> WeightedRandomSampler:
    """Draws each sample with weight 1 / (its class's count), with replacement, as many draws as samples: every
    class is drawn about equally often. Its own seeded generator makes the draws repeatable run to run."""
    counts = np.bincount(targets, minlength=num_classes)
    weights = torch.as_tensor(1.0 / counts[targets], dtype=torch.double)
    generator = torch.Generator().manual_seed(int(seed))
    return WeightedRandomSampler(weights, num_samples=len(targets), replacement=True, generator=generator)


class ImageDataset(Dataset):
    """Images listed by relative path under `root`, decoded once per access."""

    def __init__(self, root: Path, paths: Sequence[str], targets: Sequence[int], transform: v2.Compose) -> None:
        self.root, self.paths, self.targets, self.transform = Path(root), list(paths), list(targets), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_image(self.root / self.paths[index])), self.targets[index]


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, SLURM, containers), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_num_workers(num_workers: int | str, parallel_jobs: int = 1) -> int:
    """`auto`: this job's share of the CPUs less one for the training process itself, at most 8.

    `parallel_jobs` jobs training side by side on one machine (the joblib launcher) share its CPUs evenly,
    as joblib shares them among its workers' thread pools, so two jobs do not start two full sets of workers.
    """
    if num_workers == "auto":
        cpus, jobs = available_cpus(), max(1, parallel_jobs)
        workers = max(0, min(8, cpus // jobs - 1))
        log.info("data.num_workers=auto: %d loader workers (%d CPUs, %d job(s) at once)", workers, cpus, jobs)
        return workers
    try:
        workers = int(num_workers)
    except (TypeError, ValueError):
        workers = -1
    if workers < 0:
        raise UserError(f"data.num_workers={num_workers} must be `auto` or a whole number >= 0")
    return workers


def worker_context() -> multiprocessing.context.BaseContext | None:
    """How loader workers start: the process's own start method, unless a launcher replaced it with its own.

    A joblib (loky) worker process runs with the start method `loky`, whose Popen can only start loky's own
    Process objects: a DataLoader left to that default fails to start its workers ("Got pickle error") and
    Lightning then stops with "Please call `iter(combined_loader)` first". Such a process gets the platform's
    default method instead (fork on Linux before Python 3.14, forkserver from 3.14, spawn on macOS and Windows).
    """
    method = multiprocessing.get_start_method(allow_none=True)
    if method is None or method in ("fork", "spawn", "forkserver"):
        return None
    return multiprocessing.get_context(multiprocessing.get_all_start_methods()[0])


class EpochShuffle(RandomSampler):
    """A fresh order every epoch that depends on (seed, epoch) alone, like DistributedSampler's `set_epoch`
    (Lightning calls it at each epoch start): how often a loader is iterated (persistent workers prefetch
    when Lightning first iterates it) no longer changes the order, and a resumed fit shuffles as the
    uninterrupted one would. A RandomSampler, so Lightning knows the loader shuffles."""

    def __init__(self, dataset: Sized, seed: int) -> None:
        super().__init__(dataset)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool = False,
    sampler: Sampler | None = None,
    collate_fn: MixCollate | None = None,
    train: bool | None = None,
    seed: int | None = None,
) -> DataLoader:
    """A DataLoader with persistent workers and pinned memory when they pay off.

    A training loader (`train`, by default a shuffled one) drops a last batch of one sample: BatchNorm cannot
    train on it. With `seed`, the shuffle order and the workers' seeds come from generators of their own, not
    from the global RNG: a loader then draws the same numbers with or without workers, persistent or not, and
    leaves the model's own random draws (initialisation, dropout) as they would be without it.
    """
    train = shuffle if train is None else train
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    if shuffle and seed is not None:
        sampler = EpochShuffle(dataset, int(seed))
    # No `shuffle` argument beside a sampler: Lightning reads it first when it swaps in a DistributedSampler.
    order: dict[str, Any] = {"sampler": sampler} if sampler is not None else {"shuffle": shuffle}
    return DataLoader(
        dataset,
        batch_size=batch_size,
        **order,
        generator=generator,
        collate_fn=collate_fn,
        drop_last=train and len(dataset) % batch_size == 1,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        multiprocessing_context=worker_context() if num_workers > 0 else None,
    )


class FoldDataModule(L.LightningDataModule):
    """Train on every fold but `fold`, validate on `fold`, of a stratified k-fold split (grouped with `groups`)."""

    def __init__(
        self,
        train_dir: str,
        fold: int,
        n_folds: int = 5,
        split_seed: int = 42,
        image_size: int = 224,
        augment: str | bool = "none",
        crop_scale: Sequence[float] = (0.08, 1.0),
        hflip: bool = True,
        batch_size: int = 32,
        num_workers: int | str = "auto",
        features: torch.Tensor | None = None,
        groups: str | None = None,
        near_duplicate_distance: int = 4,
        hash_cache_dir: str | None = None,
        resize_size: int | None = None,
        interpolation: str = "bilinear",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        random_erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        sampler: str = "none",
        seed: int = 42,
        decode_cache: str = "none",
        decode_ram_budget: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(fold, int) or not 0 <= fold < n_folds:
            raise UserError(f"fold={fold} is outside [0, {n_folds}); pick fold=0..{n_folds - 1} or change n_folds")
        if str(decode_cache) not in ("none", "ram", "disk"):
            raise UserError(f"data.decode_cache={decode_cache} is not one of none, ram, disk")
        self.train_dir, self.fold, self.n_folds, self.split_seed = Path(train_dir), fold, n_folds, split_seed
        self.image_size, self.batch_size = image_size, batch_size
        self.num_workers = resolve_num_workers(num_workers)
        look = {"mean": mean, "std": std, "resize_size": resize_size, "interpolation": interpolation}
        self.train_transform = build_transform(
            image_size, True, augment, crop_scale, hflip, random_erasing=random_erasing, **look
        )
        self.eval_transform = build_transform(image_size, **look)
        self.resize_size, self.interpolation = resize_size or image_size, v2.InterpolationMode(interpolation)
        self.mean, self.std = tuple(mean), tuple(std)
        # MixUp/CutMix mix whole training batches (MixCollate, built once the classes are known).
        self.mixup_alpha, self.cutmix_alpha, self.mix_prob = float(mixup_alpha), float(cutmix_alpha), float(mix_prob)
        self.mixing = check_mixing(self.mixup_alpha, self.cutmix_alpha, self.mix_prob)
        if str(sampler) not in SAMPLERS:
            raise UserError(f"data.sampler={sampler} is not one of {', '.join(SAMPLERS)}")
        self.sampler, self.seed = str(sampler), seed
        # data.decode_cache: none, or each image decoded and resized once into a store in ram or on disk
        # (src/decoded.py, beside the feature cache); transforms then start from the resized uint8 image.
        self.decode_cache, self.decode_ram_budget, self.decoded = str(decode_cache), decode_ram_budget, None
        self.uint8_batches: bool | None = None
        self.stored_transforms = {
            train: build_transform(
                image_size, train, augment, crop_scale, hflip, random_erasing=random_erasing, decoded=True, **look
            )
            for train in (True, False)
        }
        self.images: ImageFolder | None = None
        self.folds: np.ndarray | None = None
        # (N, D) backbone features, row i for image i (src/features.py): then batches are features, not images.
        self.features: torch.Tensor | None = features
        # data.groups: null, `auto` or a path,group CSV (resolve_groups); auto hashes images, cached by file sha256.
        self.groups, self.near_duplicate_distance, self.hash_cache_dir = groups, near_duplicate_distance, hash_cache_dir

    def setup(self, stage: str | None = None) -> None:
        if self.images is None:
            images = scan_image_folder(self.train_dir)
            groups = resolve_groups(self.groups, images, self.near_duplicate_distance, self.hash_cache_dir)
            self.folds = assign_folds(images.targets, images.classes, self.n_folds, self.split_seed, groups)
            self.images = images

    @property
    def classes(self) -> list[str]:
        self.setup()
        return self.images.classes

    def indices(self, train: bool) -> np.ndarray:
        """Positions of this fold's training (or validation) samples."""
        self.setup()
        return np.flatnonzero((self.folds != self.fold) if train else (self.folds == self.fold))

    def train_class_counts(self) -> np.ndarray:
        """Images per class (in `classes` order) in this fold's training part: for class weights and imbalance."""
        self.setup()
        return np.bincount(self.images.targets[self.indices(True)], minlength=len(self.images.classes))

    def split_rows(self) -> list[dict[str, object]]:
        """One row per image (path, class, fold), the record of the split kept with the run."""
        self.setup()
        return [
            {"path": p, "class": self.images.classes[t], "fold": int(f)}
            for p, t, f in zip(self.images.paths, self.images.targets, self.folds, strict=True)
        ]

    def _dataset(self, train: bool) -> Dataset:
        idx = self.indices(train)
        if self.features is not None:
            return TensorDataset(self.features[idx], torch.from_numpy(self.images.targets[idx]))
        if self.decode_cache != "none":
            from src.decoded import StoredImageDataset

            transform = self.stored_transforms[train]
            if not self.uint8_on_device():
                transform = v2.Compose([transform, to_float(self.mean, self.std)])
            targets = self.images.targets[idx].tolist()
            return StoredImageDataset(self.decoded_images(), idx.tolist(), targets, transform)
        return ImageDataset(
            self.train_dir,
            [self.images.paths[i] for i in idx],
            self.images.targets[idx].tolist(),
            self.train_transform if train else self.eval_transform,
        )

    def uint8_on_device(self) -> bool:
        """Whether stored images leave the loader as uint8 for the model to scale and normalise (ImageClassifier.
        forward): one vectorised operation per batch in the training process, on its device, instead of one per
        image in the workers, and a quarter of the bytes to pass between processes and copy to a GPU. MixUp/CutMix
        blend float images, so they get float batches; `uint8_batches` (None: decide) overrides it."""
        if self.mixing:
            return False
        return True if self.uint8_batches is None else self.uint8_batches

    def decoded_images(self) -> DecodedImages:
        """The decoded-image store of every image, built (or found on disk) once, in this process."""
        if self.decoded is None:
            from src.decoded import build_store

            self.setup()
            self.decoded, _ = build_store(
                self.decode_cache,
                self.train_dir,
                self.images.paths,
                resize_step(self.resize_size, self.interpolation),
                Path(self.hash_cache_dir or ".cache/features"),  # the feature cache's folder: the store sits beside
                self.num_workers,
                self.decode_ram_budget,
            )
        return self.decoded

    def loader_workers(self) -> int:
        """Cached features are rows in memory: workers would only add a process start per fit and a copy per batch.
        (The loaders' seeded generators keep shuffling identical whatever the worker count.)"""
        return 0 if self.features is not None else self.num_workers

    # data.sampler=balanced draws classes evenly instead of shuffling; MixUp/CutMix apply to images only.
    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset(True)
        n_classes = len(self.classes)
        sampler = None
        if self.sampler == "balanced":
            sampler = balanced_sampler(self.images.targets[self.indices(True)], n_classes, self.seed)
        collate = None
        if self.mixing and self.features is None:
            collate = MixCollate(n_classes, self.mixup_alpha, self.cutmix_alpha, self.mix_prob)
        return make_loader(
            dataset,
            self.batch_size,
            self.loader_workers(),
            shuffle=sampler is None,
            sampler=sampler,
            collate_fn=collate,
            train=True,
            seed=self.seed,
        )

    def val_dataloader(self) -> DataLoader:
        dataset = self._dataset(False)
        return make_loader(
            dataset, self.batch_size, self.loader_workers(), sampler=self._validation_shard(dataset), seed=self.seed
        )

    def _validation_shard(self, dataset: Dataset) -> Sampler | None:
        """While a multi-process (DDP) fit runs, this process's share of the validation set, each image in one share.

        Lightning's own DistributedSampler pads the set to a multiple of the process count with repeated images,
        which val_accuracy, and so best_val_accuracy, would count twice. Otherwise (one device, or the report
        after fit) the loader reads every image.
        """
        from lightning.pytorch.trainer.states import TrainerStatus

        trainer = self.trainer
        if (
            trainer is None
            or trainer.world_size < 2
            or trainer.state.status != TrainerStatus.RUNNING
            or len(dataset) < trainer.world_size  # every process needs a batch
        ):
            return None
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        return UnrepeatedDistributedSampler(dataset, trainer.world_size, trainer.global_rank, shuffle=False)
