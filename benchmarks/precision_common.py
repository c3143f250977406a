"""Shared by the precision measurements (bench_extract.py --precision, bf16_check.py, bf16_modules.py): real
dataset images as backbone input, a backbone run in one precision, feature errors against fp32, and timing
that alternates the variants compared so that load changes hit all of them alike."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from pipeline.errors import UserError


def split_records(dataset: str, split: str, limit: int = 0, root: str | None = None) -> list:
    """The records of one split, in the dataset reader's order (the order a cache stores them); limit > 0: the first
    `limit` of them."""
    from pipeline.data import datasets
    records = [r for r in datasets.load_records(dataset, root) if r.split == split]
    if not records:
        raise UserError(f"dataset {dataset}: split {split!r} has no images (check --split, or --root "
                        f"{root or datasets.default_root(dataset)}).")
    return records[:limit] if limit > 0 else records


def load_inputs(records, spec) -> torch.Tensor:
    """(N, 3, H, W) float32 backbone input, preprocessed the way extraction does (backbones.open_image)."""
    from pipeline.extraction.backbones import open_image
    xs = []
    for r in records:
        x, err, _ = open_image(r.path, spec.preprocessing)
        if err:
            raise UserError(f"{r.path}: unreadable image ({err}); fix the dataset or pick another --split.")
        xs.append(x)
    return torch.stack(xs)


def autocast_for(precision: str):
    """The autocast context extraction runs a backbone under on CPU for "fp32" | "bf16"."""
    from pipeline.extraction.backbones import autocast_dtype
    amp = autocast_dtype(precision)
    return torch.autocast("cpu", dtype=amp, enabled=amp is not None)


def run_backbone(module, x: torch.Tensor, batch: int, precision: str) -> torch.Tensor:
    """module over x in batches of `batch`, channels_last, under inference_mode and the precision's autocast:
    (N, C, h, w) in the dtype the backbone produced (bf16 under bf16 autocast, as extraction gets it)."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            xb = x[s:s + batch].contiguous(memory_format=torch.channels_last)
            with autocast_for(precision):
                out.append(module(xb))
    return torch.cat(out)


def per_image_errors(ref: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine, relative L2 error) per image of `other` against `ref` (both (N, ...)), flattened, in float64:
    cos = <a, b> / (|a| |b|), rel = |b - a| / |a|."""
    a = ref.detach().reshape(len(ref), -1).double()
    b = other.detach().reshape(len(other), -1).double()
    if a.shape != b.shape:
        raise ValueError(f"per_image_errors: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    na, nb = a.norm(dim=1), b.norm(dim=1)
    return (a * b).sum(1) / (na * nb).clamp_min(1e-300), (b - a).norm(dim=1) / na.clamp_min(1e-300)


def summarise_errors(cos: torch.Tensor, rel: torch.Tensor) -> dict:
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
            "rel_err_mean": float(rel.mean()), "rel_err_max": float(rel.max())}


def feature_errors(ref: torch.Tensor, other: torch.Tensor) -> dict:
    """Per-image agreement of `other` with `ref`: cosine (min, mean), relative L2 error (mean, max)."""
    return summarise_errors(*per_image_errors(ref, other))


def timed_alternating(fns: dict[str, Callable[[], None]], seconds: float, min_reps: int = 2) -> dict[str, float]:
    """Mean seconds per call of each fn, called in turn (the order rotating every round) after one warm-up call
    each, for >= min_reps rounds and until the rounds took >= `seconds` per fn on average."""
    names = list(fns)
    for n in names:
        fns[n]()
    total = dict.fromkeys(names, 0.0)
    rounds = 0
    while rounds < min_reps or sum(total.values()) < seconds * len(names):
        for n in names[rounds % len(names):] + names[:rounds % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            total[n] += time.perf_counter() - t0
        rounds += 1
    return {n: total[n] / rounds for n in names}


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def write_json(path: str | Path, obj) -> None:
    import json
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=1) + "\n")


def positive_ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise UserError(f"{what} {text!r}: give positive integers separated by commas, e.g. 1,8,32.")
    return vals
