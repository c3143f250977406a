"""The decoder's attention (Xu et al., 2015, section 4): scores, weights, and the context read from them.

a_i (i = 1..L) the annotation vectors of one image, att_a_i = W_a a_i + b (precomputed once per image),
q = W_h h_{t-1} (per caption and step), w the score vector:
    e_ti    = w^T tanh(att_a_i + q)                         [4, f_att]: `scores`
    alpha_t = softmax_i(e_t)                                 (over L locations)
    soft:  z_t = sum_i alpha_ti a_i                          [4.2]: `expected_context`
    hard:  z_t = a_{s_t},  s_t ~ Multinomial(alpha_t)        [4.1]: `sampled_context` (training),
                                                             `location_context` (decoding, by choice)

Groups: the K beams of an image share one row of (a, att_a) (beam search, `Decoder.ctx_per_image`), and so do
the K captions SCST samples per image (`Decoder.sample`, soft attention): with `groups` = K, q and the result
have B*K rows and row r reads image r // K; nothing is copied per beam or sample.

`scores` is the one way the decoder computes e_t; it picks the fastest kernel for where it runs, all giving
the same values (tests/test_model.py, tests/test_fused.py): the fused C++ kernels of decoder/fused.py when
training in fp32 on CPU (`_FusedScore`; with `prepare`'s shared gradient buffer for att_a), the custom autograd
`_AttentionScore` when training otherwise in fp32/fp64 (or without a compiler),
the chunked no-grad `_attention_score_nograd` when decoding on CPU, a broadcast over the shared rows when
groups > 1 elsewhere, and plain autograd under autocast (bf16).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.decoder import fused


def f32(x: torch.Tensor) -> torch.Tensor:
    """Softmaxes in at least fp32 (bf16 under autocast), keeping fp64 in fp64 (parity tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _AttentionScore(torch.autograd.Function):
    """e_ti = w^T tanh(att_a_i + q). Autograd's own backward builds the (B, L, A) outer product
    de w^T with a k=1 matmul (slow on CPU); this one broadcasts de into tanh_backward, then scales by w.
    The largest per-step tensors of the model live here: two passes fewer per step matter."""

    @staticmethod
    def forward(ctx, att_a, q, w):                  # att_a (B, L, A), q (B, A), w (A,)
        t = torch.add(att_a, q[:, None]).tanh_()    # (B, L, A), in place: one 25 MB buffer per step, not two
        ctx.save_for_backward(t, w)
        return t @ w                                # (B, L)

    @staticmethod
    def backward(ctx, de):                          # de (B, L)
        t, w = ctx.saved_tensors
        dw = (de.reshape(1, -1) @ t.reshape(-1, t.size(2))).view(-1)    # (A,)
        dpre = torch.ops.aten.tanh_backward(de[:, :, None], t).mul_(w)    # (B, L, A): (1 - t^2) de w^T
        return dpre, dpre.sum(1), dw


class _FusedScore(torch.autograd.Function):
    """e_ti = w^T tanh(att_a_i + q) by the fused kernels (decoder/fused.py): one pass forward, one backward.
    When att_a came through `prepare`, backward adds its (B, L, A) gradient into the buffer the whole caption
    shares and returns None for att_a (`_Sink` hands the buffer to autograd once); otherwise it returns it.
    groups > 1 (SCST's samples of one image share its row): the (B * groups, L, A) tanh is not kept but
    recomputed in backward from the shared rows, so no per-sample copy of att_a exists in either pass."""

    @staticmethod
    def forward(ctx, att_a, q, w, groups=1):        # att_a (B, L, A), q (B * groups, A), w (A,)
        keep = groups == 1                          # one row per caption: keeping t is the faster of the two
        e, t = fused.forward(att_a, q, w, groups, keep)     # e (B * groups, L), t = tanh(att_a + q) or None
        ctx.save_for_backward(*((t, w) if keep else (att_a, q, w)))
        ctx.groups, ctx.keep = groups, keep
        ctx.sink = getattr(att_a, "_grad_sink", None)
        return e

    @staticmethod
    def backward(ctx, de):                          # de (B * groups, L)
        if ctx.keep:
            (t, w), att_a, q = ctx.saved_tensors, None, None
        else:
            (att_a, q, w), t = ctx.saved_tensors, None
        prior = None if ctx.sink is None else ctx.sink.get("grad")
        grad, dq, dw = fused.backward(t, w, de, prior, att_a, q, ctx.groups)
        if ctx.sink is None:
            return grad, dq, dw, None
        ctx.sink["grad"] = grad
        return None, dq, dw, None


class _Sink(torch.autograd.Function):
    """Identity on att_a (B, L, A) whose backward returns the gradient the `_FusedScore` steps added into
    box["grad"] (plus any gradient that reached att_a another way): one buffer per batch, not one per step."""

    @staticmethod
    def forward(ctx, att_a, box: dict):
        ctx.set_materialize_grads(False)            # the steps give None: no (B, L, A) zeros to add
        ctx.box = box
        return att_a.view_as(att_a)

    @staticmethod
    def backward(ctx, g):
        acc = ctx.box.pop("grad", None)
        if g is not None:
            acc = g if acc is None else acc.add_(g)
        return acc, None


def prepare(att_a: torch.Tensor) -> torch.Tensor:
    """att_a = W_a a_i + b (B, L, A) as the decoder keeps it for a batch: when training takes the fused
    kernels, wrapped so that every step's gradient for it lands in one shared buffer (`_Sink`)."""
    if torch.is_grad_enabled() and att_a.requires_grad and fused.applies(att_a):
        box: dict = {}
        out = _Sink.apply(att_a, box)
        out._grad_sink = box
        return out
    return att_a


INFER_CHUNK = 4   # rows per chunk of the no-grad CPU attention score (see _attention_score_nograd)


def _attention_score_nograd(att_a, q, w, groups: int = 1, chunk: int = INFER_CHUNK):
    """e = w^T tanh(att_a + q) without autograd, in row chunks: decoding's fast path on CPU.

    att_a (B, L, A) and q (B * groups, A): row r of q goes with att_a[r // groups] (beam search keeps
    one att_a per image for its `groups` beams). Same values as _AttentionScore.forward, but the
    (rows, L, A) tanh buffer is (chunk, L, A) (1.6 MB at L=196, A=512, fp32), so it stays in cache:
    at decoding sizes (300 x 196 x 512 = 120 MB) the whole-batch version is memory-bound, ~3x slower
    on CPU. Returns (B * groups, L).
    """
    B, L, A = att_a.shape
    rows = q.size(0)
    e = att_a.new_empty(rows, L)
    if groups == 1:
        buf = att_a.new_empty(min(chunk, rows), L, A)
        for i in range(0, rows, chunk):
            j = min(i + chunk, rows)
            t = torch.add(att_a[i:j], q[i:j, None], out=buf[:j - i]).tanh_()
            torch.mv(t.view(-1, A), w, out=e[i:j].view(-1))
    else:   # one image at a time: its att_a (400 KB) is read from memory once for all its beams
        n = min(chunk, groups)
        buf = att_a.new_empty(n, L, A)
        for b in range(B):
            for i in range(b * groups, (b + 1) * groups, n):
                j = min(i + n, (b + 1) * groups)
                t = torch.add(att_a[b], q[i:j, None], out=buf[:j - i]).tanh_()
                torch.mv(t.view(-1, A), w, out=e[i:j].view(-1))
    return e


def scores(att_a: torch.Tensor, q: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """e = w^T tanh(att_a + q): att_a (B, L, A), q (B * groups, A), weight (1, A) (nn.Linear(A, 1)'s) ->
    e (B * groups, L), where row r of q reads att_a[r // groups]."""
    B, L, A = att_a.shape
    autocast = torch.is_autocast_enabled(att_a.device.type)
    if not torch.is_grad_enabled() and att_a.device.type == "cpu" and not autocast:
        # decoding on CPU: chunked, cache-sized (same values; the autograd paths below are for training)
        return _attention_score_nograd(att_a, q, weight[0], groups)                     # (B*G, L)
    if fused.applies(att_a):                    # training in fp32 on CPU (no autocast): the fused kernels
        return _FusedScore.apply(att_a, q, weight[0], groups)                           # (B*G, L)
    if groups > 1:                              # shared ctx elsewhere (GPU, bf16): broadcast, no copy
        return F.linear(torch.tanh(att_a[:, None] + q.view(B, groups, 1, A)), weight).view(B * groups, L)
    if autocast:                                # bf16: leave it to autograd (the custom op is fp32/64)
        return F.linear(torch.tanh(att_a + q[:, None]), weight).squeeze(2)              # (B, L)
    return _AttentionScore.apply(att_a, q, weight[0])                                   # (B, L)


def expected_context(alpha: torch.Tensor, a: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """z = sum_i alpha_i a_i: alpha (B * groups, L), a (B, L, C) -> (B * groups, C); with shared rows one
    (groups x L) @ (L x C) matmul per image."""
    B, L = a.size(0), a.size(1)
    return torch.bmm(alpha.to(a.dtype).view(B, groups, L), a).view(B * groups, -1)


def gumbel_locations(logalpha: torch.Tensor) -> torch.Tensor:
    """s ~ Multinomial(alpha) per row by the Gumbel-max trick (argmax_i log alpha_i + g_i, g_i standard
    Gumbel): no host sync on GPU, unlike torch.multinomial. logalpha (N, L) -> s (N,) long."""
    gumbel = -torch.log(-torch.log(torch.rand_like(logalpha).clamp_min_(1e-20)))
    return (logalpha.detach() + gumbel).argmax(1)


def sampled_context(e: torch.Tensor, alpha: torch.Tensor, a: torch.Tensor, z: torch.Tensor,
                    sampled: torch.Tensor):
    """Hard attention in training [4.1]: z_t = a_{s_t}, s_t ~ alpha_t, for the captions that sample (the
    others keep the expected context z). e, alpha (B, L), a (B, L, C), z (B, C), sampled (B,) bool.
    Returns z (B, C) and (log alpha_t[s_t] (B,), H[alpha_t] (B,)), the terms of eq. 12."""
    logalpha = torch.log_softmax(f32(e), 1)                     # (B, L)
    s = gumbel_locations(logalpha)                              # (B,)
    z_s = a[torch.arange(a.size(0), device=a.device), s]        # (B, C)
    z = torch.where(sampled[:, None], z_s.to(z.dtype), z)
    logp = logalpha.gather(1, s[:, None]).squeeze(1)            # (B,) log alpha_t[s_t]
    ent = -(alpha * logalpha).sum(1)                            # (B,) H[alpha_t]
    return z, (logp, ent)


def location_context(alpha: torch.Tensor, a: torch.Tensor, how: str, groups: int = 1) -> torch.Tensor:
    """Hard attention when decoding with one location per step: `how` "argmax" reads a_{argmax alpha_t},
    "sample" a location drawn from alpha_t. alpha (B * groups, L), a (B, L, C) -> (B * groups, C)."""
    s = alpha.argmax(1) if how == "argmax" else torch.multinomial(alpha.float(), 1).squeeze(1)
    rows = torch.arange(alpha.size(0), device=a.device) // groups   # the ctx row (image) of each state row
    return a[rows, s]


# -- adaptive attention (Lu et al. 2017, "Knowing When to Look", 2.3): the visual sentinel as slot L+1 ----------
def sentinel_score(s_att: torch.Tensor, q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The sentinel's score w^T tanh(W_s s + b_s + q) (Lu et al. eq. 12, its last entry): s_att (R, A) =
    W_s s + b_s, q (R, A) = W_h h (the regions' query), weight (1, A) (the regions' w) -> (R,). One row per
    state row: every beam has its own sentinel, so nothing is shared per image here."""
    return F.linear(torch.tanh(s_att + q), weight).squeeze(1)


def sentinel_softmax(e: torch.Tensor, e_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over the L regions and the sentinel (Lu et al. eq. 12): e (R, L), e_s (R,) -> alpha (R, L), the
    regions' slots NOT renormalised (sum_i alpha_i = 1 - beta), and beta (R,), the sentinel's slot. fp32 at
    least (f32), as the plain softmax."""
    p = torch.softmax(torch.cat([f32(e), f32(e_s)[:, None].to(f32(e).dtype)], 1), 1)    # (R, L + 1)
    return p[:, :-1].contiguous(), p[:, -1]
