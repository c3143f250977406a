"""Is bf16 autocast safe for a backbone? The measurement behind a registry entry's `bf16` mark.

    .venv/bin/python benchmarks/bf16_check.py --backbone vgg19 --threads 2 --json bench_out/bf16_vgg19.json
    .venv/bin/python benchmarks/bf16_check.py --backbone efficientnet_lite2 --threads 2

The images of --split (Flickr8k val: 1000) are extracted twice in memory, in fp32 and under bf16 autocast,
batch by batch on the same input (the order alternating per batch), stored as the cache stores them
(float16), decoded by the backbone's shipped decoder (models/<backbone>_soft, or --model) with the
decoding its model card was scored with (beam 3, length norm 0.7, its max-len), and scored with the
project's scorer (score.language_metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr on the raw references).
Printed and written (--json): both score rows (x100), bf16 - fp32, how many captions changed, the per-image
feature error of bf16 against fp32 (cosine, relative L2), and the verdict:

    safe  <=>  |dBLEU-4| <= 0.2  and  |dCIDEr| <= 0.5   (x100)

The card's own val row (scored from a cache made before precisions existed, i.e. fp32) is printed beside
them: the fp32 row should equal it, which checks that this script decodes and scores as `pipeline score`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline.errors import UserError  # noqa: E402
from precision_common import (load_inputs, loadavg, per_image_errors, run_backbone, split_records,  # noqa: E402
                              summarise_errors, write_json)

PRECISIONS = ("fp32", "bf16")
MAX_DBLEU4, MAX_DCIDER = 0.2, 0.5                 # x100: the "safe" criterion
SHOWN = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def load_decoder(backbone: str, model: str | None):
    """The shipped model (a runs.LoadedRun) and its manifest; refused unless it reads this backbone's final layer."""
    from pipeline.inference import shipped
    loaded = shipped.load_model(model or f"{backbone}_soft", device="cpu")
    m = loaded.ckpt["manifest"]
    provs = [f.get("provenance") or {} for f in m["features"]]
    if [p.get("backbone") for p in provs] != [backbone] or provs[0].get("layer"):
        raise UserError(f"model {loaded.run_dir.name} reads {', '.join(shipped.backbones_of(m))} "
                        f"(layer {provs[0].get('layer') or 'final'}), not the final layer of {backbone} alone; "
                        f"pass --model with a decoder trained on {backbone} features.")
    return loaded, m


def extract_both(module, spec, records, batch: int) -> tuple[dict, dict, dict]:
    """Features of `records` in fp32 and bf16 ((N, L, C) float16 each, as a cache stores them), the seconds each
    precision's backbone took, and the per-image errors of bf16 against fp32 (before the float16 rounding)."""
    feats = {p: [] for p in PRECISIONS}
    secs = dict.fromkeys(PRECISIONS, 0.0)
    cos, rel = [], []
    for bi, s in enumerate(range(0, len(records), batch)):
        x = load_inputs(records[s:s + batch], spec)
        out = {}
        for p in (PRECISIONS if bi % 2 == 0 else PRECISIONS[::-1]):          # alternate who goes first
            t0 = time.perf_counter()
            out[p] = run_backbone(module, x, batch, p)
            secs[p] += time.perf_counter() - t0
        c, r = per_image_errors(out["fp32"].float(), out["bf16"].float())
        cos.append(c)
        rel.append(r)
        for p in PRECISIONS:                       # (B, C, h, w) -> (B, L, C) float16, the cache's layout and dtype
            feats[p].append(out[p].flatten(2).transpose(1, 2).to(torch.float16).numpy())
        print(f"\rextracted {min(s + batch, len(records))}/{len(records)}", end="", flush=True)
    print()
    return ({p: np.concatenate(v) for p, v in feats.items()}, secs,
            summarise_errors(torch.cat(cos), torch.cat(rel)))


def cached_extraction(args, module, spec, records) -> tuple[dict, dict, dict]:
    """extract_both, or its result saved by an earlier run with the same --cache (so that decoding and scoring can
    be re-run, or finished, in a second process: an .npz of both feature arrays, the timings and the errors)."""
    import json
    ids = [r.image_id for r in records]
    if args.cache and Path(args.cache).is_file():
        with np.load(args.cache) as z:
            meta = json.loads(str(z["meta"]))
            if meta["image_ids"] != ids or meta["backbone"] != args.backbone:
                raise UserError(f"--cache {args.cache}: made for other images or another backbone; delete it or "
                                f"pass another file.")
            print(f"features read from --cache {args.cache}")
            return {p: z[p] for p in PRECISIONS}, meta["secs"], meta["errors"]
    feats, secs, errors = extract_both(module, spec, records, args.batch_size or spec.cpu_batch)
    if args.cache:
        meta = {"image_ids": ids, "backbone": args.backbone, "secs": secs, "errors": errors}
        with open(args.cache, "wb") as f:
            np.savez(f, meta=json.dumps(meta), **feats)
    return feats, secs, errors


def score_config(m: dict, split: str, workers: int):
    """The decoding the model card's val scores were made with (its beam, rules and resolved max-len)."""
    from pipeline.config import ScoreConfig
    dec = (m.get("scores") or {}).get("decoding") or {}
    keys = ("beam", "length_norm", "block_trigrams", "suppress_unk", "remove_bad_endings", "hard_context")
    kw = {k: dec[k] for k in keys if k in dec}
    return ScoreConfig(split=split, device="cpu", progress=False, workers=workers,
                       max_len=int(dec.get("max_len_words") or 0), **kw)


def decode_and_score(loaded, feats: np.ndarray, records, cfg) -> tuple[list[str], dict]:
    """Captions of every row (the shipped decoder, cfg's decoding) and their scores against the raw references."""
    from pipeline.decoder.decode import decode_features
    from pipeline.inference import decoding
    from pipeline.inference.score import language_metrics
    max_len, _ = decoding.resolve_max_len(cfg, [loaded])
    hyps = decode_features(loaded.model, feats, beam=cfg.beam, max_len=max_len, length_norm=cfg.length_norm,
                           rules=decoding.Rules.from_config(cfg, loaded.vocab), batch_size=cfg.batch_size,
                           device="cpu", workers=cfg.workers, progress=False)
    caps = decoding.captions(hyps, loaded.vocab)
    metrics, _ = language_metrics(dict(enumerate(caps)), {i: r.captions for i, r in enumerate(records)})
    return caps, metrics


def verdict(scores: dict) -> tuple[dict, bool]:
    """bf16 - fp32 per metric (x100) and whether it meets the criterion."""
    diff = {k: 100 * (scores["bf16"][k] - scores["fp32"][k]) for k in scores["fp32"]}
    return diff, abs(diff["Bleu_4"]) <= MAX_DBLEU4 and abs(diff["CIDEr"]) <= MAX_DCIDER


def format_rows(rows: dict[str, dict]) -> str:
    names = [k for k in SHOWN if all(k in r for r in rows.values())]
    out = [f"{'':>12} " + " ".join(f"{n:>8}" for n in names)]
    for label, r in rows.items():
        scale = 1 if label.startswith("bf16 - fp32") else 100
        out.append(f"{label:>12} " + " ".join(f"{scale * r[n]:8.2f}" for n in names))
    return "\n".join(out)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="vgg19")
    ap.add_argument("--model", default=None, help="shipped decoder (default: models/<backbone>_soft)")
    ap.add_argument("--dataset", default="flickr8k")
    ap.add_argument("--root", default=None, help="dataset folder (default: the dataset's own)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=0, help="only the first N images of the split (a quick look; "
                                                         "the verdict needs the whole split)")
    ap.add_argument("--batch-size", type=int, default=0, help="backbone batch (0: the backbone's cpu_batch)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--workers", type=int, default=0, help="decoding processes (0: ScoreConfig's default)")
    ap.add_argument("--weights-dir", default="weights")
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("--cache", default=None, help="an .npz holding the extracted features: written after the "
                                                  "extraction, read instead of extracting when it exists")
    return ap.parse_args(argv)


def check(args) -> dict:
    from pipeline.extraction.backbones import get_spec, load_backbone
    spec = get_spec(args.backbone)
    loaded, m = load_decoder(args.backbone, args.model)
    records = split_records(args.dataset, args.split, args.limit, args.root)
    module, spec, sha = load_backbone(args.backbone, None, args.weights_dir)
    card_sha = m["features"][0]["provenance"].get("weights_sha256")
    if card_sha and card_sha != sha:
        raise UserError(f"{args.weights_dir}: the {args.backbone} weights (sha256 {sha[:12]}) are not the ones model "
                        f"{loaded.run_dir.name} was trained on ({card_sha[:12]}); run `make weights` or pass --model.")
    module = module.to(memory_format=torch.channels_last)
    print(f"{args.backbone} on {len(records)} {args.dataset} {args.split} images, {torch.get_num_threads()} threads; "
          f"decoder {loaded.run_dir.name}; load {loadavg()}")
    feats, secs, errors = cached_extraction(args, module, spec, records)
    cfg = score_config(m, args.split, args.workers)
    caps, scores = {}, {}
    for p in PRECISIONS:
        caps[p], scores[p] = decode_and_score(loaded, feats[p], records, cfg)
    diff, safe = verdict(scores)
    changed = [i for i, (a, b) in enumerate(zip(caps["fp32"], caps["bf16"])) if a != b]
    from pipeline.inference.shipped import val_metrics
    card = val_metrics(m)                          # the card's val row, of the weights as shipped
    return {"backbone": args.backbone, "model": loaded.run_dir.name, "dataset": args.dataset, "split": args.split,
            "images": len(records), "whole_split": not args.limit, "threads": torch.get_num_threads(),
            "loadavg_after": loadavg(), "decoding": {"beam": cfg.beam, "length_norm": cfg.length_norm,
                                                     "max_len": cfg.max_len},
            "extract_images_per_s": {p: len(records) / secs[p] for p in PRECISIONS},
            "features_bf16_vs_fp32": errors, "scores_x100": {p: {k: 100 * v for k, v in scores[p].items()}
                                                            for p in PRECISIONS},
            "card_val_x100": {k: 100 * v for k, v in card.items()}, "diff_x100": diff,
            "captions_changed": len(changed),
            "changed_examples": [{"image_id": records[i].image_id, "fp32": caps["fp32"][i], "bf16": caps["bf16"][i]}
                                 for i in changed[:10]],
            "criterion": f"|dBLEU-4| <= {MAX_DBLEU4} and |dCIDEr| <= {MAX_DCIDER} (x100)", "safe": safe}


def report(res: dict) -> str:
    rows = {p: {k: v / 100 for k, v in res["scores_x100"][p].items()} for p in PRECISIONS}
    if res["card_val_x100"] and res["whole_split"]:
        rows["model card"] = {k: v / 100 for k, v in res["card_val_x100"].items()}
    rows["bf16 - fp32"] = res["diff_x100"]
    e, ips = res["features_bf16_vs_fp32"], res["extract_images_per_s"]
    return "\n".join([
        format_rows(rows),
        f"captions changed: {res['captions_changed']} of {res['images']}",
        f"features bf16 vs fp32: cosine min {e['cos_min']:.6f} mean {e['cos_mean']:.6f}; relative L2 error mean "
        f"{100 * e['rel_err_mean']:.3f}% max {100 * e['rel_err_max']:.3f}%",
        f"backbone: fp32 {ips['fp32']:.2f} img/s, bf16 {ips['bf16']:.2f} img/s ({ips['bf16'] / ips['fp32']:.2f}x)",
        f"{res['criterion']}: {'SAFE' if res['safe'] else 'NOT SAFE'}"
        + ("" if res["whole_split"] else f" (only {res['images']} images: --limit; not a verdict)")])


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        res = check(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(report(res))
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
