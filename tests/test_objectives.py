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
from pipeline.training.objectives import SelfCritical, TrainCiderD, attention_entropy, reward_references
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
                        baseline=baseline, max_len=3, end_token=False)

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
    mean = SelfCritical(ToyReward("x"), {}, Vocab([]), samples=3, end_token=True).advantages(r)
    np.testing.assert_allclose(mean, [[-2.0, -0.5, 2.5], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(mean.sum(1), 0.0, atol=1e-12)
    greedy = SelfCritical(ToyReward("x"), {}, Vocab([]), samples=3, baseline="greedy", end_token=True).advantages(r, np.array([1.0, 0.0]))
    np.testing.assert_allclose(greedy, [[-1.0, 0.0, 2.0], [0.5, 0.5, 0.5]])


def test_self_critical_needs_two_samples_for_the_mean_baseline():
    with pytest.raises(ValueError, match="at least 2 samples"):
        SelfCritical(ToyReward("x"), {}, Vocab([]), samples=1, baseline="mean", end_token=True)


# ---- the reward's input and its corpus table (issue 18 part 1) ------------------------------------------

def test_cider_d_table_does_not_grow_with_the_candidates():
    """pycocoevalcap's counts2vec looks up every candidate n-gram in document_frequency; with its
    defaultdict each unseen one was inserted (the table grew without bound over SCST). The lookup now
    never inserts, and the values stay those of a fresh scorer."""
    reward = TrainCiderD([REFS[k] for k in (0, 1, 2)])
    table = dict(reward.df)
    fixed = ["a dog runs on grass", "kids in a pool", "zebra xylophone"]
    before = reward(fixed, [REFS[0], REFS[1], REFS[2]])
    rng = np.random.default_rng(0)
    words = [f"v{i}" for i in range(300)] + "a dog runs on the grass children play".split()
    for _ in range(60):
        cands = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(20)]
        reward(cands, [REFS[int(k)] for k in rng.integers(0, 3, 20)])
    assert len(reward.df) == len(table) and dict(reward.df) == table
    np.testing.assert_array_equal(reward(fixed, [REFS[0], REFS[1], REFS[2]]), before)
    np.testing.assert_array_equal(TrainCiderD([REFS[k] for k in (0, 1, 2)])(fixed, [REFS[0], REFS[1], REFS[2]]),
                                  before)


class Recorded:
    """Wraps a reward and keeps what it was given and what it returned."""

    def __init__(self, reward):
        self.reward, self.calls = reward, []

    def __call__(self, candidates, references):
        r = self.reward(candidates, references)
        self.calls.append((list(candidates), np.asarray(r)))
        return r


class FixedPolicy:
    """Stands in for the Decoder: `sample` returns the given captions whatever it is asked."""

    training = True

    def __init__(self, out: dict, entropy_weight: float = 0.0):
        self.out, self.cfg = out, DecoderConfig(entropy_weight=entropy_weight)

    def sample(self, feats, n, max_len, *, greedy=False):
        return self.out

    def eval(self):
        pass

    def train(self, mode=True):
        pass


WORDS = Vocab("a dog runs on the grass".split())


def _sampled(captions: list[list[str]], T: int) -> dict:
    """Decoder.sample's output for captions given as word lists ("<end>" where one ended), padded to T."""
    ids = [[WORDS.stoi[w] for w in c] + [Vocab.pad] * (T - len(c)) for c in captions]
    mask = [[1.0] * len(c) + [0.0] * (T - len(c)) for c in captions]
    tokens = torch.tensor(ids)
    return {"tokens": tokens, "mask": torch.tensor(mask),
            "logp": torch.full(tokens.shape, -1.0, requires_grad=True)}


def _scst(captions, *, end_token, max_len=6):
    refs = reward_references({0: REFS[0], 1: REFS[1]}, end_token)
    reward = Recorded(TrainCiderD(list(refs.values())))
    scst = SelfCritical(reward, refs, WORDS, samples=2, max_len=max_len, end_token=end_token)
    policy = FixedPolicy(_sampled(captions, max_len + 1))
    scst(policy, policy, (torch.zeros(1, 4, 3), torch.tensor([0])),
         torch.device("cpu"), False)
    (texts, r), = reward.calls
    return texts, r, reward.reward


@pytest.mark.parametrize("end_token", [False, True])
def test_an_emitted_unk_is_scored_as_a_word(end_token):
    """Vocab.decode drops <unk>, so "a dog <unk> runs" used to be rewarded as "a dog runs": an <unk>
    cost nothing. It is now a word of the caption that matches no reference n-gram."""
    texts, r, cider = _scst([["a", "dog", "runs", "<end>"], ["a", "dog", "<unk>", "runs", "<end>"]],
                            end_token=end_token)
    end = " <end>" if end_token else ""
    assert texts == ["a dog runs" + end, "a dog <unk> runs" + end]
    assert r[1] < r[0] - 0.1
    np.testing.assert_array_equal(r, cider(texts, [reward_references(REFS, end_token)[0]] * 2))


def test_the_reward_reads_the_end_token_of_captions_that_ended():
    """With end_token the caption that ended is "... grass <end>" against references ending in <end>: its
    final n-grams match the references' endings; the same words cut at max_len (no <end>) do not."""
    ended = ["a", "dog", "runs", "on", "the", "grass", "<end>"]
    cut = ["a", "dog", "runs", "on", "the", "grass"]                 # max_len = 6 words, never ended
    texts, r, cider = _scst([ended, cut], end_token=True)
    assert texts == ["a dog runs on the grass <end>", "a dog runs on the grass"]
    assert r[0] > r[1] + 0.1
    with_end = [c + " <end>" for c in REFS[0]]
    np.testing.assert_array_equal(r, cider(texts, [with_end, with_end]))
    assert cider.df[("grass", "<end>")] == 1 and cider.df[("<end>",)] == 2
    texts, r, _ = _scst([ended, cut], end_token=False)              # the old reward: both the same words
    assert texts == ["a dog runs on the grass"] * 2 and r[0] == r[1]


def test_entropy_bonus_has_one_definition():
    """Hard attention's entropy bonus under SCST is xe_loss's: only the captions that sampled their
    locations contribute, over their tokens, divided by the tokens of all captions (teacher forcing:
    B*T). It used to count every caption under SCST."""
    torch.manual_seed(0)
    out = _sampled([["a", "dog", "<end>"], ["dog", "<end>"], ["the", "dog", "runs", "<end>"], ["<end>"]], 5)
    ent = torch.rand(4, 5) + 0.5
    sampled = torch.tensor([True, False, True, False])
    out.update(entropy=ent, logp_s=torch.zeros(4, 5), sampled=sampled)
    scst = SelfCritical(ToyReward("a"), {0: ["x"], 1: ["x"]}, WORDS, samples=2, max_len=4, end_token=True)
    policy = FixedPolicy(out, entropy_weight=0.25)
    loss, _ = scst(policy, policy, (torch.zeros(2, 4, 3), torch.tensor([0, 1])),
                   torch.device("cpu"), False)         # rewards 1, 0 | 0, 0: image 0 has advantages +-1
    m = out["mask"]
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0])
    pg = -(adv[:, None] * out["logp"] * m).sum() / m.sum()
    bonus = (ent * m)[sampled].sum() / m.sum()         # rows 0 and 2 only, over all 10 tokens
    torch.testing.assert_close(loss, pg - 0.25 * bonus)
    # teacher forcing: the same function with every token of B x T counted is xe_loss's old (B*T) form
    full = attention_entropy(ent, torch.ones_like(ent), sampled)
    torch.testing.assert_close(full, (ent.sum(1) * sampled.float()).sum() / ent.numel())
