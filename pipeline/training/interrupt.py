"""Stop a training run cleanly on Ctrl-C (SIGINT) or SIGTERM: finish the step, checkpoint, exit.

A long run killed mid-epoch used to lose the epoch's steps since the last checkpoint (last.pt is written at
epoch ends and by --max-minutes). Inside `StopRequest`, the first SIGINT or SIGTERM only sets a flag: the
loop (train.train_one_epoch) sees it after the current step, writes last.pt mid-epoch as --max-minutes does,
and returns; `--resume` then continues bit-exactly. A signal during validation lets validation finish and
the epoch's checkpoint be written first. A second signal stops at once (the previous handler runs: Ctrl-C
raises KeyboardInterrupt), keeping whatever checkpoint is on disk. Handlers can only be set from the main
thread; elsewhere (a test's worker thread) `StopRequest` does nothing.
"""
from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
SIGNAL_NAMES = tuple(s.name for s in SIGNALS)       # the stop reasons train() reports for them


class StopRequest:
    """Context manager: `.signal` is None until SIGINT/SIGTERM arrives, then its name ("SIGINT")."""

    def __init__(self, stream=None):
        self.signal: str | None = None
        self._previous: dict[int, object] = {}
        self._stream = stream

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:                  # the second one: stop now, as without this handler
            previous = self._previous.get(signum)
            self.__exit__()
            if callable(previous):
                previous(signum, frame)
                return
            if previous == signal.SIG_DFL:
                signal.raise_signal(signum)
            return
        self.signal = name
        (self._stream or sys.stderr).write(
            f"\n{name}: the run stops after this step (or after validation) and saves last.pt; "
            f"--resume continues it exactly. Send it again to stop at once.\n")


def exit_code(stop: str) -> int:
    """The shell's code for death by the signal a run stopped on (128 + its number; 0 for other stops)."""
    return 128 + int(signal.Signals[stop]) if stop in SIGNAL_NAMES else 0
