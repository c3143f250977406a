"""The "Show, Attend and Tell" decoder (Xu et al., 2015): an LSTM that attends over L annotation vectors.

Equations (paper section in brackets), a_i (i = 1..L) the annotation vectors, y the caption:
    h_0, c_0 = tanh(f_init_h(mean_i a_i)), tanh(f_init_c(mean_i a_i))         [3.1.2, one-layer MLPs]
    e_ti     = w^T tanh(W_a a_i + W_h h_{t-1})                                  [4, f_att]
    alpha_t  = softmax_i(e_t)                                                   (over L = 196 locations)
    z_t      = beta_t * sum_i alpha_ti a_i,  beta_t = sigmoid(f_beta(h_{t-1}))  [4.2 soft, 4.2.1 gate]
    h_t, c_t = LSTM([E y_{t-1}, z_t], h_{t-1}, c_{t-1})                         [3.1.2, eq. 1-3]
    p(y_t)  ∝ exp(L_o(dropout(E y_{t-1} + L_h h_t + L_z z_t)))                  [eq. 7, deep output]
The attention (e_t, alpha_t and the context read from them) is decoder/attention.py; this module is the
network around it. What training minimises (the per-word NLL, eq. 14's doubly stochastic penalty, eq. 12's
hard-attention estimator and its moving baseline) is training/objectives.py.

Hard attention [4.1], training (train mode: `forward`, `sample`): per caption, with probability
1 - hard_expected_prob (the paper's 0.5), a location s_t ~ Multinomial(alpha_t) is drawn at every step
(Gumbel-max, attention.gumbel_locations) and z_t = beta_t * a_{s_t}; the other captions read the expected
context. `forward` returns log alpha_t[s_t] and H[alpha_t] for eq. 12.
Hard attention, decoding (eval mode: `step`, and `forward` / `sample` in eval mode): by default the
expected context sum_i alpha_ti a_i, as a soft decoder, so decoding is deterministic. `hard_context`
(`pipeline score --hard-context argmax|sample`) reads one location per step instead: a_{argmax_i alpha_ti},
or a_{s_t} with s_t drawn from alpha_t (as the authors' sampler does; then decoding is random).

Adaptive attention (`--sentinel`; Lu et al. 2017, "Knowing When to Look", section 2.3), soft attention only.
Lu et al. (their equation numbers) give the LSTM one more gate g_t = sigmoid(W_x x_t + W_h h_{t-1}) [9] and a
visual sentinel s_t = g_t ⊙ tanh(m_t) [10] (m_t the memory cell); their attention reads h_t AFTER the LSTM,
scores the k regions (z_t) and the sentinel, w_h^T tanh(W_s s_t + W_g h_t), softmaxes over k + 1 slots and
calls the last slot beta_t [12]; c_hat_t = beta_t s_t + (1 - beta_t) c_t [11] feeds the output (their 13).
Here, in this decoder's order (the attention reads h_{t-1} and its context feeds the LSTM), step t computes
    e_ti      = w^T tanh(W_a a_i + W_h h_{t-1})                       i = 1..L, as above (attention.scores)
    e_t,L+1   = w^T tanh(W_s s_{t-1} + b_s + W_h h_{t-1})             [12]: the same w and W_h h_{t-1} (Lu's w_h, W_g h)
    [alpha_t; beta_t] = softmax([e_t1 .. e_tL, e_t,L+1])              [12]: L + 1 slots, beta_t the last
    z_t       = sum_i alpha_ti a_i + beta_t (W_sc s_{t-1} + b_sc)     [11]: = (1 - beta_t) c_t + beta_t s^C_{t-1}
              (times Xu's gate sigmoid(f_beta(h_{t-1})) when --gate), c_t = Lu's renormalised region context
    gates     = [i, f, o, g, g^s] from [E y_{t-1}, z_t] and h_{t-1}     the LSTM's 4H gate columns + H for g^s
    s_t       = sigmoid(g^s_t) ⊙ tanh(c_t)                            [9, 10]: carried in the state (h, c, s)
and the output is eq. 7's deep output of z_t, as without the sentinel. Where this deviates from Lu et al.:
  * one step late, as Xu's attention is: step t mixes in s_{t-1} (the gate and cell of the previous step)
    beside h_{t-1}; the first step reads s_0 = tanh(c_0) (no input before it: an open gate, g_0 = 1);
  * the gate's input x_t is this LSTM's input [E y_{t-1}, z_t] (Lu's: [w_t; v^g]);
  * the sentinel lives in H and the regions in C: W_sc (C x H, bias b_sc) maps it into the context space,
    so the mix [11] feeds the LSTM input and the deep output (L_z) wherever z_t does (Lu's c_hat_t + h_t);
  * W_s has a bias b_s (the part W_a's bias plays for the regions).
What `step` returns as alpha (and `forward` as alphas) are the L region slots of that softmax, NOT
renormalised: sum_i alpha_ti = 1 - beta_t, "how much word t came from the image", so beam search, the
results and the attention maps carry beta_t with alpha unchanged (beta_t = 1 - alpha_t.sum()); `forward` also
returns it as "sentinel" (B, T). Eq. 14's penalty reads these maps: sum_t alpha_ti counts only the image's
share, so its pull toward sum_t alpha_ti = 1 also pulls toward the image (Lu et al. train with --alpha-c 0).
The new work per step: one (H -> A + C) matmul (W_s, W_sc), H more columns in the LSTM's input and recurrent
matmuls, and one (B, A) tanh for the sentinel's score beside the regions' (B, L, A).

Deviations from the paper are DecoderConfig options (defaults follow the paper unless noted).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import DecoderConfig
from pipeline.data.text import Vocab
from pipeline.decoder import attention
from pipeline.decoder.attention import f32
from pipeline.decoder.deferred import StepLinear


class Decoder(nn.Module):
    """Attention LSTM decoder. Contract (docs/design.md): forward / init_state / step / sample.

    state = (h, c), each (B, H); with the sentinel (h, c, s), s_{t-1} (B, H) too.  ctx = (a, att_a): a (B, L, C)
    annotation vectors (float32/bf16) and att_a = W_a a_i + b (B, L, A), computed once per image. Every tensor
    has batch on dim 0, so beam search reorders with index_select(0, idx).

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
        G = (5 if cfg.sentinel else 4) * H          # LSTM gate columns [i, f, o, g] (+ g^s, the sentinel's)
        self.embed = nn.Embedding(V, E)
        self.init_hc = nn.Linear(C, 2 * H)          # f_init_h and f_init_c side by side
        self.att_a = nn.Linear(C, A)                # W_a (its bias stands for f_att's bias)
        self.att_w = nn.Linear(A, 1, bias=False)    # w (a bias would cancel in the softmax)
        # Everything that reads h_{t-1}, fused into one matmul: [W_h (A) | f_beta (1) | LSTM W_hh (4H [+H])].
        self.h_proj = nn.Linear(H, A + 1 + G)
        # LSTM input weights W_ih split by input part: E y_{t-1} (precomputed for all t) and z_t.
        self.x_proj = nn.Linear(E, G, bias=False)
        self.z_proj = nn.Linear(C, G, bias=False)
        if cfg.sentinel:    # Lu et al. eq. 11-12: [W_s (A) | W_sc (C)] on s_{t-1}, one matmul (module docstring)
            self.sentinel_proj = nn.Linear(H, A + C)
        # Deep output: L_h h_t + L_z z_t as one matmul over [h_t, z_t], then L_o.
        self.out_hz = nn.Linear(H + C, E)
        self.out = nn.Linear(E, V)
        self.drop = nn.Dropout(cfg.dropout)
        # Hard attention's moving-average reward baseline (objectives.update_baseline): a buffer, so
        # checkpoints carry it.
        self.register_buffer("baseline", torch.zeros(()))
        # How a hard-attention decoder reads the image when decoding (eval mode): the expected context
        # (default, deterministic), the argmax location, or a sampled one (see the module docstring).
        # `pipeline score --hard-context` sets it; training is unaffected.
        self.hard_context = "expected"
        # Training on CPU: W_a a and L_o as bf16 matmuls (`_project`); train.py sets it from
        # --bf16-projections. Eval mode (validation, decoding) always computes them in fp32.
        self.bf16_projections = False
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
        """feats (B, L, C) -> ((h, c), (a, att_a)). h0, c0 from the mean annotation vector; with the sentinel
        the state is (h, c, s), s_0 = tanh(c_0) (module docstring)."""
        H = self.cfg.hidden_dim
        a = feats if torch.is_autocast_enabled(feats.device.type) else feats.to(self.att_a.weight.dtype)
        hc = torch.tanh(self.init_hc(a.mean(1)))    # (B, 2H)
        att_a = attention.prepare(self._project(self.att_a, a))    # (B, L, A): W_a a_i, once per image
        h, c = hc[:, :H].contiguous(), hc[:, H:].contiguous()
        return ((h, c, torch.tanh(c)) if self.cfg.sentinel else (h, c)), (a, att_a)

    def step(self, prev_tokens: torch.Tensor, state, ctx):
        """One decoding step: prev_tokens (B,) -> (logprobs (B, V), alpha (B, L), state (h, c[, s])).
        Deterministic unless a hard-attention decoder has hard_context "sample". With the sentinel, alpha
        sums to 1 - beta_t (module docstring)."""
        emb = self._drop(self.embed(prev_tokens), self.cfg.embed_dropout)   # (B, E)
        state, z, alpha, _, _ = self._cell(self.x_proj(emb), state, ctx)    # z (B, C), alpha (B, L)
        logits = self._output(emb, state[0], z)                              # (B, V)
        return F.log_softmax(f32(logits), -1), alpha, state

    def _drop(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return F.dropout(x, p, self.training) if p > 0 else x

    # -- training: teacher forcing and sampling, over one recurrence -------------------------------
    def forward(self, feats: torch.Tensor, tokens: torch.Tensor) -> dict:
        """Teacher-forced pass. feats (B, L, C), tokens (B, T+1) = <start> w1..wn <end>.

        Returns logits (B, T, V) for tokens[:, 1:], alphas (B, T, L), with the sentinel its share
        "sentinel" (B, T) beta_t, and with hard attention in training mode the per-step log alpha_t[s_t]
        (B, T), entropies (B, T) and the mask of captions that used sampled locations (B,).
        """
        B, T = tokens.size(0), tokens.size(1) - 1
        state, ctx = self.init_state(feats)
        emb = self._drop(self.embed(tokens[:, :-1]), self.cfg.embed_dropout)   # (B, T, E): E y_{t-1}
        x_gates = self.x_proj(emb).unbind(1)                # T x (B, 4H): one matmul for all steps
        # (unbind, not x_gates[:, t]: each indexing would back-propagate a zero-filled (B, T, 4H))
        sampled = self._sampling(B, feats.device)
        steps = self._unroll(state, ctx, sampled, x_gates[0], lambda t, h, z: x_gates[t + 1] if t + 1 < T else None)
        logits = self._output(emb, torch.stack(steps["h"], 1), torch.stack(steps["z"], 1))   # (B, T, V): one matmul
        out = {"logits": logits, "alphas": torch.stack(steps["alpha"], 1)}
        if self.cfg.sentinel:
            out["sentinel"] = torch.stack(steps["beta"], 1)                                # (B, T)
        if sampled is not None:
            out.update(logp_s=steps["logp_s"], entropy=steps["entropy"], sampled=sampled)
        return out

    def sample(self, feats: torch.Tensor, n: int, max_len: int, *, greedy: bool = False) -> dict:
        """Draw `n` captions per image from the model as it is (train mode: dropout on; hard attention
        samples locations as in training). feats (B, L, C).

        max_len counts WORDS, `<end>` not counted (as everywhere: training's caption filter, decoding):
        a caption is at most max_len words and then `<end>`, so at most max_len + 1 steps run. At step
        max_len + 1 only `<end>` may follow: a caption that draws a word there instead stops at
        max_len words without ending (that step is masked out: its word is not part of the caption
        and its log-probability gets no gradient), as a caption cut by the length limit.

        Returns, for B*n captions (row b*n + k is sample k of image b), T <= max_len + 1 steps:
          tokens (B*n, T) word ids (<end> included when drawn, <pad> after), mask (B*n, T) 1.0 for the
          tokens that belong to the caption (its words, and its <end> if it ended), logp (B*n, T)
          log p(w_t | w_<t, a) with gradient, and for hard attention logp_s (B*n, T) log alpha_t[s_t]
          (0 for expected-context captions), entropy (B*n, T) H[alpha_t], sampled (B*n,) which captions
          sampled their locations. Every id the model emits is a token, specials included (a sampled
          <unk>, <pad> or <start> before <end> is masked 1: the reward scores it as a word).
        greedy: arg-max words instead of samples (the SCST greedy baseline, with n = 1).
        """
        state, ctx = self.init_state(feats)
        B = feats.size(0)
        rep = torch.arange(B, device=feats.device).repeat_interleave(n)        # (B*n,) image of each row
        state = tuple(s.index_select(0, rep) for s in state)
        sampled = self._sampling(B * n, feats.device)
        if sampled is not None:     # hard attention samples locations per caption: one ctx row per caption
            ctx = tuple(c.index_select(0, rep) for c in ctx)
        # else the n captions of image b read its one ctx row (attention groups; no per-sample copy)
        words = _Words(self, B * n, max_len, greedy, feats.device)
        steps = self._unroll(state, ctx, sampled, words.first(), words)
        out = words.result()
        if sampled is not None:
            out.update(logp_s=steps["logp_s"] * sampled.float()[:, None], entropy=steps["entropy"], sampled=sampled)
        return out

    def _sampling(self, rows: int, device) -> torch.Tensor | None:
        """Hard attention in training: which captions (rows,) sample their locations (True) rather than
        read the expected context (probability hard_expected_prob each). None otherwise."""
        if self.cfg.attention != "hard" or not self.training:
            return None
        return torch.rand(rows, device=device) >= self.cfg.hard_expected_prob

    def _unroll(self, state, ctx, sampled, x_gate, feed) -> dict:
        """The recurrence `forward` (teacher forcing) and `sample` (drawn words) share: _cell from `state`
        while there is an input. x_gate (B, 4H) = W_x E y_0 of the first step; feed(t, h_t, z_t) returns
        the next step's x_gate, or None to stop. Returns per-step lists h (B, H), z (B, C), alpha (B, L),
        beta (B,) (the sentinel's share, None without it), and with sampled locations (sampled not None)
        logp_s and entropy (B, T) (see `forward`)."""
        hs, zs, alphas, betas, extras = [], [], [], [], []
        proj = (StepLinear(self.h_proj), StepLinear(self.z_proj))     # weight grads: one matmul per batch
        t = 0
        while x_gate is not None:
            state, z, alpha, beta, extra = self._cell(x_gate, state, ctx, sampled, proj)
            hs.append(state[0])
            zs.append(z)
            alphas.append(alpha)
            betas.append(beta)
            extras.append(extra)
            x_gate = feed(t, state[0], z)
            t += 1
        steps = {"h": hs, "z": zs, "alpha": alphas, "beta": betas}
        if sampled is not None:
            steps.update(logp_s=torch.stack([x[0] for x in extras], 1), entropy=torch.stack([x[1] for x in extras], 1))
        return steps

    def _cell(self, x_gate, state, ctx, sampled=None, proj=None):
        """Attention + gate + LSTM update. x_gate (B, 4H) ((B, 5H) with the sentinel) = W_x E y_{t-1};
        sampled (B,) bool or None; proj: the (h_proj, z_proj) callables of a recurrence (deferred.StepLinear),
        else the modules. Returns the new state (h, c[, s]) (B, H) each, z (B, C), alpha (B, L), the
        sentinel's share beta (B,) (None without it), and with sampled (log alpha_t[s_t], H[alpha_t])."""
        cfg, h, c, a = self.cfg, state[0], state[1], ctx[0]
        A, H = cfg.attention_dim, cfg.hidden_dim
        G = h.size(0) // a.size(0)              # rows per ctx row: 1, or K beams / SCST samples sharing it
        if G * a.size(0) != h.size(0):
            raise ValueError(f"state has {h.size(0)} rows, not a multiple of ctx's {a.size(0)}")
        h_proj, z_proj = proj or (self.h_proj, self.z_proj)
        hp = h_proj(h)                                                  # (B, A+1+4H[+H])
        if cfg.sentinel:
            z, alpha, beta, extra = self._attend_sentinel(hp[:, :A], state[2], ctx, G)
        else:
            (z, alpha, extra), beta = self._attend(hp[:, :A], ctx, G, sampled), None
        if cfg.gate:
            z = z * torch.sigmoid(hp[:, A:A + 1])                       # beta_t, a scalar per caption
        gates = x_gate + hp[:, A + 1:] + z_proj(self._drop(z, cfg.context_dropout))   # [i, f, o, g(, g^s)]
        ifo = torch.sigmoid(gates[:, :3 * H])
        g = torch.tanh(gates[:, 3 * H:4 * H])
        c = ifo[:, H:2 * H] * c + ifo[:, :H] * g
        h = ifo[:, 2 * H:] * torch.tanh(c)
        if beta is None:
            return (h, c), z, alpha, None, extra
        return (h, c, torch.sigmoid(gates[:, 4 * H:]) * torch.tanh(c)), z, alpha, beta, extra   # s_t [Lu 9, 10]

    def _attend(self, q, ctx, G, sampled):
        """Xu's attention [4]: q = W_h h_{t-1} (B, A) -> z (B, C), alpha (B, L), and with sampled locations
        (log alpha_t[s_t], H[alpha_t]) (else None)."""
        a, att_a = ctx
        e = attention.scores(att_a, q, self.att_w.weight, G)            # (B, L)
        alpha = torch.softmax(f32(e), 1)                                # (B, L), fp32 under autocast
        z = attention.expected_context(alpha, a, G)                     # (B, C)
        extra = None
        if sampled is not None:
            assert G == 1, "hard attention samples per caption: ctx must have one row per caption"
            z, extra = attention.sampled_context(e, alpha, a, z, sampled)
        elif self.cfg.attention == "hard" and not self.training and self.hard_context != "expected":
            z = attention.location_context(alpha, a, self.hard_context, G).to(z.dtype)   # (B, C) = a_{s_t}
        return z, alpha, extra

    def _attend_sentinel(self, q, s, ctx, G):
        """Adaptive attention (module docstring; Lu et al. eq. 11-12): q = W_h h_{t-1} (B, A), s = s_{t-1}
        (B, H) -> z (B, C) the mixed context, alpha (B, L) the region slots (sum 1 - beta), beta (B,), None."""
        a, att_a = ctx
        A = self.cfg.attention_dim
        e = attention.scores(att_a, q, self.att_w.weight, G)            # (B, L): the regions, as Xu's
        sp = self.sentinel_proj(s)                                      # (B, A + C): W_s s + b_s | W_sc s + b_sc
        e_s = attention.sentinel_score(sp[:, :A], q, self.att_w.weight)    # (B,): slot L + 1
        alpha, beta = attention.sentinel_softmax(e, e_s)                # (B, L), (B,)
        z = attention.expected_context(alpha, a, G)                     # (B, C) = (1 - beta) c_t
        return z + beta[:, None].to(z.dtype) * sp[:, A:].to(z.dtype), alpha, beta, None

    def _output(self, emb, h, z):
        """Deep output: logits = L_o(dropout(E y_{t-1} + L_h h_t + L_z z_t)). emb (.., E), h (.., H), z (.., C)."""
        x = emb + self.out_hz(torch.cat([self._drop(h, self.cfg.hidden_dropout), z], -1))
        if self.cfg.deep_output_tanh:
            x = torch.tanh(x)
        return self._project(self.out, self.drop(x))

    def _project(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """layer(x), for the two largest matmuls of a training step (W_a a, 12544 x 512 x 512 at B = 64, and
        L_o): with bf16_projections, in training, on CPU, in fp32 and outside autocast, a bf16 matmul under
        autocast (fp32 accumulation; the output, and in backward the weight's gradient, rounded to bf16)
        returned as fp32, so the fused attention kernels and the loss stay fp32."""
        if (self.bf16_projections and self.training and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu")):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return layer(x).float()
        return layer(x)


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One index per row drawn from `probs` (N, V) (rows of non-negative weights, e.g. a softmax) -> (N,) long.

    Inverse-CDF sampling: the first i with cdf_i > u, u ~ U[0, cdf_V) per row; a zero-weight index is never
    drawn. One uniform per row: torch.multinomial draws V exponentials per row, 8% of an SCST step at V = 2538.
    """
    cdf = probs.cumsum(1)                                                           # (N, V)
    total = cdf[:, -1:]
    u = torch.minimum(torch.rand_like(total) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1)                        # (N,), u < cdf_V


class _Words:
    """`Decoder.sample`'s side of the recurrence: after each step, the next word of every caption (drawn,
    or arg-max) with its log-probability, which captions are still going, and the next step's input."""

    def __init__(self, model: Decoder, rows: int, max_len: int, greedy: bool, device):
        self.model, self.max_len, self.greedy = model, max_len, greedy
        self.prev = torch.full((rows,), Vocab.start, dtype=torch.long, device=device)
        self.alive = torch.ones(rows, dtype=torch.bool, device=device)
        self.toks, self.masks, self.logps = [], [], []
        self.emb = None                                                     # E y of the step to come

    def first(self) -> torch.Tensor:
        """x_gate (rows, 4H) of the step after `prev`: W_x E y (the embedding kept for the deep output)."""
        m = self.model
        self.emb = m._drop(m.embed(self.prev), m.cfg.embed_dropout)        # (rows, E)
        return m.x_proj(self.emb)

    def __call__(self, t: int, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor | None:
        """Step t (0-based) gave h, z: draw its words; the next x_gate, or None when done.
        Steps 0..max_len - 1: words or <end>; step max_len: <end> only."""
        logp_all = F.log_softmax(f32(self.model._output(self.emb, h, z)), -1)   # (rows, V)
        w = logp_all.argmax(1) if self.greedy else draw(logp_all.detach().exp())          # (rows,)
        ends = w == Vocab.end
        keep = self.alive & ends if t == self.max_len else self.alive             # (rows,) the caption's tokens
        w = torch.where(keep, w, torch.full_like(w, Vocab.pad))
        self.masks.append(keep.float())
        self.toks.append(w)
        self.logps.append(logp_all.gather(1, w[:, None]).squeeze(1))
        self.alive = self.alive & ~ends
        self.prev = w
        if t == self.max_len or not bool(self.alive.any()):
            return None
        return self.first()

    def result(self) -> dict:
        """tokens, mask, logp (rows, T): see Decoder.sample."""
        return {"tokens": torch.stack(self.toks, 1), "mask": torch.stack(self.masks, 1),
                "logp": torch.stack(self.logps, 1)}


def count_flops(cfg: DecoderConfig, vocab_size: int, feature_dim: int, num_regions: int,
                lengths) -> int:
    """Matmul FLOPs of one forward + backward over captions with T predicted tokens each (`lengths`).

    Backward costs 2x forward for a matmul (grads of input and weight) except where the input needs
    no grad: W_a a_i and sum_i alpha_i a_i read the fixed features (1x). Elementwise work is not counted.
    """
    E, H, A, C, V, L = cfg.embed_dim, cfg.hidden_dim, cfg.attention_dim, feature_dim, vocab_size, num_regions
    G = (5 if cfg.sentinel else 4) * H                       # LSTM gate columns (+ the sentinel's gate)
    per_image = 2 * L * C * A + 2 * C * 2 * H                # W_a a_i (fwd + dW), init MLP (fwd + dW)
    per_step = 3 * (H * (A + 1 + G)                          # fused h projection
                    + L * A                                  # w^T tanh(.)
                    + C * G + E * G                          # LSTM input weights
                    + (H + C) * E + E * V) + 2 * L * C       # deep output; sum_i alpha_i a_i (fwd + dalpha)
    if cfg.sentinel:
        per_step += 3 * (H * (A + C) + A)                    # [W_s | W_sc] s_{t-1}; the sentinel's w^T tanh(.)
    return 2 * sum(per_image + int(T) * per_step for T in lengths)
