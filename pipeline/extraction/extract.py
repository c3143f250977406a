"""Stage one: run a frozen backbone over every image once and cache the annotation vectors in HDF5.

    records -> DataLoader workers (decode + preprocess) -> backbone (B,C,14,14) -> (B,L,C) -> writer thread
    -> /features rows, then /done for those rows (after the features are flushed).

Resumable: rows with /done set are skipped, so a killed run (even kill -9) continues where it stopped.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.device import resolve_device
from pipeline.errors import UserError
from pipeline.fileio import FileLock, disk_error
from pipeline.data.records import Record
from pipeline.cache.store import runs_of

FLUSH_EVERY_S = 10.0      # at most this much finished work is lost on a crash


# ---- provenance ------------------------------------------------------------------------------------

def split_hashes(records: Sequence[Record]) -> dict:
    """split -> sha256 of its image ids in file order: identifies the exact rows of a file."""
    from pipeline.provenance import sha256_strings
    out = {}
    for s in sorted({r.split for r in records}):
        out[s] = sha256_strings(r.image_id for r in records if r.split == s)
    return out


def make_provenance(spec, weights_sha256: str, dataset: str, records: Sequence[Record], dtype: str) -> dict:
    from datetime import datetime, timezone
    from pipeline.cache import store
    from pipeline.provenance import code_version
    return {
        "backbone": spec.name, "weights_sha256": weights_sha256, "preprocessing": spec.preprocessing,
        "input_size": spec.input_size, "grid": list(spec.grid), "feature_dim": spec.feature_dim,
        "dtype": dtype, "dataset": dataset, "split_hashes": split_hashes(records),
        "captions_sha256": store.captions_sha256(records), "code_version": code_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---- data ------------------------------------------------------------------------------------------

class _Images:
    """Dataset of (row, (3,H,W) tensor, error message or '') over selected rows; runs in workers."""

    def __init__(self, paths: list[str], rows: np.ndarray, preprocessing: dict):
        self.paths, self.rows, self.pp = paths, rows, preprocessing

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        import torch
        from PIL import Image
        from pipeline.extraction.backbones import preprocess_image
        row = int(self.rows[i])
        try:
            with Image.open(self.paths[row]) as im:
                im.load()
                x = preprocess_image(im, self.pp)
            return row, x, ""
        except Exception as e:   # noqa: BLE001 - any decode failure makes the image "bad"
            h, w = self.pp["resize"]
            return row, torch.zeros(3, h, w), f"{type(e).__name__}: {e}"


def _collate(items):
    import torch
    rows = np.array([r for r, _, _ in items], np.int64)
    return rows, torch.stack([x for _, x, _ in items]), [e for _, _, e in items]


# ---- writer ----------------------------------------------------------------------------------------

class _Writer(threading.Thread):
    """Writes finished batches on a background thread so the backbone never waits on HDF5.

    Order per flush: features (and bad flags) are written and flushed first, then /done for those rows,
    then flushed again; a crash in between only loses rows, it never marks unwritten rows done.
    If the writer fails (a full disk), `put` raises its error at once instead of blocking on the full
    queue, and the rows it had finished writing are still marked done (best effort).
    """

    POLL_S = 0.2

    def __init__(self, path: Path, dtype: str):
        super().__init__(daemon=True)
        self.path, self.dtype = path, np.dtype(dtype)
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def _send(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            if not self.is_alive():
                raise RuntimeError("the extraction writer thread stopped")
            try:
                self.q.put(item, timeout=self.POLL_S)
                return
            except queue.Full:
                continue

    def put(self, rows: np.ndarray, feats: np.ndarray | None, bad: np.ndarray):
        self._send((rows, feats, bad))

    def close(self):
        """Write what is queued, commit, stop; raises the writer's error."""
        if self.is_alive():
            self._send(None)
            self.join()
        if self.error is not None:
            raise self.error

    def abort(self):
        """Stop without writing what is still queued (an error is propagating); never raises."""
        self.stopping.set()
        self.join(timeout=60)

    def run(self):
        import h5py
        try:
            with h5py.File(self.path, "r+") as f:
                feats_d, done_d, bad_d = f["features"], f["done"], f["bad"]
                pending: list[np.ndarray] = []
                last = time.monotonic()
                try:
                    while not self.stopping.is_set():
                        try:
                            item = self.q.get(timeout=self.POLL_S)
                        except queue.Empty:
                            continue
                        if item is None:
                            break
                        rows, feats, bad = item         # rows (B,), feats (B, L, C) stored dtype, bad (B,)
                        _write_rows(feats_d, rows, feats.astype(self.dtype, copy=False))
                        for a, b in runs_of(rows):      # set and clear: a retried image may now be fine
                            r0 = int(rows[a])
                            if bad[a:b].any() or bad_d[r0:r0 + (b - a)].any():
                                bad_d[r0:r0 + (b - a)] = bad[a:b]
                        pending.append(rows)
                        if time.monotonic() - last >= FLUSH_EVERY_S:
                            self._commit(f, done_d, pending)
                            pending, last = [], time.monotonic()
                except BaseException:
                    try:                                # rows fully written before a failure stay done
                        self._commit(f, done_d, pending)
                    except Exception:   # noqa: BLE001 - the first error is the one to report
                        pass
                    raise
                self._commit(f, done_d, pending)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            self.error = e

    @staticmethod
    def _commit(f, done_d, pending):
        if not pending:
            return
        f.flush()                                   # features on disk first ...
        _write_mask(done_d, np.sort(np.concatenate(pending)))
        f.flush()                                   # ... then the done mask
        pending.clear()


def _write_rows(d, rows: np.ndarray, feats: np.ndarray):
    for a, b in runs_of(rows):                      # contiguous slices: one HDF5 write per run
        d[int(rows[a]):int(rows[a]) + (b - a)] = feats[a:b]


def _write_mask(d, rows: np.ndarray):
    for a, b in runs_of(rows):
        d[int(rows[a]):int(rows[a]) + (b - a)] = True


# ---- extraction ------------------------------------------------------------------------------------

@dataclass
class ExtractResult:
    path: Path
    total: int
    computed: int
    bad: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


def check_existing(out: Path, attrs: dict, provenance: dict, records: Sequence[Record]) -> None:
    """Refuse to mix into an existing file (`attrs`) made by something else. The captions hash is
    not checked here: changed text over the same pictures is `refresh_captions`' business."""
    from pipeline.cache import store
    expected = {k: v for k, v in store.provenance_of(provenance).items() if k != "captions_sha256"}
    store.check_same_provenance(expected, store.provenance_of(attrs),
                                what="the existing feature file", where=str(out))
    if int(attrs.get("num_images", -1)) != len(records):
        raise UserError(f"{out}: holds {attrs.get('num_images')} images but the dataset has {len(records)}. "
                        f"Use --force to re-extract or choose another --out.")


def refresh_captions(out: Path, attrs: dict, provenance: dict, records: Sequence[Record]) -> None:
    """Same pictures, new caption text (or a file older than caption hashes): rewrite the file's
    captions and objects, keep its features, say so."""
    from pipeline.cache import store
    if attrs.get("captions_sha256") != provenance["captions_sha256"]:
        store.refresh_annotations(out, records, provenance["captions_sha256"])
        print(f"{out}: the dataset's captions changed (or the file predates caption hashes); refreshed the "
              f"file's captions, features kept.")


def lock_path(out: Path) -> Path:
    """The lock an extraction holds while it writes OUT: a hidden file beside it (kept, empty, after)."""
    return out.with_name(f".{out.name}.lock")


def extractable(records: Sequence[Record], dataset: str) -> list[Record]:
    """The records a cache holds: images with a split (Flickr8k has 91 in none), unique ids."""
    records = [r for r in records if r.split]
    if not records:
        raise UserError(f"dataset {dataset}: no images with a split to extract.")
    ids = [r.image_id for r in records]
    if len(set(ids)) != len(ids):
        raise UserError(f"dataset {dataset}: duplicate image ids; the dataset reader must yield unique ids.")
    return records


def extract(records: Sequence[Record], out: str | Path, *, dataset: str, backbone: str,
            weights: str | None = None, weights_dir: str | Path = "weights", dtype: str = "float16",
            batch_size: int | None = None, workers: int | None = None, force: bool = False,
            skip_bad: bool = False, device: str = "auto", dataset_root: str | Path | None = None, progress: bool = True,
            max_batches: int | None = None, decode: str = "auto") -> ExtractResult:
    """Fill (or resume) `out` with features of `records`. `max_batches` stops early (tests, benchmarks).
    batch_size None: the backbone's `cpu_batch` on CPU, 32 on GPU. One process at a time writes a
    file: a second one is refused (`lock_path`) before it does any work."""
    out = Path(out)
    if dtype not in ("float16", "float32"):
        raise UserError(f"--dtype {dtype}: choose float16 or float32.")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1.")
    records = extractable(records, dataset)
    missing = [str(r.path) for r in records if not Path(r.path).is_file()]
    if missing and not skip_bad:
        raise UserError(f"{len(missing)} image file(s) missing, e.g. {', '.join(missing[:5])}. "
                        f"Check --root, or pass --skip-bad to record them in /bad.")
    with FileLock(lock_path(out), f"feature file {out}"):
        return _extract(records, out, dataset=dataset, backbone=backbone, weights=weights,
                        weights_dir=weights_dir, dtype=dtype, batch_size=batch_size, workers=workers, force=force,
                        skip_bad=skip_bad, device=device, dataset_root=dataset_root, progress=progress,
                        max_batches=max_batches, decode=decode)


def _extract(records, out: Path, *, dataset, backbone, weights, weights_dir, dtype, batch_size, workers, force,
             skip_bad, device, dataset_root, progress, max_batches, decode="auto") -> ExtractResult:
    """The extraction proper (the lock held): open or create OUT, then run the backbone over the rows to do."""
    import torch

    dev = resolve_device(device)
    from pipeline.extraction.backbones import load_backbone
    module, spec, sha = load_backbone(backbone, weights, weights_dir)
    todo = _rows_to_do(out, records, make_provenance(spec, sha, dataset, records, dtype), spec, dtype=dtype,
                       force=force, skip_bad=skip_bad, dataset_root=dataset_root)
    result = ExtractResult(out, len(records), 0)
    if len(todo) == 0:
        return result
    cuda = dev == "cuda"
    workers = max(1, min(8, (os.cpu_count() or 2) - 1)) if workers is None else workers
    batch_size = batch_size or (32 if cuda else spec.cpu_batch)
    module = module.to(dev).to(memory_format=torch.channels_last)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    paths = [str(r.path) for r in records]
    from pipeline.extraction.gpu_images import gpu_batches, resolve_decode
    if resolve_decode(decode, dev) == "gpu":     # JPEG bytes -> nvjpeg -> resize + normalise on the device
        batches = gpu_batches(paths, todo, spec.preprocessing, batch_size, dev, threads=max(1, workers))
    else:
        loader = torch.utils.data.DataLoader(
            _Images(paths, todo, spec.preprocessing), batch_size=batch_size, shuffle=False,
            num_workers=workers, collate_fn=_collate, pin_memory=cuda,
            persistent_workers=False, prefetch_factor=4 if workers > 0 else None)
        batches = iter(loader)     # fork the workers before the writer opens the file: no inherited HDF5 lock
    t0 = time.perf_counter()
    result.computed, bad = _run_backbone(module, spec, batches, out, paths, len(todo), dev=dev, dtype=dtype,
                                         skip_bad=skip_bad, progress=progress, max_batches=max_batches)
    result.seconds, result.bad = time.perf_counter() - t0, bad
    if bad and not skip_bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise UserError(f"{len(bad)} image(s) could not be read:\n  {shown}\n"
                        f"Fix or remove them and re-run (finished rows are kept), or pass --skip-bad to "
                        f"record them in /bad of {out}.")
    return result


def _rows_to_do(out: Path, records, prov: dict, spec, *, dtype, force, skip_bad, dataset_root) -> np.ndarray:
    """Create OUT (or check an existing one is the same extraction, refreshing changed captions);
    the rows still to compute: not done, and earlier --skip-bad rows unless skipping again."""
    import h5py
    from pipeline.cache import store
    if out.exists() and not force:
        try:
            attrs = store.read_attrs(out)
        except UserError:
            raise UserError(f"{out}: exists but is not a readable feature file. Use --force to overwrite it "
                            f"or choose another --out.") from None
        check_existing(out, attrs, prov, records)
        refresh_captions(out, attrs, prov, records)
    else:
        store.create(out, records, prov, num_regions=spec.num_regions, feature_dim=spec.feature_dim,
                     dtype=dtype, dataset_root=dataset_root)
    with h5py.File(out, "r") as f:
        done, bad_mask = f["done"][()], f["bad"][()]
    return np.flatnonzero(~done if skip_bad else ~done | bad_mask)


def _run_backbone(module, spec, batches, out: Path, paths, total: int, *, dev, dtype, skip_bad, progress,
                  max_batches) -> tuple[int, list[str]]:
    """Backbone over the batches (rows, x (B,3,H,W), errs), rows handed to the writer thread; returns
    (rows computed, bad images). A writer failure (a full disk) stops it with one error."""
    import torch
    from tqdm import tqdm
    cuda = dev == "cuda"
    amp = getattr(torch, spec.amp) if (cuda and spec.amp) else None
    writer = _Writer(out, dtype)
    writer.start()
    computed, bad = 0, []
    bar = tqdm(total=total, unit="img", desc=f"extract {spec.name}", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    try:
        with torch.inference_mode():
            for bi, (rows, x, errs) in enumerate(batches):
                if max_batches is not None and bi >= max_batches:
                    break
                x = x.to(dev, non_blocking=cuda).contiguous(memory_format=torch.channels_last)  # (B,3,H,W)
                with torch.autocast(dev, dtype=amp, enabled=amp is not None):
                    y = module(x)                                            # (B, C, h, w)
                y = y.flatten(2).transpose(1, 2)                             # (B, L, C), L = h*w row-major
                # one cast, straight to the stored dtype (autocast outputs are already half on GPU)
                feats = y.to(torch.float16 if dtype == "float16" else torch.float32).cpu().numpy()
                isbad = np.array([bool(e) for e in errs])
                if isbad.any():
                    for r, e in zip(rows[isbad], np.array(errs, object)[isbad]):
                        bad.append(f"{paths[r]} ({e})")
                    if skip_bad:
                        feats[isbad] = 0
                    else:                                                    # neither written nor done
                        keep = ~isbad
                        rows, feats, isbad = rows[keep], feats[keep], isbad[keep]
                if len(rows):
                    writer.put(rows, feats, isbad)
                computed += len(rows)
                bar.update(len(errs))
                if bad:
                    bar.set_postfix(bad=len(bad))
        writer.close()           # raises the writer's error (a full disk) after committing what it wrote
    except OSError as e:         # the writer's I/O error: one line naming the file and the disk
        writer.abort()
        raise disk_error(out, e) from e
    except BaseException:
        writer.abort()           # never raises: the error that stopped us is the one reported
        raise
    finally:
        bar.close()
        if hasattr(batches, "close"):
            batches.close()    # the GPU input path's reader threads
    return computed, bad


# ---- several processes (torchrun) ---------------------------------------------------------------

def _stale_shards(out: Path, world: int) -> list[Path]:
    from pipeline.cache.store import shard_paths
    keep = set(shard_paths(out, world))
    return sorted(p for p in out.parent.glob(f"{out.stem}.rank*-of*{out.suffix or '.h5'}") if p not in keep)


def _existing_final(out: Path, records, *, dataset, backbone, weights, weights_dir, dtype, merge) -> str:
    """'complete' when OUT exists, is complete and matches; 'run' when it should be (re)made."""
    import h5py
    from pipeline.cache import store
    from pipeline.extraction.backbones import load_backbone
    try:
        attrs = store.read_attrs(out)
        with h5py.File(out, "r") as f:
            virtual = f["features"].is_virtual
            done = f["done"][()]                 # a missing VDS source reads as fill value False
    except (UserError, OSError, KeyError):
        raise UserError(f"{out}: exists but is not a readable feature file. Use --force to overwrite it "
                        f"or choose another --out.") from None
    _, spec, sha = load_backbone(backbone, weights, weights_dir)
    prov = make_provenance(spec, sha, dataset, records, dtype)
    check_existing(out, attrs, prov, records)
    if done.all():
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
                        echo: Callable[[str], None] = print, decode: str = "auto"):
    """Extract `records` into OUT with every process of the torchrun group (call it on every rank).

    Returns an extract.ExtractResult summed over the ranks (seconds: the slowest rank).
    A single process (no process group) runs extract.extract unchanged.
    """
    from pipeline import distributed
    from pipeline.cache import store
    from pipeline.distributed import shard

    kw = dict(dataset=dataset, backbone=backbone, weights=weights, weights_dir=weights_dir, dtype=dtype,
              batch_size=batch_size, skip_bad=skip_bad, device=device, dataset_root=dataset_root, decode=decode)
    if merge not in ("vds", "copy"):
        raise UserError(f"--merge {merge}: choose vds or copy.")
    info = distributed.current()
    if not info.distributed:
        return extract(records, out, workers=workers, force=force, progress=progress, **kw)
    out = Path(out)
    records = extractable(records, dataset)
    n = len(records)

    def decide():
        if info.is_main:
            for p in _stale_shards(out, info.world_size):
                echo(f"note: {p} is a shard of a run with another number of processes; it is not used "
                     f"(delete it).")
            if out.exists() and not force:
                return _existing_final(out, records, dataset=dataset, backbone=backbone, weights=weights,
                                       weights_dir=weights_dir, dtype=dtype, merge=merge)
        return "run"
    status = distributed.run_on_all_ranks(decide)[0]
    if status == "complete":
        return ExtractResult(out, n, 0)

    rows = shard(n, info.rank, info.world_size)
    mine = store.shard_path(out, info.rank, info.world_size)
    if workers is None:    # share the node's CPUs between its processes
        workers = max(1, min(8, ((os.cpu_count() or 2) - 1) // max(1, info.local_world_size)))

    def work():
        if not len(rows):
            return (0, [], 0.0)
        res = extract([records[i] for i in rows], mine, workers=workers, force=force,
                      progress=progress and info.is_main, **kw)
        store.write_global_index(mine, rows, info.rank, info.world_size, n, of=out.name)
        return (res.computed, res.bad, res.seconds)
    results = distributed.run_on_all_ranks(work)
    result = ExtractResult(out, n, sum(r[0] for r in results), [b for r in results for b in r[1]],
                           max(r[2] for r in results))

    def do_merge():
        if info.is_main:
            used = [store.shard_path(out, r, info.world_size) for r in range(info.world_size)
                    if len(shard(n, r, info.world_size))]
            store.merge_shards(out, used, records, mode=merge, dataset_root=dataset_root)
    distributed.run_on_all_ranks(do_merge)
    return result


# ---- info ------------------------------------------------------------------------------------------

def info(path: str | Path) -> str:
    """Human-readable summary of a feature file: provenance, rows per split, done/bad counts."""
    import json
    from pipeline.cache import store
    st = store.FeatureStore.open(path, require_complete=False)
    lines = [f"{st.path}"]
    for k in sorted(st.attrs):
        v = st.attrs[k]
        lines.append(f"  {k}: {json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v}")
    lines.append(f"  rows: {st.num_images}  done: {int(st.done.sum())}  bad: {int(st.bad.sum())}  "
                 f"captions: {len(st.captions)}")
    for s in sorted(set(st.split)):
        m = st.split == s
        lines.append(f"  split {s}: {int(m.sum())} images, done {int((st.done & m).sum())}, "
                     f"bad {int((st.bad & m).sum())}")
    return "\n".join(lines)
