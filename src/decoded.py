"""Decoded-image store (`data.decode_cache=none|ram|disk`): decode and resize each image once, then serve uint8.

Decoding a JPEG or PNG with Pillow and resizing it is most of a loader worker's time, and it is the same
work in every epoch: only the crop, flip and augmentation after the resize are random. The store runs
`to_rgb` and the evaluation transform's Resize step once per image and keeps the result as uint8, laid out
height x width x channel (channels-last: each epoch's crop and resize run ~1.3x faster on it). The rest of
the transform (crop, flip, augmentation) then runs on those uint8 tensors in the workers, and the float
conversion and normalisation run in the model, on its device (`ImageClassifier.forward`).
With augmentation off the network therefore sees exactly the pixels it would see without the store.

Images differ in size and aspect ratio, so all of them live in one flat uint8 buffer with an index of
offsets and shapes: in process memory (`ram`), or in a memory-mapped file (`disk`) under

    <feature_cache_dir>/decoded/<key of format, resize and library versions>/<digest of the images>.u8

with `<same>.index.npz` beside it. The image digest covers every file's sha256 in order, so other bytes
give another file; the folder key covers the store format, so a layout written by another version is
never read. The data file is written under a temporary name and renamed, then the index is renamed
beside it: a reader that finds the index finds a whole store. A lock per folder makes concurrent sweep
jobs wait for the first to write the store and then share it.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from filelock import FileLock
from PIL import ExifTags, Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from src.data import load_image
from src.errors import UserError

log = logging.getLogger(__name__)

# Part of every key: bump it when to_rgb, the resize or the file layout change what a stored byte means.
DECODE_FORMAT = 3  # 3: photos turned upright (EXIF orientation); 2: pixels stored (H, W, C); 1: (C, H, W)
CHOICES = ("none", "ram", "disk")
RAM_FRACTION = 0.5  # of the memory available at start: the rest is for the model, the workers and the OS


def resized_shape(width: int, height: int, resize_size: int) -> tuple[int, int]:
    """(height, width) after `resize_step`, from the image header alone (torchvision's rule for an int size)."""
    short, long = min(width, height), max(width, height)
    new_short, new_long = resize_size, int(resize_size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def decode_resized(path: Path, resize: v2.Resize) -> torch.Tensor:
    """One image as the uint8 (3, H, W) tensor that the evaluation transform's Resize step produces."""
    return resize(v2.functional.pil_to_tensor(load_image(path)))


def store_key(resize: v2.Resize) -> dict[str, object]:
    """Everything a stored image depends on besides its bytes."""
    return {
        "format": DECODE_FORMAT,
        "kind": "decoded-images",
        "resize": repr(resize),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__},
    }


def available_memory() -> int:
    """Bytes of memory available to new allocations now."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_mode(mode: str, needed: int, num_workers: int, budget: int | None = None) -> str:
    """`ram` unless the images would take more than `budget` bytes (default: half the available memory), or
    loader workers would each receive a copy (they start without fork): then `disk`, said in one line."""
    if mode != "ram":
        return mode
    budget = int(RAM_FRACTION * available_memory()) if budget is None else int(budget)
    if needed > budget:
        log.warning(
            "data.decode_cache=ram: the resized images need %.2f GB, more than the RAM budget of %.2f GB; "
            "using data.decode_cache=disk (a memory-mapped file) instead",
            needed / 1e9,
            budget / 1e9,
        )
        return "disk"
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    if num_workers > 0 and method != "fork":
        log.warning(
            "data.decode_cache=ram: loader workers start with %s, so each would get its own copy of the images; "
            "using data.decode_cache=disk (a memory-mapped file shared by all of them) instead",
            method,
        )
        return "disk"
    return "ram"


class DecodedImages:
    """The resized uint8 images, one flat buffer plus offsets and (3, H, W) shapes.

    A `disk` store pickles as its file name (loader workers map the file themselves); a `ram` store is an
    ordinary numpy buffer, which forked workers share copy-on-write without copying.
    """

    def __init__(self, offsets: np.ndarray, shapes: np.ndarray, data: np.ndarray | None, file: Path | None) -> None:
        self.offsets, self.shapes, self._data, self.file = offsets, shapes, data, file
        self.mode = "ram" if file is None else "disk"

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            self._data = np.memmap(self.file, dtype=np.uint8, mode="r")
        return self._data

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        if self.file is not None:
            state["_data"] = None
        return state

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> tv_tensors.Image:
        """Image `index` as a (3, H, W) uint8 tensor with channels-last strides, a copy of the stored bytes."""
        (channels, height, width), start = self.shapes[index], int(self.offsets[index])
        pixels = np.array(self.data[start : start + channels * height * width]).reshape(height, width, channels)
        return tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shapes, axis=1).sum())


def _fill(
    buffer: np.ndarray, offsets: np.ndarray, shapes: np.ndarray, files: Sequence[Path], resize: v2.Resize, threads: int
) -> None:
    """Decode and resize every file into its slot; threads overlap, since Pillow and torch release the GIL."""

    def one(i: int) -> None:
        pixels = decode_resized(files[i], resize)
        if tuple(pixels.shape) != tuple(shapes[i]):  # the header promised another size (e.g. a broken file)
            raise UserError(
                f"{files[i]} decodes to {tuple(pixels.shape[1:])} pixels, not the size its header gives; "
                f"re-save the image"
            )
        buffer[offsets[i] : offsets[i] + pixels.numel()] = pixels.permute(1, 2, 0).reshape(-1).numpy()

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(one, range(len(files))))


def _layout(files: Sequence[Path], resize_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, shapes) of every image after the resize, read from the file headers without decoding."""
    shapes = np.empty((len(files), 3), dtype=np.int64)
    for i, file in enumerate(files):
        with Image.open(file) as image:
            width, height = image.size
            if image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8):  # load_image turns it a quarter
                width, height = height, width
            shapes[i] = (3, *resized_shape(width, height, resize_size))
    sizes = np.prod(shapes, axis=1)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return offsets, shapes


def _open_disk(stem: Path) -> DecodedImages | None:
    """A whole store written by this format, or None."""
    index, file = stem.with_suffix(".index.npz"), stem.with_suffix(".u8")
    try:
        with np.load(index, allow_pickle=False) as saved:
            if int(saved["format"]) != DECODE_FORMAT:
                return None
            offsets, shapes = saved["offsets"], saved["shapes"]
    except (OSError, ValueError, KeyError):
        return None
    store = DecodedImages(offsets, shapes, None, file)
    return store if file.is_file() and file.stat().st_size == store.nbytes else None


def _write_disk(
    stem: Path, offsets: np.ndarray, shapes: np.ndarray, files: Sequence[Path], resize: v2.Resize, threads: int
) -> None:
    """Write the data file and then its index, each through a temporary name and a rename."""
    total = int(np.prod(shapes, axis=1).sum())
    fd, tmp = tempfile.mkstemp(dir=stem.parent, prefix=f".{stem.name}.", suffix=".tmp")
    os.close(fd)
    try:
        buffer = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(max(total, 1),))
        _fill(buffer, offsets, shapes, files, resize, threads)
        buffer.flush()
        del buffer
        os.truncate(tmp, total)
        os.replace(tmp, stem.with_suffix(".u8"))
        fd, tmp = tempfile.mkstemp(dir=stem.parent, prefix=f".{stem.name}.", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, format=np.int64(DECODE_FORMAT), offsets=offsets, shapes=shapes)
        os.replace(tmp, stem.with_suffix(".index.npz"))
    finally:
        Path(tmp).unlink(missing_ok=True)


def build_store(
    mode: str,
    root: Path,
    paths: Sequence[str],
    resize: v2.Resize,
    cache_dir: Path,
    num_workers: int = 0,
    ram_budget: int | None = None,
) -> tuple[DecodedImages, int]:
    """(store, images decoded now): item i is `root/paths[i]` decoded and resized by `resize`.

    `ram` falls back to `disk` where `choose_mode` says so; `disk` reuses a store of the same images and key.
    The decoding runs in `max(1, num_workers)` threads of this process, before any loader worker starts.
    """
    from src import file_memo
    from src.features import entry_folder

    if mode not in ("ram", "disk"):
        raise UserError(f"data.decode_cache={mode} is not one of {', '.join(CHOICES)}")
    if not isinstance(resize.size, Sequence) or len(resize.size) != 1:
        raise UserError(f"the decoded-image store needs a resize of the shorter side, not {resize.size}")
    files = [Path(root) / p for p in paths]
    start = time.perf_counter()
    offsets, shapes = _layout(files, resize.size[0])
    needed = int(np.prod(shapes, axis=1).sum())
    mode = choose_mode(mode, needed, num_workers, ram_budget)
    if mode == "ram":
        buffer = np.empty(needed, dtype=np.uint8)
        _fill(buffer, offsets, shapes, files, resize, num_workers)
        store, decoded = DecodedImages(offsets, shapes, buffer, None), len(files)
    else:
        folder = entry_folder(Path(cache_dir) / "decoded", store_key(resize))
        folder.mkdir(parents=True, exist_ok=True)
        images = hashlib.sha256("\n".join(file_memo.sha256(f) for f in files).encode()).hexdigest()[:32]
        stem = folder / images
        with FileLock(folder / ".lock"):
            store, decoded = _open_disk(stem), 0
            if store is None:
                _write_disk(stem, offsets, shapes, files, resize, num_workers)
                store, decoded = _open_disk(stem), len(files)
    log.info(
        "data.decode_cache=%s: %d images, %.1f MB after resize, %d decoded now (%.1f s)%s",
        store.mode,
        len(files),
        needed / 1e6,
        decoded,
        time.perf_counter() - start,
        f", {store.file}" if store.file else "",
    )
    return store, decoded


class StoredImageDataset(Dataset):
    """Rows of a decoded-image store with their targets; `transform` is what follows the resize (crop, flip,
    augmentation) and keeps uint8, so batches stay a quarter of the size of float ones until the model."""

    def __init__(self, store: DecodedImages, rows: Sequence[int], targets: Sequence[int], transform: v2.Transform):
        self.store, self.rows, self.targets, self.transform = store, list(rows), list(targets), transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """A contiguous image, as without the store: a crop without a resize would keep the store's layout."""
        image = self.transform(self.store[self.rows[index]]).as_subclass(torch.Tensor)
        return image.contiguous(), self.targets[index]
