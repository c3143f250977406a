"""Several processes (GPUs, nodes) with torchrun: the process group and the collectives the stages use.

Everything here is a thin layer over torch.distributed (NCCL on CUDA, gloo on CPU); torchrun starts
the processes and sets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
Without torchrun (WORLD_SIZE unset or 1) every function degrades to the single-process behaviour.
See docs/distributed.md for the commands.

Where the distributed parts of each stage live: sharded extraction is extraction.sharded.extract_distributed
(merged by cache.shards.merge_shards); the DDP batch split is batching.DistributedBatchSampler; training
calls `wrap_ddp`, `seed_rank`, `all_reduce_*` and `any_rank` from here.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.errors import UserError

TIMEOUT_ENV = "PIPELINE_DIST_TIMEOUT_MIN"   # collective timeout (rank 0 validates while others wait)
DEFAULT_TIMEOUT_MIN = 60.0


# ---- index shards --------------------------------------------------------------------------------
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


# ---- training helpers ---------------------------------------------------------------------

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




def all_reduce_sum_(t):
    """In place: the sum of `t` over ranks (no-op in one process). A collective: call on all ranks."""
    import torch.distributed as dist
    if current().distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
