"""How `score`, `browse` and `caption` decode a run: the decoding rules, the "auto" max-len, and what a
scores file records about the decoding (docs/scoring.md).

max-len 0 (the default, "auto") is resolved per run: the longest training caption (in words) that the
run's training kept (`train --max-len` drops longer ones), read from the run's features cache, so the
decoder is never cut shorter than what it learned. A run trained before this rule existed resolves the
same way (its cache and its saved train settings are all it needs). Without the cache in reach (a
`caption` on another machine), the run's training --max-len, the bound of that rule, is used.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Sequence

from pipeline.config import DecodingRules, TrainConfig, defaults
from pipeline.data.text import Vocab
from pipeline.decoder.rules import Rules, caption_counts, caption_words, longest_kept_caption
from pipeline.errors import UserError
from pipeline.training import runs

__all__ = ["Rules", "captions", "decoding_record", "format_counts", "resolve_max_len", "train_max_len"]


def train_max_len(loaded) -> int:
    """The --max-len a run was trained with (its caption filter, in words)."""
    saved = (loaded.ckpt or {}).get("train_config") or {}
    return int(saved.get("max_len", defaults(TrainConfig)["max_len"]))


def resolve_max_len(cfg, loaded: Sequence = (), store=None, *, log=print) -> tuple[int, str]:
    """(max_len in words, how it was chosen) for cfg.max_len (0: auto, see the module docstring).

    loaded: the runs decoded (an ensemble: the largest of their limits); store: their features store, or
    None to open the first run's recorded cache."""
    if cfg.max_len:
        return int(cfg.max_len), "given (--max-len)"
    limit = max(train_max_len(r) for r in loaded) if loaded else None
    if store is None and loaded:
        try:
            store = runs.open_run_features(loaded[0].ckpt, loaded[0].run_dir, None)
        except (UserError, OSError) as e:
            if loaded[0].which != "shipped":       # a shipped model carries its card's length: nothing to say
                log(f"max-len auto: the run's features cache is not readable ({e}); using its training "
                    f"--max-len {limit}.")
    caps = store.captions_of("train")[1] if store is not None else []
    n = longest_kept_caption(caps, limit)
    if n:
        within = f" (training kept <= {limit} words)" if limit else ""
        return n, f"auto: the longest train caption{within} in {', '.join(map(str, store.paths))}"
    n = limit or defaults(TrainConfig)["max_len"]
    return n, "auto: the training --max-len (no train captions in reach)"


def captions(hyps: Sequence, vocab: Vocab) -> list[str]:
    """The printed captions: words up to <end>, <unk> shown as "<unk>" (only emitted with --no-suppress-unk)."""
    return [" ".join(caption_words(h.tokens, vocab)) for h in hyps]


def decoding_record(cfg, max_len: int, rule: str, hyps: Sequence, vocab: Vocab) -> dict:
    """What a scores file says about the decoding: every decoding rule, the max-len used and why, and the
    counts of captions that did not finish, that end on a function word, and that repeat a trigram."""
    rec = {f.name: getattr(cfg, f.name) for f in fields(DecodingRules)}
    rec.update(max_len_words=max_len, max_len_rule=rule, **caption_counts(hyps, vocab))
    return rec


def format_counts(rec: dict, n: int) -> str:
    return (f"{rec['unfinished']} of {n} captions did not finish within {rec['max_len_words']} words; "
            f"{rec['function_word_endings']} end on a function word (a, an, the, and, of, in, on, with, to, at); "
            f"{rec['repeated_trigrams']} repeat a word trigram")
