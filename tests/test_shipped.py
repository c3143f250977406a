"""Shipped models (pipeline/inference/shipped.py, export.py): the models/<name>/ format, its checks, and
score / caption / browse / models with --model. A tiny run (tiny backbone of test_extract, a cache made
with helpers_store) is exported once per module; the real models under models/ reproduce their cards
in tests/test_shipped_real.py (skips without them or ../shared)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from helpers_store import make_store
from test_extract import tiny_spec

from pipeline.cli import main
from pipeline.config import DecoderConfig, ExportConfig, ScoreConfig, TrainConfig
from pipeline.errors import UserError
from pipeline.extraction import backbones
from pipeline.inference import shipped
from pipeline.inference.export import export_run
from pipeline.provenance import sha256_file

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "flickr8k"
QUIET = dict(workers=1, progress=False, device="cpu", beam=2)


def tiny_cache(path: Path) -> Path:
    """A helpers_store cache whose provenance is the tiny backbone's (so new images can be captioned)."""
    make_store(path, {"train": 12, "val": 4, "test": 4}, C=8, backbone="tiny")
    with h5py.File(path, "r+") as f:
        f.attrs["weights_sha256"] = "tiny-seed0"
        f.attrs["preprocessing"] = json.dumps(backbones.BACKBONES["tiny"].preprocessing, sort_keys=True)
        f.attrs["input_size"] = json.dumps([28, 28])
    return path


def no_java(mp) -> None:
    """Score with the Python tokenizer, without METEOR and SPICE: no JVM starts (slow on 2 shared cores);
    the scores are then consistent between export and score, which is all these tests compare."""
    from pipeline.inference import score
    mp.setattr(score, "java_available", lambda: False)
    mp.setattr(score, "spice_available", lambda: False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """root/ with features/tiny.h5, runs/tiny_run, models/tiny (auto dtype) and models/tiny32 (float32)."""
    with pytest.MonkeyPatch.context() as mp:
        no_java(mp)
        yield from _tiny(tmp_path_factory)


def _tiny(tmp_path_factory):
    from pipeline.training.train import train
    saved = dict(backbones.BACKBONES)
    backbones.BACKBONES["tiny"] = tiny_spec("tiny")
    root = tmp_path_factory.mktemp("shipped")
    cache = tiny_cache((root / "features").mkdir() or root / "features" / "tiny.h5")
    dcfg = DecoderConfig(embed_dim=8, hidden_dim=8, attention_dim=8, dropout=0.0, embed_dropout=0.0,
                         context_dropout=0.0, hidden_dropout=0.0)
    run = root / "runs" / "tiny_run"
    train(TrainConfig(features=(str(cache),), epochs=2, batch_size=4, min_count=1, lr=1e-2), dcfg, run,
          echo=lambda s: None)
    models = root / "models"
    quiet = lambda *a: None   # noqa: E731
    export_run(run, "tiny", ExportConfig(), ScoreConfig(**QUIET), root=models, log=quiet)
    export_run(run, "tiny32", ExportConfig(dtype="float32"), ScoreConfig(**QUIET), root=models, log=quiet)
    yield {"root": root, "cache": cache, "run": run, "models": models}
    backbones.BACKBONES.clear()
    backbones.BACKBONES.update(saved)


@pytest.fixture
def here(tiny, monkeypatch):
    """cwd = the fixture's root (features/ and runs/ relative), $PIPELINE_MODELS = its models/."""
    no_java(monkeypatch)
    monkeypatch.chdir(tiny["root"])
    monkeypatch.setenv(shipped.ENV, str(tiny["models"]))
    return tiny


def cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.output


# -- the format -----------------------------------------------------------------------------------------
def test_export_writes_weights_only_with_checksums_provenance_and_scores(tiny):
    d = tiny["models"] / "tiny"
    m = json.loads((d / "model.json").read_text())
    assert sorted(p.name for p in d.iterdir()) == ["README.md", "decoder.pt", "model.json", "test_decoding.json",
                                                   "vocab.json"]
    assert d.stat().st_mode & 0o777 == 0o755          # readable by everyone, as git checks it out (mkdtemp: 0700)
    assert m["format"] == shipped.FORMAT and m["format_version"] == shipped.FORMAT_VERSION
    for e in m["files"].values():                       # every file's sha256 and size recorded
        assert e["sha256"] == sha256_file(d / e["path"]) and e["bytes"] == (d / e["path"]).stat().st_size
    ckpt = torch.load(tiny["run"] / "best.pt", weights_only=True)
    sd = torch.load(d / "decoder.pt", weights_only=True)
    assert set(sd) == set(ckpt["model"]) and all(torch.is_tensor(v) for v in sd.values())   # no optimizer, RNG
    s = m["scores"]
    # auto: fp16 kept only when every val metric is within 0.1 (x100) of fp32
    gap = max(100 * abs(s["float16"]["metrics"][k] - v) for k, v in s["float32"]["metrics"].items())
    assert s["stored"] == ("float16" if gap <= 0.1 else "float32") == m["files"]["decoder"]["dtype"]
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {getattr(torch, s["stored"])}
    for k, v in sd.items():
        assert torch.equal(v, ckpt["model"][k].to(v.dtype))
    prov = m["features"][0]["provenance"]
    assert prov == ckpt["features"][0]["provenance"] and prov["weights_sha256"] == "tiny-seed0"
    assert m["features"][0]["extract"].startswith("pipeline extract --dataset test-structured --backbone tiny")
    assert set(s["float32"]["metrics"]) >= {"Bleu_4", "CIDEr", "ROUGE_L"} and s["images"] == 4
    assert m["test_decoding"]["images"] == 4
    assert len(json.loads((d / "test_decoding.json").read_text())) == 4
    card = (d / "README.md").read_text()
    assert "$" not in card.replace("$PIPELINE", "")   # every placeholder filled
    assert f"{100 * s['float32']['metrics']['CIDEr']:.2f}" in card and m["source"]["train_command"] in card
    assert "--epochs 2" in m["source"]["train_command"] and "--min-count 1" in m["source"]["train_command"]
    assert s["command"] in card and "Hodosh" not in card           # the dataset's terms: not Flickr8k's here


def test_fp32_export_decodes_exactly_as_the_run(tiny):
    from pipeline.decoder.decode import beam_search
    from pipeline.training.runs import load_run
    run, model = load_run(tiny["run"], log=lambda *_: None), shipped.load_model(tiny["models"] / "tiny32")
    assert model.which == "shipped" and model.vocab == run.vocab
    x = torch.randn(3, 196, 8)
    a, b = beam_search(run.model, x, beam=3, max_len=8), beam_search(model.model, x, beam=3, max_len=8)
    assert [h.tokens for h in a] == [h.tokens for h in b] and [h.score for h in a] == [h.score for h in b]


def test_corrupted_or_truncated_weights_are_one_clear_error(tiny, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny["models"] / "tiny", d)
    shipped.load_model(d)                                        # intact: loads
    w = d / "decoder.pt"
    good = w.read_bytes()
    w.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    with pytest.raises(UserError, match=r"decoder.pt: sha256 .* corrupted: .*git checkout"):
        shipped.load_model(d)
    w.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match=r"decoder weights file is truncated: \d+ bytes, the manifest says \d+"):
        shipped.load_model(d)
    code, out = cli("caption", "--model", d, "x.jpg")            # the command line: one line, exit 2
    assert code == 2 and out.count("\n") == 1 and "truncated" in out
    w.unlink()
    with pytest.raises(UserError, match="decoder weights file is missing"):
        shipped.load_model(d)
    w.write_bytes(good)
    (d / "vocab.json").write_text("{}")
    with pytest.raises(UserError, match="vocab.json: sha256 .* vocabulary file is truncated: 2 bytes"):
        shipped.load_model(d)


def test_manifest_versions_and_names(tiny, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny["models"] / "tiny", d)
    m = json.loads((d / "model.json").read_text())
    (d / "model.json").write_text(json.dumps({**m, "format_version": shipped.FORMAT_VERSION + 1}))
    with pytest.raises(UserError, match="newer than this code"):
        shipped.load_model(d)
    with pytest.raises(UserError, match="no shipped model of that name"):
        shipped.load_model("no_such_model")
    for bad in ("", "Tiny", "../x", "a b"):
        with pytest.raises(UserError, match="model name"):
            shipped.check_name(bad)


def test_export_refuses_large_files_and_existing_models_leaving_nothing_behind(tiny, tmp_path, monkeypatch):
    no_java(monkeypatch)
    root = tmp_path / "models"
    with pytest.raises(UserError, match=r"models/big/\S+ would be [\d.]+ MB, over the 0.001 MB allowed per file"):
        export_run(tiny["run"], "big", ExportConfig(max_file_mb=0.001, dtype="float32"), ScoreConfig(**QUIET),
                   root=root, log=lambda *_: None)
    assert list(root.iterdir()) == []                            # no partial model, no temporary folder
    shutil.copytree(tiny["models"] / "tiny32", root / "tiny32")
    with pytest.raises(UserError, match="exists; pass --force"):
        export_run(tiny["run"], "tiny32", ExportConfig(), ScoreConfig(**QUIET), root=root, log=lambda *_: None)


# -- using them ---------------------------------------------------------------------------------------
def test_models_lists_val_scores_best_first(here):
    code, out = cli("models")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["model", "backbone", "dtype"]
    ms = shipped.list_models()
    assert [ln.split()[0] for ln in lines[1:]] == [m["name"] for m in ms] and len(ms) == 2
    cider = 100 * shipped.val_metric(ms[0])
    assert f"{cider:7.2f}" in lines[1] and shipped.val_metric(ms[0]) >= shipped.val_metric(ms[1])


def test_score_with_model_reproduces_the_card_and_needs_the_cache(here, monkeypatch):
    m = shipped.read_manifest(here["models"] / "tiny")
    args = m["scores"]["command"].split()[2:] + ["--workers", "1", "--device", "cpu"]
    code, out = cli("score", *args)
    assert code == 0, out
    res = sorted((here["root"] / "runs" / "model_tiny").glob("scores_val*.json"))
    got = json.loads(res[-1].read_text())["metrics"]
    assert got == pytest.approx(m["scores"][m["scores"]["stored"]]["metrics"], abs=1e-9)
    assert not list((here["models"] / "tiny").glob("scores_*"))       # never written into models/
    monkeypatch.chdir(here["root"] / "runs")                           # the cache is not found from here
    code, out = cli("score", "--model", "tiny", "--split", "val", "--workers", "1")
    assert code == 2 and "Make them with `pipeline extract --dataset test-structured --backbone tiny" in out


def test_a_lone_model_decodes_with_its_chosen_beam_and_length_norm_unless_told(here, tmp_path, monkeypatch):
    assert json.loads((here["models"] / "tiny" / "model.json").read_text())["decoding"] == {
        "beam": 2, "length_norm": 0.7, "chosen": shipped.read_manifest(here["models"] / "tiny")["decoding"]["chosen"]}
    models = tmp_path / "models"
    shutil.copytree(here["models"] / "tiny", models / "tiny")
    m = json.loads((models / "tiny" / "model.json").read_text())
    m["decoding"] = {"beam": 2, "length_norm": 0.3}
    (models / "tiny" / "model.json").write_text(json.dumps(m))
    monkeypatch.setenv(shipped.ENV, str(models))
    tiny = shipped.ModelRef("tiny")
    assert shipped.chosen_decoding([], [tiny]) == {"beam": 2, "length_norm": 0.3}
    assert shipped.chosen_decoding([here["run"]], [tiny]) == {}                      # an ensemble: the defaults
    assert shipped.chosen_decoding([], [shipped.ModelRef("tiny32")]) == {}          # not in this folder: no choice
    out_dir = here["root"] / "runs" / "model_tiny"
    shutil.rmtree(out_dir, ignore_errors=True)
    assert cli("score", "--model", "tiny", "--split", "val", "--workers", "1")[0] == 0
    assert cli("score", "--model", "tiny", "--split", "val", "--workers", "1", "--length-norm", "0.5")[0] == 0
    assert sorted(p.name for p in out_dir.glob("scores_val*.json")) == ["scores_val.beam2_ln0.3.json",
                                                                       "scores_val.beam2_ln0.5.json"]


def test_a_lone_run_decodes_with_the_decoding_its_training_recorded(here, tmp_path):
    run = here["run"]
    assert shipped.chosen_decoding([run], []) == {"beam": 5, "length_norm": 0.9}      # the xe recipe's, saved
    assert shipped.chosen_decoding([], []) == {"beam": 5, "length_norm": 0.9}         # the newest run under runs/
    old = tmp_path / "old_run"                                     # a run saved before it recorded a decoding
    shutil.copytree(run, old)
    cfg = json.loads((old / "config.json").read_text())
    for k in ("decode_beam", "decode_length_norm"):
        del cfg["train"][k]
    (old / "config.json").write_text(json.dumps(cfg))
    assert shipped.chosen_decoding([old], []) == {"beam": 3, "length_norm": 0.7}      # as it was scored then
    for f in run.glob("scores_val.*.json"):
        f.unlink()
    assert cli("score", "--run", run, "--split", "val", "--workers", "1")[0] == 0
    assert cli("score", "--run", run, "--split", "val", "--workers", "1", "--beam", "2")[0] == 0
    assert sorted(p.name for p in run.glob("scores_val.*.json")) == ["scores_val.beam2_ln0.9.json",
                                                                   "scores_val.beam5_ln0.9.json"]
    assert TrainConfig(objective="scst", init_from="x").decode_beam == 3               # SCST's: beam 3 / 0.7


def test_ensemble_of_a_run_and_its_fp32_export_decodes_as_the_run(here):
    from pipeline.inference.score import decode_split
    from pipeline.training.runs import load_run
    cfg = ScoreConfig(**QUIET)
    run = load_run(here["run"], log=lambda *_: None)
    alone = decode_split([run], "val", cfg, log=lambda *_: None)
    pair = decode_split([run, shipped.load_member(shipped.ModelRef("tiny32"))], "val", cfg, log=lambda *_: None)
    assert [h.tokens for h in alone.hyps] == [h.tokens for h in pair.hyps]
    code, out = cli("score", "--run", here["run"], "--model", "tiny32", "--split", "val", "--workers", "1",
                    "--beam", "2")
    assert code == 0 and list((here["root"] / "runs").glob("ensemble_tiny_run+tiny32/scores_val*.json"))


def test_caption_without_runs_uses_the_best_shipped_model_whose_backbone_is_here(here, tmp_path, monkeypatch):
    img = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img)
    models = tmp_path / "models"
    for name in ("tiny", "tiny32"):
        shutil.copytree(here["models"] / name, models / name)
    # tiny32 claims the better score but needs a backbone that is not here: tiny is used, said in one line
    m = json.loads((models / "tiny32" / "model.json").read_text())
    m["features"][0]["provenance"]["backbone"] = "tiny_absent"
    m["scores"]["float32"]["metrics"]["CIDEr"] = 9.0
    (models / "tiny32" / "model.json").write_text(json.dumps(m))
    monkeypatch.setenv(shipped.ENV, str(models))
    monkeypatch.chdir(tmp_path)                                        # no runs/ here
    code, out = cli("caption", img, "--device", "cpu")
    lines = out.splitlines()
    assert code == 0 and lines[-1].startswith(f"{img}\t"), out
    assert lines[0].startswith("no trained run under runs/: captioning with the shipped model tiny (tiny, val CIDEr")
    assert len(lines) == 2, out       # one line says which model; no note about the cache a shipped model lacks
    code, out = cli("caption", img, "--model", "tiny32", "--device", "cpu")
    assert code == 2 and "unknown backbone 'tiny_absent'" in out
    shutil.rmtree(models / "tiny")
    code, out = cli("caption", img)
    assert code == 2 and "no shipped model's backbone weights are here: tiny32:" in out and "make weights" in out


@pytest.mark.slow
def test_browse_with_a_model_writes_under_runs(here):
    code, out = cli("browse", "--model", "tiny", "--split", "val", "--workers", "1", "--beam", "2")
    assert code == 0, out
    assert (here["root"] / "runs" / "model_tiny" / "browse_val" / "index.html").is_file()


def test_train_init_from_a_shipped_model_starts_from_its_weights_and_vocabulary(here):
    """`pipeline train --init-from NAME`: a models/ name (no run of that name) starts a new run from the shipped
    weights, decoder settings and vocabulary, recorded in config.json; a run directory is not taken for a model."""
    from pipeline.training.runs import load_run
    code, out = cli("train", "--features", "features/tiny.h5", "--init-from", "tiny32", "--epochs", "1",
                    "--batch-size", "4", "--lr", "1e-12", "--run", "runs/from_tiny32", "--threads", "1")
    assert code == 0, out
    run, model = load_run("runs/from_tiny32", log=lambda *_: None), shipped.load_model("tiny32")
    assert run.vocab.itos == model.vocab.itos
    sd = model.model.state_dict()
    assert all(torch.allclose(v.float(), sd[k].float(), atol=1e-6) for k, v in run.model.state_dict().items())
    info = json.loads(Path("runs/from_tiny32/config.json").read_text())["init_from"]
    assert info["which"] == "shipped" and Path(info["run"]).resolve() == (here["models"] / "tiny32").resolve()
    assert shipped.find_model("runs/tiny_run") is None and shipped.find_model("tiny32") is not None
    code, out = cli("train", "--features", "features/tiny.h5", "--init-from", "no_such_model", "--epochs", "1",
                    "--run", "runs/nothing")
    assert code == 2 and "--init-from no_such_model: no such run directory or shipped model" in out
    assert not Path("runs/nothing").exists()


def test_a_run_and_its_export_record_the_precision_of_their_features(tiny):
    run_feats = json.loads((tiny["run"] / "config.json").read_text())["features"]
    assert [f["provenance"]["precision"] for f in run_feats] == ["fp32"]      # a cache without the attribute: fp32
    m = shipped.read_manifest(tiny["models"] / "tiny")
    assert [f["provenance"]["precision"] for f in m["features"]] == ["fp32"]


def test_a_cut_cache_model_names_its_layer_and_the_extraction_with_layer():
    """A model trained on a cut cache (extract --layer, the top fine-tuned in top.pt): its card and
    `check_cache` error give the extraction that makes that cache, --layer included."""
    from types import SimpleNamespace
    from pipeline.inference.export import _feature_entries
    prov = {"backbone": "efficientnet_lite2", "dataset": "flickr8k", "weights_sha256": "ab" * 32,
            "layer": "last_stage_input"}
    loaded = SimpleNamespace(run_dir="runs/x", features=[
        {"provenance": prov, "path": "/data/flickr8k_efficientnet_lite2_last_stage_input.h5"},
        {"provenance": dict(prov, layer=None), "path": "/data/flickr8k_efficientnet_lite2.h5"}])
    cut, final = _feature_entries(loaded)
    assert cut["extract"] == ("pipeline extract --dataset flickr8k --backbone efficientnet_lite2 --layer "
                              "last_stage_input --out features/flickr8k_efficientnet_lite2_last_stage_input.h5")
    assert cut["layer"].startswith("`last_stage_input` of efficientnet_lite2: block 19's output (14x14x208)")
    assert final["extract"] == ("pipeline extract --dataset flickr8k --backbone efficientnet_lite2 "
                                "--out features/flickr8k_efficientnet_lite2.h5")
    assert "head conv" in final["layer"] and "last_stage_input" not in final["layer"]


def test_models_table_columns_line_up_past_28_character_names():
    """`pipeline models`: a name longer than the old fixed 28-character column no longer shifts its row's columns."""
    scores = {"stored": "float16", "images": 1000, "float16": {"metrics": {"Bleu_4": 0.2478, "CIDEr": 0.6403}}}
    models = [{"name": n, "scores": scores, "features": []} for n in ("efficientnet_lite2_soft_distill", "short")]
    lines = shipped.format_models(models).splitlines()
    header, rows = lines[0], lines[1:]
    col = header.index("Bleu_4") + len("Bleu_4")             # right edge of the right-aligned first score column
    assert [r[:col].split()[-1] for r in rows] == ["24.78", "24.78"]
    assert {r.index("float16") for r in rows} == {header.index("dtype")}
