"""The extraction's writer thread: finished batches -> /features rows (and their picture records), then
/done for those rows, so the backbone never waits on HDF5 and a crash never marks unwritten rows done.

Resumable: rows with /done set are skipped by the next extraction, so a killed run (even kill -9)
continues where it stopped; at most FLUSH_EVERY_S of finished work is lost. An exception or Ctrl-C in the main
thread closes the writer (extract._write_queued), so what was queued is written and marked done first.
"""
from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.cache import layout
from pipeline.cache.layout import runs_of

FLUSH_EVERY_S = 10.0      # at most this much finished work is lost on a crash


class WriterFailed(Exception):
    """The writer thread's error (a full disk), raised in the main thread by `put` or `close`."""

    def __init__(self, error: BaseException):
        super().__init__(f"the extraction writer failed: {type(error).__name__}: {error}")
        self.error = error


class Writer(threading.Thread):
    """Writes finished batches on a background thread so the backbone never waits on HDF5.

    Order per flush: features (and bad flags) are written and flushed first, then /done for those rows,
    then flushed again; a crash in between only loses rows, it never marks unwritten rows done.
    If the writer fails (a full disk), `put` raises its error at once instead of blocking on the full
    queue, and the rows it had finished writing are still marked done (best effort).
    """

    POLL_S = 0.2

    def __init__(self, path: Path, dtype: str):
        super().__init__(daemon=True)
        self.path, self.dtype = path, np.dtype(dtype)
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def _send(self, item) -> None:
        while True:
            if self.error is not None:
                raise WriterFailed(self.error)
            if not self.is_alive():
                raise RuntimeError("the extraction writer thread stopped")
            try:
                self.q.put(item, timeout=self.POLL_S)
                return
            except queue.Full:
                continue

    def put(self, rows: np.ndarray, feats: np.ndarray | None, bad: np.ndarray, flipped: np.ndarray | None = None,
            pictures: Sequence | None = None):
        # flipped: the rows' hflip view (extract --flip); pictures: the identity.Picture each row was read from
        self._send((rows, feats, bad, flipped, pictures))

    def close(self):
        """Write what is queued, commit, stop; raises the writer's error."""
        if self.is_alive():
            self._send(None)
            self.join()
        if self.error is not None:
            raise WriterFailed(self.error)

    def abort(self):
        """Stop without writing what is still queued (an error is propagating); never raises."""
        self.stopping.set()
        self.join(timeout=60)

    def run(self):
        try:
            with layout.open_unbuffered(self.path) as f:    # a failed write fails at once, never at close
                feats_d, done_d, bad_d = f["features"], f["done"], f["bad"]
                pending: list[np.ndarray] = []
                last = time.monotonic()
                try:
                    while not self.stopping.is_set():
                        try:
                            item = self.q.get(timeout=self.POLL_S)
                        except queue.Empty:
                            continue
                        if item is None:
                            break
                        rows, feats, bad, flipped, pictures = item  # rows (B,), feats (B, L, C) stored dtype, bad (B,)
                        write_rows(feats_d, rows, feats.astype(self.dtype, copy=False))
                        if flipped is not None:             # both views before the rows are marked done
                            write_rows(f["features_hflip"], rows, flipped.astype(self.dtype, copy=False))
                        if pictures is not None:            # which file each row was computed from
                            layout.write_pictures(f, rows, pictures)
                        for a, b in runs_of(rows):      # set and clear: a retried image may now be fine
                            r0 = int(rows[a])
                            if bad[a:b].any() or bad_d[r0:r0 + (b - a)].any():
                                bad_d[r0:r0 + (b - a)] = bad[a:b]
                        pending.append(rows)
                        if time.monotonic() - last >= FLUSH_EVERY_S:
                            self._commit(f, done_d, pending)
                            pending, last = [], time.monotonic()
                except BaseException:
                    try:                                # rows fully written before a failure stay done
                        self._commit(f, done_d, pending)
                    except Exception:   # noqa: BLE001 - the first error is the one to report
                        pass
                    raise
                self._commit(f, done_d, pending)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            self.error = e

    @staticmethod
    def _commit(f, done_d, pending):
        if not pending:
            return
        f.flush()                                   # features on disk first ...
        write_mask(done_d, np.sort(np.concatenate(pending)))
        f.flush()                                   # ... then the done mask
        pending.clear()


def write_rows(d, rows: np.ndarray, feats: np.ndarray):
    for a, b in runs_of(rows):                      # contiguous slices: one HDF5 write per run
        d[int(rows[a]):int(rows[a]) + (b - a)] = feats[a:b]


def write_mask(d, rows: np.ndarray):
    for a, b in runs_of(rows):
        d[int(rows[a]):int(rows[a]) + (b - a)] = True
