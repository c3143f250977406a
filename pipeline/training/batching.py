"""Length-bucketed batches, as in the paper (sec. 4.3): every batch holds captions of ONE length.

So a batch needs no padding and no mask, and the decoder runs exactly T steps for it.

Rules:
- A caption's length is its number of words n (tokens <start> w1..wn <end> = n + 2).
- Captions with n > max_len words (default 30) or n == 0 are dropped before bucketing;
  `select_lengths` returns the kept mask and the counts dropped, and training logs them.
- Each bucket (one length) is shuffled and cut into batches of `batch_size`; the last batch of a
  bucket may be smaller (a rare length still gets its captions trained on every epoch). Then the
  order of all batches is shuffled. Everything is a function of (seed, epoch) only.

Self-critical training batches images, not captions (`ImageBatchSampler`): each image is sampled
several times by the model, so there is no reference length to bucket by.

Distributed training (torchrun) splits these same batches across ranks: `DistributedBatchSampler`.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from pipeline.distributed import shard
from pipeline.errors import UserError


def select_lengths(lengths: Sequence[int], max_len: int = 30) -> tuple[np.ndarray, dict]:
    """keep mask (M,) for captions with 1 <= n <= max_len words, and {"too_long": k, "empty": k}."""
    n = np.asarray(lengths, dtype=np.int64)
    too_long, empty = n > max_len, n < 1
    return ~(too_long | empty), {"too_long": int(too_long.sum()), "empty": int(empty.sum())}


def require_captions(captions: Sequence[str], max_len: int, where) -> None:
    """Refuse a --max-len that leaves no train caption: the run would train nothing and save an untrained
    model as best.pt. Called before any work (the cache is not read yet)."""
    from pipeline.data.text import tokenize
    n = np.array([len(tokenize(c)) for c in captions])
    if not select_lengths(n, max_len)[0].any():
        raise UserError(f"--max-len {max_len} drops every train caption of {where} (the shortest has "
                        f"{n[n >= 1].min() if (n >= 1).any() else 0} words); raise --max-len.")


class BucketBatchSampler:
    """Yields lists of caption indices; usable as a DataLoader `batch_sampler`.

    lengths: (M,) words per caption (already filtered by select_lengths). Call `set_epoch(e)`
    before iterating (or use `batches(e)`); `batches(e)[k:]` resumes in the middle of an epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.seed = batch_size, seed
        self.epoch = 0
        # Buckets: length -> caption indices (sorted by length, so the order is fixed).
        order = np.argsort(self.lengths, kind="stable")
        lens = self.lengths[order]
        cuts = np.flatnonzero(np.diff(lens)) + 1
        self.buckets = {int(g[0]): order[s:e] for g, s, e in
                        zip(np.split(lens, cuts), np.r_[0, cuts], np.r_[cuts, len(lens)]) if len(g)}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """The batches of `epoch` (default: the one set with set_epoch), in order."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch])
        out = []
        for n in sorted(self.buckets):
            idx = rng.permutation(self.buckets[n])
            out.extend(idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size))
        perm = rng.permutation(len(out))
        return [out[k] for k in perm]

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.batches():
            yield b.tolist()

    def __len__(self) -> int:
        return sum(-(-len(v) // self.batch_size) for v in self.buckets.values())


class ImageBatchSampler:
    """Batches of image rows for self-critical training: the rows shuffled per (seed, epoch) and cut
    into batches of `batch_size` (the last one may be smaller)."""

    def __init__(self, rows: Sequence[int], batch_size: int, *, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size, self.seed = batch_size, seed

    def batches(self, epoch: int) -> list[np.ndarray]:
        idx = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.rows))
        return [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)



class DistributedBatchSampler:
    """Rank `rank`'s share of a single-process sampler's batches (BucketBatchSampler or ImageBatchSampler).

    Batch k of an epoch is split by `shard` into `world_size` near-equal parts; this rank takes part
    `rank`. Hence, at every step:
      * all ranks hold part of the same batch (one caption length, for buckets), and every rank has
        the same number of steps;
      * every item of the epoch is in exactly one rank's part (exact coverage);
      * `plan(epoch)` weights w_k = W * len(part) / len(batch): scaling the part's mean loss by w_k makes
        the DDP average of gradients the gradient of the mean loss over the whole batch.
    When a batch has fewer items than ranks, a rank left without any gets a filler (the batch's first
    item) with weight 0: it runs the step (DDP needs every rank) but contributes no gradient.
    Deterministic per (seed, epoch); world_size=1 gives exactly the base batches, weights 1.
    """

    def __init__(self, base, *, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.base, self.rank, self.world_size = base, rank, world_size

    def plan(self, epoch: int) -> tuple[list[np.ndarray], list[float], list[int]]:
        """(this rank's batches, their loss weights, items per step over all ranks); `[k:]` resumes at step k."""
        mine, weights, sizes = [], [], []
        for g in self.base.batches(epoch):
            part = shard(g, self.rank, self.world_size)
            w = self.world_size * len(part) / len(g)
            if not len(part):
                part = g[:1]
            mine.append(part)
            weights.append(w)
            sizes.append(len(g))
        return mine, weights, sizes

    def __len__(self) -> int:
        return len(self.base)


def epoch_plan(sampler, epoch: int) -> tuple[list[np.ndarray], list[float], list[int]]:
    """(batches, loss weights, items per step over all ranks) of an epoch for any sampler here."""
    if isinstance(sampler, DistributedBatchSampler):
        return sampler.plan(epoch)
    batches = sampler.batches(epoch)
    return batches, [1.0] * len(batches), [len(b) for b in batches]
