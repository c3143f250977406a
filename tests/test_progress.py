"""Training progress lines: the epoch's and the run's remaining time from the measured pace."""
from __future__ import annotations

import math

from pipeline.training import progress
from pipeline.training.progress import EpochProgress, fmt_duration


def test_fmt_duration():
    assert fmt_duration(7) == "7s"
    assert fmt_duration(95) == "1m35s"
    assert fmt_duration(3725) == "1h02m"
    assert fmt_duration(math.nan) == "?"


def test_log_lines_give_the_epoch_and_run_eta(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    lines = []
    # resumed at batch 20 of 100, two more epochs after this one, validation takes 30 s
    m = EpochProgress(epoch=3, total=100, done=20, epochs_after=2, val_s=30.0, deadline=math.inf,
                      log_every=10, echo=lines.append, tty=False)
    for step in range(21, 31):          # 10 batches at 2 s each
        clock[0] += 2.0
        m.step(step, 1.5, 1.25) if step == 30 else m.step(step)
    assert m.seconds_per_batch() == 2.0
    epoch_left, run_left = m.etas()
    assert epoch_left == 70 * 2.0 + 30.0                    # 70 batches + one validation
    assert run_left == epoch_left + 2 * (100 * 2.0 + 30.0)  # two whole epochs more
    assert lines == ["epoch 3 batch 30/100 step 30 loss 1.500 nll 1.250 | epoch ETA 2m50s, run ETA 10m30s "
                     "(0.50 batches/s)"]


def test_the_deadline_caps_the_run_eta(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    m = EpochProgress(epoch=1, total=10, done=0, epochs_after=5, val_s=0.0, deadline=100.0, log_every=1,
                      echo=lambda s: None, tty=False)
    clock[0] = 10.0
    m.step(1)
    assert m.etas() == (90.0, 90.0)     # 9 batches at 10 s; the deadline is 90 s away, before 5 more epochs
