"""The compute a training run cost (issue 18 part 4): per epoch in the history (log.jsonl) and in total
in the checkpoint.

    history row  wall_s, cpu_s, gpu_s            that epoch: its batches, its validation, its checkpoint
                 compute_partial: true           only part of the epoch was counted (see below)
    checkpoint   compute = {wall_s, cpu_s, gpu_s[, unknown_before: {epoch, batch}]}   the run, all sessions

train.py laps a provenance.ComputeMeter at the end of each epoch and when it stops mid-epoch; the
setup (reading the cache) counts toward the first lap. Under DDP the CPU and GPU seconds are summed
over the ranks. A checkpoint written before compute was recorded keeps resuming: it counts from the
resume, `unknown_before` says from where, and the epoch resumed mid-way is marked `compute_partial`.
"""
from __future__ import annotations

import torch

from pipeline import distributed as dist_mod
from pipeline.provenance import COMPUTE_KEYS, ComputeMeter, energy_kwh


def lap(meter: ComputeMeter, device: torch.device) -> dict:
    """The compute since the last lap; CPU and GPU seconds summed over the ranks (a collective under DDP)."""
    out = meter.lap()
    if dist_mod.current().distributed:
        t = dist_mod.all_reduce_sum_(torch.tensor([out["cpu_s"], out["gpu_s"]], dtype=torch.float64, device=device))
        out["cpu_s"], out["gpu_s"] = t.tolist()
    return out


def restore(ckpt: dict) -> tuple[dict, dict]:
    """(epoch_acc, run total) of a checkpoint; one that predates compute recording counts from its position."""
    acc, total = dict(ckpt["epoch_acc"]), ckpt.get("compute")
    if total is None:
        started = ckpt["epoch"] > 0 or ckpt["batch_in_epoch"] > 0
        total = {"unknown_before": {"epoch": ckpt["epoch"] + 1, "batch": ckpt["batch_in_epoch"]}} if started else {}
        acc.update({k: 0.0 for k in COMPUTE_KEYS}, compute_partial=ckpt["batch_in_epoch"] > 0)
    return acc, total


def summary(c: dict) -> str:
    """'compute so far: 12.3 min wall, 0.41 CPU h[, 0.20 GPU h], ~0.0026 kWh[ (not counted before epoch 3)]'
    (kWh: provenance.energy_kwh, an estimate)."""
    return (f"compute so far: {c.get('wall_s', 0) / 60:.1f} min wall, {c.get('cpu_s', 0) / 3600:.2f} CPU h"
            + (f", {c['gpu_s'] / 3600:.2f} GPU h" if c.get("gpu_s") else "")
            + f", ~{energy_kwh(dict(c, cpu_s=c.get('cpu_s', 0))):.2g} kWh"
            + (f" (not counted before epoch {c['unknown_before']['epoch']})" if c.get("unknown_before") else ""))
