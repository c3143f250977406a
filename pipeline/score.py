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

from .decode import Hypothesis, decode_features
from .errors import UserError
from .store import FeatureStore, check_same_provenance
from .text import Vocab, tokenize

METRIC_ORDER = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


@dataclass
class ScoreConfig:
    split: str = "val"
    beam: int = 3
    max_len: int = 20
    length_norm: float | None = None
    batch_size: int = 100
    device: str = "cpu"
    workers: int = 1            # CPU decoding processes (decode.decode_features)
    progress: bool = True


# -- locating a run and its features --------------------------------------------------------------
def latest_run(runs_dir: str | Path = "runs") -> Path:
    """The run under `runs_dir` whose best.pt was written last."""
    runs_dir = Path(runs_dir)
    cands = sorted(runs_dir.glob("*/best.pt"), key=lambda p: p.stat().st_mtime) if runs_dir.is_dir() else []
    if not cands:
        raise UserError(f"{runs_dir}/: no trained run (no */best.pt). Train one with `pipeline train` "
                        f"or pass --run DIR.")
    return cands[-1].parent


def resolve_run(run: str | Path | None) -> Path:
    if run is None:
        return latest_run()
    run = Path(run)
    if not (run / "best.pt").exists() and not (run / "last.pt").exists():
        raise UserError(f"{run}: not a run directory (no best.pt/last.pt). Pass a directory made by "
                        f"`pipeline train`, e.g. --run runs/NAME.")
    return run


def load_model(run_dir: Path, device: str = "cpu"):
    """(model, vocab, checkpoint) of a run, via train.load_run (best.pt, else last.pt)."""
    try:
        from .train import load_run
    except ImportError as e:  # the trainer lives in another module; say so instead of a traceback
        raise UserError(f"cannot load runs: pipeline.train is not available ({e}).") from e
    which = "best" if (run_dir / "best.pt").exists() else "last"
    model, vocab, ckpt = load_run(run_dir, which=which)
    model.to(device).eval()
    return model, vocab, ckpt


def features_of_run(ckpt: dict, run_dir: Path, override: str | Path | None) -> Path:
    """The features file: --features, else the path recorded in the checkpoint (as given, or relative to the run)."""
    if override is not None:
        path = Path(override)
        if not path.exists():
            raise UserError(f"{path}: no such feature file (--features).")
        return path
    rec = ckpt.get("features_path")
    if not rec:
        raise UserError(f"{run_dir}: the checkpoint does not record its features file; pass --features FILE.")
    for p in (Path(rec), run_dir / rec, run_dir.parent.parent / rec):
        if p.exists():
            return p
    raise UserError(f"{run_dir}: its features file {rec} does not exist here; pass --features FILE "
                    f"(made by the same extraction).")


def run_provenance(ckpt: dict) -> dict | None:
    """Provenance of the features a run was trained on."""
    return ckpt.get("provenance")


def open_checked_store(path: Path, ckpt: dict, run_dir: Path) -> FeatureStore:
    store = FeatureStore.open(path)
    expected = run_provenance(ckpt)
    if expected:
        check_same_provenance(expected, store.provenance, what="this feature file",
                              where=f"{path} (for run {run_dir})")
    return store


# -- captions and COCO results --------------------------------------------------------------------
def coco_id(image_id: str):
    """COCO ids are integers; other datasets keep their string ids (Flickr file names)."""
    return int(image_id) if isinstance(image_id, str) and image_id.isdigit() else image_id


def write_results(path: Path, image_ids, captions) -> None:
    res = [{"image_id": coco_id(i), "caption": c} for i, c in zip(image_ids, captions)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(path)


# -- language metrics -----------------------------------------------------------------------------
def java_available() -> bool:
    return shutil.which("java") is not None


def spice_available() -> bool:
    try:
        import pycocoevalcap.spice as sp
    except ImportError:
        return False
    lib = Path(sp.__file__).parent / "lib"
    return java_available() and all((lib / j).exists() for j in SPICE_JARS)


def _py_tokenize(caps: dict) -> dict:
    """Fallback when Java is missing: lowercase, punctuation dropped (close to, not equal to, PTB)."""
    return {k: [" ".join(tokenize(c["caption"])) for c in v] for k, v in caps.items()}


def language_metrics(candidates: dict, references: dict, *, log=print) -> tuple[dict, dict]:
    """candidates {key: caption}, references {key: [raw captions]} -> ({metric: value in [0,1]}, notes)."""
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
        from pycocoevalcap.spice.spice import Spice
        scorers.append((Spice(), "SPICE"))
    else:
        log("SPICE skipped: its Stanford CoreNLP 3.6.0 jars are not installed in pycocoevalcap/spice/lib "
            "(they are downloaded from the internet on first use).")
        notes["skipped"].append("SPICE (jars missing)")
    out = {}
    for scorer, names in scorers:
        with contextlib.redirect_stdout(io.StringIO()):   # Bleu prints its internals
            value, _ = scorer.compute_score(gts, res)
        if isinstance(names, list):
            out.update({n: float(v) for n, v in zip(names, value)})
        else:
            out[names] = float(value)
        if hasattr(scorer, "close"):
            scorer.close()
    return out, notes


def format_table(metrics: dict, title: str = "") -> str:
    names = [m for m in METRIC_ORDER if m in metrics] + [m for m in metrics if m not in METRIC_ORDER]
    width = max(len(n) for n in names) if names else 8
    lines = [title] if title else []
    lines += [f"  {n:<{width}}  {100 * metrics[n]:6.2f}" for n in names]
    return "\n".join(lines)


# -- attention accuracy on synthetic data ---------------------------------------------------------
def object_words(objects_per_image) -> tuple[set[str], set[str], dict[str, str]]:
    """(colour words, shape words, plural -> singular): from pipeline.synth when it exists, else
    read from the objects themselves (plurals then by adding "s"/"es")."""
    try:
        from . import synth
        colors, shapes = {c.lower() for c in synth.COLORS}, {s.lower() for s in synth.SHAPES}
        plurals = {p: s for s, p in getattr(synth, "PLURALS", {}).items()}
        if colors and shapes:
            return colors, shapes, plurals
    except (ImportError, AttributeError, TypeError):
        pass
    colors, shapes = set(), set()
    for objs in objects_per_image:
        for o in objs or []:
            colors.add(str(o["color"]).lower())
            shapes.add(str(o["shape"]).lower())
    plurals = {s + suf: s for s in shapes for suf in ("s", "es")}
    return colors, shapes, plurals


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


def attention_accuracy(word_lists, alpha_list, objects_list, *, grid=(14, 14), image_size=(224, 224),
                       words: tuple[set[str], set[str], dict[str, str]] | None = None) -> AttentionStats:
    """Attention accuracy of generated object words.

    word_lists[i]: the generated tokens (strings) of image i, aligned with alpha_list[i] (T, L).
    A word names the objects whose colour (colour word) or shape (shape word) it is; when it names
    several, they are scored against the union of their boxes (counted in `ambiguous`).
    """
    colors, shapes, plurals = words or object_words(objects_list)
    gh, gw = grid
    acc = {"color": [], "shape": []}     # (mass, hit, chance_mass, chance_hit)
    st = AttentionStats()
    for words, alphas, objs in zip(word_lists, alpha_list, objects_list):
        if not objs:
            continue
        alphas = np.asarray(alphas, dtype=np.float64)
        for t, w in enumerate(words):
            name = plurals.get(w, w)
            kind = "color" if name in colors else "shape" if name in shapes else None
            if kind is None:
                continue
            named = [o for o in objs if str(o[kind]).lower() == name]
            if not named:
                st.not_in_image += 1
                continue
            st.ambiguous += len(named) > 1
            cover = cell_overlap([o["box"] for o in named], grid, image_size).reshape(-1)   # (L,)
            a = alphas[t].reshape(-1)                                                    # (L,)
            a = a / max(a.sum(), 1e-12)
            inside = cover >= 0.5
            acc[kind].append((float(a @ cover), float(inside[int(a.argmax())]),
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


def grid_and_size(store: FeatureStore) -> tuple[tuple[int, int], tuple[int, int]]:
    """Attention grid, and the pixel frame of the boxes: the synthetic image (224x224). Backbones
    squash-resize the whole image to their input (224 or 448), so the grid maps onto it proportionally."""
    g = store.attrs.get("grid") or [14, 14]
    try:
        from .synth import IMAGE_SIZE
        size = (int(IMAGE_SIZE), int(IMAGE_SIZE))
    except ImportError:
        size = (224, 224)
    return (int(g[0]), int(g[1])), size


# -- the whole job --------------------------------------------------------------------------------
def score_split(model, vocab: Vocab, store: FeatureStore, out_dir: Path, cfg: ScoreConfig, *,
                log=print, extra: dict | None = None) -> dict:
    """Decode `cfg.split` of `store` once per image, write results_<split>.json, score, write scores_<split>.json."""
    split = cfg.split
    rows = store.rows(split)
    if len(rows) == 0:
        have = sorted(set(store.split.tolist()))
        raise UserError(f"{store.path}: split {split!r} has no images (splits here: {', '.join(have)}). "
                        f"Pick one with --split.")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    feats = _RowFeatures(store, rows)
    hyps: list[Hypothesis] = decode_features(model, feats, beam=cfg.beam, max_len=cfg.max_len,
                                             length_norm=cfg.length_norm, batch_size=cfg.batch_size,
                                             device=cfg.device, workers=cfg.workers, progress=cfg.progress,
                                             desc=f"decode {split}")
    decode_s = time.time() - t0
    captions = [vocab.decode(h.tokens) for h in hyps]
    image_ids = [store.image_ids[r] for r in rows]
    res_path = out_dir / f"results_{split}.json"
    write_results(res_path, image_ids, captions)
    ended = sum(h.ended for h in hyps)
    log(f"decoded {len(rows)} {split} images (beam {cfg.beam}) in {decode_s:.1f}s "
        f"({len(rows) / max(decode_s, 1e-9):.1f} images/s); {len(rows) - ended} hit max_len={cfg.max_len}. "
        f"Results: {res_path}")

    scores = {"split": split, "beam": cfg.beam, "length_norm": cfg.length_norm, "max_len": cfg.max_len,
              "features": str(store.path), "split_size": len(rows), "decode_seconds": round(decode_s, 2),
              "results": str(res_path), **(extra or {})}
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

    if store.objects is not None:
        grid, size = grid_and_size(store)
        words = [[vocab.itos[i] for i in h.tokens] for h in hyps]
        st = attention_accuracy(words, [h.alphas.numpy() for h in hyps], [store.objects[r] for r in rows],
                                grid=grid, image_size=size)
        scores["attention"] = asdict(st)
        log(format_attention(st))

    path = out_dir / f"scores_{split}.json"
    path.write_text(json.dumps(scores, indent=1))
    log(f"scores: {path}")
    return scores


class _RowFeatures:
    """Slices of a split's rows read from the store on demand (bounded memory on big splits)."""

    def __init__(self, store: FeatureStore, rows: np.ndarray):
        self.store, self.rows = store, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, sl: slice) -> np.ndarray:
        return self.store.load_features(self.rows[sl]).astype(np.float32)   # (b, L, C)


def run_score(run: str | Path | None, cfg: ScoreConfig, features: str | Path | None = None, log=print) -> dict:
    run_dir = resolve_run(run)
    if not java_available():
        log("warning: `java` is not on PATH: METEOR and the PTB tokenizer cannot run (see below).")
    model, vocab, ckpt = load_model(run_dir, cfg.device)
    path = features_of_run(ckpt, run_dir, features)
    store = open_checked_store(path, ckpt, run_dir)
    log(f"run {run_dir}, features {path}")
    return score_split(model, vocab, store, run_dir, cfg, log=log,
                       extra={"run": str(run_dir), "epoch": ckpt.get("epoch")})
