"""Runs saved by older code keep doing what they did: their settings are read from the run, never
from today's defaults (which changed: dropouts 0.3 and label smoothing 0.1 became the defaults), and a
setting a run predates takes the value of the code that wrote it (config.LEGACY)."""
from __future__ import annotations

import pytest
import torch

from helpers_store import make_store
from pipeline import config
from pipeline.config import DecoderConfig, TrainConfig
from pipeline.errors import UserError
from pipeline.decoder.decode import beam_search
from pipeline.training import runs
from pipeline.training.runs import load_run
from pipeline.training.train import train

OLD_DECODER = dict(embed_dim=12, hidden_dim=12, attention_dim=12, embed_dropout=0.0, context_dropout=0.0,
                   hidden_dropout=0.0)   # the defaults before they became 0.3
OLD_TRAIN = dict(label_smoothing=0.0, patience=6)


def _cfg(feats, **kw):
    return TrainConfig(**{**dict(features=str(feats), epochs=2, batch_size=8, min_count=1, lr=3e-3, log_every=1000),
                          **OLD_TRAIN, **kw})


def _strip_new_keys(path):
    """Make `path` look like a checkpoint of the code before the dropout / smoothing settings existed."""
    ckpt = runs.load_checkpoint(path)
    for k in ("embed_dropout", "context_dropout", "hidden_dropout"):
        ckpt["decoder_config"].pop(k)
    ckpt["train_config"].pop("label_smoothing")
    runs.save_checkpoint(ckpt, path)


def test_defaults_changed_since_old_runs():
    """The premise of this file: today's defaults differ from the old ones (else these tests prove nothing)."""
    d, t = DecoderConfig(), TrainConfig()
    assert (d.embed_dropout, d.context_dropout, d.hidden_dropout, t.label_smoothing) == (0.3, 0.3, 0.3, 0.1)
    assert config.LEGACY["DecoderConfig"]["embed_dropout"] == 0.0
    assert config.LEGACY["TrainConfig"]["label_smoothing"] == 0.0


def test_an_old_run_resumes_and_decodes_unchanged(tmp_path):
    feats = make_store(tmp_path / "f.h5", {"train": 12, "val": 4}, L=16, C=8)
    ref_steps, got_steps = {}, {}
    train(_cfg(feats, max_steps=6), DecoderConfig(**OLD_DECODER), tmp_path / "ref", echo=lambda s: None,
          on_step=lambda s, loss: ref_steps.__setitem__(s, loss.item()))
    old = tmp_path / "old"
    train(_cfg(feats, max_steps=3), DecoderConfig(**OLD_DECODER), old, echo=lambda s: None,
          on_step=lambda s, loss: got_steps.__setitem__(s, loss.item()))
    _strip_new_keys(old / "last.pt")

    # resumed under today's defaults: the run keeps the old settings, and steps 4-6 are bit-identical
    train(None, None, old, resume=True, overrides={"max_steps": 6}, echo=lambda s: None,
          on_step=lambda s, loss: got_steps.__setitem__(s, loss.item()))
    assert got_steps == ref_steps
    ckpt = runs.load_checkpoint(old / "last.pt")
    assert ckpt["train_config"]["label_smoothing"] == 0.0
    assert ckpt["decoder_config"]["embed_dropout"] == 0.0

    # and it decodes as the uninterrupted run does (same decoder settings and weights)
    a, b = load_run(tmp_path / "ref", which="last"), load_run(old, which="last")
    assert a.model.cfg == b.model.cfg
    x = torch.randn(3, 16, 8)
    ha = beam_search(a.model, x, beam=2, max_len=6)
    hb = beam_search(b.model, x, beam=2, max_len=6)
    assert [h.tokens for h in ha] == [h.tokens for h in hb]


def test_a_saved_value_wins_over_legacy_and_default():
    saved = DecoderConfig(**dict(OLD_DECODER, embed_dropout=0.2)).to_dict()
    assert DecoderConfig.from_dict(saved).embed_dropout == 0.2
    del saved["context_dropout"]
    assert DecoderConfig.from_dict(saved).context_dropout == 0.0     # LEGACY, not today's 0.3


def test_recipe_defaults_by_objective_and_saved_runs_keep_theirs():
    """The cross-entropy recipe changed on 2026-12-06 (EMA 0.999, x0.5 every 3 epochs, 15 epochs, beam-3 val);
    SCST keeps the recipe its runs used. A value given wins; a saved run keeps what it saved; --help shows both."""
    xe, scst = TrainConfig(), TrainConfig(objective="scst", init_from="runs/x")
    assert (xe.epochs, xe.ema, xe.lr_schedule, xe.lr_factor, xe.beam) == (15, 0.999, "step", 0.5, 3)
    assert (scst.epochs, scst.ema, scst.lr_schedule, scst.lr_factor, scst.beam) == (20, 0.0, "plateau", 0.8, 1)
    assert TrainConfig(ema=0.0, beam=1).ema == 0.0 and TrainConfig(ema=0.0, beam=1).beam == 1
    saved = {**vars(TrainConfig(objective="scst", init_from="runs/x")), "features": []}
    assert TrainConfig.from_dict(saved).lr_schedule == "plateau"          # not re-resolved
    old = TrainConfig.from_dict({k: v for k, v in saved.items() if k not in ("ema", "epochs", "beam")} | {"objective": "xe"})
    assert (old.ema, old.epochs, old.beam) == (0.0, 20, 1)                   # LEGACY: the recipe before
    with pytest.raises(UserError, match="--lr-schedule 'fast'"):
        TrainConfig(lr_schedule="fast")
    from click.testing import CliRunner
    from pipeline.cli import main
    out = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    assert "--epochs INTEGER Epochs in total. [default: xe 15, scst 20]" in out
    assert "best.pt. [default: xe 3, scst 1]" in out
