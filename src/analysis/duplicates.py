"""Leakage audit: exact duplicates (same file bytes) and near-duplicates (perceptual hash) among the training
images, and between training and test images.

A duplicate pair split across folds puts one picture in a fold's training and validation images; a pair shared
by train and test does the same to the test score. Both inflate every score, so the audit lists the pairs in
`duplicates.csv`, warns once, and `duplicate_groups` turns them into groups that `data.groups=auto` keeps in one
fold (StratifiedGroupKFold).

Each image is hashed once: the sha256 of its bytes and a 64-bit pHash (imagehash: the signs, around their median,
of the 8x8 lowest DCT frequencies of a 32x32 grey thumbnail), decoded at reduced size where the format allows it
(JPEG draft). The pHash of a file is cached under its sha256. Pairs come from the bit count of the XOR of the
hashes, in numpy blocks: every pair of 20,000 images in about a second.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from src import file_memo
from src.data import ImageFolder, scan_image_folder, to_rgb
from src.errors import UserError, warn_once
from src.evaluation import write_csv

log = logging.getLogger(__name__)

HASH_VERSION = "phash8-v1"  # part of the cache file's name: a change of hashing never reads old entries
BLOCK_ENTRIES = 1 << 22  # hash pairs compared at once: 32 MiB of XORs
COLUMNS = (
    "path_a",
    "path_b",
    "kind",
    "distance",
    "where",
    "class_a",
    "class_b",
    "fold_a",
    "fold_b",
    "split_across_folds",
)


@dataclass(frozen=True)
class Hashes:
    """sha256 (hex) and 64-bit pHash of each image, in the order of the paths they were made from."""

    sha256: list[str]
    phash: np.ndarray


@dataclass(frozen=True)
class Pair:
    """Two duplicate images by index: `a` in the training images, `b` in the training or the test images."""

    a: int
    b: int
    kind: str  # exact | near
    distance: int  # Hamming distance of the pHashes (0 for exact duplicates)
    where: str  # train-train | train-test


@dataclass(frozen=True)
class Audit:
    """What the audit found, and where it wrote the pairs."""

    exact: int
    near: int
    split_across_folds: int
    train_test: int
    csv: Path

    @property
    def pairs(self) -> int:
        return self.exact + self.near


def check_distance(max_distance: int) -> int:
    """The pHash Hamming distance up to which two images are near-duplicates: a whole number in [0, 64)."""
    if isinstance(max_distance, bool) or not isinstance(max_distance, int) or not 0 <= max_distance < 64:
        raise UserError(
            f"data.near_duplicate_distance={max_distance} must be a whole number from 0 to 63 "
            f"(bits of a 64-bit perceptual hash; 4 finds re-encoded, resized and retouched copies)"
        )
    return max_distance


def _phash(data: bytes) -> int:
    """pHash of an encoded image as an int; JPEGs decode at 1/2 to 1/8 scale, as the hash needs 32x32 only."""
    import imagehash

    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (64, 64))
        image.load()
        rgb = to_rgb(image)
    bits = imagehash.phash(rgb).hash.ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _cache_file(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / f"image_hashes_{HASH_VERSION}.json"


def _read_cache(file: Path) -> dict[str, str]:
    """sha256 -> pHash (16 hex digits); a missing or damaged file, or entry, is only a cache miss."""
    try:
        entries = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{16}", v)}


def _write_cache(file: Path, new: dict[str, str]) -> None:
    """Add entries under a temporary name and rename: parallel jobs never read half a file (last writer wins)."""
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        entries = {**_read_cache(file), **new}
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, separators=(",", ":"))
        os.replace(tmp, file)
    except OSError as err:  # a read-only cache folder costs time on the next run, nothing else
        log.info("could not write the image hash cache %s: %s", file, err)
        if tmp:
            Path(tmp).unlink(missing_ok=True)


def hash_images(root: str | Path, paths: Sequence[str], cache_dir: str | Path | None = None) -> Hashes:
    """Read each file once: its sha256, and its pHash from the cache or by decoding it."""
    cache = _read_cache(_cache_file(cache_dir)) if cache_dir else {}
    new: dict[str, str] = {}
    shas, hashes = [], np.empty(len(paths), dtype=np.uint64)
    for i, path in enumerate(paths):
        sha = file_memo.sha256(Path(root) / path)
        value = cache.get(sha) or new.get(sha)
        if value is None:
            value = new[sha] = f"{_phash((Path(root) / path).read_bytes()):016x}"
        shas.append(sha)
        hashes[i] = int(value, 16)
    if cache_dir and new:
        _write_cache(_cache_file(cache_dir), new)
    return Hashes(shas, hashes)


def close_pairs(a: np.ndarray, b: np.ndarray | None, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) of every pair of hashes at most `max_distance` bits apart: i in `a`, j in `b`, or i < j
    both in `a` when `b` is None."""
    same = b is None
    b = a if same else b
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    block = max(1, BLOCK_ENTRIES // max(1, len(b)))
    for start in range(0, len(a), block):
        offset = start if same else 0  # pairs below the diagonal are the same pairs again
        distances = np.bitwise_count(a[start : start + block, None] ^ b[None, offset:])
        i, j = np.nonzero(distances <= max_distance)
        d = distances[i, j]
        i, j = i + start, j + offset
        keep = j > i if same else slice(None)
        found.append((i[keep], j[keep], d[keep]))
    if not found:
        return (np.empty(0, dtype=np.int64),) * 2 + (np.empty(0, dtype=np.uint8),)
    return tuple(np.concatenate(parts) for parts in zip(*found, strict=True))


def find_pairs(train: Hashes, max_distance: int, test: Hashes | None = None) -> list[Pair]:
    """Exact (same sha256) and near (pHash within `max_distance`) pairs within train and between train and test."""
    check_distance(max_distance)
    pairs = []
    for where, other in [("train-train", None)] + ([("train-test", test)] if test is not None else []):
        i, j, d = close_pairs(train.phash, None if other is None else other.phash, max_distance)
        other_sha = train.sha256 if other is None else other.sha256
        for a, b, distance in zip(i.tolist(), j.tolist(), d.tolist(), strict=True):
            exact = train.sha256[a] == other_sha[b]
            pairs.append(Pair(a, b, "exact" if exact else "near", 0 if exact else distance, where))
    return pairs


def components(n: int, pairs: Sequence[Pair]) -> np.ndarray:
    """Group label of each of `n` training images: connected components of the train-train pairs."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    inside = [(p.a, p.b) for p in pairs if p.where == "train-train"]
    rows = np.asarray([a for a, _ in inside], dtype=np.int64)
    cols = np.asarray([b for _, b in inside], dtype=np.int64)
    graph = coo_matrix((np.ones(len(inside)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def duplicate_groups(images: ImageFolder, max_distance: int, cache_dir: str | Path | None = None) -> np.ndarray:
    """`data.groups=auto`: each training image's group, exact and near-duplicates joined transitively."""
    pairs = find_pairs(hash_images(images.root, images.paths, cache_dir), max_distance)
    return components(len(images.paths), pairs)


def _test_images(test_dir: str | Path | None) -> ImageFolder | None:
    """The test ImageFolder if there is a usable one; the audit never stops training over the test folder."""
    if not test_dir or not Path(test_dir).is_dir():
        return None
    try:
        return scan_image_folder(test_dir, "data.test_dir")
    except UserError as err:
        log.info("duplicate audit: leaving out data.test_dir (%s)", err)
        return None


def duplicate_rows(
    pairs: Sequence[Pair], train: ImageFolder, folds: np.ndarray | None, test: ImageFolder | None = None
) -> list[dict[str, object]]:
    """One row per pair; paths are relative to data.train_dir (path_a, and path_b of train-train pairs) or to
    data.test_dir (path_b of train-test pairs)."""
    rows = []
    for p in pairs:
        other = train if p.where == "train-train" else test
        fold_a = int(folds[p.a]) if folds is not None else ""
        fold_b = int(folds[p.b]) if folds is not None and p.where == "train-train" else ""
        rows.append(
            {
                "path_a": train.paths[p.a],
                "path_b": other.paths[p.b],
                "kind": p.kind,
                "distance": p.distance,
                "where": p.where,
                "class_a": train.classes[train.targets[p.a]],
                "class_b": other.classes[other.targets[p.b]],
                "fold_a": fold_a,
                "fold_b": fold_b,
                "split_across_folds": "" if fold_b == "" else str(fold_a != fold_b).lower(),
            }
        )
    return rows


def summary(audit: Audit) -> str:
    """One line: the counts, why they matter and what to do."""
    if not audit.pairs:
        return "duplicate audit: no exact or near-duplicate images in data.train_dir or shared with data.test_dir"
    inside = audit.pairs - audit.train_test
    line = (
        f"duplicate audit: {audit.exact} exact and {audit.near} near-duplicate image pairs "
        f"({inside} within data.train_dir, {audit.split_across_folds} of them split across folds; "
        f"{audit.train_test} shared with data.test_dir); see {audit.csv}"
    )
    advice = []
    if audit.split_across_folds:
        advice.append("data.groups=auto keeps each group of duplicates in one fold")
    if audit.train_test:
        advice.append("review the train-test rows and remove true copies from data.test_dir")
    if advice:
        line += f". They inflate validation and test scores: {'; '.join(advice)}"
    return line


def audit_duplicates(
    images: ImageFolder,
    folds: np.ndarray | None,
    test_dir: str | Path | None,
    out_dir: str | Path,
    max_distance: int = 4,
    cache_dir: str | Path | None = None,
) -> Audit:
    """Hash the training (and test) images, write `<out_dir>/duplicates.csv` and log one line: a warning when
    a pair is split across folds or shared with the test set, else information."""
    check_distance(max_distance)
    test = _test_images(test_dir)
    train_hashes = hash_images(images.root, images.paths, cache_dir)
    test_hashes = hash_images(test.root, test.paths, cache_dir) if test else None
    pairs = find_pairs(train_hashes, max_distance, test_hashes)
    rows = duplicate_rows(pairs, images, folds, test)
    audit = Audit(
        exact=sum(p.kind == "exact" for p in pairs),
        near=sum(p.kind == "near" for p in pairs),
        split_across_folds=sum(r["split_across_folds"] == "true" for r in rows),
        train_test=sum(p.where == "train-test" for p in pairs),
        csv=write_csv(rows, Path(out_dir) / "duplicates.csv", COLUMNS),
    )
    if audit.split_across_folds or audit.train_test:
        warn_once(log, summary(audit), key=summary(replace(audit, csv=Path("duplicates.csv"))))
    else:
        log.info(summary(audit))
    return audit
