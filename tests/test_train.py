import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers_store import make_store
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.config import DecoderConfig, TrainConfig
from pipeline.training.runs import load_run
from pipeline.training.train import train

SMALL = dict(embed_dim=12, hidden_dim=12, attention_dim=12, dropout=0.3)


@pytest.fixture
def feats(tmp_path):
    return make_store(tmp_path / "f.h5", {"train": 12, "val": 4}, L=16, C=8)


# The toy runs here test the loop's mechanics on the recipe they were written for (before 2026-12-06: no
# weight average, plateau schedule, greedy validation), not today's Flickr8k recipe.
TOY_RECIPE = dict(ema=0.0, lr_schedule="plateau", lr_factor=0.8, beam=1)


def _cfg(feats, **kw):
    return TrainConfig(**dict(dict(features=tuple(map(str, feats)) if isinstance(feats, tuple) else str(feats), epochs=2, batch_size=8, min_count=1, lr=3e-3,
                                   log_every=1000, **TOY_RECIPE), **kw))


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
    r = load_run(run)
    model, vocab, ckpt = r.model, r.vocab, r.ckpt
    assert not model.training and len(vocab) == model.vocab_size and r.which == "best"
    for key in ("model", "optimizer", "scheduler", "rng", "epoch", "step", "best_score", "vocab", "format_version",
                "decoder_config", "train_config", "features", "history", "select_metric"):
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
    from pipeline.training import objectives
    real = objectives.xe_loss

    def nan_loss(model, out, tokens, **kw):
        loss, parts = real(model, out, tokens, **kw)
        return loss * float("nan"), parts
    monkeypatch.setattr(objectives, "xe_loss", nan_loss)
    with pytest.raises(UserError, match="non-finite loss.*no checkpoint was written"):
        train(_cfg(feats), DecoderConfig(**SMALL), tmp_path / "run", echo=_quiet)
    assert not list((tmp_path / "run").glob("*.pt"))   # no checkpoint; the same command may start it again
    monkeypatch.undo()
    train(_cfg(feats, max_steps=2), DecoderConfig(**SMALL), tmp_path / "run2", echo=_quiet)
    monkeypatch.setattr(objectives, "xe_loss", nan_loss)
    with pytest.raises(UserError, match="non-finite loss.*last.pt keeps"):
        train(None, None, tmp_path / "run2", resume=True, overrides={"max_steps": 0}, echo=_quiet)


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
    assert len(load_run(run, "last").ckpt["history"]) == 2
    res = r.invoke(main, ["train", "--features", str(tmp_path / "missing.h5"), "--run", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no such feature file" in res.output
    res = r.invoke(main, ["train", "--features", str(feats), "--run", str(tmp_path / "y"), "--batch-size", "0"])
    assert res.exit_code == 2 and "batch-size" in res.output


def test_load_run_errors(tmp_path):
    with pytest.raises(UserError, match="no such run"):
        load_run(tmp_path / "nope")
    (tmp_path / "r").mkdir()
    with pytest.raises(UserError, match="not a run directory"):
        load_run(tmp_path / "r")
    (tmp_path / "r" / "last.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_run(tmp_path / "r")


def test_lazy_reading_with_workers_and_beam_validation(feats, tmp_path):
    res = train(_cfg(feats, epochs=1, in_ram="no", num_workers=1, beam=2), DecoderConfig(**SMALL),
                tmp_path / "run", echo=_quiet)
    assert res["stopped"] == "done" and 0 <= res["history"][0]["bleu4"] <= 1


# ---- faults and bad input (each of these was a defect) ---------------------------------------------------

def test_second_process_on_one_run_is_refused(feats, tmp_path):
    from pipeline.training.runs import run_lock
    run = tmp_path / "run"
    with run_lock(run):                                 # another `pipeline train` holds the run
        with pytest.raises(UserError, match=r"run .*run is in use by another process \(pid \d+\)"):
            train(_cfg(feats), DecoderConfig(**SMALL), run, echo=_quiet)
        with pytest.raises(UserError, match="in use by another process"):
            train(None, None, run, resume=True, echo=_quiet)
    assert not list(run.glob("*.pt"))


def test_lock_is_not_kept_by_a_forked_child(tmp_path):
    """A process forked while a run is locked (DataLoader workers, decoding processes) must not keep the
    lock once its locker is gone: a killed run's workers live on for seconds, and `--resume` was refused,
    naming the dead pid (issue 20)."""
    import os
    from pipeline.training.runs import run_lock
    run = tmp_path / "run"
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    with run_lock(run):
        pid = os.fork()
        if pid == 0:                       # the worker: outlives the locker until told to exit
            try:
                os.write(ready_w, b"1")    # (after the fork hooks ran)
                os.read(r, 1)
            finally:
                os._exit(0)
        os.read(ready_r, 1)
    os.close(r)
    try:
        with run_lock(run) as lock:        # the locker let go; its worker is still alive
            assert lock.fd is not None
    finally:
        os.write(w, b"x")
        os.waitpid(pid, 0)
        for fd in (w, ready_r, ready_w):
            os.close(fd)


def test_lock_held_by_a_dead_pid_says_so(tmp_path):
    """Some other program's child holds the lock of a run whose recorded locker exited: the error says so."""
    import fcntl
    import os
    from pipeline.training.runs import run_lock
    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"2147483646")                          # no such process
    try:
        with pytest.raises(UserError, match=r"\(pid 2147483646, which has exited: a process it started"):
            with run_lock(run):
                pass
    finally:
        os.close(fd)


def test_crash_between_best_and_last_leaves_them_consistent(feats, tmp_path, monkeypatch):
    """kill -9 after one checkpoint file of an epoch is replaced but not the other: best.pt must never be
    older than the best epoch last.pt records, and --resume ends with the same run as no crash."""
    import pipeline.training.runs as runs_mod
    import pipeline.training.train as train_mod
    scores = iter([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])         # every epoch is the best so far
    real_eval = train_mod.evaluate

    def rising(*a, **k):
        metrics, caps = real_eval(*a, **k)
        return dict(metrics, bleu4=next(scores)), caps
    monkeypatch.setattr(train_mod, "evaluate", rising)
    ref = train(_cfg(feats, epochs=2), DecoderConfig(**SMALL), tmp_path / "ref", echo=_quiet)
    scores = iter([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    real_save, saved = runs_mod.save_checkpoint, []

    def killed_after_best_of_epoch2(ckpt, path):
        if ckpt["epoch"] == 2 and path.name == "last.pt":
            raise KeyboardInterrupt("kill -9")
        real_save(ckpt, path)
        saved.append((ckpt["epoch"], path.name))
    monkeypatch.setattr(runs_mod, "save_checkpoint", killed_after_best_of_epoch2)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(feats, epochs=2), DecoderConfig(**SMALL), run, echo=_quiet)
    assert saved == [(1, "best.pt"), (1, "last.pt"), (2, "best.pt")]     # best is written first
    last, best = load_run(run, "last").ckpt, load_run(run, "best").ckpt
    assert best["epoch"] >= last["best_epoch"]
    monkeypatch.setattr(runs_mod, "save_checkpoint", real_save)
    scores = iter([0.2, 0.3])                                  # epoch 2 again, as before the crash
    train(None, None, run, resume=True, echo=_quiet)
    a, b = load_run(tmp_path / "ref", "best").ckpt, load_run(run, "best").ckpt
    assert a["epoch"] == b["epoch"] == 2 == load_run(run, "last").ckpt["best_epoch"] == ref["best_epoch"]
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0)


def test_full_disk_at_checkpoint_is_one_error_and_leaves_no_temporary(feats, tmp_path, monkeypatch):
    import shutil as sh
    run = tmp_path / "run"
    train(_cfg(feats, max_steps=2), DecoderConfig(**SMALL), run, echo=_quiet)
    before = (run / "last.pt").read_bytes()

    def full_disk_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("basic_ios::clear: iostream error")    # what torch.save says on a full disk
    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10 ** 9, 10 ** 9, 5 * 2 ** 20))
    with pytest.raises(UserError, match=r"last\.pt: could not be written \(the disk is full; 5 MiB free on the disk holding"):
        train(None, None, run, resume=True, overrides={"max_steps": 4}, echo=_quiet)
    assert (run / "last.pt").read_bytes() == before and not list(run.glob("*.tmp"))


def test_resume_rewrites_config_and_refuses_other_training_settings(feats, tmp_path):
    run = tmp_path / "run"
    train(_cfg(feats, epochs=1), DecoderConfig(**SMALL), run, echo=_quiet)
    train(None, None, run, resume=True, overrides={"epochs": 2, "patience": 3}, echo=_quiet)
    cfg = json.loads((run / "config.json").read_text())["train"]
    assert cfg["epochs"] == 2 and cfg["patience"] == 3
    with pytest.raises(UserError, match=r"--lr 0\.1 \(it was trained with 0\.003\) cannot change"):
        train(None, None, run, resume=True, overrides={"lr": 0.1, "epochs": 3}, echo=_quiet)


def test_resume_of_a_finished_run_says_so_and_how_to_train_more(feats, tmp_path, monkeypatch):
    """It said "resuming ... at epoch 2" and did nothing (issue 20)."""
    import pipeline.training.train as train_mod
    run = tmp_path / "run"
    train(_cfg(feats, epochs=1), DecoderConfig(**SMALL), run, echo=_quiet)
    before = (run / "last.pt").read_bytes()
    res = CliRunner().invoke(main, ["train", "--run", str(run), "--resume"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"{run} is finished: all 1 epochs are trained; best val bleu4 ") and \
        f"pipeline train --run {run} --resume --epochs 6;" in res.output and "resuming" not in res.output
    assert (run / "last.pt").read_bytes() == before
    res = train(None, None, run, resume=True, overrides={"epochs": 2}, echo=_quiet)   # what the note says works
    assert res["stopped"] == "done" and res["epoch"] == 2

    scores = iter([0.3] + [0.2] * 9)                        # epoch 2 is worse: early stop with --patience 1
    real_eval = train_mod.evaluate
    monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: (dict(real_eval(*a, **k)[0], bleu4=next(scores)), [""]))
    early = tmp_path / "early"
    assert train(_cfg(feats, epochs=5, patience=1), DecoderConfig(**SMALL), early, echo=_quiet)["epoch"] == 2
    lines = []
    res = train(None, None, early, resume=True, echo=lines.append)
    assert res["stopped"] == "finished" and res["epoch"] == 2 and len(lines) == 1
    assert "early-stopped after epoch 2 (no val bleu4 gain for 1 epochs, --patience 1); best val bleu4 0.3000 " \
           "at epoch 1" in lines[0] and "--resume --patience 3;" in lines[0]
    res = train(None, None, early, resume=True, overrides={"patience": 3}, echo=_quiet)
    assert res["stopped"] == "early-stopped" and res["epoch"] == 4


def test_max_len_that_drops_every_caption_is_refused_before_any_work(feats, tmp_path):
    """--max-len 1 dropped every caption and wrote a best.pt of an untrained model, rc 0 (issue 20)."""
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"--max-len 1 drops every train caption of .*f\.h5 \(the shortest has "
                                        r"\d+ words\); raise --max-len"):
        train(_cfg(feats, max_len=1), DecoderConfig(**SMALL), run, echo=_quiet)
    assert not run.exists()


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("format_version"), "has no format_version and is not a format-1 checkpoint"),
    (lambda c: c.pop("decoder_config"), r"not a checkpoint of this code \(missing decoder_config\)"),
    (lambda c: c.update(surprise=1), r"unknown key\(s\) surprise"),
    (lambda c: c["decoder_config"].update(attention_heads=8), "decoder_config: unknown decoder setting.*attention_heads"),
    (lambda c: c["train_config"].update(lr=-1.0), r"train_config: --lr -1\.0: must be > 0"),
])
def test_a_damaged_checkpoint_is_one_error_naming_the_file(feats, tmp_path, edit, message):
    """A checkpoint without format_version or decoder_config, or with a key this code does not know, was a
    KeyError traceback or an error naming no file (issue 20)."""
    from pipeline.training import runs
    run = tmp_path / "run"
    train(_cfg(feats, max_steps=1), DecoderConfig(**SMALL), run, echo=_quiet)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert set(ckpt) <= runs.CHECKPOINT_KEYS | runs.OPTIONAL_KEYS and runs.CHECKPOINT_KEYS <= set(ckpt)
    edit(ckpt)
    torch.save(ckpt, run / "last.pt")
    with pytest.raises(UserError, match=rf"^{run}/last\.pt: .*{message}"):
        load_run(run, "last")
    res = CliRunner().invoke(main, ["train", "--run", str(run), "--resume"])
    assert res.exit_code == 2 and res.output.startswith(f"error: {run}/last.pt: ")


def test_unknown_setting_is_an_error():
    with pytest.raises(UserError, match="unknown training setting.*epochz"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(UserError, match="unknown decoder setting.*hiden_dim"):
        DecoderConfig.from_dict({"hiden_dim": 3})


@pytest.mark.parametrize("args, message", [
    (["--patience", "0"], "--patience 0: must be >= 1"),
    (["--threads", "-1"], "--threads -1: must be >= 0"),
    (["--alpha-c", "-5"], "--alpha-c -5.0: must be >= 0"),
    (["--grad-clip", "-1"], "--grad-clip -1.0: must be >= 0"),
    (["--max-minutes", "-1"], "--max-minutes -1.0: must be >= 0"),
    (["--lr", "inf"], "--lr inf: must be a finite number"),
    (["--seed", "-1"], "--seed -1: must be >= 0"),
    (["--dropout", "1.5"], "--dropout 1.5: must be < 1"),
    (["--label-smoothing", "1"], "--label-smoothing 1.0: must be < 1"),
])
def test_cli_refuses_out_of_range_values(feats, tmp_path, args, message):
    res = CliRunner().invoke(main, ["train", "--features", str(feats), "--run", str(tmp_path / "r")] + args)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(__import__("shutil").which("java") is None, reason="scoring needs java: apt-get install default-jre-headless")
def test_score_without_best_says_it_uses_last(feats, tmp_path):
    run = tmp_path / "run"
    train(_cfg(feats, max_steps=1), DecoderConfig(**SMALL), run, echo=_quiet)   # no epoch finished: no best.pt
    res = CliRunner().invoke(main, ["score", "--run", str(run), "--beam", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert f"note: {run} has no best.pt yet (no epoch finished); using last.pt." in res.output


# ---- self-critical training, fused caches ------------------------------------------------------------

def test_self_critical_phase_from_a_cross_entropy_run(feats, tmp_path):
    xe = tmp_path / "xe"
    train(_cfg(feats, epochs=2), DecoderConfig(**SMALL), xe, echo=_quiet)
    with pytest.raises(UserError, match="--init-from"):
        train(_cfg(feats, objective="scst"), DecoderConfig(**SMALL), tmp_path / "x", echo=_quiet)
    kw = dict(objective="scst", init_from=str(xe), lr=1e-3, batch_size=4, scst_samples=3, scst_max_len=6)
    res = train(_cfg(feats, epochs=2, **kw), None, tmp_path / "scst", echo=_quiet)
    assert res["select_metric"] == "cider" and res["stopped"] == "done"
    h = res["history"]
    # CIDEr-D (x10) of sampled captions of a trained model: above 0 (an empty or all-<unk> caption scores 0),
    # below 10 (a perfect match of every reference)
    assert [r["objective"] for r in h] == ["scst", "scst"] and all(0.05 < r["reward"] < 10 for r in h)
    assert all(r["select"] == "cider" and "cider" in r for r in h)
    ckpt = load_run(tmp_path / "scst", "last").ckpt
    assert ckpt["init_from"]["run"] == str(xe) and ckpt["decoder_config"] == load_run(xe).ckpt["decoder_config"]
    assert json.loads((tmp_path / "scst" / "config.json").read_text())["init_from"]["epoch"] == \
        load_run(xe).ckpt["epoch"]
    # the same resume rules as cross-entropy: bit-identical steps after a stop
    ref, got = {}, {}
    train(_cfg(feats, max_steps=5, **kw), None, tmp_path / "a", echo=_quiet,
          on_step=lambda s, loss: ref.__setitem__(s, loss.item()))
    train(_cfg(feats, max_steps=3, **kw), None, tmp_path / "b", echo=_quiet)
    train(None, None, tmp_path / "b", resume=True, overrides={"max_steps": 5}, echo=_quiet,
          on_step=lambda s, loss: got.__setitem__(s, loss.item()))
    assert got == {4: ref[4], 5: ref[5]}
    other = make_store(tmp_path / "other.h5", {"train": 12, "val": 4}, L=16, C=8, backbone="resnet-x")
    with pytest.raises(UserError, match="--init-from .*backbone"):
        train(_cfg(other, **kw), None, tmp_path / "c", echo=_quiet)


def _mean_sampled_reward(run, which, feats_path, rows, n=20, max_len=10):
    """CIDEr-D (with <end>, the default reward) of n captions sampled per train image, averaged."""
    import h5py
    from helpers_store import class_captions
    from pipeline.training.objectives import SelfCritical, TrainCiderD, reward_references, tokenized
    refs = reward_references({r: tokenized(class_captions(r)) for r in rows}, True)
    cider = TrainCiderD([refs[r] for r in rows])
    with h5py.File(feats_path, "r") as f:
        x = torch.from_numpy(f["features"][rows[0]:rows[-1] + 1].astype(np.float32))
    r = load_run(run, which)
    captions = SelfCritical(cider, refs, r.vocab, samples=n, max_len=max_len, end_token=True).captions
    torch.manual_seed(0)
    with torch.no_grad():
        out = r.model.train().sample(x, n, max_len)
    return float(cider(captions(out), [refs[q] for q in rows for _ in range(n)]).mean())


def test_self_critical_training_raises_the_mean_reward(tmp_path):
    """SCST through train() on the toy set: the logged mean reward of the sampled captions climbs epoch
    after epoch, and so does the reward of fresh samples of the final model against the starting one."""
    feats = make_store(tmp_path / "f.h5", {"train": 48, "val": 4}, L=16, C=8)
    xe = tmp_path / "xe"
    train(_cfg(feats, epochs=6), DecoderConfig(**SMALL), xe, echo=_quiet)
    res = train(_cfg(feats, epochs=6, objective="scst", init_from=str(xe), lr=1e-2, scst_samples=4, scst_max_len=10,
                     patience=10), None, tmp_path / "scst", echo=_quiet)
    rewards = [h["reward"] for h in res["history"]]
    assert len(rewards) == 6 and rewards[-1] > rewards[0] + 0.5 and min(rewards[3:]) > max(rewards[:2]), rewards
    rows = list(range(48))
    start, end = _mean_sampled_reward(xe, "best", feats, rows), _mean_sampled_reward(tmp_path / "scst", "last", feats, rows)
    assert end > start + 0.5, (start, end)


def test_reward_end_token_setting_and_old_runs(feats, tmp_path, monkeypatch):
    """--scst-reward-end is on by default; a run saved before the setting existed resumes with the reward it
    was trained with (no end token: config.LEGACY), not today's default."""
    import pipeline.training.data as data_mod
    seen = []

    class Recording(data_mod.SelfCritical):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen.append((kw["end_token"], {r: refs[0] for r, refs in self.refs.items()}))

    monkeypatch.setattr(data_mod, "SelfCritical", Recording)
    xe = tmp_path / "xe"
    train(_cfg(feats, max_steps=1), DecoderConfig(**SMALL), xe, echo=_quiet)
    kw = dict(objective="scst", init_from=str(xe), batch_size=4, scst_samples=2)
    train(_cfg(feats, max_steps=1, **kw), None, tmp_path / "new", echo=_quiet)
    assert seen[-1][0] is True and all(ref.endswith(" <end>") for ref in seen[-1][1].values())
    run = tmp_path / "old"
    train(_cfg(feats, max_steps=1, **kw), None, run, echo=_quiet)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["train_config"].pop("scst_reward_end") is True        # as a run of the older code was saved
    torch.save(ckpt, run / "last.pt")
    train(None, None, run, resume=True, overrides={"max_steps": 2}, echo=_quiet)
    assert seen[-1][0] is False and not any("<end>" in ref for ref in seen[-1][1].values())
    assert load_run(run, "last").ckpt["train_config"]["scst_reward_end"] is False


def test_fused_caches_train_and_are_checked(feats, tmp_path):
    from pipeline.cache import readers
    other = make_store(tmp_path / "g.h5", {"train": 12, "val": 4}, L=16, C=5, backbone="other-net", seed=3)
    one = readers.open_features([feats])
    assert isinstance(one, readers.FeatureStore)                     # a fused cache of one file is that file
    fused = readers.open_features([feats, other])
    assert fused.feature_dim == 13 and fused.provenances == [one.provenance, readers.FeatureStore.open(other).provenance]
    np.testing.assert_array_equal(fused.load_features([3, 1]),
                                  np.concatenate([one.load_features([3, 1]), readers.FeatureStore.open(other).load_features([3, 1])], 2))
    single = readers.FusedStore([one])
    np.testing.assert_array_equal(single.load_features(), one.load_features())
    assert single.references("val") == one.references("val") and single.grid == one.grid
    res = train(_cfg((feats, other), epochs=1), DecoderConfig(**SMALL), tmp_path / "run", echo=_quiet)
    ckpt = load_run(tmp_path / "run").ckpt
    assert res["epoch"] == 1 and ckpt["feature_dim"] == 13 and [f["path"] for f in ckpt["features"]] == [str(feats), str(other)]
    with pytest.raises(UserError, match="reads 2 feature file"):
        train(None, None, tmp_path / "run", resume=True, overrides={"features": (str(feats),), "epochs": 2},
              echo=_quiet)
    grid = make_store(tmp_path / "grid.h5", {"train": 12, "val": 4}, L=25, C=5, backbone="other-net")
    with pytest.raises(UserError, match="attention grids differ"):
        readers.open_features([feats, grid])
    ids = make_store(tmp_path / "ids.h5", {"train": 11, "val": 5}, L=16, C=5, backbone="other-net")
    with pytest.raises(UserError, match="different images or splits"):
        readers.open_features([feats, ids])
    with pytest.raises(UserError, match="twice"):
        readers.open_features([feats, feats])
