"""What is already known about files: their sha256, and that they are readable images.

Every job reads the same data folder: the scan checks that each image decodes (a partial decode, 4 ms for a
1024x768 JPEG), and the data version, the feature cache and the duplicate audit each identify an image by its
sha256. A fact is kept while the file's size, modification and change times, inode and device stay the same
(what git's index and DVC's state database compare); like git, not for a file changed in the last 2 s, which a
rewrite within the file system's timestamp granularity could change unseen.

Facts live in this process, and with `use_store(folder)` also in `<folder>/file_facts.json`, where later
processes (a single-fold run, a launcher's job) find them. Only good news is stored there: an unreadable
file is checked again by every process, since a newer Pillow or a plugin may read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
RACY_NS = 2_000_000_000
STORE_FILE = "file_facts.json"
FORMAT = 1
STORED = ("sha256", "readable_image")  # the kinds of fact save() writes (JSON values)

_facts: dict[str, tuple[tuple[int, ...], Any]] = {}  # "<kind>\0<absolute path>" -> (stamp, value)
_new: set[str] = set()  # facts the store does not have yet
_store: Path | None = None


def remembered(path: str | Path, kind: str, compute: Callable[[Path], T]) -> T:
    """`compute(path)`, or what it returned for this very file before (the `kind` of fact keeps facts apart)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return compute(path)  # its own error, or its own answer for a missing file
    stamp = (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev)
    key = f"{kind}\0{os.path.abspath(path)}"
    known = _facts.get(key)
    if known is not None and known[0] == stamp:
        return known[1]
    value = compute(path)
    if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > RACY_NS:
        _facts[key] = (stamp, value)
        if kind in STORED and value is not False:
            _new.add(key)
    return value


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (hex): the identity of an image, whatever its name or folder."""
    return remembered(path, "sha256", _sha256)


def _read(file: Path) -> dict[str, tuple[tuple[int, ...], Any]]:
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        return {}  # another version's store: ignored, rewritten by the next save()
    return {key: (tuple(stamp), value) for key, (stamp, value) in saved.get("facts", {}).items()}


def use_store(folder: str | Path | None) -> None:
    """Keep facts in `<folder>/file_facts.json` too: read it now, add to it with save()."""
    global _store
    if folder is None or (_store is not None and _store == Path(folder) / STORE_FILE):
        return
    _store = Path(folder) / STORE_FILE
    for key, fact in _read(_store).items():
        _facts.setdefault(key, fact)


def save() -> None:
    """Add this process's new facts to the store (merged with what is there; among parallel writers the last
    one's additions win, and the others' are found again later). Facts about files that are gone (deleted,
    renamed, another data folder's) leave the store then, so it does not grow with every file ever seen; a
    process with nothing new writes nothing."""
    if _store is None or not _new:
        return
    tmp = None
    try:
        _store.parent.mkdir(parents=True, exist_ok=True)
        kept = {key: fact for key, fact in _read(_store).items() if os.path.exists(key.partition("\0")[2])}
        facts = {**kept, **{key: _facts[key] for key in _new}}
        fd, tmp = tempfile.mkstemp(dir=_store.parent, prefix=f".{_store.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, "facts": facts}, f, separators=(",", ":"))
        os.replace(tmp, _store)
        _new.clear()
    except OSError as err:  # a read-only cache folder costs time in the next process, nothing else
        log.info("could not write %s: %s", _store, err)
        if tmp:
            Path(tmp).unlink(missing_ok=True)
