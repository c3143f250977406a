"""Training objectives: the CIDEr-D reward with train-split document frequencies, and self-critical
sequence training (the sign of its gradient on a toy reward, both baselines)."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from pipeline.config import DecoderConfig
from pipeline.decoder.model import Decoder
from pipeline.training.objectives import SelfCritical, TrainCiderD
from pipeline.data.text import Vocab

REFS = {0: ["a dog runs on the grass", "a brown dog is running", "the dog runs"],
        1: ["two children play in the water", "kids playing in a pool", "children swim"],
        2: ["a man rides a bike", "a cyclist on a road", "a person riding a bicycle"]}


def test_cider_d_with_the_scored_refs_as_corpus_equals_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider
    cands = {0: "a dog runs", 1: "children play in a pool", 2: "a man on a road"}
    with contextlib.redirect_stdout(io.StringIO()):
        mean, per = Cider().compute_score(REFS, {k: [v] for k, v in cands.items()})
    reward = TrainCiderD([REFS[k] for k in (0, 1, 2)])
    got = reward([cands[k] for k in (0, 1, 2)], [REFS[k] for k in (0, 1, 2)])
    np.testing.assert_allclose(got, per, rtol=1e-12)
    # a bigger corpus changes the document frequencies (that is the point), not the perfect match's rank
    big = TrainCiderD([REFS[k] for k in (0, 1, 2)] + [["a dog", "a dog runs"]] * 5)
    got_big = big(["a dog runs on the grass", "a cat"], [REFS[0], REFS[0]])
    assert got_big[0] > 1.0 and got_big[1] == 0.0 and not np.isclose(got_big[0], got[0])
    assert big([""], [REFS[0]])[0] == 0.0                       # an empty caption scores 0


class ToyReward:
    """1 for captions whose first word is `word`, else 0."""

    def __init__(self, word: str):
        self.word = word

    def __call__(self, candidates, references):
        return np.array([1.0 if c.split()[:1] == [self.word] else 0.0 for c in candidates])


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_self_critical_gradient_raises_the_rewarded_captions(baseline, attention):
    torch.manual_seed(0)
    vocab = Vocab(["w%d" % i for i in range(8)])
    model = Decoder(DecoderConfig(embed_dim=8, hidden_dim=8, attention_dim=8, dropout=0.0, embed_dropout=0.0, context_dropout=0.0, hidden_dropout=0.0, attention=attention),
                    len(vocab), 6)
    feats = torch.randn(4, 9, 6)
    rows = torch.arange(4)
    target = vocab.stoi["w5"]
    scst = SelfCritical(ToyReward("w5"), {r: ["unused"] for r in range(4)}, vocab, samples=6,
                        baseline=baseline, max_len=3)

    def p_target():
        model.eval()
        with torch.no_grad():
            logp, _, _ = model.step(torch.full((4,), Vocab.start), *model.init_state(feats))
        model.train()
        return logp[:, target].exp().mean().item()
    before = p_target()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(25):
        loss, parts = scst(model, model, (feats, rows), torch.device("cpu"), False)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert p_target() > max(0.5, 4 * before), (before, p_target())
    assert 0.0 <= parts["reward"].item() <= 1.0


def test_baselines():
    """mean: b^k = mean of the other K - 1 rewards, so an image's K advantages sum to 0 (a caption is
    pushed up exactly when it beats its siblings); greedy: b = the greedy caption's reward."""
    r = np.array([[0.0, 1.0, 3.0], [0.5, 0.5, 0.5]])
    mean = SelfCritical(ToyReward("x"), {}, Vocab([]), samples=3).advantages(r)
    np.testing.assert_allclose(mean, [[-2.0, -0.5, 2.5], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(mean.sum(1), 0.0, atol=1e-12)
    greedy = SelfCritical(ToyReward("x"), {}, Vocab([]), samples=3, baseline="greedy").advantages(r, np.array([1.0, 0.0]))
    np.testing.assert_allclose(greedy, [[-1.0, 0.0, 2.0], [0.5, 0.5, 0.5]])


def test_self_critical_needs_two_samples_for_the_mean_baseline():
    with pytest.raises(ValueError, match="at least 2 samples"):
        SelfCritical(ToyReward("x"), {}, Vocab([]), samples=1, baseline="mean")
