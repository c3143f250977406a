"""pipeline/cache: the layout written by layout.create(), the readers, the identity checks."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.cache import identity, layout, readers
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
    layout.create(p, recs(tmp_path), PROV, num_regions=4, feature_dim=3, dtype="float16", dataset_root=tmp_path)
    assert p.exists() and not p.with_name("f.h5.creating").exists()
    with h5py.File(p, "r+") as f:
        d = f["features"]
        assert d.shape == (3, 4, 3) and d.dtype == np.float16 and d.chunks == (1, 4, 3)
        assert d.id.get_storage_size() == 3 * 4 * 3 * 2          # all chunks allocated up front
        assert not f["done"][()].any() and not f["bad"][()].any()
        d[1] = np.arange(12).reshape(4, 3)
        f["done"][:] = True
    st = readers.FeatureStore.open(p)
    assert list(st.filenames) == ["a.jpg", "sub/b.jpg", "c.jpg"]
    assert st.attrs["feature_dim"] == 3 and st.attrs["dtype"] == "float16" and st.attrs["num_images"] == 3
    assert st.provenance["preprocessing"] == {"resize": [4, 4]} and st.num_regions == 4
    assert list(st.rows("val")) == [1]
    rows, caps = st.captions_of("train")
    assert list(rows) == [0, 0] and caps == ["c1", "c2"]
    assert st.references("test") == {2: []}
    assert st.objects[2][0]["shape"] == "circle" and st.objects[0] == []
    np.testing.assert_array_equal(st.load_features([1])[0], np.arange(12).reshape(4, 3))
    assert readers.LazyFeatures(p)[1].shape == (4, 3)


def test_incomplete_and_bad_files(tmp_path):
    p = tmp_path / "f.h5"
    layout.create(p, recs(tmp_path), PROV, num_regions=4, feature_dim=3)
    with pytest.raises(UserError, match="incomplete"):
        readers.FeatureStore.open(p)
    assert readers.FeatureStore.open(p, require_complete=False).done.sum() == 0
    with pytest.raises(UserError, match="no such feature file"):
        readers.FeatureStore.open(tmp_path / "nope.h5")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a readable HDF5"):
        readers.FeatureStore.open(tmp_path / "junk.h5")
    with pytest.raises(UserError, match="dtype"):
        layout.create(tmp_path / "g.h5", recs(tmp_path), PROV, num_regions=4, feature_dim=3, dtype="int8")


def test_check_same_provenance(tmp_path):
    a = identity.provenance_of(dict(PROV, feature_dim=3, dtype="float16"))
    identity.check_same_provenance(a, dict(a), what="x", where="y")
    with pytest.raises(UserError, match="backbone: expected 'b', found 'other'"):
        identity.check_same_provenance(a, dict(a, backbone="other"), what="features", where="f.h5")
    # Dict key order does not matter; values do.
    identity.check_same_provenance(a, dict(a, preprocessing={"resize": [4, 4]}), what="x", where="y")
    with pytest.raises(UserError, match="preprocessing"):
        identity.check_same_provenance(a, dict(a, preprocessing={"resize": [5, 4]}), what="x", where="y")


def test_lazy_reads_in_any_order_and_fused(tmp_path):
    """LazyFeatures.read (the trainer's out-of-core path) = load_features, for one cache and fused ones."""
    import numpy as np
    from helpers_store import make_store
    a = make_store(tmp_path / "a.h5", {"train": 10, "val": 3}, L=16, C=4)
    b = make_store(tmp_path / "b.h5", {"train": 10, "val": 3}, L=16, C=3, backbone="other", seed=2)
    rows = [7, 2, 9, 2, 0]
    want = readers.open_features([a, b]).load_features(rows)
    lazy = readers.LazyFeatures([a, b])
    assert np.array_equal(lazy.read(rows), want) and np.array_equal(np.stack([lazy[r] for r in rows]), want)
    assert np.array_equal(readers.LazyFeatures(a).read(rows), readers.FeatureStore.open(a).load_features(rows))


def test_fusing_caches_of_other_pictures_is_refused(tmp_path):
    """Two caches of the same image ids whose rows were computed from different pictures (one made before
    the pictures changed): the fused read refuses them, and says what re-running extract will do."""
    from helpers_store import make_store
    a = make_store(tmp_path / "a.h5", {"train": 6, "val": 2}, L=16, C=4)
    b = make_store(tmp_path / "b.h5", {"train": 6, "val": 2}, L=16, C=3, backbone="other", seed=2)
    for p, seed in ((a, 1), (b, 1)):
        with h5py.File(p, "r+") as f:
            f["image_sha256"][:] = np.random.default_rng(seed).integers(0, 255, (8, 32), dtype=np.uint8)
    assert readers.open_features([a, b]).feature_dim == 7                 # the same pictures: fine
    with h5py.File(b, "r+") as f:
        f["image_sha256"][3, 0] ^= 1                                      # one picture differs
    with pytest.raises(UserError, match=r"their pictures differ; re-run `pipeline extract` on the older one: it "
                                        r"refreshes the captions and re-extracts every picture that changed"):
        readers.open_features([a, b])


# ---- planted symbolic links: nothing is written through them --------------------------------------------

def test_planted_symlinks_are_never_written_through(tmp_path):
    """A run or cache folder with links planted under the names of temporaries, lock files or results:
    every write replaces or refuses the link; the file it points to is never touched."""
    from pipeline.fileio import FileLock, atomic_write, write_json
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    d = tmp_path / "run"
    d.mkdir()
    (d / "results_val.json.tmp").symlink_to(victim)                   # the atomic writer's temporary
    write_json(d / "results_val.json", {"a": 1})
    (d / "scores_val.json").symlink_to(victim)                        # the results file itself
    write_json(d / "scores_val.json", {"b": 2})
    (d / "best.pt.tmp").symlink_to(victim)                            # a checkpoint written by path
    atomic_write(d / "best.pt", lambda tmp: tmp.write_bytes(b"weights"))
    (d / ".f.h5.lock").symlink_to(victim)
    with pytest.raises(UserError, match=r"\.f\.h5\.lock: is a symbolic link"):
        with FileLock(d / ".f.h5.lock", "feature file f.h5"):
            pass
    (d / "f.h5.creating").symlink_to(victim)                          # the cache's own temporary
    layout.create(d / "f.h5", recs(tmp_path), PROV, num_regions=4, feature_dim=3)
    assert victim.read_text() == "precious"
    for name in ("results_val.json", "scores_val.json", "best.pt", "f.h5"):
        assert not (d / name).is_symlink() and (d / name).is_file(), name
    assert (d / "best.pt").read_bytes() == b"weights" and '"b": 2' in (d / "scores_val.json").read_text()
    assert sorted(p.name for p in d.iterdir()) == [".f.h5.lock", "best.pt", "f.h5", "results_val.json",
                                                   "scores_val.json"]   # temporaries gone; the refused link kept


# ---- what a file holds against what it declares: NaN/inf rows, dtypes, shapes ---------------------------

def _complete(p: Path, feats: np.ndarray) -> None:
    with h5py.File(p, "r+") as f:
        f["features"][:] = feats
        f["done"][:] = True


def test_nan_or_inf_rows_are_one_error_naming_file_and_row(tmp_path):
    """A NaN val row used to decode to garbage with rc 0, a NaN train row to be blamed on the learning
    rate: every read (load_features, LazyFeatures, per batch) refuses it, naming file, row and image."""
    p = tmp_path / "f.h5"
    layout.create(p, recs(tmp_path), PROV, num_regions=4, feature_dim=3)
    feats = np.ones((3, 4, 3), np.float16)
    feats[1, 2, 0] = np.nan
    feats[2, 0, 1] = np.inf
    _complete(p, feats)
    st = readers.FeatureStore.open(p)                                 # metadata reads fine
    assert st.load_features([0]).shape == (1, 4, 3)                   # clean rows read fine
    with pytest.raises(UserError, match=r"f\.h5: row 1 \(image b\) holds NaN or infinite features \(2 such"):
        st.load_features()
    with pytest.raises(UserError, match=r"row 2 \(image c\)"):
        st.load_features([0, 2])
    with pytest.raises(UserError, match=r"f\.h5: row 2 holds NaN"):
        readers.LazyFeatures(p).read([0, 2])
    with pytest.raises(UserError, match=r"f\.h5: row 1 holds NaN"):
        readers.LazyFeatures([p, p])[1]
    big = np.full((2, 196, 512), 60000, np.float16)                   # large but finite: no false alarm
    readers.check_finite(big, "x.h5")


@pytest.mark.parametrize("damage,message", [
    ("int32", r"/features holds int32, not float16 or float32"),
    ("float32", r"/features holds float32 but the dtype attribute says float16"),
    ("feature_dim", r"/features has shape \(3, 4, 3\) but the attributes declare \(3, 4, 1024\)"),
    ("grid", r"/features has shape \(3, 4, 3\) but the attributes declare \(3, 9, 3\)"),
    ("num_images", r"num_images says 50000 but /image_ids lists 3"),
    ("rows", r"/features has shape \(2, 4, 3\) but the attributes declare \(3, 4, 3\)"),
])
def test_features_that_disagree_with_the_attributes_are_refused(tmp_path, damage, message):
    """An int32 dataset trained silently; a declared shape other than the file's was read (zero rows) or
    crashed allocating: FeatureStore.open refuses each, naming the file, before any feature is read."""
    p = tmp_path / "f.h5"
    layout.create(p, recs(tmp_path), PROV, num_regions=4, feature_dim=3)
    _complete(p, np.ones((3, 4, 3), np.float16))
    with h5py.File(p, "r+") as f:
        if damage in ("int32", "float32", "rows"):
            del f["features"]
            f.create_dataset("features", data=np.ones((2 if damage == "rows" else 3, 4, 3),
                                                      "float16" if damage == "rows" else damage))
        elif damage == "grid":
            f.attrs["grid"] = "[3, 3]"
        else:
            f.attrs[damage] = {"feature_dim": 1024, "num_images": 50000}[damage]
    with pytest.raises(UserError, match=rf"f\.h5: .*{message}.*re-extract it with --force"):
        readers.open_features([p])
