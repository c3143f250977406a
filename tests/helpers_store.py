"""Tiny feature stores for tests (no images, no backbone): `from helpers_store import make_store`.

make_store(path, n_per_split={"train": 8, "val": 4}, captions=None, L=196, C=16, ...) writes a
complete cache with pipeline.cache.layout.create, fills /features and sets /done. By default the data is
*structured*: image k belongs to class k % len(CLASSES), its features carry a class-specific
pattern (plus noise), and its captions name the class, so a decoder can learn to caption it.
"""
from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np

from pipeline.cache import identity, layout
from pipeline.data.records import Record

CLASSES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star")]
TEMPLATES = ["a {c} {s}", "a {c} {s} on a plain background", "there is a {c} {s} in the picture",
             "one {c} {s}", "the {s} is {c}"]


def class_captions(k: int) -> list[str]:
    c, s = CLASSES[k % len(CLASSES)]
    return [t.format(c=c, s=s) for t in TEMPLATES]


def make_store(path, n_per_split: dict | None = None, captions=None, *, L: int = 196, C: int = 16,
               dtype: str = "float16", seed: int = 0, backbone: str = "test-random",
               dataset: str = "test-structured", noise: float = 0.3) -> Path:
    """Write a complete feature cache at `path`; return the path.

    captions: None (class captions, see module doc), or a callable(row) -> list[str], or a list
    with one list of captions per row (rows in train, val, test order).
    """
    path = Path(path)
    n_per_split = n_per_split or {"train": 8, "val": 4}
    splits = [s for s, n in n_per_split.items() for _ in range(n)]
    records = []
    for k, split in enumerate(splits):
        if captions is None:
            caps = class_captions(k)
        elif callable(captions):
            caps = list(captions(k))
        else:
            caps = list(captions[k])
        records.append(Record(image_id=f"img{k:05d}", path=Path(f"img{k:05d}.jpg"), split=split, captions=caps))
    side = int(math.isqrt(L))
    grid = [side, side] if side * side == L else [L, 1]
    prov = {"backbone": backbone, "weights_sha256": "0" * 64, "preprocessing": {"kind": "none"},
            "input_size": [224, 224], "grid": grid, "dataset": dataset,
            "split_hashes": identity.split_hashes(records),
            "code_version": "test", "created": "test"}
    layout.create(path, records, prov, num_regions=L, feature_dim=C, dtype=dtype)
    rng = np.random.default_rng(seed)
    patterns = rng.normal(size=(len(CLASSES), L, C)).astype(np.float32)
    feats = np.empty((len(records), L, C), np.float32)
    for k in range(len(records)):
        feats[k] = patterns[k % len(CLASSES)] + noise * rng.normal(size=(L, C))
    with h5py.File(path, "r+") as f:
        f["features"][...] = feats.astype(dtype)
        f["done"][...] = True
    return path
