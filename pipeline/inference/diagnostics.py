"""Caption diagnostics beside the n-gram metrics (issue 18, parts 1 and 4; docs/scoring.md).

* **Diversity**, what self-critical training is known to narrow: over all captions of a split, the
  vocabulary used (distinct words), the share of captions that are not a training reference
  (exact match of the token sequences), distinct-1 / distinct-2 (distinct n-grams / all n-grams,
  n-grams taken within captions) and the mean length in words.
* **Gender words**: over the images whose references agree on a gendered person word (AGREEMENT
  below), how often the caption names the other gender, both, a gender-neutral person word only,
  the same gender, or no person word at all.

Every caption and reference goes through `text.tokenize` (the training tokenizer: lowercase,
apostrophes dropped, punctuation splits), so "man's" is the token "mans" (listed below).
The generated captions are `vocab.decode` outputs, already in that form.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

from pipeline.data.text import tokenize

# -- the word lists (the one place they are defined) -------------------------------------------------
MALE = frozenset("""
man men mans mens boy boys boyfriend boyfriends male males gentleman gentlemen guy guys lad lads
he him his himself father fathers dad dads son sons brother brothers husband husbands grandfather grandpa
uncle uncles king kings groom schoolboy schoolboys cowboy cowboys policeman policemen fireman firemen
businessman businessmen fisherman fishermen
""".split())
FEMALE = frozenset("""
woman women womans womens girl girls girlfriend girlfriends female females lady ladies ladys gal gals
she her hers herself mother mothers mom moms mum daughter daughters sister sisters wife wives
grandmother grandma aunt aunts queen queens bride schoolgirl schoolgirls cowgirl cowgirls policewoman
policewomen businesswoman businesswomen
""".split())
# generic person words that name no gender; role nouns (player, skier, biker) are not among them
NEUTRAL = frozenset("""
person persons people child children childs kid kids baby babies toddler toddlers infant infants adult adults
teenager teenagers teen teens youth youngster youngsters someone somebody individual individuals human humans
""".split())
GENDERS = {"male": MALE, "female": FEMALE}
OTHER = {"male": "female", "female": "male"}

# AGREEMENT: an image enters the gender diagnostic when at least MIN_AGREEING of its references use
# words of one gender only, and no reference uses a word of the other gender. (Flickr8k and COCO
# have 5 references per image, so 3 is a majority.)
MIN_AGREEING = 3
VERDICTS = ("right", "wrong", "mixed", "neutral", "none")   # of a caption, against the agreed gender


# -- diversity ---------------------------------------------------------------------------------------
def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def diversity(captions: Sequence[str], train_references: Iterable[str] | None = None) -> dict:
    """captions (N,) raw or decoded text -> {captions, vocab_size, novel, novel_count, train_references,
    distinct_1, distinct_2, mean_length}. `novel`: the fraction of captions whose token sequence is
    no training reference's (None without training references); distinct_n None when there is no n-gram."""
    toks = [tokenize(c) for c in captions]
    out: dict = {"captions": len(toks), "vocab_size": len({w for t in toks for w in t}),
                 "mean_length": sum(map(len, toks)) / len(toks) if toks else None}
    for n in (1, 2):
        grams = [g for t in toks for g in ngrams(t, n)]
        out[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else None
    train = {" ".join(tokenize(c)) for c in (train_references or ())}
    novel = sum(" ".join(t) not in train for t in toks)
    out.update(train_references=len(train), novel_count=novel if train else None,
               novel=novel / len(toks) if train and toks else None)
    return out


# -- gender words ------------------------------------------------------------------------------------
def genders_named(words: Iterable[str]) -> set[str]:
    """{"male", "female"} subset named by the words."""
    ws = set(words)
    return {g for g, vocab in GENDERS.items() if ws & vocab}


def agreed_gender(references: Sequence[str], min_agreeing: int = MIN_AGREEING) -> str | None:
    """"male" / "female" when the references agree (AGREEMENT above), else None."""
    named = [genders_named(tokenize(r)) for r in references]
    for g in GENDERS:
        if sum(s == {g} for s in named) >= min_agreeing and not any(OTHER[g] in s for s in named):
            return g
    return None


def verdict(caption: str, gender: str) -> str:
    """A caption against the agreed gender: right (names it, not the other), wrong (names the other
    only), mixed (both), neutral (no gendered word, a NEUTRAL one), none (no person word of the lists)."""
    words = tokenize(caption)
    named = genders_named(words)
    if named == {gender}:
        return "right"
    if named == {OTHER[gender]}:
        return "wrong"
    if named:
        return "mixed"
    return "neutral" if set(words) & NEUTRAL else "none"


def gender_verdicts(captions: Sequence[str], references: Sequence[Sequence[str]],
                    min_agreeing: int = MIN_AGREEING) -> tuple[list[str | None], list[str | None]]:
    """Per image: (agreed gender or None, verdict of its caption or None where the references do not agree)."""
    agreed = [agreed_gender(r, min_agreeing) if r else None for r in references]
    return agreed, [verdict(c, g) if g else None for c, g in zip(captions, agreed)]


def gender_summary(agreed: Sequence[str | None], verdicts: Sequence[str | None],
                   min_agreeing: int = MIN_AGREEING) -> dict:
    """Counts and shares of each verdict over the images with an agreed gender, in all and per gender.
    `other` = wrong + mixed: the captions that name the other gender."""
    def part(pairs):
        c = Counter(v for _, v in pairs)
        counts = {v: c.get(v, 0) for v in VERDICTS}
        n = len(pairs)
        counts["other"] = counts["wrong"] + counts["mixed"]
        return {"images": n, "counts": counts, "shares": {k: (v / n if n else None) for k, v in counts.items()}}
    pairs = [(g, v) for g, v in zip(agreed, verdicts) if g]
    out = part(pairs)
    out["min_agreeing"] = min_agreeing
    out["by_gender"] = {g: part([p for p in pairs if p[0] == g]) for g in GENDERS}
    return out


# -- both, as `pipeline score` and the browser report them ------------------------------------------
def diagnose(captions: Sequence[str], references: Sequence[Sequence[str]],
             train_references: Iterable[str] | None = None) -> dict:
    """captions (N,), references (N,) lists of raw captions (empty where withheld), the training
    split's raw captions -> {"diversity": {...}, "gender": {...}} (the scores json's entries)."""
    agreed, verdicts = gender_verdicts(captions, references)
    return {"diversity": diversity(captions, train_references), "gender": gender_summary(agreed, verdicts)}


def for_runs(captions: Sequence[Sequence[str]], references: Sequence[Sequence[str]],
             train_references: Sequence[str] | None = None) -> tuple[list[dict], list[str | None], list[list]]:
    """captions (R runs, N images) -> (per run `diagnose`, per image the agreed gender, per run and image
    the verdict): what the results browser shows."""
    agreed = [agreed_gender(r) if r else None for r in references]
    verdicts = [[verdict(c, g) if g else None for c, g in zip(caps, agreed)] for caps in captions]
    return [diagnose(caps, references, train_references) for caps in captions], agreed, verdicts


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_diagnostics(d: dict) -> str:
    """The log lines of `diagnose`'s result."""
    v, g = d["diversity"], d["gender"]
    f3 = lambda x: "n/a" if x is None else f"{x:.3f}"   # noqa: E731
    ml = "n/a" if v["mean_length"] is None else f"{v['mean_length']:.2f}"
    lines = [f"diversity over {v['captions']} captions: vocabulary {v['vocab_size']} words, "
             f"{_pct(v['novel'])} not among the {v['train_references']} distinct training references, "
             f"distinct-1 {f3(v['distinct_1'])}, distinct-2 {f3(v['distinct_2'])}, mean length {ml} words"]
    if not g["images"]:
        lines.append(f"gender words: no image whose references agree on a gender (>= {g['min_agreeing']} "
                     f"references name one gender, none the other)")
        return "\n".join(lines)
    c, s = g["counts"], g["shares"]
    per = "; ".join(f"{k} {b['images']}: other {_pct(b['shares']['other'])} ({b['counts']['other']}), "
                    f"neutral {_pct(b['shares']['neutral'])} ({b['counts']['neutral']})"
                    for k, b in g["by_gender"].items() if b["images"])
    lines.append(f"gender words over {g['images']} images whose references agree (>= {g['min_agreeing']} name one "
                 f"gender, none the other): the caption names the other gender {_pct(s['other'])} ({c['other']}: "
                 f"only it {c['wrong']}, both {c['mixed']}), a neutral word only {_pct(s['neutral'])} ({c['neutral']}), "
                 f"the same gender {_pct(s['right'])} ({c['right']}), no person word {_pct(s['none'])} ({c['none']}). "
                 f"By gender: {per}")
    return "\n".join(lines)
