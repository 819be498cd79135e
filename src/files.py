"""Putting a finished file where another one may be, without making the file system write it out first."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def replace(new: Path, target: Path) -> None:
    """Give `new` the name `target`, replacing any file there, as os.replace does, but never renaming over it.

    On ext4 a rename that replaces a file first writes out the data of the file renamed (auto_da_alloc): each
    sweep job's 45 MB model file took 32-39 ms to rename over the previous sweep's (strace, 2 CPU cores), and
    with MLflow the next sqlite commit waited for it too. So the old file is moved aside first, both renames go
    to free names, and the old file is removed last. `target` is missing only between the two renames; a crash
    there leaves both files in the folder under their temporary names, nothing lost. A file that another process
    puts at `target` meanwhile is replaced as os.replace would.
    """
    if target.is_dir():
        os.replace(new, target)  # raises, as it would: a folder is never moved aside for a file
        return
    aside = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
    try:
        os.rename(target, aside)
    except FileNotFoundError:
        os.replace(new, target)
        return
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)
        raise
    aside.unlink()
