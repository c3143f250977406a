"""store.py: layout written by create(), the read side, provenance checks."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.cache import store
from pipeline.errors import UserError
from pipeline.data.records import Record

PROV = {"backbone": "b", "weights_sha256": "w", "preprocessing": {"resize": [4, 4]}, "input_size": 4,
        "grid": [2, 2], "dataset": "d", "split_hashes": {"train": "x"}, "code_version": "0", "created": "now"}


def recs(root: Path) -> list[Record]:
    return [Record("a", root / "a.jpg", "train", ["c1", "c2"]),
            Record("b", root / "sub" / "b.jpg", "val", ["c3"]),
            Record("c", root / "c.jpg", "test", [], objects=[{"shape": "circle", "box": [0, 0, 1, 1]}])]


def test_create_layout_and_read(tmp_path):
    p = tmp_path / "x" / "f.h5"
    store.create(p, recs(tmp_path), PROV, num_regions=4, feature_dim=3, dtype="float16", dataset_root=tmp_path)
    assert p.exists() and not p.with_name("f.h5.creating").exists()
    with h5py.File(p, "r+") as f:
        d = f["features"]
        assert d.shape == (3, 4, 3) and d.dtype == np.float16 and d.chunks == (1, 4, 3)
        assert d.id.get_storage_size() == 3 * 4 * 3 * 2          # all chunks allocated up front
        assert not f["done"][()].any() and not f["bad"][()].any()
        d[1] = np.arange(12).reshape(4, 3)
        f["done"][:] = True
    st = store.FeatureStore.open(p)
    assert list(st.filenames) == ["a.jpg", "sub/b.jpg", "c.jpg"]
    assert st.attrs["feature_dim"] == 3 and st.attrs["dtype"] == "float16" and st.attrs["num_images"] == 3
    assert st.provenance["preprocessing"] == {"resize": [4, 4]} and st.num_regions == 4
    assert list(st.rows("val")) == [1]
    rows, caps = st.captions_of("train")
    assert list(rows) == [0, 0] and caps == ["c1", "c2"]
    assert st.references("test") == {2: []}
    assert st.objects[2][0]["shape"] == "circle" and st.objects[0] == []
    np.testing.assert_array_equal(st.load_features([1])[0], np.arange(12).reshape(4, 3))
    assert store.LazyFeatures(p)[1].shape == (4, 3)


def test_incomplete_and_bad_files(tmp_path):
    p = tmp_path / "f.h5"
    store.create(p, recs(tmp_path), PROV, num_regions=4, feature_dim=3)
    with pytest.raises(UserError, match="incomplete"):
        store.FeatureStore.open(p)
    assert store.FeatureStore.open(p, require_complete=False).done.sum() == 0
    with pytest.raises(UserError, match="no such feature file"):
        store.FeatureStore.open(tmp_path / "nope.h5")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a readable HDF5"):
        store.FeatureStore.open(tmp_path / "junk.h5")
    with pytest.raises(UserError, match="dtype"):
        store.create(tmp_path / "g.h5", recs(tmp_path), PROV, num_regions=4, feature_dim=3, dtype="int8")


def test_check_same_provenance(tmp_path):
    a = store.provenance_of(dict(PROV, feature_dim=3, dtype="float16"))
    store.check_same_provenance(a, dict(a), what="x", where="y")
    with pytest.raises(UserError, match="backbone: expected 'b', found 'other'"):
        store.check_same_provenance(a, dict(a, backbone="other"), what="features", where="f.h5")
    # Dict key order does not matter; values do.
    store.check_same_provenance(a, dict(a, preprocessing={"resize": [4, 4]}), what="x", where="y")
    with pytest.raises(UserError, match="preprocessing"):
        store.check_same_provenance(a, dict(a, preprocessing={"resize": [5, 4]}), what="x", where="y")


def test_lazy_reads_in_any_order_and_fused(tmp_path):
    """LazyFeatures.read (the trainer's out-of-core path) = load_features, for one cache and fused ones."""
    import numpy as np
    from helpers_store import make_store
    a = make_store(tmp_path / "a.h5", {"train": 10, "val": 3}, L=16, C=4)
    b = make_store(tmp_path / "b.h5", {"train": 10, "val": 3}, L=16, C=3, backbone="other", seed=2)
    rows = [7, 2, 9, 2, 0]
    want = store.open_features([a, b]).load_features(rows)
    lazy = store.LazyFeatures([a, b])
    assert np.array_equal(lazy.read(rows), want) and np.array_equal(np.stack([lazy[r] for r in rows]), want)
    assert np.array_equal(store.LazyFeatures(a).read(rows), store.FeatureStore.open(a).load_features(rows))
