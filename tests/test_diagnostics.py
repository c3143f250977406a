"""Caption diagnostics (pipeline/inference/diagnostics.py) and compute records (issue 18 parts 1 and 4).

* diversity and the gender-word diagnostic on hand-made captions and references with known answers;
* `pipeline score` puts both in scores_<split>.json and its log (a scripted decoder, a tiny cache);
* extraction and training record their compute (wall / CPU / GPU seconds); a checkpoint written
  before that keeps resuming; `pipeline report` shows it next to the scores.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_store import make_store  # noqa: E402

from pipeline.config import DecoderConfig, ScoreConfig, TrainConfig  # noqa: E402
from pipeline.data.records import Record  # noqa: E402
from pipeline.data.text import Vocab  # noqa: E402
from pipeline.inference import diagnostics as dg  # noqa: E402


# -- diversity ---------------------------------------------------------------------------------------
def test_diversity_known_values():
    caps = ["a dog runs", "a dog runs", "A cat sits on a mat.", ""]
    d = dg.diversity(caps, ["A dog runs.", "a dog runs", "a bird"])
    assert d["captions"] == 4 and d["vocab_size"] == 7                   # a dog runs cat sits on mat
    assert d["train_references"] == 2                                     # distinct after tokenisation
    assert d["novel_count"] == 2 and d["novel"] == 0.5                    # the two "a dog runs" are copies
    assert d["distinct_1"] == pytest.approx(7 / 12)                       # 3 + 3 + 6 words
    assert d["distinct_2"] == pytest.approx(7 / 9)                        # 2 + 2 + 5 bigrams, 2 + 5 distinct
    assert d["mean_length"] == 3.0                                        # 12 words / 4 captions
    assert dg.diversity(caps)["novel"] is None                            # no training references: unknown
    assert dg.diversity(["", ""])["distinct_2"] is None


# -- gender words ------------------------------------------------------------------------------------
def test_agreement_rule():
    assert dg.agreed_gender(["A man runs.", "a man's hat", "He jumps", "a dog"]) == "male"     # "man's" -> mans
    assert dg.agreed_gender(["a girl", "the girls", "a lady and her dog", "a dog"]) == "female"
    assert dg.agreed_gender(["a man", "a man", "a person", "a dog"]) is None                 # only 2 name one
    assert dg.agreed_gender(["a man", "a man", "a man", "a woman"]) is None                  # one says the other
    assert dg.agreed_gender(["a man", "a man", "a man", "a man and a woman"]) is None        # both in one
    assert dg.agreed_gender(["a boy", "a boy", "a boy"], min_agreeing=4) is None


def test_gender_diagnostic_exact_shares():
    female = ["A woman in red.", "a woman walks", "a lady walks her dog", "a dog on a leash", "a woman"]
    male = ["A boy jumps.", "a boy in the air", "a young boy jumps", "a child jumps", "a kid"]
    caps = ["a man walks a dog",         # female references, the other gender: wrong
            "a child jumps in the air",  # male references, a neutral word only: neutral
            "a woman walks a dog",       # female, right
            "a man and a woman",         # references disagree: not counted
            "a man",                     # no references (withheld): not counted
            "a dog runs"]                # only 2 references name a gender: not counted
    refs = [female, male, female, ["a man", "a woman", "a man", "a man", "a woman"], [],
            ["a man", "a man", "a dog", "a dog", "a dog"]]
    agreed, verdicts = dg.gender_verdicts(caps, refs)
    assert agreed == ["female", "male", "female", None, None, None]
    assert verdicts == ["wrong", "neutral", "right", None, None, None]
    g = dg.diagnose(caps, refs)["gender"]
    assert g["images"] == 3 and g["min_agreeing"] == dg.MIN_AGREEING == 3
    assert g["counts"] == {"right": 1, "wrong": 1, "mixed": 0, "neutral": 1, "none": 0, "other": 1}
    assert g["shares"]["other"] == g["shares"]["neutral"] == g["shares"]["right"] == pytest.approx(1 / 3)
    assert g["by_gender"]["female"]["images"] == 2 and g["by_gender"]["female"]["shares"]["wrong"] == 0.5
    assert g["by_gender"]["male"]["counts"]["neutral"] == 1 and g["by_gender"]["male"]["shares"]["neutral"] == 1.0
    # both genders named: "mixed", also counted in "other"; no person word at all: "none"
    assert dg.verdict("a man and a woman sit", "female") == "mixed"
    assert dg.verdict("a dog runs", "male") == "none" and dg.verdict("two people", "male") == "neutral"
    g2 = dg.diagnose(["a man and a girl", "a dog"], [female, male])["gender"]
    assert g2["counts"]["mixed"] == 1 and g2["counts"]["other"] == 1 and g2["counts"]["none"] == 1
    assert g2["shares"]["other"] == 0.5
    empty = dg.diagnose(["a dog"], [[]])["gender"]
    assert empty["images"] == 0 and empty["shares"]["wrong"] is None


def test_word_lists_are_disjoint_and_tokenized():
    from pipeline.data.text import tokenize
    assert not (dg.MALE & dg.FEMALE) and not (dg.NEUTRAL & (dg.MALE | dg.FEMALE))
    for w in dg.MALE | dg.FEMALE | dg.NEUTRAL:
        assert tokenize(w) == [w], w            # every listed word is one token of the training tokenizer


# -- pipeline score --------------------------------------------------------------------------------
class Scripted(torch.nn.Module):
    """Emits a fixed word list per image (image index in feats[:, 0, 0]), attention on cell 0."""

    def __init__(self, scripts: list[list[str]], vocab: Vocab):
        super().__init__()
        self.scripts, self.vocab = scripts, vocab

    def init_state(self, feats):
        return (torch.zeros(feats.size(0), dtype=torch.long), feats[:, 0, 0].long()), {"f": feats}

    def step(self, prev, state, ctx):
        t, idx = state
        logits = torch.full((prev.size(0), len(self.vocab)), -10.0)
        for b in range(prev.size(0)):
            s = self.scripts[int(idx[b])]
            logits[b, self.vocab.stoi[s[int(t[b])]] if int(t[b]) < len(s) else self.vocab.end] = 10.0
        alpha = torch.zeros(prev.size(0), 4)
        alpha[:, 0] = 1
        return torch.log_softmax(logits, 1), alpha, (t + 1, idx)


def test_score_reports_diversity_and_gender(tmp_path):
    from pipeline.cache import layout, readers
    from pipeline.inference.score import score_split
    female = ["A woman walks.", "a woman walks a dog", "the lady walks", "a dog"]
    male = ["A man sits.", "a man sits on a bench", "a guy sits", "a bench"]
    recs = [Record("t0", Path("t0.jpg"), "train", ["A man sits on a bench.", "a dog runs"]),
            Record("v0", Path("v0.jpg"), "val", female), Record("v1", Path("v1.jpg"), "val", male),
            Record("v2", Path("v2.jpg"), "val", ["a dog runs", "a dog"])]
    path = tmp_path / "f.h5"
    prov = {"backbone": "toy", "weights_sha256": "x", "preprocessing": {}, "input_size": 2, "grid": [2, 2],
            "dataset": "toy", "split_hashes": {}}
    layout.create(path, recs, prov, num_regions=4, feature_dim=2, dtype="float32")
    with h5py.File(path, "r+") as f:
        x = np.zeros((4, 4, 2), np.float32)
        x[:, 0, 0] = np.arange(4)
        f["features"][...] = x
        f["done"][...] = True
    vocab = Vocab("a man woman person sits walks on bench dog runs".split())
    scripts = [[], "a man walks".split(), "a person sits on a bench".split(), "a dog runs".split()]
    lines = []
    score_split(Scripted(scripts, vocab), vocab, readers.FeatureStore.open(path), tmp_path / "run",
                ScoreConfig(split="val", beam=1, max_len=20, progress=False, workers=1), log=lines.append)
    saved = json.loads(next((tmp_path / "run").glob("scores_val*.json")).read_text())   # named by decoding
    d = saved["diversity"]
    assert d["vocab_size"] == 9 and d["captions"] == 3 and d["mean_length"] == pytest.approx(12 / 3)
    assert d["novel"] == pytest.approx(2 / 3) and d["train_references"] == 2    # "a dog runs" is a train caption
    assert d["distinct_2"] == pytest.approx(9 / 9) and d["distinct_1"] == pytest.approx(9 / 12)
    g = saved["gender"]
    assert g["images"] == 2 and g["counts"]["wrong"] == 1 and g["counts"]["neutral"] == 1
    log = "\n".join(lines)
    assert "vocabulary 9 words, 66.7% not among the 2" in log
    assert "names the other gender 50.0% (1" in log and "a neutral word only 50.0% (1)" in log


# -- compute records ---------------------------------------------------------------------------------
def test_extraction_records_compute_over_sessions(tmp_path, monkeypatch):
    from test_extract import make_records, tiny_spec
    from pipeline.cache.layout import read_attrs
    from pipeline.extraction import backbones
    from pipeline.extraction.extract import extract
    monkeypatch.setitem(backbones.BACKBONES, "tiny", tiny_spec())
    recs = [r for r in make_records(tmp_path, n=12) if r.split]
    out = tmp_path / "f.h5"
    kw = dict(dataset="x", backbone="tiny", workers=1, batch_size=2, progress=False, device="cpu")
    first = extract(recs, out, max_batches=2, **kw)
    c1 = read_attrs(out)["compute"]
    assert c1 == first.compute and c1["sessions"] == 1 and c1["images"] == 4 == first.computed
    assert c1["wall_s"] > 0 and c1["cpu_s"] > 0 and c1["gpu_s"] == 0 and c1["devices"] == ["cpu"]
    extract(recs, out, **kw)                                  # resumed: the rest, added to the first session
    c2 = read_attrs(out)["compute"]
    assert c2["sessions"] == 2 and c2["images"] == len(recs)
    assert c2["wall_s"] > c1["wall_s"] and c2["cpu_s"] > c1["cpu_s"]


SMALL = dict(embed_dim=12, hidden_dim=12, attention_dim=12, dropout=0.3)


def _train_cfg(feats, **kw):
    return TrainConfig(**dict(dict(features=str(feats), epochs=2, batch_size=8, min_count=1, lr=3e-3,
                                   log_every=1000, device="cpu"), **kw))


def test_training_records_compute(tmp_path):
    from pipeline.training.runs import load_run
    from pipeline.training.train import train
    feats = make_store(tmp_path / "f.h5", {"train": 12, "val": 4}, L=16, C=8)
    run = tmp_path / "run"
    res = train(_train_cfg(feats), DecoderConfig(**SMALL), run, echo=lambda *_: None)
    hist = [json.loads(s) for s in (run / "log.jsonl").read_text().splitlines()]
    assert len(hist) == 2
    for h in hist:
        assert h["wall_s"] > 0 and h["cpu_s"] > 0 and h["gpu_s"] == 0 and "compute_partial" not in h
        assert h["wall_s"] >= h["train_s"]                     # the epoch's wall time includes its training
    total = load_run(run, "last").ckpt["compute"]
    assert res["compute"] == total and "unknown_before" not in total
    assert total["wall_s"] >= sum(h["wall_s"] for h in hist) - 0.02 and total["cpu_s"] > 0 and total["gpu_s"] == 0


def test_checkpoint_without_compute_keeps_resuming(tmp_path):
    """A run started before compute was recorded (its last.pt lacks `compute` and the epoch's
    counters) resumes; compute counts from the resume, marked as such."""
    from pipeline.training.runs import load_checkpoint, save_checkpoint
    from pipeline.training.train import train
    feats = make_store(tmp_path / "f.h5", {"train": 12, "val": 4}, L=16, C=8)
    run = tmp_path / "run"
    steps = train(_train_cfg(feats, epochs=1), DecoderConfig(**SMALL), run, echo=lambda *_: None)["step"]
    res = train(None, None, run, resume=True, overrides={"epochs": 3, "max_steps": steps + 1}, echo=lambda *_: None)
    assert res["stopped"] == "max-steps"                          # one batch into epoch 2
    ck = load_checkpoint(run / "last.pt")
    assert ck["epoch"] == 1 and ck["batch_in_epoch"] == 1
    del ck["compute"]                                             # as the code before this change wrote it
    for k in ("wall_s", "cpu_s", "gpu_s"):
        del ck["epoch_acc"][k]
    for h in ck["history"]:
        for k in ("wall_s", "cpu_s", "gpu_s"):
            h.pop(k)
    save_checkpoint(ck, run / "last.pt")
    res = train(None, None, run, resume=True, overrides={"max_steps": 0}, echo=lambda *_: None)
    assert res["stopped"] == "done" and res["epoch"] == 3
    c = res["compute"]
    assert c["unknown_before"] == {"epoch": 2, "batch": 1} and c["wall_s"] > 0 and c["cpu_s"] > 0
    h = res["history"]
    assert "wall_s" not in h[0]                                   # epoch 1: not recorded
    assert h[1]["compute_partial"] is True and h[1]["wall_s"] > 0  # epoch 2: only the part after the resume
    assert "compute_partial" not in h[2] and h[2]["cpu_s"] > 0


def test_report_shows_compute_and_diversity(tmp_path, monkeypatch):
    from pipeline.reporting.report import make_report
    feats = make_store(tmp_path / "f.h5", {"train": 4, "val": 2}, L=4, C=2)
    with h5py.File(feats, "r+") as f:
        f.attrs["compute"] = json.dumps({"wall_s": 600.0, "cpu_s": 1100.0, "gpu_s": 0.0})

    def fake_run(name, log, diversity=None):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"decoder": {"attention": "soft"}, "features": [
            {"path": str(feats), "provenance": {"dataset": "toy", "backbone": "vgg19"}}]}))
        (d / "log.jsonl").write_text("".join(json.dumps(dict(r, epoch=e + 1)) + "\n" for e, r in enumerate(log)))
        (d / "scores_val.json").write_text(json.dumps({"beam": 3, "metrics": {"CIDEr": 0.5},
                                                       **({"diversity": diversity} if diversity else {})}))
    fake_run("new", [{"wall_s": 1800, "cpu_s": 3600, "gpu_s": 0, "train_s": 1500, "val_s": 200}] * 3,
             {"vocab_size": 412, "novel": 0.6123, "distinct_1": 0.0412, "distinct_2": 0.1834, "mean_length": 9.43})
    fake_run("old", [{"train_s": 50, "val_s": 10}] * 3)
    fake_run("resumed", [{"train_s": 50, "val_s": 10}, {"wall_s": 120, "cpu_s": 720, "gpu_s": 0, "compute_partial": True},
                         {"wall_s": 60, "cpu_s": 360, "gpu_s": 0}])
    monkeypatch.chdir(tmp_path)
    rows = {r["run"]: r for r in make_report([], log=lambda *_: None)["rows"]}
    assert rows["new"]["minutes"] == 90 and rows["new"]["cpu_h"] == 3 and rows["new"]["extract_min"] == 10
    assert rows["old"]["cpu_h"] is None and rows["old"]["minutes"] == 3
    assert rows["resumed"]["cpu_partial"] and rows["resumed"]["cpu_h"] == pytest.approx(0.3)
    md = (tmp_path / "runs" / "report.md").read_text()
    head = next(l for l in md.splitlines() if l.startswith("| run"))
    assert head.endswith("| val vocab | val novel % | val dist-1 | val dist-2 | val len | epochs | minutes | CPU h "
                         "| kWh | extract min | extract kWh |")
    assert "| 412 | 61.2 | 0.041 | 0.183 | 9.4 | 3 | 90.0 | 3.00 | 0.0187 | 10.0 |" in md      # new: 3 CPU h x 6.25 W
    assert "| 3 | 3.0 |  |  | 10.0 |" in md                                              # old: no CPU hours
    assert "| 3 | 4.0 | ≥0.30 | ≥0.00187 | 10.0 |" in md                                  # resumed: 60 + 120 + 60 s
