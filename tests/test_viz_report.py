"""caption / report / viz and the CLI wiring of score, caption, report (toy model, fake runs)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import pipeline.inference.caption as caption_mod
from pipeline.training import runs
from pipeline.inference.caption import attention_paths, words_and_maps
from pipeline.cli import main
from pipeline.decoder.decode import Hypothesis
from pipeline.reporting.viz import attention_figure, upsample_alpha

from test_score import PROV, SCRIPTS, VOCAB, Scripted, make_store


def _fake_run(tmp_path, name, bleu, with_scores=True, attention="soft", dataset="shapes", backbones=("vgg19",)):
    """A run directory as train.py and score.py write it (config.json, log.jsonl fields, scores_val.json)."""
    d = tmp_path / "runs" / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({
        "train": {"epochs": 20}, "decoder": {"attention": attention},
        "features": [{"path": f"f_{b}.h5", "provenance": {"dataset": dataset, "backbone": b}} for b in backbones]}))
    (d / "log.jsonl").write_text("\n".join(json.dumps({"epoch": e + 1, "loss": 3 - e, "nll": 3.2 - e,
                                                       "bleu4": bleu * (e + 1) / 3, "cider": 0.3, "train_s": 50,
                                                       "val_s": 10}) for e in range(3)) + "\n")
    if with_scores:
        (d / "scores_val.json").write_text(json.dumps({"beam": 3, "metrics": {"Bleu_1": 0.6, "Bleu_4": bleu,
                                                                              "METEOR": 0.2, "ROUGE_L": 0.4,
                                                                              "CIDEr": 0.5},
                                                       "attention": {"words": 10, "mass_in_box": 0.6}}))
    return d


def test_upsample_and_attention_figure(tmp_path):
    a = np.zeros(196)
    a[0] = 1
    m = upsample_alpha(a, (14, 14))
    assert m.shape == (224, 224) and m[0, 0] == 1.0 and m[-1, -1] == 0.0
    img = Image.fromarray((np.random.rand(100, 80, 3) * 255).astype(np.uint8))
    out = attention_figure(img, ["a", "red", "circle"], np.eye(196)[[0, 5, 100]], tmp_path / "att.png")
    assert Image.open(out).size[0] > 300


def test_words_and_maps_and_paths():
    h = Hypothesis([VOCAB.stoi["a"], VOCAB.unk, VOCAB.stoi["red"], VOCAB.end], torch.eye(4, 196), -1.0)
    words, maps = words_and_maps(h, VOCAB)
    assert words == ["a", "red"] and maps.shape == (2, 196) and maps[1, 2] == 1
    assert attention_paths("o/att.png", ["x/a.jpg"]) == [__import__("pathlib").Path("o/att.png")]
    assert [p.name for p in attention_paths("o/att.png", ["x/a.jpg", "y/b.jpg", "z/b.jpg"])] == \
        ["att_a.png", "att_b_1.png", "att_b_2.png"]


def test_report_and_curves(tmp_path, monkeypatch):
    _fake_run(tmp_path, "r1", 0.2)
    _fake_run(tmp_path, "r2", 0.25, with_scores=False)
    _fake_run(tmp_path, "r3", 0.3, attention="hard", dataset="flickr8k", backbones=("vgg19", "efficientnet_lite2"))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["report", "--curves"])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "runs" / "report.md").read_text()
    assert "| r1 | shapes | vgg19 | soft | 3 | 60.00 | 20.00 |" in md and "| r2 |" in md
    assert "| 3 | 3.0 |" in md   # epochs, minutes (3 x 60 s)
    assert "| r3 | flickr8k | vgg19+efficientnet_lite2 | hard |" in md
    assert (tmp_path / "runs" / "report.png").exists() and (tmp_path / "runs" / "r1" / "curves.png").exists()
    assert "SPICE" not in md                     # no run has SPICE: no column
    sc = tmp_path / "runs" / "r1" / "scores_val.json"
    sc.write_text(json.dumps(dict(json.loads(sc.read_text()), metrics={"Bleu_4": 0.2, "SPICE": 0.131})))
    assert CliRunner().invoke(main, ["report", "runs/r1", "runs/r2"]).exit_code == 0
    md = (tmp_path / "runs" / "report.md").read_text()
    assert "val SPICE" in md and "| 13.10 |" in md
    res = CliRunner().invoke(main, ["report", "nope"])
    assert res.exit_code == 2 and "not a directory" in res.output


def _patch_run(monkeypatch, tmp_path):
    path = tmp_path / "f.h5"
    make_store(path)
    run = tmp_path / "runs" / "toy"
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(b"")
    ckpt = {"features": [{"path": str(path), "provenance": PROV}], "epoch": 1, "num_regions": 196, "feature_dim": 4}
    fake = lambda run_dir, which=None, device="cpu", log=print: runs.LoadedRun(   # noqa: E731
        runs.resolve_run(run_dir), Scripted(SCRIPTS), VOCAB, ckpt, "best")
    monkeypatch.setattr(runs, "load_run", fake)
    return run


@pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer/METEOR need java")
def test_cli_score(tmp_path, monkeypatch):
    run = _patch_run(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["score", "--split", "val", "--beam", "3", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "Bleu_4" in res.output and "attention accuracy" in res.output and "SPICE" in res.output
    assert json.loads((run / "scores_val.json").read_text())["run"] == str(run.relative_to(tmp_path))
    res = CliRunner().invoke(main, ["score", "--split", "val", "--features", "missing.h5"])
    assert res.exit_code == 2 and "missing.h5" in res.output


def test_cli_caption_with_attention(tmp_path, monkeypatch):
    run = _patch_run(monkeypatch, tmp_path)
    feats = np.zeros((2, 196, 4), np.float32)
    feats[:, 0, 0] = [0, 1]

    class FakeEncoder:                      # the backbone of the run's provenance, faked
        def __init__(self, provenances, **kw):
            assert provenances == [PROV]

        def __call__(self, images, batch_size=16):
            return feats[:len(images)]
    monkeypatch.setattr(caption_mod, "Encoder", FakeEncoder)
    imgs = []
    for i in range(2):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(np.full((224, 224, 3), 40 * i, np.uint8)).save(p)
        imgs.append(str(p))
    res = CliRunner().invoke(main, ["caption", *imgs, "--run", str(run), "--attention", str(tmp_path / "att.png"),
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert f"{imgs[0]}\ta red circle" in res.output and f"{imgs[1]}\ta blue square and" in res.output
    assert (tmp_path / "att_im0.png").exists() and (tmp_path / "att_im1.png").exists()
    res = CliRunner().invoke(main, ["caption", str(tmp_path / "nope.jpg"), "--run", str(run)])
    assert res.exit_code == 2 and "no such image" in res.output
