"""An ordered two-stage prefetcher: `read(job)` on a pool of threads, `finish(result)` on one thread in job
order, the consumer iterating the finished results. Extraction's GPU input path uses it (reading files on
the pool, decoding and preprocessing on the device in the finishing thread); it knows nothing of images.

    jobs ──pool of `threads` (up to `ahead` jobs in flight)──▶ read(job)
         ──one thread, in job order──▶ finish(read result) ──queue of `depth`──▶ consumer (next())

An error raised by `read` or `finish` is raised by the consumer's next `next()`, after which the iterator
is closed. `close()` (or leaving the `with` block) stops both stages; results not yet taken are dropped.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

_DONE = object()


class Prefetcher:
    """Iterator over finish(read(job)) for `jobs` in order, computed ahead on threads."""

    def __init__(self, jobs: Iterable, read: Callable, finish: Callable = lambda r: r, *, threads: int = 1,
                 ahead: int | None = None, depth: int = 2, setup: Callable[[], None] | None = None,
                 name: str = "prefetch"):
        self.threads = max(1, int(threads))
        self._jobs, self._read, self._finish, self._setup = iter(jobs), read, finish, setup
        self._ahead = max(1, int(ahead if ahead is not None else self.threads + 1))
        self._stop = threading.Event()
        self._q: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=f"{name}-read")
        self._thread = threading.Thread(target=self._loop, name=f"{name}-finish", daemon=True)
        self._finished = False
        self._thread.start()

    # -- consumer side -----------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        item = self._q.get()
        if item is _DONE:
            self.close()
            raise StopIteration
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        """Stop both stages (idempotent); results not yet taken are dropped."""
        self._finished = True
        self._stop.set()
        while True:                      # unblock a finishing thread waiting on a full queue
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:   # noqa: BLE001 - interpreter shutdown
            pass

    # -- the finishing thread ----------------------------------------------------------------------
    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _submit(self, futures: list) -> None:
        job = next(self._jobs, _DONE)
        if job is not _DONE:
            futures.append(self._pool.submit(self._read, job))

    def _loop(self) -> None:
        try:
            if self._setup is not None:
                self._setup()
            futures: list = []
            for _ in range(self._ahead):
                self._submit(futures)
            while futures and not self._stop.is_set():
                result = futures.pop(0).result()
                self._submit(futures)
                if not self._put(self._finish(result)):
                    return
            self._put(_DONE)
        except BaseException as e:   # noqa: BLE001 - handed to the consumer
            self._put(_Failed(e))


class _Failed:
    """An error of either stage, on its way to the consumer (a result may itself be an exception object)."""

    def __init__(self, error: BaseException):
        self.error = error
