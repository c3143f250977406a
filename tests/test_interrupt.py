"""Ctrl-C / SIGTERM during training (training/interrupt.py): the run finishes its step, writes last.pt
mid-epoch, and --resume continues it bit-exactly; a signal during validation keeps the epoch; a second
signal stops at once; the CLI exits with the signal's code."""
import os
import signal

import pytest
import torch
from click.testing import CliRunner

from test_ema import SMALL, feats  # noqa: F401  (the tiny decoder and cache of the --ema tests)
from pipeline.cli import main
from pipeline.config import DecoderConfig, TrainConfig
from pipeline.training import train as train_mod
from pipeline.training.interrupt import StopRequest, exit_code
from pipeline.training.runs import load_checkpoint
from pipeline.training.train import train


def _cfg(feats, **kw):
    return TrainConfig(**dict(dict(features=str(feats), epochs=2, batch_size=8, min_count=1, lr=3e-3,
                                   log_every=1000, ema=0.9), **kw))


def _quiet(_):
    pass


def _kill_at(step, sig, seen):
    def on_step(s, loss):
        seen[s] = loss.item()
        if s == step:
            os.kill(os.getpid(), sig)
    return on_step


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_mid_epoch_and_resume_is_bit_exact(feats, tmp_path, sig):
    dcfg, ref, got = DecoderConfig(**SMALL), {}, {}
    train(_cfg(feats), dcfg, tmp_path / "a", echo=_quiet, on_step=lambda s, loss: ref.__setitem__(s, loss.item()))
    before = signal.getsignal(sig)
    res = train(_cfg(feats), dcfg, tmp_path / "b", echo=_quiet, on_step=_kill_at(3, sig, got))
    assert signal.getsignal(sig) is before                         # the handler is put back
    assert res["stopped"] == sig.name and res["step"] == 3
    last = load_checkpoint(tmp_path / "b" / "last.pt")
    assert last["step"] == 3 and last["batch_in_epoch"] == 3
    assert not (tmp_path / "b" / "best.pt").exists()               # no epoch finished, none validated
    res = train(None, None, tmp_path / "b", resume=True, echo=_quiet,
                on_step=lambda s, loss: got.__setitem__(s, loss.item()))
    assert res["stopped"] == "done" and got == ref and len(ref) > 3
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert all(torch.equal(t, b["model"][n]) for n, t in a["model"].items())
    # the val scores are the same decodings; the epoch's mean loss is summed in another order across the stop
    val = ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "step", "lr")
    assert [[h[k] for k in val] for h in b["history"]] == [[h[k] for k in val] for h in a["history"]]
    assert [h["nll"] for h in b["history"]] == pytest.approx([h["nll"] for h in a["history"]], rel=1e-6)


def _signal_in_validation(monkeypatch, sig):
    real = train_mod.evaluate

    def evaluate(*a, **k):
        os.kill(os.getpid(), sig)
        return real(*a, **k)
    monkeypatch.setattr(train_mod, "evaluate", evaluate)


def test_a_signal_during_validation_keeps_the_epoch(feats, tmp_path, monkeypatch):
    _signal_in_validation(monkeypatch, signal.SIGINT)
    msgs = []
    res = train(_cfg(feats, epochs=3), DecoderConfig(**SMALL), tmp_path / "r", echo=msgs.append)
    assert res["stopped"] == "SIGINT" and res["epoch"] == 1 and len(res["history"]) == 1
    last = load_checkpoint(tmp_path / "r" / "last.pt")
    assert last["epoch"] == 1 and last["batch_in_epoch"] == 0
    assert (tmp_path / "r" / "best.pt").is_file()
    assert any(m.startswith("stopped (SIGINT) at epoch 2") and "--resume" in m for m in msgs)


def test_a_second_signal_stops_at_once():
    with StopRequest(stream=open(os.devnull, "w")) as req:
        os.kill(os.getpid(), signal.SIGINT)
        assert req.signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_cli_exits_with_the_signal_code(feats, tmp_path, monkeypatch):
    _signal_in_validation(monkeypatch, signal.SIGTERM)
    res = CliRunner().invoke(main, ["train", "--features", str(feats), "--run", str(tmp_path / "c"), "--epochs", "2",
                                    "--batch-size", "8", "--min-count", "1", "--embed-dim", "12", "--hidden-dim", "12",
                                    "--attention-dim", "12"])
    assert res.exit_code == 143 == exit_code("SIGTERM"), res.output
    assert "stopped (SIGTERM) at epoch 2, step" in res.output
    assert exit_code("max-minutes") == 0 and exit_code("SIGINT") == 130
