"""The optimised training step (decoder/fused.py kernels, decoder/deferred.py weight gradients) against the
eager step: the same loss and gradients to float32 rounding. The eager step is itself checked against the
paper's equations by hand (tests/test_model.py), so this closes the chain."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.config import DecoderConfig
from pipeline.decoder import fused
from pipeline.decoder.deferred import StepLinear
from pipeline.decoder.model import Decoder

needs_kernels = pytest.mark.skipif(not fused.available(), reason=f"fused kernels not built here "
                                   f"({fused._kernels.get('error', 'switched off')}): needs g++ (the machine's "
                                   f"toolchain); the eager step runs instead")


@pytest.fixture
def eager_off():
    old = fused.set_eager(False)
    yield
    fused.set_eager(old)


def _grads(model, fn, eager: bool, seed: int = 1):
    """loss, {name: grad} of fn(model) with the eager or the optimised step (same RNG stream)."""
    old = fused.set_eager(eager)
    try:
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        loss = fn(model)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        fused.set_eager(old)


def _check_same(model, fn):
    l0, g0 = _grads(model, fn, eager=True)
    l1, g1 = _grads(model, fn, eager=False)
    assert g0.keys() == g1.keys() and len(g0) >= 10
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=2e-6, msg=lambda m: f"{k}: {m}")


@needs_kernels
def test_kernels_equal_the_formula_at_odd_sizes(eager_off):
    torch.manual_seed(0)
    B, L, A = 3, 5, 37                                   # A not a multiple of the vector width: the tail path
    att_a, q, w, de = torch.randn(B, L, A) * 2, torch.randn(B, A), torch.randn(A), torch.randn(B, L)
    e, t = fused.forward(att_a, q, w)
    t_ref = torch.tanh(att_a + q[:, None])
    torch.testing.assert_close(t, t_ref, rtol=0, atol=5e-7)
    torch.testing.assert_close(e, t_ref @ w, rtol=1e-5, atol=1e-5)
    d_ref = de[:, :, None] * (1 - t_ref ** 2) * w
    grad, dq, dw = fused.backward(t, w, de, None)                        # writes a new buffer
    torch.testing.assert_close(grad, d_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dq, d_ref.sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, (de[:, :, None] * t_ref).sum((0, 1)), rtol=1e-5, atol=1e-5)
    prior = torch.randn(B, L, A)
    acc, _, _ = fused.backward(t, w, de, prior.clone())                 # accumulates in place
    torch.testing.assert_close(acc, prior + d_ref, rtol=1e-5, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("keep", [True, False])
def test_grouped_kernels_equal_the_formula(eager_off, keep):
    """G rows of q share one image's att_a (SCST's samples): e, and the gradient summed per image, with t
    kept by forward or recomputed by backward (keep=False), written or added into a buffer."""
    torch.manual_seed(0)
    B, G, L, A = 3, 4, 5, 37
    att_a, q, w, de = torch.randn(B, L, A) * 2, torch.randn(B * G, A), torch.randn(A), torch.randn(B * G, L)
    t_ref = torch.tanh(att_a.repeat_interleave(G, 0) + q[:, None])       # (B*G, L, A)
    e, t = fused.forward(att_a, q, w, G, keep)
    assert (t is None) != keep
    torch.testing.assert_close(e, t_ref @ w, rtol=1e-5, atol=1e-5)
    d_ref = de[:, :, None] * (1 - t_ref ** 2) * w
    grad, dq, dw = fused.backward(t, w, de, None, att_a, q, G)
    torch.testing.assert_close(grad, d_ref.view(B, G, L, A).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq, d_ref.sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, (de[:, :, None] * t_ref).sum((0, 1)), rtol=1e-5, atol=1e-5)
    prior = torch.randn(B, L, A)
    acc, _, _ = fused.backward(t, w, de, prior.clone(), att_a, q, G)
    torch.testing.assert_close(acc, prior + d_ref.view(B, G, L, A).sum(1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not 3 images x 5 groups"):
        fused.forward(att_a, q, w, 5)


@needs_kernels
@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_training_step_equals_the_eager_step(attention):
    """Teacher forcing with every dropout on and the doubly stochastic penalty: loss and all gradients."""
    _check_same(*_teacher_forcing(attention))


def _teacher_forcing(attention: str = "soft"):
    """A small decoder with every dropout on, in training mode, and its teacher-forced loss (NLL + the
    doubly stochastic penalty, + a REINFORCE-like term for hard attention): (model, loss(model))."""
    cfg = DecoderConfig(embed_dim=24, hidden_dim=32, attention_dim=40, attention=attention, dropout=0.2,
                        embed_dropout=0.1, context_dropout=0.1, hidden_dropout=0.1)
    torch.manual_seed(0)
    model = Decoder(cfg, 60, 20).train()
    feats, toks = torch.randn(6, 9, 20), torch.randint(4, 60, (6, 8))

    def loss(m):
        out = m(feats, toks)
        nll = torch.nn.functional.cross_entropy(out["logits"].reshape(-1, 60), toks[:, 1:].reshape(-1))
        extra = out["logp_s"].sum() * 0.1 if attention == "hard" else 0.0
        return nll + ((1 - out["alphas"].sum(1)) ** 2).sum() + extra
    loss.inputs = (feats, toks)
    return model, loss


@needs_kernels
def test_sampling_step_equals_the_eager_step():
    """Decoder.sample (SCST): the samples of an image share its ctx row (grouped kernels, t recomputed in
    backward, the shared gradient buffer) against the eager broadcast over the same rows."""
    cfg = DecoderConfig(embed_dim=16, hidden_dim=24, attention_dim=32)
    torch.manual_seed(0)
    model = Decoder(cfg, 40, 12).train()
    feats = torch.randn(3, 7, 12)

    def loss(m):
        out = m.sample(feats, 2, 6)
        return -(out["logp"] * out["mask"]).sum()
    _check_same(model, loss)


def test_step_linear_defers_the_weight_gradient_and_keeps_its_value():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 7)
    xs = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]

    def run(deferred: bool):
        lin.zero_grad(set_to_none=True)
        f = StepLinear(lin) if deferred else lin
        h = torch.zeros(4, 7)
        for x in xs:                                     # a recurrence: each step reads the previous output
            h = torch.tanh(f(x) + h)
        h.pow(2).sum().backward()
        return lin.weight.grad.clone(), lin.bias.grad.clone(), [x.grad.clone() for x in xs]
    w1, b1, x1 = run(True)
    for x in xs:
        x.grad = None
    w0, b0, x0 = run(False)
    torch.testing.assert_close(w1, w0)
    torch.testing.assert_close(b1, b0)
    for a, b in zip(x1, x0):
        torch.testing.assert_close(a, b)
    assert StepLinear(lin).active
    with torch.no_grad():
        assert not StepLinear(lin).active                # decoding: the module itself


def test_eager_switch_and_environment(monkeypatch):
    old = fused.set_eager(True)
    try:
        assert fused.eager() and not fused.available()
        assert not StepLinear(torch.nn.Linear(2, 2)).active
    finally:
        fused.set_eager(old)
    assert fused.eager() == old


# -- --bf16-projections: W_a a and L_o as bf16 matmuls in CPU training -----------------------------------
def _bf16_grads(model, fn, on: bool, seed: int = 1):
    model.bf16_projections = on
    try:
        return _grads(model, fn, eager=False, seed=seed)
    finally:
        model.bf16_projections = False


def test_bf16_projections_stay_close_to_fp32_and_touch_only_the_two_layers():
    """With bf16_projections the step's loss and gradients stay within bf16 rounding of the fp32 step's
    (cosine of every gradient >= 0.999); the two layers' outputs are bf16-rounded, nothing else changes;
    in eval mode (validation, decoding) the model computes exactly as without it."""
    model, loss = _teacher_forcing()
    feats, toks = loss.inputs
    l0, g0 = _bf16_grads(model, loss, on=False)
    l1, g1 = _bf16_grads(model, loss, on=True)
    assert g0.keys() == g1.keys() and len(g0) >= 10
    assert l1 != l0 and abs(float(l1 - l0)) <= 1e-2 * abs(float(l0))      # it did run in bf16, and closely
    for k in g0:
        cos = torch.nn.functional.cosine_similarity(g1[k].flatten().double(), g0[k].flatten().double(), 0)
        assert cos >= 0.999, (k, float(cos))
    # the projections' outputs are bf16 values (rounded), returned as fp32
    seen = {}
    hooks = [getattr(model, n).register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o))
             for n in ("att_a", "out")]
    model.bf16_projections = True
    try:
        with torch.no_grad():
            model(feats, toks)
            assert all(o.dtype == torch.bfloat16 for o in seen.values()) and len(seen) == 2
            model.eval()
            a = model(feats, toks)["logits"]
            assert all(o.dtype == torch.float32 for o in seen.values())
            model.bf16_projections = False
            assert torch.equal(a, model(feats, toks)["logits"])
    finally:
        for h in hooks:
            h.remove()
        model.bf16_projections = False


def test_bf16_projections_auto_on_off_and_old_runs(monkeypatch):
    """auto: on for soft-attention cross-entropy on a CPU with bf16 units, off for hard attention, SCST, CPUs
    without bf16 units and CUDA; on: refused without bf16 units; old runs: off (LEGACY), the 2026-12-07 flag's
    true/false read as on/off."""
    from pipeline import device as device_mod
    from pipeline.config import TrainConfig
    from pipeline.errors import UserError
    from pipeline.training import train as train_mod
    from pipeline.training.state import RESUMABLE

    def resolved(units: bool, device="cpu", attention="soft", **kw):
        monkeypatch.setattr(device_mod, "cpu_has_fast_bf16", lambda: units)
        return train_mod.bf16_projections(TrainConfig(features=("x.h5",), **kw), DecoderConfig(attention=attention),
                                          torch.device(device))
    assert TrainConfig(features=("x.h5",)).bf16_projections == "auto"                 # the default
    assert resolved(True) is True and resolved(False) is False
    assert resolved(True, attention="hard") is False
    assert resolved(True, objective="scst", init_from="r") is False
    assert resolved(True, device="cuda") is False and resolved(True, device="cuda", bf16_projections="on") is False
    assert resolved(True, bf16_projections="on", attention="hard") is True           # asked for: applied
    assert resolved(True, bf16_projections="off") is False
    with pytest.raises(UserError, match=r"--bf16-projections on: this CPU has no bf16 units .* auto or off"):
        resolved(False, bf16_projections="on")
    old = dataclasses.asdict(TrainConfig(features=("x.h5",)))
    assert TrainConfig.from_dict({**old, "bf16_projections": True}).bf16_projections == "on"
    assert TrainConfig.from_dict({**old, "bf16_projections": False}).bf16_projections == "off"
    old.pop("bf16_projections")
    assert TrainConfig.from_dict(old).bf16_projections == "off"                       # a run saved before: fp32
    assert "bf16_projections" in RESUMABLE                                           # a resume may change it


@pytest.mark.parametrize("units", [True, False])
def test_train_applies_bf16_projections_by_default_and_records_them(tmp_path, monkeypatch, units):
    """`pipeline train` with no option on a CPU with bf16 units computes the two projections of its training
    steps in bf16 (the layers' own outputs are bf16) and validates in fp32; without bf16 units all is fp32.
    The run's config records what was asked (auto), its echo what it resolved to."""
    import json
    from helpers_store import make_store
    from pipeline import device as device_mod
    from pipeline.config import TrainConfig
    from pipeline.training.train import train
    monkeypatch.setattr(device_mod, "cpu_has_fast_bf16", lambda: units)
    cache = make_store(tmp_path / "f.h5", {"train": 8, "val": 2, "test": 2}, L=4, C=8)
    seen = set()          # (training?, the layer's output dtype)
    real = Decoder._project

    def spy(self, layer, x):
        h = layer.register_forward_hook(lambda mod, i, o: seen.add((self.training, o.dtype)))
        try:
            return real(self, layer, x)
        finally:
            h.remove()
    monkeypatch.setattr(Decoder, "_project", spy)
    dcfg = DecoderConfig(embed_dim=8, hidden_dim=8, attention_dim=8)
    lines = []
    train(TrainConfig(features=(str(cache),), epochs=1, batch_size=4, min_count=1), dcfg, tmp_path / "run",
          echo=lines.append)
    assert seen == {(True, torch.bfloat16 if units else torch.float32), (False, torch.float32)}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["bf16_projections"] == "auto"
    assert ("bf16 projections (auto): on, this CPU has bf16 units" if units else "bf16 projections (auto): off") \
        in lines
