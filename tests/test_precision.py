"""extract --precision auto|fp32|bf16: what `auto` picks, what the cache records, and that one cache never
mixes two precisions (tiny backbone, synthetic images)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.cache import layout, readers
from pipeline.errors import UserError
from pipeline.extraction import backbones
from pipeline.extraction.backbones import resolve_precision
from test_extract import make_records, run, tiny_spec


@pytest.fixture
def tiny_bf16(monkeypatch):
    """A tiny backbone marked safe in bf16 (`bf16` notes the measurement) and one that is not."""
    monkeypatch.setitem(backbones.BACKBONES, "tiny", dataclasses.replace(tiny_spec(), bf16="measured"))
    monkeypatch.setitem(backbones.BACKBONES, "tiny2", tiny_spec("tiny2"))
    return "tiny"


@pytest.mark.parametrize("has_bf16_units", [True, False])
def test_auto_picks_bf16_only_where_safe_and_fast(monkeypatch, has_bf16_units):
    monkeypatch.setattr(backbones, "cpu_has_fast_bf16", lambda: has_bf16_units)
    safe, unsafe = dataclasses.replace(tiny_spec(), bf16="measured"), tiny_spec()
    assert resolve_precision(safe, "auto", "cpu") == ("bf16" if has_bf16_units else "fp32")
    assert resolve_precision(unsafe, "auto", "cpu") == "fp32"
    assert resolve_precision(unsafe, "bf16", "cpu") == "bf16"          # asked for: runs, with a note
    assert resolve_precision(safe, "fp32", "cpu") == "fp32"
    assert resolve_precision(dataclasses.replace(unsafe, amp="float16"), "auto", "cuda") == "fp16"
    assert resolve_precision(safe, "auto", "cuda") == "bf16"
    with pytest.raises(UserError, match="--precision fp8"):
        resolve_precision(safe, "fp8", "cpu")


def test_the_registry_marks_vgg19_safe_and_efficientnet_not():
    assert backbones.BACKBONES["vgg19"].bf16                            # the measurement, in words
    assert not backbones.BACKBONES["efficientnet_lite2"].bf16


def test_precision_is_recorded_and_never_mixed(tmp_path, tiny_bf16, monkeypatch, capsys):
    monkeypatch.setattr(backbones, "cpu_has_fast_bf16", lambda: True)
    recs = make_records(tmp_path)
    out = tmp_path / "f.h5"
    run(recs, out, max_batches=1)                                       # auto -> bf16, stopped part-way
    assert layout.read_attrs(out)["precision"] == "bf16"
    with pytest.raises(UserError, match=r"was extracted in bf16; resume it with --precision bf16"):
        run(recs, out, precision="fp32")
    res = run(recs, out)                                                # auto continues in bf16
    assert res.computed > 0 and layout.read_attrs(out)["precision"] == "bf16"
    fp32 = tmp_path / "g.h5"
    run(recs, fp32, precision="fp32")
    a = readers.FeatureStore.open(out).load_features().astype(np.float32)
    b = readers.FeatureStore.open(fp32).load_features().astype(np.float32)
    assert not np.array_equal(a, b)                                     # bf16 really ran
    cos = (a * b).sum((1, 2)) / np.linalg.norm(a.reshape(len(a), -1), axis=1) / np.linalg.norm(b.reshape(len(b), -1), axis=1)
    assert cos.min() > 0.999                                            # ... and stayed close to fp32
    run(recs, tmp_path / "h.h5", backbone="tiny2", precision="bf16")    # not marked safe: runs, with a note
    assert "tiny2 is not marked safe in bf16" in capsys.readouterr().out


def test_a_cache_from_before_precisions_resumes_as_fp32(tmp_path, tiny_bf16, monkeypatch):
    monkeypatch.setattr(backbones, "cpu_has_fast_bf16", lambda: True)
    recs = make_records(tmp_path)
    out = tmp_path / "f.h5"
    run(recs, out, precision="fp32", max_batches=1)
    import h5py
    with h5py.File(out, "r+") as f:                                    # as an older version wrote it
        del f.attrs["precision"]
    with pytest.raises(UserError, match="was extracted in fp32"):
        run(recs, out, precision="bf16")
    assert run(recs, out).computed > 0                                  # auto: fp32, as it was made
    assert layout.read_attrs(out).get("precision") is None              # the attribute is not invented


def _on(path: str):
    """cpu_conv_path of a machine whose fp32 CPU convolutions take `path`."""
    return lambda precision, device: path if (precision, device) == ("fp32", "cpu") else ""


@pytest.mark.parametrize("capability, path", [("AVX512", "onednn"), ("AVX512_BF16", "onednn"), ("AVX2", "gemm"),
                                              ("DEFAULT", "gemm")])
def test_fp32_convolutions_take_gemm_on_a_cpu_without_avx512(monkeypatch, capability, path):
    import torch
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert backbones.cpu_conv_path("fp32", "cpu") == path
    assert backbones.cpu_conv_path("bf16", "cpu") == backbones.cpu_conv_path("fp32", "cuda") == ""   # autocast: oneDNN


@pytest.mark.parametrize("path", ["gemm", "onednn"])
def test_fp32_on_cpu_extracts_on_the_machines_convolution_path(tmp_path, tiny_bf16, monkeypatch, path):
    import torch
    from pipeline.extraction import extract
    seen = []
    monkeypatch.setattr(backbones, "cpu_conv_path", _on(path))
    run_backbone = extract._run_backbone
    monkeypatch.setattr(extract, "_run_backbone",
                        lambda *a, **k: (seen.append(torch.backends.mkldnn.enabled), run_backbone(*a, **k))[1])
    recs = make_records(tmp_path)
    res = run(recs, tmp_path / "f.h5", precision="fp32")
    assert res.conv == path and seen == [path == "onednn"]               # the extraction ran on that path
    assert torch.backends.mkldnn.enabled                                 # ... and the global flag is restored
    res = run(recs, tmp_path / "b.h5", precision="bf16")                 # bf16 autocast keeps oneDNN
    assert res.conv == "" and seen[-1] is True
    other = "onednn" if path == "gemm" else "gemm"                       # the other path: the same features
    monkeypatch.setattr(backbones, "cpu_conv_path", _on(other))
    assert run(recs, tmp_path / "ref.h5", precision="fp32").conv == other and seen[-1] == (other == "onednn")
    a, b = (readers.FeatureStore.open(p).load_features() for p in (tmp_path / "f.h5", tmp_path / "ref.h5"))
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)                 # fp16 rows: one ulp at most


def test_a_resumed_extraction_keeps_the_convolution_path_its_cache_records(tmp_path, tiny_bf16, monkeypatch):
    import h5py
    from pipeline.extraction import extract
    monkeypatch.setattr(backbones, "cpu_conv_path", _on("gemm"))
    recs = make_records(tmp_path)
    out = tmp_path / "f.h5"
    assert run(recs, out, precision="fp32", max_batches=1).conv == "gemm"
    monkeypatch.setattr(backbones, "cpu_conv_path", _on("onednn"))   # another machine
    assert run(recs, out, precision="fp32").conv == "gemm"              # the cache's path: rows never mixed
    old = tmp_path / "old.h5"                                  # a cache begun before the path was recorded
    run(recs, old, precision="fp32", max_batches=1)
    with h5py.File(old, "r+") as f:
        del f.attrs["cpu_conv"]
    monkeypatch.setattr(backbones, "cpu_conv_path", _on("gemm"))
    assert run(recs, old, precision="fp32").conv == "onednn"            # its rows' path: the code of before
    assert extract.cpu_conv(out, "bf16", "cpu") == extract.cpu_conv(out, "fp32", "cuda") == ""
