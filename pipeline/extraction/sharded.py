"""Extraction with every process of a torchrun group: one shard of the rows per process (the single-process
extraction over a slice), merged by cache.shards into the file a single process would have written."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from pipeline.cache import layout, shards
from pipeline.errors import UserError
from pipeline.extraction import compute
from pipeline.extraction.extract import (ExtractResult, changed_pictures, check_existing, extract, extractable,
                                         make_provenance, refresh_captions, refuse_folder)


def _stale_shards(out: Path, world: int) -> list[Path]:
    keep = set(shards.shard_paths(out, world))
    return sorted(p for p in out.parent.glob(f"{out.stem}.rank*-of*{out.suffix or '.h5'}") if p not in keep)


def _existing_final(out: Path, records, *, dataset, backbone, weights, weights_dir, dtype, merge, layer="") -> str:
    """'complete' when OUT exists, is complete and matches; 'run' when it should be (re)made."""
    import h5py
    from pipeline.extraction.backbones import load_backbone
    try:
        attrs = layout.read_attrs(out)
        with h5py.File(out, "r") as f:
            virtual = f["features"].is_virtual
            done = f["done"][()]                 # a missing VDS source reads as fill value False
    except (UserError, OSError, KeyError):
        raise UserError(f"{out}: exists but is not a readable feature file. Use --force to overwrite it "
                        f"or choose another --out.") from None
    from pipeline.extraction.cuts import spec_at
    _, spec, sha = load_backbone(backbone, weights, weights_dir)
    prov = make_provenance(spec_at(spec, layer), sha, dataset, records, dtype)
    check_existing(out, attrs, prov, records)
    if done.all():
        changed = changed_pictures(out, attrs, prov, records)
        if len(changed):
            raise UserError(f"{out}: {len(changed)} picture(s) changed since their features were extracted (e.g. "
                            f"{records[int(changed[0])].path}); re-extract it with --force.")
        if virtual and merge == "copy":
            return "run"                  # vds -> copy: merge again (the merge writes the current captions)
        refresh_captions(out, attrs, prov, records)
        return "complete"
    if not virtual:
        raise UserError(f"{out}: an incomplete single-process extraction. Resume it with the same command "
                        f"without torchrun, or pass --force to redo it with several processes.")
    return "run"   # a merged VDS whose shards are missing or incomplete: redo/resume the shards


def extract_distributed(records, out: str | Path, *, dataset: str, backbone: str, merge: str = "vds",
                        weights: str | None = None, weights_dir: str | Path = "weights",
                        dtype: str = "float16", batch_size: int | None = None, workers: int | None = None,
                        force: bool = False, skip_bad: bool = False, device: str = "auto",
                        dataset_root: str | Path | None = None, progress: bool = True,
                        echo: Callable[[str], None] = print, decode: str = "auto", layer: str = "",
                        flip: bool = False, precision: str = "auto"):
    """Extract `records` into OUT with every process of the torchrun group (call it on every rank).

    Returns an extract.ExtractResult summed over the ranks (seconds: the slowest rank).
    A single process (no process group) runs extract.extract unchanged.
    """
    from pipeline import distributed
    from pipeline.distributed import shard

    kw = dict(dataset=dataset, backbone=backbone, weights=weights, weights_dir=weights_dir, dtype=dtype,
              batch_size=batch_size, skip_bad=skip_bad, device=device, dataset_root=dataset_root, decode=decode,
              layer=layer, precision=precision)
    if merge not in ("vds", "copy"):
        raise UserError(f"--merge {merge}: choose vds or copy.")
    info = distributed.current()
    if not info.distributed:
        return extract(records, out, workers=workers, force=force, progress=progress, flip=flip, **kw)
    if flip:
        raise UserError("--flip runs in one process (the shard merge does not carry the flipped view yet); "
                        "start it without torchrun.")
    out = Path(out)
    refuse_folder(out, dataset, backbone)
    records = extractable(records, dataset)
    n = len(records)

    def decide():
        if info.is_main:
            for p in _stale_shards(out, info.world_size):
                echo(f"note: {p} is a shard of a run with another number of processes; it is not used "
                     f"(delete it).")
            if out.exists() and not force:
                return _existing_final(out, records, dataset=dataset, backbone=backbone, weights=weights,
                                       weights_dir=weights_dir, dtype=dtype, merge=merge, layer=layer)
        return "run"
    status = distributed.run_on_all_ranks(decide)[0]
    if status == "complete":
        return ExtractResult(out, n, 0)

    rows = shard(n, info.rank, info.world_size)
    mine = shards.shard_path(out, info.rank, info.world_size)
    if workers is None:    # share the node's CPUs between its processes
        workers = max(1, min(8, ((os.cpu_count() or 2) - 1) // max(1, info.local_world_size)))

    def work():
        if not len(rows):
            return (0, [], 0.0)
        res = extract([records[i] for i in rows], mine, workers=workers, force=force,
                      progress=progress and info.is_main, **kw)
        shards.write_global_index(mine, rows, info.rank, info.world_size, n, of=out.name)
        return (res.computed, res.bad, res.seconds)
    results = distributed.run_on_all_ranks(work)
    result = ExtractResult(out, n, sum(r[0] for r in results), [b for r in results for b in r[1]],
                           max(r[2] for r in results))

    def do_merge():
        if info.is_main:
            used = [shards.shard_path(out, r, info.world_size) for r in range(info.world_size)
                    if len(shard(n, r, info.world_size))]
            shards.merge_shards(out, used, records, mode=merge, dataset_root=dataset_root)
            result.compute = compute.merge(out, used)
    distributed.run_on_all_ranks(do_merge)
    return result
