"""Several processes (GPUs, nodes) with torchrun: process group, sharding, sharded extraction, DDP sampler.

Everything here is a thin layer over torch.distributed (NCCL on CUDA, gloo on CPU); torchrun starts
the processes and sets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
Without torchrun (WORLD_SIZE unset or 1) every function degrades to the single-process behaviour.
See docs/distributed.md for the commands.

Extraction (`extract_distributed`): rank r of W extracts a contiguous block of rows (`shard`) into its
own file `OUT.rank{r}-of{W}.h5` (the store.create layout over its rows only, plus /global_index, its rows'
positions in OUT); each shard has its own /done mask, so re-running the same command resumes every
shard. When all shards are complete, rank 0 writes OUT with exactly the layout and provenance attrs of a
single-process run: metadata datasets are real; /features, /done and /bad are HDF5 virtual datasets
over the shards (`merge="vds"`, source paths relative to OUT's folder so the folder can move) or real
copies (`merge="copy"`, a standalone file; the shards can then be deleted).

Training (`DistributedBucketSampler`): `batch_size` is the GLOBAL number of captions per optimizer step,
whatever the number of processes. Step k of an epoch is batch k of the single-process sampler
(batching.BucketBatchSampler with the same seed), split into W near-equal parts of one caption length.
A part's loss is weighted by W * len(part) / len(batch), so DDP's gradient average equals the gradient
of the mean loss over the whole batch: training is the same computation for any number of processes,
and a run can resume mid-epoch with a different number of processes.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import UserError

TIMEOUT_ENV = "PIPELINE_DIST_TIMEOUT_MIN"   # collective timeout (rank 0 validates while others wait)
DEFAULT_TIMEOUT_MIN = 60.0
SHARD_ATTRS = ("shard_rank", "shard_world", "shard_of", "global_num_images")


# ---- process group ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None      # None: single process, no process group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        if default is None:
            raise UserError(f"environment variable {name} is not set: start distributed runs with torchrun "
                            f"(see docs/distributed.md), or run without WORLD_SIZE for one process.")
        return default
    try:
        return int(v)
    except ValueError:
        raise UserError(f"environment variable {name}={v!r} is not an integer.") from None


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when not started by torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def backend_for(device) -> str:
    """'nccl' when `device` ('auto' | 'cpu' | 'cuda' or a torch.device) means CUDA here, else 'gloo'."""
    import torch
    kind = getattr(device, "type", str(device))
    return "nccl" if kind.startswith("cuda") or (kind == "auto" and torch.cuda.is_available()) else "gloo"


def init_from_env(backend: str | None = None, timeout_min: float | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment; returns this process's DistInfo.

    WORLD_SIZE unset or 1: no process group, DistInfo() (single process). Otherwise `backend`, by
    default NCCL when CUDA is available, else gloo (pass backend_for(device) for a CPU run on a GPU
    host); with NCCL the process's GPU, LOCAL_RANK, becomes the current device. Idempotent.
    """
    import torch
    import torch.distributed as dist

    world = env_world_size()
    if world <= 1:
        return DistInfo()
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is not in [0, WORLD_SIZE={world}).")
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(k):
            raise UserError(f"environment variable {k} is not set: start distributed runs with torchrun.")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise UserError(f"LOCAL_RANK={local_rank} but this node has {n} visible GPU(s): use "
                            f"--nproc_per_node={n} (or fewer).")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if timeout_min is None:
            timeout_min = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_MIN))
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=timeout_min))
        atexit.register(cleanup)   # CLI runs end with the process; tests may call cleanup() earlier
    return DistInfo(rank, world, local_rank, local_world, dist.get_backend())


def current() -> DistInfo:
    """DistInfo of the initialised process group (DistInfo() when there is none)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    world = dist.get_world_size()
    return DistInfo(dist.get_rank(), world, _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", world),
                    dist.get_backend())


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return current().is_main


def barrier() -> None:
    import torch
    import torch.distributed as dist
    info = current()
    if not info.distributed:
        return
    if info.backend == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def cleanup() -> None:
    """Tear the process group down. On a normal exit all ranks meet at a barrier first: a rank that
    destroys the group while another still talks to it can abort the other (gloo: SIGABRT). While an
    exception propagates there is no barrier, since a failed rank may never arrive."""
    import sys

    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (picklable objects)."""
    import torch.distributed as dist
    if not current().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    import torch.distributed as dist
    info = current()
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device=None) -> bool:
    """True on every rank if `flag` is True on any rank (a collective: call it on all ranks)."""
    import torch
    import torch.distributed as dist
    info = current()
    if not info.distributed:
        return bool(flag)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if info.backend == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def run_on_all_ranks(fn: Callable[[], Any]) -> list:
    """Run fn() on every rank; if it raises on any rank, raise on every rank (no rank hangs waiting).

    Returns the list of every rank's result. The failing rank re-raises its own exception; the other
    ranks raise a UserError naming it.
    """
    err: BaseException | None = None
    try:
        res = fn()
        report = ("ok", res)
    except Exception as e:  # noqa: BLE001 - reported to the peers, then re-raised
        err, res = e, None
        report = ("error", f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e))
    reports = all_gather_object(report)
    if err is not None:
        raise err
    failed = [(r, msg) for r, (status, msg) in enumerate(reports) if status == "error"]
    if failed:
        raise UserError("; ".join(f"rank {r}: {msg}" for r, msg in failed))
    return [msg for _, msg in reports]


def shard(indices: Sequence[int] | np.ndarray | int, rank: int, world: int) -> np.ndarray:
    """Rank `rank`'s part of `indices` (or of range(indices) when an int): contiguous, in order.

    The W parts are disjoint, cover `indices`, depend only on (len, rank, world), and their sizes
    differ by at most one (the first len % W parts have one more).
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    idx = np.arange(indices) if isinstance(indices, (int, np.integer)) else np.asarray(indices)
    n = len(idx)
    q, m = divmod(n, world)
    start = rank * q + min(rank, m)
    return idx[start:start + q + (1 if rank < m else 0)]


# ---- training: the distributed bucket sampler ------------------------------------------------------

class DistributedBucketSampler:
    """Rank `rank`'s share of the single-process length-bucket batches (a DataLoader batch_sampler).

    Built on batching.BucketBatchSampler(lengths, batch_size, seed): its batch k of an epoch (one caption
    length, `batch_size` captions, or fewer for the last batch of a length) is split by `shard` into
    `world_size` near-equal parts; this rank takes part `rank`. Hence, at every step:
      * all ranks hold captions of the same length, and every rank has the same number of steps;
      * every caption of the epoch is in exactly one rank's part (exact coverage, nothing dropped,
        nothing counted twice);
      * `weights(epoch)[k]` = W * len(part) / len(batch): scaling the part's mean loss by it makes the
        DDP average of gradients the gradient of the mean loss over the whole batch.
    When a batch has fewer captions than ranks, a rank left without any gets a filler (the batch's first
    caption) with weight 0: it runs the step (DDP needs every rank) but contributes no gradient.
    Deterministic per (seed, epoch); world_size=1 gives exactly the single-process batches, weights 1.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        from .batching import BucketBatchSampler
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.base = BucketBatchSampler(lengths, batch_size, seed=seed)
        self.lengths, self.buckets = self.base.lengths, self.base.buckets
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """The batches of all ranks together (= the single-process batches)."""
        return self.base.batches(self.epoch if epoch is None else epoch)

    def steps(self, epoch: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
        """(this rank's batches, their loss weights (n_steps,)) for `epoch`; `[k:]` resumes at step k."""
        mine, weights = [], []
        for g in self.global_batches(epoch):
            part = shard(g, self.rank, self.world_size)
            if len(part):
                w = self.world_size * len(part) / len(g)
            else:
                part, w = g[:1], 0.0
            mine.append(part)
            weights.append(w)
        return mine, np.asarray(weights, dtype=np.float64)

    def batches(self, epoch: int | None = None) -> list[np.ndarray]:
        return self.steps(epoch)[0]

    def weights(self, epoch: int | None = None) -> np.ndarray:
        return self.steps(epoch)[1]

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.batches():
            yield b.tolist()

    def __len__(self) -> int:
        return len(self.base)


# ---- training helpers (train.py) ---------------------------------------------------------------------

def epoch_plan(sampler, epoch: int) -> tuple[list[np.ndarray], list[float], list[int]]:
    """(this rank's batches, loss weights, captions per step over all ranks) of an epoch, for either
    sampler: a single-process BucketBatchSampler gives weights 1 and its own batch sizes."""
    if isinstance(sampler, DistributedBucketSampler):
        batches, weights = sampler.steps(epoch)
        return batches, weights.tolist(), [len(g) for g in sampler.global_batches(epoch)]
    batches = sampler.batches(epoch)
    return batches, [1.0] * len(batches), [len(b) for b in batches]


def wrap_ddp(model, device):
    """DistributedDataParallel around `model` when a process group is up, else `model` itself."""
    import torch
    if not current().distributed:
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if getattr(device, "type", str(device)) == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def seed_rank(seed: int, step: int) -> None:
    """Ranks > 0 draw their own dropout / hard-attention samples: a seed from (seed, rank, step), so a
    resumed run (any number of processes) is reproducible. Rank 0 keeps the run's RNG stream."""
    import torch
    info = current()
    if info.distributed and info.rank > 0:
        s = int(np.random.SeedSequence([seed, info.rank, step]).generate_state(1)[0])
        torch.manual_seed(s)
        np.random.seed(s)


def all_reduce_mean_(t):
    """In place: the mean of `t` over ranks (no-op in one process). A collective: call on all ranks."""
    import torch.distributed as dist
    info = current()
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(info.world_size)
    return t


# ---- extraction: shards and the merged file ----------------------------------------------------------

def shard_path(out: str | Path, rank: int, world: int) -> Path:
    """features/x.h5 -> features/x.rank0-of4.h5"""
    out = Path(out)
    return out.with_name(f"{out.stem}.rank{rank}-of{world}{out.suffix or '.h5'}")


def shard_paths(out: str | Path, world: int) -> list[Path]:
    return [shard_path(out, r, world) for r in range(world)]


def _stale_shards(out: Path, world: int) -> list[Path]:
    keep = set(shard_paths(out, world))
    return sorted(p for p in out.parent.glob(f"{out.stem}.rank*-of*{out.suffix or '.h5'}") if p not in keep)


def write_global_index(path: str | Path, rows: np.ndarray, rank: int, world: int, total: int,
                       of: str = "") -> None:
    """Record in a shard which rows of the merged file it holds (idempotent)."""
    import h5py
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


def _filter_records(records, dataset: str):
    records = [r for r in records if r.split]   # as extract.extract: images in no split are not cached
    if not records:
        raise UserError(f"dataset {dataset}: no images with a split to extract.")
    ids = [r.image_id for r in records]
    if len(set(ids)) != len(ids):
        raise UserError(f"dataset {dataset}: duplicate image ids; the dataset reader must yield unique ids.")
    return records


def _existing_final(out: Path, records, *, dataset, backbone, weights, weights_dir, dtype, merge) -> str:
    """'complete' when OUT exists, is complete and matches; 'run' when it should be (re)made."""
    import h5py
    from . import store
    from .backbones import load_backbone
    from .extract import check_existing, make_provenance, refresh_captions
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
                        echo: Callable[[str], None] = print):
    """Extract `records` into OUT with every process of the torchrun group (call it on every rank).

    Returns an extract.ExtractResult summed over the ranks (seconds: the slowest rank).
    A single process (no process group) runs extract.extract unchanged.
    """
    from .extract import ExtractResult, extract

    kw = dict(dataset=dataset, backbone=backbone, weights=weights, weights_dir=weights_dir, dtype=dtype,
              batch_size=batch_size, skip_bad=skip_bad, device=device, dataset_root=dataset_root)
    if merge not in ("vds", "copy"):
        raise UserError(f"--merge {merge}: choose vds or copy.")
    info = current()
    if not info.distributed:
        return extract(records, out, workers=workers, force=force, progress=progress, **kw)
    out = Path(out)
    records = _filter_records(records, dataset)
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
    status = run_on_all_ranks(decide)[0]
    if status == "complete":
        return ExtractResult(out, n, 0)

    rows = shard(n, info.rank, info.world_size)
    mine = shard_path(out, info.rank, info.world_size)
    if workers is None:    # share the node's CPUs between its processes
        workers = max(1, min(8, ((os.cpu_count() or 2) - 1) // max(1, info.local_world_size)))

    def work():
        if not len(rows):
            return (0, [], 0.0)
        res = extract([records[i] for i in rows], mine, workers=workers, force=force,
                      progress=progress and info.is_main, **kw)
        write_global_index(mine, rows, info.rank, info.world_size, n, of=out.name)
        return (res.computed, res.bad, res.seconds)
    results = run_on_all_ranks(work)
    result = ExtractResult(out, n, sum(r[0] for r in results), [b for r in results for b in r[1]],
                           max(r[2] for r in results))

    def do_merge():
        if info.is_main:
            used = [shard_path(out, r, info.world_size) for r in range(info.world_size)
                    if len(shard(n, r, info.world_size))]
            merge_shards(out, used, records, mode=merge, dataset_root=dataset_root)
    run_on_all_ranks(do_merge)
    return result


def merge_shards(out: str | Path, shards: Sequence[str | Path], records, *, mode: str = "vds",
                 dataset_root: str | Path | None = None, copy_rows: int = 256) -> Path:
    """Write OUT from complete shards: the single-process layout and provenance, features/done/bad
    virtual (mode 'vds') or copied (mode 'copy'). `records` are the merged file's rows, in order."""
    import h5py
    from . import store
    from .extract import split_hashes

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
        attrs = store.read_attrs(p)
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
            keys = [k for k in store.PROVENANCE_KEYS if k not in ("split_hashes", "captions_sha256")]  # per shard
            store.check_same_provenance({k: first.get(k) for k in keys}, attrs, what="this shard",
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
    prov = {k: first[k] for k in store.PROVENANCE_KEYS + ("code_version", "created") if k in first}
    prov["split_hashes"] = split_hashes(records)
    prov["captions_sha256"] = store.captions_sha256(records)   # a shard's hash covers its rows only
    if dataset_root is None and first.get("dataset_root"):
        dataset_root = first["dataset_root"]

    # The metadata datasets and attrs exactly as store.create writes them (features there are 1x1).
    meta = out.with_name(out.name + ".meta")
    tmp = out.with_name(out.name + ".merging")
    store.create(meta, records, prov, num_regions=1, feature_dim=1, dtype=dtype, dataset_root=dataset_root)
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


def _runs(rows: np.ndarray):
    """(start, stop) index pairs of runs of consecutive values in rows."""
    if not len(rows):
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return list(zip(np.r_[0, breaks], np.r_[breaks, len(rows)]))


def _virtual(f, out: Path, metas, n: int, L: int, C: int, dt) -> None:
    import h5py
    lay_f = h5py.VirtualLayout(shape=(n, L, C), dtype=dt)
    lay_d = h5py.VirtualLayout(shape=(n,), dtype=bool)
    lay_b = h5py.VirtualLayout(shape=(n,), dtype=bool)
    for p, gi, _, shape, _ in metas:
        name = os.path.relpath(Path(p).resolve(), out.resolve().parent)   # relative: the folder can move
        src_f = h5py.VirtualSource(name, "features", shape=shape, dtype=dt)
        src_d = h5py.VirtualSource(name, "done", shape=(shape[0],), dtype=bool)
        src_b = h5py.VirtualSource(name, "bad", shape=(shape[0],), dtype=bool)
        for a, b in _runs(gi):
            g0, g1 = int(gi[a]), int(gi[a]) + (b - a)
            lay_f[g0:g1] = src_f[a:b]
            lay_d[g0:g1] = src_d[a:b]
            lay_b[g0:g1] = src_b[a:b]
    f.create_virtual_dataset("features", lay_f, fillvalue=0)
    f.create_virtual_dataset("done", lay_d, fillvalue=False)   # a missing shard reads as "not done"
    f.create_virtual_dataset("bad", lay_b, fillvalue=False)


def _copy(f, metas, n: int, L: int, C: int, dtype: str, copy_rows: int) -> None:
    import h5py
    from . import store
    store._create_features(f, (n, L, C), dtype)
    done = np.zeros(n, bool)
    bad = np.zeros(n, bool)
    d = f["features"]
    for p, gi, sbad, _, _ in metas:
        with h5py.File(p, "r") as s:
            src = s["features"]
            for a, b in _runs(gi):
                for i in range(a, b, copy_rows):
                    j = min(b, i + copy_rows)
                    g0 = int(gi[a]) + (i - a)
                    d[g0:g0 + (j - i)] = src[i:j]
        bad[gi] = sbad
        done[gi] = True
    f.create_dataset("bad", data=bad)
    f.flush()
    f.create_dataset("done", data=done)   # after the features, as in a single-process run
