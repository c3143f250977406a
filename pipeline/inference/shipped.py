"""Shipped models: trained decoders that travel with the repository, under models/<name>/.

    models/<name>/
      model.json         the manifest (FORMAT, FORMAT_VERSION): decoder config, feature size, the provenance
                         of every cache the decoder read (backbone, weights sha256, preprocessing, layer, grid,
                         dataset, split hashes), the extraction command that makes that cache, one entry per
                         file below with its sha256 and size, the val scores in fp32 and fp16, and where the
                         model came from (run, epoch, training command)
      decoder.pt         the decoder's weights only (a state dict of float16 or float32 tensors; no optimizer,
                         no RNG state), read with torch.load(weights_only=True)
      vocab.json         the vocabulary (text.Vocab)
      top.pt             only for a run trained on a cache of an earlier backbone layer (decoder.topped): the
                         weights of its fine-tuned encoder top (the `top.*` entries of the model's state dict),
                         in a file of their own so that each file stays under the size limit
      test_decoding.json the blind test split decoded with the shipped weights (COCO results format)
      README.md          the model card (export.py writes it from model_card.md)

`export.py` writes such a directory from a run (`pipeline export RUN --name NAME`). Here: finding and
reading them. A model is named by its folder (`--model NAME` is models/NAME; `pipeline models` lists the
folders, and the manifest's own name only where it differs: copies of a folder keep the name inside).
Nothing outside the folder is read: a manifest's file paths that lead out of it (`..`, absolute, a link
leading out) are refused. `load_model` checks the sha256 of every file against the manifest before
reading it (a corrupted or truncated file is one UserError), reads weights without running code
(fileio.torch_load), and returns a `runs.LoadedRun` whose checkpoint dict holds
what a run's does (decoder_config, vocab, features with provenance, feature_dim, num_regions), so score,
browse and caption treat a shipped model as one more run (`load_member`), also inside ensembles.
A shipped model has no run directory and no cache: scoring needs the cache its backbone makes
(`check_cache` names the `pipeline extract` command); captioning needs only the backbone weights.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.errors import UserError
from pipeline.fileio import torch_load
from pipeline.training import runs

FORMAT = "pipeline-model"
FORMAT_VERSION = 1
MANIFEST = "model.json"
DECODER_FILE, VOCAB_FILE, TOP_FILE = "decoder.pt", "vocab.json", "top.pt"
TOP_PREFIX = "top."                # state-dict keys of a TopDecoder's encoder top
CARD_FILE, TEST_DECODING_FILE = "README.md", "test_decoding.json"
ENV = "PIPELINE_MODELS"            # another models folder (tests, or models kept outside the checkout)
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
SELECT_METRIC = "CIDEr"            # what "best" means among shipped models (val, the stored dtype)


def models_dir() -> Path:
    """$PIPELINE_MODELS, else models/ at the root of this checkout."""
    env = os.environ.get(ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "models"


@dataclass(frozen=True)
class ModelRef:
    """`--model NAME` (or a path to a model directory), in the lists that also hold run directories."""
    name: str

    def __str__(self) -> str:
        return self.name


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise UserError(f"model name {name!r}: use lower-case letters, digits, '_', '.', '-' (at most 64), "
                        f"starting with a letter or digit, e.g. flickr8k_vgg19_soft.")
    return name


def resolve_model(ref: ModelRef | str) -> Path:
    """A model's directory: a path holding model.json, else models_dir()/NAME, NAME a folder's name (a name
    with a '/' or '..' would lead out of models/: refused)."""
    name = str(ref)
    p = Path(name)
    if (p / MANIFEST).is_file():
        return p
    if not name or name.startswith(".") or "/" in name or os.sep in name:
        raise UserError(f"--model {name}: not a folder of models/ nor a model folder here; a model's name is the "
                        f"name of its folder in {models_dir()}/, without '/' or '..' (`pipeline models` lists them), "
                        f"or pass the path of a folder holding {MANIFEST}.")
    d = models_dir() / name
    if (d / MANIFEST).is_file():
        return d
    have = [m["name"] for m in list_models() if "error" not in m]
    raise UserError(f"--model {name}: no shipped model of that name in {models_dir()}/ "
                    f"({'shipped: ' + ', '.join(have) if have else 'none is there'}). `pipeline models` lists them.")


def find_model(ref: str | Path) -> Path | None:
    """`--init-from REF`'s shipped model: REF is a folder holding model.json, or a models/ name that is not a
    path on disk (a run directory of that name wins); None otherwise."""
    p = Path(ref)
    if p.exists() and not (p / MANIFEST).is_file():
        return None
    try:
        return resolve_model(ref)
    except UserError:
        return None


def read_manifest(model_dir: str | Path) -> dict:
    path = Path(model_dir) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable model manifest ({e}). Restore the folder "
                        f"(`git checkout -- {model_dir}`) or export the model again.") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{path}: not a shipped-model manifest (format {m.get('format') if isinstance(m, dict) else m!r}).")
    version = int(m.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: model format {version} is newer than this code's ({FORMAT_VERSION}); update the "
                        f"pipeline package.")
    missing = [k for k in ("name", "decoder_config", "feature_dim", "num_regions", "features", "files")
               if k not in m]
    if missing or "decoder" not in m["files"] or "vocab" not in m["files"]:
        raise UserError(f"{path}: incomplete manifest (missing {', '.join(missing) or 'files.decoder/vocab'}).")
    return m


def list_models(root: str | Path | None = None) -> list[dict]:
    """Manifests of root/*/model.json, best val CIDEr first; "name" is the folder's (what --model takes),
    "manifest_name" the manifest's own where it differs; an unreadable one is {"name", "dir", "error"}."""
    root = Path(root) if root else models_dir()
    out = []
    for d in sorted(root.glob(f"*/{MANIFEST}")) if root.is_dir() else []:
        try:
            m = read_manifest(d.parent)
            if m["name"] != d.parent.name:
                m["manifest_name"] = m["name"]
            m.update(name=d.parent.name, dir=str(d.parent))
        except UserError as e:
            m = {"name": d.parent.name, "dir": str(d.parent), "error": str(e)}
        out.append(m)
    return sorted(out, key=lambda m: (-(val_metric(m) if val_metric(m) is not None else -1), m["name"]))


def val_metric(m: dict, metric: str = SELECT_METRIC, dtype: str | None = None) -> float | None:
    """A val metric (in [0, 1]) of the weights as shipped, decoded as the model decodes (`val_metrics`); of `dtype`
    (float32 / float16): at the decoding the export scored with."""
    scores = m.get("scores") or {}
    v = (((scores.get(dtype) or {}).get("metrics") or {}) if dtype else val_metrics(m)).get(metric)
    return float(v) if isinstance(v, (int, float)) else None


def val_metrics(m: dict) -> dict:
    """The val metrics of the weights as shipped: at the decoding chosen for the model (model.json "decoding",
    `chosen_decoding`) when it has one, else at the export's."""
    scores = m.get("scores") or {}
    return dict((m.get("decoding") or {}).get("val") or
                (scores.get(scores.get("stored") or "") or {}).get("metrics") or {})


def backbones_of(m: dict) -> list[str]:
    return [str((f.get("provenance") or {}).get("backbone")) for f in m.get("features", [])]


def check_file(model_dir: Path, entry: dict, what: str) -> Path:
    """The file of a manifest entry, after it is found inside the model folder and its size and sha256 match
    the manifest (else one UserError)."""
    from pipeline.data.datasets import is_inside
    from pipeline.provenance import sha256_file
    rel = entry.get("path") if isinstance(entry, dict) else None
    if not isinstance(rel, str) or not rel or not is_inside(Path(model_dir) / rel, model_dir):
        raise UserError(f"{Path(model_dir) / MANIFEST}: the {what} file's path {rel!r} leads outside the model folder "
                        f"{model_dir} ('..', an absolute path, or a symbolic link leading out); nothing outside the "
                        f"folder is read. The manifest was edited, or the folder is not one `pipeline export` wrote: "
                        f"restore the folder from where it came, or export the model again.")
    path = Path(model_dir) / rel
    fix = f"Restore it (`git checkout -- {path}`) or export the model again (`pipeline export`)."
    if not path.is_file():
        raise UserError(f"{path}: the model's {what} file is missing. {fix}")
    size, sha = path.stat().st_size, sha256_file(path)
    if sha != entry.get("sha256"):
        how = (f"truncated: {size} bytes, the manifest says {entry.get('bytes')}" if size < int(entry.get("bytes", 0))
               else f"corrupted: {size} bytes, the manifest says {entry.get('bytes')}")
        raise UserError(f"{path}: sha256 {sha[:16]}... differs from the {str(entry.get('sha256'))[:16]}... recorded in "
                        f"{MANIFEST}; the {what} file is {how}. {fix}")
    return path


def _features(m: dict) -> list[dict]:
    """The checkpoint-style feature entries: the recorded cache path where it exists here (as written,
    or under the checkout root), its provenance and its extraction command."""
    root = Path(__file__).resolve().parents[2]
    out = []
    for f in m["features"]:
        rec = Path(f.get("cache") or "")
        if rec.is_absolute() or ".." in rec.parts:    # a cache is named under the checkout's features/: no other
            rec = Path("")
        path = next((p for p in (rec, root / rec) if str(rec) not in ("", ".") and p.is_file()), rec)
        out.append({"path": str(path), "provenance": f.get("provenance"), "extract": f.get("extract", "")})
    return out


def load_model(ref: ModelRef | str, device="cpu", log=print) -> runs.LoadedRun:
    """A shipped model as a LoadedRun (which = "shipped"): every file sha256-checked, weights in float32."""
    from pipeline.config import DecoderConfig
    from pipeline.data.text import Vocab
    from pipeline.decoder.topped import build_decoder

    d = resolve_model(ref)
    m = read_manifest(d)
    files = m["files"]
    weights = check_file(d, files["decoder"], "decoder weights")
    vocab_path = check_file(d, files["vocab"], "vocabulary")
    top = check_file(d, files["top"], "encoder top") if files.get("top") else None
    try:
        sd = torch_load(weights, "model file")
        if top is not None:
            sd.update(torch_load(top, "model file"))
        vocab = Vocab.load(vocab_path)
        model = build_decoder(DecoderConfig.from_dict(m["decoder_config"]), len(vocab), int(m["feature_dim"]),
                              [f.get("provenance") for f in m["features"]])
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  (a file that matches its sha256 but not this code)
        raise UserError(f"{d}: the shipped weights do not load into this code's decoder ({type(e).__name__}: "
                        f"{str(e).splitlines()[0]}). Use the pipeline version named in {MANIFEST} "
                        f"({m.get('code_version')}).") from e
    src = m.get("source") or {}
    # max-len "auto" without the cache falls back to the training --max-len: make that the length the
    # card's scores were decoded with, so a shipped model decodes as its card says, cache or not
    train_config = dict(src.get("train_config") or {})
    words = ((m.get("scores") or {}).get("decoding") or {}).get("max_len_words")
    if words:
        train_config["max_len"] = int(words)
    ckpt = {"features": _features(m), "feature_dim": int(m["feature_dim"]), "num_regions": int(m["num_regions"]),
            "decoder_config": m["decoder_config"], "vocab": vocab.to_dict(), "epoch": src.get("epoch"),
            "train_config": train_config, "shipped": d.name, "manifest": m, "code_version": m.get("code_version")}
    return runs.LoadedRun(d, model.to(device).eval(), vocab, ckpt, "shipped")


def chosen_decoding(run_dirs: Sequence, models: Sequence) -> dict:
    """The decoding (beam, length norm) chosen for a lone run or shipped model, as ScoreConfig/CaptionConfig
    keywords; options given on the command line override it. A shipped model: model.json "decoding" (picked on
    val for it, docs/results.md#decoding-per-shipped-model); a run (the newest under runs/ when none is named): its
    training settings decode_beam / decode_length_norm (a run saved before them: beam 3 / length norm 0.7, the
    global default it was scored with). {} for ensembles and models without the entry (the global defaults)."""
    if len(run_dirs) + len(models) > 1:
        return {}
    try:
        if models:
            dec = read_manifest(resolve_model(models[0])).get("decoding") or {}   # the folder --model loads
            return {k: dec[k] for k in ("beam", "length_norm") if k in dec}
        train = runs.read_config(runs.resolve_run(run_dirs[0] if run_dirs else None)).get("train") or {}
    except UserError:
        return {}                                                             # loading it says what is wrong
    from pipeline.config import LEGACY
    return {k: train.get("decode_" + k, LEGACY["TrainConfig"]["decode_" + k]) for k in ("beam", "length_norm")}


def is_shipped(loaded: runs.LoadedRun) -> bool:
    return loaded.which == "shipped"


def load_member(ref, device="cpu", log=print) -> runs.LoadedRun:
    """One member of --run/--model lists: a ModelRef is a shipped model, anything else a run directory."""
    if isinstance(ref, ModelRef):
        return load_model(ref, device=device, log=log)
    return runs.load_run(ref, device=device, log=log)


def member_key(ref) -> Path:
    """The folder a --run/--model member stands for (to refuse the same member twice)."""
    return (resolve_model(ref) if isinstance(ref, ModelRef) else runs.resolve_run(ref)).resolve()


def results_dir(loaded: Sequence[runs.LoadedRun], runs_dir: str | Path = "runs") -> Path | None:
    """Where score/browse write for a shipped model (never into models/): runs/model_<name>[+...];
    None when the first member is a run (its own directory, as before)."""
    if not loaded or not is_shipped(loaded[0]):
        return None
    return Path(runs_dir) / ("model_" + "+".join(r.run_dir.name for r in loaded))


def check_cache(loaded: Sequence[runs.LoadedRun], features=None) -> None:
    """Scoring a shipped model needs the cache its backbone makes: one UserError naming the extraction."""
    for r in loaded:
        if not is_shipped(r) or features:
            continue
        for f in r.ckpt["features"]:
            if not Path(f["path"]).is_file():
                prov = f.get("provenance") or {}
                raise UserError(f"model {r.ckpt['shipped']} reads {prov.get('backbone')} features of "
                                f"{prov.get('dataset')} ({f['path'] or 'no cache recorded'}), which are not here. "
                                f"Make them with `{f.get('extract') or 'pipeline extract'}`, or pass --features FILE "
                                f"of the same extraction.")


def format_models(models: Sequence[dict]) -> str:
    """`pipeline models`: one line per model with its val scores (x100)."""
    if not models:
        return (f"no shipped models in {models_dir()}/ (a model is exported from a run with "
                f"`pipeline export RUN --name NAME`).")
    cols = ("Bleu_4", "METEOR", "CIDEr", "SPICE")
    w = max([28] + [len(m["name"]) for m in models])  # the name column fits the longest name
    lines = [f"{'model':{w}s} {'backbone':22s} {'dtype':8s} " + " ".join(f"{c:>7s}" for c in cols) + "  val images"]
    for m in models:
        if "error" in m:
            lines.append(f"{m['name']:{w}s} unreadable: {m['error']}")
            continue
        s = m.get("scores") or {}
        vals = [val_metric(m, c) for c in cols]
        lines.append(f"{m['name']:{w}s} {'+'.join(backbones_of(m)):22s} {s.get('stored', '?'):8s} "
                     + " ".join(f"{100 * v:7.2f}" if v is not None else f"{'-':>7s}" for v in vals)
                     + f"  {s.get('images', '?')}"
                     + (f"  ({MANIFEST} names it {m['manifest_name']})" if m.get("manifest_name") else ""))
    return "\n".join(lines)
