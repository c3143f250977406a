"""Greedy and batched beam-search decoding over the `Decoder.init_state/step` interface.

Both work on whole batches of images at once and on any device. They only rely on
(docs/design.md):

    state, ctx = model.init_state(feats)                       # batch on dim 0 of every tensor
    logprobs (B,V), alpha (B,L), state = model.step(prev (B,), state, ctx)

and are generic over the structure of `state` / `ctx` (tensors, tuples, lists, dicts of them).
A model whose class sets `ctx_per_image = True` (model.Decoder) also accepts ctx with one row per
image while state has K rows per image (beam search's B*K hypotheses): beam search then never
copies ctx K times (a K-fold copy of the 2 x 100 x 196 x 512 floats of a batch costs about two steps).

`max_len` counts WORDS (<end> not counted), as training's caption filter and Decoder.sample do: at
most max_len + 1 steps run, and step max_len + 1 may only end the caption. `rules` (rules.Rules, from
config.DecodingRules) masks tokens at each step: <unk>, repeated trigrams, <end> after a function word.

Conventions of the returned hypotheses:
  * `tokens` never holds <start>; it ends with <end> when the hypothesis ended (`ended`), and has
    max_len words and no <end> when no caption of its image finished (max-length fallback);
  * `alphas` is (T, L) with one attention map per token of `tokens` (the map used to predict it);
  * `score` is the sum of token log-probabilities, divided by len(tokens) ** length_norm when
    length normalisation is on.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data.text import Vocab
from pipeline.decoder.rules import Rules

START, END, PAD = Vocab.start, Vocab.end, Vocab.pad
COMPACT_FRACTION = 0.25   # drop finished images' rows once they are this fraction of the batch
_UNSET = object()          # the step masks are made at the first step (V is known then)


class Hypothesis(NamedTuple):
    tokens: list[int]        # generated ids, no <start>; ends with <end> iff the caption ended
    alphas: torch.Tensor     # (T, L) float32 on CPU, one map per token
    score: float             # (normalised) log-probability

    @property
    def ended(self) -> bool:
        return bool(self.tokens) and self.tokens[-1] == END


# -- pytrees of tensors ---------------------------------------------------------------------------
def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply `fn` to every tensor inside nested tuples/lists/dicts; other leaves pass through."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(o, fn) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def first_tensor(obj: Any) -> torch.Tensor:
    """The first tensor leaf of a pytree: feats may be one (B, L, C) tensor or a tuple of them
    (an Ensemble whose members read different caches); B and the device come from it."""
    if torch.is_tensor(obj):
        return obj
    for o in (obj.values() if isinstance(obj, dict) else obj):
        t = first_tensor(o)
        if t is not None:
            return t
    return None


def select_rows(obj: Any, idx: torch.Tensor, batch: int) -> Any:
    """index_select(0, idx) on every tensor whose dim 0 is the batch; anything else is shared."""
    # t[idx] is index_select(0, idx); on CPU it copies large rows faster than index_select itself
    return map_tensors(obj, lambda t: t[idx] if t.dim() > 0 and t.size(0) == batch else t)


class _eval_mode:
    """Decode in eval mode (no dropout) without changing the caller's model mode for good."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = getattr(self.model, "training", False)
        if hasattr(self.model, "eval"):
            self.model.eval()

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train()


# -- greedy ---------------------------------------------------------------------------------------
def greedy_decode(model, feats: torch.Tensor, max_len: int = 20, *, rules: Rules | None = None,
                  start_id: int = START, end_id: int = END) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Arg-max decoding of at most `max_len` words. feats (B,L,C) -> (tokens per image, alphas (T,L) per image).

    At most max_len + 1 steps: step max_len + 1 may only end the caption; when its arg-max is a word
    instead, the caption stops at max_len words without <end> (unfinished)."""
    x = first_tensor(feats)
    B, dev = x.size(0), x.device
    with _eval_mode(model), torch.inference_mode():
        state, ctx = model.init_state(feats)
        prev = torch.full((B,), start_id, dtype=torch.long, device=dev)
        hist = torch.full((B, max_len + 1), PAD, dtype=torch.long, device=dev)     # (B, T) tokens so far
        ended = torch.zeros(B, dtype=torch.bool, device=dev)
        lengths = torch.full((B,), max_len, dtype=torch.long, device=dev)        # unfinished: max_len words
        alps, masks = [], _UNSET
        for t in range(max_len + 1):
            logp, alpha, state = model.step(prev, state, ctx)      # (B,V), (B,L)
            logp = logp.float()
            if masks is _UNSET:
                masks = (rules or Rules()).masks(logp.size(1), dev)
            if masks is not None:
                masks(logp, hist[:, :t], prev)
            prev = logp.argmax(1)                                    # (B,)
            hist[:, t] = prev
            alps.append(alpha.float())
            new_end = (prev == end_id) & ~ended
            lengths[new_end] = t + 1
            ended |= new_end
            if bool(ended.all()):
                break
        tokens = hist[:, :len(alps)].cpu()                           # (B,T)
        alphas = torch.stack(alps, 1).cpu()                          # (B,T,L)
        lengths = lengths.clamp(max=tokens.size(1)).cpu()
    n = lengths.tolist()
    return ([tokens[b, :n[b]].tolist() for b in range(B)], [alphas[b, :n[b]] for b in range(B)])


# -- beam search ----------------------------------------------------------------------------------
class _Beams:
    """The live hypotheses: n images x w rows (row b*w + k), all with the same m words so far.

    state: the model's state (a pytree, R = n*w rows); tokens (R, m); alphas (R, m, L); scores (R,) the
    sums of log-probabilities (-inf: an empty slot)."""

    __slots__ = ("state", "tokens", "alphas", "scores")

    def __init__(self, state, tokens: torch.Tensor, alphas: torch.Tensor, scores: torch.Tensor):
        self.state, self.tokens, self.alphas, self.scores = state, tokens, alphas, scores

    def select(self, rows: torch.Tensor) -> "_Beams":
        """Every per-hypothesis tensor re-indexed: rows = the parents of the next hypotheses, or the
        hypotheses kept when finished images leave the batch."""
        R = self.scores.size(0)
        return _Beams(select_rows(self.state, rows, R), self.tokens[rows], self.alphas[rows], self.scores[rows])

    def grow(self, words: torch.Tensor, alpha: torch.Tensor, scores: torch.Tensor) -> "_Beams":
        """Append one word (R,) and the attention map it was predicted with (R, L); new scores (R,)."""
        self.tokens = torch.cat([self.tokens, words[:, None]], 1)
        self.alphas = torch.cat([self.alphas, alpha[:, None]], 1)
        self.scores = scores
        return self

    def prev(self, start_id: int) -> torch.Tensor:
        if self.tokens.size(1):
            return self.tokens[:, -1]
        return torch.full_like(self.scores, start_id, dtype=torch.long)


class _Finished:
    """Per image: its best finished hypothesis so far (ranking score, tokens with <end>, alphas, length)
    and how many finished ones it has. Updated on the device every step (no host sync)."""

    def __init__(self, n: int, T: int, L: int, dev):
        self.score = torch.full((n,), -math.inf, device=dev)
        self.tokens = torch.full((n, T), PAD, dtype=torch.long, device=dev)
        self.alphas = torch.zeros(n, T, L, device=dev)
        self.length = torch.zeros(n, dtype=torch.long, device=dev)
        self.count = torch.zeros(n, dtype=torch.long, device=dev)

    def add(self, final: torch.Tensor, stored: torch.Tensor, beams: _Beams, alpha: torch.Tensor, end_id: int):
        """final (n, w): ranking score of each row's <end> candidate (-inf: not stored); stored (n, w)."""
        n, w = final.shape
        m = beams.tokens.size(1)
        best, k = final.max(1)                                          # (n,)
        better = best > self.score
        rows = torch.arange(n, device=k.device) * w + k
        b1, b2 = better[:, None], better[:, None, None]
        self.tokens[:, :m] = torch.where(b1, beams.tokens[rows], self.tokens[:, :m])
        self.tokens[:, m] = torch.where(better, end_id, self.tokens[:, m])
        self.alphas[:, :m] = torch.where(b2, beams.alphas[rows], self.alphas[:, :m])
        self.alphas[:, m] = torch.where(b1, alpha[rows], self.alphas[:, m])
        self.length = torch.where(better, m + 1, self.length)
        self.score = torch.where(better, best, self.score)
        self.count += stored.sum(1)

    def select(self, images: torch.Tensor) -> "_Finished":
        for k in ("score", "tokens", "alphas", "length", "count"):
            setattr(self, k, getattr(self, k)[images])
        return self


def beam_search(model, feats: torch.Tensor, beam: int = 3, max_len: int = 20,
                length_norm: float | None = None, *, rules: Rules | None = None, start_id: int = START,
                end_id: int = END, all_beams: bool = False) -> list[Hypothesis]:
    """Batched beam search: all images of `feats` (B,L,C) at once, captions of at most `max_len` words.

    Each image keeps K = `beam` live hypotheses (rows b*K + k). At every step the candidates are
    (live hypothesis, token); an <end> candidate that ranks among the image's K best candidates is a
    finished caption: it LEAVES the beam (stored with its ranking score), and the beam keeps the K best
    word candidates, so finished captions of every length compete on their final (length-normalised)
    scores. `length_norm` X ranks finished captions by sum log p / len**X, len counting <end>.
    An image is done when its best finished caption outranks anything its live hypotheses can still
    become (sum log p only falls as a caption grows: the bound is live / (max_len + 1)**X; exact), or
    when it has K finished captions and the best one outranks the live ones' raw sum log p (without
    length norm the same test), or after step max_len + 1, which may only end a caption. A
    hypothesis that never ended wins only when no caption of its image finished (Hypothesis.ended
    False, max_len words). With beam 1 this is exactly greedy_decode. `rules` (rules.Rules): the
    tokens masked at each step (<unk>, repeated trigrams, <end> after a function word).
    Done images leave the batch (in groups, see COMPACT_FRACTION) so later steps get cheaper.
    all_beams: each image gets a list of its K final hypotheses instead, best first (see _collect_all).
    """
    if beam < 1 or max_len < 1:
        raise ValueError(f"beam and max_len must be >= 1, got beam {beam}, max_len {max_len}")
    X = float(length_norm or 0.0)
    x = first_tensor(feats)
    B, K, dev = x.size(0), beam, x.device
    results: list[Hypothesis | None] = [None] * B
    per_image = bool(getattr(model, "ctx_per_image", False))
    with _eval_mode(model), torch.inference_mode():
        state, ctx = model.init_state(feats)
        beams = _Beams(state, torch.zeros(B, 0, dtype=torch.long, device=dev), None, torch.zeros(B, device=dev))
        fin, masks, w = None, _UNSET, 1                                     # w: rows per image (1 at t = 1)
        images = torch.arange(B)                                            # (n,) original index, CPU
        collected = torch.zeros(B, dtype=torch.bool, device=dev)           # (n,) result already stored
        for t in range(1, max_len + 2):                                     # t: tokens of a candidate
            n = images.numel()
            logp, alpha, beams.state = model.step(beams.prev(start_id), beams.state, ctx)   # (n*w,V), (n*w,L)
            logp, alpha = logp.float(), alpha.float()
            V = logp.size(1)
            if masks is _UNSET:
                masks = (rules or Rules()).masks(V, dev)
                beams.alphas = alpha.new_zeros(B, 0, alpha.size(1))
                fin = (_AllFinished(B, max_len + 1, alpha.size(1), dev, K) if all_beams
                       else _Finished(B, max_len + 1, alpha.size(1), dev))
            if masks is not None:
                masks(logp, beams.tokens, beams.prev(start_id))
            top, idx, ends, stored = _candidates(beams.scores, logp, n, w, K, end_id)
            fin.add(torch.where(stored, ends / float(t) ** X, -math.inf), stored, beams, alpha, end_id)
            best_live = top[:, 0]                                           # (n,) raw sum log p
            done = ((fin.count >= K) & (fin.score >= best_live)) | (fin.score >= best_live / float(max_len + 1) ** X)
            if t == max_len + 1:
                done[:] = True
            new = done & ~collected
            if bool(new.any()):
                (_collect_all if all_beams else _collect)(results, images, new, fin, beams, w, X)
                collected |= new
            n_done = int(collected.sum())
            if n_done == n:
                break
            rows = (torch.arange(n, device=dev)[:, None] * w + idx // V).view(-1)   # (n*K,) parent rows
            beams = beams.select(rows).grow((idx % V).view(-1), alpha[rows], top.view(-1))
            if w == 1 and not per_image:      # ctx follows the rows (per-image ctx is never copied per beam)
                ctx = select_rows(ctx, torch.arange(n, device=dev).repeat_interleave(K), n)
            w = K
            # Dropping rows copies all of ctx (memory-bound, about half a step), so done images keep
            # riding along (results already stored) until they make up COMPACT_FRACTION of the batch.
            if n_done >= COMPACT_FRACTION * n:
                keep = (~collected).nonzero().view(-1)                      # (n',) images still going
                keep_rows = (keep[:, None] * K + torch.arange(K, device=dev)).view(-1)
                beams, fin, images = beams.select(keep_rows), fin.select(keep), images[keep.cpu()]
                ctx = select_rows(ctx, keep, n) if per_image else select_rows(ctx, keep_rows, n * K)
                collected = torch.zeros(images.numel(), dtype=torch.bool, device=dev)
    return results  # type: ignore[return-value]


def _candidates(scores: torch.Tensor, logp: torch.Tensor, n: int, w: int, K: int, end_id: int):
    """scores (n*w,) of the live rows, logp (n*w, V) their next-token log-probabilities ->
    top (n, K) and idx (n, K) the K best word candidates of each image (idx = row * V + token),
    ends (n, w) the <end> candidates, stored (n, w) those among the image's K best candidates (ends
    included: so beam 1 is greedy)."""
    V = logp.size(1)
    cand = (scores[:, None] + logp).view(n, w, V)
    ends = cand[:, :, end_id].clone()                                       # (n, w) finished candidates
    cand[:, :, end_id] = -math.inf
    top, idx = _topk(cand.view(n, w * V), K)                                 # (n, K) best word candidates
    kth = torch.cat([top, ends], 1).topk(K, 1).values[:, -1:]                  # (n, 1)
    return top, idx, ends, (ends >= kth) & (ends > -math.inf)


def _topk(scores: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk over dim 1, padded with -inf (index 0) when there are fewer than K columns."""
    top, idx = scores.topk(min(K, scores.size(1)), dim=1)
    if top.size(1) < K:
        extra = K - top.size(1)
        top = torch.cat([top, top.new_full((top.size(0), extra), -math.inf)], 1)
        idx = torch.cat([idx, idx.new_zeros(idx.size(0), extra)], 1)
    return top, idx


def _collect(results, images, new, fin: _Finished, beams: _Beams, w: int, X: float):
    """Store the result of every newly done image: its best finished caption, or, when none finished,
    its best live hypothesis (max_len words, no <end>)."""
    n = images.numel()
    sel = new.nonzero().view(-1)                                          # (s,)
    live, k = beams.scores.view(n, w)[sel].max(1)                         # (s,)
    rows = sel * w + k
    m = beams.tokens.size(1)
    f_tok, f_alp, f_len = fin.tokens[sel].cpu(), fin.alphas[sel].cpu(), fin.length[sel].cpu().tolist()
    f_score = fin.score[sel].cpu().tolist()
    l_tok, l_alp = beams.tokens[rows].cpu(), beams.alphas[rows].cpu()
    l_score = (live / float(max(m, 1)) ** X).cpu().tolist()
    for j, i in enumerate(images[sel.cpu()].tolist()):
        if f_score[j] > -math.inf:
            results[i] = Hypothesis(f_tok[j, :f_len[j]].tolist(), f_alp[j, :f_len[j]], float(f_score[j]))
        else:
            results[i] = Hypothesis(l_tok[j].tolist(), l_alp[j], float(l_score[j]))


class _AllFinished(_Finished):
    """_Finished that also keeps every finished caption of each image (host lists, so it syncs every
    step): beam_search(all_beams=True), for the captioning page's other beams."""

    def __init__(self, n: int, T: int, L: int, dev, K: int):
        super().__init__(n, T, L, dev)
        self.K, self.all = K, [[] for _ in range(n)]

    def add(self, final, stored, beams, alpha, end_id):
        super().add(final, stored, beams, alpha, end_id)
        w = final.size(1)
        for j, k in stored.nonzero().tolist():
            r = j * w + k
            alphas = torch.cat([beams.alphas[r], alpha[r][None]]).cpu()           # (m + 1, L)
            self.all[j].append(Hypothesis(beams.tokens[r].tolist() + [end_id], alphas, float(final[j, k])))

    def select(self, images):
        super().select(images)
        self.all = [self.all[i] for i in images.tolist()]
        return self


def _collect_all(results, images, new, fin: _AllFinished, beams: _Beams, w: int, X: float):
    """all_beams: the K best finished captions of each newly done image, best first, topped up with its
    best live hypotheses (no <end>) when fewer than K finished."""
    n, m = images.numel(), beams.tokens.size(1)
    scores = beams.scores.view(n, w)
    for j, i in zip(new.nonzero().view(-1).tolist(), images[new.cpu()].tolist()):
        hs = sorted(fin.all[j], key=lambda h: -h.score)[:fin.K]
        for k in scores[j].argsort(descending=True).tolist()[:fin.K - len(hs)]:
            if scores[j, k] > -math.inf:
                r = j * w + k
                hs.append(Hypothesis(beams.tokens[r].tolist(), beams.alphas[r].cpu(),
                                     float(scores[j, k] / float(max(m, 1)) ** X)))   # as _collect rounds it
        results[i] = hs


# -- ensembles ------------------------------------------------------------------------------------
class Ensemble(torch.nn.Module):
    """Several decoders as one: each step's log-probabilities are the members' average, renormalised
    (log_softmax of the mean log-probability, i.e. a normalised geometric mean of their distributions).

    The members must share one vocabulary. Member i reads input `inputs[i]` of `feats`, which is one
    (B, L, C) tensor or a tuple of them (members trained on different caches of the same images each
    read their own). The attention maps returned are the first member's.
    """

    def __init__(self, members: Sequence[torch.nn.Module], inputs: Sequence[int] | None = None):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = torch.nn.ModuleList(members)
        self.inputs = list(inputs) if inputs is not None else [0] * len(members)
        self.ctx_per_image = all(getattr(m, "ctx_per_image", False) for m in members)

    def init_state(self, feats):
        xs = feats if isinstance(feats, (tuple, list)) else (feats,)
        pairs = [m.init_state(xs[j]) for m, j in zip(self.members, self.inputs)]
        return tuple(s for s, _ in pairs), tuple(c for _, c in pairs)

    def step(self, prev, state, ctx):
        outs = [m.step(prev, s, c) for m, s, c in zip(self.members, state, ctx)]
        logp = outs[0][0] if len(outs) == 1 else torch.log_softmax(torch.stack([o[0] for o in outs]).mean(0), -1)
        return logp, outs[0][1], tuple(o[2] for o in outs)


# -- whole splits ---------------------------------------------------------------------------------
_JOB: dict = {}   # what forked workers decode (set just before the fork, inherited copy-on-write)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _decode_batch(start: int) -> list[Hypothesis]:
    j = _JOB
    part = j["features"][start:start + j["batch_size"]]      # (b, L, C) array, or a tuple of them
    to = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32).to(j["device"])   # noqa: E731
    x = tuple(map(to, part)) if isinstance(part, tuple) else to(part)
    return beam_search(j["model"], x, **j["kw"])


def decode_features(model, features: np.ndarray | Sequence, *, beam: int = 3, max_len: int = 20,
                    length_norm: float | None = None, rules: Rules | None = None, batch_size: int = 100,
                    device: str | torch.device = "cpu", workers: int = 1, progress: bool = True,
                    desc: str = "decode") -> list[Hypothesis]:
    """Decode every row of `features` (N,L,C) (array, or anything sliceable into arrays, or into tuples
    of arrays for an Ensemble reading several caches) in batches.

    beam == 1 uses beam_search too (identical to greedy, same return type). On CPU, `workers` > 1
    forks that many single-threaded processes that decode whole batches each: a decoding step is
    many small ops, and one process per core beats intra-op threads on them (2.4x on 2 shared
    cores, see benchmarks/bench_decode.py). Results are identical either way.
    """
    N = len(features)
    starts = list(range(0, N, batch_size))
    _JOB.update(model=model, features=features, batch_size=batch_size, device=device,
                kw=dict(beam=beam, max_len=max_len, length_norm=length_norm, rules=rules))
    out: list[Hypothesis] = []
    bar = tqdm(total=N, desc=desc, unit="img", disable=not progress, leave=False)
    try:
        if workers > 1 and str(device) == "cpu" and len(starts) > 1:
            import multiprocessing as mp
            with mp.get_context("fork").Pool(min(workers, len(starts)), _worker_init, (1,)) as pool:
                for hyps in pool.imap(_decode_batch, starts):
                    out.extend(hyps)
                    bar.update(len(hyps))
        else:
            for s in starts:
                hyps = _decode_batch(s)
                out.extend(hyps)
                bar.update(len(hyps))
    finally:
        _JOB.clear()
        bar.close()
    return out
