"""`pipeline average`: one decoder whose weights are the (weighted) mean of several decoders' weights.

Decoders fine-tuned from one start stay in one basin of the loss, and the mean of their weights decodes as one
model of the same size and speed, often better than each of them: "model soups" (M. Wortsman et al., ICML 2022)
average fine-tunings of one start; "robust fine-tuning" (WiSE-FT, Wortsman et al., CVPR 2022) interpolates a
model and its fine-tuning, theta(a) = (1 - a) * theta_0 + a * theta_1. Here the useful pair is a cross-entropy
run and its SCST fine-tuning (`--init-from RUN --objective scst`): SCST raises CIDEr and lowers METEOR, the mean
keeps most of both (docs/results.md#weight-averaging). Decoders trained from different random starts share no
basin: their mean decodes badly; ensemble them instead (`pipeline score --run A --run B`).

    members (--run DIR: its best.pt; --model NAME: a shipped model, fp16 weights read as fp32)
      ─▶ the same vocabulary, decoder, weight shapes and feature extraction, or one UserError naming the member
      ─▶ sum_i w_i * theta_i / sum_i w_i for every floating-point tensor (float64, stored as float32); the integer
         buffers (a BatchNorm's batch count) from the first member
      ─▶ OUT/best.pt (a checkpoint with `average`: each member's path, file sha256, epoch and weight), config.json,
         vocab.json: a run that score, caption, browse, report, export and `train --init-from` read as any other.

OUT holds no last.pt and nothing to resume: `pipeline train --run OUT --resume` is refused. It is written in a
temporary folder beside it and renamed into place when complete: a failure leaves no partial run.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Sequence

from pipeline.errors import UserError
from pipeline.fileio import write_json, write_text
from pipeline.inference import shipped
from pipeline.training import runs

# Decoder settings that only shape training (dropout, the regularisers, the REINFORCE baseline): members may
# differ in them (an SCST fine-tuning changes none of the others). The rest decide what the weights compute.
TRAINING_ONLY = ("dropout", "embed_dropout", "context_dropout", "hidden_dropout", "alpha_c", "hard_expected_prob",
                 "baseline_decay", "reinforce_weight", "entropy_weight", "reward_per_word")


def parse_weights(weights: Sequence[float], n: int) -> list[float]:
    """The members' weights, normalised to sum 1 (uniform when none were given)."""
    if not weights:
        return [1.0 / n] * n
    if len(weights) != n:
        raise UserError(f"--weight given {len(weights)} times for {n} members; give one per member, in the order "
                        f"of the members (--run ones first, then --model ones), or none for a uniform mean.")
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise UserError(f"--weight {bad[0]}: every weight must be a positive number (a member with weight 0 is "
                        f"left out by not naming it).")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def _name(ref) -> str:
    return f"--model {ref.name}" if isinstance(ref, shipped.ModelRef) else f"--run {ref}"


def _check_member(first, other, ref, first_ref) -> None:
    """`other` holds the same vocabulary, decoder and features as `first`, or one UserError says which differs."""
    from pipeline.cache.identity import check_same_provenance
    from pipeline.config import DecoderConfig
    where = f"{_name(ref)} (against {_name(first_ref)})"
    fix = ("Average only decoders fine-tuned from one start (`pipeline train --init-from`); decoders trained apart "
           "combine as an ensemble instead: `pipeline score --run A --run B`.")
    if other.vocab.itos != first.vocab.itos:
        raise UserError(f"{where}: another vocabulary ({len(other.vocab)} words against {len(first.vocab)}, or the "
                        f"same count in another order). {fix}")
    dc = [{k: v for k, v in DecoderConfig.from_dict(r.ckpt["decoder_config"]).to_dict().items()
           if k not in TRAINING_ONLY} for r in (first, other)]
    diff = sorted(k for k in dc[0] if dc[0][k] != dc[1].get(k))
    if diff:
        raise UserError(f"{where}: another decoder ({', '.join(f'{k}={dc[1][k]!r}, not {dc[0][k]!r}' for k in diff)}"
                        f"). {fix}")
    fa, fb = first.features, other.features
    if len(fa) != len(fb):
        raise UserError(f"{where}: reads {len(fb)} feature caches, the first member {len(fa)}. {fix}")
    for a, b in zip(fa, fb):
        try:
            check_same_provenance(a.get("provenance") or {}, b.get("provenance") or {}, what="", where="")
        except UserError:
            pa, pb = a.get("provenance") or {}, b.get("provenance") or {}
            raise UserError(f"{where}: trained on another feature extraction ({pb.get('backbone')} "
                            f"{pb.get('layer') or 'default layer'}, not {pa.get('backbone')} "
                            f"{pa.get('layer') or 'default layer'}, or other weights, preprocessing or data). "
                            f"{fix}") from None
    sa, sb = first.model.state_dict(), other.model.state_dict()
    odd = sorted(k for k in sa.keys() | sb.keys() if k not in sa or k not in sb or sa[k].shape != sb[k].shape)
    if odd:
        raise UserError(f"{where}: its weights differ in name or shape from the first member's ({', '.join(odd[:3])}"
                        f"{', ...' if len(odd) > 3 else ''}). {fix}")


def mean_state(states: Sequence[dict], weights: Sequence[float]) -> dict:
    """sum_i w_i * state_i for every floating-point tensor (accumulated in float64, stored in the first member's
    dtype); a tensor of another kind (an integer count) is the first member's."""
    import torch
    out = {}
    for k, v in states[0].items():
        if torch.is_floating_point(v):
            acc = torch.zeros(v.shape, dtype=torch.float64)
            for s, w in zip(states, weights):
                acc += w * s[k].detach().to("cpu", torch.float64)
            out[k] = acc.to(v.dtype)
        else:
            out[k] = v.detach().clone()
    return out


def _member_record(loaded, ref, weight: float) -> dict:
    from pipeline.provenance import sha256_file
    if shipped.is_shipped(loaded):
        m = loaded.ckpt["manifest"]
        path = Path(loaded.run_dir) / m["files"]["decoder"]["path"]
        return {"model": loaded.ckpt["shipped"], "file": str(path), "sha256": m["files"]["decoder"]["sha256"],
                "epoch": loaded.ckpt.get("epoch"), "code_version": loaded.ckpt.get("code_version"), "weight": weight}
    path = Path(loaded.run_dir) / f"{loaded.which}.pt"
    inner = (loaded.ckpt.get("average") or {}).get("members")     # a member that is itself a mean: its members
    return {"run": str(ref), "file": str(path), "sha256": sha256_file(path),
            "epoch": None if inner else loaded.ckpt.get("epoch"), "code_version": loaded.ckpt.get("code_version"),
            "weight": weight, **({"average_of": [m.get("run") or m.get("model") for m in inner]} if inner else {})}


def average_checkpoint(loaded: Sequence, refs: Sequence, weights: Sequence[float]) -> dict:
    """The checkpoint of the mean decoder: the first member's settings, vocabulary and features; nothing to resume."""
    from pipeline.provenance import code_version
    first = loaded[0]
    ck = first.ckpt
    avg = {"members": [_member_record(r, ref, w) for r, ref, w in zip(loaded, refs, weights)],
           "method": "weighted mean of the weights (pipeline/inference/average.py)"}
    return {"format_version": runs.CHECKPOINT_FORMAT, "code_version": code_version(),
            "model": mean_state([r.model.state_dict() for r in loaded], weights),
            "optimizer": {}, "scheduler": {}, "rng": {}, "epoch": 0, "batch_in_epoch": 0, "step": 0,
            "best_score": float("nan"), "best_epoch": 0, "bad_epochs": 0, "history": [], "epoch_acc": {},
            "finished": True, "select_metric": (ck.get("select_metric") or ck["train_config"].get("select_metric")
                                                or "cider"),
            "vocab": first.vocab.to_dict(), "decoder_config": ck["decoder_config"],
            "train_config": dict(ck["train_config"]), "features": first.features, "feature_dim": ck["feature_dim"],
            "num_regions": ck["num_regions"], "init_from": None, "average": avg}


def average_runs(refs: Sequence, weights: Sequence[float], out: Path, log=print) -> Path:
    """Write the mean of the members' decoders to the run folder `out` (new, or empty); its path."""
    from pipeline.training.runs import MARKER
    if len(refs) < 2:
        raise UserError(f"pipeline average needs at least two members (--run DIR / --model NAME); {len(refs)} given.")
    out = Path(out)
    if out.is_symlink() or out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder; the mean decoder is written into a new "
                        f"folder (e.g. --out runs/NAME). Nothing was written.")
    keys = [shipped.member_key(r) for r in refs]
    dup = next((r for i, r in enumerate(refs) if keys[i] in keys[:i]), None)
    if dup is not None:
        raise UserError(f"{_name(dup)} given twice; to weigh a member more, give it a larger --weight.")
    w = parse_weights(weights, len(refs))
    loaded = [shipped.load_member(r, log=log) for r in refs]
    for r, ref in zip(loaded[1:], refs[1:]):
        _check_member(loaded[0], r, ref, refs[0])
    ckpt = average_checkpoint(loaded, refs, w)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.average-{os.getpid()}"     # renamed into place when complete
    shutil.rmtree(tmp, ignore_errors=True)                       # a killed earlier try of this pid's number
    tmp.mkdir()
    try:
        write_text(tmp / MARKER, "made by pipeline average\n")
        loaded[0].vocab.save(tmp / "vocab.json")
        write_json(tmp / "config.json", {"train": ckpt["train_config"], "decoder": ckpt["decoder_config"],
                                         "features": ckpt["features"], "vocab_size": len(loaded[0].vocab),
                                         "init_from": None, "average": ckpt["average"]})
        runs.save_checkpoint(ckpt, tmp / "best.pt")
        if out.is_dir():
            out.rmdir()                    # the empty folder checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"{out}/best.pt: the mean of {len(refs)} decoders ("
        + ", ".join(f"{_name(ref)} x {x:.3g}" for ref, x in zip(refs, w)) + f"). Score it: pipeline score --run {out}")
    return out
