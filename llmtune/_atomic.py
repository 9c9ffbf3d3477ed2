"""Directories and files written whole or not at all, so a crash never leaves half a checkpoint or model."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import LLMTuneError

TMP = ".tmp-"  # in-progress saves; never matched as checkpoints, removed once their process is gone
TRASH = ".trash-"  # directories being deleted: renamed first, so a half-deleted one never looks whole


def fsync(path: Path) -> None:
    if os.name == "nt" and path.is_dir():  # Windows cannot open directories; NTFS journals renames
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync(Path(folder, name))
        fsync(Path(folder))


def remove(path: Path, name: str | None = None) -> None:
    """Delete directory `path` by renaming it to `.trash-<name>-<pid>` first (name: its own)."""
    trash = path.with_name(f"{TRASH}{name or path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _load_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2); False where the system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # kernel or file system without it
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: assume it lives
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_leftovers(target: Path) -> None:
    """Remove the `.tmp-`/`.trash-` siblings of `target` left by processes that died while saving."""
    for prefix in (TMP, TRASH):
        for path in target.parent.glob(f"{prefix}{target.name}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def write_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Make directory `target` with `write(tmp_dir)`, all or nothing.

    The files go into a hidden sibling directory and are fsync'd with it; the sibling then
    takes `target`'s place and the parent is fsync'd. An existing `target` is swapped out in
    one step (Linux `renameat2(RENAME_EXCHANGE)`), so at every moment `target` is the whole
    old directory or the whole new one; elsewhere it is renamed away just before, a window of
    two renames. A failure in `write` removes the sibling and leaves `target` as it was; an
    I/O failure (a full disk) is raised as an OSError saying so. What a killed process
    leaves (a `.tmp-*` or `.trash-*` sibling) is removed by the next save of the same target.
    """
    target = Path(target)
    real = Path(os.path.realpath(target))  # a symlink keeps pointing at the new directory
    real.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(real)
    tmp = real.with_name(f"{TMP}{real.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        from safetensors import SafetensorError

        # I/O failures only; torch and safetensors report a full disk in their own words
        # ("unexpected pos ..."). Anything else (llmtune's errors, a bug) passes unchanged.
        if not isinstance(err, OSError | RuntimeError | SafetensorError) or isinstance(err, LLMTuneError):
            raise
        free = shutil.disk_usage(real.parent).free / 1e6
        raise OSError(
            f"{target}: writing failed ({type(err).__name__}: {err}); {target.name} is unchanged. "
            f"{free:.1f} MB are free on its disk: if it is full, make room and save again."
        ) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if real.exists() and _exchange(tmp, real):
            remove(tmp, real.name)  # now the old directory
        else:
            if real.exists():  # the same step saved again (e.g. a resumed run): the new one wins
                remove(real)
            os.rename(tmp, real)
        fsync(real.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def foreign_files(directory: Path, record: str, files: list[str]) -> list[str]:
    """The names in `directory` that the directory's writer did not put there (notes, a card).

    The JSON file `record` of the earlier write lists its files under "files"; without one (an
    older llmtune, or another tool), the `files` this write makes are taken for the writer's.
    `write_atomically` replaces the directory whole, so these would be deleted.
    """
    if not directory.is_dir():
        return []
    try:
        ours = set(json.loads((directory / record).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        ours = set(files)
    return sorted(p.name for p in directory.iterdir() if p.name not in ours)


def write_file_atomically(path: Path, text: str) -> None:
    """Replace a small text file so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f"{TMP}{path.name}-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)
