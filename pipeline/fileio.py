"""Files that survive crashes, concurrent use and careless hands: atomic writes, one clear error for a
failed write (a full disk), exclusive locks for the processes that write a run or a cache, folders the
project may write into (`is_own_dir`), and tensors read without running code (`torch_load`)."""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
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
    and a failed write (a full disk) leaves no temporary file behind. Nothing is written through a
    symbolic link: the temporary is created afresh (`fresh_file`), and the rename replaces a link at
    `path` itself, never its target."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fresh_file(tmp)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):   # torch.save reports a full disk as RuntimeError
            raise disk_error(path, e) from e
        raise


def fresh_file(path: Path) -> None:
    """Make `path` a new, empty regular file of this process. Whatever had the name (a stale temporary,
    a symbolic link planted in a run or cache folder) is removed first, which never touches a link's
    target, and the file is created with O_EXCL | O_NOFOLLOW: it cannot be a link, nor someone else's."""
    path = Path(path)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))


# -- folders the project owns ----------------------------------------------------------------------
def is_own_dir(path: Path, marker: str) -> bool:
    """Whether the project may write into (or replace) the folder `path`: it does not exist yet, is empty,
    or holds `marker`, the file the project leaves in each folder it makes (a regular file: a link to one
    does not count). A user's folder holding files of the same names as the project's is none of these."""
    path = Path(path)
    if path.is_symlink() and not path.exists():       # a dangling link: writing would create its target
        return False
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    mark = path / marker
    return not any(path.iterdir()) or (mark.is_file() and not mark.is_symlink())


# -- tensors, read without running code --------------------------------------------------------------
def torch_load(path: Path, what: str, *, mmap: bool = False):
    """torch.load(weights_only=True) of a file the project wrote (tensors and plain values only). A file
    that holds anything else (a pickled object: code that would run when loaded) is one UserError saying
    it is not a `what` of this project and is not loaded, instead of torch's advice to load it unsafely.
    mmap: map the tensors instead of reading them (cheap to inspect); a file of the old torch format is
    then read in full."""
    import torch
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not (mmap and "mmap" in str(e)):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e).split("WeightsUnpickler error:", 1)[-1]      # torch's reason, without its advice
        parts = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
        why = next((p for p in parts if p and "weights_only" not in p and "torch.load" not in p), "not tensors only")
        why = why.split(". Please")[0].rstrip(".")
        raise UserError(f"{path}: cannot read {what} ({why}). It is not a {what} this project wrote (those hold "
                        f"only tensors and plain values): another program's file, or a damaged or edited one. It is "
                        f"not loaded, as loading it could run code it carries; restore it from where it came, or "
                        f"remove it.") from None


# -- locks -------------------------------------------------------------------------------------
_HELD: set[int] = set()    # descriptors of the locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (DataLoader workers, decoding processes): close the lock descriptors inherited
    from the parent. An flock belongs to the open file, which a child's copy keeps open: a worker that
    outlives a killed parent by a few seconds would keep the run or cache locked, the error naming a
    dead pid. Only close, never LOCK_UN: unlocking would release the parent's lock too."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class FileLock:
    """An exclusive, non-blocking flock on a lock file (a run's DIR/.lock, a cache's FILE.lock), held
    while a process writes.

    The kernel drops it when the process dies (even kill -9), so a stale lock never blocks a resume:
    the descriptor is close-on-exec (os.open's default) and closed in forked children
    (`_drop_inherited_locks`), so no child process keeps it after the locker is gone."""

    def __init__(self, path: Path, what: str, *, remove: bool = False):
        """remove: delete the lock file when released (an extraction's `.<file>.lock`), see __exit__."""
        self.path, self.what, self.fd, self.owner, self.remove = Path(path), what, None, None, remove

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = self._open_locked()
            if _same_file(fd, self.path):   # else its holder removed it while we waited: lock the new one
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd, self.owner = fd, os.getpid()
        _HELD.add(fd)
        return self

    def _open_locked(self) -> int:
        """The lock file, opened without following a link (a planted one is refused) and flocked."""
        import fcntl
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UserError(f"{self.path}: is a symbolic link, not a lock file; nothing is written through "
                                f"a link. Remove it (rm {self.path}) and retry.") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(f"{self.what} is in use by another process{_who(other)}; "
                            f"wait for it to finish or stop it, then retry.") from None
        return fd

    def __exit__(self, *exc):
        if self.fd is not None and self.owner == os.getpid():   # a forked child closed its copy at the fork
            if self.remove and _same_file(self.fd, self.path):
                # unlinked while still locked: a process that opened this file meanwhile gets the lock
                # only after the close below, sees the name gone (`_same_file`) and locks a new file
                self.path.unlink(missing_ok=True)
            _HELD.discard(self.fd)
            os.close(self.fd)   # releases the flock
        self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the open file `fd` (not removed or replaced since it was opened)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    fs = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fs.st_dev, fs.st_ino)


def _who(pid: str) -> str:
    """' (pid N)' for the pid a lock file records, saying so when that process no longer exists."""
    if not pid.isdigit():
        return ""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return f" (pid {pid}, which has exited: a process it started still holds the lock)"
    except (PermissionError, OverflowError):
        pass
    return f" (pid {pid})"
