"""The shards of a torchrun extraction (extraction.sharded.extract_distributed) and their merge into one file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from pipeline.cache.identity import PROVENANCE_KEYS, captions_sha256, check_same_provenance, split_hashes
from pipeline.cache.layout import PICTURE_DATASETS, create, create_features, read_attrs, runs_of
from pipeline.errors import UserError
from pipeline.fileio import fresh_file

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


def _cpu_conv(shards: Sequence[str | Path]) -> str:
    """The shards' CPU convolution path (extraction's `cpu_conv` attribute), '+'-joined where they differ."""
    seen = set()
    for path in shards:
        with h5py.File(path, "r") as f:
            seen.add(str(f.attrs.get("cpu_conv", "")))
    return "+".join(sorted(seen - {""}))


def merge_shards(out: str | Path, shards: Sequence[str | Path], records, *, mode: str = "vds",
                 dataset_root: str | Path | None = None, copy_rows: int = 256) -> Path:
    """Write OUT from complete shards: the single-process layout and provenance, features/done/bad
    virtual (mode 'vds') or copied (mode 'copy'). `records` are the merged file's rows, in order."""
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
            check_same_provenance({k: first.get(k) for k in keys}, attrs, what="this shard", where=str(p))
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
    prov = {k: first[k] for k in PROVENANCE_KEYS + ("code_version", "created", "precision") if k in first}
    prov["split_hashes"] = split_hashes(records)
    prov["captions_sha256"] = captions_sha256(records)   # a shard's hash covers its rows only
    if dataset_root is None and first.get("dataset_root"):
        dataset_root = first["dataset_root"]

    # The metadata datasets and attrs exactly as layout.create writes them (features there are 1x1).
    meta = out.with_name(out.name + ".meta")
    tmp = out.with_name(out.name + ".merging")
    create(meta, records, prov, num_regions=1, feature_dim=1, dtype=dtype, dataset_root=dataset_root)
    try:
        fresh_file(tmp)        # never written through a link planted under that name
        with h5py.File(meta, "r") as m, h5py.File(tmp, "w") as f:
            for name in m:
                if name not in ("features", "done", "bad"):
                    m.copy(m[name], f, name)
            for k, v in m.attrs.items():
                f.attrs[k] = v
            f.attrs["feature_dim"] = int(C)
            if conv := _cpu_conv(shards):
                f.attrs["cpu_conv"] = conv
            _copy_pictures(f, metas)
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


def _copy_pictures(f, metas) -> None:
    """The shards' per-row picture records (layout.PICTURE_DATASETS) into the merged rows; a shard made
    before them (format 1) leaves its rows unrecorded (zero)."""
    for p, gi, _, _, _ in metas:
        with h5py.File(p, "r") as s:
            for name in PICTURE_DATASETS:
                if name in s and name in f:
                    src = s[name][()]
                    for a, b in runs_of(gi):
                        f[name][int(gi[a]):int(gi[a]) + (b - a)] = src[a:b]

