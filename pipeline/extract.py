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
from typing import Sequence

import numpy as np

from .device import resolve_device
from .errors import UserError
from .records import Record

FLUSH_EVERY_S = 10.0      # at most this much finished work is lost on a crash


# ---- provenance ------------------------------------------------------------------------------------

def split_hashes(records: Sequence[Record]) -> dict:
    """split -> sha256 of its image ids in file order: identifies the exact rows of a file."""
    from .provenance import sha256_strings
    out = {}
    for s in sorted({r.split for r in records}):
        out[s] = sha256_strings(r.image_id for r in records if r.split == s)
    return out


def make_provenance(spec, weights_sha256: str, dataset: str, records: Sequence[Record], dtype: str) -> dict:
    from datetime import datetime, timezone
    from . import store
    from .provenance import code_version
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
        from .backbones import preprocess_image
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
    """

    def __init__(self, path: Path, dtype: str):
        super().__init__(daemon=True)
        self.path, self.dtype = path, np.dtype(dtype)
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None

    def put(self, rows: np.ndarray, feats: np.ndarray | None, bad: np.ndarray):
        if self.error:
            raise self.error
        self.q.put((rows, feats, bad))

    def close(self):
        self.q.put(None)
        self.join()
        if self.error:
            raise self.error

    def run(self):
        import h5py
        try:
            with h5py.File(self.path, "r+") as f:
                feats_d, done_d, bad_d = f["features"], f["done"], f["bad"]
                pending: list[np.ndarray] = []
                last = time.monotonic()
                while True:
                    item = self.q.get()
                    if item is None:
                        break
                    rows, feats, bad = item         # rows (B,), feats (B, L, C) stored dtype, bad (B,)
                    feats = feats.astype(self.dtype, copy=False)
                    _write_rows(feats_d, rows, feats)
                    for a, b in _runs(rows):        # set and clear: a retried image may now be fine
                        if bad[a:b].any() or bad_d[int(rows[a]):int(rows[a]) + (b - a)].any():
                            bad_d[int(rows[a]):int(rows[a]) + (b - a)] = bad[a:b]
                    pending.append(rows)
                    if time.monotonic() - last >= FLUSH_EVERY_S:
                        self._commit(f, done_d, pending)
                        pending, last = [], time.monotonic()
                self._commit(f, done_d, pending)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            self.error = e

    @staticmethod
    def _commit(f, done_d, pending):
        if not pending:
            return
        f.flush()                                   # features on disk first ...
        rows = np.sort(np.concatenate(pending))
        _write_mask(done_d, rows)
        f.flush()                                   # ... then the done mask


def _runs(rows: np.ndarray):
    """Split sorted-or-not rows into (start_index, stop_index) runs of consecutive row numbers."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return zip(starts, stops)


def _write_rows(d, rows: np.ndarray, feats: np.ndarray):
    for a, b in _runs(rows):                        # contiguous slices: one HDF5 write per run
        d[int(rows[a]):int(rows[a]) + (b - a)] = feats[a:b]


def _write_mask(d, rows: np.ndarray):
    for a, b in _runs(rows):
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
    from . import store
    expected = {k: v for k, v in store.provenance_of(provenance).items() if k != "captions_sha256"}
    store.check_same_provenance(expected, store.provenance_of(attrs),
                                what="the existing feature file", where=str(out))
    if int(attrs.get("num_images", -1)) != len(records):
        raise UserError(f"{out}: holds {attrs.get('num_images')} images but the dataset has {len(records)}. "
                        f"Use --force to re-extract or choose another --out.")


def refresh_captions(out: Path, attrs: dict, provenance: dict, records: Sequence[Record]) -> None:
    """Same pictures, new caption text (or a file older than caption hashes): rewrite the file's
    captions and objects, keep its features, say so."""
    from . import store
    if attrs.get("captions_sha256") != provenance["captions_sha256"]:
        store.refresh_annotations(out, records, provenance["captions_sha256"])
        print(f"{out}: the dataset's captions changed (or the file predates caption hashes); refreshed the "
              f"file's captions, features kept.")


def extract(records: Sequence[Record], out: str | Path, *, dataset: str, backbone: str,
            weights: str | None = None, weights_dir: str | Path = "weights", dtype: str = "float16",
            batch_size: int | None = None, workers: int | None = None, force: bool = False,
            skip_bad: bool = False, device: str = "auto", dataset_root: str | Path | None = None, progress: bool = True,
            max_batches: int | None = None) -> ExtractResult:
    """Fill (or resume) `out` with features of `records`. `max_batches` stops early (tests, benchmarks).
    batch_size None: the backbone's `cpu_batch` on CPU, 32 on GPU."""
    import h5py
    import torch
    from tqdm import tqdm
    from . import store
    from .backbones import load_backbone

    out = Path(out)
    if dtype not in ("float16", "float32"):
        raise UserError(f"--dtype {dtype}: choose float16 or float32.")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1.")
    records = [r for r in records if r.split]     # images without a split (Flickr8k: 91) are not cached
    if not records:
        raise UserError(f"dataset {dataset}: no images with a split to extract.")
    ids = [r.image_id for r in records]
    if len(set(ids)) != len(ids):
        raise UserError(f"dataset {dataset}: duplicate image ids; the dataset reader must yield unique ids.")
    missing = [str(r.path) for r in records if not Path(r.path).is_file()]
    if missing and not skip_bad:
        raise UserError(f"{len(missing)} image file(s) missing, e.g. {', '.join(missing[:5])}. "
                        f"Check --root, or pass --skip-bad to record them in /bad.")

    dev = resolve_device(device)
    module, spec, sha = load_backbone(backbone, weights, weights_dir)
    prov = make_provenance(spec, sha, dataset, records, dtype)

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
    todo = np.flatnonzero(~done)
    if not skip_bad:
        todo = np.flatnonzero(~done | bad_mask)    # earlier --skip-bad rows are retried without it
    result = ExtractResult(out, len(records), 0)
    if len(todo) == 0:
        return result

    if workers is None:
        workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    cuda = dev == "cuda"
    if batch_size is None:
        batch_size = 32 if cuda else spec.cpu_batch
    module = module.to(dev).to(memory_format=torch.channels_last)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = getattr(torch, spec.amp) if (cuda and spec.amp) else None
    paths = [str(r.path) for r in records]
    loader = torch.utils.data.DataLoader(
        _Images(paths, todo, spec.preprocessing), batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=_collate, pin_memory=cuda,
        persistent_workers=False, prefetch_factor=4 if workers > 0 else None)

    batches = iter(loader)     # fork the workers before the writer opens the file: no inherited HDF5 lock
    writer = _Writer(out, dtype)
    writer.start()
    bad: list[str] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc=f"extract {spec.name}", disable=not progress,
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
                result.computed += len(rows)
                bar.update(len(errs))
                if bad:
                    bar.set_postfix(bad=len(bad))
    finally:
        bar.close()
        writer.close()
    result.seconds = time.perf_counter() - t0
    result.bad = bad
    if bad and not skip_bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise UserError(f"{len(bad)} image(s) could not be read:\n  {shown}\n"
                        f"Fix or remove them and re-run (finished rows are kept), or pass --skip-bad to "
                        f"record them in /bad of {out}.")
    return result


# ---- captioning new images -------------------------------------------------------------------------

_ENCODER_CACHE: dict = {}


def encode_images(images: list, provenance: dict, weights_dir: str | Path = "weights", *,
                  weights: str | None = None, device: str = "auto", batch_size: int = 16) -> np.ndarray:
    """PIL images -> (n, L, C) float32 features made exactly as the file with `provenance` was made.

    The backbone and preprocessing come from the provenance; weights whose sha256 differs from the
    recorded one are refused. Features are rounded through the stored dtype, like the cached ones.
    """
    import torch
    from . import store
    from .backbones import get_spec, load_backbone

    name = provenance.get("backbone")
    spec = get_spec(name)
    recorded = provenance.get("weights_sha256")
    if recorded == "random":
        raise UserError(f"the features were made with a randomly initialised {name}; "
                        f"they cannot be reproduced for new images. Re-extract with real weights.")
    if store._norm(provenance.get("preprocessing")) != store._norm(spec.preprocessing):
        raise UserError(f"backbone {name}: this code's preprocessing {spec.preprocessing} differs from the "
                        f"recorded {provenance.get('preprocessing')}; re-extract the features with this version.")
    key = (name, weights, str(weights_dir), device)
    if key not in _ENCODER_CACHE:          # caption.py calls this per image: build the backbone once
        module, _, sha = load_backbone(name, weights, weights_dir)
        dev = resolve_device(device)
        _ENCODER_CACHE.clear()
        _ENCODER_CACHE[key] = (module.to(dev).to(memory_format=torch.channels_last), dev, sha)
    module, dev, sha = _ENCODER_CACHE[key]
    if sha != recorded:
        raise UserError(f"backbone {name}: weights sha256 {sha} differ from the {recorded} recorded in the "
                        f"features' provenance. Use the same weights (--weights / {weights_dir}).")
    stored = np.float16 if provenance.get("dtype", "float16") == "float16" else np.float32
    outs = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.stack([spec.preprocess(im) for im in images[i:i + batch_size]])        # (B,3,H,W)
            x = x.to(dev).contiguous(memory_format=torch.channels_last)
            amp = getattr(torch, spec.amp) if (dev == "cuda" and spec.amp) else None
            with torch.autocast(dev, dtype=amp, enabled=amp is not None):
                y = module(x)
            outs.append(y.float().flatten(2).transpose(1, 2).cpu().numpy().astype(stored))  # (B, L, C)
    if not outs:
        return np.zeros((0, spec.num_regions, spec.feature_dim), np.float32)
    return np.concatenate(outs).astype(np.float32)


# ---- info ------------------------------------------------------------------------------------------

def info(path: str | Path) -> str:
    """Human-readable summary of a feature file: provenance, rows per split, done/bad counts."""
    import json
    from . import store
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
