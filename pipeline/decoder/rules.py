"""What a decoded caption may be: the masks greedy and beam search apply to each step's log-probabilities.

The settings live in config.DecodingRules (shared by `score`, `caption`, `browse` and the trainer's val
decoding); `Rules.from_config(cfg, vocab)` turns them into token ids, and `StepMasks` applies them:

  * suppressed tokens (`<pad>`, `<start>`, and `<unk>` unless `--no-suppress-unk`): log p = -inf, so a
    caption is made of words and `<end>` only (as ruotianluo's `suppress_UNK`);
  * `--block-trigrams`: a word that would repeat a word trigram of the caption gets -inf (the trigram
    blocking of the captioning and summarisation literature);
  * `--remove-bad-endings`: `<end>` gets -inf right after a function word (BAD_ENDINGS), as ruotianluo's
    `remove_bad_endings`.

Also here: the words of a caption as printed (`caption_words`: `<unk>` shown, not dropped), the counts
`score` reports (unfinished captions, captions ending on a function word, captions repeating a trigram),
and the "auto" max-len rule (`longest_kept_caption`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from pipeline.data.text import Vocab, tokenize

# the function words `score` counts as a cut-off ending (issue 22's list)
FUNCTION_WORDS = ("a", "an", "the", "and", "of", "in", "on", "with", "to", "at")
# `--remove-bad-endings` forbids <end> after these: the function words and a few more that never end a
# caption of the training sets
BAD_ENDINGS = FUNCTION_WORDS + ("for", "from", "by", "into", "onto", "near", "or", "is", "are")


@dataclass(frozen=True)
class Rules:
    """Token ids the decoders need: Rules() restricts nothing (the model's raw distribution)."""
    suppress: tuple[int, ...] = ()        # ids never emitted
    block_trigrams: bool = False
    bad_endings: tuple[int, ...] = ()     # ids after which <end> is not allowed
    end_id: int = Vocab.end

    @classmethod
    def from_config(cls, cfg, vocab: Vocab | None = None) -> "Rules":
        """cfg: any config.DecodingRules (ScoreConfig, CaptionConfig, TrainConfig)."""
        suppress = (Vocab.pad, Vocab.start) + ((Vocab.unk,) if cfg.suppress_unk else ())
        bad = ()
        if cfg.remove_bad_endings and vocab is not None:
            bad = tuple(vocab.stoi[w] for w in BAD_ENDINGS if w in vocab.stoi)
        return cls(suppress, bool(cfg.block_trigrams), bad)

    def masks(self, vocab_size: int, device) -> "StepMasks | None":
        if not (self.suppress or self.block_trigrams or self.bad_endings):
            return None
        return StepMasks(self, vocab_size, device)


class StepMasks:
    """The rules as tensors on the decoding device (made once per decoding call, no host syncs per step)."""

    def __init__(self, rules: Rules, V: int, device):
        self.rules, self.V = rules, V
        ids = [i for i in rules.suppress if i < V]
        self.suppress = torch.tensor(ids, dtype=torch.long, device=device) if ids else None
        self.bad = None
        if rules.bad_endings:
            self.bad = torch.zeros(V, dtype=torch.bool, device=device)          # (V,) function word?
            self.bad[[i for i in rules.bad_endings if i < V]] = True

    def __call__(self, logp: torch.Tensor, hist: torch.Tensor | None, prev: torch.Tensor) -> torch.Tensor:
        """logp (R, V) float, hist (R, m) the words so far of each row (None or m = 0 at the first step),
        prev (R,) the last token -> logp with the forbidden continuations at -inf (in place)."""
        if self.suppress is not None:
            logp.index_fill_(1, self.suppress, -float("inf"))
        if self.bad is not None:
            end = self.rules.end_id
            logp[:, end] = logp[:, end].masked_fill(self.bad[prev], -float("inf"))
        if self.rules.block_trigrams and hist is not None and hist.size(1) >= 3:
            logp.masked_fill_(repeated_trigram_words(hist, self.V), -float("inf"))
        return logp


def repeated_trigram_words(hist: torch.Tensor, V: int) -> torch.Tensor:
    """hist (R, m) word ids -> (R, V) bool: w is True when (hist[-2], hist[-1], w) is already a trigram of
    the row. Trigram i is (hist[i], hist[i+1], hist[i+2]), i < m - 2; it bans hist[i+2] when its first two
    words are the row's last two."""
    m = hist.size(1)
    match = (hist[:, :m - 2] == hist[:, m - 2:m - 1]) & (hist[:, 1:m - 1] == hist[:, m - 1:m])   # (R, m-2)
    # scatter_add (not scatter_): the same word may be banned by several trigrams
    hits = torch.zeros(hist.size(0), V, device=hist.device).scatter_add_(1, hist[:, 2:], match.float())
    return hits > 0                                                                             # (R, V)


# -- captions as printed, and what `score` counts ---------------------------------------------------
def caption_words(tokens: Iterable[int], vocab: Vocab) -> list[str]:
    """The words of a decoded caption: up to <end>, <pad>/<start> dropped, <unk> kept and shown as "<unk>"
    (it is only emitted with --no-suppress-unk; Vocab.words would drop it silently)."""
    out = []
    for t in tokens:
        t = int(t)
        if t == vocab.end:
            break
        if t not in (vocab.pad, vocab.start):
            out.append(vocab.itos[t])
    return out


def has_repeated_trigram(words: Sequence[str]) -> bool:
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) < len(grams)


def caption_counts(hyps: Sequence, vocab: Vocab) -> dict:
    """{unfinished, function_word_endings, repeated_trigrams}: captions that hit max-len without <end>,
    whose last word is one of FUNCTION_WORDS (cut off mid-phrase), and that repeat a word trigram."""
    words = [caption_words(h.tokens, vocab) for h in hyps]
    return {"unfinished": sum(not h.ended for h in hyps),
            "function_word_endings": sum(bool(w) and w[-1] in FUNCTION_WORDS for w in words),
            "repeated_trigrams": sum(has_repeated_trigram(w) for w in words)}


# -- the "auto" max-len rule ------------------------------------------------------------------------
def longest_kept_caption(captions: Iterable[str], limit: int | None = None) -> int:
    """The most words (text.tokenize, as training counts them) of a training caption that training's
    length filter kept (1 <= words <= limit; no limit: every caption); 0 when there is none."""
    n = [len(tokenize(c)) for c in captions]
    return max((k for k in n if k >= 1 and (limit is None or k <= limit)), default=0)
