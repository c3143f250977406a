"""Length-bucketed batches, as in the paper (sec. 4.3): every batch holds captions of ONE length.

So a batch needs no padding and no mask, and the decoder runs exactly T steps for it.

Rules:
- A caption's length is its number of words n (tokens <start> w1..wn <end> = n + 2).
- Captions with n > max_len words (default 30) or n == 0 are dropped before bucketing;
  `select_lengths` returns the kept mask and the counts dropped, and training logs them.
- Each bucket (one length) is shuffled and cut into batches of `batch_size`; the last batch of a
  bucket may be smaller (a rare length still gets its captions trained on every epoch). Then the
  order of all batches is shuffled. Everything is a function of (seed, epoch) only.

Distributed training (torchrun) splits these same batches across ranks: see
distributed.DistributedBucketSampler.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


def select_lengths(lengths: Sequence[int], max_len: int = 30) -> tuple[np.ndarray, dict]:
    """keep mask (M,) for captions with 1 <= n <= max_len words, and {"too_long": k, "empty": k}."""
    n = np.asarray(lengths, dtype=np.int64)
    too_long, empty = n > max_len, n < 1
    return ~(too_long | empty), {"too_long": int(too_long.sum()), "empty": int(empty.sum())}


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
