"""What `pipeline score` (and the trainer's val decoding) decode with: the decoding rules of config.DecodingRules,
the "auto" max-len, and what a scores file records about the decoding (pipeline/inference/decoding.py)."""
from __future__ import annotations

import json
from dataclasses import fields
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers_store import make_store
from pipeline import config
from pipeline.cache.readers import open_features
from pipeline.config import CaptionConfig, DecodingRules, ScoreConfig, TrainConfig
from pipeline.data.text import Vocab
from pipeline.inference import decoding, score

START, END, UNK = Vocab.start, Vocab.end, Vocab.unk


class Chain(torch.nn.Module):
    """Next token from the previous one only: {prev: {next: p}} over word ids (log 0 = -inf elsewhere)."""

    def __init__(self, vocab: Vocab, chain: dict):
        super().__init__()
        V = len(vocab)
        self.logt = torch.full((V, V), -float("inf"))
        self.logt[:, Vocab.pad] = 0.0
        for prev, nxt in chain.items():
            self.logt[prev] = -float("inf")
            for j, p in nxt.items():
                self.logt[prev, j] = float(np.log(p))

    def init_state(self, feats):
        return (torch.zeros(feats.size(0), 1),), (feats,)

    def step(self, prev, state, ctx):
        return self.logt[prev], torch.full((prev.size(0), ctx[0].size(1)), 1.0 / ctx[0].size(1)), state


@pytest.fixture
def store_vocab(tmp_path):
    st = open_features(make_store(tmp_path / "f.h5", {"train": 8, "val": 4}, L=4, C=4))
    return st, Vocab.build(st.captions_of("train")[1], min_count=1)


def _score(store, vocab, model, tmp_path, monkeypatch, **cfg):
    monkeypatch.setattr(score, "language_metrics", lambda c, r, **kw: ({"Bleu_4": 0.0}, {}))   # not the subject
    out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"      # one folder per decoding
    score.score_split(model, vocab, store, out, ScoreConfig(split="val", progress=False, workers=1, **cfg),
                      log=lambda *a: None)
    (res,), (sc,) = out.glob("results_val*.json"), out.glob("scores_val*.json")
    return [r["caption"] for r in json.loads(res.read_text())], json.loads(sc.read_text())


def test_scores_record_the_decoding_and_the_unfinished_captions(store_vocab, tmp_path, monkeypatch):
    """Fails on the old score: a decoder that never ends was only mentioned in a log line; now the scores
    file counts unfinished captions and captions ending on a function word, and records every rule."""
    st, vocab = store_vocab
    red, a = vocab.stoi["red"], vocab.stoi["a"]
    model = Chain(vocab, {START: {red: 1.0}, red: {a: 1.0}, a: {red: 1.0}})       # "red a red a ..." forever
    caps, sc = _score(st, vocab, model, tmp_path, monkeypatch, beam=2, block_trigrams=False)
    # auto max-len: the longest train caption, "there is a <colour> <shape> in the picture" (8 words)
    assert sc["max_len"] == 0 and sc["max_len_words"] == 8 and sc["max_len_rule"].startswith("auto")
    assert caps == ["red a red a red a red a"] * 4
    assert sc["unfinished"] == 4 and sc["function_word_endings"] == 4 and sc["repeated_trigrams"] == 4
    for f in fields(DecodingRules):
        assert sc[f.name] == getattr(ScoreConfig(block_trigrams=False), f.name)
    # with trigram blocking (the default) the loop is cut short of a repeat
    caps, sc = _score(st, vocab, model, tmp_path, monkeypatch, beam=2)
    assert sc["block_trigrams"] is True and sc["repeated_trigrams"] == 0
    assert caps == ["red a red a"] * 4 and sc["unfinished"] == 4      # nothing else is allowed after it


def test_unk_is_never_in_the_results(store_vocab, tmp_path, monkeypatch):
    """Fails on the old score: the model's favourite <unk> was decoded and silently dropped ("a")."""
    st, vocab = store_vocab
    a, red, circle = vocab.stoi["a"], vocab.stoi["red"], vocab.stoi["circle"]
    model = Chain(vocab, {START: {a: 1.0}, a: {UNK: 0.6, red: 0.4}, UNK: {END: 1.0}, red: {circle: 1.0},
                          circle: {END: 1.0}})
    caps, sc = _score(st, vocab, model, tmp_path, monkeypatch, beam=3)
    assert caps == ["a red circle"] * 4 and sc["suppress_unk"] is True
    caps, sc = _score(st, vocab, model, tmp_path, monkeypatch, beam=3, suppress_unk=False)
    assert caps == ["a <unk>"] * 4 and sc["suppress_unk"] is False


def test_auto_max_len(store_vocab, tmp_path):
    st, _ = store_vocab
    run = lambda ckpt: SimpleNamespace(ckpt=ckpt, run_dir=tmp_path, which="best")            # noqa: E731
    auto = ScoreConfig()
    assert decoding.resolve_max_len(auto, (), st)[0] == 8                        # no run: every train caption
    n, rule = decoding.resolve_max_len(auto, [run({"train_config": {"max_len": 6}})], st)
    assert n == 4 and "<= 6 words" in rule     # 7- and 8-word captions were dropped by training: "the circle is red"
    # a run saved without train settings (a shipped model): the training default, 30, bounds nothing here
    assert decoding.resolve_max_len(auto, [run({})], st)[0] == 8
    assert decoding.resolve_max_len(ScoreConfig(max_len=5), [run({})], st) == (5, "given (--max-len)")
    # the cache out of reach (caption on another machine): the run's training --max-len
    lines = []
    gone = run({"train_config": {"max_len": 12}, "features": [{"path": str(tmp_path / "gone.h5")}]})
    n, rule = decoding.resolve_max_len(CaptionConfig(), [gone], None, log=lines.append)
    assert n == 12 and "training --max-len" in rule and lines


def test_decoding_defaults_once_and_old_runs_keep_their_val_decoding():
    for cls in (ScoreConfig, CaptionConfig):
        assert issubclass(cls, config.BeamDecoding)
        d = config.defaults(cls)
        assert (d["length_norm"], d["block_trigrams"], d["remove_bad_endings"], d["suppress_unk"], d["max_len"]) == \
            (0.7, True, False, True, 0)
    new = TrainConfig()
    assert (new.length_norm, new.block_trigrams, new.suppress_unk) == (0.7, True, True)
    # a run saved before the decoding rules existed validates as it did: nothing masked, no length norm
    old = TrainConfig.from_dict({"epochs": 3, "max_len": 30})
    assert (old.length_norm, old.block_trigrams, old.remove_bad_endings, old.suppress_unk) == (0.0, False, False, False)


def test_trainer_val_decoding_uses_the_rules(store_vocab):
    """Fails on the old evaluate(): it decoded without rules (<unk> emitted, then dropped: "a")."""
    from pipeline.training.train import evaluate
    st, vocab = store_vocab
    a, red, circle = vocab.stoi["a"], vocab.stoi["red"], vocab.stoi["circle"]
    model = Chain(vocab, {START: {a: 1.0}, a: {UNK: 0.6, red: 0.4}, UNK: {END: 1.0}, red: {circle: 1.0},
                          circle: {END: 1.0}})
    rows = st.rows("val")
    refs = {int(r): ["a red circle"] for r in rows}
    feats = lambda rr: torch.zeros(len(rr), 4, 4)                               # noqa: E731
    for beam in (1, 3):
        _, caps = evaluate(model, feats, refs, vocab, TrainConfig(beam=beam), torch.device("cpu"))
        assert caps == ["a red circle"] * len(rows)
        _, caps = evaluate(model, feats, refs, vocab, TrainConfig.from_dict({"beam": beam}), torch.device("cpu"))
        assert caps == ["a"] * len(rows)        # a run trained before the rules: its val decoding is unchanged
