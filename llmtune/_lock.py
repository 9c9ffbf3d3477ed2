"""A lock file that makes a directory one process's, released by the OS if that process dies."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from .errors import CheckpointError

if os.name == "nt":
    import msvcrt
else:
    import fcntl

logger = logging.getLogger("llmtune")

LOCK_FILE = ".lock"


def _try_lock(fd: int, path: Path) -> bool:
    """False when another process holds the lock."""
    if os.name == "nt":  # a byte far past the pid, so that others can still read the pid
        os.lseek(fd, 1 << 20, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:  # ENOLCK: a network file system without locks; refusing all runs helps nobody
        logger.warning("cannot lock %s (%s): make sure no other run uses this directory", path, err)
    return True


def _owner(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 200).decode(errors="replace").strip()


class DirectoryLock:
    """Holds `directory/.lock` (flock on POSIX), which records "pid host" of its holder.

    The OS drops the lock when the holder dies, however it dies: a lock file nobody holds is
    stale and is taken over (logged with the pid it names). Release removes the file.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise CheckpointError naming the process that holds it."""
        if self._fd is not None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd, self.path):
                owner = _owner(fd) or "unknown"
                os.close(fd)
                pid, _, host = owner.partition(" ")
                raise CheckpointError(
                    f"{self.path.parent} is in use by pid {pid}"
                    f"{f' on {host}' if host and host != socket.gethostname() else ''}: "
                    "two runs in one checkpoint directory would delete and overwrite each other's "
                    "checkpoints. Wait for it to end, or use another directory. If no such process "
                    f"runs, delete {self.path}."
                )
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # its holder released (removed) the file between our open and lock: again
        previous = _owner(fd)
        if previous:
            logger.warning(
                "%s: taking over the lock left by pid %s, which no longer holds it (the run died)",
                self.path.parent,
                previous,
            )
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Empty and remove the lock file, then drop the lock (in that order: see `acquire`'s retry)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.ftruncate(fd, 0)  # names nobody: the next taker logs no stale owner
        if os.name != "nt":  # Windows cannot remove an open file; an empty one is harmless
            self.path.unlink(missing_ok=True)
        os.close(fd)
