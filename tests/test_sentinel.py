"""Adaptive attention (`--sentinel`, Lu et al. 2017 section 2.3; pipeline/decoder/model.py's docstring).

* the decoder's forward and step against the equations written out by hand (float64, loop by loop: per
  caption, per step, per location), to 1e-10, with and without Xu's gate;
* settings: off by default, old configs / runs / shipped models load with it off, hard attention refused,
  the command line has --sentinel;
* a tiny training run on synthetic features lowers the loss, and its run loads and decodes;
* beam search carries the sentinel with the beams (a replay of each hypothesis gives its maps and score);
* the image's share per word (1 - beta_t) under caption --attention's maps and in the browser's page data.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_store import make_store
from test_model import class_caption_nlls
from pipeline.config import DecoderConfig, TrainConfig
from pipeline.decoder.decode import beam_search, greedy_decode
from pipeline.decoder.model import Decoder, count_flops
from pipeline.errors import UserError
from pipeline.training.objectives import xe_loss

V, C, L = 17, 5, 7
SMALL = dict(embed_dim=6, hidden_dim=4, attention_dim=3, dropout=0.0, embed_dropout=0.0, context_dropout=0.0,
             hidden_dropout=0.0)


def _model(**kw) -> Decoder:
    torch.manual_seed(0)
    m = Decoder(DecoderConfig(**{**SMALL, "sentinel": True, **kw}), V, C)
    with torch.no_grad():   # non-trivial biases everywhere, so a wrong slice cannot hide
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.double().eval()


def _sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def _by_hand(m: Decoder, a: torch.Tensor, tokens: list[int]) -> list[dict]:
    """One caption through the module docstring's equations, step by step and location by location.
    a (L, C) float64, tokens <start> w1 .. wn: the records of the n steps (logp, alpha, beta, h, c, s)."""
    W = {k: v.detach().double() for k, v in m.state_dict().items()}
    A, H = m.cfg.attention_dim, m.cfg.hidden_dim
    n_loc = a.size(0)
    mean = sum(a[i] for i in range(n_loc)) / n_loc
    hc = torch.tanh(W["init_hc.weight"] @ mean + W["init_hc.bias"])
    h, c = hc[:H], hc[H:]
    s = torch.tanh(c)                                                   # s_0: no gate before the first input
    Wp, bp = W["h_proj.weight"], W["h_proj.bias"]
    Ws, bs = W["sentinel_proj.weight"], W["sentinel_proj.bias"]
    w = W["att_w.weight"][0]
    steps = []
    for y in tokens[:-1]:
        Ey = W["embed.weight"][y]
        q = Wp[:A] @ h + bp[:A]                                         # W_h h_{t-1}
        e = [float(w @ torch.tanh(W["att_a.weight"] @ a[i] + W["att_a.bias"] + q)) for i in range(n_loc)]
        e_s = float(w @ torch.tanh(Ws[:A] @ s + bs[:A] + q))            # Lu eq. 12, the sentinel's slot
        top = max(e + [e_s])
        ex, es = [math.exp(x - top) for x in e], math.exp(e_s - top)
        alpha, beta = [x / (sum(ex) + es) for x in ex], es / (sum(ex) + es)
        c_t = sum(ex[i] / sum(ex) * a[i] for i in range(n_loc))          # Lu's c_t over the regions alone
        z = (1 - beta) * c_t + beta * (Ws[A:] @ s + bs[A:])              # Lu eq. 11, sentinel in C
        if m.cfg.gate:
            z = float(_sig(Wp[A] @ h + bp[A])) * z                       # Xu's gate (4.2.1)
        gates = W["x_proj.weight"] @ Ey + W["z_proj.weight"] @ z + Wp[A + 1:] @ h + bp[A + 1:]
        i, f, o, g, gs = (gates[k * H:(k + 1) * H] for k in range(5))
        c = _sig(f) * c + _sig(i) * torch.tanh(g)
        h = _sig(o) * torch.tanh(c)
        s = _sig(gs) * torch.tanh(c)                                     # Lu eq. 9-10
        deep = Ey + W["out_hz.weight"] @ torch.cat([h, z]) + W["out_hz.bias"]
        logits = W["out.weight"] @ deep + W["out.bias"]
        logp = logits - torch.logsumexp(logits, 0)
        steps.append(dict(logp=logp, alpha=torch.tensor(alpha, dtype=torch.float64), beta=beta, h=h, c=c, s=s))
    return steps


@pytest.mark.parametrize("gate", [True, False])
def test_forward_and_step_equal_the_equations_by_hand(gate):
    m = _model(gate=gate)
    torch.manual_seed(1)
    B, T = 3, 4
    feats = torch.randn(B, L, C, dtype=torch.float64)
    tokens = torch.randint(4, V, (B, T + 1))
    tokens[:, 0] = 1
    out = m(feats, tokens)
    logp_fwd = torch.log_softmax(out["logits"], -1)
    state, ctx = m.init_state(feats)
    assert len(state) == 3
    for t in range(T):
        logp, alpha, state = m.step(tokens[:, t], state, ctx)
        for b in range(B):
            want = _by_hand(m, feats[b], tokens[b].tolist())[t]
            for got in (logp[b], logp_fwd[b, t]):
                torch.testing.assert_close(got, want["logp"], rtol=0, atol=1e-10)
            for got in (alpha[b], out["alphas"][b, t]):
                torch.testing.assert_close(got, want["alpha"], rtol=0, atol=1e-10)
            assert abs(out["sentinel"][b, t].item() - want["beta"]) < 1e-10
            assert abs(1 - alpha[b].sum().item() - want["beta"]) < 1e-10     # the maps carry beta_t
            for k, name in enumerate("hcs"):
                torch.testing.assert_close(state[k][b], want[name], rtol=0, atol=1e-10)
    assert 0 < out["sentinel"].min() and out["sentinel"].max() < 1


@pytest.mark.parametrize("grad", [False, True])
def test_beam_layout_and_plain_decoder_unchanged(grad):
    """Beam search's layout (state B*K rows, ctx B rows) equals the expanded ctx with the sentinel (no-grad:
    the chunked CPU scores; grad: the broadcast GPU path); a decoder without it keeps its parameters, state
    and alpha summing to one."""
    m = _model()
    K = 3
    state, ctx = m.init_state(torch.randn(2, L, C, dtype=torch.float64))
    rep = torch.arange(2).repeat_interleave(K)
    state = tuple(s[rep] + 0.1 * torch.randn(2 * K, s.size(1), dtype=torch.float64) for s in state)
    prev = torch.randint(0, V, (2 * K,))
    with torch.set_grad_enabled(grad):
        got, want = m.step(prev, state, ctx), m.step(prev, state, tuple(t[rep] for t in ctx))
    for g, w in zip((got[0], got[1], *got[2]), (want[0], want[1], *want[2])):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    plain = Decoder(DecoderConfig(**SMALL), V, C)
    assert not any("sentinel" in k for k in plain.state_dict())
    assert plain.x_proj.weight.shape == (4 * SMALL["hidden_dim"], SMALL["embed_dim"])
    st, cx = plain.init_state(torch.randn(2, L, C))
    _, alpha, st = plain.step(torch.tensor([1, 1]), st, cx)
    assert len(st) == 2 and torch.allclose(alpha.sum(1), torch.ones(2))
    assert "sentinel" not in plain(torch.randn(2, L, C), torch.tensor([[1, 5, 2], [1, 6, 2]]))
    flops = [count_flops(DecoderConfig(**SMALL, sentinel=s), V, C, L, [5]) for s in (False, True)]
    assert flops[0] < flops[1] < 1.5 * flops[0]


def test_settings_old_configs_and_hard_attention():
    assert DecoderConfig().sentinel is False
    old = DecoderConfig().to_dict()
    old.pop("sentinel")                                                   # a config saved before the option
    assert DecoderConfig.from_dict(old).sentinel is False
    assert DecoderConfig.from_dict({**old, "sentinel": True}).sentinel is True
    with pytest.raises(UserError, match="--sentinel needs --attention soft"):
        DecoderConfig(attention="hard", sentinel=True)
    from click.testing import CliRunner
    from pipeline.cli import main
    assert "--sentinel / --no-sentinel" in CliRunner().invoke(main, ["train", "--help"]).output


@pytest.mark.parametrize("name, before", [("vgg19_soft", False), ("efficientnet_lite2_soft", True)])
def test_shipped_models_load_with_the_sentinel_off(name, before):
    """One model saved before the option existed (no key: the old format) and one re-exported since (False)."""
    folder = Path(__file__).resolve().parents[1] / "models" / name
    if not (folder / "model.json").exists():
        pytest.skip(f"no shipped model {name}")
    from pipeline.inference.shipped import load_model, read_manifest
    saved = read_manifest(folder)["decoder_config"]
    assert ("sentinel" not in saved) if before else saved["sentinel"] is False
    loaded = load_model(str(folder), log=lambda *_: None)
    assert loaded.model.cfg.sentinel is False and not hasattr(loaded.model, "sentinel_proj")


def _quiet(_):
    pass


def test_training_run_lowers_the_loss_and_its_run_loads_and_decodes(tmp_path):
    from pipeline.training.runs import load_run
    from pipeline.training.train import train
    feats = make_store(tmp_path / "f.h5", {"train": 12, "val": 4}, L=16, C=8)
    cfg = TrainConfig(features=str(feats), epochs=6, batch_size=8, min_count=1, lr=1e-2, log_every=1000, patience=10)
    dcfg = DecoderConfig(**{**SMALL, "embed_dim": 12, "hidden_dim": 12, "attention_dim": 12, "sentinel": True})
    train(cfg, dcfg, tmp_path / "run", echo=_quiet)
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    nll, loss = [r["nll"] for r in rows], [r["loss"] for r in rows]     # epoch means
    assert len(rows) == 6 and loss[-1] < 0.8 * loss[0] and nll[-1] < 0.7 * nll[0], (loss, nll)
    run = load_run(tmp_path / "run", log=_quiet)
    assert run.model.cfg.sentinel and hasattr(run.model, "sentinel_proj")
    (hyp,) = beam_search(run.model, torch.randn(1, 16, 8), beam=2, max_len=5)
    assert hyp.alphas.shape == (len(hyp.tokens), 16) and bool((hyp.alphas.sum(1) < 1).all())


def test_training_step_lowers_the_nll_on_structured_data():
    m, nlls = class_caption_nlls(DecoderConfig(**{**SMALL, "embed_dim": 16, "hidden_dim": 16, "attention_dim": 16,
                                                  "sentinel": True}), 9, C)
    assert nlls[-1] < 0.2 * nlls[0], nlls[::10]
    assert m.sentinel_proj.weight.grad.abs().sum() > 0                   # the sentinel is trained


def _replay(m: Decoder, feats: torch.Tensor, tokens: list[int]):
    """Teacher-force one hypothesis: its per-token log-probabilities and maps."""
    state, ctx = m.init_state(feats[None])
    prev, logps, maps = 1, [], []
    for tok in tokens:
        logp, alpha, state = m.step(torch.tensor([prev]), state, ctx)
        logps.append(logp[0, tok].item())
        maps.append(alpha[0])
        prev = tok
    return logps, torch.stack(maps)


def test_beam_search_reorders_the_sentinel_with_the_beams():
    """Every hypothesis of a beam search equals the replay of its tokens from the start: its maps (hence
    beta_t = 1 - sum alpha_t) and its score. A sentinel left in the wrong beam's row after a reorder would
    change the maps of the following words."""
    m = _model()
    torch.manual_seed(2)
    feats = torch.randn(3, L, C, dtype=torch.float64)
    hyps = beam_search(m, feats, beam=3, max_len=6, all_beams=True)
    reordered = 0
    for b, hs in enumerate(hyps):
        assert len(hs) == 3
        for h in hs:
            logps, maps = _replay(m, feats[b], h.tokens)
            torch.testing.assert_close(h.alphas.double(), maps, rtol=0, atol=1e-6)
            assert h.score == pytest.approx(sum(logps), abs=1e-5)              # no length norm
            assert bool((h.alphas.sum(1) < 1).all())
        reordered += len({tuple(h.tokens[:2]) for h in hs}) > 1
    assert reordered                                                    # the beams did diverge and reorder
    tokens, alphas = greedy_decode(m, feats, max_len=6)
    for b, hyp in enumerate(beam_search(m, feats, beam=1, max_len=6)):
        assert hyp.tokens == tokens[b]
        torch.testing.assert_close(hyp.alphas, alphas[b])


def test_attention_figure_writes_the_image_share_under_each_map(tmp_path, monkeypatch):
    from PIL import Image
    from pipeline.reporting import viz
    drawn = []
    monkeypatch.setattr(viz, "_save", lambda fig, out: drawn.append(fig) or Path(out))
    base = np.eye(196)[[0, 5, 100]]
    viz.attention_figure(Image.new("RGB", (32, 32)), ["a", "red", "circle"], base * [[0.3], [0.83], [1.0]],
                         tmp_path / "a.png")
    texts = [t.get_text() for ax in drawn[0].axes for t in ax.texts]
    assert texts == ["img 0.30", "img 0.83", "img 1.00"]
    viz.attention_figure(Image.new("RGB", (32, 32)), ["a", "red", "circle"], base, tmp_path / "b.png")
    assert not [t for ax in drawn[1].axes for t in ax.texts]              # soft attention: maps sum to one
    assert viz.image_shares(base) is None and viz.image_shares(np.zeros((0, 196))) is None


def test_browser_page_data_holds_the_image_share_per_word():
    from pipeline.reporting.browse_site import RunResult, SiteData, _page
    words = [["a", "red", "circle"], []]
    maps = [np.eye(196)[[0, 5, 100]] * [[0.3], [0.83], [1.0]], np.zeros((0, 196))]
    run = RunResult("r", words, maps, [None, None])
    data = SiteData("t", "val", ["x", "y"], [None, None], [["a"], ["b"]], [run])
    entry = _page(data, np.arange(2), start=0)["runs"][0]
    assert entry["img"] == [[0.3, 0.83, 1.0], []]
    run.maps = [np.eye(196)[[0, 5, 100]], np.zeros((0, 196))]              # a decoder without the sentinel
    assert "img" not in _page(data, np.arange(2), start=0)["runs"][0]


def test_sampling_for_scst_and_bf16_autocast_run_with_the_sentinel():
    m = _model().float().train()
    torch.manual_seed(3)
    feats = torch.randn(2, L, C)
    out = m.sample(feats, n=3, max_len=4)
    assert out["tokens"].shape[0] == 6 and torch.isfinite(out["logp"]).all()
    (out["logp"] * out["mask"]).sum().backward()
    assert m.sentinel_proj.weight.grad.abs().sum() > 0
    tokens = torch.tensor([[1, 5, 6, 2], [1, 7, 8, 2]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m.eval()(feats, tokens)
    want = m(feats, tokens)
    assert got["alphas"].dtype == torch.float32 and got["sentinel"].shape == (2, 3)
    torch.testing.assert_close(got["sentinel"], want["sentinel"], rtol=0, atol=0.05)
