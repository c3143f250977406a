"""The data side of training: the feature cache as batches of the run's objective.

    fits_in_memory()   whether the cache is read into (host or GPU) memory once, or lazily from the file(s)
    Features           rows -> (B, L, C) tensor, from memory or lazily
    check_splits()     the train captions and val references, refused when a split has none
    make_data()        -> Data: the sampler, collate function and objective (objectives.py) of --objective
                       (cross-entropy: batches of one caption length; self-critical: batches of images)

train.py reads the epoch's batches from a `Data` (DataLoader workers when the features are read lazily).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline import distributed as dist_mod
from pipeline.cache.readers import LazyFeatures
from pipeline.config import TrainConfig
from pipeline.data.text import Vocab
from pipeline.errors import UserError
from pipeline.training.batching import BucketBatchSampler, DistributedBatchSampler, ImageBatchSampler, select_lengths
from pipeline.training.batching import require_captions
from pipeline.training.objectives import CrossEntropy, SelfCritical, TrainCiderD, reward_references, tokenized


def fits_in_memory(st, device: torch.device, procs: int = 1, log=print) -> bool:
    """Whether the whole cache fits: host RAM (half of what is available, per process of this node),
    and on CUDA also the GPU's free memory (half of it), where the in-RAM cache is moved."""
    nbytes = st.num_images * st.num_regions * st.feature_dim * (2 if st.attrs.get("dtype") == "float16" else 4)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = math.inf
    if nbytes * procs >= 0.5 * avail:
        log(f"features ({nbytes / 2**30:.1f} GiB) do not fit in half the free RAM ({avail / 2**30:.1f} GiB): "
            f"reading them lazily from the file")
        return False
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes >= 0.5 * free:
            log(f"features ({nbytes / 2**30:.1f} GiB) do not fit in half the free GPU memory ({free / 2**30:.1f} GiB): "
                f"reading them lazily from the file")
            return False
    return True


class Features:
    """Rows -> (B, L, C) tensor: from memory (whole cache read once; on the GPU when training there)
    or lazily from the file(s)."""

    def __init__(self, st, in_ram: bool, device: torch.device):
        self.ram = torch.from_numpy(st.load_features()) if in_ram else None   # (N, L, C) stored dtype
        if self.ram is not None and device.type == "cuda":
            self.ram = self.ram.to(device)     # 1.6 GB for Flickr8k: no per-step host->device copy
        self.lazy = None if in_ram else LazyFeatures(st.paths)

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        if self.ram is not None:
            idx = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.ram.device, non_blocking=True)
            return self.ram[idx]
        return torch.from_numpy(self.lazy.read(rows))


class Batches(torch.utils.data.Dataset):
    """Batch k of an epoch -> its tensors; a Dataset so DataLoader workers can read lazily."""

    def __init__(self, batches, collate):
        self.batches, self.collate = batches, collate

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        return self.collate(self.batches[k])


@dataclass
class Data:
    store: object                  # readers.FeatureStore | FusedStore
    features: Features
    refs: dict                     # val row -> raw reference captions
    sampler: object                # batching sampler of the objective
    collate: Callable              # batch indices -> batch tensors
    objective: object              # objectives.CrossEntropy | SelfCritical
    in_ram: bool


def check_splits(st, cfg: TrainConfig) -> tuple[list[str], dict]:
    """The train split's raw captions and the val references ({row: raw captions}); one UserError when a
    split has none (cross-entropy: also when no caption fits --max-len)."""
    train_caps = st.captions_of("train")[1]
    if not train_caps:
        raise UserError(f"{st.path}: the train split has no captions.")
    if cfg.objective == "xe":
        require_captions(train_caps, cfg.max_len, st.path)    # before any work
    refs = {r: c for r, c in st.references("val").items() if c}
    if not refs:
        raise UserError(f"{st.path}: the val split has no captions; model selection needs them.")
    return train_caps, refs


def make_data(st, vocab: Vocab, cfg: TrainConfig, features: Features, refs: dict, in_ram: bool, dinfo,
              echo) -> Data:
    """The batches and objective of cfg.objective (echo says what they are: a resumed run passes a silent
    one); under DDP each rank reads its share of every batch."""
    if cfg.objective == "xe":
        sampler, collate = _xe_data(st, vocab, cfg, features, echo)
        objective = CrossEntropy(cfg.label_smoothing, dist_mod.all_reduce_sum_ if dinfo.distributed else None)
    else:
        sampler, collate, objective = _scst_data(st, vocab, cfg, features, echo)
    if dinfo.distributed:   # batch_size stays the global batch: the same steps for any world size
        sampler = DistributedBatchSampler(sampler, rank=dinfo.rank, world_size=dinfo.world_size)
    return Data(st, features, refs, sampler, collate, objective, in_ram)


def _xe_data(st, vocab: Vocab, cfg: TrainConfig, features: Features, echo):
    rows, caps = st.captions_of("train")
    if cfg.distill:     # sequence-level distillation: the teacher's captions too, or alone (distill.py)
        from pipeline.training.distill import teacher_captions
        t_rows, t_caps, cfg.distill_sha256 = teacher_captions(cfg.distill, st, cfg.distill_sha256)
        echo(f"distillation: {len(t_caps)} teacher captions from {cfg.distill}"
             + ("" if cfg.human_captions else ", the dataset's captions left out"))
        rows, caps = ((np.concatenate([rows, t_rows]), caps + t_caps) if cfg.human_captions else (t_rows, t_caps))
    tokens = [np.array(vocab.encode_caption(c), dtype=np.int64) for c in caps]
    keep, dropped = select_lengths([len(t) - 2 for t in tokens], cfg.max_len)
    rows, tokens = np.asarray(rows)[keep], [t for t, k in zip(tokens, keep) if k]
    sampler = BucketBatchSampler([len(t) - 2 for t in tokens], cfg.batch_size, seed=cfg.seed)
    collate = lambda idx: (features(rows[idx]), torch.from_numpy(np.stack([tokens[i] for i in idx])))  # noqa: E731
    echo(f"{len(tokens)} train captions of {len(st.rows('train'))} images in {len(sampler.buckets)} lengths "
         f"({dropped['too_long']} longer than {cfg.max_len} words and {dropped['empty']} empty dropped)")
    if cfg.flip:    # one view (original / flipped) per caption and epoch: training/views.py
        from pipeline.training.views import flip_views
        sampler, collate = flip_views(sampler, rows, [c for c, k in zip(caps, keep) if k], tokens, vocab, st,
                                      features, seed=cfg.seed)
    return sampler, collate


def _scst_data(st, vocab: Vocab, cfg: TrainConfig, features: Features, echo):
    refs = {r: tokenized(c) for r, c in st.references("train").items() if c}
    refs = reward_references(refs, cfg.scst_reward_end)      # + " <end>" when the reward reads the end token
    rows = np.array(sorted(refs), dtype=np.int64)
    reward = TrainCiderD([refs[r] for r in rows])
    sampler = ImageBatchSampler(rows, cfg.batch_size, seed=cfg.seed)
    collate = lambda idx: (features(rows[idx]), torch.from_numpy(rows[idx]))   # noqa: E731
    objective = SelfCritical(reward, refs, vocab, samples=cfg.scst_samples, baseline=cfg.scst_baseline,
                             max_len=cfg.scst_max_len, end_token=cfg.scst_reward_end)
    echo(f"self-critical: {len(rows)} train images x {cfg.scst_samples} samples of <= {cfg.scst_max_len} words, "
         f"CIDEr-D reward{' with <end>' if cfg.scst_reward_end else ''}, document frequencies of their "
         f"{sum(len(v) for v in refs.values())} references, {cfg.scst_baseline} baseline")
    return sampler, collate, objective

