"""What one training step minimises: cross-entropy (teacher forcing) or self-critical sequence training.

An objective turns one batch into (loss, parts): the trainer (train.py) calls it, back-propagates and
steps the optimizer, and knows nothing else of the model.

Cross-entropy (`CrossEntropy`, `xe_loss`): the paper's objective on the teacher-forced pass
(model.Decoder.forward): the per-word NLL, optionally label-smoothed, the doubly stochastic penalty (eq. 14)
and, for hard attention, the eq. 12 estimator with its moving baseline (`update_baseline`).

Doubly stochastic regularisation [4.2.1, eq. 14], exact reduction used here:
    loss = 1/(B*T) * sum_b [ sum_t -log p(y_bt) + alpha_c * sum_i (1 - sum_t alpha_bti)^2 ]
i.e. eq. 14 per caption, averaged over the batch and divided by the caption length T (all captions
of a batch have one length, see batching.py), so `nll` is the usual per-word NLL and the penalty
enters with the weight the paper's equation gives it relative to the caption's NLL. (The authors'
Theano code instead adds alpha_c * sum_b mean_i (1 - sum_t alpha_bti)^2 to the batch-mean of the
per-caption summed NLL: an effective weight of alpha_c * B / L relative to eq. 14.) The penalty is
large in value (sum_i (1 - T/L)^2 ≈ 170 at uniform attention) but nearly constant; only its
deviations move alpha, so the logged `nll` is the number to watch.

Hard attention [4.1, eq. 12]: for the captions that sampled their locations s (model.Decoder.forward),
    lambda_r (R - b) d log p(s | a) + lambda_e d H[s],   R = log p(y | s, a) (/ T with reward_per_word)
with b the moving average of R (a buffer of the model, so checkpoints carry it), updated after the loss
(the advantage uses the old baseline) over every rank's captions under DDP.

Self-critical sequence training (`SelfCritical`; Rennie et al., CVPR 2017): the model samples K
captions per image w^1..w^K (train mode: dropout on; hard attention samples its locations, which are
part of the policy), each gets a reward r(w^k), the CIDEr-D of the caption against the image's
training references with document frequencies from the whole train split (`TrainCiderD`:
pycocoevalcap's CiderScorer with that fixed corpus), and the loss is

    L = - sum_k sum_t (r(w^k) - b^k) log p(w^k_t | w^k_<t, a) / (number of sampled tokens)

The reward reads every token the model emitted: a sampled `<unk>` is the word "<unk>" (it matches no
reference n-gram, so it costs what any wrong word costs; Vocab.decode would drop it). With `end_token`
(TrainConfig.scst_reward_end, on by default, as the field's SCST recipe: Rennie et al.'s and ruotianluo's
code append the end token to candidates and references) a caption that ended is scored as
"w1 .. wn <end>" against references "r1 .. rm <end>" (document frequencies from the same texts), so its
final n-grams are matched against the references' endings; a caption cut by the length limit
(Decoder.sample: at most max_len words, then <end>) gets no "<end>".

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
import torch.nn.functional as F

from pipeline.config import DecoderConfig
from pipeline.data.text import END, Vocab, tokenize
from pipeline.decoder.attention import f32


def attention_entropy(entropy: torch.Tensor, token_mask: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """Hard attention's entropy bonus [4.1, eq. 12's lambda_e term], the one definition that teacher forcing
    (xe_loss) and self-critical training (SelfCritical) both subtract (times entropy_weight):

        sum over the captions that sampled their locations, over their tokens, of H[alpha_t]
        / (number of tokens of all captions, sampled or not)

    so an expected-context caption counts zero, and with teacher forcing (every caption T tokens) the
    divisor is B*T. entropy (N, T) H[alpha_t], token_mask (N, T) 1.0 for the caption's tokens (all ones
    under teacher forcing), sampled (N,) bool. Returns a scalar.
    """
    keep = token_mask * sampled[:, None].to(token_mask.dtype)                  # (N, T)
    return (entropy * keep).sum() / token_mask.sum().clamp_min(1.0)


def doubly_stochastic_penalty(alphas: torch.Tensor) -> torch.Tensor:
    """Eq. 14's penalty per caption, averaged over the batch and divided by T (the module docstring):
    alphas (B, T, L) -> mean_b sum_i (1 - sum_t alpha_bti)^2 / T."""
    return ((1.0 - alphas.sum(1)) ** 2).sum(1).mean() / alphas.size(1)


def hard_attention_terms(cfg: DecoderConfig, out: dict, nll_bt: torch.Tensor, baseline: torch.Tensor):
    """Eq. 12's surrogate for the captions that sampled their locations: returns (lambda_r * reinforce,
    lambda_e * entropy, parts), the loss being ... + reinforce - entropy; parts the mean reward of the sampled
    captions, their reward sum and count (for `update_baseline`). out: Decoder.forward's logp_s, entropy
    (B, T) and sampled (B,); nll_bt (B, T) -log p(y_t); baseline the model's b (a scalar tensor)."""
    B, T = nll_bt.shape
    # eq. 12: lambda_r (log p(y|s,a) - b) d log p(s|a) + lambda_e d H[s], for sampled captions.
    loglik = -nll_bt.detach().sum(1)                    # (B,) log p(y | s, a)
    reward = loglik / T if cfg.reward_per_word else loglik
    mask = out["sampled"].float()                       # (B,)
    adv = (reward - baseline) * mask                    # (B,)
    # per caption: lambda_r (R - b) grad log p(s) / T, as the NLL; with per-word rewards r = R / T
    # that is (r - b) grad log p(s), so the batch sum is divided by B only.
    reinforce = -(adv * out["logp_s"].sum(1)).sum() / (B if cfg.reward_per_word else B * T)
    entropy = attention_entropy(out["entropy"], torch.ones_like(out["entropy"]), out["sampled"])
    parts = {"reward": (reward * mask).sum() / mask.sum().clamp_min(1.0), "reward_sum": (reward * mask).sum(),
             "reward_n": mask.sum()}
    return cfg.reinforce_weight * reinforce, cfg.entropy_weight * entropy, parts


def xe_loss(model, out: dict, tokens: torch.Tensor, *, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The teacher-forcing objective of one batch (the module docstring gives the exact reduction).
    model: the Decoder (its cfg and, for hard attention, its baseline); out = model(feats, tokens);
    tokens (B, T+1).

    label_smoothing: the per-word term is cross-entropy against (1 - eps) one-hot + eps uniform
    (Szegedy et al. 2016); 0 gives the plain NLL.
    Returns (loss scalar, parts) where parts are detached: nll (per word, never smoothed), reg, and
    for hard attention the mean reward of the sampled captions, their reward sum and count (for
    `update_baseline`, which the caller runs after the loss: the advantage uses the old baseline).
    No host sync happens here.
    """
    cfg = model.cfg
    logits, alphas = out["logits"], out["alphas"]           # (B, T, V), (B, T, L)
    B, T = tokens.size(0), tokens.size(1) - 1
    target = tokens[:, 1:]                                  # (B, T)
    flat = f32(logits).reshape(B * T, -1)
    nll_bt = F.cross_entropy(flat, target.reshape(-1), reduction="none").view(B, T)   # (B, T)
    nll = nll_bt.mean()
    word = nll if label_smoothing == 0 else F.cross_entropy(flat, target.reshape(-1),
                                                            label_smoothing=label_smoothing)
    reg = doubly_stochastic_penalty(alphas) if cfg.alpha_c > 0 else nll.new_zeros(())
    loss = word + cfg.alpha_c * reg
    parts = {"nll": nll.detach(), "reg": reg.detach()}
    if "logp_s" in out:
        reinforce, entropy, hard_parts = hard_attention_terms(cfg, out, nll_bt, model.baseline)
        loss = loss + reinforce - entropy
        parts.update(hard_parts)
    return loss, parts


@torch.no_grad()
def update_baseline(model, reward_sum: torch.Tensor, n: torch.Tensor, all_reduce: Callable | None = None) -> None:
    """Hard attention's moving baseline (model.baseline, in place): b_k = decay b_{k-1} + (1 - decay) mean
    reward of the sampled captions. all_reduce(t) sums over processes in place (DDP): the mean is over
    every rank's captions. No host sync."""
    tot = torch.stack([reward_sum, n]).float()
    if all_reduce is not None:
        all_reduce(tot)
    decay, b = model.cfg.baseline_decay, model.baseline
    b.copy_(torch.where(tot[1] > 0, decay * b + (1 - decay) * tot[0] / tot[1].clamp_min(1.0), b))


class CrossEntropy:
    """batch = (feats (B, L, C), tokens (B, T+1)): `xe_loss` on the teacher-forced pass, then hard
    attention's baseline update (over every rank's captions under DDP: `all_reduce`)."""

    name = "xe"

    def __init__(self, label_smoothing: float = 0.0, all_reduce: Callable | None = None):
        self.label_smoothing, self.all_reduce = label_smoothing, all_reduce

    def __call__(self, net, model, batch, device, use_amp: bool, weight: float = 1.0):
        x, y = batch
        x = x.to(device, torch.float32, non_blocking=True)      # (B, L, C)
        y = y.to(device, non_blocking=True)                     # (B, T+1), one length per batch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = net(x, y)
        loss, parts = xe_loss(model, out, y, label_smoothing=self.label_smoothing)
        if "reward_sum" in parts:        # a DDP filler part (weight 0) adds nothing to the baseline either
            live = float(weight != 0)
            update_baseline(model, parts["reward_sum"] * live, parts["reward_n"] * live, self.all_reduce)
        return loss, parts


class _Frequencies(dict):
    """Document frequencies that never grow: looking up an n-gram the corpus lacks gives 0.0 (what
    pycocoevalcap's defaultdict(float) gives) without inserting it. pycocoevalcap's counts2vec reads
    document_frequency[ngram] for every n-gram of every candidate; with the defaultdict each unseen sampled
    n-gram became a new entry of the corpus table, which grew without bound over SCST (issue 18: 45 ->
    266,767 entries after 200 calls of 80 captions)."""

    __slots__ = ()

    def __missing__(self, ngram):
        return 0.0


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
        self.df, self.n_docs = _Frequencies(counter.document_frequency), len(counter.crefs)   # read-only from here

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


def reward_references(refs: dict[int, list[str]], end_token: bool) -> dict[int, list[str]]:
    """The references as the reward reads them: tokenized captions, with " <end>" appended when the reward
    includes the end token (SelfCritical's end_token; its TrainCiderD corpus must be built from these too).
    tokenize() never yields "<end>" or "<unk>" (it keeps letters and digits only), so they match no word."""
    return {r: [f"{c} {END}" for c in cs] for r, cs in refs.items()} if end_token else refs


class SelfCritical:
    """batch = (feats (B, L, C), rows (B,)): K samples per image, CIDEr-D reward, baseline, policy gradient."""

    name = "scst"

    def __init__(self, reward: TrainCiderD, references: dict[int, list[str]], vocab: Vocab, *,
                 samples: int = 5, baseline: str = "mean", max_len: int = 16, end_token: bool):
        """references: row -> reward_references(tokenized captions, end_token); max_len: the longest
        sampled caption in words (<end> not counted, Decoder.sample)."""
        if baseline not in ("mean", "greedy"):
            raise ValueError(f"baseline must be 'mean' or 'greedy', not {baseline!r}")
        if baseline == "mean" and samples < 2:
            raise ValueError("the mean-of-others baseline needs at least 2 samples per image")
        self.reward, self.refs, self.vocab = reward, references, vocab
        self.samples, self.baseline, self.max_len, self.end_token = samples, baseline, max_len, end_token

    def advantages(self, rewards: np.ndarray, greedy: np.ndarray | None = None) -> np.ndarray:
        """(B, K) r^k - b^k: b^k the mean reward of the image's other samples, or its greedy caption's."""
        if self.baseline == "greedy":
            return rewards - greedy[:, None]
        K = rewards.shape[1]
        return rewards - (rewards.sum(1, keepdims=True) - rewards) / (K - 1)

    def captions(self, out: dict) -> list[str]:
        """The reward's text of Decoder.sample's captions: every token the caption holds (mask 1) as its
        vocabulary string, specials included ("<unk>"), and "<end>" only with end_token and only when
        the caption ended (not when it was cut at max_len words)."""
        itos, texts = self.vocab.itos, []
        for ids, m in zip(out["tokens"].tolist(), out["mask"].tolist()):
            ids = [i for i, keep in zip(ids, m) if keep]
            ended = bool(ids) and ids[-1] == Vocab.end
            words = [itos[i] for i in (ids[:-1] if ended else ids)]
            texts.append(" ".join(words + [END] if ended and self.end_token else words))
        return texts

    def __call__(self, net, model, batch, device, use_amp: bool, weight: float = 1.0):
        x, rows = batch
        x = x.to(device, torch.float32, non_blocking=True)      # (B, L, C)
        K, B = self.samples, x.size(0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model.sample(x, K, self.max_len)              # B*K captions, row b*K + k
        refs = [self.refs[int(r)] for r in rows.tolist() for _ in range(K)]
        r = self.reward(self.captions(out), refs).reshape(B, K)                             # (B, K)
        greedy = None
        if self.baseline == "greedy":
            was = model.training
            model.eval()
            with torch.no_grad():
                g = model.sample(x, 1, self.max_len, greedy=True)
            model.train(was)
            greedy = self.reward(self.captions(g), refs[::K])                              # (B,)
        adv = torch.as_tensor(self.advantages(r, greedy).reshape(-1), dtype=torch.float32, device=device)
        mask = out["mask"]                                                                   # (B*K, T)
        logp = out["logp"] + out["logp_s"] if "logp_s" in out else out["logp"]
        n_tok = mask.sum()
        loss = -(adv[:, None] * logp * mask).sum() / n_tok
        if "entropy" in out:                    # hard attention: eq. 12's entropy bonus, as in xe_loss
            loss = loss - model.cfg.entropy_weight * attention_entropy(out["entropy"], mask, out["sampled"])
        parts = {"nll": (-(out["logp"] * mask).sum() / n_tok).detach(), "reg": torch.zeros((), device=device),
                 "reward": torch.as_tensor(float(r.mean()), device=device)}
        return loss, parts
