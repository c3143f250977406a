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
