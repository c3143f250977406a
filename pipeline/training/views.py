"""Training on horizontally flipped views (`train --flip`, a cache made with `extract --flip`).

Each epoch, every training caption is read with one view of its image, the original (0) or the flipped
one (1), drawn from (seed, epoch) only: a resumed epoch regenerates the same views, so resuming stays
bit-exact. The flipped view's caption has "left" and "right" exchanged (data/flip.py); a mirror changes
no caption's length, so the length buckets of batching.py are those of the original captions.
Validation and decoding read the original view.

    ViewSampler(base)   base's batches of caption indices -> (n, 2) arrays [caption index, view]
    flip_views(...)     the sampler and collate function of cross-entropy training with views
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.cache.readers import LazyFeatures, check_view
from pipeline.data.flip import mirror_caption


class ViewSampler:
    """A BucketBatchSampler whose batches carry one view per caption and epoch: each batch is an (n, 2)
    int64 array of (caption index, view), view ~ Bernoulli(0.5) per caption from rng([seed, epoch, 2]).
    DistributedBatchSampler splits these batches by rows like any other."""

    def __init__(self, base, num_captions: int, *, seed: int = 0):
        self.base, self.n, self.seed = base, num_captions, seed

    @property
    def buckets(self):
        return self.base.buckets

    def views(self, epoch: int) -> np.ndarray:
        """(M,) the view of every caption in `epoch`: 0 original, 1 flipped."""
        return np.random.default_rng([self.seed, epoch, 2]).integers(0, 2, self.n)

    def batches(self, epoch: int) -> list[np.ndarray]:
        v = self.views(epoch)
        return [np.stack([b, v[b]], 1) for b in self.base.batches(epoch)]

    def __len__(self) -> int:
        return len(self.base)


class FlippedFeatures:
    """Rows -> (B, L, C) of the flipped view, held where the original view is (RAM/GPU) or read lazily."""

    def __init__(self, st, features):
        check_view(st, "hflip")
        if features.ram is not None:
            self.ram, self.lazy = torch.from_numpy(st.load_features(view="hflip")).to(features.ram.device), None
        else:
            self.ram, self.lazy = None, LazyFeatures(st.paths)

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        if self.ram is not None:
            return self.ram[torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.ram.device)]
        return torch.from_numpy(self.lazy.read(rows, view="hflip"))


def flip_views(sampler, rows: np.ndarray, captions: list[str], tokens: list[np.ndarray], vocab, st, features,
               *, seed: int):
    """(ViewSampler, collate) for cross-entropy with views: caption i is (rows[i], captions[i], tokens[i])
    (tokens <start> w1 .. wn <end>); collate((n, 2) batch) -> (feats (n, L, C), tokens (n, T+1))."""
    flipped = FlippedFeatures(st, features)
    mirrored = []
    for c, t in zip(captions, tokens):
        m = np.array(vocab.encode_caption(mirror_caption(c)), dtype=np.int64)
        mirrored.append(m if len(m) == len(t) else t)     # same length always (one word for one word)
    by_view = (tokens, mirrored)

    def collate(batch: np.ndarray):
        cap, view = batch[:, 0], batch[:, 1]
        flip = view == 1
        x = features(rows[cap])                                   # (n, L, C) original view: a new tensor
        if flip.any():
            x[torch.from_numpy(flip).to(x.device)] = flipped(rows[cap[flip]]).to(x.device)
        y = torch.from_numpy(np.stack([by_view[v][i] for i, v in zip(cap.tolist(), view.tolist())]))
        return x, y
    return ViewSampler(sampler, len(tokens), seed=seed), collate
