"""Tokenizer and vocabulary.

Tokenization (needs no nltk data): lowercase; the apostrophe is dropped inside a word
("dog's" -> "dogs", "don't" -> "dont"); every other character that is not a letter or a digit
separates tokens, so punctuation never becomes a token. Scoring does NOT use this tokenizer: it
scores raw captions with pycocoevalcap's PTBTokenizer, as the COCO evaluation does.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from pipeline.errors import UserError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
_APOSTROPHES = re.compile(r"['\u2018\u2019`]")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def tokenize(caption: str) -> list[str]:
    return _WORD.findall(_APOSTROPHES.sub("", caption.lower()))


class Vocab:
    """Word <-> id. Ids 0..3 are <pad> <start> <end> <unk>; words follow by falling count, then alphabetically."""

    pad, start, end, unk = 0, 1, 2, 3

    def __init__(self, words: Sequence[str], min_count: int = 1, counts: dict[str, int] | None = None):
        self.itos = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.min_count = min_count
        self.counts = counts or {}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> "Vocab":
        """Built from training captions only; words seen fewer than `min_count` times map to <unk>."""
        counts = Counter(t for c in captions for t in tokenize(c))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(words, min_count, {w: counts[w] for w in words})

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Token ids, no <start>/<end>."""
        return [self.stoi.get(t, self.unk) for t in tokens]

    def encode_caption(self, caption: str) -> list[int]:
        """<start> w1 .. wn <end> ids of a raw caption."""
        return [self.start] + self.encode(tokenize(caption)) + [self.end]

    def words(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first <end>, skipping <pad>/<start>/<unk>."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.end:
                break
            if i in (self.pad, self.start, self.unk):
                continue
            out.append(self.itos[i])
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.words(ids))

    def to_dict(self) -> dict:
        return {"itos": self.itos, "min_count": self.min_count, "counts": self.counts}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        itos = d["itos"]
        if list(itos[:4]) != list(SPECIALS):
            raise UserError(f"vocabulary does not start with {SPECIALS}; it was not written by this pipeline.")
        return cls(itos[4:], d.get("min_count", 1), d.get("counts"))

    def save(self, path: str | Path) -> None:
        """Written atomically, never through a link planted at `path` (fileio.atomic_write)."""
        from pipeline.fileio import atomic_write
        atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(self.to_dict(), indent=0), encoding="utf-8"))

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except UserError as e:
            raise UserError(f"{path}: {e}") from e
        except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError covers JSON and UTF-8 errors
            raise UserError(f"{path}: cannot read vocabulary ({e}). Use the vocab.json of a run made by "
                            f"`pipeline train`.") from e

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos
