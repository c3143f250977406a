"""Captioning new images: the encoder reproduces extraction exactly (every image mode), and its errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.cache import readers
from pipeline.extraction import backbones
from pipeline.inference.caption import Encoder, open_images
from pipeline.errors import UserError
from pipeline.data.records import Record
from test_extract import run, tiny_spec


@pytest.fixture
def tiny(monkeypatch):
    """Two tiny backbones (other weights) registered for the test, as in test_extract."""
    from pipeline.extraction import backbones
    for name, seed in (("tiny", 0), ("tiny2", 1)):
        monkeypatch.setitem(backbones.BACKBONES, name, tiny_spec(name, seed=seed))


def _odd_images(tmp_path):
    """Images whose conversion to RGB is not trivial: transparency, palette transparency, 16-bit,
    grayscale, CMYK (extraction's backbones.to_rgb composites alpha on white and rescales 16-bit)."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)
    d = tmp_path / "odd"
    d.mkdir()
    paths = []
    rgba = np.dstack([rgb, rng.integers(0, 255, (24, 30), dtype=np.uint8)])
    Image.fromarray(rgba, "RGBA").save(p := d / "rgba.png")
    paths.append(p)
    pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 3
    pal.save(p := d / "palette.png", transparency=3)
    paths.append(p)
    Image.fromarray(rng.integers(0, 65535, (24, 30), dtype=np.uint16)).save(p := d / "gray16.png")
    paths.append(p)
    Image.fromarray(rgb).convert("L").save(p := d / "gray.png")
    paths.append(p)
    Image.fromarray(rgb).convert("CMYK").save(p := d / "cmyk.jpg")
    paths.append(p)
    return paths


@pytest.mark.parametrize("conv", ["onednn", "gemm"])
def test_caption_features_equal_extracted_features_for_every_mode(tmp_path, tiny, monkeypatch, conv):
    """On either convolution path (backbones.cpu_conv_path: GEMM's on a CPU without AVX-512), captioning computes
    the features extraction stored, bit for bit."""
    paths = _odd_images(tmp_path)
    modes = [Image.open(p).mode for p in paths]
    assert {"RGBA", "P", "L", "CMYK"} <= set(modes) and any(m.startswith("I") for m in modes), modes
    recs = [Record(p.stem, p, "train", ["a picture"]) for p in paths]
    out = tmp_path / "f.h5"
    monkeypatch.setattr(backbones, "cpu_conv_path", lambda precision, device: conv if precision == "fp32" else "")
    run(recs, out)
    st = readers.FeatureStore.open(out)
    enc = Encoder([st.provenance], weights_dir=tmp_path, device="cpu")
    feats = enc(open_images(paths))
    assert feats.dtype == np.float32 and feats.shape == (len(paths), 196, 8)
    np.testing.assert_array_equal(feats, st.load_features().astype(np.float32))
    # what captioning did before: PIL's convert("RGB") drops alpha instead of compositing on white
    naive = enc([Image.open(p).convert("RGB") for p in paths])
    assert not np.array_equal(naive[0], feats[0]) and not np.array_equal(naive[2], feats[2])


def test_encoder_refuses_other_weights_or_preprocessing(tmp_path, tiny):
    paths = _odd_images(tmp_path)[:1]
    out = tmp_path / "f.h5"
    run([Record("a", paths[0], "train", ["x"])], out)
    prov = readers.FeatureStore.open(out).provenance
    with pytest.raises(UserError, match="sha256.*--weights"):
        Encoder([dict(prov, weights_sha256="something-else")], weights_dir=tmp_path)
    with pytest.raises(UserError, match="preprocessing"):
        Encoder([dict(prov, preprocessing={"resize": [1, 1]})], weights_dir=tmp_path)
    with pytest.raises(UserError, match="BACKBONE=PATH"):
        Encoder([prov, dict(prov, backbone="tiny2")], weights=("w.pt",), weights_dir=tmp_path)
    with pytest.raises(UserError, match="randomly initialised"):
        Encoder([dict(prov, weights_sha256="random")], weights_dir=tmp_path)


def test_fused_encoder_concatenates_backbones(tmp_path, tiny):
    paths = _odd_images(tmp_path)[:2]
    recs = [Record(p.stem, p, "train", ["x"]) for p in paths]
    run(recs, tmp_path / "a.h5")
    run(recs, tmp_path / "b.h5", backbone="tiny2")
    fused = readers.open_features([tmp_path / "a.h5", tmp_path / "b.h5"])
    feats = Encoder(fused.provenances, weights_dir=tmp_path, device="cpu")(open_images(paths))
    np.testing.assert_array_equal(feats, fused.load_features().astype(np.float32))
    assert feats.shape == (2, 196, 16)


def test_open_images_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no such image"):
        open_images([tmp_path / "nope.jpg"])
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="not a readable image"):
        open_images([tmp_path / "bad.jpg"])
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)    # 64*64 > 2 * 10: Pillow raises DecompressionBombError
    with pytest.raises(UserError, match="decompression-bomb"):
        open_images([tmp_path / "big.png"])


def test_caption_with_an_ensemble_and_a_fused_run(tmp_path, tiny):
    """caption_images runs every backbone a run needs (fused: both) and averages an ensemble's members;
    an ensemble of a run with itself captions as the run alone."""
    from pipeline.inference.caption import caption_images
    from pipeline.config import CaptionConfig, DecoderConfig, TrainConfig
    from pipeline.training.train import train
    from test_extract import make_records
    recs = make_records(tmp_path, n=12)
    run(recs, tmp_path / "a.h5")
    run(recs, tmp_path / "b.h5", backbone="tiny2")
    dcfg = DecoderConfig(embed_dim=8, hidden_dim=8, attention_dim=8, dropout=0.0, embed_dropout=0.0, context_dropout=0.0, hidden_dropout=0.0)
    for name, feats in (("single", [tmp_path / "a.h5"]), ("fused", [tmp_path / "a.h5", tmp_path / "b.h5"])):
        train(TrainConfig(features=tuple(map(str, feats)), epochs=1, batch_size=4, min_count=1, lr=1e-2),
              dcfg, tmp_path / name, echo=lambda s: None)
    paths = [r.path for r in recs[:3]]
    cfg = CaptionConfig(beam=2, device="cpu", weights_dir=str(tmp_path))
    alone = caption_images(paths, tmp_path / "single", cfg, log=lambda s: None)
    twice = caption_images(paths, [tmp_path / "single", tmp_path / "single"], cfg, log=lambda s: None)
    assert [c.caption for c in alone] == [c.caption for c in twice]
    fused = caption_images(paths, tmp_path / "fused", cfg, log=lambda s: None)
    mixed = caption_images(paths, [tmp_path / "single", tmp_path / "fused"], cfg, log=lambda s: None)
    assert len(fused) == len(mixed) == 3 and all(c.grid == (14, 14) for c in fused + mixed)


def test_attention_path_printed_is_the_file_written(tmp_path):
    """`caption --attention att` printed `att` while matplotlib wrote att.png (issue 20)."""
    from pipeline.inference.caption import attention_paths
    from pipeline.reporting.viz import attention_figure
    cases = [("att", ["x/a.jpg"], ["att.png"]), ("att.v2", ["a.jpg"], ["att.v2.png"]), ("att.png", ["a.jpg"], ["att.png"]),
             ("att", ["a.jpg", "b.jpg"], ["att_a.png", "att_b.png"]), ("att.svg", ["a.jpg"], ["att.svg"])]
    for given, images, want in cases:
        assert [p.name for p in attention_paths(tmp_path / given, images)] == want, given
    (path,) = attention_paths(tmp_path / "pic", ["a.jpg"])
    assert attention_figure(Image.new("RGB", (32, 32)), ["a"], np.eye(196)[[0]], path) == path
    assert [f.name for f in tmp_path.iterdir()] == ["pic.png"]
