"""Captions of a horizontally flipped image: "left" and "right" exchanged (issue 18, the seeds'
augmentation; the flipped view's features are /features_hflip of a cache made with `extract --flip`).

Only the words whose meaning a mirror changes are exchanged, as whole words or word prefixes of one
family: left/right, leftmost/rightmost, lefthand/righthand, left-hand/right-hand (and -handed),
leftward(s)/rightward(s), keeping their capitalisation. "Right" in its other senses ("right behind",
"right alongside") and "left" the verb ("left behind") are not told apart and are exchanged too. On
Flickr8k 150 of the 35,460 captions (0.42 %) hold one of these words, a handful of them in those senses.
"""
from __future__ import annotations

import re

_PAT = re.compile(r"\b(left|right)(most|wards?|hand(?:ed)?|-hand(?:ed)?)?\b", re.IGNORECASE)


def _swap(m: re.Match) -> str:
    word, rest = m.group(1), m.group(2) or ""
    other = "right" if word.lower() == "left" else "left"
    if word.isupper():
        other = other.upper()
    elif word[0].isupper():
        other = other.capitalize()
    return other + rest


def mirror_caption(caption: str) -> str:
    """The caption of the mirrored picture: 'a man on the left' -> 'a man on the right'."""
    return _PAT.sub(_swap, caption)
