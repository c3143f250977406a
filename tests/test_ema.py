"""--ema DECAY: the moving average of the decoder's weights (training/ema.py): its values, what validation
decodes and the checkpoints hold, bit-exact resume, and runs saved before the setting existed."""
import json

import pytest
import torch
from click.testing import CliRunner

from helpers_store import make_store
from pipeline.cli import main
from pipeline.config import DecoderConfig, TrainConfig
from pipeline.errors import UserError
from pipeline.training import train as train_mod
from pipeline.training.ema import WeightAverage
from pipeline.training.runs import load_checkpoint, load_run
from pipeline.training.train import train

SMALL = dict(embed_dim=12, hidden_dim=12, attention_dim=12, dropout=0.3)


@pytest.fixture
def feats(tmp_path):
    return make_store(tmp_path / "f.h5", {"train": 12, "val": 4}, L=16, C=8)


def _cfg(feats, **kw):
    # lr_schedule none: the val score (which --ema changes) does not steer the learning rate
    return TrainConfig(**dict(dict(features=str(feats), epochs=2, batch_size=8, min_count=1, lr=3e-3,
                                   log_every=1000, lr_schedule="none"), **kw))


def _quiet(_):
    pass


def _hand_average(ws, d):
    """sum_k d^(n-k) w_k / sum_k d^(n-k), in float64."""
    n = len(ws)
    c = [d ** (n - 1 - k) for k in range(n)]
    return sum(ck * w.double() for ck, w in zip(c, ws)) / sum(c)


def test_weight_average_equals_a_hand_computation_and_swaps_back_exactly():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    m[1].bias.requires_grad_(False)                   # a frozen weight is not averaged
    ema, seen = WeightAverage(m, 0.8), []
    assert ema.names == ["0.weight", "0.bias", "1.weight"]
    for step in range(4):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        seen.append(m[0].weight.detach().clone())
        ema.update()
    assert ema.steps == 4 and ema.step_decay() == pytest.approx(0.8 * (1 - 0.8 ** 4) / (1 - 0.8 ** 5))
    torch.testing.assert_close(ema.average[0].double(), _hand_average(seen, 0.8), rtol=1e-6, atol=1e-6)
    trained, frozen = m[0].weight.detach().clone(), m[1].bias.detach().clone()
    with ema.applied():
        assert torch.equal(ema.average[0], trained)                   # swapped: the average is in the model...
        torch.testing.assert_close(m[0].weight.double(), _hand_average(seen, 0.8), rtol=1e-6, atol=1e-6)
        assert torch.equal(m[1].bias, frozen)
    assert torch.equal(m[0].weight, trained)                          # ...and the training weights are back
    one = WeightAverage(torch.nn.Linear(2, 2), 0.999)
    one.update()                                                      # step 1: the weights themselves
    assert one.steps == 1 and all(torch.equal(a, p) for a, p in zip(one.average, one.params))


def test_ema_of_a_run_equals_the_hand_average_of_its_steps(feats, tmp_path):
    """Runs of 1, 2, 3 steps (same seed: the same trajectory) give w_1, w_2, w_3 (last.pt's training
    weights); the 3-step run's model is their d^(n-k)-weighted mean."""
    ws = []
    for n in (1, 2, 3):
        res = train(_cfg(feats, ema=0.7, max_steps=n), DecoderConfig(**SMALL), tmp_path / f"r{n}", echo=_quiet)
        assert res["stopped"] == "max-steps"
        ckpt = load_checkpoint(tmp_path / f"r{n}" / "last.pt")
        assert ckpt["ema"]["steps"] == n and ckpt["ema"]["decay"] == 0.7
        ws.append(ckpt["ema"]["training_weights"])
    names = list(ws[0])                 # every trained parameter, no buffer (hard attention's baseline)
    assert set(names) == {n for n, p in load_run(tmp_path / "r3", "last").model.named_parameters()}
    assert "baseline" in ckpt["model"] and "baseline" not in names
    for name in names:
        torch.testing.assert_close(ckpt["model"][name].double(), _hand_average([w[name] for w in ws], 0.7),
                                   rtol=1e-5, atol=1e-6)
    assert not torch.equal(ckpt["model"][names[0]], ws[2][names[0]])   # the average is not the last weights


def test_ema_validates_with_the_average_and_leaves_training_unchanged(feats, tmp_path, monkeypatch):
    real, at_val = train_mod.evaluate, []

    def spy(model, *a, **k):
        at_val.append({n: t.detach().clone() for n, t in model.state_dict().items()})
        return real(model, *a, **k)
    monkeypatch.setattr(train_mod, "evaluate", spy)
    plain, averaged = {}, {}
    train(_cfg(feats, ema=0.0), DecoderConfig(**SMALL), tmp_path / "plain", echo=_quiet,
          on_step=lambda s, loss: plain.__setitem__(s, loss.item()))
    at_val.clear()
    res = train(_cfg(feats, ema=0.9), DecoderConfig(**SMALL), tmp_path / "ema", echo=_quiet,
                on_step=lambda s, loss: averaged.__setitem__(s, loss.item()))
    assert res["epoch"] == 2 and len(plain) > 2 and averaged == plain   # the average never feeds back into training
    last = load_checkpoint(tmp_path / "ema" / "last.pt")
    assert all(torch.equal(at_val[-1][n], t) for n, t in last["model"].items())     # validation decoded `model`
    raw = last["ema"]["training_weights"]
    assert any(not torch.equal(last["model"][n], t) for n, t in raw.items())
    best = load_run(tmp_path / "ema")                                   # best.pt: the average of its epoch
    assert best.which == "best" and res["best_epoch"] in (1, 2)
    assert all(torch.equal(best.model.state_dict()[n], t) for n, t in at_val[res["best_epoch"] - 1].items())


def test_resume_of_a_run_with_ema_is_bit_exact(feats, tmp_path):
    dcfg, ref, got = DecoderConfig(**SMALL), {}, {}
    train(_cfg(feats, ema=0.9), dcfg, tmp_path / "a", echo=_quiet, on_step=lambda s, loss: ref.__setitem__(s, loss.item()))
    res = train(_cfg(feats, ema=0.9, max_steps=3), dcfg, tmp_path / "b", echo=_quiet,
                on_step=lambda s, loss: got.__setitem__(s, loss.item()))
    assert res["stopped"] == "max-steps"
    train(None, None, tmp_path / "b", resume=True, overrides={"max_steps": 0}, echo=_quiet,
          on_step=lambda s, loss: got.__setitem__(s, loss.item()))
    assert got == ref
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(tmp_path / "a" / name), load_checkpoint(tmp_path / "b" / name)
        assert a["ema"]["steps"] == b["ema"]["steps"] == a["step"]
        for part in (a["model"], a["ema"]["training_weights"]):
            other = b["model"] if part is a["model"] else b["ema"]["training_weights"]
            assert all(torch.equal(t, other[n]) for n, t in part.items()), name
    with pytest.raises(UserError, match=r"--ema 0\.5 \(it was trained with 0\.9\)"):
        train(None, None, tmp_path / "b", resume=True, overrides={"ema": 0.5, "epochs": 3}, echo=_quiet)


def test_a_run_saved_before_ema_existed_resumes_unchanged(feats, tmp_path):
    """A last.pt and config.json without the `ema` key: the run resumes without an average (LEGACY 0.0), as
    the code that wrote it trained (not today's default 0.999), and its checkpoints stay without `ema`."""
    assert TrainConfig.from_dict({}).ema == 0.0 and TrainConfig().ema == 0.999
    dcfg, ref, got = DecoderConfig(**SMALL), {}, {}
    train(_cfg(feats, ema=0.0), dcfg, tmp_path / "a", echo=_quiet,
          on_step=lambda s, loss: ref.__setitem__(s, loss.item()))
    run = tmp_path / "old"
    train(_cfg(feats, ema=0.0, max_steps=2), dcfg, run, echo=_quiet, on_step=lambda s, loss: got.__setitem__(s, loss.item()))
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert "ema" not in ckpt
    del ckpt["train_config"]["ema"]
    torch.save(ckpt, run / "last.pt")
    cfg = json.loads((run / "config.json").read_text())
    del cfg["train"]["ema"]
    (run / "config.json").write_text(json.dumps(cfg))
    train(None, None, run, resume=True, overrides={"max_steps": 0}, echo=_quiet,
          on_step=lambda s, loss: got.__setitem__(s, loss.item()))
    assert got == ref
    last = load_checkpoint(run / "last.pt")
    assert "ema" not in last and last["train_config"]["ema"] == 0.0
    assert all(torch.equal(t, load_checkpoint(tmp_path / "a" / "last.pt")["model"][n]) for n, t in last["model"].items())


def test_cli_has_the_ema_option_and_checks_it(feats, tmp_path):
    r = CliRunner()
    assert "--ema" in r.invoke(main, ["train", "--help"]).output
    res = r.invoke(main, ["train", "--features", str(feats), "--run", str(tmp_path / "x"), "--ema", "1"])
    assert res.exit_code == 2 and "--ema 1.0: must be < 1" in res.output
