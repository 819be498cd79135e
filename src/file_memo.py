"""What this process has already learned about files: their sha256, and whether they are readable images.

Every job of a sweep reads the same data folder: the scan checks that each image decodes, and the data version,
the feature cache and the duplicate audit each identify an image by its sha256. On photos that is a partial
decode and several full reads per image and job. A fact is kept while the file's size, modification and change
times, inode and device stay the same (what git's index compares); like git, not for a file changed in the last
2 s, which a rewrite within the file system's timestamp granularity could change unseen.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
RACY_NS = 2_000_000_000

_facts: dict[tuple[str, str], tuple[tuple[int, ...], object]] = {}


def remembered(path: str | Path, kind: str, compute: Callable[[Path], T]) -> T:
    """`compute(path)`, or what it returned for this very file before (the `kind` of fact keeps facts apart)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return compute(path)  # its own error, or its own answer for a missing file
    stamp = (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev)
    key = (kind, os.path.abspath(path))
    known = _facts.get(key)
    if known is not None and known[0] == stamp:
        return known[1]  # type: ignore[return-value]
    value = compute(path)
    if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > RACY_NS:
        _facts[key] = (stamp, value)
    return value


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (hex): the identity of an image, whatever its name or folder."""
    return remembered(path, "sha256", _sha256)
