"""The HDF5 feature cache: layout, writing, reading, provenance.

Layout (one row per image; see docs/design.md):
    /features      (N, L, C) float16|float32, chunks=(1, L, C)   annotation vectors a_i, L = grid h*w
    /done          (N,) bool       row written (resume mask; written after the row's features)
    /bad           (N,) bool       image unreadable, skipped with --skip-bad (features left zero)
    /image_ids     (N,) str
    /filenames     (N,) str        path relative to the dataset root (or absolute)
    /split         (N,) str
    /captions      (M,) str        raw captions, all images
    /caption_row   (M,) int32      row of each caption
    /objects       (N,) str        JSON list of objects with boxes (synthetic datasets only)
    attrs: provenance (see PROVENANCE_KEYS) + format_version
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from .errors import UserError
from .records import Record

FORMAT_VERSION = 1
STR = h5py.string_dtype("utf-8")

# Attributes that identify what made the features. Two artefacts mix only if these agree.
PROVENANCE_KEYS = (
    "backbone", "weights_sha256", "preprocessing", "input_size", "grid", "feature_dim",
    "dtype", "dataset", "split_hashes", "captions_sha256",
)
# Written too, but informational (they may differ between compatible files).
INFO_KEYS = ("code_version", "created", "dataset_root", "format_version", "num_images")


def create(path: str | Path, records: Sequence[Record], provenance: dict, *,
           num_regions: int, feature_dim: int, dtype: str = "float16",
           dataset_root: str | Path | None = None) -> None:
    """Create an empty cache with all metadata and a zero `done` mask; features are filled later."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".creating")
    n = len(records)
    with h5py.File(tmp, "w") as f:
        _create_features(f, (n, num_regions, feature_dim), dtype)
        f.create_dataset("done", shape=(n,), dtype=bool, data=np.zeros(n, bool))
        f.create_dataset("bad", shape=(n,), dtype=bool, data=np.zeros(n, bool))
        root = Path(dataset_root) if dataset_root else None
        f.create_dataset("image_ids", data=[r.image_id for r in records], dtype=STR)
        f.create_dataset("filenames", data=[_rel(r.path, root) for r in records], dtype=STR)
        f.create_dataset("split", data=[r.split for r in records], dtype=STR)
        _write_annotations(f, records)
        attrs = dict(provenance)
        attrs.update(feature_dim=feature_dim, dtype=dtype, format_version=FORMAT_VERSION, num_images=n,
                     dataset_root=str(root or ""))
        for k, v in attrs.items():
            f.attrs[k] = _attr(v)
    os.replace(tmp, path)  # a half-created file never has the final name


def captions_sha256(records: Sequence[Record]) -> str:
    """Hash of every image's captions (and objects, for synthetic sets) in row order: the cache's text."""
    from .provenance import sha256_strings
    return sha256_strings(json.dumps([r.image_id, list(r.captions), r.objects], sort_keys=True) for r in records)


def _write_annotations(f: h5py.File, records: Sequence[Record]) -> None:
    """(Re)write /captions, /caption_row and /objects from the records."""
    for name in ("captions", "caption_row", "objects"):
        if name in f:
            del f[name]
    caps = [(i, c) for i, r in enumerate(records) for c in r.captions]
    f.create_dataset("captions", data=[c for _, c in caps], dtype=STR, shape=(len(caps),))
    f.create_dataset("caption_row", data=np.array([i for i, _ in caps], np.int32), shape=(len(caps),))
    if any(r.objects is not None for r in records):
        f.create_dataset("objects", data=[json.dumps(r.objects or []) for r in records], dtype=STR)


def refresh_annotations(path: str | Path, records: Sequence[Record], captions_hash: str) -> None:
    """Replace a cache's captions/objects with the dataset's current ones; the features stay.

    The features depend on the pictures only, so a changed caption file (or a new synthetic caption
    generator) needs no re-extraction. The hash attribute is written last: a crash part-way leaves
    the old hash (or none), and the next `pipeline extract` rewrites the text again.
    """
    with _open(path, "r+") as f:
        _write_annotations(f, records)
        f.attrs["captions_sha256"] = captions_hash


def _create_features(f: h5py.File, shape: tuple[int, int, int], dtype: str) -> None:
    """(N, L, C) chunked (1, L, C), all chunks allocated at creation.

    Early allocation means filling rows later writes raw data only and never touches the chunk index,
    so a process killed mid-extraction (kill -9) cannot leave the file structure inconsistent. Fill
    values are never written (fast, sparse on disk): rows are meaningful only where /done is set.
    """
    if dtype not in ("float16", "float32"):
        raise UserError(f"unsupported feature dtype {dtype!r}; use float16 or float32.")
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((1,) + tuple(shape[1:]))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    htype = h5py.h5t.IEEE_F16LE if dtype == "float16" else h5py.h5t.IEEE_F32LE
    h5py.h5d.create(f.id, b"features", htype, h5py.h5s.create_simple(tuple(shape)), dcpl=dcpl)


def _rel(p: Path, root: Path | None) -> str:
    try:
        return str(Path(p).relative_to(root)) if root else str(p)
    except ValueError:
        return str(p)


def _attr(v):
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else v


def _unattr(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_attrs(path: str | Path) -> dict:
    with _open(path) as f:
        return {k: _unattr(v) for k, v in f.attrs.items()}


def provenance_of(attrs: dict) -> dict:
    return {k: attrs.get(k) for k in PROVENANCE_KEYS}


def check_same_provenance(expected: dict, found: dict, *, what: str, where: str) -> None:
    """Refuse to mix artefacts made by different backbones/weights/preprocessing/data."""
    diffs = [k for k in PROVENANCE_KEYS if k in expected and _norm(expected.get(k)) != _norm(found.get(k))]
    if diffs:
        lines = "; ".join(f"{k}: expected {expected.get(k)!r}, found {found.get(k)!r}" for k in diffs)
        raise UserError(f"{where}: {what} was made by something else ({lines}). "
                        f"Use a matching file or start a new run/output.")


def _norm(v):
    return json.loads(json.dumps(v, sort_keys=True)) if isinstance(v, (dict, list, tuple)) else v


def _open(path, mode="r") -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such feature file. Create it with `make extract` / `pipeline extract`.")
    try:
        return h5py.File(path, mode)
    except BlockingIOError as e:
        if mode == "r":   # an extraction is writing it; reading a snapshot is fine for inspection
            try:
                return h5py.File(path, mode, locking=False)
            except OSError:
                pass
        raise UserError(f"{path}: locked by another process (an extraction still running?). "
                        f"Wait for it to finish or stop it, then retry.") from e
    except OSError as e:
        raise UserError(f"{path}: not a readable HDF5 feature file ({e}). Re-extract it with --force.") from e


@dataclass
class FeatureStore:
    """Read side of the cache. Metadata is loaded eagerly; features on demand."""
    path: Path
    attrs: dict
    image_ids: np.ndarray       # (N,) str
    filenames: np.ndarray       # (N,) str
    split: np.ndarray           # (N,) str
    done: np.ndarray            # (N,) bool
    bad: np.ndarray             # (N,) bool
    captions: list[str]         # (M,)
    caption_row: np.ndarray     # (M,) int32
    objects: list | None        # (N,) list of objects per image, synthetic only

    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = True) -> "FeatureStore":
        path = Path(path)
        with _open(path) as f:
            for key in ("features", "done", "image_ids", "split", "captions", "caption_row"):
                if key not in f:
                    raise UserError(f"{path}: not a pipeline feature file (missing /{key}).")
            attrs = {k: _unattr(v) for k, v in f.attrs.items()}
            dec = lambda d: np.array([s.decode() if isinstance(s, bytes) else s for s in d[()]], dtype=object)
            store = cls(
                path=path, attrs=attrs,
                image_ids=dec(f["image_ids"]), filenames=dec(f["filenames"]), split=dec(f["split"]),
                done=f["done"][()], bad=f["bad"][()] if "bad" in f else np.zeros(len(f["done"]), bool),
                captions=list(dec(f["captions"])), caption_row=f["caption_row"][()],
                objects=[json.loads(s) for s in dec(f["objects"])] if "objects" in f else None,
            )
        if require_complete and not store.done.all():
            missing = int((~store.done).sum())
            raise UserError(f"{path}: extraction is incomplete ({missing} of {len(store.done)} rows missing). "
                            f"Re-run the same `pipeline extract` command to resume.")
        return store

    # -- metadata ---------------------------------------------------------------------------
    @property
    def provenance(self) -> dict:
        return provenance_of(self.attrs)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_regions(self) -> int:
        g = self.attrs["grid"]
        return int(g[0]) * int(g[1])

    @property
    def feature_dim(self) -> int:
        return int(self.attrs["feature_dim"])

    def rows(self, split: str) -> np.ndarray:
        """Rows of a split, excluding images recorded as bad."""
        return np.flatnonzero((self.split == split) & ~self.bad)

    def captions_of(self, split: str) -> tuple[np.ndarray, list[str]]:
        """(rows (M,), raw captions (M,)) of one split."""
        keep = np.isin(self.caption_row, self.rows(split))
        return self.caption_row[keep], [c for c, k in zip(self.captions, keep) if k]

    def references(self, split: str) -> dict[int, list[str]]:
        """row -> raw reference captions, for every image of the split (empty list if withheld)."""
        refs = {int(r): [] for r in self.rows(split)}
        for r, c in zip(*self.captions_of(split)):
            refs[int(r)].append(c)
        return refs

    # -- features ---------------------------------------------------------------------------
    def load_features(self, rows: Iterable[int] | None = None) -> np.ndarray:
        """Features (n, L, C) in the stored dtype, read into RAM.

        Whole-file reads are one contiguous read; a row subset is read row by row (h5py fancy
        indexing on a chunked dataset is ~20x slower than a per-row loop).
        """
        with _open(self.path) as f:
            d = f["features"]
            if rows is None:
                return d[()]
            rows = np.asarray(list(rows), dtype=np.int64)
            out = np.empty((len(rows),) + d.shape[1:], d.dtype)
            for j, r in enumerate(rows):
                d.read_direct(out, np.s_[r], np.s_[j])
            return out


class LazyFeatures:
    """Row reader that opens the HDF5 file lazily, once per process (safe with DataLoader workers)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._file = None
        self._pid = None

    def _dataset(self):
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file["features"]

    def __getitem__(self, row: int) -> np.ndarray:
        return self._dataset()[int(row)]

    def __getstate__(self):
        return {"path": self.path, "_file": None, "_pid": None}
