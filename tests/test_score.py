"""Scoring on a tiny HDF5 store with a scripted toy model (no dependency on model.py / train.py)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline.cache import layout, readers
from pipeline.errors import UserError
from pipeline.data.records import Record
from pipeline.training import runs
from pipeline.training.runs import latest_run, open_run_features
from pipeline.inference.score import ScoreConfig, attention_accuracy, cell_overlap, coco_id, score_split
from pipeline.data.text import Vocab

PROV = {"backbone": "toy", "weights_sha256": "x", "preprocessing": {"resize": 224}, "input_size": 224,
        "grid": [14, 14], "dataset": "shapes", "split_hashes": {}}
VOCAB = Vocab(["a", "red", "circle", "blue", "square", "and"])
TL, BR = [0, 0, 112, 112], [112, 112, 224, 224]     # top-left / bottom-right quadrants


class Scripted(torch.nn.Module):
    """Emits a fixed caption per image (image index in feats[:, 0, 0]) with attention on one given cell."""

    def __init__(self, scripts):   # scripts: per image list of (word, cell)
        super().__init__()
        self.scripts = scripts

    def init_state(self, feats):
        return (torch.zeros(feats.size(0), dtype=torch.long), feats[:, 0, 0].long()), {"f": feats}

    def step(self, prev, state, ctx):
        t, idx = state
        B, V = prev.size(0), len(VOCAB)
        logits = torch.full((B, V), -10.0)
        alpha = torch.zeros(B, 196)
        for b in range(B):
            script = self.scripts[int(idx[b])]
            w, cell = script[int(t[b])] if int(t[b]) < len(script) else ("<end>", 0)
            logits[b, VOCAB.stoi[w]] = 10.0
            alpha[b, cell] = 1.0
        return torch.log_softmax(logits, 1), alpha, (t + 1, idx)


def make_store(path: Path, caps_test: bool = True) -> readers.FeatureStore:
    recs = [
        Record("0", Path("0.png"), "val", ["A red circle.", "a red circle", "red circle on a square"],
               [{"color": "red", "shape": "circle", "box": TL}, {"color": "blue", "shape": "square", "box": BR}]),
        Record("1", Path("1.png"), "val", ["A blue square and a red circle."],
               [{"color": "blue", "shape": "square", "box": BR}, {"color": "red", "shape": "circle", "box": TL}]),
        Record("2", Path("2.png"), "test", ["a blue square"] if caps_test else [],
               [{"color": "blue", "shape": "square", "box": BR}]),
    ]
    layout.create(path, recs, PROV, num_regions=196, feature_dim=4, dtype="float32")
    with h5py.File(path, "r+") as f:
        x = np.zeros((3, 196, 4), np.float32)
        x[:, 0, 0] = np.arange(3)
        f["features"][...] = x
        f["done"][...] = True
    return readers.FeatureStore.open(path)


# cell 0 = top-left corner (inside TL); cell 195 = bottom-right corner (inside BR)
SCRIPTS = [
    [("a", 0), ("red", 0), ("circle", 0)],                  # both object words attend inside their box
    [("a", 0), ("blue", 0), ("square", 195), ("and", 0)],   # "blue" misses, "square" hits
    [("a", 0), ("red", 0), ("square", 195)],                # "red" names nothing in image 2
]


def test_cell_overlap_and_attention_accuracy():
    cov = cell_overlap([[0, 0, 24, 16]], (14, 14), (224, 224))
    assert cov[0, 0] == 1.0 and cov[0, 1] == 0.5 and cov[1, 0] == 0.0 and cov.sum() == pytest.approx(1.5)
    # union of two boxes
    assert cell_overlap([TL, BR], (14, 14), (224, 224)).mean() == pytest.approx(0.5)
    words = [[w for w, _ in s] for s in SCRIPTS]
    alphas = [np.eye(196)[[c for _, c in s]] for s in SCRIPTS]
    objs = [[{"color": "red", "shape": "circle", "box": TL}],
            [{"color": "blue", "shape": "square", "box": BR}],
            [{"color": "blue", "shape": "square", "box": BR}]]
    res = attention_accuracy(words, alphas, objs)
    assert res.words == 5 and res.not_in_image == 1
    assert res.mass_in_box == pytest.approx(4 / 5) and res.argmax_hit == pytest.approx(4 / 5)
    assert res.chance_mass == pytest.approx(0.25)
    assert res.by_kind["color"]["words"] == 2 and res.by_kind["color"]["mass_in_box"] == pytest.approx(0.5)
    # ambiguous word: two red objects -> union of boxes
    two_red = [[{"color": "red", "shape": "circle", "box": TL}, {"color": "red", "shape": "star", "box": BR}]]
    res = attention_accuracy([["red", "circles"]], [np.eye(196)[[195, 0]]], two_red)
    assert res.ambiguous == 1 and res.mass_in_box == 1.0 and res.chance_mass == pytest.approx(0.375)


@pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer/METEOR need java: apt-get install default-jre-headless")
def test_score_split_end_to_end(tmp_path):
    store = make_store(tmp_path / "f.h5")
    cfg = ScoreConfig(split="val", beam=2, progress=False)
    scores = score_split(Scripted(SCRIPTS), VOCAB, store, tmp_path / "run", cfg, log=lambda *a: None)
    res = json.loads(runs.results_path(tmp_path / "run", "val", cfg).read_text())
    assert res == [{"image_id": 0, "caption": "a red circle"}, {"image_id": 1, "caption": "a blue square and"}]
    saved = json.loads(runs.scores_path(tmp_path / "run", "val", cfg).read_text())
    assert saved["num_scored"] == 2 and saved["split_size"] == 2
    m = saved["metrics"]
    assert set(m) >= {"Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert 0.5 < m["Bleu_1"] < 1 and m["CIDEr"] > 0   # image 0 matches a reference exactly after PTB tokenization
    att = saved["attention"]
    assert att["words"] == 4 and att["mass_in_box"] == pytest.approx(0.75) and att["chance_mass"] == pytest.approx(0.25)
    assert scores["metrics"] == m


def test_split_without_references(tmp_path):
    store = make_store(tmp_path / "f.h5", caps_test=False)
    lines = []
    cfg = ScoreConfig(split="test", beam=1, progress=False)
    scores = score_split(Scripted(SCRIPTS), VOCAB, store, tmp_path / "run", cfg, log=lines.append)
    assert scores["num_scored"] == 0 and any("no reference captions" in l for l in lines)
    assert json.loads(runs.results_path(tmp_path / "run", "test", cfg).read_text()) == \
        [{"image_id": 2, "caption": "a red square"}]
    with pytest.raises(UserError, match="has no images"):
        score_split(Scripted(SCRIPTS), VOCAB, store, tmp_path / "run", ScoreConfig(split="train"))


def test_provenance_mismatch_and_latest_run(tmp_path, monkeypatch):
    path = tmp_path / "f.h5"
    make_store(path)
    ckpt = {"features": [{"path": str(path), "provenance": PROV}], "num_regions": 196, "feature_dim": 4}
    assert open_run_features(ckpt, tmp_path).path == path
    with pytest.raises(UserError, match="backbone"):
        open_run_features(dict(ckpt, features=[{"path": str(path), "provenance": dict(PROV, backbone="resnet")}]),
                          tmp_path)
    with pytest.raises(UserError, match="trained on 196x8"):
        open_run_features(dict(ckpt, feature_dim=8), tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no trained run"):
        latest_run()
    for i, (name, file) in enumerate([("b", "best.pt"), ("a", "best.pt"), ("c", "last.pt")]):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / file).write_bytes(b"")
        os.utime(tmp_path / "runs" / name / file, (time.time() + i, time.time() + i))
        # a run whose only checkpoint is last.pt (no epoch finished yet) is a run too
        assert latest_run().name == name
    assert coco_id("123") == 123 and coco_id("x.jpg") == "x.jpg"


# ---- ensembles ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Three tiny trained runs: two on one cache (other seeds), one on another backbone's cache of the same
    images, and one on other images."""
    from helpers_store import make_store
    from pipeline.config import DecoderConfig, TrainConfig
    from pipeline.training.train import train
    d = tmp_path_factory.mktemp("ens")
    a = make_store(d / "a.h5", {"train": 16, "val": 4}, L=16, C=8)
    b = make_store(d / "b.h5", {"train": 16, "val": 4}, L=16, C=6, backbone="other-net", seed=5)
    c = make_store(d / "c.h5", {"train": 16, "val": 4}, L=16, C=8, dataset="other-images")
    runs_ = {}
    for name, feats, seed in (("a1", a, 0), ("a2", a, 1), ("b", b, 0), ("c", c, 0)):
        cfg = TrainConfig(features=str(feats), epochs=2, batch_size=8, min_count=1, lr=3e-3, seed=seed)
        train(cfg, DecoderConfig(embed_dim=12, hidden_dim=12, attention_dim=12, dropout=0.0, embed_dropout=0.0, context_dropout=0.0, hidden_dropout=0.0), d / name,
              echo=lambda s: None)
        runs_[name] = d / name
    return runs_


def test_ensemble_of_one_run_is_that_run(tiny_runs):
    from pipeline.training import runs
    from pipeline.decoder.decode import Ensemble
    from pipeline.inference.score import decode_split
    cfg = ScoreConfig(split="val", beam=3, progress=False, workers=1)
    one = runs.load_run(tiny_runs["a1"])
    d1 = decode_split([one], "val", cfg)
    ens = Ensemble([one.model])
    x = torch.randn(3, 16, 8)
    s1, c1 = one.model.init_state(x)
    s2, c2 = ens.init_state(x)
    prev = torch.tensor([1, 1, 1])
    torch.testing.assert_close(ens.step(prev, s2, c2)[0], one.model.step(prev, s1, c1)[0], rtol=0, atol=0)
    twice = decode_split([one, runs.load_run(tiny_runs["a1"])], "val", cfg)   # a run with itself: same captions
    assert d1.captions == twice.captions and [h.tokens for h in d1.hyps] == [h.tokens for h in twice.hyps]


def test_ensemble_mixes_backbones_of_the_same_images_and_refuses_other_data(tiny_runs, tmp_path):
    from pipeline.training import runs
    from pipeline.inference.score import decode_split, run_score
    cfg = ScoreConfig(split="val", beam=2, progress=False, workers=1)
    a1, b = runs.load_run(tiny_runs["a1"]), runs.load_run(tiny_runs["b"])
    d = decode_split([a1, runs.load_run(tiny_runs["a2"]), b], "val", cfg)   # b reads its own cache
    assert len(d.hyps) == 4 and len(d.store.paths) == 1
    with pytest.raises(UserError, match="made from different data.*dataset"):
        decode_split([a1, runs.load_run(tiny_runs["c"])], "val", cfg)
    lines = []
    scores = run_score([tiny_runs["a1"], tiny_runs["b"]], cfg, log=lines.append)
    out = tiny_runs["a1"].parent / "ensemble_a1+b"
    assert scores["runs"] == [str(tiny_runs["a1"]), str(tiny_runs["b"])] and runs.scores_path(out, "val", cfg).exists()
    assert json.loads(runs.results_path(out, "val", cfg).read_text())[0]["image_id"] == "img00016"


def test_ensemble_refuses_other_vocabularies(tiny_runs, monkeypatch):
    from pipeline.training import runs
    from pipeline.inference.score import decode_split
    a1 = runs.load_run(tiny_runs["a1"])
    other = runs.load_run(tiny_runs["a2"])
    other.vocab = Vocab(other.vocab.itos[4:] + ["extra"])
    with pytest.raises(UserError, match="vocabularies differ"):
        decode_split([a1, other], "val", ScoreConfig(progress=False))


# ---- files per decoding, and the faults of `pipeline score` (issue 20) -------------------------------

def test_files_are_named_by_every_setting_that_changes_the_captions():
    from dataclasses import fields
    assert {f.name for f in fields(ScoreConfig)} == {f for f, *_ in runs.DECODING} | set(runs.NOT_DECODING), \
        "a ScoreConfig field must join runs.DECODING (it changes captions) or runs.NOT_DECODING"
    today = dict(beam=3, length_norm=0.7, max_len=0, block_trigrams=True, suppress_unk=True, remove_bad_endings=False,
                 hard_context="expected")
    assert runs.decoding_name(ScoreConfig(**today)) == runs.decoding_name(today) == "beam3_ln0.7"
    assert runs.decoding_name(dict(today, beam=5, length_norm=0.0, max_len=30, remove_bad_endings=True,
                                   block_trigrams=False, hard_context="argmax")) == \
        "beam5_ln0_len30_noblocktri_rmbadend_ctxargmax"
    # a scores file from before a setting existed decoded without it: no length norm, 20 words, nothing masked
    assert runs.decoding_name({"beam": 1}) == "beam1_ln0_len20_noblocktri_nomaskunk"
    assert runs.results_path(Path("r"), "val", today) == Path("r/results_val.beam3_ln0.7.json")


def test_two_decodings_keep_two_pairs_of_files(tmp_path):
    """`pipeline score` overwrote results_<split>.json / scores_<split>.json whatever the beam or length norm."""
    store = make_store(tmp_path / "f.h5", caps_test=False)
    run = tmp_path / "run"
    cfgs = [ScoreConfig(split="test", beam=1, length_norm=0.0, max_len=20, progress=False),
            ScoreConfig(split="test", beam=2, length_norm=0.7, max_len=20, progress=False)]
    for cfg in cfgs:
        score_split(Scripted(SCRIPTS), VOCAB, store, run, cfg, log=lambda *a: None)
    names = [runs.decoding_name(c) for c in cfgs]
    assert names[0].startswith("beam1_ln0") and names[1].startswith("beam2_ln0.7") and names[0] != names[1]
    assert sorted(p.name for p in run.iterdir()) == sorted(f"{kind}_test.{n}.json" for kind in ("results", "scores")
                                                          for n in names)
    found = runs.scored_decodings(run)
    assert [(sp, n, s["beam"], s["length_norm"]) for sp, n, s, _ in found] == \
        [("test", names[0], 1, 0.0), ("test", names[1], 2, 0.7)]
    assert runs.find_results(run, "test", cfgs[1]) == runs.results_path(run, "test", cfgs[1])
    assert runs.read_results(runs.find_results(run, "test", cfgs[0])) == {"2": "a red square"}


def test_results_of_a_run_scored_before_the_names_are_found(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / "results_val.json").write_text(json.dumps([{"image_id": 7, "caption": "a dog"}]))
    (run / "scores_val.json").write_text(json.dumps({"beam": 3, "length_norm": 0.0, "metrics": {"Bleu_4": 0.2}}))
    assert [(sp, n) for sp, n, _, _ in runs.scored_decodings(run)] == [("val", "beam3_ln0_len20_noblocktri_nomaskunk")]
    assert runs.find_results(run, "val", {"beam": 3, "length_norm": 0.0}) == run / "results_val.json"
    assert runs.find_results(run, "val", {"beam": 5, "length_norm": 0.0}) is None
    assert runs.read_results(run / "results_val.json") == {"7": "a dog"}


def test_results_are_written_atomically(tmp_path):
    """score wrote results without the atomic writer: a full disk left a truncated `.tmp` and a traceback."""
    import resource
    import signal
    from pipeline.inference.score import write_results
    out = tmp_path / "results_val.beam3_ln0.json"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))        # files stop growing at 64 bytes, as on a full disk
    try:
        with pytest.raises(UserError, match=r"results_val\.beam3_ln0\.json: could not be written"):
            write_results(out, [str(i) for i in range(50)], ["a red circle"] * 50)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert list(tmp_path.iterdir()) == []


def test_score_refuses_a_run_given_twice(tiny_runs):
    from click.testing import CliRunner
    from pipeline.cli import main
    a1 = tiny_runs["a1"]
    res = CliRunner().invoke(main, ["score", "--run", str(a1), "--run", str(tiny_runs["b"]), "--run", f"{a1}/../a1"])
    assert res.exit_code == 2, res.output
    assert res.output == f"error: --run {a1}/../a1: given twice (as --run {a1}); an ensemble of a run with itself is " \
                         f"that run. Give each run once.\n"
