"""Greedy, batched beam search and ensembles against toy models (no dependency on model.py), the decoding
rules (decoder/rules.py), plus real-Decoder checks."""
from __future__ import annotations

import itertools
import math
from collections import namedtuple

import pytest
import torch
import torch.nn as nn

from pipeline.config import ScoreConfig
from pipeline.data.text import Vocab
from pipeline.decoder.decode import Ensemble, Hypothesis, beam_search, decode_features, greedy_decode
from pipeline.decoder.rules import (Rules, caption_counts, caption_words, has_repeated_trigram,
                                    longest_kept_caption, repeated_trigram_words)

PAD, START, END, UNK = 0, 1, 2, 3
WORDS_ONLY = Rules(suppress=(PAD, START, UNK))
Ctx = namedtuple("Ctx", "feats proj")


class ToyRNN(nn.Module):
    """Feature-dependent toy decoder; dict state + namedtuple ctx to check the pytree handling."""

    def __init__(self, V=7, L=5, C=4, H=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, H)
        self.att = nn.Linear(H, C)
        self.cell = nn.GRUCell(H + C, H)
        self.out = nn.Linear(H, V)
        self.drop = nn.Dropout(0.5)  # must be off while decoding

    def init_state(self, feats):
        h = torch.tanh(feats.mean(1) @ torch.ones(feats.size(2), self.cell.hidden_size) * 0.1)
        return {"h": h, "step": torch.zeros(feats.size(0))}, Ctx(feats, feats * 2.0)

    def step(self, prev, state, ctx):
        q = self.att(state["h"])                                  # (B,C)
        alpha = torch.softmax((ctx.proj * q[:, None]).sum(-1), 1)  # (B,L)
        z = (alpha[:, :, None] * ctx.feats).sum(1)                # (B,C)
        h = self.cell(torch.cat([self.drop(self.emb(prev)), z], 1), state["h"])
        return torch.log_softmax(self.out(h), 1), alpha, {"h": h, "step": state["step"] + 1}


class Markov(nn.Module):
    """Next-token distribution depends only on the previous token (a probability 0 is log 0 = -inf)."""

    def __init__(self, table, L=3):
        super().__init__()
        self.logt = torch.log(torch.tensor(table, dtype=torch.float32))
        self.L = L

    def init_state(self, feats):
        return (torch.zeros(feats.size(0), 1),), {"f": feats}

    def step(self, prev, state, ctx):
        B = prev.size(0)
        return self.logt[prev], torch.full((B, self.L), 1.0 / self.L), state


def markov(rules: dict, V: int) -> Markov:
    """rules: {prev token: {next token: p}}; unlisted rows stay on <pad>."""
    table = [[0.0] * V for _ in range(V)]
    for i in range(V):
        for j, p in rules.get(i, {PAD: 1.0}).items():
            table[i][j] = p
    return Markov(table)


A, B_, C_, D, E = 4, 5, 6, 7, 8      # word ids of the Markov models


def test_beam1_equals_greedy():
    model = ToyRNN(V=9)
    feats = torch.randn(6, 5, 4)
    for kw in (dict(), dict(rules=Rules((PAD, START, UNK), True, (4, 5)), length_norm=0.7)):
        toks, alps = greedy_decode(model, feats, max_len=12, rules=kw.get("rules"))
        hyps = beam_search(model, feats, beam=1, max_len=12, **kw)
        assert model.training  # mode restored
        for t, a, h in zip(toks, alps, hyps):
            assert isinstance(h, Hypothesis)
            assert h.tokens == t
            assert torch.allclose(h.alphas, a)
            assert h.alphas.shape == (len(t), 5)


def test_beam_finds_sequence_greedy_misses():
    # start -> a 0.6 | b 0.4 ; a -> a 0.4 | b 0.3 | end 0.3 ; b -> end 0.99 | b 0.01
    model = markov({START: {A: 0.6, B_: 0.4}, A: {A: 0.4, B_: 0.3, END: 0.3}, B_: {END: 0.99, B_: 0.01}}, 6)
    feats = torch.zeros(2, 3, 4)
    toks, _ = greedy_decode(model, feats, max_len=6)
    assert toks[0] == [A] * 6                     # greedy loops on "a" and never ends
    hyps = beam_search(model, feats, beam=2, max_len=6)
    for h in hyps:
        assert h.tokens == [B_, END] and h.ended
        assert h.score == pytest.approx(math.log(0.4 * 0.99), abs=1e-5)
        assert h.alphas.shape == (2, 3)


def test_max_len_counts_words():
    """max_len words, then <end>: a caption of exactly max_len words ends; one word more is cut, unfinished."""
    model = markov({START: {A: 1.0}, A: {B_: 1.0}, B_: {C_: 1.0}, C_: {END: 1.0}}, 7)   # "a b c <end>"
    feats = torch.zeros(2, 3, 4)
    for decode in (lambda m: greedy_decode(model, feats, max_len=m)[0],
                   lambda m: [h.tokens for h in beam_search(model, feats, beam=2, max_len=m)]):
        assert decode(3) == [[A, B_, C_, END]] * 2            # 3 words + <end>: finished
        assert decode(2) == [[A, B_]] * 2                     # cut at 2 words, no <end>


def test_never_ending_decoder_is_unfinished():
    """<end> has probability 0: every caption stops at max_len words and says it did not finish."""
    model = markov({i: {A: 0.5, B_: 0.5} for i in range(6)}, 6)
    feats = torch.zeros(3, 3, 4)
    for beam in (1, 3):
        for h in beam_search(model, feats, beam=beam, max_len=7):
            assert len(h.tokens) == 7 and not h.ended and END not in h.tokens
            assert h.alphas.shape == (7, 3)
            assert h.score == pytest.approx(7 * math.log(0.5), abs=1e-4)
    toks, _ = greedy_decode(model, feats, max_len=7)
    assert all(len(t) == 7 and END not in t for t in toks)
    assert caption_counts(beam_search(model, feats, beam=2, max_len=7), Vocab(list("ab")))["unfinished"] == 3


def test_unfinished_never_beats_a_finished_caption():
    """Fails on the old beam search, where an ended hypothesis kept a slot and was pushed out by better
    live ones: "b <end>" (0.1) is found at step 2, then "a c" splits into two live hypotheses that both
    outscore it and never end; the unfinished "a c d d" (0.225) must not win over the finished caption."""
    model = markov({START: {A: 0.9, B_: 0.1}, B_: {END: 1.0}, A: {C_: 1.0},
                    C_: {D: 0.5, E: 0.5}, D: {D: 0.5, E: 0.5}, E: {D: 0.5, E: 0.5}}, 9)
    for h in beam_search(model, torch.zeros(2, 3, 4), beam=2, max_len=4):
        assert h.tokens == [B_, END] and h.ended
        assert h.score == pytest.approx(math.log(0.1), abs=1e-5)


def test_length_norm_changes_the_chosen_caption():
    """Raw log-probability prefers the short "b <end>" (log = -1.0); length normalisation (0.7) prefers
    "a c d <end>" (-1.5 over 4 tokens: -1.5 / 4**0.7 = -0.57 > -1.0 / 2**0.7 = -0.62)."""
    pb_end = math.exp(-1.0) / 0.5
    pd_end = math.exp(-1.5) / 0.5
    model = markov({START: {A: 0.5, B_: 0.5}, B_: {END: pb_end, E: 1 - pb_end}, A: {C_: 1.0}, C_: {D: 1.0},
                    D: {END: pd_end, E: 1 - pd_end}, E: {E: 1.0}}, 9)
    feats = torch.zeros(2, 3, 4)
    raw = beam_search(model, feats, beam=3, max_len=6)
    normed = beam_search(model, feats, beam=3, max_len=6, length_norm=0.7)
    assert [h.tokens for h in raw] == [[B_, END]] * 2
    assert raw[0].score == pytest.approx(-1.0, abs=1e-5)
    assert [h.tokens for h in normed] == [[A, C_, D, END]] * 2
    assert normed[0].score == pytest.approx(-1.5 / 4 ** 0.7, abs=1e-5)


def test_junk_endings_do_not_stop_the_search():
    """A peaked decoder: the second slot of the beam holds junk (p ~ 1e-9), whose <end> ranks among the K best
    candidates at every step. K such finished captions must not end the search while the live "a red circle"
    (p ~ 1) is far better: it is found and wins, with and without length normalisation."""
    V, eps = 8, 1e-9
    want = {START: A, A: B_, B_: C_, C_: END}
    table = [[eps] * V for _ in range(V)]
    for prev in range(V):
        table[prev][want.get(prev, END)] = 1 - eps * (V - 1)
    for norm in (None, 0.7):
        for h in beam_search(Markov(table), torch.zeros(2, 3, 4), beam=2, max_len=8, length_norm=norm,
                             rules=WORDS_ONLY):
            assert h.tokens == [A, B_, C_, END]


def _exhaustive_best(model, feats, words, max_len, norm, rules: Rules):
    """Enumerate every caption (<= max_len words then <end>, or max_len words unfinished) that the rules
    allow; finished captions first, by sum log p / len**norm (len counts <end>), else unfinished by sum log p."""
    model.eval()
    best = None
    with torch.no_grad():
        state0, ctx = model.init_state(feats)
        for n in range(max_len + 1):
            for seq in itertools.product(words, repeat=n):
                if rules.block_trigrams and has_repeated_trigram(list(seq)):
                    continue
                state, prev, s = state0, torch.tensor([START]), 0.0
                for w in seq:
                    lp, _, state = model.step(prev, state, ctx)
                    s, prev = s + lp[0, w].item(), torch.tensor([w])
                cands = []
                if not (seq and seq[-1] in rules.bad_endings):
                    lp, _, _ = model.step(prev, state, ctx)
                    cands.append(((True, (s + lp[0, END].item()) / (n + 1) ** norm), list(seq) + [END]))
                if n == max_len:
                    cands.append(((False, s), list(seq)))
                for key, toks in cands:
                    if best is None or key > best[0]:
                        best = (key, toks)
    model.train()
    return best


@pytest.mark.parametrize("norm", [0.0, 0.7])
@pytest.mark.parametrize("V,max_len,rules", [
    (7, 3, WORDS_ONLY),                                                   # words 4 5 6: K = 121
    (6, 4, Rules(suppress=(PAD, START, UNK), block_trigrams=True, bad_endings=(4,))),   # words 4 5: K = 63
])
def test_beam_equals_exhaustive_search(norm, V, max_len, rules):
    """With a beam at least as wide as the number of candidates of any step nothing is pruned: beam search
    returns the exhaustive best, with and without length normalisation, trigram blocking and bad endings.
    (Step max_len + 1 ranks the <end> candidates among every candidate, words included, as greedy's arg-max
    does: at most |words|**(max_len + 1) + |words|**max_len of them.)"""
    words = [w for w in range(V) if w not in rules.suppress and w != END]
    K = sum(len(words) ** n for n in range(max_len + 2))
    for seed in (3, 4):
        model = ToyRNN(V=V, seed=seed)
        with torch.no_grad():
            model.out.bias[END] -= 1.0      # some images prefer long captions, some stop early
        feats = torch.randn(2, 5, 4)
        hyps = beam_search(model, feats, beam=K, max_len=max_len, length_norm=norm, rules=rules)
        for b in range(2):
            (ended, score), toks = _exhaustive_best(model, feats[b:b + 1], words, max_len, norm, rules)
            assert hyps[b].tokens == toks and hyps[b].ended == ended
            assert hyps[b].score == pytest.approx(score, abs=1e-4)


def test_batched_equals_one_by_one():
    model = ToyRNN(V=9, seed=1)
    feats = torch.randn(7, 5, 4)
    rules = Rules((PAD, START, UNK), True, (4,))
    for norm in (None, 0.7):
        batch = beam_search(model, feats, beam=4, max_len=10, length_norm=norm, rules=rules)
        for i in range(7):
            single = beam_search(model, feats[i:i + 1], beam=4, max_len=10, length_norm=norm, rules=rules)[0]
            assert batch[i].tokens == single.tokens
            assert batch[i].score == pytest.approx(single.score, abs=1e-5)
            torch.testing.assert_close(batch[i].alphas, single.alphas)
    # decode_features = beam_search over batches
    whole = beam_search(model, feats, beam=4, max_len=10, rules=rules)
    for workers in (1, 2):   # 2: forked single-threaded processes
        chunked = decode_features(model, feats.numpy(), beam=4, max_len=10, rules=rules, batch_size=3,
                                  workers=workers, progress=False)
        assert [h.tokens for h in chunked] == [h.tokens for h in whole]
        assert all(torch.allclose(a.alphas, b.alphas) for a, b in zip(chunked, whole))


# -- the decoding rules ------------------------------------------------------------------------------
def test_unk_is_never_decoded_unless_allowed():
    """Fails on the old decoders (no rules): a model that prefers <unk> put it in greedy, beam and ensemble
    captions, and the printed caption silently lost it ("man holding a")."""
    vocab = Vocab(["a", "man", "holding", "dog"])                    # ids 4..7
    a, man, holding, dog = (vocab.stoi[w] for w in ("a", "man", "holding", "dog"))
    model = markov({START: {man: 1.0}, man: {holding: 1.0}, holding: {a: 1.0}, a: {UNK: 0.5, dog: 0.3, END: 0.2},
                    UNK: {END: 1.0}, dog: {END: 1.0}}, len(vocab))
    feats = torch.zeros(2, 3, 4)
    rules = Rules.from_config(ScoreConfig(max_len=8), vocab)          # the defaults of score/caption/browse
    assert UNK in rules.suppress
    ens = Ensemble([model, model])
    outs = [greedy_decode(model, feats, max_len=8, rules=rules)[0],
            [h.tokens for h in beam_search(model, feats, beam=3, max_len=8, rules=rules)],
            [h.tokens for h in beam_search(ens, feats, beam=3, max_len=8, rules=rules)],
            greedy_decode(ens, feats, max_len=8, rules=rules)[0]]
    for toks in outs:
        assert toks == [[man, holding, a, dog, END]] * 2
    # --no-suppress-unk: emitted, and printed visibly
    loose = Rules.from_config(ScoreConfig(max_len=8, suppress_unk=False), vocab)
    toks = greedy_decode(model, feats, max_len=8, rules=loose)[0][0]
    assert toks == [man, holding, a, UNK, END]
    assert caption_words(toks, vocab) == ["man", "holding", "a", "<unk>"]
    assert beam_search(model, feats, beam=2, max_len=8, rules=loose)[0].tokens == toks


def test_block_trigrams():
    """A decoder that loops "a b a b ..." repeats the trigram "a b a" without blocking; with it, no caption
    of greedy, beam or an ensemble repeats a word trigram."""
    model = markov({START: {A: 1.0}, A: {B_: 0.7, C_: 0.2, END: 0.1}, B_: {A: 0.7, C_: 0.2, END: 0.1},
                    C_: {END: 0.6, A: 0.2, B_: 0.2}}, 7)
    feats = torch.zeros(2, 3, 4)
    assert greedy_decode(model, feats, max_len=8)[0][0] == [A, B_] * 4
    rules = Rules(block_trigrams=True)
    ens = Ensemble([model, model])
    outs = [greedy_decode(model, feats, max_len=8, rules=rules)[0],
            [h.tokens for h in beam_search(model, feats, beam=3, max_len=8, rules=rules)],
            [h.tokens for h in beam_search(ens, feats, beam=3, max_len=8, rules=rules)]]
    for toks in outs:
        for t in toks:
            words = [str(w) for w in t if w != END]
            assert not has_repeated_trigram(words), t
    assert outs[0][0] == [A, B_, A, B_, C_, END]      # "a b a" taken, so "b a b" then c: the best allowed


def test_repeated_trigram_words_matches_brute_force():
    torch.manual_seed(0)
    hist = torch.randint(4, 7, (50, 9))
    for m in range(3, 10):
        got = repeated_trigram_words(hist[:, :m], 7)
        for r in range(50):
            h = hist[r, :m].tolist()
            want = {h[i + 2] for i in range(m - 2) if (h[i], h[i + 1]) == (h[-2], h[-1])}
            assert set(torch.nonzero(got[r]).view(-1).tolist()) == want


def test_remove_bad_endings():
    """<end> right after a function word is masked: "a" becomes "a dog"."""
    vocab = Vocab(["a", "man", "holding", "dog"])
    a, man, dog = (vocab.stoi[w] for w in ("a", "man", "dog"))
    model = markov({START: {a: 1.0}, a: {END: 0.5, dog: 0.3, man: 0.2}, dog: {END: 1.0}}, len(vocab))
    feats = torch.zeros(1, 3, 4)
    off = Rules.from_config(ScoreConfig(max_len=6), vocab)
    on = Rules.from_config(ScoreConfig(max_len=6, remove_bad_endings=True), vocab)
    assert not off.bad_endings and a in on.bad_endings and man not in on.bad_endings
    assert greedy_decode(model, feats, max_len=6, rules=off)[0][0] == [a, END]
    assert greedy_decode(model, feats, max_len=6, rules=on)[0][0] == [a, dog, END]
    assert beam_search(model, feats, beam=2, max_len=6, rules=on)[0].tokens == [a, dog, END]
    hyps = beam_search(model, feats, beam=2, max_len=6, rules=off)
    assert hyps[0].tokens == [a, END]
    assert caption_counts(hyps, vocab) == {"unfinished": 0, "function_word_endings": 1, "repeated_trigrams": 0}


def test_longest_kept_caption():
    caps = ["A dog.", "a dog runs on the grass", "one two three four five six seven eight", ""]
    assert longest_kept_caption(caps) == 8
    assert longest_kept_caption(caps, limit=7) == 6
    assert longest_kept_caption([], limit=7) == 0


# -- ensembles ------------------------------------------------------------------------------------
def test_two_member_ensemble_matches_hand_averaged_logprobs():
    """Each step's distribution is the normalised geometric mean of the two members' (computed here from
    the members' own steps); greedy follows its arg-max and a hypothesis' score is the sum of its entries."""
    m1, m2 = ToyRNN(V=8, seed=5), ToyRNN(V=8, seed=6)
    f1, f2 = torch.randn(3, 5, 4), torch.randn(3, 5, 4) * 2     # each member reads its own input
    ens = Ensemble([m1, m2], inputs=[0, 1])
    toks, alps = greedy_decode(ens, (f1, f2), max_len=6)
    hyps = beam_search(ens, (f1, f2), beam=3, max_len=6)
    m1.eval(), m2.eval()
    with torch.no_grad():
        for b in range(3):
            for seq, check_argmax in ((toks[b], True), (hyps[b].tokens, False)):
                (s1, c1), (s2, c2) = m1.init_state(f1[b:b + 1]), m2.init_state(f2[b:b + 1])
                prev, total = torch.tensor([START]), 0.0
                for i, w in enumerate(seq):
                    lp1, a1, s1 = m1.step(prev, s1, c1)
                    lp2, _, s2 = m2.step(prev, s2, c2)
                    mean = [(x + y) / 2 for x, y in zip(lp1[0].tolist(), lp2[0].tolist())]
                    norm = math.log(sum(math.exp(v) for v in mean))
                    want = [v - norm for v in mean]                       # log of p1^1/2 p2^1/2 / Z
                    if check_argmax:
                        assert w == max(range(8), key=want.__getitem__)
                        torch.testing.assert_close(alps[b][i], a1[0])     # the first member's attention
                    total += want[w]
                    prev = torch.tensor([w])
                if not check_argmax:
                    assert hyps[b].score == pytest.approx(total, abs=1e-4)


def test_ensemble_of_one_is_the_member():
    m = ToyRNN(V=8, seed=2)
    feats = torch.randn(4, 5, 4)
    a = beam_search(m, feats, beam=3, max_len=6, rules=WORDS_ONLY)
    b = beam_search(Ensemble([m]), feats, beam=3, max_len=6, rules=WORDS_ONLY)
    assert [h.tokens for h in a] == [h.tokens for h in b]


# -- the real decoder ---------------------------------------------------------------------------------
def test_real_decoder():
    from pipeline.decoder import model as model_mod   # a broken constructor fails here, it is not skipped
    cfg = model_mod.DecoderConfig()
    model = model_mod.Decoder(cfg, vocab_size=30, feature_dim=16)
    feats = torch.randn(5, 196, 16)
    rules = Rules.from_config(ScoreConfig(max_len=8))
    toks, alps = greedy_decode(model, feats, max_len=8, rules=rules)
    hyps = beam_search(model, feats, beam=1, max_len=8, rules=rules)
    assert [h.tokens for h in hyps] == toks
    hyps3 = beam_search(model, feats, beam=3, max_len=8, length_norm=0.7, rules=rules)
    assert len(hyps3) == 5 and all(h.alphas.shape == (len(h.tokens), 196) for h in hyps3)
    assert all(len(h.tokens) <= 9 and UNK not in h.tokens for h in hyps3)
    assert torch.allclose(hyps3[0].alphas.sum(1), torch.ones(len(hyps3[0].tokens)), atol=1e-4)


def test_real_decoder_ctx_per_image_equals_expanded_ctx():
    """model.Decoder takes ctx per image (ctx_per_image); beam search gives the same as with K copies."""
    from pipeline.decoder import model as model_mod
    torch.manual_seed(0)
    model = model_mod.Decoder(model_mod.DecoderConfig(embed_dim=16, hidden_dim=16, attention_dim=16),
                              vocab_size=30, feature_dim=16)
    assert model.ctx_per_image
    with torch.no_grad():   # some images end early (and leave the batch: ctx is re-selected), some never
        model.out.bias[END] += 0.3
    feats = torch.randn(9, 196, 16)
    rules = Rules((PAD, START, UNK), True, ())
    for kw in (dict(beam=3, max_len=8), dict(beam=4, max_len=6, length_norm=0.7, rules=rules)):
        got = beam_search(model, feats, **kw)
        model.ctx_per_image = False          # instance attribute: the generic, expanded-ctx path
        try:
            want = beam_search(model, feats, **kw)
        finally:
            del model.ctx_per_image
        assert [h.tokens for h in got] == [h.tokens for h in want]
        for g, w in zip(got, want):
            assert g.score == pytest.approx(w.score, abs=1e-4)
            torch.testing.assert_close(g.alphas, w.alphas, rtol=1e-4, atol=1e-5)
