"""Greedy and batched beam-search decoding over the `Decoder.init_state/step` interface.

Both work on whole batches of images at once and on any device. They only rely on
(docs/design.md):

    state, ctx = model.init_state(feats)                       # batch on dim 0 of every tensor
    logprobs (B,V), alpha (B,L), state = model.step(prev (B,), state, ctx)

and are generic over the structure of `state` / `ctx` (tensors, tuples, lists, dicts of them).
A model whose class sets `ctx_per_image = True` (model.Decoder) also accepts ctx with one row per
image while state has K rows per image (beam search's B*K hypotheses): beam search then never
copies ctx K times (a K-fold copy of the 2 x 100 x 196 x 512 floats of a batch costs about two steps).

Conventions of the returned hypotheses:
  * `tokens` never holds <start>; it ends with <end> when the hypothesis ended, and has no <end>
    when it hit `max_len` first (max-length fallback);
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

START, END, PAD = Vocab.start, Vocab.end, Vocab.pad
COMPACT_FRACTION = 0.25   # drop finished images' rows once they are this fraction of the batch


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
def greedy_decode(model, feats: torch.Tensor, max_len: int = 20, *, start_id: int = START,
                  end_id: int = END) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Arg-max decoding. feats (B,L,C) -> (tokens per image, alphas (T,L) per image)."""
    x = first_tensor(feats)
    B, dev = x.size(0), x.device
    with _eval_mode(model), torch.inference_mode():
        state, ctx = model.init_state(feats)
        prev = torch.full((B,), start_id, dtype=torch.long, device=dev)
        ended = torch.zeros(B, dtype=torch.bool, device=dev)
        lengths = torch.full((B,), max_len, dtype=torch.long, device=dev)
        toks, alps = [], []
        for t in range(max_len):
            logp, alpha, state = model.step(prev, state, ctx)      # (B,V), (B,L)
            prev = logp.argmax(1)                                    # (B,)
            toks.append(prev)
            alps.append(alpha.float())
            new_end = (prev == end_id) & ~ended
            lengths[new_end] = t + 1
            ended |= new_end
            if bool(ended.all()):
                break
        tokens = torch.stack(toks, 1).cpu()                          # (B,T)
        alphas = torch.stack(alps, 1).cpu()                          # (B,T,L)
        lengths = lengths.clamp(max=tokens.size(1)).cpu()
    n = lengths.tolist()
    return ([tokens[b, :n[b]].tolist() for b in range(B)], [alphas[b, :n[b]] for b in range(B)])


# -- beam search ----------------------------------------------------------------------------------
def beam_search(model, feats: torch.Tensor, beam: int = 3, max_len: int = 20,
                length_norm: float | None = None, *, start_id: int = START, end_id: int = END,
                pad_id: int = PAD) -> list[Hypothesis]:
    """Batched beam search: all images of `feats` (B,L,C) at once, B*K hypotheses on dim 0.

    Hypothesis row b*K + k is beam k of image b. A hypothesis that emitted <end> keeps its slot
    and score (it may only continue with <pad> at zero cost), so live and ended hypotheses compete
    in one top-k over (B, K*V). An image is finished once its K hypotheses all ended, or (without
    length normalisation, where extending can only lower a score) once its best ended hypothesis
    beats every live one; finished images leave the batch (in groups, see COMPACT_FRACTION) so
    later steps get cheaper. Ended hypotheses are preferred; an image with none after `max_len`
    steps falls back to its best live one.
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    length_norm = length_norm or None       # 0: rank by the raw log-probability, as None
    x = first_tensor(feats)
    B, K, dev = x.size(0), beam, x.device
    results: list[Hypothesis | None] = [None] * B
    with _eval_mode(model), torch.inference_mode():
        state, ctx = model.init_state(feats)
        # t = 0: the K beams of an image would all be identical, so step the B images once and
        # expand to B*K rows from the top-K first words.
        prev = torch.full((B,), start_id, dtype=torch.long, device=dev)
        logp, alpha, state = model.step(prev, state, ctx)              # (B,V), (B,L)
        scores, word = logp.float().topk(min(K, logp.size(1)), dim=1)   # (B, K)
        if word.size(1) < K:   # beam wider than the vocabulary: pad with impossible hypotheses
            extra = K - word.size(1)
            scores = torch.cat([scores, scores.new_full((B, extra), -math.inf)], 1)
            word = torch.cat([word, word.new_full((B, extra), pad_id)], 1)
        rep = torch.arange(B, device=dev).repeat_interleave(K)          # (B*K,) image of each row
        # ctx is per image, hence the same for all beams of an image: never reordered per step, only
        # re-selected when finished images leave the batch. Models that take it per image
        # (ctx_per_image) keep one row per image; for the others it is expanded to B*K rows once here.
        per_image = bool(getattr(model, "ctx_per_image", False))
        state = select_rows(state, rep, B)
        if not per_image:
            ctx = select_rows(ctx, rep, B)
        prev = word.view(-1)                                            # (B*K,)
        tokens = prev[:, None].clone()                                  # (n*K, t)
        alphas = alpha.float().index_select(0, rep)[:, None]            # (n*K, t, L)
        ended = prev == end_id                                          # (n*K,)
        lengths = torch.ones(B * K, dtype=torch.long, device=dev)      # tokens up to <end>
        images = torch.arange(B)                                        # (n,) original index, CPU
        collected = torch.zeros(B, dtype=torch.bool, device=dev)       # (n,) result already stored
        for t in range(1, max_len + 1):
            n = images.numel()
            # -- finished images: store their best hypothesis, drop their rows -----------------
            end_k = ended.view(n, K)
            done = end_k.all(1)                                         # (n,)
            if length_norm is None:   # extending can only lower a score: the best ended one wins
                best_end = scores.masked_fill(~end_k, -math.inf).max(1).values
                best_live = scores.masked_fill(end_k, -math.inf).max(1).values
                done |= best_end >= best_live
            if t == max_len:
                done[:] = True
            new = done & ~collected
            if bool(new.any()):
                _collect(results, images, new, scores, tokens, alphas, lengths, ended, K, length_norm)
                collected |= new
            n_done = int(collected.sum())
            if n_done == n:
                break
            # Dropping rows copies all of ctx (memory-bound, about half a step), so finished images
            # keep riding along (results already stored) until they make up COMPACT_FRACTION of it.
            if n_done >= COMPACT_FRACTION * n:
                keep = (~collected).nonzero().view(-1)                  # (n',) images still going
                keep_rows = (keep[:, None] * K + torch.arange(K, device=dev)).view(-1)
                state = select_rows(state, keep_rows, n * K)
                ctx = select_rows(ctx, keep, n) if per_image else select_rows(ctx, keep_rows, n * K)
                scores = scores.index_select(0, keep)
                tokens, alphas = tokens.index_select(0, keep_rows), alphas.index_select(0, keep_rows)
                ended, lengths = ended.index_select(0, keep_rows), lengths.index_select(0, keep_rows)
                prev = prev.index_select(0, keep_rows)
                images = images[keep.cpu()]
                n = images.numel()
                collected = torch.zeros(n, dtype=torch.bool, device=dev)
            # -- one step of all live and ended hypotheses ----------------------------------------
            logp, alpha, state = model.step(prev, state, ctx)           # (n*K,V), (n*K,L)
            logp = logp.float()
            V = logp.size(1)
            if bool(ended.any()):
                # an ended hypothesis continues only with <pad>, at no cost: score and slot kept
                logp = logp.masked_fill(ended[:, None], -math.inf)
                logp[:, pad_id].masked_fill_(ended, 0.0)
            cand = (scores.view(-1, 1) + logp).view(n, K * V)           # (n, K*V)
            scores, idx = cand.topk(K, dim=1)                           # (n, K)
            parent, word = idx // V, idx % V                            # (n, K) beam, token
            rows = (torch.arange(n, device=dev)[:, None] * K + parent).view(-1)  # (n*K,) parent row
            word = word.view(-1)                                        # (n*K,)
            state = select_rows(state, rows, n * K)
            tokens = torch.cat([tokens.index_select(0, rows), word[:, None]], 1)
            alphas = torch.cat([alphas.index_select(0, rows), alpha.float().index_select(0, rows)[:, None]], 1)
            was_ended = ended.index_select(0, rows)
            lengths = lengths.index_select(0, rows) + (~was_ended).long()
            ended = was_ended | (word == end_id)
            prev = word
    return results  # type: ignore[return-value]


def _collect(results, images, done, scores, tokens, alphas, lengths, ended, K, length_norm):
    """Store the best hypothesis of every finished image (ended ones first, then max-length fallback)."""
    n = images.numel()
    lens = lengths.view(n, K).float()
    final = scores / lens.clamp(min=1) ** length_norm if length_norm else scores.clone()   # (n, K)
    end_k = ended.view(n, K)
    # prefer ended hypotheses: live ones only count for images where none ended
    final = torch.where(end_k | ~end_k.any(1, keepdim=True), final, torch.full_like(final, -math.inf))
    best = final.argmax(1)                                                        # (n,)
    sel = done.nonzero().view(-1)
    best_rows = (sel * K + best[sel])
    toks = tokens.index_select(0, best_rows).cpu()
    alps = alphas.index_select(0, best_rows).cpu()
    lens_sel = lengths.index_select(0, best_rows).cpu().tolist()
    fin_sel = final[sel, best[sel]].cpu().tolist()
    for j, (i, m) in enumerate(zip(images[sel.cpu()].tolist(), lens_sel)):
        results[i] = Hypothesis(toks[j, :m].tolist(), alps[j, :m], float(fin_sel[j]))


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
                    length_norm: float | None = None, batch_size: int = 100, device: str | torch.device = "cpu",
                    workers: int = 1, progress: bool = True, desc: str = "decode") -> list[Hypothesis]:
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
                kw=dict(beam=beam, max_len=max_len, length_norm=length_norm))
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
