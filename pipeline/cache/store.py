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

from pipeline.errors import UserError
from pipeline.data.records import Record

FORMAT_VERSION = 1
STR = h5py.string_dtype("utf-8")

# Attributes that identify what made the features. Two artefacts mix only if these agree.
PROVENANCE_KEYS = (
    "backbone", "weights_sha256", "preprocessing", "input_size", "grid", "feature_dim",
    "dtype", "dataset", "split_hashes", "captions_sha256",
)
# Written too, but informational (they may differ between compatible files).
INFO_KEYS = ("code_version", "created", "dataset_root", "format_version", "num_images")


def check_text(records: Sequence[Record]) -> None:
    """Refuse text HDF5 cannot store (a NUL character) with the image and caption that hold it."""
    for r in records:
        for what, s in [("image id", r.image_id), *(("caption", c) for c in r.captions)]:
            if "\x00" in s:
                raise UserError(f"image {r.image_id!r} ({r.path}): its {what} {s!r} contains a NUL character, "
                                f"which an HDF5 string cannot hold. Remove it from the dataset's caption file.")


def create(path: str | Path, records: Sequence[Record], provenance: dict, *,
           num_regions: int, feature_dim: int, dtype: str = "float16",
           dataset_root: str | Path | None = None) -> None:
    """Create an empty cache with all metadata and a zero `done` mask; features are filled later."""
    path = Path(path)
    check_text(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".creating")
    try:
        _create(tmp, records, provenance, num_regions=num_regions, feature_dim=feature_dim, dtype=dtype,
                dataset_root=dataset_root)
        os.replace(tmp, path)  # a half-created file never has the final name
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create(tmp: Path, records, provenance, *, num_regions, feature_dim, dtype, dataset_root) -> None:
    n = len(records)
    with h5py.File(tmp, "w") as f:
        create_features(f, (n, num_regions, feature_dim), dtype)
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


def captions_sha256(records: Sequence[Record]) -> str:
    """Hash of every image's captions (and objects, for synthetic sets) in row order: the cache's text."""
    from pipeline.provenance import sha256_strings
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
    check_text(records)
    with _open(path, "r+") as f:
        _write_annotations(f, records)
        f.attrs["captions_sha256"] = captions_hash


def create_features(f: h5py.File, shape: tuple[int, int, int], dtype: str) -> None:
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
    def provenances(self) -> list[dict]:
        """One provenance per cache read (a FusedStore has several)."""
        return [self.provenance]

    @property
    def paths(self) -> list[Path]:
        return [self.path]

    @property
    def grid(self) -> tuple[int, int]:
        g = self.attrs.get("grid") or [self.num_regions, 1]
        return int(g[0]), int(g[1])

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


class FusedStore:
    """Several caches of the same images read as one: annotation vector i of an image is the
    concatenation of vector i of each cache (feature_dim = the sum of theirs).

    The caches must hold the same images in the same rows (image ids and splits), the same captions
    and the same attention grid; `open_features` checks that. Metadata (ids, splits, captions,
    objects) comes from the first cache; `provenances` and `paths` list every cache in order.
    """

    def __init__(self, stores: Sequence[FeatureStore]):
        self.stores = list(stores)
        first = self.stores[0]
        for other in self.stores[1:]:
            where = f"fusing {first.path} with {other.path}"
            if other.grid != first.grid:
                raise UserError(f"{where}: their attention grids differ ({first.grid[0]}x{first.grid[1]} vs "
                                f"{other.grid[0]}x{other.grid[1]}); annotation vectors are concatenated per "
                                f"region, so extract both at input sizes that give the same grid.")
            if not (np.array_equal(other.image_ids, first.image_ids) and np.array_equal(other.split, first.split)):
                raise UserError(f"{where}: they hold different images or splits (same rows needed); extract both "
                                f"from the same dataset.")
            a, b = first.attrs.get("captions_sha256"), other.attrs.get("captions_sha256")
            if a and b and a != b:
                raise UserError(f"{where}: their captions differ; re-run `pipeline extract` on the older one to "
                                f"refresh its captions.")
        self.path = first.path
        self.attrs = dict(first.attrs, feature_dim=sum(s.feature_dim for s in self.stores))
        self.image_ids, self.filenames, self.split = first.image_ids, first.filenames, first.split
        self.done = np.logical_and.reduce([s.done for s in self.stores])
        self.bad = np.logical_or.reduce([s.bad for s in self.stores])
        self.captions, self.caption_row, self.objects = first.captions, first.caption_row, first.objects

    provenances = property(lambda self: [s.provenance for s in self.stores])
    paths = property(lambda self: [s.path for s in self.stores])
    grid = property(lambda self: self.stores[0].grid)
    num_images = property(lambda self: len(self.image_ids))
    num_regions = property(lambda self: self.stores[0].num_regions)
    feature_dim = property(lambda self: sum(s.feature_dim for s in self.stores))
    rows = FeatureStore.rows
    captions_of = FeatureStore.captions_of
    references = FeatureStore.references

    @property
    def provenance(self) -> dict:
        raise AttributeError("a FusedStore has one provenance per cache: use .provenances")

    def load_features(self, rows: Iterable[int] | None = None) -> np.ndarray:
        """(n, L, sum C) in the first cache's dtype."""
        rows = None if rows is None else np.asarray(list(rows), dtype=np.int64)
        parts = [s.load_features(rows) for s in self.stores]
        return np.concatenate([p.astype(parts[0].dtype, copy=False) for p in parts], axis=2)


def open_features(paths: Sequence[str | Path] | str | Path, *, require_complete: bool = True):
    """One cache (FeatureStore), or several of the same images fused (FusedStore)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise UserError("no feature file given; pass --features FILE (several to fuse caches).")
    if len(set(map(str, paths))) != len(paths):
        raise UserError(f"--features lists a file twice ({', '.join(map(str, paths))}).")
    stores = [FeatureStore.open(p, require_complete=require_complete) for p in paths]
    return stores[0] if len(stores) == 1 else FusedStore(stores)


class LazyFeatures:
    """Row reader over one cache or several fused ones (rows concatenated on the feature axis).

    Opens the HDF5 files lazily, once per process (safe with DataLoader workers)."""

    def __init__(self, paths: Sequence[str | Path] | str | Path):
        self.paths = [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        self._files = None
        self._pid = None

    def _datasets(self):
        if self._files is None or self._pid != os.getpid():
            self._files = [h5py.File(p, "r") for p in self.paths]
            self._pid = os.getpid()
        return [f["features"] for f in self._files]

    def __getitem__(self, row: int) -> np.ndarray:
        parts = [d[int(row)] for d in self._datasets()]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def read(self, rows) -> np.ndarray:
        """(n, L, sum C) rows in the given order, read in file order (rows sorted: the disk reads go
        forward) straight into one buffer (read_direct: no per-row array)."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        ds = self._datasets()
        out = np.empty((len(rows), ds[0].shape[1], sum(d.shape[2] for d in ds)), ds[0].dtype)
        c0 = 0
        for d in ds:
            c1 = c0 + d.shape[2]
            buf = out if len(ds) == 1 else np.empty((len(rows),) + d.shape[1:], d.dtype)
            for j in order:
                d.read_direct(buf, np.s_[int(rows[j])], np.s_[j])
            if len(ds) > 1:
                out[:, :, c0:c1] = buf
            c0 = c1
        return out

    def __getstate__(self):
        return {"paths": self.paths, "_files": None, "_pid": None}


# -- writing rows ----------------------------------------------------------------------------------
def runs_of(rows: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) index pairs of the runs of consecutive values in `rows`: each run is one
    contiguous HDF5 slice (h5py fancy indexing is ~30x slower than slices)."""
    rows = np.asarray(rows)
    if not len(rows):
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return list(zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(rows)].tolist()))


# -- shards of a torchrun extraction (extract.extract_distributed) and their merge -----------------
SHARD_ATTRS = ("shard_rank", "shard_world", "shard_of", "global_num_images")


def shard_path(out: str | Path, rank: int, world: int) -> Path:
    """features/x.h5 -> features/x.rank0-of4.h5"""
    out = Path(out)
    return out.with_name(f"{out.stem}.rank{rank}-of{world}{out.suffix or '.h5'}")


def shard_paths(out: str | Path, world: int) -> list[Path]:
    return [shard_path(out, r, world) for r in range(world)]


def write_global_index(path: str | Path, rows: np.ndarray, rank: int, world: int, total: int,
                       of: str = "") -> None:
    """Record in a shard which rows of the merged file it holds (idempotent)."""
    rows = np.asarray(rows, dtype=np.int64)
    with h5py.File(path, "r+") as f:
        if "global_index" in f:
            if not np.array_equal(f["global_index"][()], rows):
                raise UserError(f"{path}: holds other rows than rank {rank} of {world} should; "
                                f"re-run with --force.")
        else:
            f.create_dataset("global_index", data=rows)
        for k, v in zip(SHARD_ATTRS, (rank, world, of, total)):
            f.attrs[k] = v


def merge_shards(out: str | Path, shards: Sequence[str | Path], records, *, mode: str = "vds",
                 dataset_root: str | Path | None = None, copy_rows: int = 256) -> Path:
    """Write OUT from complete shards: the single-process layout and provenance, features/done/bad
    virtual (mode 'vds') or copied (mode 'copy'). `records` are the merged file's rows, in order."""
    from pipeline.provenance import sha256_strings

    out = Path(out)
    if mode not in ("vds", "copy"):
        raise UserError(f"--merge {mode}: choose vds or copy.")
    n = len(records)
    if not shards:
        raise UserError(f"{out}: no shards to merge.")
    metas, seen = [], np.zeros(n, np.int64)
    first = None
    for p in shards:
        p = Path(p)
        attrs = read_attrs(p)
        with h5py.File(p, "r") as f:
            if "global_index" not in f:
                raise UserError(f"{p}: not a finished extraction shard (no /global_index); re-run the "
                                f"same torchrun extract command to resume it.")
            gi, done, bad = f["global_index"][()], f["done"][()], f["bad"][()]
            shape, dt = f["features"].shape, f["features"].dtype
        if not done.all():
            raise UserError(f"{p}: shard incomplete ({int((~done).sum())} of {len(done)} rows missing); "
                            f"re-run the same torchrun extract command to resume it.")
        if first is None:
            first = attrs
        else:
            keys = [k for k in PROVENANCE_KEYS if k not in ("split_hashes", "captions_sha256")]  # per shard
            check_same_provenance({k: first.get(k) for k in keys}, attrs, what="this shard",
                                        where=str(p))
        if len(gi) != shape[0] or (len(gi) and (gi.min() < 0 or gi.max() >= n)):
            raise UserError(f"{p}: /global_index does not fit a file of {n} rows; re-run with --force.")
        np.add.at(seen, gi, 1)
        metas.append((p, gi, bad, shape, dt))
    if not (seen == 1).all():
        raise UserError(f"{out}: the shards {', '.join(str(s) for s in shards)} do not hold every row exactly "
                        f"once ({int((seen == 0).sum())} missing, {int((seen > 1).sum())} repeated); "
                        f"re-run with --force.")
    L, C = metas[0][3][1:]
    dtype = str(first["dtype"])
    prov = {k: first[k] for k in PROVENANCE_KEYS + ("code_version", "created") if k in first}
    prov["split_hashes"] = {sp: sha256_strings(r.image_id for r in records if r.split == sp)
                           for sp in sorted({r.split for r in records})}
    prov["captions_sha256"] = captions_sha256(records)   # a shard's hash covers its rows only
    if dataset_root is None and first.get("dataset_root"):
        dataset_root = first["dataset_root"]

    # The metadata datasets and attrs exactly as store.create writes them (features there are 1x1).
    meta = out.with_name(out.name + ".meta")
    tmp = out.with_name(out.name + ".merging")
    create(meta, records, prov, num_regions=1, feature_dim=1, dtype=dtype, dataset_root=dataset_root)
    try:
        with h5py.File(meta, "r") as m, h5py.File(tmp, "w") as f:
            for name in m:
                if name not in ("features", "done", "bad"):
                    m.copy(m[name], f, name)
            for k, v in m.attrs.items():
                f.attrs[k] = v
            f.attrs["feature_dim"] = int(C)
            if mode == "vds":
                _virtual(f, out, metas, n, L, C, dt)
            else:
                _copy(f, metas, n, L, C, dtype, copy_rows)
        os.replace(tmp, out)
    finally:
        for p in (meta, tmp):
            if p.exists():
                p.unlink()
    return out


def _virtual(f, out: Path, metas, n: int, L: int, C: int, dt) -> None:
    lay_f = h5py.VirtualLayout(shape=(n, L, C), dtype=dt)
    lay_d = h5py.VirtualLayout(shape=(n,), dtype=bool)
    lay_b = h5py.VirtualLayout(shape=(n,), dtype=bool)
    for p, gi, _, shape, _ in metas:
        name = os.path.relpath(Path(p).resolve(), out.resolve().parent)   # relative: the folder can move
        src_f = h5py.VirtualSource(name, "features", shape=shape, dtype=dt)
        src_d = h5py.VirtualSource(name, "done", shape=(shape[0],), dtype=bool)
        src_b = h5py.VirtualSource(name, "bad", shape=(shape[0],), dtype=bool)
        for a, b in runs_of(gi):
            g0, g1 = int(gi[a]), int(gi[a]) + (b - a)
            lay_f[g0:g1] = src_f[a:b]
            lay_d[g0:g1] = src_d[a:b]
            lay_b[g0:g1] = src_b[a:b]
    f.create_virtual_dataset("features", lay_f, fillvalue=0)
    f.create_virtual_dataset("done", lay_d, fillvalue=False)   # a missing shard reads as "not done"
    f.create_virtual_dataset("bad", lay_b, fillvalue=False)


def _copy(f, metas, n: int, L: int, C: int, dtype: str, copy_rows: int) -> None:
    create_features(f, (n, L, C), dtype)
    done = np.zeros(n, bool)
    bad = np.zeros(n, bool)
    d = f["features"]
    for p, gi, sbad, _, _ in metas:
        with h5py.File(p, "r") as s:
            src = s["features"]
            for a, b in runs_of(gi):
                for i in range(a, b, copy_rows):
                    j = min(b, i + copy_rows)
                    g0 = int(gi[a]) + (i - a)
                    d[g0:g0 + (j - i)] = src[i:j]
        bad[gi] = sbad
        done[gi] = True
    f.create_dataset("bad", data=bad)
    f.flush()
    f.create_dataset("done", data=done)   # after the features, as in a single-process run
