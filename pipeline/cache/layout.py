"""The HDF5 layout of a feature cache: creating the file, its attributes, opening it.

Layout (one row per image; docs/features.md):
    /features      (N, L, C) float16|float32, chunks=(1, L, C)   annotation vectors a_i, L = grid h*w
    /done          (N,) bool       row written (resume mask; written after the row's features)
    /bad           (N,) bool       image unreadable, skipped with --skip-bad (features left zero)
    /image_ids     (N,) str
    /filenames     (N,) str        path relative to the dataset root (or absolute)
    /split         (N,) str
    /captions      (M,) str        raw captions, all images
    /caption_row   (M,) int32      row of each caption
    /objects       (N,) str        JSON list of objects with boxes (synthetic datasets only)
    /features_hflip (N, L, C)      extract --flip: the horizontally flipped view of each image (attr
                                   views = ["original", "hflip"]; /done covers both views)
    /image_sha256  (N, 32) uint8   sha256 of the image file each row's features were computed from  } format 2;
    /image_stat    (N, 2) int64    its size and mtime_ns when read (zero: not recorded)             } none in 1
    attrs: provenance (cache.identity.PROVENANCE_KEYS) + INFO_KEYS
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from pipeline.errors import UserError
from pipeline.data.records import Record
from pipeline.fileio import fresh_file

FORMAT_VERSION = 2      # 1: no per-image picture records (still read; their pictures cannot be checked)
STR = h5py.string_dtype("utf-8")
PICTURE_DATASETS = ("image_sha256", "image_stat")


def check_text(records: Sequence[Record]) -> None:
    """Refuse text HDF5 cannot store (a NUL character) with the image and caption that hold it."""
    for r in records:
        for what, s in [("image id", r.image_id), *(("caption", c) for c in r.captions)]:
            if "\x00" in s:
                raise UserError(f"image {r.image_id!r} ({r.path}): its {what} {s!r} contains a NUL character, "
                                f"which an HDF5 string cannot hold. Remove it from the dataset's caption file.")


# The views a cache may hold, and the dataset of each (`views` attr; absent: the original view only).
VIEW_DATASETS = {"original": "features", "hflip": "features_hflip"}


def create(path: str | Path, records: Sequence[Record], provenance: dict, *,
           num_regions: int, feature_dim: int, dtype: str = "float16",
           dataset_root: str | Path | None = None, flip: bool = False) -> None:
    """Create an empty cache with all metadata and a zero `done` mask; features are filled later.
    flip: also /features_hflip, the flipped view of every row (views attr ["original", "hflip"])."""
    path = Path(path)
    check_text(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".creating")
    try:
        fresh_file(tmp)        # never written through a link planted under that name
        _create(tmp, records, dict(provenance, **({"views": list(VIEW_DATASETS)} if flip else {})),
                num_regions=num_regions, feature_dim=feature_dim, dtype=dtype, dataset_root=dataset_root)
        os.replace(tmp, path)  # a half-created file never has the final name
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create(tmp: Path, records, provenance, *, num_regions, feature_dim, dtype, dataset_root) -> None:
    n = len(records)
    with h5py.File(tmp, "w") as f:
        for view in provenance.get("views") or ["original"]:
            create_features(f, (n, num_regions, feature_dim), dtype, name=VIEW_DATASETS[view])
        f.create_dataset("done", shape=(n,), dtype=bool, data=np.zeros(n, bool))
        f.create_dataset("bad", shape=(n,), dtype=bool, data=np.zeros(n, bool))
        # fixed-size and allocated now, like /features: recording a row's picture writes raw data only
        f.create_dataset("image_sha256", data=np.zeros((n, 32), np.uint8))
        f.create_dataset("image_stat", data=np.zeros((n, 2), np.int64))
        root = Path(dataset_root) if dataset_root else None
        f.create_dataset("image_ids", data=[r.image_id for r in records], dtype=STR)
        f.create_dataset("filenames", data=[_rel(r.path, root) for r in records], dtype=STR)
        f.create_dataset("split", data=[r.split for r in records], dtype=STR)
        write_annotations(f, records)
        attrs = dict(provenance)
        attrs.update(feature_dim=feature_dim, dtype=dtype, format_version=FORMAT_VERSION, num_images=n,
                     dataset_root=str(root or ""))
        for k, v in attrs.items():
            f.attrs[k] = encode_attr(v)


def write_annotations(f: h5py.File, records: Sequence[Record]) -> None:
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
    check_text(records)
    with open_h5(path, "r+") as f:
        write_annotations(f, records)
        f.attrs["captions_sha256"] = captions_hash


def create_features(f: h5py.File, shape: tuple[int, int, int], dtype: str, name: str = "features") -> None:
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
    h5py.h5d.create(f.id, name.encode(), htype, h5py.h5s.create_simple(tuple(shape)), dcpl=dcpl)


def _rel(p: Path, root: Path | None) -> str:
    try:
        return str(Path(p).relative_to(root)) if root else str(p)
    except ValueError:
        return str(p)


def encode_attr(v):
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else v


def decode_attr(v):
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
    with open_h5(path) as f:
        return {k: decode_attr(v) for k, v in f.attrs.items()}


def set_attrs(path: str | Path, **attrs) -> None:
    with open_h5(path, "r+") as f:
        for k, v in attrs.items():
            f.attrs[k] = encode_attr(v)


def dataset_names(path: str | Path) -> set[str]:
    with open_h5(path) as f:
        return set(f)


def open_h5(path, mode="r") -> h5py.File:
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


def open_unbuffered(path: str | Path) -> h5py.File:
    """The file opened r+ for writing rows, with no raw-data chunk cache and no sieve buffer: every write
    goes straight to the file, so a failed write (a full disk) fails right there. A buffered one stays
    behind as dirty data that the file's close cannot write either: HDF5 then keeps the file open and the
    interpreter crashed at exit (rc 139 after the clear error)."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_cache(0, 0, 0, 0.75)          # metadata cache elements, chunk slots, chunk bytes, preemption
    fapl.set_sieve_buf_size(0)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)
    return h5py.File(h5py.h5f.open(str(path).encode(), h5py.h5f.ACC_RDWR, fapl=fapl))


def runs_of(rows: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) index pairs of the runs of consecutive values in `rows`: each run is one
    contiguous HDF5 slice (h5py fancy indexing is ~30x slower than slices)."""
    rows = np.asarray(rows)
    if not len(rows):
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return list(zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(rows)].tolist()))


# -- the pictures each row was computed from (format 2) --------------------------------------------------
def write_pictures(f: h5py.File, rows: np.ndarray, pictures: Sequence) -> None:
    """Record the identity.Picture (or None: not read) of each of `rows`, before the rows are marked
    done. A format-1 file has nowhere to record them: nothing is written."""
    if "image_sha256" not in f:
        return
    sha = np.zeros((len(rows), 32), np.uint8)
    stat = np.zeros((len(rows), 2), np.int64)
    for j, p in enumerate(pictures):
        if p is not None:
            sha[j] = np.frombuffer(p.sha256, np.uint8)
            stat[j] = (p.size, p.mtime_ns)
    for a, b in runs_of(rows):
        r0 = int(rows[a])
        f["image_sha256"][r0:r0 + (b - a)] = sha[a:b]
        f["image_stat"][r0:r0 + (b - a)] = stat[a:b]


def changed_pictures(path: str | Path, image_paths: Sequence) -> np.ndarray | None:
    """Rows whose features were computed from another picture than the file now at `image_paths[row]`
    (a different --root, a re-made synthetic set, an edited photo), among the done rows with a record.
    None for a format-1 file, which recorded no pictures."""
    from pipeline.cache.identity import picture_changed
    with open_h5(path) as f:
        if "image_sha256" not in f:
            return None
        done, sha, stat = f["done"][()], f["image_sha256"][()], f["image_stat"][()]
    recorded = done & sha.any(axis=1)
    return np.array([r for r in np.flatnonzero(recorded)
                     if picture_changed(image_paths[r], int(stat[r, 0]), int(stat[r, 1]), sha[r].tobytes())],
                    np.int64)


def forget_rows(path: str | Path, rows: np.ndarray) -> None:
    """Clear /done of `rows` (their features are stale): the next extraction computes them again."""
    rows = np.sort(np.asarray(rows, np.int64))
    with open_h5(path, "r+") as f:
        for a, b in runs_of(rows):
            f["done"][int(rows[a]):int(rows[a]) + (b - a)] = False

