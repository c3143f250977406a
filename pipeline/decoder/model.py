"""The "Show, Attend and Tell" decoder (Xu et al., 2015): an LSTM that attends over L annotation vectors.

Equations (paper section in brackets), a_i (i = 1..L) the annotation vectors, y the caption:
    h_0, c_0 = tanh(f_init_h(mean_i a_i)), tanh(f_init_c(mean_i a_i))         [3.1.2, one-layer MLPs]
    e_ti     = w^T tanh(W_a a_i + W_h h_{t-1})                                  [4, f_att]
    alpha_t  = softmax_i(e_t)                                                   (over L = 196 locations)
    z_t      = beta_t * sum_i alpha_ti a_i,  beta_t = sigmoid(f_beta(h_{t-1}))  [4.2 soft, 4.2.1 gate]
    h_t, c_t = LSTM([E y_{t-1}, z_t], h_{t-1}, c_{t-1})                         [3.1.2, eq. 1-3]
    p(y_t)  ∝ exp(L_o(dropout(E y_{t-1} + L_h h_t + L_z z_t)))                  [eq. 7, deep output]

Hard attention [4.1]: during training a location s_t ~ Multinomial(alpha_t) is sampled per step and
z_t = beta_t * a_{s_t}; the gradient is the paper's eq. 12 estimator: REINFORCE with the caption
log-likelihood as reward, a moving-average baseline, an entropy bonus on alpha_t, and with
probability 0.5 (per caption) the expected context instead of a sample. Decoding (`step`, and
`forward` in eval mode) always uses the expected context, so it is deterministic.

Doubly stochastic regularisation [4.2.1, eq. 14], exact reduction used here:
    loss = 1/(B*T) * sum_b [ sum_t -log p(y_bt) + alpha_c * sum_i (1 - sum_t alpha_bti)^2 ]
i.e. eq. 14 per caption, averaged over the batch and divided by the caption length T (all captions
of a batch have one length, see batching.py), so `nll` is the usual per-word NLL and the penalty
enters with the weight the paper's equation gives it relative to the caption's NLL. (The authors'
Theano code instead adds alpha_c * sum_b mean_i (1 - sum_t alpha_bti)^2 to the batch-mean of the
per-caption summed NLL: an effective weight of alpha_c * B / L relative to eq. 14.) The penalty is
large in value (sum_i (1 - T/L)^2 ≈ 170 at uniform attention) but nearly constant; only its
deviations move alpha, so the logged `nll` is the number to watch.

Deviations from the paper are DecoderConfig options (defaults follow the paper unless noted).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import DecoderConfig


def _f32(x: torch.Tensor) -> torch.Tensor:
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


class Decoder(nn.Module):
    """Attention LSTM decoder. Contract (docs/design.md): forward / init_state / step.

    state = (h, c), each (B, H).  ctx = (a, att_a): a (B, L, C) annotation vectors (float32/bf16)
    and att_a = W_a a_i + b (B, L, A), computed once per image. Every tensor has batch on dim 0,
    so beam search reorders with index_select(0, idx) (see `reorder`).

    `step` also accepts ctx with one row per image for state rows grouped by image (ctx_per_image):
    with state (B*K, H) and ctx rows B, state row r attends over ctx row r // K. Beam search uses
    that (decode.beam_search), so the K beams of an image share one copy of its ctx.
    """

    ctx_per_image = True
    HARD_CONTEXTS = ("expected", "argmax", "sample")

    def __init__(self, cfg: DecoderConfig, vocab_size: int, feature_dim: int):
        super().__init__()
        self.cfg, self.vocab_size, self.feature_dim = cfg, vocab_size, feature_dim
        E, H, A, C, V = cfg.embed_dim, cfg.hidden_dim, cfg.attention_dim, feature_dim, vocab_size
        self.embed = nn.Embedding(V, E)
        self.init_hc = nn.Linear(C, 2 * H)          # f_init_h and f_init_c side by side
        self.att_a = nn.Linear(C, A)                # W_a (its bias stands for f_att's bias)
        self.att_w = nn.Linear(A, 1, bias=False)    # w (a bias would cancel in the softmax)
        # Everything that reads h_{t-1}, fused into one matmul: [W_h (A) | f_beta (1) | LSTM W_hh (4H)].
        self.h_proj = nn.Linear(H, A + 1 + 4 * H)
        # LSTM input weights W_ih split by input part: E y_{t-1} (precomputed for all t) and z_t.
        self.x_proj = nn.Linear(E, 4 * H, bias=False)
        self.z_proj = nn.Linear(C, 4 * H, bias=False)
        # Deep output: L_h h_t + L_z z_t as one matmul over [h_t, z_t], then L_o.
        self.out_hz = nn.Linear(H + C, E)
        self.out = nn.Linear(E, V)
        self.drop = nn.Dropout(cfg.dropout)
        # Hard attention's moving-average reward baseline: a buffer, so checkpoints carry it.
        self.register_buffer("baseline", torch.zeros(()))
        # How a hard-attention decoder reads the image when decoding (eval mode): the expected context
        # sum_i alpha_i a_i (default, deterministic), the argmax location, or a sampled one (the authors'
        # sampler samples). `pipeline score --hard-context` sets it; training is unaffected.
        self.hard_context = "expected"
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        H = self.cfg.hidden_dim
        with torch.no_grad():
            # LSTM gates are laid out [i, f, o, g]; forget-gate bias 1 (the usual LSTM init).
            b = self.h_proj.bias[self.cfg.attention_dim + 1:]
            b.zero_()
            b[H:2 * H] = 1.0

    # -- the decoding contract ---------------------------------------------------------------
    def init_state(self, feats: torch.Tensor):
        """feats (B, L, C) -> ((h, c), (a, att_a)). h0, c0 from the mean annotation vector."""
        H = self.cfg.hidden_dim
        a = feats if torch.is_autocast_enabled(feats.device.type) else feats.to(self.att_a.weight.dtype)
        hc = torch.tanh(self.init_hc(a.mean(1)))    # (B, 2H)
        att_a = self.att_a(a)                       # (B, L, A): W_a a_i, once per image
        return (hc[:, :H].contiguous(), hc[:, H:].contiguous()), (a, att_a)

    def step(self, prev_tokens: torch.Tensor, state, ctx):
        """One deterministic step: prev_tokens (B,) -> (logprobs (B, V), alpha (B, L), (h, c))."""
        emb = self._drop(self.embed(prev_tokens), self.cfg.embed_dropout)   # (B, E)
        h, c, z, alpha, _ = self._cell(self.x_proj(emb), state, ctx)    # z (B, C), alpha (B, L)
        logits = self._output(emb, h, z)                                # (B, V)
        return F.log_softmax(_f32(logits), -1), alpha, (h, c)

    def _drop(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return F.dropout(x, p, self.training) if p > 0 else x

    # -- training ----------------------------------------------------------------------------
    def forward(self, feats: torch.Tensor, tokens: torch.Tensor) -> dict:
        """Teacher-forced pass. feats (B, L, C), tokens (B, T+1) = <start> w1..wn <end>.

        Returns logits (B, T, V) for tokens[:, 1:], alphas (B, T, L), and with hard attention in
        training mode the per-step log alpha_t[s_t] (B, T), entropies (B, T) and the mask of
        captions that used sampled locations (B,).
        """
        B, T = tokens.size(0), tokens.size(1) - 1
        state, ctx = self.init_state(feats)
        emb = self._drop(self.embed(tokens[:, :-1]), self.cfg.embed_dropout)   # (B, T, E): E y_{t-1}
        x_gates = self.x_proj(emb).unbind(1)                # T x (B, 4H): one matmul for all steps
        # (unbind, not x_gates[:, t]: each indexing would back-propagate a zero-filled (B, T, 4H))
        hard = self.cfg.attention == "hard" and self.training
        sampled = None
        if hard:  # per caption: sampled location (True) or expected context (False)
            sampled = torch.rand(B, device=feats.device) >= self.cfg.hard_expected_prob
        hs, zs, alphas, logp_s, ents = [], [], [], [], []
        for t in range(T):
            h, c, z, alpha, extra = self._cell(x_gates[t], state, ctx, sampled)
            state = (h, c)
            hs.append(h)                                    # (B, H)
            zs.append(z)                                    # (B, C)
            alphas.append(alpha)
            if hard:
                logp_s.append(extra[0])
                ents.append(extra[1])
        logits = self._output(emb, torch.stack(hs, 1), torch.stack(zs, 1))   # (B, T, V): one matmul for all steps
        out = {"logits": logits, "alphas": torch.stack(alphas, 1)}
        if hard:
            out.update(logp_s=torch.stack(logp_s, 1), entropy=torch.stack(ents, 1), sampled=sampled)
        return out

    def _cell(self, x_gate, state, ctx, sampled=None):
        """Attention + gate + LSTM update. x_gate (B, 4H) = W_x E y_{t-1}; sampled (B,) bool or None."""
        cfg, (h, c), (a, att_a) = self.cfg, state, ctx
        A, H = cfg.attention_dim, cfg.hidden_dim
        G = h.size(0) // a.size(0)              # beams per ctx row: 1, or K when beams share ctx (step)
        Bc, L = a.size(0), a.size(1)
        if G * Bc != h.size(0):
            raise ValueError(f"state has {h.size(0)} rows, not a multiple of ctx's {Bc}")
        hp = self.h_proj(h)                                             # (B, A+1+4H)
        autocast = torch.is_autocast_enabled(att_a.device.type)
        if not torch.is_grad_enabled() and att_a.device.type == "cpu" and not autocast:
            # decoding on CPU: chunked, cache-sized (same values; the autograd paths below are for training)
            e = _attention_score_nograd(att_a, hp[:, :A], self.att_w.weight[0], G)   # (B, L)
        elif G > 1:                             # shared ctx elsewhere (GPU, bf16): broadcast, no copy
            e = self.att_w(torch.tanh(att_a[:, None] + hp[:, :A].view(Bc, G, 1, A))).view(Bc * G, L)
        elif autocast:   # bf16: leave it to autograd (custom op: fp32/64)
            e = self.att_w(torch.tanh(att_a + hp[:, None, :A])).squeeze(2)   # (B, L)
        else:
            e = _AttentionScore.apply(att_a, hp[:, :A], self.att_w.weight[0])  # (B, L)
        alpha = torch.softmax(_f32(e), 1)                             # (B, L), fp32 under autocast
        # (B, C) expected context; with shared ctx one (G x L) @ (L x C) matmul per image
        z = torch.bmm(alpha.to(a.dtype).view(Bc, G, L), a).view(Bc * G, -1)
        extra = None
        if sampled is not None:
            assert G == 1, "hard attention samples per caption: ctx must have one row per caption"
            # Gumbel-max draw of s_t ~ alpha_t (no host sync on GPU), then a_{s_t}.
            logalpha = torch.log_softmax(_f32(e), 1)                   # (B, L)
            gumbel = -torch.log(-torch.log(torch.rand_like(logalpha).clamp_min_(1e-20)))
            s = (logalpha.detach() + gumbel).argmax(1)                  # (B,)
            z_s = a[torch.arange(a.size(0), device=a.device), s]        # (B, C)
            z = torch.where(sampled[:, None], z_s.to(z.dtype), z)
            logp = logalpha.gather(1, s[:, None]).squeeze(1)            # (B,) log alpha_t[s_t]
            ent = -(alpha * logalpha).sum(1)                            # (B,) H[alpha_t]
            extra = (logp, ent)
        elif cfg.attention == "hard" and not self.training and self.hard_context != "expected":
            # decoding with one location per step: the most likely one, or a draw from alpha_t
            s = alpha.argmax(1) if self.hard_context == "argmax" else torch.multinomial(alpha.float(), 1).squeeze(1)
            rows = torch.arange(alpha.size(0), device=a.device) // G   # the ctx row (image) of each state row
            z = a[rows, s].to(z.dtype)                                  # (B, C) = a_{s_t}
        if cfg.gate:
            z = z * torch.sigmoid(hp[:, A:A + 1])                       # beta_t, a scalar per caption
        gates = x_gate + hp[:, A + 1:] + self.z_proj(self._drop(z, cfg.context_dropout))   # (B, 4H): [i, f, o, g]
        ifo = torch.sigmoid(gates[:, :3 * H])
        g = torch.tanh(gates[:, 3 * H:])
        c = ifo[:, H:2 * H] * c + ifo[:, :H] * g
        h = ifo[:, 2 * H:] * torch.tanh(c)
        return h, c, z, alpha, extra

    def _output(self, emb, h, z):
        """Deep output: logits = L_o(dropout(E y_{t-1} + L_h h_t + L_z z_t)). emb (.., E), h (.., H), z (.., C)."""
        x = emb + self.out_hz(torch.cat([self._drop(h, self.cfg.hidden_dropout), z], -1))
        if self.cfg.deep_output_tanh:
            x = torch.tanh(x)
        return self.out(self.drop(x))

    # -- the loss ----------------------------------------------------------------------------
    def loss(self, out: dict, tokens: torch.Tensor, *, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
        """Training objective for one batch (see the module docstring for the exact reduction).

        label_smoothing: the per-word term is cross-entropy against (1 - eps) one-hot + eps uniform
        (Szegedy et al. 2016); 0 gives the plain NLL.
        Returns (loss scalar, parts) where parts are detached: nll (per word, never smoothed), reg, and
        for hard attention the mean reward of the sampled captions, their reward sum and count (for
        `update_baseline`, which the caller runs after the loss: the advantage uses the old baseline).
        No host sync happens here.
        """
        cfg = self.cfg
        logits, alphas = out["logits"], out["alphas"]           # (B, T, V), (B, T, L)
        B, T = tokens.size(0), tokens.size(1) - 1
        target = tokens[:, 1:]                                  # (B, T)
        flat = _f32(logits).reshape(B * T, -1)
        nll_bt = F.cross_entropy(flat, target.reshape(-1), reduction="none").view(B, T)   # (B, T)
        nll = nll_bt.mean()
        word = nll if label_smoothing == 0 else F.cross_entropy(flat, target.reshape(-1),
                                                                label_smoothing=label_smoothing)
        reg = ((1.0 - alphas.sum(1)) ** 2).sum(1).mean() / T if cfg.alpha_c > 0 else nll.new_zeros(())
        loss = word + cfg.alpha_c * reg
        parts = {"nll": nll.detach(), "reg": reg.detach()}
        if "logp_s" in out:
            # eq. 12: lambda_r (log p(y|s,a) - b) d log p(s|a) + lambda_e d H[s], for sampled captions.
            loglik = -nll_bt.detach().sum(1)                    # (B,) log p(y | s, a)
            reward = loglik / T if cfg.reward_per_word else loglik
            mask = out["sampled"].float()                       # (B,)
            adv = (reward - self.baseline) * mask               # (B,)
            # per caption: lambda_r (R - b) grad log p(s) / T, as the NLL; with per-word rewards r = R / T
            # that is (r - b) grad log p(s), so the batch sum is divided by B only.
            reinforce = -(adv * out["logp_s"].sum(1)).sum() / (B if cfg.reward_per_word else B * T)
            entropy = (out["entropy"].sum(1) * mask).sum() / (B * T)
            loss = loss + cfg.reinforce_weight * reinforce - cfg.entropy_weight * entropy
            parts.update(reward=(reward * mask).sum() / mask.sum().clamp_min(1.0), reward_sum=(reward * mask).sum(),
                         reward_n=mask.sum())
        return loss, parts

    @torch.no_grad()
    def update_baseline(self, reward_sum: torch.Tensor, n: torch.Tensor, all_reduce=None) -> None:
        """Hard attention's moving baseline: b_k = decay b_{k-1} + (1 - decay) mean reward of the sampled
        captions. all_reduce(t) sums over processes in place (DDP): the mean is over every rank's captions."""
        tot = torch.stack([reward_sum, n]).float()
        if all_reduce is not None:
            all_reduce(tot)
        new_b = self.cfg.baseline_decay * self.baseline + (1 - self.cfg.baseline_decay) * tot[0] / tot[1].clamp_min(1.0)
        self.baseline.copy_(torch.where(tot[1] > 0, new_b, self.baseline))

    # -- sampling (self-critical training) -----------------------------------------------------
    def sample(self, feats: torch.Tensor, n: int, max_len: int, *, greedy: bool = False) -> dict:
        """Draw `n` captions per image from the model as it is (train mode: dropout on; hard attention
        samples locations as in training). feats (B, L, C).

        Returns, for B*n captions (row b*n + k is sample k of image b), T <= max_len + 1 steps:
          tokens (B*n, T) word ids (<end> included when drawn, <pad> after), mask (B*n, T) 1.0 for the
          tokens that belong to the caption, logp (B*n, T) log p(w_t | w_<t, a) with gradient, and
          for hard attention logp_s (B*n, T) log alpha_t[s_t] (0 for expected-context captions),
          entropy (B*n, T) H[alpha_t], sampled (B*n,) which captions sampled their locations.
        greedy: arg-max words instead of samples (the SCST greedy baseline, with n = 1).
        """
        from pipeline.data.text import Vocab
        state, ctx = self.init_state(feats)
        B = feats.size(0)
        rep = torch.arange(B, device=feats.device).repeat_interleave(n)        # (B*n,) image of each row
        state = tuple(s.index_select(0, rep) for s in state)
        ctx = tuple(c.index_select(0, rep) for c in ctx)                       # one ctx row per caption
        hard = self.cfg.attention == "hard" and self.training
        sampled = torch.rand(B * n, device=feats.device) >= self.cfg.hard_expected_prob if hard else None
        prev = torch.full((B * n,), Vocab.start, dtype=torch.long, device=feats.device)
        alive = torch.ones(B * n, dtype=torch.bool, device=feats.device)
        toks, masks, logps, logp_s, ents = [], [], [], [], []
        for _ in range(max_len + 1):
            emb = self._drop(self.embed(prev), self.cfg.embed_dropout)          # (B*n, E)
            h, c, z, _, extra = self._cell(self.x_proj(emb), state, ctx, sampled)
            state = (h, c)
            logp_all = F.log_softmax(_f32(self._output(emb, h, z)), -1)         # (B*n, V)
            w = logp_all.argmax(1) if greedy else torch.multinomial(logp_all.detach().exp(), 1).squeeze(1)
            w = torch.where(alive, w, torch.full_like(w, Vocab.pad))
            masks.append(alive.float())
            toks.append(w)
            logps.append(logp_all.gather(1, w[:, None]).squeeze(1))
            if hard:
                logp_s.append(extra[0] * sampled.float())
                ents.append(extra[1])
            alive = alive & (w != Vocab.end)
            prev = w
            if not bool(alive.any()):
                break
        out = {"tokens": torch.stack(toks, 1), "mask": torch.stack(masks, 1), "logp": torch.stack(logps, 1)}
        if hard:
            out.update(logp_s=torch.stack(logp_s, 1), entropy=torch.stack(ents, 1), sampled=sampled)
        return out


def count_flops(cfg: DecoderConfig, vocab_size: int, feature_dim: int, num_regions: int,
                lengths) -> int:
    """Matmul FLOPs of one forward + backward over captions with T predicted tokens each (`lengths`).

    Backward costs 2x forward for a matmul (grads of input and weight) except where the input needs
    no grad: W_a a_i and sum_i alpha_i a_i read the fixed features (1x). Elementwise work is not counted.
    """
    E, H, A, C, V, L = cfg.embed_dim, cfg.hidden_dim, cfg.attention_dim, feature_dim, vocab_size, num_regions
    per_image = 2 * L * C * A + 2 * C * 2 * H                # W_a a_i (fwd + dW), init MLP (fwd + dW)
    per_step = 3 * (H * (A + 1 + 4 * H)                      # fused h projection
                    + L * A                                  # w^T tanh(.)
                    + C * 4 * H + E * 4 * H                  # LSTM input weights
                    + (H + C) * E + E * V) + 2 * L * C       # deep output; sum_i alpha_i a_i (fwd + dalpha)
    return 2 * sum(per_image + int(T) * per_step for T in lengths)
