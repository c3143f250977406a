"""Training progress with an estimate of when the epoch and the run end.

On a terminal: one tqdm line per epoch that updates in place (batches done, loss, the epoch's and
the run's remaining time). Into a log file (stdout not a terminal): a plain line every `log_every`
steps with the same figures, so `tail -f` of a background run tells when it ends.

The run's estimate assumes every remaining epoch is trained (early stopping can end it sooner) and
costs what this process has measured so far: seconds per batch in this epoch, plus the last
validation's seconds per epoch; a --max-minutes deadline caps it.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable


def fmt_duration(seconds: float) -> str:
    """3725 -> '1h02m', 95 -> '1m35s', 7 -> '7s'."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class EpochProgress:
    """Progress of one epoch's batches: `step(loss, nll)` after each optimizer step, `close()` at the end.

    total: batches in the epoch; done: batches already done when this process started it (resume);
    epochs_after: whole epochs still to train after this one; val_s: seconds one validation takes
    (0 when unknown); deadline: time.time() at which --max-minutes stops the run (inf: none).
    """

    def __init__(self, *, epoch: int, total: int, done: int, epochs_after: int, val_s: float, deadline: float,
                 log_every: int, echo: Callable[[str], None], tty: bool | None = None):
        self.epoch, self.total, self.done0, self.done = epoch, total, done, done
        self.epochs_after, self.val_s, self.deadline, self.log_every, self.echo = \
            epochs_after, val_s, deadline, log_every, echo
        self.t0 = time.time()
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.bar = None
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch}", unit="batch", leave=False,
                            dynamic_ncols=True)

    def seconds_per_batch(self) -> float:
        n = self.done - self.done0
        return (time.time() - self.t0) / n if n else math.nan

    def etas(self) -> tuple[float, float]:
        """(seconds left in this epoch, seconds left in the run) at the current pace."""
        spb = self.seconds_per_batch()
        epoch_left = spb * (self.total - self.done) + self.val_s
        run_left = epoch_left + self.epochs_after * (spb * self.total + self.val_s)
        if math.isfinite(self.deadline):
            run_left = min(run_left, max(self.deadline - time.time(), 0.0))
        return epoch_left, run_left

    def step(self, step: int, loss: float | None = None, nll: float | None = None) -> None:
        """One batch done (`step`: the optimizer step count); loss/nll: running means when known."""
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                e, r = self.etas()
                self.bar.set_postfix_str(f"loss {loss:.3f} nll {nll:.3f} | run ETA {fmt_duration(r)}", refresh=False)
        elif step % self.log_every == 0:
            e, r = self.etas()
            figures = f" loss {loss:.3f} nll {nll:.3f}" if loss is not None else ""
            self.echo(f"epoch {self.epoch} batch {self.done}/{self.total} step {step}{figures} | "
                      f"epoch ETA {fmt_duration(e)}, run ETA {fmt_duration(r)} "
                      f"({1 / self.seconds_per_batch():.2f} batches/s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
