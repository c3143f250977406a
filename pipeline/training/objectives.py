"""What one training step minimises: cross-entropy (teacher forcing) or self-critical sequence training.

An objective turns one batch into (loss, parts): the trainer (train.py) calls it, back-propagates and
steps the optimizer, and knows nothing else of the model.

Cross-entropy (`CrossEntropy`): the paper's objective, model.Decoder.loss (per-word NLL, the doubly
stochastic penalty, hard attention's eq. 12 estimator), optionally with label smoothing.

Self-critical sequence training (`SelfCritical`; Rennie et al., CVPR 2017): the model samples K
captions per image w^1..w^K (train mode: dropout on; hard attention samples its locations, which are
part of the policy), each gets a reward r(w^k), the CIDEr-D of the caption against the image's
training references with document frequencies from the whole train split (`TrainCiderD`:
pycocoevalcap's CiderScorer with that fixed corpus), and the loss is

    L = - sum_k sum_t (r(w^k) - b^k) log p(w^k_t | w^k_<t, a) / (number of sampled tokens)

The baseline b^k is either the mean reward of the image's other K - 1 samples ("mean", the default:
no extra decoding pass, and a baseline that tracks the sampling distribution itself, which Luo 2020,
"A Better Variant of Self-Critical Sequence Training", found to train better than the greedy one) or
the reward of the greedy caption, decoded in eval mode ("greedy", the original SCST).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline.data.text import Vocab, tokenize


class CrossEntropy:
    """batch = (feats (B, L, C), tokens (B, T+1)): model.Decoder.loss on the teacher-forced pass, then
    hard attention's baseline update (over every rank's captions under DDP: `all_reduce`)."""

    name = "xe"

    def __init__(self, label_smoothing: float = 0.0, all_reduce: Callable | None = None):
        self.label_smoothing, self.all_reduce = label_smoothing, all_reduce

    def __call__(self, net, model, batch, device, use_amp: bool, weight: float = 1.0):
        x, y = batch
        x = x.to(device, torch.float32, non_blocking=True)      # (B, L, C)
        y = y.to(device, non_blocking=True)                     # (B, T+1), one length per batch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = net(x, y)
        loss, parts = model.loss(out, y, label_smoothing=self.label_smoothing)
        if "reward_sum" in parts:        # a DDP filler part (weight 0) adds nothing to the baseline either
            live = float(weight != 0)
            model.update_baseline(parts["reward_sum"] * live, parts["reward_n"] * live, self.all_reduce)
        return loss, parts


class TrainCiderD:
    """CIDEr-D of candidates against their references, with the document frequencies of a fixed
    corpus (the train split's references), computed by pycocoevalcap's CiderScorer.

    pycocoevalcap derives the document frequencies from the references of the images being scored,
    which for a training batch of a few dozen images would be a poor estimate; here they come once
    from every training image (Rennie et al. use the training corpus too). Captions are strings of
    text.tokenize'd words joined by spaces.
    """

    def __init__(self, corpus: Sequence[Sequence[str]]):
        from pycocoevalcap.cider.cider_scorer import CiderScorer

        counter = CiderScorer(n=4, sigma=6.0)
        for refs in corpus:
            counter += (None, list(refs))
        counter.compute_doc_freq()
        self.df, self.n_docs = counter.document_frequency, len(counter.crefs)

        class _FixedCorpus(CiderScorer):
            # compute_cider() reads self.document_frequency and sets self.ref_len = log(#images scored):
            # keep the corpus' values instead (the only change to pycocoevalcap's scorer)
            ref_len = property(lambda s: math.log(float(self.n_docs)), lambda s, v: None)

            def compute_doc_freq(s):
                s.document_frequency = self.df

        self._scorer = _FixedCorpus

    def __call__(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """(N,) CIDEr-D of candidate i against references[i] (x10 scale, as pycocoevalcap)."""
        s = self._scorer(n=4, sigma=6.0)
        for c, refs in zip(candidates, references):
            s += (c if c else "<empty>", list(refs))
        s.compute_doc_freq()
        return np.asarray(s.compute_cider(), dtype=np.float64)


def tokenized(captions: Sequence[str]) -> list[str]:
    return [" ".join(tokenize(c)) for c in captions]


class SelfCritical:
    """batch = (feats (B, L, C), rows (B,)): K samples per image, CIDEr-D reward, baseline, policy gradient."""

    name = "scst"

    def __init__(self, reward: TrainCiderD, references: dict[int, list[str]], vocab: Vocab, *,
                 samples: int = 5, baseline: str = "mean", max_len: int = 16):
        if baseline not in ("mean", "greedy"):
            raise ValueError(f"baseline must be 'mean' or 'greedy', not {baseline!r}")
        if baseline == "mean" and samples < 2:
            raise ValueError("the mean-of-others baseline needs at least 2 samples per image")
        self.reward, self.refs, self.vocab = reward, references, vocab
        self.samples, self.baseline, self.max_len = samples, baseline, max_len

    def advantages(self, rewards: np.ndarray, greedy: np.ndarray | None = None) -> np.ndarray:
        """(B, K) r^k - b^k: b^k the mean reward of the image's other samples, or its greedy caption's."""
        if self.baseline == "greedy":
            return rewards - greedy[:, None]
        K = rewards.shape[1]
        return rewards - (rewards.sum(1, keepdims=True) - rewards) / (K - 1)

    def _captions(self, tokens: torch.Tensor) -> list[str]:
        return [self.vocab.decode(t) for t in tokens.tolist()]

    def __call__(self, net, model, batch, device, use_amp: bool, weight: float = 1.0):
        x, rows = batch
        x = x.to(device, torch.float32, non_blocking=True)      # (B, L, C)
        K, B = self.samples, x.size(0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model.sample(x, K, self.max_len)              # B*K captions, row b*K + k
        refs = [self.refs[int(r)] for r in rows.tolist() for _ in range(K)]
        r = self.reward(self._captions(out["tokens"]), refs).reshape(B, K)                  # (B, K)
        greedy = None
        if self.baseline == "greedy":
            was = model.training
            model.eval()
            with torch.no_grad():
                g = model.sample(x, 1, self.max_len, greedy=True)["tokens"]
            model.train(was)
            greedy = self.reward(self._captions(g), refs[::K])                             # (B,)
        adv = torch.as_tensor(self.advantages(r, greedy).reshape(-1), dtype=torch.float32, device=device)
        mask = out["mask"]                                                                   # (B*K, T)
        logp = out["logp"] + out["logp_s"] if "logp_s" in out else out["logp"]
        n_tok = mask.sum()
        loss = -(adv[:, None] * logp * mask).sum() / n_tok
        if "entropy" in out:                                    # hard attention: eq. 12's entropy bonus
            loss = loss - model.cfg.entropy_weight * (out["entropy"] * mask).sum() / n_tok
        parts = {"nll": (-(out["logp"] * mask).sum() / n_tok).detach(), "reg": torch.zeros((), device=device),
                 "reward": torch.as_tensor(float(r.mean()), device=device)}
        return loss, parts
