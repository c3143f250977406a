"""Files that survive crashes and concurrent use: atomic writes, one clear error for a failed write
(a full disk), and exclusive locks for the processes that write a run or a cache."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from pipeline.errors import UserError


# -- atomic writes ---------------------------------------------------------------------------------
def disk_error(path: Path, e: BaseException) -> UserError:
    """One clear error for a failed write: which file, which disk, how much space is left."""
    try:
        free = shutil.disk_usage(Path(path).parent).free
        space = f"{free / 2**20:.0f} MiB free on the disk holding {Path(path).parent.resolve()}"
    except OSError:
        space = f"the disk holding {Path(path).parent} could not be queried"
    full = isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space" in str(e) or free_is_low(path)
    why = "the disk is full" if full else f"{type(e).__name__}: {e}"
    return UserError(f"{path}: could not be written ({why}; {space}). Free some space or write elsewhere; "
                     f"the earlier files are intact.")


def free_is_low(path: Path, need: int = 64 * 2**20) -> bool:
    try:
        return shutil.disk_usage(Path(path).parent).free < need
    except OSError:
        return False


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename over `path`: a crash never leaves a truncated file under the real name,
    and a failed write (a full disk) leaves no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):   # torch.save reports a full disk as RuntimeError
            raise disk_error(path, e) from e
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))


# -- locks -------------------------------------------------------------------------------------
class FileLock:
    """An exclusive, non-blocking flock on a lock file (a run's DIR/.lock, a cache's FILE.lock), held
    while a process writes.

    The kernel drops it when the process dies (even kill -9), so a stale lock never blocks a resume."""

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.fd = Path(path), what, None

    def __enter__(self):
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(f"{self.what} is in use by another process{f' (pid {other})' if other else ''}; "
                            f"wait for it to finish or stop it, then retry.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)   # releases the flock; the file stays (unlinking it would race a new locker)
            self.fd = None


