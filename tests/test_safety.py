"""Nothing a careless user does destroys a file: the project writes only into folders it made (a run, a
site, a model's temporary folder), never through a link it did not create, and reads no path that a
file (a cache's /filenames, a model's model.json) points outside its folder; a file that is not one of
its own is refused without loading it. Each test here failed before the matching fix."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from helpers_store import make_store
from test_browse import shapes_store, tiny_run
from test_extract import tiny_spec
from test_shipped import tiny_cache

from pipeline.config import DecoderConfig, ExportConfig, ScoreConfig, TrainConfig
from pipeline.errors import UserError
from pipeline.extraction import backbones
from pipeline.inference import export, shipped
from pipeline.training import runs
from pipeline.training.train import train

SMALL = dict(embed_dim=12, hidden_dim=12, attention_dim=12, dropout=0.0)


def _quiet(*_):
    pass


def _cfg(feats: Path, **kw) -> TrainConfig:
    return TrainConfig(**dict(dict(features=str(feats), epochs=2, batch_size=8, min_count=1, lr=3e-3, log_every=1000),
                              **kw))


@pytest.fixture
def feats(tmp_path):
    return make_store(tmp_path / "f.h5", {"train": 12, "val": 4}, L=16, C=8)


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -- 1. train --run: only a folder `pipeline train` made ------------------------------------------------
def test_train_refuses_a_folder_it_did_not_make_and_resumes_its_own(feats, tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "log.csv").write_text("day,weight\n1,70\n")
    before = _snapshot(mine)
    for resume in (False, True):
        with pytest.raises(UserError, match=r"--run .*notes: is a folder that `pipeline train` did not make "
                                            r"\(no \.pipeline-run in it\); training would overwrite"):
            train(_cfg(feats), DecoderConfig(**SMALL), mine, resume=resume, echo=_quiet)
        assert _snapshot(mine) == before                   # nothing written, not even a lock file

    run = tmp_path / "run"                                 # a run made by `pipeline train` resumes
    res = train(_cfg(feats, max_steps=1), DecoderConfig(**SMALL), run, echo=_quiet)
    assert res["step"] == 1 and (run / runs.MARKER).is_file()
    (run / runs.MARKER).unlink()                           # a run trained before the marker existed
    res = train(None, None, run, resume=True, overrides={"max_steps": 2}, echo=_quiet)
    assert res["step"] == 2 and (run / runs.MARKER).is_file()


# -- 2. planted links in a run folder: replaced, their targets untouched --------------------------------------
def test_resume_never_writes_through_planted_links(feats, tmp_path):
    run = tmp_path / "run"
    train(_cfg(feats, epochs=1), DecoderConfig(**SMALL), run, echo=_quiet)
    victims = {}
    for name in ("curves.png", "vocab.json"):
        victims[name] = tmp_path / f"precious_{name}"
        victims[name].write_bytes(b"the user's own file")
        (run / name).unlink()
        (run / name).symlink_to(victims[name])
    train(None, None, run, resume=True, overrides={"epochs": 2}, echo=_quiet)
    for name, victim in victims.items():
        assert victim.read_bytes() == b"the user's own file", name
        assert not (run / name).is_symlink() and (run / name).stat().st_size > 0, name
    assert Image.open(run / "curves.png").format == "PNG"
    assert json.loads((run / "vocab.json").read_text())["itos"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]


def test_plot_curves_replaces_a_link_at_its_name(tmp_path):
    from pipeline.training.curves import plot_curves
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": 3.0 / e, "bleu4": 0.1 * e}) + "\n"
                                           for e in (1, 2)))
    victim = tmp_path / "photo.png"
    victim.write_bytes(b"not to be touched")
    (run / "curves.png").symlink_to(victim)
    assert plot_curves(run) == run / "curves.png"
    assert victim.read_bytes() == b"not to be touched"
    assert not (run / "curves.png").is_symlink() and Image.open(run / "curves.png").format == "PNG"
    assert sorted(p.name for p in run.iterdir()) == ["curves.png", "log.jsonl"]      # no temporary left


# -- 4b. a last.pt of another run -------------------------------------------------------------------------
def test_resume_refuses_a_last_pt_of_another_run_before_writing(feats, tmp_path):
    other = tmp_path / "other"
    train(_cfg(feats, max_steps=1), DecoderConfig(**dict(SMALL, hidden_dim=16)), other, echo=_quiet)
    for epochs, against in ((1, "best.pt"), (None, "config.json")):   # with a best.pt; before the first one
        run = tmp_path / f"run_{against}"
        train(_cfg(feats, **({"epochs": epochs} if epochs else {"max_steps": 1})), DecoderConfig(**SMALL), run,
              echo=_quiet)
        shutil.copyfile(other / "last.pt", run / "last.pt")
        before = _snapshot(run)
        with pytest.raises(UserError, match=rf"last.pt: is not this run's checkpoint \(copied from another run\?\): "
                                            rf"its decoder settings .*hidden_dim=16.* \({against}: .*hidden_dim=12"):
            train(None, None, run, resume=True, overrides={"epochs": 3}, echo=_quiet)
        assert _snapshot(run) == before, against            # config.json, best.pt, logs: as they were


def _evil(path: Path, proof: Path) -> None:
    """A pickle that would create `proof` when loaded unsafely."""
    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(proof),))
    torch.save({"model": Evil()}, path)


def test_a_pickle_is_refused_in_the_projects_words(tmp_path):
    (tmp_path / "r").mkdir()
    proof = tmp_path / "it_ran"
    _evil(tmp_path / "r" / "last.pt", proof)
    with pytest.raises(UserError) as e:
        runs.load_checkpoint(tmp_path / "r" / "last.pt")
    msg = str(e.value)
    assert "cannot read checkpoint (Trying to load unsupported GLOBAL posix.mkdir whose module posix is blocked)" in msg
    assert "It is not a checkpoint this project wrote" in msg and "not loaded, as loading it could run code" in msg
    assert "weights_only" not in msg and "\n" not in msg and not proof.exists()


# -- 3. browse copies no picture from outside the image folder -------------------------------------------------
def test_browse_refuses_images_outside_their_folder_before_decoding(tmp_path, monkeypatch):
    from pipeline.inference import score
    from pipeline.reporting.browse import run_browse
    feats = shapes_store(tmp_path, 8, 2)
    run = tiny_run(feats, tmp_path / "runs" / "a")
    monkeypatch.setattr(score, "java_available", lambda: False)
    with h5py.File(feats, "r") as f:
        root, names = Path(f.attrs["dataset_root"]), [n.decode() for n in f["filenames"][()]]
        val = [n for n, s in zip(names, f["split"][()]) if s.decode() == "val"]
    secret = tmp_path / "secret.png"
    Image.new("RGB", (40, 20), (255, 0, 0)).save(secret)
    cfg = ScoreConfig(beam=1, workers=1, device="cpu", progress=False)
    image = root / val[0]
    image.unlink()
    image.symlink_to(secret)                                 # planted after extraction
    with pytest.raises(UserError, match=rf"1 of the split's 2 image paths lead outside the image folder "
                                        rf"{root / 'images'} .* e.g. '{val[0]}'"):
        run_browse(run, "val", cfg, out=tmp_path / "site", log=_quiet)
    assert not (tmp_path / "site").exists()
    image.unlink()
    Image.new("RGB", (40, 20), (0, 0, 255)).save(image)
    for edited in ("../../secret.png", str(secret)):          # /filenames edited: a '..' or an absolute path
        with h5py.File(feats, "r+") as f:
            f["filenames"][names.index(val[1])] = edited
        with pytest.raises(UserError, match="lead outside the image folder"):
            run_browse(run, "val", cfg, out=tmp_path / "site", log=_quiet)
        assert not (tmp_path / "site").exists()


def test_site_shows_a_picture_leading_out_of_its_folder_as_missing(tmp_path):
    from pipeline.reporting.browse_site import RunResult, SiteData, write_site
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (30, 30), (0, 200, 0)).save(images / "ok.jpg")
    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (30, 30), (255, 0, 0)).save(secret)
    (images / "link.jpg").symlink_to(secret)              # planted while the captions were decoded
    words = [["a", "dog"], ["a", "cat"]]
    result = RunResult("a", words, [np.full((2, 196), 1 / 196)] * 2, [None, None])
    data = SiteData("t", "val", ["1", "2"], [images / "ok.jpg", images / "link.jpg"], [["a dog"], ["a cat"]],
                    [result], image_root=images)
    lines = []
    site = write_site(data, tmp_path / "site", log=lines.append).parent
    assert sorted(p.name for p in (site / "img").iterdir()) == ["000000.jpg", "missing.jpg"]
    assert "1 picture(s) lead outside the image folder" in lines[0] and str(images / "link.jpg") in lines[0]


# -- 4a. export: a full disk is one error; no temporary folder outlives an export ---------------------------------
@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """root/ with features/tiny.h5, runs/tiny_run (one epoch) and models/tiny (exported with made-up scores:
    the scoring itself is test_shipped's)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(backbones.BACKBONES, "tiny", tiny_spec("tiny"))
        root = tmp_path_factory.mktemp("safety")
        cache = tiny_cache((root / "features").mkdir() or root / "features" / "tiny.h5")
        run = root / "runs" / "tiny_run"
        train(_cfg(cache, epochs=1, batch_size=4), DecoderConfig(**SMALL), run, echo=_quiet)
        mp.setattr(export, "_score", _fake_score)
        export.export_run(run, "tiny", ExportConfig(dtype="float32", test_split=""), ScoreConfig(),
                          root=root / "models", log=_quiet)
        yield {"root": root, "run": run, "models": root / "models"}


def _fake_score(loaded, split, scfg, features, work, log) -> dict:
    return {"metrics": {"CIDEr": 0.5, "Bleu_4": 0.25}, "split": split, "split_size": 4, "tokenizer": "test"}


def test_export_disk_full_is_one_error_and_leaves_no_folders(made, tmp_path, monkeypatch):
    monkeypatch.setitem(backbones.BACKBONES, "tiny", tiny_spec("tiny"))
    monkeypatch.setattr(export, "_score", _fake_score)
    root = tmp_path / "models"
    root.mkdir()
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())    # the folders are .NAME.export-HOST-PID-*
    dead, live, elsewhere = (root / f".tiny.export-{host}-2147483646-ab1", root / f".x.export-{host}-{os.getpid()}-c",
                             root / ".tiny.export-otherhost-2147483646-d")
    for d in (dead, live, elsewhere):
        d.mkdir()

    def full(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 192 vs 78")
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr("pipeline.fileio.free_is_low", lambda *a, **k: True)
    lines = []
    with pytest.raises(UserError, match=r"models/\.tiny\.export-[^/]+/decoder\.pt: could not be written "
                                        r"\(the disk is full; \d+ MiB free"):
        export.export_run(made["run"], "tiny", ExportConfig(dtype="float32", test_split=""), ScoreConfig(),
                          root=root, log=lines.append)
    assert sorted(p.name for p in root.iterdir()) == sorted([live.name, elsewhere.name])   # only the dead one went
    assert lines[0].startswith(f"removed {dead}: the temporary folder of an export that did not finish")


def test_export_force_replaces_only_a_model(made, tmp_path, monkeypatch):
    monkeypatch.setitem(backbones.BACKBONES, "tiny", tiny_spec("tiny"))
    monkeypatch.setattr(export, "_score", _fake_score)
    mine = tmp_path / "models" / "tiny"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"models/tiny: exists and is not a shipped model \(no model.json in it\)"):
        export.export_run(made["run"], "tiny", ExportConfig(dtype="float32", test_split=""), ScoreConfig(),
                          root=tmp_path / "models", force=True, log=_quiet)
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny"] and _snapshot(mine) == {"notes.txt": b"mine"}


# -- 4c. models/: nothing outside a model's folder is read; names are folders ------------------------------------
def _copy_model(made, dest: Path) -> Path:
    shutil.copytree(made["models"] / "tiny", dest)
    return dest


def _set_file(d: Path, key: str, rel: str, content_of: Path | None = None) -> None:
    from pipeline.provenance import sha256_file
    m = json.loads((d / "model.json").read_text())
    src = content_of or (d / rel)
    m["files"][key].update(path=rel, sha256=sha256_file(src), bytes=src.stat().st_size)
    (d / "model.json").write_text(json.dumps(m))


def test_manifest_paths_out_of_the_model_folder_are_refused(made, tmp_path):
    d = _copy_model(made, tmp_path / "m")
    outside = tmp_path / "elsewhere.pt"
    shutil.copyfile(d / "decoder.pt", outside)
    for rel in ("../elsewhere.pt", str(outside)):
        _set_file(d, "decoder", rel, outside)
        with pytest.raises(UserError, match=rf"model.json: the decoder weights file's path '{rel}' leads outside "
                                            rf"the model folder"):
            shipped.load_model(d)
    (d / "decoder.pt").unlink()
    (d / "decoder.pt").symlink_to(outside)                 # a link leading out
    _set_file(d, "decoder", "decoder.pt", outside)
    with pytest.raises(UserError, match="'decoder.pt' leads outside the model folder"):
        shipped.load_model(d)
    _set_file(d, "vocab", "/etc/passwd", made["models"] / "tiny" / "vocab.json")
    with pytest.raises(UserError) as e:
        shipped.load_model(d)
    assert "leads outside the model folder" in str(e.value) and "git checkout -- /etc/passwd" not in str(e.value)


def test_model_names_are_folders_and_never_lead_out(made, tmp_path, monkeypatch):
    models = tmp_path / "models"
    for name in ("tiny_b", "tiny_a"):                       # copies: the manifest still says "tiny"
        _copy_model(made, models / name)
    _copy_model(made, tmp_path / "elsewhere")
    monkeypatch.setenv(shipped.ENV, str(models))
    (tmp_path / "work" / "cwd").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work" / "cwd")           # models/../elsewhere exists, ./../elsewhere not
    ms = shipped.list_models()
    assert [m["name"] for m in ms] == ["tiny_a", "tiny_b"] and {m["manifest_name"] for m in ms} == {"tiny"}
    lines = shipped.format_models(ms).splitlines()[1:]
    assert [ln.split()[0] for ln in lines] == ["tiny_a", "tiny_b"] and all("model.json names it tiny" in ln for ln in lines)
    assert shipped.resolve_model("tiny_b") == models / "tiny_b"
    assert shipped.load_model("tiny_b").run_dir == models / "tiny_b"
    for bad in ("../elsewhere", "tiny_a/../../elsewhere"):
        with pytest.raises(UserError, match=rf"--model {bad}: not a folder of models/.*without '/' or '\.\.'"):
            shipped.resolve_model(bad)


def test_a_pickled_model_file_is_refused_in_the_projects_words(made, tmp_path):
    d = _copy_model(made, tmp_path / "m")
    proof = tmp_path / "it_ran"
    _evil(d / "decoder.pt", proof)
    _set_file(d, "decoder", "decoder.pt")
    with pytest.raises(UserError) as e:
        shipped.load_model(d)
    msg = str(e.value)
    assert msg.startswith(f"{d / 'decoder.pt'}: cannot read model file (Trying to load unsupported GLOBAL posix.mkdir")
    assert "It is not a model file this project wrote" in msg and "weights_only" not in msg and not proof.exists()
