"""Horizontally flipped views (issue 18 part 3): the cache's /features_hflip equals extraction of the
mirrored image, training draws one view per caption per epoch from the seed (left/right exchanged in the
flipped caption) and resumes bit-exactly, validation reads the original view."""
from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import make_shapes
from helpers_store import make_store
from pipeline.config import DecoderConfig, TrainConfig
from pipeline.data import datasets
from pipeline.data.flip import mirror_caption
from pipeline.errors import UserError
from pipeline.training.batching import BucketBatchSampler, DistributedBatchSampler, epoch_plan
from pipeline.training.views import ViewSampler

SMALL = dict(embed_dim=12, hidden_dim=12, attention_dim=12, dropout=0.3)
FP16 = 2.0 ** -11


def test_mirror_caption_exchanges_left_and_right_only():
    assert mirror_caption("A dog on the left , a man to the Right .") == "A dog on the right , a man to the Left ."
    assert mirror_caption("his left-hand glove , the rightmost car , LEFT") == "his right-hand glove , the leftmost car , RIGHT"
    assert mirror_caption("a lefty with leftovers in bright light") == "a lefty with leftovers in bright light"
    assert mirror_caption(mirror_caption("the left and the right")) == "the left and the right"


def test_stored_flipped_view_equals_extraction_of_the_flipped_image(tmp_path):
    from pipeline.cache.readers import FeatureStore
    from pipeline.extraction.backbones import BACKBONES, preprocess_image
    from pipeline.extraction.extract import extract
    root = make_shapes(tmp_path, 1, 1, 0)
    recs = datasets.load_records("shapes", root)
    mirrored = []
    for r in recs:                                   # the same pictures, mirrored, as lossless image files
        p = tmp_path / f"m_{r.path.stem}.png"
        with Image.open(r.path) as im:
            ImageOps.mirror(im.convert("RGB")).save(p)
        mirrored.append(dataclasses.replace(r, path=p))
    kw = dict(dataset="shapes", backbone="vgg19", weights="random", progress=False, workers=0, device="cpu")
    torch.manual_seed(0)
    extract(recs, tmp_path / "a.h5", flip=True, **kw)
    torch.manual_seed(0)
    extract(mirrored, tmp_path / "b.h5", **kw)
    a, b = FeatureStore.open(tmp_path / "a.h5"), FeatureStore.open(tmp_path / "b.h5")
    assert a.views == ["original", "hflip"] and b.views == ["original"] and a.done.all()
    got, want = a.load_features(view="hflip").astype(np.float32), b.load_features().astype(np.float32)
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert scale > 0 and err <= 4 * FP16 * scale, (err, scale)
    assert np.abs(a.load_features().astype(np.float32) - want).max() > 100 * err     # the views do differ
    # the input the backbone saw: mirroring the preprocessed tensor is preprocessing the mirrored picture,
    # resize included (Pillow's filters are mirror-symmetric), for every registered preprocessing
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (173, 301, 3), dtype=np.uint8))
    for spec in BACKBONES.values():
        assert torch.equal(preprocess_image(img, spec.preprocessing).flip(-1),
                           preprocess_image(ImageOps.mirror(img), spec.preprocessing)), spec.name
    with pytest.raises(UserError, match="--flip"):                   # a cache's views are fixed at creation
        extract(recs, tmp_path / "a.h5", **kw)
    with pytest.raises(UserError, match="hflip"):
        b.load_features(view="hflip")


def test_view_sampler_is_a_function_of_seed_and_epoch():
    lengths = np.array([3, 3, 4, 4, 4, 5] * 20)
    base = BucketBatchSampler(lengths, 7, seed=1)
    s = ViewSampler(base, len(lengths), seed=1)
    b0, again, b1 = s.batches(0), s.batches(0), s.batches(1)
    assert all(np.array_equal(x, y) for x, y in zip(b0, again))
    assert not np.array_equal(s.views(0), s.views(1)) and 0.3 < s.views(0).mean() < 0.7
    assert [x[:, 0].tolist() for x in b0] == [x.tolist() for x in base.batches(0)]   # the same buckets and order
    assert all(np.array_equal(x[:, 1], s.views(0)[x[:, 0]]) for x in b0) and len(s) == len(base)
    parts = [epoch_plan(DistributedBatchSampler(s, rank=r, world_size=2), 1)[0] for r in range(2)]
    assert all(np.array_equal(np.concatenate([p0, p1]), x) for p0, p1, x in zip(*parts, b1))


CAPS = ["a dog on the left of a cat", "the cat is right of the dog", "a cat and a dog", "two animals", "a dog"]


def flip_store(path, n):
    """A cache with both views; the flipped view is the original negated (recognisable in a batch)."""
    make_store(path, n, captions=lambda k: CAPS, L=16, C=8)
    with h5py.File(path, "r+") as f:
        d = f.create_dataset("features_hflip", data=-f["features"][()])
        assert d.dtype == np.float16
        f.attrs["views"] = '["original", "hflip"]'
    return path


def _cfg(feats, **kw):
    return TrainConfig(**dict(dict(features=str(feats), epochs=2, batch_size=5, min_count=1, lr=3e-3,
                                   log_every=1000, flip=True), **kw))


def test_training_batches_carry_one_view_per_caption(tmp_path):
    from pipeline.training.state import setup
    feats = flip_store(tmp_path / "f.h5", {"train": 6, "val": 2})
    state, data, _ = setup(_cfg(feats), DecoderConfig(**SMALL), tmp_path / "run", resume=False, overrides={},
                           echo=lambda _: None)
    original = torch.from_numpy(data.store.load_features()).float()
    rows, caps = data.store.captions_of("train")
    batches, _, _ = epoch_plan(data.sampler, 0)
    seen = set()
    for b in batches:
        x, y = data.collate(b)
        for (i, v), xi, yi in zip(b.tolist(), x.float(), y):
            want = original[rows[i]] * (-1 if v else 1)
            assert torch.equal(xi, want)
            text = mirror_caption(caps[i]) if v else caps[i]
            assert yi.tolist() == state.vocab.encode_caption(text)
            seen.add((v, "left" in text or "right" in text))
    assert {(0, True), (1, True)} <= seen                       # both views of left/right captions occur
    x = data.features(np.array(sorted(data.refs)))               # validation: the original view
    assert torch.equal(x.float(), original[sorted(data.refs)])


def test_flip_training_resumes_bit_exactly_and_refusals(tmp_path):
    from pipeline.training.train import train
    feats = flip_store(tmp_path / "f.h5", {"train": 6, "val": 2})
    ref, got = {}, {}
    train(_cfg(feats, max_steps=12), DecoderConfig(**SMALL), tmp_path / "a", echo=lambda _: None,
          on_step=lambda s, loss: ref.__setitem__(s, loss.item()))
    train(_cfg(feats, max_steps=4), DecoderConfig(**SMALL), tmp_path / "b", echo=lambda _: None)
    train(None, None, tmp_path / "b", resume=True, overrides={"max_steps": 12}, echo=lambda _: None,
          on_step=lambda s, loss: got.__setitem__(s, loss.item()))
    # 9 batches per epoch (lengths 8, 7, 5, 2 words: 2 + 2 + 2 + 3): steps 10-12 are epoch 2, other views
    assert got == {s: ref[s] for s in range(5, 13)}
    plain = make_store(tmp_path / "p.h5", {"train": 6, "val": 2}, captions=lambda k: CAPS, L=16, C=8)
    with pytest.raises(UserError, match="hflip"):
        train(_cfg(plain), DecoderConfig(**SMALL), tmp_path / "c", echo=lambda _: None)
    with pytest.raises(UserError, match="--flip"):
        train(_cfg(feats, objective="scst", init_from=str(tmp_path / "a")), None, tmp_path / "d", echo=lambda _: None)
