"""Stage one: run a frozen backbone over every image once and cache the annotation vectors in HDF5.

    records -> DataLoader workers (backbones.open_image: read once, hash, decode, preprocess) or the GPU input
    path (gpu_images) -> backbone (B,C,14,14) -> (B,L,C), refused if not finite -> writer thread (writer.py)
    -> /features rows and their picture records, then /done for those rows (after the features are flushed).

Resumable: rows with /done set are skipped, so a killed run (even kill -9) continues where it stopped; over
an existing file, the rows whose picture changed since are computed again (`recheck_pictures`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.device import resolve_device
from pipeline.errors import UserError
from pipeline.fileio import FileLock, disk_error
from pipeline.data.records import Record
from pipeline.provenance import ComputeMeter
from pipeline.cache import identity, layout, readers
from pipeline.extraction.writer import Writer, WriterFailed
from pipeline.extraction import compute

# ---- provenance ------------------------------------------------------------------------------------

def make_provenance(spec, weights_sha256: str, dataset: str, records: Sequence[Record], dtype: str,
                    precision: str = "fp32") -> dict:
    from datetime import datetime, timezone
    from pipeline.provenance import code_version
    return {
        "backbone": spec.name, "weights_sha256": weights_sha256, "preprocessing": spec.preprocessing,
        "input_size": spec.input_size, "grid": list(spec.grid), "feature_dim": spec.feature_dim,
        "dtype": dtype, "precision": precision, "dataset": dataset, "split_hashes": identity.split_hashes(records),
        "captions_sha256": identity.captions_sha256(records), "code_version": code_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **({"layer": spec.layer} if getattr(spec, "layer", "") else {}),   # a cut (extract --layer): cuts.py
    }


# ---- data ------------------------------------------------------------------------------------------

class _Images:
    """Dataset of (row, (3,H,W) tensor, error message or '', Picture) over selected rows; runs in workers."""

    def __init__(self, paths: list[str], rows: np.ndarray, preprocessing: dict):
        self.paths, self.rows, self.pp = paths, rows, preprocessing

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        from pipeline.extraction.backbones import open_image
        row = int(self.rows[i])
        return (row, *open_image(self.paths[row], self.pp))


def _collate(items):
    import torch
    from pipeline.extraction.backbones import Batch
    return Batch(np.array([it[0] for it in items], np.int64), torch.stack([it[1] for it in items]),
                 [it[2] for it in items], [it[3] for it in items])


# ---- extraction ------------------------------------------------------------------------------------

@dataclass
class ExtractResult:
    path: Path
    total: int
    computed: int
    bad: list[str] = field(default_factory=list)
    seconds: float = 0.0
    compute: dict = field(default_factory=dict)    # OUT's `compute` attribute after this session
    precision: str = ""                            # what the backbone computed in (cache_precision)
    conv: str = ""                                 # fp32 on CPU: the convolution path, onednn or gemm (cpu_conv)

    @property
    def images_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


def check_existing(out: Path, attrs: dict, provenance: dict, records: Sequence[Record]) -> None:
    """Refuse to mix into an existing file (`attrs`) made by something else. The captions hash is
    not checked here: changed text over the same pictures is `refresh_captions`' business."""
    expected = {k: v for k, v in identity.provenance_of(provenance).items() if k != "captions_sha256"}
    identity.check_same_provenance(expected, identity.provenance_of(attrs),
                                what="the existing feature file", where=str(out))
    if int(attrs.get("num_images", -1)) != len(records):
        raise UserError(f"{out}: holds {attrs.get('num_images')} images but the dataset has {len(records)}. "
                        f"Use --force to re-extract or choose another --out.")


def refresh_captions(out: Path, attrs: dict, provenance: dict, records: Sequence[Record]) -> None:
    """Same pictures, new caption text (or a file older than caption hashes): rewrite the file's
    captions and objects, keep its features, say so."""
    if attrs.get("captions_sha256") != provenance["captions_sha256"]:
        layout.refresh_annotations(out, records, provenance["captions_sha256"])
        print(f"{out}: the dataset's captions changed (or the file predates caption hashes); refreshed the "
              f"file's captions, features kept.")


def changed_pictures(out: Path, attrs: dict, provenance: dict, records: Sequence[Record]) -> np.ndarray:
    """The finished rows whose picture is no longer the dataset's file (another --root, a re-made synthetic
    set, an edited photo): their features must be computed again, never kept under refreshed captions.

    A format-1 file recorded no pictures: a caption change is refused there (the pictures may have changed
    with the captions), otherwise one note says changed pictures cannot be detected."""
    changed = layout.changed_pictures(out, [r.path for r in records])
    if changed is not None:
        return changed
    if attrs.get("captions_sha256") != provenance["captions_sha256"]:
        raise UserError(f"{out}: the dataset's captions changed, and this file predates per-image picture records "
                        f"(format 1), so whether its pictures changed too cannot be told. Re-extract it with "
                        f"--force (or another --out).")
    print(f"note: {out} predates per-image picture records (format 1): a changed picture cannot be detected "
          f"there; --force re-extracts it with them.")
    return np.zeros(0, np.int64)


def recheck_pictures(out: Path, attrs: dict, provenance: dict, records: Sequence[Record], dataset_root) -> None:
    """Re-extract (forget) the rows whose picture changed, and record the root the pictures were checked at."""
    changed = changed_pictures(out, attrs, provenance, records)
    if len(changed):
        layout.forget_rows(out, changed)
        shown = ", ".join(str(records[r].path) for r in changed[:3]) + (", ..." if len(changed) > 3 else "")
        print(f"{out}: {len(changed)} picture(s) changed since their features were extracted ({shown}); "
              f"re-extracting those rows.")
    old = attrs.get("dataset_root") or ""
    if dataset_root and "image_sha256" in layout.dataset_names(out) and (
            not old or Path(old).resolve() != Path(dataset_root).resolve()):
        layout.set_attrs(out, dataset_root=str(dataset_root))


def cache_precision(out: Path, spec, precision: str, device: str, force: bool) -> str:
    """The precision to extract OUT in: --precision resolved for this backbone and device
    (backbones.resolve_precision). Over an existing file (not --force), `auto` continues it in the precision it
    was made in (files from before precisions were recorded: fp32) and any other precision is refused: one
    cache never mixes rows of two precisions."""
    from pipeline.extraction.backbones import resolve_precision
    if out.exists() and not force:
        try:
            made = layout.read_attrs(out).get("precision") or "fp32"
        except UserError:
            made = None                      # not a feature file: _rows_to_do says so
        if made is not None:
            if precision == "auto":
                return made
            if resolve_precision(spec, precision, device) != made:
                raise UserError(f"{out}: was extracted in {made}; resume it with --precision {made} (or auto), or "
                                f"re-extract it in {precision} with --force or another --out.")
    resolved = resolve_precision(spec, precision, device)
    if resolved == "bf16" and not spec.bf16:
        print(f"note: {spec.name} is not marked safe in bf16 (its features may differ from fp32 beyond rounding; "
              f"docs/features.md); --precision fp32 or auto avoids it.")
    return resolved


def lock_path(out: Path) -> Path:
    """The lock an extraction holds while it writes OUT: a hidden file beside it, removed when released."""
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
            max_batches: int | None = None, decode: str = "auto", layer: str = "", flip: bool = False,
            precision: str = "auto") -> ExtractResult:
    """Fill (or resume) `out` with features of `records`. `max_batches` stops early (tests, benchmarks).
    layer: a cut point of the backbone (backbones.Cut, e.g. conv5_4_input): the activations entering its
    top instead of the final layer. flip: also the horizontally flipped view of every image (/features_hflip).
    precision: auto|fp32|bf16, what the backbone computes in (backbones.resolve_precision; recorded in the
    provenance; auto continues an existing file in its own precision, another one is refused).
    batch_size None: the backbone's `cpu_batch` on CPU, 32 on GPU. One process at a time writes a
    file: a second one is refused (`lock_path`) before it does any work."""
    out = Path(out)
    refuse_folder(out, dataset, backbone)
    if dtype not in ("float16", "float32"):
        raise UserError(f"--dtype {dtype}: choose float16 or float32.")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1.")
    records = extractable(records, dataset)
    missing = [str(r.path) for r in records if not Path(r.path).is_file()]
    if missing and not skip_bad:
        raise UserError(f"{len(missing)} image file(s) missing, e.g. {', '.join(missing[:5])}. "
                        f"Check --root, or pass --skip-bad to record them in /bad.")
    with FileLock(lock_path(out), f"feature file {out}", remove=True):
        return _extract(records, out, dataset=dataset, backbone=backbone, weights=weights,
                        weights_dir=weights_dir, dtype=dtype, batch_size=batch_size, workers=workers, force=force,
                        skip_bad=skip_bad, device=device, dataset_root=dataset_root, progress=progress,
                        max_batches=max_batches, decode=decode, layer=layer, flip=flip, precision=precision)


def _extract(records, out: Path, *, dataset, backbone, weights, weights_dir, dtype, batch_size, workers, force,
             skip_bad, device, dataset_root, progress, max_batches, decode="auto", layer="", flip=False,
             precision="auto") -> ExtractResult:
    """The extraction proper (the lock held): open or create OUT, then run the backbone over the rows to do."""
    import torch

    dev = resolve_device(device)
    meter = ComputeMeter(dev)          # this session's wall / CPU / GPU seconds, added to OUT's `compute`
    from pipeline.extraction.cuts import load_prefix
    module, spec, sha = load_prefix(backbone, layer, weights, weights_dir)     # the whole backbone without --layer
    precision = cache_precision(out, spec, precision, dev, force)
    todo = _rows_to_do(out, records, make_provenance(spec, sha, dataset, records, dtype, precision), spec, dtype=dtype,
                       force=force, skip_bad=skip_bad, dataset_root=dataset_root, flip=flip)
    result = ExtractResult(out, len(records), 0, precision=precision)
    if len(todo) == 0:
        return result
    cuda = dev == "cuda"
    workers = max(1, min(8, (os.cpu_count() or 2) - 1)) if workers is None else workers
    batch_size = batch_size or (32 if cuda else spec.cpu_batch)
    from pipeline.extraction.backbones import conv_memory_format, conv_path
    result.conv = cpu_conv(out, precision, dev)                     # fp32 on CPU: onednn or gemm; else ""
    module = module.to(dev).to(memory_format=(fmt := conv_memory_format(result.conv)))
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
    with conv_path(result.conv):
        result.computed, bad = _run_backbone(module, spec, batches, out, paths, len(todo), dev=dev, dtype=dtype,
                                             skip_bad=skip_bad, progress=progress, max_batches=max_batches,
                                             flip=flip, precision=precision, memory_format=fmt)
    result.seconds, result.bad = time.perf_counter() - t0, bad
    del batches                      # DataLoader workers end (and are waited for): their CPU time counts
    result.compute = compute.record(out, meter.lap(), dev, result.computed)
    if bad and not skip_bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise UserError(f"{len(bad)} image(s) could not be read:\n  {shown}\n"
                        f"Fix or remove them and re-run (finished rows are kept), or pass --skip-bad to "
                        f"record them in /bad of {out}.")
    return result


def cpu_conv(out: Path, precision: str, dev: str) -> str:
    """The convolution path of OUT's rows on CPU in fp32 (backbones.cpu_conv_path), "" otherwise: the one OUT
    records (attribute `cpu_conv`; a cache with rows and no record: onednn, the only path of the code that began
    it), else this machine's, recorded before any row is computed. One cache never mixes the two paths, so a
    resumed extraction's rows are bit-identical to an uninterrupted one's on the machine that began it."""
    import h5py
    from pipeline.extraction.backbones import cpu_conv_path
    path = cpu_conv_path(precision, dev)
    if not path:
        return ""
    with h5py.File(out, "r") as f:
        recorded = str(f.attrs.get("cpu_conv", "")) or ("onednn" if f["done"][()].any() else "")
    if recorded:
        return recorded
    try:
        with h5py.File(out, "r+") as f:
            f.attrs["cpu_conv"] = path
    except OSError as e:
        raise disk_error(out, e) from e
    return path


def _rows_to_do(out: Path, records, prov: dict, spec, *, dtype, force, skip_bad, dataset_root,
                flip: bool = False) -> np.ndarray:
    """Create OUT (or check an existing one is the same extraction, refreshing changed captions);
    the rows still to compute: not done, and earlier --skip-bad rows unless skipping again."""
    import h5py
    if out.exists() and not force:
        try:
            attrs = layout.read_attrs(out)
        except UserError:
            raise UserError(f"{out}: exists but is not a readable feature file. Use --force to overwrite it "
                            f"or choose another --out.") from None
        check_existing(out, attrs, prov, records)
        if ("hflip" in (attrs.get("views") or [])) != flip:
            raise UserError(f"{out}: was extracted {'with' if not flip else 'without'} --flip; give the same views "
                            f"(or --force to re-extract, or another --out).")
        recheck_pictures(out, attrs, prov, records, dataset_root)    # before the captions: never stale rows
        refresh_captions(out, attrs, prov, records)
    else:
        layout.create(out, records, prov, num_regions=spec.num_regions, feature_dim=spec.feature_dim,
                     dtype=dtype, dataset_root=dataset_root, flip=flip)
    with h5py.File(out, "r") as f:
        done, bad_mask = f["done"][()], f["bad"][()]
    return np.flatnonzero(~done if skip_bad else ~done | bad_mask)


def _run_backbone(module, spec, batches, out: Path, paths, total: int, *, dev, dtype, skip_bad, progress,
                  max_batches, flip: bool = False, precision: str = "fp32",
                  memory_format=None) -> tuple[int, list[str]]:
    """Backbone over the batches (backbones.Batch: rows, x (B,3,H,W), errs, pictures), rows handed to the
    writer thread; returns
    (rows computed, bad images). A writer failure (a full disk) stops it with one error. flip: the
    backbone also runs on the mirrored input x.flip(-1) (= preprocessing the mirrored image). precision: "fp32",
    "bf16" or "fp16", resolved (autocast for the latter two). memory_format: the input's (default channels_last;
    NCHW for the GEMM convolutions, backbones.conv_memory_format)."""
    import torch
    memory_format = memory_format or torch.channels_last
    from tqdm import tqdm
    cuda = dev == "cuda"
    from pipeline.extraction.backbones import autocast_dtype
    amp = autocast_dtype(precision)
    writer = Writer(out, dtype)
    writer.start()
    computed, bad = 0, []
    bar = tqdm(total=total, unit="img", desc=f"extract {spec.name} ({precision})", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    try:
        with torch.inference_mode():
            for bi, (rows, x, errs, pictures) in enumerate(batches):
                if max_batches is not None and bi >= max_batches:
                    break
                x = x.to(dev, non_blocking=cuda).contiguous(memory_format=memory_format)  # (B,3,H,W)
                views = []
                for xv in ((x, x.flip(-1)) if flip else (x,)):
                    with torch.autocast(dev, dtype=amp, enabled=amp is not None):
                        y = module(xv)                                       # (B, C, h, w)
                    y = y.flatten(2).transpose(1, 2)                         # (B, L, C), L = h*w row-major
                    # one cast, straight to the stored dtype (autocast outputs are already half on GPU)
                    views.append(y.to(torch.float16 if dtype == "float16" else torch.float32).cpu().numpy())
                feats, flipped = views[0], (views[1] if flip else None)
                isbad = np.array([bool(e) for e in errs])
                for v in views:                                              # never store NaN/inf as features
                    check_computed(v, rows, isbad, paths, spec.name)
                if isbad.any():
                    for r, e in zip(rows[isbad], np.array(errs, object)[isbad]):
                        bad.append(f"{paths[r]} ({e})")
                    if skip_bad:
                        feats[isbad] = 0
                        if flip:
                            flipped[isbad] = 0
                    else:                                                    # neither written nor done
                        keep = ~isbad
                        rows, feats, isbad = rows[keep], feats[keep], isbad[keep]
                        pictures = [p for p, k in zip(pictures, keep) if k]
                        flipped = flipped[keep] if flip else None
                if len(rows):
                    writer.put(rows, feats, isbad, flipped, pictures)
                computed += len(rows)
                bar.update(len(errs))
                if bad:
                    bar.set_postfix(bad=len(bad))
        writer.close()           # raises the writer's error (a full disk) after committing what it wrote
    except WriterFailed as e:    # the writer's I/O error: one line naming the file and the disk
        writer.abort()
        raise disk_error(out, e.error) from e.error
    except OSError as e:
        writer.abort()
        raise disk_error(out, e) from e
    except BaseException:        # a refused batch (NaN features), a backbone error, Ctrl-C: the batches
        _write_queued(writer)    # queued before it are good, so they are written and marked done first
        raise
    finally:
        bar.close()
        if hasattr(batches, "close"):
            batches.close()    # the GPU input path's reader threads
    return computed, bad


def _write_queued(writer: Writer) -> None:
    """Write and commit what the writer still has queued (at most its queue's 8 batches); never raises: the
    error that stopped the extraction is the one reported (a writer failing too just stops)."""
    try:
        writer.close()
    except BaseException:   # noqa: BLE001 - WriterFailed, or a second Ctrl-C while it writes
        writer.abort()


def check_computed(feats: np.ndarray, rows: np.ndarray, isbad: np.ndarray, paths, backbone: str) -> None:
    """feats (B, L, C) as computed: one UserError naming the image and row of the first good image whose
    features hold NaN or inf (broken weights, an fp16 overflow); nothing of the batch is written."""
    sums = feats.reshape(len(feats), -1).sum(axis=1, dtype=np.float32 if feats.dtype == np.float16 else np.float64)
    broken = np.flatnonzero(~np.isfinite(sums) & ~isbad)
    if len(broken):
        r = int(rows[broken[0]])
        raise UserError(f"{paths[r]} (row {r}): backbone {backbone} gave NaN or infinite features "
                        f"({len(broken)} image(s) of this batch). The weights or the device arithmetic are "
                        f"broken (try --dtype float32 or --device cpu); the rows finished so far are kept.")


def refuse_folder(out: Path, dataset: str, backbone: str) -> None:
    """--out names the feature file: a folder there is refused, --force or not (--force was a traceback)."""
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; --out names the feature file to write, e.g. "
                        f"--out {out / f'{dataset}_{backbone}.h5'}.")


# ---- info ------------------------------------------------------------------------------------------

def info(path: str | Path) -> str:
    """Human-readable summary of a feature file: provenance, rows per split, done/bad counts."""
    import json
    st = readers.FeatureStore.open(path, require_complete=False)
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
