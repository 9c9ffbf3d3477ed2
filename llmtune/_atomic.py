"""Directories and files written whole or not at all, so a crash never leaves half a checkpoint."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

TMP = ".tmp-"  # in-progress saves; never matched as checkpoints, removed by the next run
TRASH = ".trash-"  # checkpoints being deleted: renamed first, so a half-deleted one never looks whole


def fsync(path: Path) -> None:
    if os.name == "nt" and path.is_dir():  # Windows cannot open directories; NTFS journals renames
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    trash = path.with_name(f"{TRASH}{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def write_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Make directory `target` with `write(tmp_dir)`, all or nothing.

    The files go into a hidden sibling directory, are fsync'd with it, and the directory is
    renamed to `target` (an existing `target` is replaced) and the parent fsync'd. A crash at
    any moment leaves either the old state or the complete new directory, plus perhaps a
    `.tmp-*` directory that `Checkpoint` removes when the next run starts.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{TMP}{target.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        for file in tmp.iterdir():
            fsync(file)
        fsync(tmp)
        if target.exists():  # the same step saved again (e.g. a resumed run): the new one wins
            remove(target)
        os.rename(tmp, target)
        fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_file_atomically(path: Path, text: str) -> None:
    """Replace a small text file so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f"{TMP}{path.name}-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)
