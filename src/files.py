"""Putting a finished file where another one may be, atomically and without making the file system write it out
first: model files, their hard links, a new MLflow store."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def temporary_name(target: Path, suffix: str = ".tmp") -> Path:
    """A hidden name beside `target` that no other process or job picks: parallel jobs may write the same name."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}{suffix}")


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
    aside = temporary_name(target, ".old")
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


def link(source: Path, target: Path, copy: bool = False) -> None:
    """Make `target` a hard link to `source` (with `copy`, a copy where no link can be made: across file
    systems), made under a temporary name and put in place by replace(). Raises OSError, `target` as it was,
    when that cannot be done."""
    tmp = temporary_name(target)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            if not copy:
                raise
            shutil.copyfile(source, tmp)
        replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
