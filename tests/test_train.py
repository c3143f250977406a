import json

import pytest
import torch
from click.testing import CliRunner

from helpers_store import make_store
from pipeline import model as model_mod
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.model import DecoderConfig
from pipeline.train import TrainConfig, load_run, train

SMALL = dict(embed_dim=12, hidden_dim=12, attention_dim=12, dropout=0.3)


@pytest.fixture
def feats(tmp_path):
    return make_store(tmp_path / "f.h5", {"train": 12, "val": 4}, L=16, C=8)


def _cfg(feats, **kw):
    return TrainConfig(**dict(dict(features=str(feats), epochs=2, batch_size=8, min_count=1, lr=3e-3,
                                   log_every=1000), **kw))


def _quiet(_):
    pass


def test_train_writes_run_and_load_run(feats, tmp_path):
    run = tmp_path / "run"
    res = train(_cfg(feats), DecoderConfig(**SMALL), run, echo=_quiet)
    assert res["stopped"] == "done" and res["epoch"] == 2
    for name in ("config.json", "vocab.json", "last.pt", "best.pt", "log.jsonl", "log.csv", "curves.png"):
        assert (run / name).exists(), name
    lines = [json.loads(s) for s in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert all(0 <= r["bleu4"] <= 1 and r["captions_per_s"] > 0 for r in lines)
    assert (run / "log.csv").read_text().count("\n") == 3
    model, vocab, ckpt = load_run(run)
    assert not model.training and len(vocab) == model.vocab_size
    for key in ("model", "optimizer", "scheduler", "rng", "epoch", "step", "best_score", "vocab",
                "decoder_config", "train_config", "provenance", "features_path", "history"):
        assert key in ckpt, key
    # a finished run is refused without --resume
    with pytest.raises(UserError, match="--resume"):
        train(_cfg(feats), DecoderConfig(**SMALL), run, echo=_quiet)


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_resume_gives_bit_identical_next_step_loss(feats, tmp_path, attention):
    dcfg = DecoderConfig(attention=attention, **SMALL)
    ref = {}
    train(_cfg(feats, max_steps=5), dcfg, tmp_path / "a", echo=_quiet,
          on_step=lambda s, loss: ref.__setitem__(s, loss.item()))
    got = {}
    res = train(_cfg(feats, max_steps=3), dcfg, tmp_path / "b", echo=_quiet,
                on_step=lambda s, loss: got.__setitem__(s, loss.item()))
    assert res["stopped"] == "max-steps" and res["step"] == 3
    train(None, None, tmp_path / "b", resume=True, overrides={"max_steps": 5}, echo=_quiet,
          on_step=lambda s, loss: got.__setitem__(s, loss.item()))
    assert got == ref          # steps 4 and 5 after the resume are bit-identical


def test_resume_across_epochs_and_max_minutes(feats, tmp_path):
    run = tmp_path / "run"
    res = train(_cfg(feats, epochs=3, max_minutes=1e-9), DecoderConfig(**SMALL), run, echo=_quiet)
    assert res["stopped"] == "max-minutes" and res["step"] == 1
    res = train(None, None, run, resume=True, overrides={"max_minutes": 0}, echo=_quiet)
    assert res["stopped"] == "done" and res["epoch"] == 3 and len(res["history"]) == 3


def test_provenance_or_dims_mismatch_refused(feats, tmp_path):
    run = tmp_path / "run"
    train(_cfg(feats, max_steps=1), DecoderConfig(**SMALL), run, echo=_quiet)
    other = make_store(tmp_path / "other.h5", {"train": 12, "val": 4}, L=16, C=8, backbone="resnet-x")
    with pytest.raises(UserError, match="backbone"):
        train(None, None, run, resume=True, overrides={"features": str(other)}, echo=_quiet)
    wider = make_store(tmp_path / "wider.h5", {"train": 12, "val": 4}, L=16, C=10)
    with pytest.raises(UserError, match="feature_dim"):
        train(None, None, run, resume=True, overrides={"features": str(wider)}, echo=_quiet)


def test_non_finite_loss_stops_with_clear_message(feats, tmp_path, monkeypatch):
    real = model_mod.Decoder.loss

    def nan_loss(self, out, tokens):
        loss, parts = real(self, out, tokens)
        return loss * float("nan"), parts
    monkeypatch.setattr(model_mod.Decoder, "loss", nan_loss)
    with pytest.raises(UserError, match="non-finite loss"):
        train(_cfg(feats), DecoderConfig(**SMALL), tmp_path / "run", echo=_quiet)


def test_cli_train_and_user_errors(feats, tmp_path):
    r = CliRunner()
    run = tmp_path / "cli_run"
    # --resume on a run with no checkpoint yet starts it (one command starts and continues a run)
    res = r.invoke(main, ["train", "--features", str(feats), "--run", str(run), "--epochs", "1", "--batch-size", "8",
                          "--min-count", "1", "--embed-dim", "8", "--hidden-dim", "8", "--attention-dim", "8",
                          "--resume"])
    assert res.exit_code == 0, res.output
    assert "starting a new run" in res.output
    assert "val BLEU-1..4" in res.output and (run / "best.pt").exists()
    res = r.invoke(main, ["train", "--features", str(feats), "--run", str(run), "--resume", "--epochs", "2"])
    assert res.exit_code == 0, res.output
    assert len(load_run(run, "last")[2]["history"]) == 2
    res = r.invoke(main, ["train", "--features", str(tmp_path / "missing.h5"), "--run", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no such feature file" in res.output
    res = r.invoke(main, ["train", "--features", str(feats), "--run", str(tmp_path / "y"), "--batch-size", "0"])
    assert res.exit_code == 2 and "batch-size" in res.output


def test_load_run_errors(tmp_path):
    with pytest.raises(UserError, match="no such run"):
        load_run(tmp_path / "nope")
    (tmp_path / "r").mkdir()
    with pytest.raises(UserError, match="no such checkpoint"):
        load_run(tmp_path / "r")


def test_lazy_reading_with_workers_and_beam_validation(feats, tmp_path):
    res = train(_cfg(feats, epochs=1, in_ram="no", num_workers=1, beam=2), DecoderConfig(**SMALL),
                tmp_path / "run", echo=_quiet)
    assert res["stopped"] == "done" and 0 <= res["history"][0]["bleu4"] <= 1
