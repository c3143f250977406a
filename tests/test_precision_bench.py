"""The precision measurements' arithmetic (benchmarks/precision_common.py, bf16_check.py, bf16_modules.py):
feature errors, alternating timing, the safety verdict, fp32-kept modules and BatchNorm folding."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bf16_check  # noqa: E402
import bf16_modules  # noqa: E402
import precision_common as pc  # noqa: E402


def test_feature_errors_are_per_image_cosine_and_relative_l2():
    ref = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    other = torch.tensor([[3.0, 4.0], [1.0, 1.0]])        # image 0 equal; image 1 off by 45 degrees, |d| = 1
    e = pc.feature_errors(ref, other)
    assert e["cos_min"] == pytest.approx(2 ** -0.5) and e["cos_mean"] == pytest.approx((1 + 2 ** -0.5) / 2)
    assert e["rel_err_mean"] == pytest.approx(0.5) and e["rel_err_max"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        pc.feature_errors(ref, other[:, :1])


def test_timed_alternating_calls_every_variant_equally_and_in_rotating_order():
    calls = []
    t = pc.timed_alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 0.0, min_reps=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]     # warm-up a b, then rounds a b | b a | a b
    assert set(t) == {"a", "b"} and all(v >= 0 for v in t.values())


def test_verdict_needs_both_bleu4_and_cider_within_bounds():
    fp32 = {"Bleu_4": 0.2000, "CIDEr": 0.5000}
    diff, safe = bf16_check.verdict({"fp32": fp32, "bf16": {"Bleu_4": 0.2019, "CIDEr": 0.4952}})
    assert safe and diff["Bleu_4"] == pytest.approx(0.19) and diff["CIDEr"] == pytest.approx(-0.48)
    assert not bf16_check.verdict({"fp32": fp32, "bf16": {"Bleu_4": 0.2021, "CIDEr": 0.5}})[1]
    assert not bf16_check.verdict({"fp32": fp32, "bf16": {"Bleu_4": 0.2, "CIDEr": 0.4949}})[1]


def test_keep_fp32_runs_a_module_in_float32_under_bf16_autocast_and_release_undoes_it():
    conv = torch.nn.Conv2d(3, 4, 1)
    x = torch.randn(1, 3, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
        bf16_modules.keep_fp32(conv)
        y = conv(x.bfloat16())
        assert y.dtype == torch.float32
        bf16_modules.release(conv)
        assert conv(x).dtype == torch.bfloat16
    assert torch.allclose(y, conv(x.bfloat16().float()), atol=1e-6)
    assert "forward" not in conv.__dict__ and set(conv.state_dict()) == {"weight", "bias"}


def test_bn_folding_keeps_the_fp32_output():
    pytest.importorskip("efficientnet_lite_pytorch")
    from pipeline.extraction.backbones import load_backbone
    torch.manual_seed(0)
    module, _, _ = load_backbone("efficientnet_lite2", "random")
    for m in module.modules():                 # BN statistics far from the identity, so folding does something
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
    folded = bf16_modules.fold_bn(module)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ref, got = module(x), folded(x)
    assert ref.abs().max() > 0
    assert pc.feature_errors(ref, got)["rel_err_max"] < 1e-4
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())      # the original is untouched


def test_bench_extract_times_the_convolution_paths_asked_and_refuses_others():
    import bench_extract
    from pipeline.errors import UserError
    args, _, _ = bench_extract.parse_args(["--conv", "onednn,gemm"])
    assert args.conv.split(",") == ["onednn", "gemm"] and bench_extract.parse_args([])[0].conv == "onednn"
    with pytest.raises(UserError, match="--conv cudnn: choose from onednn,gemm"):
        bench_extract.parse_args(["--conv", "cudnn"])
