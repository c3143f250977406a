"""Why do captions end on a function word? Decode a split and classify each such caption (issue 22).

    .venv/bin/python benchmarks/cut_captions.py --run runs/flickr8k_vgg19_soft --split test [--max-len 20]

For every caption whose last printed word is a function word (a, an, the, and, of, in, on, with, to,
at), the cause is one of: `max-len` (the hypothesis hit the length limit without <end>), `unk`
(the decoder emitted <unk> last and printing dropped it), `end` (the decoder chose <end> right after
the function word). Decodes the raw model (no decoding rules: <unk> allowed, no trigram blocking, as
before issue 22), or with --rules the rules `pipeline score` applies by default; prints counts and
examples, and a JSON summary with --out.
"""
from __future__ import annotations

import argparse
import inspect
import json
from collections import Counter

import numpy as np

FUNCTION_WORDS = {"a", "an", "the", "and", "of", "in", "on", "with", "to", "at"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=20)
    ap.add_argument("--length-norm", type=float, default=0.0)
    ap.add_argument("--rules", action="store_true", help="apply score's default decoding rules")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from pipeline.decoder.decode import decode_features
    from pipeline.training import runs

    r = runs.load_run(a.run)
    st = runs.open_run_features(r.ckpt, r.run_dir)
    rows = st.rows(a.split)
    feats = st.load_features(rows).astype(np.float32)
    kw = dict(beam=a.beam, max_len=a.max_len, length_norm=a.length_norm, workers=2, progress=False)
    if a.rules:
        from pipeline.config import ScoreConfig
        from pipeline.decoder.rules import Rules
        kw["rules"] = Rules.from_config(ScoreConfig(), r.vocab)
    kw = {k: v for k, v in kw.items() if k in inspect.signature(decode_features).parameters}
    hyps = decode_features(r.model, feats, **kw)
    vocab, unk, end = r.vocab, r.vocab.unk, r.vocab.end
    causes, examples, repeats, tri = Counter(), {}, 0, 0
    for h in hyps:
        words = vocab.words(h.tokens)
        content = [w for w in words if w not in FUNCTION_WORDS | {"is", "are"}]
        repeats += len(content) != len(set(content))
        grams = list(zip(words, words[1:], words[2:]))
        tri += len(grams) != len(set(grams))
        if not words or words[-1] not in FUNCTION_WORDS:
            continue
        toks = [t for t in h.tokens if t != end]
        cause = "max-len" if not h.ended else ("unk" if toks and toks[-1] == unk else "end")
        causes[cause] += 1
        examples.setdefault(cause, []).append(" ".join(vocab.itos[t] for t in h.tokens))
    n = len(hyps)
    summary = {"run": str(a.run), "split": a.split, "captions": n, "decoding": kw,
               "end_on_function_word": sum(causes.values()), "causes": dict(causes),
               "repeat_a_content_word": repeats, "repeat_a_trigram": tri, "examples": {k: v[:5] for k, v in examples.items()}}
    print(json.dumps(summary, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
