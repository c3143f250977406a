"""Stage one: extraction into the HDF5 cache (tiny backbone, synthetic images; seconds on CPU)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.extraction import backbones

from pipeline.cache import identity, layout, readers
from pipeline.errors import UserError
from pipeline.extraction.extract import extract, info
from pipeline.data.records import Record

REPO = Path(__file__).resolve().parents[1]


def tiny_builder(seed: int = 0, delay: float = 0.0, fail_after: int | None = None):
    """(B,3,28,28) -> (B,8,14,14), deterministic weights per seed. Registered as a backbone entry."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if fail_after is not None and self.calls > fail_after:
                raise RuntimeError("simulated crash")
            if delay:
                time.sleep(delay)
            return torch.relu(self.conv(x))

    def build(weights, weights_dir):
        return Tiny().eval(), f"tiny-seed{seed}"
    return build


def tiny_spec(name="tiny", **kw):
    return backbones.BackboneSpec(name, 28, (14, 14), 8, backbones.imagenet_preprocessing(28), tiny_builder(**kw))


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(backbones.BACKBONES, "tiny", tiny_spec())
    monkeypatch.setitem(backbones.BACKBONES, "tiny2", tiny_spec("tiny2", seed=1))
    return "tiny"


def make_records(tmp_path: Path, n: int = 10, bad: tuple[int, ...] = ()) -> list[Record]:
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir(exist_ok=True)
    recs = []
    for i in range(n):
        p = tmp_path / "img" / f"{i:03d}.jpg"
        if i in bad:
            p.write_bytes(b"not a jpeg at all")
        else:
            mode = ["RGB", "L", "RGBA", "CMYK"][i % 4]   # exercised through the same preprocess
            a = rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)
            Image.fromarray(a).convert(mode).save(p.with_suffix(".png") if mode == "RGBA" else p)
            if mode == "RGBA":
                p = p.with_suffix(".png")
        split = ["train", "val", "test", ""][i % 4]     # "" = in no split: not cached
        recs.append(Record(p.name, p, split, [f"caption {i} a", f"caption {i} b"]))
    return recs


def run(recs, out, backbone="tiny", **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("batch_size", 3)
    return extract(recs, out, dataset="syn", backbone=backbone, progress=False, **kw)


def test_layout_and_attrs(tmp_path, tiny):
    recs = make_records(tmp_path)
    out = tmp_path / "f.h5"
    res = run(recs, out, dataset_root=tmp_path)
    kept = [r for r in recs if r.split]
    assert res.computed == len(kept) == 8
    with h5py.File(out) as f:
        assert f["features"].shape == (8, 196, 8) and f["features"].dtype == np.float16
        assert f["features"].chunks == (1, 196, 8)
        assert f["done"][()].all() and not f["bad"][()].any()
        assert [s.decode() for s in f["image_ids"][()]] == [r.image_id for r in kept]
        assert f["filenames"][0].decode() == "img/000.jpg"          # relative to the dataset root
        assert len(f["captions"]) == 16 and list(f["caption_row"][:4]) == [0, 0, 1, 1]
    a = layout.read_attrs(out)
    for k in ("backbone", "weights_sha256", "preprocessing", "input_size", "grid", "feature_dim", "dtype",
              "dataset", "split_hashes", "code_version", "created", "format_version", "num_images"):
        assert k in a, k
    assert a["grid"] == [14, 14] and a["feature_dim"] == 8 and a["backbone"] == "tiny"
    assert set(a["split_hashes"]) == {"train", "val", "test"}
    st = readers.FeatureStore.open(out)
    feats = st.load_features()
    assert np.abs(feats).sum(axis=(1, 2)).min() > 0                      # no zero rows
    # Grid layout: region l = y*14 + x of the backbone's (C,14,14) map.
    mod, spec, _ = backbones.load_backbone("tiny")
    x = spec.preprocess(Image.open(recs[0].path))[None]
    with torch.no_grad():
        y = mod(x)[0]                                                     # (8,14,14)
    np.testing.assert_allclose(feats[0, 3 * 14 + 5], y[:, 3, 5].numpy(), rtol=2e-3, atol=2e-3)
    assert "split train: 3 images, done 3" in info(out)


def test_workers_and_float32_match(tmp_path, tiny):
    recs = make_records(tmp_path, n=7)
    a = run(recs, tmp_path / "a.h5", dtype="float32").path
    b = run(recs, tmp_path / "b.h5", dtype="float32", workers=2, batch_size=4).path
    fa, fb = readers.FeatureStore.open(a).load_features(), readers.FeatureStore.open(b).load_features()
    assert fa.dtype == np.float32
    np.testing.assert_array_equal(fa, fb)


def test_resume_after_exception_identical(tmp_path, tiny, monkeypatch):
    recs = make_records(tmp_path, n=14)
    ref = readers.FeatureStore.open(run(recs, tmp_path / "ref.h5").path).load_features()
    out = tmp_path / "crash.h5"
    monkeypatch.setitem(backbones.BACKBONES, "tiny", tiny_spec(fail_after=2))
    from pipeline.extraction import writer as writer_mod
    real_write = writer_mod.write_rows

    def slow_write(*a):                      # a writer behind the backbone: batches still queued at the crash
        time.sleep(0.3)
        real_write(*a)
    monkeypatch.setattr(writer_mod, "write_rows", slow_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(recs, out)
    monkeypatch.setattr(writer_mod, "write_rows", real_write)
    done = readers.FeatureStore.open(out, require_complete=False).done
    assert done.sum() == 2 * 3 < len(done)   # both batches computed before the crash are written and done
    with pytest.raises(UserError, match="incomplete"):
        readers.FeatureStore.open(out)
    monkeypatch.setitem(backbones.BACKBONES, "tiny", tiny_spec())
    res = run(recs, out)
    assert res.computed == len(done) - done.sum()                         # only the missing rows
    np.testing.assert_array_equal(readers.FeatureStore.open(out).load_features(), ref)


def test_resume_after_kill9_identical(tmp_path):
    """A real `kill -9` mid-run (subprocess): the re-run completes with rows identical to a clean run."""
    recs_py = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from pathlib import Path
        import pipeline.extraction.extract as E
        from pipeline.extraction import backbones, writer
        from test_extract import tiny_spec, make_records
        delay = float(sys.argv[2])
        backbones.BACKBONES["tiny"] = tiny_spec(delay=delay)
        writer.FLUSH_EVERY_S = 0.0
        recs = make_records(Path({str(tmp_path)!r}), n=40)
        E.extract(recs, sys.argv[1], dataset="syn", backbone="tiny", workers=1, batch_size=2, progress=False)
    """)
    script = tmp_path / "run.py"
    script.write_text(recs_py)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, script, tmp_path / "ref.h5", "0"], check=True, env=env, timeout=120)
    out = tmp_path / "killed.h5"
    p = subprocess.Popen([sys.executable, script, out, "0.15"], env=env, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            time.sleep(0.3)
            try:
                with h5py.File(out, "r", locking=False) as f:
                    if f["done"][()].sum() >= 6:
                        break
            except (OSError, KeyError):
                pass
        os.killpg(p.pid, signal.SIGKILL)   # the process group: the extractor and its loader worker
    finally:
        p.wait(timeout=30)
    done = readers.FeatureStore.open(out, require_complete=False).done
    assert 0 < done.sum() < len(done)
    subprocess.run([sys.executable, script, out, "0"], check=True, env=env, timeout=120)
    a, b = readers.FeatureStore.open(tmp_path / "ref.h5"), readers.FeatureStore.open(out)
    np.testing.assert_array_equal(a.load_features(), b.load_features())
    assert np.abs(b.load_features()).sum(axis=(1, 2)).min() > 0


def test_refuses_other_backbone_and_keeps_finished_file(tmp_path, tiny):
    recs = make_records(tmp_path, n=6)
    out = tmp_path / "f.h5"
    run(recs, out)
    before = out.stat().st_mtime_ns
    with pytest.raises(UserError, match="backbone"):
        run(recs, out, backbone="tiny2")
    with pytest.raises(UserError, match="dtype"):
        run(recs, out, dtype="float32")
    with pytest.raises(UserError, match="split_hashes"):
        run(recs[:-1] + [Record("other", recs[0].path, "train")], out)
    assert run(recs, out).computed == 0                                   # finished: nothing recomputed
    assert out.stat().st_mtime_ns == before
    assert run(recs, out, backbone="tiny2", force=True).computed == 5     # --force replaces it
    assert layout.read_attrs(out)["backbone"] == "tiny2"


def test_changed_captions_are_refreshed_not_kept_stale(tmp_path, tiny, capsys):
    """Same pictures, new caption text (a corrected caption file, a new synthetic generator): a
    finished cache gets the new captions without re-extraction, and the change shows in provenance."""
    recs = make_records(tmp_path, n=6)
    out = tmp_path / "f.h5"
    run(recs, out)
    feats = readers.FeatureStore.open(out).load_features()
    old_hash = layout.read_attrs(out)["captions_sha256"]
    renamed = [Record(r.image_id, r.path, r.split, [c.upper() for c in r.captions]) for r in recs]
    assert run(renamed, out).computed == 0                                # features are not recomputed
    assert "refreshed the file's captions" in capsys.readouterr().out
    st = readers.FeatureStore.open(out)
    assert st.captions_of("train")[1] == [c for r in renamed if r.split == "train" for c in r.captions]
    np.testing.assert_array_equal(st.load_features(), feats)
    assert st.provenance["captions_sha256"] == identity.captions_sha256([r for r in renamed if r.split])
    assert st.provenance["captions_sha256"] != old_hash
    # a run made from the old captions is refused on the refreshed file
    with pytest.raises(UserError, match="captions_sha256"):
        identity.check_same_provenance(dict(st.provenance, captions_sha256=old_hash), st.provenance,
                                    what="features", where="run")
    run(renamed, out)                                                      # now in step: nothing to say
    assert "refreshed" not in capsys.readouterr().out


def test_bad_images_error_then_skip_bad(tmp_path, tiny):
    recs = make_records(tmp_path, n=9, bad=(1, 6))
    out = tmp_path / "f.h5"
    with pytest.raises(UserError) as e:
        run(recs, out)
    msg = str(e.value)
    assert "2 image(s) could not be read" in msg and "001.jpg" in msg and "006.jpg" in msg and "--skip-bad" in msg
    done = readers.FeatureStore.open(out, require_complete=False).done
    assert done.sum() == len(done) - 2                                    # the good rows are kept
    res = run(recs, out, skip_bad=True)
    assert res.computed == 2 and len(res.bad) == 2
    st = readers.FeatureStore.open(out)
    bad_rows = np.flatnonzero(st.bad)
    assert [st.image_ids[r] for r in bad_rows] == ["001.jpg", "006.jpg"]
    assert not np.isin(bad_rows, np.concatenate([st.rows(s) for s in ("train", "val", "test")])).any()
    assert np.all(st.load_features(bad_rows) == 0)
    recs[1].path.unlink()
    with pytest.raises(UserError, match="missing"):
        run(recs, tmp_path / "g.h5")


def test_cli_extract_and_info(tmp_path, monkeypatch):
    """The click layer: a user mistake is one line on stderr and exit 2."""
    from click.testing import CliRunner
    from pipeline.cli import main
    r = CliRunner().invoke(main, ["extract", "--dataset", "nope", "--backbone", "vgg19"])
    assert r.exit_code == 2 and "unknown dataset" in r.output
    r = CliRunner().invoke(main, ["info", str(tmp_path / "missing.h5")])
    assert r.exit_code == 2 and "no such feature file" in r.output


# ---- faults: a dying writer, a second process, text HDF5 cannot hold -----------------------------------

def _in_thread(fn, timeout=120):
    """fn() in a daemon thread: (result or exception); fails the test instead of hanging it."""
    import threading
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:   # noqa: BLE001
            box["error"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"hung for {timeout} s"
    return box


def test_full_disk_stops_extraction_with_one_error_and_keeps_finished_rows(tmp_path, tiny, monkeypatch):
    """The writer dies on a full disk while the queue is full: the extraction must stop with the
    writer's error (not block in put / close for ever), naming the disk, with the rows it finished."""
    import errno
    import pipeline.extraction.writer as ex
    real, calls = ex.write_rows, []

    def failing(d, rows, feats):
        calls.append(len(rows))
        if len(calls) >= 3:
            time.sleep(1.0)              # meanwhile the main thread fills the queue
            raise OSError(errno.ENOSPC, "No space left on device")
        real(d, rows, feats)
    monkeypatch.setattr(ex, "write_rows", failing)
    monkeypatch.setattr(ex.Writer, "POLL_S", 0.05)
    recs = make_records(tmp_path, n=40)
    out = tmp_path / "f.h5"
    box = _in_thread(lambda: run(recs, out, batch_size=1))       # 30 batches: the queue (8) fills up
    assert isinstance(box.get("error"), UserError), box
    msg = str(box["error"])
    assert str(out) in msg and "disk is full" in msg and "MiB free" in msg
    done = readers.FeatureStore.open(out, require_complete=False).done
    assert done.sum() == 2                                        # the two rows written before the failure
    monkeypatch.setattr(ex, "write_rows", real)
    res = run(recs, out, batch_size=4)                            # space freed: the same command resumes
    assert res.computed == len([r for r in recs if r.split]) - 2


@pytest.mark.slow
def test_failed_writes_end_the_cli_with_rc_2_not_a_crash(tmp_path):
    """A real failing write, in a subprocess through the CLI: the file may not be written past the start
    of row 4's features (RLIMIT_FSIZE, as a full disk stops writes). The process must end with the one
    error and rc 2, and the same command resume once writes succeed again. (HDF5 used to keep the failed
    rows as dirty cached data, fail to close the file, and crash the interpreter at exit: rc 139.)"""
    from conftest import make_flickr8k
    root = make_flickr8k(tmp_path, 12, 4, 4)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import os, resource, signal, sys, h5py, torch
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from pipeline.cache import layout
        from pipeline.extraction import backbones
        from pipeline.cli import main

        class Wide(torch.nn.Module):                 # 100 KB rows
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 256, 3, stride=2, padding=1)
            def forward(self, x):
                return self.conv(x)
        backbones.BACKBONES["wide"] = backbones.BackboneSpec(
            "wide", 28, (14, 14), 256, backbones.imagenet_preprocessing(28), lambda w, d: (Wide().eval(), "w0"))
        create = layout.create
        def create_then_limit(path, *a, **k):        # the file is made; then nothing past row 4's chunk
            create(path, *a, **k)
            with h5py.File(path, "r") as f:
                limit = f["features"].id.get_chunk_info(4).byte_offset
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        if os.environ.get("LIMIT"):
            layout.create = create_then_limit
        main(sys.argv[1:])
    """))
    out = tmp_path / "f.h5"
    cmd = [sys.executable, script, "extract", "--dataset", "flickr8k", "--root", root, "--backbone", "wide",
           "--device", "cpu", "--workers", "0", "--batch-size", "2", "--out", out]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(env, LIMIT="1"))
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert f"error: {out}: could not be written" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not readers.FeatureStore.open(out, require_complete=False).done.all()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)     # writes work again
    assert r.returncode == 0, r.stderr[-2000:]
    assert readers.FeatureStore.open(out).done.all()


def test_first_error_is_reported_not_the_writers(tmp_path, tiny, monkeypatch):
    """A crash in the main loop while the writer has failed too: the crash is what the user sees."""
    import pipeline.extraction.writer as ex
    monkeypatch.setattr(ex, "write_rows", lambda d, rows, feats: (_ for _ in ()).throw(OSError("writer broke")))
    monkeypatch.setitem(backbones.BACKBONES, "tiny", tiny_spec(fail_after=1, delay=0.2))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(make_records(tmp_path, n=10), tmp_path / "f.h5")


def test_second_extraction_of_one_file_is_refused_before_any_work(tmp_path, tiny, monkeypatch):
    from pipeline.fileio import FileLock
    out = tmp_path / "f.h5"
    built = []
    monkeypatch.setattr(backbones, "load_backbone", lambda *a, **k: built.append(1))
    from pipeline.extraction.extract import lock_path
    with FileLock(lock_path(out), "test"):                          # another process holds the file
        with pytest.raises(UserError, match=r"feature file .*f\.h5 is in use by another process \(pid \d+\)"):
            run(make_records(tmp_path, n=4), out)
    assert not built and not out.exists()


def test_caption_with_nul_character_is_one_clear_error(tmp_path, tiny):
    recs = make_records(tmp_path, n=4)
    recs[1].captions = ["a dog\x00 runs"]
    out = tmp_path / "f.h5"
    with pytest.raises(UserError, match=r"image '001\.jpg'.*NUL character"):
        run(recs, out)
    assert not out.exists() and not list(tmp_path.glob("*.creating"))


# ---- stale features: the pictures each row was computed from (format 2) --------------------------------

def _repaint(path: Path, seed: int) -> None:
    """Another picture under the same name (and format)."""
    with Image.open(path) as im:
        mode, size, fmt = im.mode, im.size, im.format
    a = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).convert(mode).save(path, format=fmt)


def as_format1(path: Path) -> None:
    """What the code before per-image picture records wrote: the same file without them, format_version 1."""
    with h5py.File(path, "r+") as f:
        for name in layout.PICTURE_DATASETS:
            del f[name]
        f.attrs["format_version"] = 1


def test_changed_picture_is_reextracted_not_paired_with_refreshed_captions(tmp_path, tiny, capsys):
    """An edited photo (same name) and new captions: the row is computed again from the new picture,
    the other rows are kept, and the provenance says the pictures changed."""
    recs = make_records(tmp_path, n=8)
    out = tmp_path / "f.h5"
    run(recs, out)
    before = readers.FeatureStore.open(out)
    old = before.load_features()
    _repaint(recs[1].path, seed=7)
    recaptioned = [Record(r.image_id, r.path, r.split, [c + " again" for c in r.captions]) for r in recs]
    assert run(recaptioned, out).computed == 1                          # only the changed picture
    out_msg = capsys.readouterr().out
    assert "1 picture(s) changed" in out_msg and "001.jpg" in out_msg and "refreshed the file's captions" in out_msg
    st = readers.FeatureStore.open(out)
    fresh = readers.FeatureStore.open(run(recaptioned, tmp_path / "fresh.h5").path).load_features()
    got = st.load_features()
    np.testing.assert_array_equal(np.delete(got, 1, 0), np.delete(fresh, 1, 0))     # the other rows kept
    # row 1 from the new picture: computed alone here, in a batch of 8 in `fresh` (the convolution may sum in
    # another order for another batch size: measured 1e-7 apart in one element of 9408, one thread)
    np.testing.assert_allclose(got[1], fresh[1], rtol=1e-5, atol=1e-6)
    assert not np.array_equal(old[1], fresh[1]) and np.array_equal(np.delete(old, 1, 0), np.delete(fresh, 1, 0))
    assert st.captions_of("val")[1][:2] == recaptioned[1].captions
    assert st.provenance["images_sha256"] != before.provenance["images_sha256"]
    with pytest.raises(UserError, match="images_sha256"):               # a run of the old pictures is refused
        identity.check_same_provenance(before.provenance, st.provenance, what="features", where="run")


def test_another_root_is_checked_picture_by_picture(tmp_path, tiny, capsys):
    """--root elsewhere: other pictures under the old names are all re-extracted; an identical copy
    (new mtimes) keeps every row and records the new root."""
    import shutil
    (tmp_path / "a").mkdir()
    recs = make_records(tmp_path / "a", n=8)
    out = tmp_path / "f.h5"
    run(recs, out, dataset_root=tmp_path / "a")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "a", copy)                               # plain copy: new mtimes, same bytes
    moved = [Record(r.image_id, copy / r.path.relative_to(tmp_path / "a"), r.split, r.captions) for r in recs]
    assert run(moved, out, dataset_root=copy).computed == 0
    assert layout.read_attrs(out)["dataset_root"] == str(copy)
    other = tmp_path / "b"
    shutil.copytree(tmp_path / "a", other)
    for r in recs:
        _repaint(other / r.path.relative_to(tmp_path / "a"), seed=100 + int(r.image_id[:3]))
    elsewhere = [Record(r.image_id, other / r.path.relative_to(tmp_path / "a"), r.split, r.captions) for r in recs]
    capsys.readouterr()
    assert run(elsewhere, out, dataset_root=other).computed == 6        # every picture with a split
    assert "6 picture(s) changed" in capsys.readouterr().out
    fresh = run(elsewhere, tmp_path / "fresh.h5").path
    np.testing.assert_array_equal(readers.FeatureStore.open(out).load_features(),
                                  readers.FeatureStore.open(fresh).load_features())


def test_format1_cache_still_opens_and_a_caption_change_is_refused(tmp_path, tiny, capsys):
    """A cache made before picture records (format 1, like features/flickr8k_vgg19.h5) opens and reads
    as before; re-running extract over it notes that pictures cannot be checked, and refuses to pair
    its features with changed captions."""
    recs = make_records(tmp_path, n=8)
    out = tmp_path / "f.h5"
    run(recs, out)
    feats = readers.FeatureStore.open(out).load_features()
    as_format1(out)
    st = readers.FeatureStore.open(out)
    assert st.attrs["format_version"] == 1 and st.provenance["images_sha256"] is None
    np.testing.assert_array_equal(st.load_features(), feats)
    assert run(recs, out).computed == 0
    assert "predates per-image picture records" in capsys.readouterr().out
    recaptioned = [Record(r.image_id, r.path, r.split, [c + " again" for c in r.captions]) for r in recs]
    with pytest.raises(UserError, match=r"captions changed.*format 1.*--force"):
        run(recaptioned, out)
    assert readers.FeatureStore.open(out).captions_of("train")[1][0] == recs[0].captions[0]   # untouched
    # a run trained on the format-1 file (images_sha256 None) still accepts it once re-extracted
    identity.check_same_provenance(st.provenance, readers.FeatureStore.open(run(recs, out, force=True).path).provenance,
                                   what="features", where="run")


def test_out_that_is_a_folder_is_refused_with_or_without_force(tmp_path, tiny):
    """`extract --out DIR --force` on a folder was an IsADirectoryError traceback (issue 20)."""
    recs = make_records(tmp_path, 3)
    folder = tmp_path / "features"
    (folder / "keep.txt").parent.mkdir()
    (folder / "keep.txt").write_text("x")
    for force in (False, True):
        with pytest.raises(UserError, match=rf"^--out {folder}: is a folder; --out names the feature file to write, "
                                            rf"e\.g\. --out {folder}/shapes_tiny\.h5\.$"):
            extract(recs, folder, dataset="shapes", backbone=tiny, force=force, progress=False)
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]


def test_nan_features_are_refused_on_write_naming_the_image(tmp_path, monkeypatch):
    """A backbone that gives NaN (broken weights, an fp16 overflow) stops the extraction with one error
    naming the image and row; no NaN row is ever stored, and the rows finished before are kept."""
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            y = self.conv(x)
            if self.calls == 3:
                y[1, 0, 2, 2] = float("nan")
            return y
    monkeypatch.setitem(backbones.BACKBONES, "broken", backbones.BackboneSpec(
        "broken", 28, (14, 14), 8, backbones.imagenet_preprocessing(28), lambda w, d: (Broken().eval(), "b0")))
    recs = make_records(tmp_path, n=12)
    out = tmp_path / "f.h5"
    kept = [r for r in recs if r.split]
    with pytest.raises(UserError, match=rf"{kept[5].path} \(row 5\): backbone broken gave NaN or infinite"):
        run(recs, out, backbone="broken", batch_size=2)
    st = readers.FeatureStore.open(out, require_complete=False)
    assert st.done[:4].all() and not st.done[4:].any()                  # batches 1-2 kept, batch 3 not written
    st.load_features(np.flatnonzero(st.done))                          # and they read back finite


def test_the_lock_file_goes_after_an_extraction_without_reopening_the_race(tmp_path, tiny):
    """Issue 22 part 4: `.<file>.lock` does not stay. Removing it must not let two processes in: one that
    opened the old lock file before it was removed, then got its flock, holds a lock on a file nobody
    else sees, so it must notice and lock the current one (here held by a third process: refused)."""
    import fcntl
    from pipeline.extraction.extract import lock_path
    from pipeline.fileio import FileLock
    out = tmp_path / "f.h5"
    run(make_records(tmp_path, n=4), out)
    assert out.exists() and not lock_path(out).exists()
    p = tmp_path / ".g.h5.lock"
    a = FileLock(p, "feature file g.h5", remove=True).__enter__()
    stale = os.open(p, os.O_RDWR)                                     # process B opens the file A holds
    a.__exit__(None, None, None)                                      # A finishes: the file is removed
    assert not p.exists()
    with FileLock(p, "feature file g.h5", remove=True):               # C locks a new lock file
        b = FileLock(p, "feature file g.h5", remove=True)
        real, calls = b._open_locked, []

        def stale_first():                                            # B's flock on the old file succeeds
            if not calls:
                calls.append(1)
                fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return stale
            return real()
        b._open_locked = stale_first
        with pytest.raises(UserError, match="feature file g.h5 is in use by another process"):
            b.__enter__()
        assert calls == [1]
    assert not p.exists()
