import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.decoder.attention import _AttentionScore, _attention_score_nograd, gumbel_locations
from pipeline.decoder.model import Decoder, DecoderConfig, count_flops, draw
from pipeline.training.objectives import update_baseline, xe_loss

V, C, L = 23, 12, 196


def _model(**kw):
    torch.manual_seed(0)
    cfg = DecoderConfig(**dict(dict(embed_dim=10, hidden_dim=14, attention_dim=9, dropout=0.0, embed_dropout=0.0, context_dropout=0.0, hidden_dropout=0.0), **kw))
    m = Decoder(cfg, V, C)
    with torch.no_grad():   # non-trivial biases everywhere, so a wrong slice cannot hide
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _np(t):
    return t.detach().double().numpy()


def _numpy_step(m, a, y_prev, h, c):
    """The paper's equations written out in numpy from the named parameter blocks."""
    cfg = m.cfg
    A, H = cfg.attention_dim, cfg.hidden_dim
    sig = lambda x: 1 / (1 + np.exp(-x))
    Wp, bp = _np(m.h_proj.weight), _np(m.h_proj.bias)
    W_h, b_h = Wp[:A], bp[:A]                       # attention's W_h
    w_beta, b_beta = Wp[A], bp[A]                   # f_beta
    W_hh, b_lstm = Wp[A + 1:], bp[A + 1:]           # LSTM recurrent weights, gates [i, f, o, g]
    Ey = _np(m.embed.weight)[y_prev]                                   # (B, E)
    att_a = np.einsum("blc,ac->bla", a, _np(m.att_a.weight)) + _np(m.att_a.bias)
    e = np.einsum("bla,a->bl", np.tanh(att_a + (h @ W_h.T + b_h)[:, None]), _np(m.att_w.weight)[0])
    alpha = np.exp(e - e.max(1, keepdims=True))
    alpha /= alpha.sum(1, keepdims=True)
    beta = sig(h @ w_beta + b_beta)[:, None]
    z = beta * np.einsum("bl,blc->bc", alpha, a)
    gates = Ey @ _np(m.x_proj.weight).T + z @ _np(m.z_proj.weight).T + h @ W_hh.T + b_lstm
    i, f, o, g = sig(gates[:, :H]), sig(gates[:, H:2 * H]), sig(gates[:, 2 * H:3 * H]), np.tanh(gates[:, 3 * H:])
    c2 = f * c + i * g
    h2 = o * np.tanh(c2)
    W_hz = _np(m.out_hz.weight)
    deep = Ey + h2 @ W_hz[:, :H].T + z @ W_hz[:, H:].T + _np(m.out_hz.bias)   # E y + L_h h + L_z z
    if cfg.deep_output_tanh:
        deep = np.tanh(deep)
    logits = deep @ _np(m.out.weight).T + _np(m.out.bias)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    return logp, alpha, h2, c2


@pytest.mark.parametrize("deep_tanh", [False, True])
def test_step_matches_numpy_transcription(deep_tanh):
    m = _model(deep_output_tanh=deep_tanh).double().eval()
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, L, C))
    y = np.array([1, 5, 7])
    (h, c), ctx = m.init_state(torch.from_numpy(a))
    # h0, c0 = tanh(f_init(mean_i a_i))
    hc = np.tanh(a.mean(1) @ _np(m.init_hc.weight).T + _np(m.init_hc.bias))
    np.testing.assert_allclose(_np(h), hc[:, :14], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_np(c), hc[:, 14:], rtol=1e-10, atol=1e-12)
    h1, c1 = h + 0.3, c - 0.2         # any state, not just the initial one
    logp, alpha, (h2, c2) = m.step(torch.from_numpy(y), (h1, c1), ctx)
    ref = _numpy_step(m, a, y, _np(h1), _np(c1))
    for got, want in zip((logp, alpha, h2, c2), ref):
        np.testing.assert_allclose(_np(got), want, rtol=1e-9, atol=1e-11)


def test_forward_equals_stepwise_and_alpha_sums_to_one():
    m = _model().eval()
    feats = torch.randn(4, L, C)
    tokens = torch.randint(4, V, (4, 7))
    tokens[:, 0] = 1
    out = m(feats, tokens)
    assert out["logits"].shape == (4, 6, V) and out["alphas"].shape == (4, 6, L)
    torch.testing.assert_close(out["alphas"].sum(-1), torch.ones(4, 6))
    state, ctx = m.init_state(feats)
    for t in range(6):
        logp, alpha, state = m.step(tokens[:, t], state, ctx)
        torch.testing.assert_close(alpha.sum(1), torch.ones(4))
        torch.testing.assert_close(logp, torch.log_softmax(out["logits"][:, t], -1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(alpha, out["alphas"][:, t])


def test_attention_score_backward_matches_autograd():
    torch.manual_seed(0)
    att = torch.randn(2, 5, 3, dtype=torch.double, requires_grad=True)
    q = torch.randn(2, 3, dtype=torch.double, requires_grad=True)
    w = torch.randn(3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(_AttentionScore.apply, (att, q, w))


@pytest.mark.parametrize("rows,chunk,groups", [(7, 4, 1), (8, 4, 1), (3, 8, 1), (1, 1, 1),
                                              (6, 4, 3), (10, 2, 5), (12, 8, 3)])
def test_chunked_attention_score_equals_unchunked(rows, chunk, groups):
    torch.manual_seed(0)
    att = torch.randn(rows // groups, L, 9)
    q, w = torch.randn(rows, 9), torch.randn(9)
    want = _AttentionScore.apply(att.repeat_interleave(groups, 0), q, w)      # (rows, L), whole batch
    got = _attention_score_nograd(att, q, w, groups, chunk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_step_with_ctx_per_image_equals_expanded(grad):
    """Beam search's layout (state B*K rows, ctx B rows) == expanded ctx; no-grad (chunked) == autograd path."""
    m = _model().eval()
    K = 3
    state, ctx = m.init_state(torch.randn(4, L, C))
    rep = torch.arange(4).repeat_interleave(K)
    state = tuple(s.index_select(0, rep) + 0.1 * torch.randn(4 * K, s.size(1)) for s in state)
    prev = torch.randint(0, V, (4 * K,))
    with torch.no_grad():
        want = m.step(prev, state, tuple(t.index_select(0, rep) for t in ctx))
    with torch.set_grad_enabled(grad):
        got = m.step(prev, state, ctx)
        full = m.step(prev, state, tuple(t.index_select(0, rep) for t in ctx))
    for g, f, w in zip((got[0], got[1], *got[2]), (full[0], full[1], *full[2]), (want[0], want[1], *want[2])):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(f, w, rtol=1e-5, atol=1e-6)


def test_hard_attention_trains_without_nan_and_decodes_deterministically():
    m = _model(attention="hard")
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    feats = torch.randn(6, 49, C)
    tokens = torch.randint(4, V, (6, 5))
    tokens[:, 0] = 1
    for _ in range(10):
        out = m(feats, tokens)
        assert out["sampled"].dtype == torch.bool and out["logp_s"].shape == (6, 4)
        loss, parts = xe_loss(m, out, tokens)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
        update_baseline(m, parts["reward_sum"], parts["reward_n"])
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        opt.step()
    assert m.baseline.item() != 0.0                 # the moving-average baseline is being tracked
    m.eval()
    a = m(feats, tokens)["logits"]
    torch.testing.assert_close(a, m(feats, tokens)["logits"])   # eval: expected context, no sampling


def class_caption_nlls(cfg: DecoderConfig, regions: int, feature_dim: int, steps: int = 40):
    """Train a decoder for `steps` Adam steps on 32 images of 4 noisy patterns whose caption names the
    pattern; returns the model and its per-step NLLs (a learnable task: the NLL must fall)."""
    torch.manual_seed(0)
    K = 4
    patterns = torch.randn(K, regions, feature_dim)
    labels = torch.arange(32) % K
    feats = patterns[labels] + 0.3 * torch.randn(32, regions, feature_dim)
    tokens = torch.stack([torch.tensor([1, 4 + int(k), 8 + int(k), 2]) for k in labels])   # caption = class
    m = Decoder(cfg, 12, feature_dim)
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    nlls = []
    for _ in range(steps):
        loss, parts = xe_loss(m, m(feats, tokens), tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        nlls.append(parts["nll"].item())
    return m, nlls


def test_loss_decreases_on_structured_data():
    _, nlls = class_caption_nlls(DecoderConfig(embed_dim=16, hidden_dim=16, attention_dim=16, dropout=0.0,
                                               embed_dropout=0.0, context_dropout=0.0, hidden_dropout=0.0), 49, C)
    assert nlls[-1] < 0.2 * nlls[0], nlls[::10]


def test_config_rejects_unknown_attention():
    with pytest.raises(UserError, match="attention"):
        DecoderConfig(attention="spatial")


def test_count_flops_grows_with_length():
    cfg = DecoderConfig()
    assert count_flops(cfg, 2500, 512, 196, [10]) < count_flops(cfg, 2500, 512, 196, [11])


# ---- regularisation options and sampling (self-critical training) ------------------------------------

def _batch(B=5, T=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, 49, C, generator=g)
    tokens = torch.randint(4, V, (B, T + 1), generator=g)
    tokens[:, 0] = 1
    tokens[:, -1] = 2
    return feats, tokens


def test_label_smoothing_zero_is_the_plain_loss_and_eps_matches_its_definition():
    m = _model(dropout=0.0, embed_dropout=0.0, context_dropout=0.0, hidden_dropout=0.0)
    feats, tokens = _batch()
    out = m(feats, tokens)
    plain, parts = xe_loss(m, out, tokens)
    same, _ = xe_loss(m, out, tokens, label_smoothing=0.0)
    assert torch.equal(plain, same)
    eps = 0.1
    smooth, sparts = xe_loss(m, out, tokens, label_smoothing=eps)
    logp = torch.log_softmax(out["logits"], -1)                          # (B, T, V)
    target = tokens[:, 1:]
    nll = -logp.gather(2, target[..., None]).mean()
    want = (1 - eps) * nll - eps * logp.mean(-1).mean() + m.cfg.alpha_c * parts["reg"]
    torch.testing.assert_close(smooth, want)
    assert torch.equal(sparts["nll"], parts["nll"])                     # the logged NLL is never smoothed


def test_new_dropouts_at_zero_change_nothing_and_act_only_in_training():
    feats, tokens = _batch()
    base = _model()
    zero = _model(embed_dropout=0.0, context_dropout=0.0, hidden_dropout=0.0)
    torch.manual_seed(3)
    a = base(feats, tokens)["logits"]
    torch.manual_seed(3)
    assert torch.equal(a, zero(feats, tokens)["logits"])
    drop = _model(embed_dropout=0.3, context_dropout=0.3, hidden_dropout=0.3)
    drop.train()
    assert not torch.allclose(drop(feats, tokens)["logits"], a)
    drop.eval()
    base.eval()
    torch.testing.assert_close(drop(feats, tokens)["logits"], base(feats, tokens)["logits"])


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_sample_shapes_masks_and_log_probs(attention):
    m = _model(attention=attention)
    feats, _ = _batch(B=3)
    torch.manual_seed(0)
    out = m.sample(feats, 4, max_len=6)
    toks, mask, logp = out["tokens"], out["mask"], out["logp"]
    assert toks.shape == mask.shape == logp.shape and toks.shape[0] == 12 and toks.shape[1] <= 7
    for r in range(12):          # mask covers the caption up to and including <end>, or its first 6 words
        row = toks[r].tolist()
        n = row.index(2) + 1 if 2 in row else 6
        assert mask[r].tolist() == [1.0] * n + [0.0] * (len(row) - n)
        assert all(t == 0 for t in row[n:])              # <pad> after the end
    assert (logp <= 0).all() and logp.requires_grad
    if attention == "hard":
        assert out["sampled"].shape == (12,) and out["logp_s"].shape == toks.shape
        assert (out["logp_s"][~out["sampled"]] == 0).all()
    m.eval()                                             # greedy sampling = greedy decoding
    from pipeline.decoder.decode import greedy_decode
    g = m.sample(feats, 1, max_len=6, greedy=True)
    want = greedy_decode(m, feats, max_len=7)[0]
    for r in range(3):
        got = [t for t, k in zip(g["tokens"][r].tolist(), g["mask"][r].tolist()) if k]
        assert 0 < len(got) <= 7 and got == want[r][:len(got)]


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_sample_max_len_counts_words(attention):
    """max_len counts words: at most max_len words, then <end>. A caption that has not ended after max_len
    words may still draw <end> (kept), but a word drawn at step max_len + 1 is not part of it (mask 0, <pad>):
    it stops at max_len words, unended. (It used to keep that word: max_len + 1 words.)"""
    m = _model(attention=attention).train()
    feats, _ = _batch(B=3)
    with torch.no_grad():
        m.out.bias[2] = -1e4                             # <end> never drawn
    out = m.sample(feats, 4, max_len=3)
    assert out["tokens"].shape == (12, 4)
    assert (out["mask"] == torch.tensor([1.0, 1.0, 1.0, 0.0])).all() and (out["tokens"][:, 3] == 0).all()
    assert (out["tokens"][:, :3] != 2).all()
    with torch.no_grad():                                # <end> certain: "<end>" at once, one step
        m.out.bias[2] = 1e4
    out = m.sample(feats, 2, max_len=3, greedy=True)
    assert out["tokens"].tolist() == [[2]] * 6 and out["mask"].tolist() == [[1.0]] * 6
    with torch.no_grad():                                # <end> after 3 words: kept at step 4
        m.out.bias[2] = 1.5
    torch.manual_seed(0)
    out = m.sample(feats, 50, max_len=3)
    ended = out["mask"][:, 3] == 1
    assert ended.any() and (~ended).any()
    assert (out["tokens"][ended, 3] == 2).all() and (out["tokens"][~ended, 3] == 0).all()
    assert (out["mask"].sum(1) <= 4).all()


def test_hard_decoding_contexts():
    """A hard-attention decoder decodes with the expected context by default; argmax reads a_{argmax alpha},
    sample reads a drawn location; soft decoders and training ignore the setting."""
    m = _model(attention="hard").eval()
    feats = torch.randn(2, 49, C)
    state, ctx = m.init_state(feats)
    prev = torch.tensor([1, 1])
    expected = m.step(prev, state, ctx)[0]
    m.hard_context = "argmax"
    arg = m.step(prev, state, ctx)
    assert not torch.allclose(arg[0], expected)
    # the argmax context by hand: z = beta * a_{argmax alpha}, through the same LSTM and output
    s = arg[1].argmax(1)
    hp = m.h_proj(state[0])
    A = m.cfg.attention_dim
    z = feats[torch.arange(2), s] * torch.sigmoid(hp[:, A:A + 1])
    x_gate = m.x_proj(m.embed(prev))
    gates = x_gate + hp[:, A + 1:] + m.z_proj(z)
    H = m.cfg.hidden_dim
    ifo, g = torch.sigmoid(gates[:, :3 * H]), torch.tanh(gates[:, 3 * H:])
    c = ifo[:, H:2 * H] * state[1] + ifo[:, :H] * g
    h = ifo[:, 2 * H:] * torch.tanh(c)
    torch.testing.assert_close(arg[0], torch.log_softmax(m._output(m.embed(prev), h, z), -1))
    m.hard_context = "sample"
    torch.manual_seed(0)
    assert torch.isfinite(m.step(prev, state, ctx)[0]).all()
    soft = _model().eval()
    soft.hard_context = "argmax"
    s1, c1 = soft.init_state(feats)
    torch.testing.assert_close(soft.step(prev, s1, c1)[0], _model().eval().step(prev, s1, c1)[0])


@pytest.mark.parametrize("per_word", [True, False])
def test_hard_loss_is_eq12_term_by_term(per_word):
    """The hard-attention surrogate against eq. 12 written out by hand, loop by loop: its value and its
    gradients with respect to log p(s) and H[alpha] (lambda_r (R_n - b) / (B T) per step, with R_n the
    per-word or whole-caption log-likelihood; lambda_e / (B T) per step, only for sampled captions)."""
    lr_, le_, b = 0.7, 0.05, -2.5
    m = _model(attention="hard", reinforce_weight=lr_, entropy_weight=le_, alpha_c=0.0, reward_per_word=per_word)
    m.baseline.fill_(b)
    torch.manual_seed(3)
    B, T = 4, 5
    tokens = torch.randint(4, V, (B, T + 1))
    logits = torch.randn(B, T, V)
    logp_s = torch.randn(B, T, requires_grad=True)
    ent = torch.rand(B, T, requires_grad=True)
    sampled = torch.tensor([True, False, True, True])
    out = {"logits": logits, "alphas": torch.full((B, T, L), 1.0 / L), "logp_s": logp_s, "entropy": ent,
           "sampled": sampled}
    loss, parts = xe_loss(m, out, tokens)
    loss.backward()

    lsm = torch.log_softmax(logits, -1)
    nll = sum(-lsm[i, t, tokens[i, t + 1]].item() for i in range(B) for t in range(T)) / (B * T)
    want, g_lp, g_ent = nll, torch.zeros(B, T), torch.zeros(B, T)
    for i in range(B):
        if not sampled[i]:
            continue
        loglik = sum(lsm[i, t, tokens[i, t + 1]].item() for t in range(T))
        r = loglik / T if per_word else loglik
        for t in range(T):
            # eq. 12 per word: lambda_r (r - b) d log p(s_t) and lambda_e d H_t, each averaged over B x T words
            coef = (r - b) / (B if per_word else B * T)
            want += -lr_ * coef * logp_s[i, t].item() - le_ * ent[i, t].item() / (B * T)
            g_lp[i, t], g_ent[i, t] = -lr_ * coef, -le_ / (B * T)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(logp_s.grad, g_lp)
    torch.testing.assert_close(ent.grad, g_ent)
    rewards = [sum(lsm[i, t, tokens[i, t + 1]].item() for t in range(T)) / (T if per_word else 1) for i in (0, 2, 3)]
    assert parts["reward"].item() == pytest.approx(np.mean(rewards), rel=1e-5)
    update_baseline(m, parts["reward_sum"], parts["reward_n"])
    assert m.baseline.item() == pytest.approx(0.9 * b + 0.1 * np.mean(rewards), rel=1e-5)


# ---- checkpoints of the decoder before the attention / objectives split (issue 20 part 2) -----------

def test_a_state_dict_made_from_the_old_key_names_loads():
    """The Decoder's parameters keep their names and shapes (runs resume from checkpoints of the code before
    decoder/attention.py and the move of the loss to objectives.py): a state dict built from the old key
    list loads strictly, in the old order, and every value lands where its name says."""
    E, H, A = 10, 14, 9                                   # _model()'s sizes; V, C module constants
    old = {"baseline": (), "embed.weight": (V, E), "init_hc.weight": (2 * H, C), "init_hc.bias": (2 * H,),
           "att_a.weight": (A, C), "att_a.bias": (A,), "att_w.weight": (1, A),
           "h_proj.weight": (A + 1 + 4 * H, H), "h_proj.bias": (A + 1 + 4 * H,), "x_proj.weight": (4 * H, E),
           "z_proj.weight": (4 * H, C), "out_hz.weight": (E, H + C), "out_hz.bias": (E,),
           "out.weight": (V, E), "out.bias": (V,)}
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) for k, shape in old.items()}
    m = _model()
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == list(old.items())
    m.load_state_dict(sd)                                 # strict: no key missing, none unexpected
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    assert m.baseline.item() == sd["baseline"].item()     # hard attention's baseline travels with it


# ---- hard attention's location samples (issue 20 part 3) ----------------------------------------

def _max_gap(s: torch.Tensor, alpha: torch.Tensor) -> float:
    """Largest |frequency of location i among the draws s - alpha_i|."""
    return ((torch.bincount(s, minlength=len(alpha)).double() / len(s)) - alpha.double()).abs().max().item()


GUMBEL_TOL = 0.006    # 200,000 draws: a frequency's standard deviation is <= 0.0011, so > 5 sd


def test_gumbel_locations_follow_alpha_and_wrong_samplers_do_not():
    """s_t ~ Multinomial(alpha_t) by Gumbel-max: 200,000 draws for one fixed alpha; every location's frequency
    is within GUMBEL_TOL of alpha_i. The same check refuses wrong samplers (their gaps are 0.05 to 0.6):
    the argmax, a uniform draw, Gumbel noise with the wrong sign, a tempered draw (alpha^0.8 or alpha^2),
    uniform instead of Gumbel noise, and alpha read as logits."""
    alpha = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    N = 200_000
    logalpha = alpha.log().expand(N, -1).contiguous()     # (N, L): the same alpha_t for every row
    torch.manual_seed(0)
    s = gumbel_locations(logalpha)
    assert s.shape == (N,) and s.dtype == torch.long
    assert _max_gap(s, alpha) < GUMBEL_TOL
    u = torch.rand(N, len(alpha))
    g = -torch.log(-torch.log(u))                         # standard Gumbel
    wrong = {"argmax": logalpha.argmax(1), "uniform": torch.randint(0, len(alpha), (N,)),
             "minus gumbel": (logalpha - g).argmax(1), "alpha^0.8": (0.8 * logalpha + g).argmax(1),
             "alpha^2": (2 * logalpha + g).argmax(1), "uniform noise": (logalpha + u).argmax(1),
             "alpha as logits": (alpha + g).argmax(1)}
    for name, w in wrong.items():
        assert _max_gap(w, alpha) > 4 * GUMBEL_TOL, name


def test_word_draws_follow_the_distribution_and_never_a_zero_weight():
    """Decoder.sample's word sampler (inverse CDF): 200,000 draws from one unnormalised distribution with zero
    weights (first, inside, last) follow p_i within GUMBEL_TOL and never pick a zero-weight index; the same
    check refuses a sampler that forgets the weights are unnormalised (u ~ U[0, 1) against a total of 2)."""
    w = torch.tensor([0.0, 0.8, 0.5, 0.0, 0.3, 0.2, 0.12, 0.08, 0.0])     # sums to 2, not 1
    N = 200_000
    probs = w.expand(N, -1).contiguous()
    torch.manual_seed(0)
    s = draw(probs)
    assert s.shape == (N,) and s.dtype == torch.long
    assert not torch.isin(s, torch.tensor([0, 3, 8])).any()
    assert _max_gap(s, w / w.sum()) < GUMBEL_TOL
    cdf = probs.cumsum(1)
    unscaled = torch.searchsorted(cdf, torch.rand(N, 1), right=True).squeeze(1)
    assert _max_gap(unscaled, w / w.sum()) > 4 * GUMBEL_TOL
    assert draw(torch.tensor([[0.0, 0.0, 1e-30]])).item() == 2     # a tiny last weight: still inside


def test_hard_attention_training_reads_locations_drawn_from_alpha():
    """Through Decoder.forward in training, every caption sampling (hard_expected_prob 0): one image repeated
    200,000 times, one step. Each caption's location, recovered from its log alpha_t[s_t], follows alpha_t."""
    m = _model(attention="hard", hard_expected_prob=0.0)
    with torch.no_grad():
        m.att_w.weight.mul_(3.0)                          # alpha far from uniform: [0.09, 0.24, 0.21, 0.15, 0.07, 0.24]
    N, Lr = 200_000, 6
    feats = torch.randn(1, Lr, C, generator=torch.Generator().manual_seed(1)).expand(N, Lr, C)
    tokens = torch.tensor([[1, 5]]).expand(N, 2)          # T = 1
    torch.manual_seed(0)
    out = m(feats, tokens)                                # with grad, as training runs (the no-grad path is decoding's)
    alpha = out["alphas"][0, 0].detach()                           # (L,), the same for every caption
    assert torch.equal(out["alphas"][:, 0], alpha.expand(N, Lr)) and bool(out["sampled"].all())
    gaps = alpha.sort().values.log().diff()
    assert alpha.max() - alpha.min() > 0.15 and gaps.min() > 0.01   # far from uniform; log alpha_i distinct
    s = (out["logp_s"].detach()[:, 0, None] - alpha.log()).abs().argmin(1)   # (N,) the location each caption read
    assert _max_gap(s, alpha) < GUMBEL_TOL
