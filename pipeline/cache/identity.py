"""What identifies a feature cache: its provenance keys and the hashes of its rows and text.

Two artefacts (a cache and a run, two fused caches, the shards of one extraction) mix only if the
identity keys agree. The split and caption hashes are computed here only, by extraction, by the
shard merge and by the readers' checks alike.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple, Sequence

from pipeline.data.records import Record
from pipeline.errors import UserError
from pipeline.provenance import sha256_strings

# Attributes that identify what made the features. Two artefacts mix only if these agree.
PROVENANCE_KEYS = (
    "backbone", "weights_sha256", "preprocessing", "input_size", "grid", "feature_dim",
    "dtype", "dataset", "split_hashes", "captions_sha256", "layer", "images_sha256",
)
# `layer`: the cut point of a cache of an earlier layer (extract --layer, extraction/cuts.py). Caches and
# runs made before cut points lack it: absent (or None) means the final layer, and it is always compared.
# `images_sha256`: one hash of the pictures every row was computed from (readers compute it from
# /image_sha256, format 2). Unknown (None) in older artefacts, which then are not checked on it.
RECORDED_LATER = ("images_sha256",)
# Written too, but informational (they may differ between compatible files).
INFO_KEYS = ("code_version", "created", "dataset_root", "format_version", "num_images", "precision")
# `precision` (fp32/bf16/fp16, what the backbone computed in) is informational for mixing: a run trained on
# fp32 features may score or caption from bf16 ones of a backbone marked safe. Extraction never mixes two in one
# file (extract.cache_precision).


def split_hashes(records: Sequence[Record]) -> dict:
    """split -> sha256 of its image ids in row order: identifies the exact rows of a file."""
    return {s: sha256_strings(r.image_id for r in records if r.split == s)
            for s in sorted({r.split for r in records})}


def captions_sha256(records: Sequence[Record]) -> str:
    """Hash of every image's captions (and objects, for synthetic sets) in row order: the cache's text."""
    return sha256_strings(json.dumps([r.image_id, list(r.captions), r.objects], sort_keys=True) for r in records)


def provenance_of(attrs: dict) -> dict:
    return {k: attrs.get(k) for k in PROVENANCE_KEYS}


def normalized(v):
    """A value as it reads back from JSON (tuples become lists), for comparing attributes."""
    return json.loads(json.dumps(v, sort_keys=True)) if isinstance(v, (dict, list, tuple)) else v


def check_same_provenance(expected: dict, found: dict, *, what: str, where: str) -> None:
    """Refuse to mix artefacts made by different backbones/weights/preprocessing/data."""
    def value(d, k):
        return (d.get(k) or "") if k == "layer" else d.get(k)
    diffs = [k for k in PROVENANCE_KEYS if (k in expected or k == "layer")
             and normalized(value(expected, k)) != normalized(value(found, k))
             and not (k in RECORDED_LATER and expected.get(k) is None)]
    if diffs:
        lines = "; ".join(f"{k}: expected {expected.get(k)!r}, found {found.get(k)!r}" for k in diffs)
        raise UserError(f"{where}: {what} was made by something else ({lines}). "
                        f"Use a matching file or start a new run/output.")


# -- the pictures: what a cache records of the image file each row's features were computed from --------
class Picture(NamedTuple):
    """One image file as extraction read it: its size, modification time and content hash."""
    size: int               # bytes
    mtime_ns: int           # st_mtime_ns when it was read
    sha256: bytes           # 32 raw bytes of sha256(content)


def read_picture(path: str | Path) -> tuple[bytes, Picture]:
    """The file's bytes, read once, and their Picture record (hashed from exactly those bytes)."""
    with open(path, "rb") as f:
        mtime_ns = os.fstat(f.fileno()).st_mtime_ns
        data = f.read()
    return data, Picture(len(data), mtime_ns, hashlib.sha256(data).digest())


def picture_changed(path: str | Path, size: int, mtime_ns: int, sha256: bytes) -> bool:
    """Whether the file at `path` is not the recorded picture. Size and mtime equal: unchanged (the
    fast check, as git's index); otherwise the content decides (a copied dataset keeps its pictures)."""
    try:
        st = os.stat(path)
    except OSError:
        return True
    if st.st_size == size and st.st_mtime_ns == mtime_ns:
        return False
    if st.st_size != size:
        return True
    return read_picture(path)[1].sha256 != bytes(sha256)


def images_sha256(digests) -> str:
    """One hash of every row's picture (the (N, 32) /image_sha256 rows in order): which pictures the
    features were computed from. Readers put it in the provenance of a format-2 cache."""
    import numpy as np
    return hashlib.sha256(np.ascontiguousarray(digests, np.uint8).tobytes()).hexdigest()
