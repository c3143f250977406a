"""Where does EfficientNet-Lite2's bf16 error come from? Sets of modules kept in fp32 under bf16 autocast.

    .venv/bin/python benchmarks/bf16_modules.py --images 32 --threads 2 --json bench_out/bf16_modules.json

On the first --images images of Flickr8k val, the final features of each variant are compared with fp32's
(per-image cosine and relative L2 error) and every variant is timed on the same images, the variants
alternating (precision_common.timed_alternating). A module "kept in fp32" runs with autocast disabled on a
float32 copy of its input (its instance `forward` wrapped; what follows it sees float32 and, for the
ops autocast does not lower, stays there). Variants:

    fp32 | bf16 (everything under autocast) | stem | depthwise (every depthwise conv) | last stage + head |
    bn folded (every BatchNorm folded into its conv in fp32, then all bf16) | all but 1x1 (stem + depthwise:
    only the 1x1 expand/project/head convs in bf16) | project (the 1x1 convs writing the residual stream)

--profile also prints the relative error of full bf16 at every block's output (where it grows), and
--per-block the final error when ONLY block k runs in bf16 (each block's own share).
Safe here means cosine >= 0.9999 on every image and mean relative error <= 1%.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline.errors import UserError  # noqa: E402
from precision_common import (feature_errors, load_inputs, loadavg, run_backbone, split_records,  # noqa: E402
                              timed_alternating, write_json)

SAFE_COS, SAFE_REL = 0.9999, 0.01


def keep_fp32(mod: torch.nn.Module) -> None:
    """Run `mod` in float32 with autocast off, whatever autocast is around it (undo: release)."""
    inner = mod.forward

    def forward(x, *args, **kw):
        with torch.autocast("cpu", enabled=False):
            return inner(x.float(), *args, **kw)
    mod.forward = forward


def release(mod: torch.nn.Module) -> None:
    mod.__dict__.pop("forward", None)


def module_sets(net) -> dict[str, list]:
    """The candidate fp32 sets of an efficientnet_lite_pytorch EfficientNet (the registry's Trunk.net)."""
    blocks = list(net._blocks)
    dw = [b._depthwise_conv for b in blocks]
    return {"stem": [net._conv_stem], "depthwise": dw, "last stage + head": [blocks[-1], net._conv_head],
            "all but 1x1": [net._conv_stem] + dw, "project": [b._project_conv for b in blocks],
            "stem + head": [net._conv_stem, net._conv_head],
            "stem + blocks 0-1": [net._conv_stem] + blocks[:2],      # where --per-block puts most of the error
            "stem + blocks 0-1 + stage-first": [net._conv_stem] + blocks[:2] + stage_first(blocks)}


def stage_first(blocks) -> list:
    """The first block of every stage after the second (stride 2 or a new width: no residual to damp errors)."""
    return [b for b in blocks[2:] if b._block_args.input_filters != b._block_args.output_filters]


def conv_bn_pairs(net) -> list[tuple]:
    pairs = [(net._conv_stem, "_bn0", net), (net._conv_head, "_bn1", net)]
    for b in net._blocks:
        if hasattr(b, "_expand_conv"):
            pairs.append((b._expand_conv, "_bn0", b))
        pairs += [(b._depthwise_conv, "_bn1", b), (b._project_conv, "_bn2", b)]
    return pairs


def fold_bn(module):
    """A copy of the backbone with every BatchNorm folded into its conv (in float64, stored float32)."""
    m = copy.deepcopy(module)
    for conv, bn_name, owner in conv_bn_pairs(m.net):
        bn = getattr(owner, bn_name)
        scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        conv.weight = torch.nn.Parameter((conv.weight.double() * scale[:, None, None, None]).float(),
                                         requires_grad=False)
        conv.bias = torch.nn.Parameter(((bias - bn.running_mean.double()) * scale + bn.bias.double()).float(),
                                       requires_grad=False)
        setattr(owner, bn_name, torch.nn.Identity())
    return m


def variant_runner(module, folded, sets: dict, name: str, x, batch: int):
    """A call that runs variant `name` over x (batches of `batch`) and returns its features in float32."""
    def run():
        if name == "fp32":
            return run_backbone(module, x, batch, "fp32").float()
        if name == "bn folded":
            return run_backbone(folded, x, batch, "bf16").float()
        mods = sets.get(name, [])
        for m in mods:
            keep_fp32(m)
        try:
            return run_backbone(module, x, batch, "bf16").float()
        finally:
            for m in mods:
                release(m)
    return run


def block_profile(module, x, batch: int) -> list[tuple[str, float]]:
    """Relative L2 error of full bf16 against fp32 at the stem, every block's output and the head (pre-ReLU6)."""
    net = module.net
    points = [("stem", net._bn0)] + [(f"block {i}", b) for i, b in enumerate(net._blocks)] + [("head", net._bn1)]
    seen: dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: seen[n].append(out.float()))
             for n, m in points]
    try:
        res = {}
        for p in ("fp32", "bf16"):
            seen.update({n: [] for n, _ in points})
            run_backbone(module, x, batch, p)
            res[p] = {n: torch.cat(v) for n, v in seen.items()}
    finally:
        for h in hooks:
            h.remove()
    return [(n, feature_errors(res["fp32"][n], res["bf16"][n])["rel_err_mean"]) for n, _ in points]


def per_block(module, x, batch: int, ref) -> list[tuple[str, dict]]:
    """Final-feature error when only block k (or the stem, or the head) runs in bf16, all else fp32."""
    net = module.net
    parts = [("stem", net._conv_stem)] + [(f"block {i}", b) for i, b in enumerate(net._blocks)] + \
        [("head", net._conv_head)]
    out = []
    for name, only in parts:
        others = [m for _, m in parts if m is not only]
        for m in others:
            keep_fp32(m)
        try:
            out.append((name, feature_errors(ref, run_backbone(module, x, batch, "bf16").float())))
        finally:
            for m in others:
                release(m)
    return out


def measure(module, x, batch: int, seconds: float, time_images: int, only=()) -> dict[str, dict]:
    """Every variant: its feature errors against fp32 on x and its images/s on the first time_images of x
    (variants timed alternately)."""
    sets, folded = module_sets(module.net), fold_bn(module)
    names = [n for n in ("fp32", "bf16", *sets, "bn folded") if not only or n in ("fp32", "bf16", *only)]
    runs = {n: variant_runner(module, folded, sets, n, x, batch) for n in names}
    ref = runs["fp32"]()
    fold_check = feature_errors(ref, run_backbone(folded, x, batch, "fp32").float())["rel_err_max"]
    print(f"BN folding itself (folded vs unfolded, both fp32): rel. error max {100 * fold_check:.4f}%")
    res = {n: feature_errors(ref, runs[n]()) for n in names}
    xt = x[:time_images] if time_images else x
    times = timed_alternating({n: variant_runner(module, folded, sets, n, xt, batch) for n in names}, seconds)
    for n in names:
        ips = len(xt) / times[n]
        res[n].update(images_per_s=ips, safe=res[n]["cos_min"] >= SAFE_COS and res[n]["rel_err_mean"] <= SAFE_REL)
    for n in names:
        res[n].update(vs_fp32=res[n]["images_per_s"] / res["fp32"]["images_per_s"],
                      vs_bf16=res[n]["images_per_s"] / res["bf16"]["images_per_s"])
    return res


def format_table(res: dict) -> str:
    lines = ["fp32 set (rest bf16)  | cos min  | cos mean | rel err mean | rel err max | img/s | x fp32 | x bf16 | safe"]
    for n, r in res.items():
        lines.append(f"{n:<21} | {r['cos_min']:.6f} | {r['cos_mean']:.6f} | {100 * r['rel_err_mean']:10.3f}% | "
                     f"{100 * r['rel_err_max']:9.3f}% | {r['images_per_s']:5.2f} | {r['vs_fp32']:6.2f} | "
                     f"{r['vs_bf16']:6.2f} | {'yes' if r['safe'] else 'no'}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--split", default="val")
    ap.add_argument("--batch-size", type=int, default=0, help="0: the registry's cpu_batch")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=20.0, help="minimum timing per variant")
    ap.add_argument("--profile", action="store_true", help="full bf16's error at every block output")
    ap.add_argument("--per-block", action="store_true", help="final error with only block k in bf16")
    ap.add_argument("--time-images", type=int, default=0, help="time the variants on the first N images only "
                                                               "(0: all); the errors always use all")
    ap.add_argument("--variants", default="", help="only these fp32 sets (';'-separated names; fp32 and bf16 "
                                                   "are always measured)")
    ap.add_argument("--no-variants", action="store_true", help="only --profile / --per-block")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from pipeline.extraction.backbones import load_backbone
        module, spec, _ = load_backbone("efficientnet_lite2")
        x = load_inputs(split_records("flickr8k", args.split, args.images), spec)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    module = module.to(memory_format=torch.channels_last)
    batch = args.batch_size or spec.cpu_batch
    print(f"efficientnet_lite2, {len(x)} flickr8k {args.split} images, batch {batch}, {torch.get_num_threads()} "
          f"threads; load {loadavg()}")
    out = {"images": len(x), "batch": batch, "threads": torch.get_num_threads(), "loadavg_before": loadavg()}
    if args.profile:
        out["profile_rel_err"] = dict(block_profile(module, x, batch))
        print("full bf16, relative error at: " + ", ".join(f"{n} {100 * e:.2f}%"
                                                           for n, e in out["profile_rel_err"].items()))
    if args.per_block:
        ref = run_backbone(module, x, batch, "fp32").float()
        out["only_in_bf16"] = dict(per_block(module, x, batch, ref))
        print("only this part in bf16 -> final rel. error mean: " + ", ".join(
            f"{n} {100 * e['rel_err_mean']:.2f}%" for n, e in out["only_in_bf16"].items()))
    if not args.no_variants:
        out["variants"] = measure(module, x, batch, args.seconds, args.time_images,
                                  [v for v in args.variants.split(";") if v])
        print(format_table(out["variants"]))
    out["loadavg_after"] = loadavg()
    print(f"load {out['loadavg_after']}")
    if args.json:
        write_json(args.json, out)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
