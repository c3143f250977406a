"""The compute an extraction cost, kept in the cache's `compute` attribute (issue 18 part 4).

    compute = {"wall_s", "cpu_s", "gpu_s", "images", "sessions", "devices"}    (JSON, informational)

Summed over the sessions of a resumed extraction: each session that ends (finished, stopped by
`max_batches`, or refused for unreadable images after writing its rows) adds its own
provenance.ComputeMeter figures; one killed (kill -9, Ctrl-C, a full disk) adds nothing. A torchrun
extraction's merged file holds the sum over its shards, with wall_s the slowest shard's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from pipeline.cache import layout
from pipeline.provenance import add_compute


def _write(out: Path, compute: dict) -> None:
    import h5py
    with h5py.File(out, "r+") as f:
        f.attrs["compute"] = json.dumps(compute, sort_keys=True)


def read(path: str | Path) -> dict | None:
    """A cache's `compute` attribute, or None (a cache made before it was recorded)."""
    c = layout.read_attrs(path).get("compute")
    return c if isinstance(c, dict) else None


def record(out: Path, lap: dict, device: str, images: int) -> dict:
    """Add one session's compute (ComputeMeter.lap) to OUT's `compute` attribute; returns the new total."""
    old = read(out) or {}
    total = add_compute(old, lap)
    total.update(images=int(old.get("images", 0)) + int(images), sessions=int(old.get("sessions", 0)) + 1,
                 devices=sorted(set(old.get("devices", [])) | {str(device)}))
    _write(out, total)
    return total


def merge(out: Path, parts: Sequence[Path]) -> dict:
    """OUT's `compute` = the sum of its shards' (wall_s: the slowest shard's, as the ranks run at once)."""
    found = [c for c in map(read, parts) if c]
    total: dict = {}
    for c in found:
        total = add_compute(total, dict(c, wall_s=0.0))
    total.update(wall_s=max((float(c.get("wall_s", 0)) for c in found), default=0.0), processes=len(parts),
                 images=sum(int(c.get("images", 0)) for c in found),
                 sessions=max((int(c.get("sessions", 0)) for c in found), default=0),
                 devices=sorted({d for c in found for d in c.get("devices", [])}))
    _write(out, total)
    return total
