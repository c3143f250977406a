"""The read side of the feature cache: one file (FeatureStore), several of the same images fused
(FusedStore, open_features), and a row reader for training's out-of-RAM path (LazyFeatures)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from pipeline.cache.identity import images_sha256, provenance_of
from pipeline.cache.layout import VIEW_DATASETS, decode_attr, open_h5
from pipeline.errors import UserError


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
        with open_h5(path) as f:
            for key in ("features", "done", "image_ids", "split", "captions", "caption_row"):
                if key not in f:
                    raise UserError(f"{path}: not a pipeline feature file (missing /{key}).")
            attrs = {k: decode_attr(v) for k, v in f.attrs.items()}
            check_shapes(f, path, attrs)
            if "image_sha256" in f:          # format 2: which pictures the rows were computed from
                attrs["images_sha256"] = images_sha256(f["image_sha256"][()])
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

    @property
    def views(self) -> list[str]:
        """The views each row holds: ["original"], or ["original", "hflip"] (extract --flip)."""
        return list(self.attrs.get("views") or ["original"])

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
    def load_features(self, rows: Iterable[int] | None = None, view: str = "original") -> np.ndarray:
        """Features (n, L, C) in the stored dtype, read into RAM (of `view`: "original" or "hflip").

        Whole-file reads are one contiguous read; a row subset is read row by row (h5py fancy
        indexing on a chunked dataset is ~20x slower than a per-row loop).
        """
        check_view(self, view)
        with open_h5(self.path) as f:
            d = f[VIEW_DATASETS[view]]
            if rows is None:
                out = d[()]
            else:
                rows = np.asarray(list(rows), dtype=np.int64)
                out = np.empty((len(rows),) + d.shape[1:], d.dtype)
                for j, r in enumerate(rows):
                    d.read_direct(out, np.s_[r], np.s_[j])
        check_finite(out, self.path, rows, self.image_ids)
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
            for key, what in (("captions_sha256", "captions"), ("images_sha256", "pictures")):
                a, b = first.attrs.get(key), other.attrs.get(key)
                if a and b and a != b:
                    raise UserError(f"{where}: their {what} differ; re-run `pipeline extract` on the older one: it "
                                    f"refreshes the captions and re-extracts every picture that changed (a cache "
                                    f"made before per-image picture records asks for --force).")
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
    views = property(lambda self: [v for v in self.stores[0].views if all(v in s.views for s in self.stores)])
    rows = FeatureStore.rows
    captions_of = FeatureStore.captions_of
    references = FeatureStore.references

    @property
    def provenance(self) -> dict:
        raise AttributeError("a FusedStore has one provenance per cache: use .provenances")

    def load_features(self, rows: Iterable[int] | None = None, view: str = "original") -> np.ndarray:
        """(n, L, sum C) in the first cache's dtype."""
        rows = None if rows is None else np.asarray(list(rows), dtype=np.int64)
        parts = [s.load_features(rows, view) for s in self.stores]
        return np.concatenate([p.astype(parts[0].dtype, copy=False) for p in parts], axis=2)


def check_view(store, view: str) -> None:
    """One error when a store lacks a view (a cache made without extract --flip)."""
    if view not in store.views:
        raise UserError(f"{', '.join(map(str, store.paths))}: holds no {view!r} view (views: "
                        f"{', '.join(store.views)}). Extract with --flip for flipped views.")


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

    def _datasets(self, view: str = "original"):
        if self._files is None or self._pid != os.getpid():
            self._files = [h5py.File(p, "r") for p in self.paths]
            self._pid = os.getpid()
        return [f[VIEW_DATASETS[view]] for f in self._files]

    def __getitem__(self, row: int) -> np.ndarray:
        parts = [d[int(row)] for d in self._datasets()]
        for p, part in zip(self.paths, parts):
            check_finite(part[None], p, [row])
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def read(self, rows, view: str = "original") -> np.ndarray:
        """(n, L, sum C) rows in the given order, read in file order (rows sorted: the disk reads go
        forward) straight into one buffer (read_direct: no per-row array). view: "original" or "hflip"."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        ds = self._datasets(view)
        out = np.empty((len(rows), ds[0].shape[1], sum(d.shape[2] for d in ds)), ds[0].dtype)
        c0 = 0
        for d in ds:
            c1 = c0 + d.shape[2]
            buf = out if len(ds) == 1 else np.empty((len(rows),) + d.shape[1:], d.dtype)
            for j in order:
                d.read_direct(buf, np.s_[int(rows[j])], np.s_[j])
            check_finite(buf if len(ds) > 1 else out, d.file.filename, rows)
            if len(ds) > 1:
                out[:, :, c0:c1] = buf
            c0 = c1
        return out

    def __getstate__(self):
        return {"paths": self.paths, "_files": None, "_pid": None}


# -- checks of what a file holds against what it declares ------------------------------------------------
def check_shapes(f: h5py.File, path: Path, attrs: dict) -> None:
    """One UserError naming the file when its feature datasets disagree with its own attributes (rows,
    grid, feature_dim, dtype) or are not float16/float32 (an int dataset would train silently)."""
    problems = []
    n = len(f["image_ids"])
    if attrs.get("num_images") is not None and int(attrs["num_images"]) != n:
        problems.append(f"num_images says {attrs['num_images']} but /image_ids lists {n}")
    grid, dim = attrs.get("grid"), attrs.get("feature_dim")
    if not grid or dim is None:
        problems.append("the grid or feature_dim attribute is missing")
    for view in attrs.get("views") or ["original"]:
        name = VIEW_DATASETS.get(view)
        d = f.get(name) if name else None
        if d is None:
            problems.append(f"view {view!r} has no dataset")
            continue
        if d.dtype not in (np.float16, np.float32):
            problems.append(f"/{name} holds {d.dtype}, not float16 or float32")
        elif attrs.get("dtype") and str(d.dtype) != str(attrs["dtype"]):
            problems.append(f"/{name} holds {d.dtype} but the dtype attribute says {attrs['dtype']}")
        want = (n, int(grid[0]) * int(grid[1]) if grid else None, int(dim) if dim is not None else None)
        if d.ndim != 3 or any(w is not None and s != w for s, w in zip(d.shape, want)):
            problems.append(f"/{name} has shape {d.shape} but the attributes declare {want} "
                            f"(images, grid {grid}, feature_dim {dim})")
    if problems:
        raise UserError(f"{path}: {'; '.join(problems)}. The file is damaged or was not written by "
                        f"`pipeline extract`; re-extract it with --force.")


def check_finite(feats: np.ndarray, path, rows=None, image_ids=None) -> None:
    """feats (n, L, C) as read: one UserError naming the file and the first row holding NaN or inf.

    Cheap enough for every read: one sum per row, in float32 for float16 features (finite ones cannot
    overflow it) and float64 otherwise; any NaN or inf survives it, and no mask of the array is made."""
    if feats.size == 0:
        return
    sums = feats.reshape(len(feats), -1).sum(axis=1, dtype=np.float32 if feats.dtype == np.float16 else np.float64)
    bad = np.flatnonzero(~np.isfinite(sums))
    if len(bad):
        j = int(bad[0])
        row = int(rows[j]) if rows is not None else j
        image = f" (image {image_ids[row]})" if image_ids is not None else ""
        raise UserError(f"{path}: row {row}{image} holds NaN or infinite features ({len(bad)} such row(s) in "
                        f"this read). The cache is damaged: re-extract it with `pipeline extract ... --force`.")

