"""The results browser: a static, self-contained site that shows what a run does, image by image.

    pipeline browse --run RUN --split val [--beam 3] [--compare RUN2] [--out DIR]

One card per image: the picture, the generated caption, the reference captions and per-image scores
(BLEU-1/4, METEOR, ROUGE-L, CIDEr from pycocoevalcap, as `pipeline score` computes them). Hovering or
clicking a word of the caption shows that word's attention over the picture; "play" steps through
the words. Cards sort by a score (worst first by default) and filter by a word. With `--compare RUN2`
each card shows both runs side by side, sortable by the score difference. On synthetic data (a
store with /objects) a toggle draws the object boxes, and the box(es) named by the shown word stand
out, with the attention mass that falls inside them.

Data flow
---------
    runs.load_run ─▶ score.decode_split (beam search, once per image) ─▶ caption.words_and_maps
       ─▶ score.language_metrics(per_image=True) ─▶ SiteData ─▶ write_site ─▶ DIR/index.html

`SiteData` is plain lists (no model, no store), so tests and the size measurements in
docs/browse.md build sites from fake data without decoding anything. The site, its files and their
format are browse_site.py (`write_site`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.config import BrowseConfig
from pipeline.errors import UserError
# the site side, also importable from here (pipeline.reporting.browse is the command's module)
from pipeline.reporting.browse_site import (MARKER, RunResult, SiteData, check_replaceable,  # noqa: F401
                                            default_order, dequantize_maps, quantize_maps, site_size, write_site)


# -- from runs to SiteData ------------------------------------------------------------------------
def per_image_scores(captions: Sequence[str], references: Sequence[Sequence[str]], *, log=print
                     ) -> tuple[list[dict | None], dict, dict]:
    """Score each caption against its references with pycocoevalcap (score.language_metrics).

    -> (per image {metric: value} or None where an image has no references, corpus metrics, notes)."""
    from pipeline.inference.score import language_metrics
    keys = [i for i, refs in enumerate(references) if refs]
    if not keys:
        return [None] * len(captions), {}, {"tokenizer": None}
    corpus, notes = language_metrics({i: captions[i] for i in keys}, {i: list(references[i]) for i in keys},
                                     log=log, per_image=True)
    each = notes.pop("per_image")
    return [each.get(i) for i in range(len(captions))], corpus, notes


def check_same_images(ids_a: Sequence[str], ids_b: Sequence[str], *, what_a: str, what_b: str,
                      split: str) -> np.ndarray:
    """Positions in `ids_b` of each id of `ids_a`; refuse splits that hold different images."""
    a, b = list(map(str, ids_a)), list(map(str, ids_b))
    pos = {i: k for k, i in enumerate(b)}
    only_a = [i for i in a if i not in pos]
    only_b = sorted(set(b) - set(a))
    if only_a or only_b or len(a) != len(b):
        common = len(set(a) & set(b))
        example = (f"{only_a[0]!r} is only in {what_a}" if only_a else
                   f"{only_b[0]!r} is only in {what_b}" if only_b else "an image id is repeated")
        raise UserError(f"cannot compare {what_a} with {what_b}: their {split!r} splits hold different images "
                        f"({len(a)} vs {len(b)} images, {common} in common; {example}). --compare needs two "
                        f"runs trained on features of the same dataset and splits (e.g. caches of two backbones "
                        f"made from the same dataset folder); pick a RUN2 trained on the same data.")
    return np.array([pos[i] for i in a], dtype=np.int64)


def result_of(decoded, order: np.ndarray, references: list[list[str]], *, label: str, log=print) -> RunResult:
    """A RunResult from a score.DecodedSplit: hypotheses `order` (site order), scored on `references`."""
    from pipeline.inference.caption import words_and_maps
    words, maps = [], []
    for k in order:
        h = decoded.hyps[int(k)]
        w, m = words_and_maps(h, decoded.vocab)
        words.append(w)
        maps.append(np.asarray(m, dtype=np.float32).reshape(len(w), h.alphas.shape[-1]))   # (T', L)
    scores, corpus, notes = per_image_scores([" ".join(w) for w in words], references, log=log)
    run = decoded.runs[0] if decoded.runs else None
    cfg = decoded.cfg
    info = {"run": str(run.run_dir) if run else "", "checkpoint": run.which if run else "",
            "epoch": run.ckpt.get("epoch") if run else None, "beam": cfg.beam, "length_norm": cfg.length_norm,
            "max_len": decoded.max_len or cfg.max_len, "features": ", ".join(str(p) for p in decoded.store.paths),
            "decode_seconds": round(decoded.decode_s, 2), "tokenizer": notes.get("tokenizer"),
            "scored": sum(s is not None for s in scores)}
    return RunResult(label, words, maps, scores, corpus, info, grid=tuple(decoded.grid))


def check_image_root(root: Path, filenames: Sequence[str]) -> None:
    """--images is the folder the cache's image paths are relative to (the dataset folder given to extract
    --root); refuse one under which no image of the split is, e.g. the dataset's images/ folder itself."""
    if filenames and not any((root / f).is_file() for f in filenames[:50]):
        raise UserError(f"--images {root}: none of the split's images is under it (e.g. {root / filenames[0]}). "
                        f"Pass the folder the cache's image paths ({filenames[0]}, ...) are relative to: the "
                        f"dataset folder given to extract --root.")


def images_folder(root: Path | None, filenames: Sequence[str], *, where: str) -> Path:
    """The folder the split's images lie in (`root`, the dataset folder, or the folder of theirs below it),
    after refusing paths that lead out of it: a /filenames entry edited to `..` or an absolute path, or a
    symbolic link planted in the folder after extraction (the site would copy a file from elsewhere). The
    test is extraction's (datasets.is_inside). root None: a cache that records no dataset folder (absolute
    paths, as written); `..` is still refused."""
    import os
    from pipeline.data.datasets import is_inside
    names = [os.path.normpath(f) for f in filenames]
    escapes = lambda n: n == ".." or n.startswith(".." + os.sep) or (root is not None and os.path.isabs(n))  # noqa: E731
    base = Path(root) if root is not None else Path()
    try:
        folder = base / os.path.commonpath([os.path.dirname(n) or "." for n in names if not escapes(n)] or ["."])
    except ValueError:        # absolute and relative entries mixed (no root recorded)
        folder = base
    bad = [f for f, n in zip(filenames, names) if escapes(n) or not is_inside(base / n, folder)]
    if bad:
        raise UserError(f"{where}: {len(bad)} of the split's {len(names)} image paths lead outside the image folder "
                        f"{folder} (a '..' or absolute /filenames entry, or a symbolic link leading out), e.g. "
                        f"{bad[0]!r}; the site would copy a file from elsewhere. Remove the link(s), or extract the "
                        f"cache again from the dataset folder.")
    return folder


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Run directory names, or parent/name where two names are the same."""
    names = [Path(r).name for r in run_dirs]
    if len(set(names)) < len(names):
        names = [f"{Path(r).parent.name}/{Path(r).name}" for r in run_dirs]
    return names


def run_browse(run: str | Path | None, split: str, cfg, *, compare: str | Path | None = None,
               out: str | Path | None = None, features: Sequence[str | Path] | None = None,
               compare_features: Sequence[str | Path] | None = None, image_root: str | Path | None = None,
               bcfg: BrowseConfig | None = None, log=print) -> Path:
    """`pipeline browse`: decode `split` with RUN (and RUN2), score each image, write the site.

    cfg: score.ScoreConfig (beam, max_len, length_norm, batch size, device, workers).
    Returns the path of the site's index.html."""
    from pipeline.inference.score import decode_split, grid_and_size

    bcfg = bcfg or BrowseConfig()
    feats = [features, compare_features]
    loaded, labels, out, folder = _members(run, compare, out, split, feats, image_root, cfg, log)
    decoded = []
    for r, f, label in zip(loaded, feats, labels):
        log(f"{label}: decoding {split} (beam {cfg.beam}) ...")
        decoded.append(decode_split([r], split, cfg, f or None, log=log))
    first = decoded[0]
    store = first.store
    refs_of = store.references(split)
    references = [refs_of.get(int(r), []) for r in first.rows]
    notes = []
    if not any(references):
        notes.append(f"split {split!r} has no reference captions in {store.path} (withheld test split?): "
                     f"nothing is scored.")
    elif not all(references):
        notes.append(f"{sum(not r for r in references)} of {len(references)} images have no references: "
                     f"they are not scored.")
    results = _results(decoded, labels, references, split, notes, log)
    root = Path(image_root) if image_root else None
    paths = [(root / store.filenames[r]) if root else p for r, p in zip(first.rows, first.image_paths())]
    grid, frame = grid_and_size(store)
    objects = [store.objects[int(r)] for r in first.rows] if store.objects is not None else None
    title = " vs ".join(labels) + f" — {split}"
    data = SiteData(title=title, split=split, image_ids=[str(i) for i in first.image_ids], image_paths=paths,
                    references=references, runs=results, grid=grid, objects=objects,
                    frame=frame if objects is not None else None, notes=notes, train_references=store.captions_of("train")[1],
                    image_root=folder)
    return write_site(data, out, bcfg, log=log)


def _members(run, compare, out, split: str, feats: list, image_root, cfg, log) -> tuple[list, list[str], Path, Path]:
    """The run (and --compare RUN2) loaded, their labels, the site's directory and the images' folder; refuses,
    before any decoding, an --out that is not an earlier site, a wrong cache or --images, image paths that
    lead out of their folder, and two runs of different images."""
    from pipeline.device import resolve_device
    from pipeline.inference import shipped
    from pipeline.inference.score import split_rows
    from pipeline.training import runs

    device = resolve_device(cfg.device)
    loaded = [shipped.load_member(run, device=device, log=log)]     # a run, or a shipped model (ModelRef)
    if compare is not None:
        loaded.append(shipped.load_member(compare, device=device, log=log))
        if loaded[1].run_dir.resolve() == loaded[0].run_dir.resolve():
            raise UserError(f"--compare {compare}: that is the run being browsed; compare with another run.")
    labels = run_labels([r.run_dir for r in loaded])
    if out is None:
        out = (shipped.results_dir(loaded[:1]) or loaded[0].run_dir) / (
            f"browse_{split}" + (f"_vs_{loaded[1].run_dir.name}" if len(loaded) > 1 else ""))
    out = Path(out)
    check_replaceable(out)                  # before the decoding, not after
    for r, f in zip(loaded, feats):
        shipped.check_cache([r], f)
    # refuse a comparison of different images before decoding anything
    stores = [runs.open_run_features(r.ckpt, r.run_dir, f or None) for r, f in zip(loaded, feats)]
    ids = [[st.image_ids[k] for k in split_rows(st, split)] for st in stores]
    names = [stores[0].filenames[k] for k in split_rows(stores[0], split)]
    if image_root is not None:
        check_image_root(Path(image_root), names)
    recorded = stores[0].attrs.get("dataset_root")
    folder = images_folder(Path(image_root) if image_root is not None else Path(recorded) if recorded else None,
                           names, where=f"{stores[0].path}" + (f" (--images {image_root})" if image_root else ""))
    if len(loaded) > 1:
        check_same_images(ids[0], ids[1], what_a=f"run {loaded[0].run_dir} ({stores[0].path})",
                          what_b=f"run {loaded[1].run_dir} ({stores[1].path})", split=split)
    return loaded, labels, out, folder


def _results(decoded: list, labels: list[str], references: list[list[str]], split: str, notes: list[str],
             log) -> list[RunResult]:
    """Each decoded run in the first one's image order, scored on the first one's references; what a reader
    must know (other references, captions that differ from `pipeline score`'s, no METEOR) goes to `notes`."""
    from pipeline.training import runs
    first, store = decoded[0], decoded[0].store
    results = []
    for d, label in zip(decoded, labels):
        order = (np.arange(len(d.rows)) if d is first else
                 check_same_images(first.image_ids, d.image_ids, what_a=labels[0], what_b=label, split=split))
        if d is not first:
            other = d.store.references(split)
            if any(sorted(other.get(int(d.rows[k]), [])) != sorted(ref) for k, ref in zip(order, references)):
                notes.append(f"{label}'s features file holds other reference captions for some images; both "
                             f"runs are scored on {labels[0]}'s ({store.path}).")
        log(f"{label}: scoring {len(order)} captions per image ...")
        results.append(result_of(d, order, references, label=label, log=log))
        scored, differ = runs.check_against_results(d.runs[0].run_dir, split, d.cfg, d.image_ids, d.captions)
        results[-1].info.update(results_file=str(scored) if scored else None, decoding=runs.decoding_name(d.cfg))
        if differ:
            notes.append(f"{label}: {differ} of {len(d.rows)} captions differ from {scored}, which `pipeline score` "
                         f"wrote with the same decoding (from another checkpoint?).")
        tok = results[-1].info.get("tokenizer")
        if tok and tok != "PTBTokenizer":
            notes.append(f"{label}: scored with the {tok} tokenizer, without METEOR: not comparable to "
                         f"published figures (install java).")
    return results
