"""Extraction throughput on CPU: VGG19 (conv1_1..conv5_4, 224x224) images/s and achieved GFLOP/s,
next to a fp32 GEMM (torch.mm) GFLOP/s measured in the same run on the same threads.

    make bench-extract                       # defaults below
    python benchmarks/bench_extract.py --batch-sizes 1,8,32 --threads 2 --seconds 10
    python benchmarks/bench_extract.py --backbone efficientnet_lite2 --batch-sizes 4,16 --layouts channels_last
    python benchmarks/bench_extract.py --conv onednn,gemm --batch-sizes 32 --threads 2   # fp32 convolution paths

Other registry backbones (--backbone) report images/s only (their FLOPs are not counted here).

The ratio VGG19 GFLOP/s / GEMM GFLOP/s says how close the conv trunk runs to the machine's matmul
peak (target >= 0.90). FLOPs are counted from the layer shapes (2 * MACs of the 16 convs: 39.0 GFLOP
per image). Other processes on the machine lower both figures; the ratio is the comparable number.
Results are also written to bench_out/bench_extract.json.

--allocator reuse (the default, as `pipeline extract` on CPU) keeps freed activations in the process for the
next batch (pipeline.device.tune_cpu_allocator(large=True)); --allocator default leaves glibc's, which maps blocks
over 32 MB afresh each time. The process's CPU seconds (user, system) and minor page faults are printed and stored,
so two runs back to back, one per allocator, compare the two:

    python benchmarks/bench_extract.py --backbone efficientnet_lite2 --batch-sizes 4 --layouts channels_last \
        --threads 2 --allocator default --json bench_out/alloc_default.json     # then --allocator reuse

Precisions (--precision fp32,bf16; default fp32 only): every precision is timed on the SAME input, the
variants alternating call by call (benchmarks/precision_common.py), and its features are compared with
fp32's: per-image cosine (min, mean) and relative L2 error (mean, max). The input is the first --images
images of --split (default: 32 Flickr8k val images when a precision other than fp32 is asked, else one random
batch as before); with images, one timed call is one pass over all of them. --json FILE writes, per backbone
and precision, images_per_s (its best layout and batch), the speed-up over fp32 and the feature errors.

    python benchmarks/bench_extract.py --backbone vgg19,efficientnet_lite2 --precision fp32,bf16 \\
        --batch-sizes 32 --layouts channels_last --threads 2 --json bench_out/precision.json
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline.device import tune_cpu_allocator  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.extraction.backbones import BACKBONES, conv_path, load_backbone  # noqa: E402
from precision_common import (autocast_for, feature_errors, load_inputs, loadavg, positive_ints,  # noqa: E402
                              run_backbone, split_records, timed_alternating, write_json)


def timed(fn, seconds: float, min_reps: int = 2) -> float:
    """Mean seconds per call over >= min_reps calls and >= `seconds` total, after one warm-up call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while n < min_reps or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def gemm_gflops(n: int, seconds: float) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    t = timed(lambda: torch.mm(a, b, out=c), seconds)
    return 2 * n ** 3 / t / 1e9


def bench_input(args, spec, bs: int):
    """(x (N,3,H,W), what it is): the first --images images of --split, or one random batch of bs (seeded)."""
    if args.images:
        records = split_records(args.dataset, args.split, args.images, args.root)
        return load_inputs(records, spec), f"{len(records)} {args.dataset} {args.split} images"
    return torch.randn(bs, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(0)), \
        f"random batch of {bs}"


def precision_rates(module, x, bs: int, channels_last: bool, precisions, seconds: float) -> dict[str, float]:
    """images/s of each precision on the same input x; one call = all of x in batches of bs; calls alternate."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    m, x = module.to(memory_format=fmt), x.contiguous(memory_format=fmt)

    def call(p):
        def fn():
            with torch.inference_mode(), autocast_for(p):
                for s in range(0, len(x), bs):
                    m(x[s:s + bs])
        return fn
    t = timed_alternating({p: call(p) for p in precisions}, seconds)
    return {p: len(x) / t[p] for p in precisions}


def precision_errors(module, x, bs: int, precisions) -> dict[str, dict]:
    """Each precision's features vs fp32's on x (feature_errors: per-image cosine, relative L2 error)."""
    ref = run_backbone(module, x, bs, "fp32").float()
    return {p: feature_errors(ref, run_backbone(module, x, bs, p).float()) for p in precisions}


def summarise(rows: list[dict], errors: dict, precisions) -> dict[str, dict]:
    """Per precision: its fastest (layout, batch), the speed-up over fp32 there, and its feature errors."""
    out = {}
    for p in precisions:
        best = max((r for r in rows if r["precision"] == p), key=lambda r: r["img_s"])
        ref = [r for r in rows if r["precision"] == "fp32" and (r["layout"], r["batch"]) == (best["layout"], best["batch"])]
        out[p] = {"images_per_s": best["img_s"], "layout": best["layout"], "batch": best["batch"],
                  "speedup_vs_fp32": best["img_s"] / ref[0]["img_s"] if ref else None, **errors[p]}
    return out


def format_precisions(name: str, summary: dict, what: str) -> str:
    lines = [f"{name}, {what}: precision | images/s (layout, batch) | x fp32 | cosine min / mean | rel. L2 error "
             f"mean / max"]
    for p, s in summary.items():
        sp = f"{s['speedup_vs_fp32']:.2f}" if s["speedup_vs_fp32"] else "-"
        lines.append(f"  {p:>4} | {s['images_per_s']:7.2f} ({s['layout']}, {s['batch']}) | {sp:>5} | "
                     f"{s['cos_min']:.6f} / {s['cos_mean']:.6f} | {100 * s['rel_err_mean']:.3f}% / "
                     f"{100 * s['rel_err_max']:.3f}%")
    return "\n".join(lines)


def bench_backbone(name: str, args, precisions: list[str]) -> dict:
    """One backbone: every (layout, batch) timed in every precision on the same input, with fp32 GEMM
    GFLOP/s before and after each (layout, batch); then the feature errors of each precision."""
    spec = BACKBONES[name]
    try:
        module, _, sha = load_backbone(spec.name, None, args.weights_dir)
    except Exception as e:  # noqa: BLE001 - same FLOPs either way; say so
        print(f"note: real weights unavailable ({e}); timing the random-init net (same FLOPs)")
        module, _, sha = load_backbone(spec.name, "random")
    flops = spec.flops_per_image or float("nan")   # nan: not counted for this backbone
    print(f"{spec.name} at {spec.input_size} -> {spec.grid[0]}x{spec.grid[1]}x{spec.feature_dim}: "
          + (f"{flops / 1e9:.2f} GFLOP/image" if flops == flops else "FLOPs not counted") + f"; weights {sha[:12]}")
    # The machine may be shared: GEMM is measured right before and after every measurement and each ratio
    # uses the mean of its two neighbours, so load changes hit both sides alike.
    print(f"load average before: {loadavg()}")
    rows, inputs = [], {}
    g_prev = gemm_gflops(args.gemm_n, args.seconds)
    print(f"GEMM fp32 torch.mm {args.gemm_n}x{args.gemm_n}: {g_prev:.1f} GFLOP/s")
    for conv, layout in ((c, lay) for c in args.conv.split(",") for lay in args.layouts.split(",")):
        precs = precisions if conv == "onednn" else [p for p in precisions if p == "fp32"]   # autocast: oneDNN
        for bs in positive_ints(args.batch_sizes, "--batch-sizes"):
            x, what = inputs.setdefault(None if args.images else bs, bench_input(args, spec, bs))
            with conv_path(conv):
                rates = precision_rates(module, x, bs, layout == "channels_last", precs, args.seconds)
            g_next = gemm_gflops(args.gemm_n, args.seconds)
            gemm = (g_prev + g_next) / 2
            for p, ips in rates.items():
                gf = ips * flops / 1e9
                rows.append({"conv": conv, "layout": layout, "batch": bs, "precision": p, "img_s": ips, "gflops": gf,
                             "gemm_gflops": gemm, "ratio": gf / gemm})
                print(f"{spec.name} {conv:>6} {layout:>13} batch {bs:>3} {p:>4}: {ips:6.2f} img/s  {gf:7.1f} "
                      f"GFLOP/s  GEMM {g_prev:6.1f}/{g_next:6.1f}  ratio {gf / gemm:.2f}")
            g_prev = g_next
    print(f"load average after: {loadavg()}")
    ref_rows = [r for r in rows if r["precision"] == "fp32"] or rows
    best = max(ref_rows, key=lambda r: r["ratio"] if flops == flops else r["img_s"])   # nan: FLOPs not counted
    if flops == flops:
        print(f"best: {best['conv']} {best['layout']} batch {best['batch']} {best['precision']}: {best['img_s']:.2f} img/s, "
              f"{best['gflops']:.1f} GFLOP/s = {best['ratio']:.2f} x GEMM ({best['gemm_gflops']:.1f} GFLOP/s); "
              f"target >= 0.90")
    else:
        print(f"best: {best['layout']} batch {best['batch']} {best['precision']}: {best['img_s']:.2f} img/s "
              f"(FLOPs not counted for {spec.name})")
    x, what = next(iter(inputs.values()))
    bs = positive_ints(args.batch_sizes, "--batch-sizes")[0]
    summary = summarise(rows, precision_errors(module, x, bs, precisions), precisions)
    print(format_precisions(spec.name, summary, f"features on {what}"))
    return {"backbone": spec.name, "threads": torch.get_num_threads(), "flops_per_image": flops, "runs": rows,
            "best": best, "input": what, "precisions": summary}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="vgg19", help=f"one or several of {', '.join(sorted(BACKBONES))}, "
                                                        f"separated by commas")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default = physical cores)")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--layouts", default="channels_last,contiguous")
    ap.add_argument("--conv", default="onednn", help="fp32 convolution paths to time: onednn (PyTorch's default), "
                    "gemm (mkldnn off: im2col + BLAS, what extraction takes on a CPU without AVX-512), or both")
    ap.add_argument("--gemm-n", type=int, default=4096)
    ap.add_argument("--seconds", type=float, default=8.0, help="minimum timing per measurement")
    ap.add_argument("--weights-dir", default="weights")
    ap.add_argument("--out", default="bench_out/bench_extract.json")
    ap.add_argument("--precision", default="fp32", help="precisions to time and compare, e.g. fp32,bf16")
    ap.add_argument("--images", type=int, default=None,
                    help="input: the first N images of --split (0: a random batch; default 32 when a precision "
                         "other than fp32 is asked, else 0)")
    ap.add_argument("--dataset", default="flickr8k")
    ap.add_argument("--split", default="val")
    ap.add_argument("--root", default=None, help="dataset folder (default: the dataset's own)")
    ap.add_argument("--json", default=None, help="write the per-backbone, per-precision summary here")
    ap.add_argument("--allocator", choices=("reuse", "default"), default="reuse",
                    help="reuse: freed memory kept for the next batch, as `pipeline extract` on CPU; default: glibc's")
    args = ap.parse_args(argv)
    names = [b for b in args.backbone.split(",") if b]
    unknown = [b for b in names if b not in BACKBONES]
    precisions = [p for p in args.precision.split(",") if p]
    bad = [p for p in precisions if p not in ("fp32", "bf16")]
    if unknown or not names:
        raise UserError(f"--backbone {args.backbone}: unknown {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(sorted(BACKBONES))}.")
    if bad or not precisions:
        raise UserError(f"--precision {args.precision}: choose from fp32,bf16 (comma list).")
    if not set(args.conv.split(",")) <= {"onednn", "gemm"}:
        raise UserError(f"--conv {args.conv}: choose from onednn,gemm (comma list).")
    if args.images is None:
        args.images = 0 if precisions == ["fp32"] else 32
    return args, names, precisions


def main(argv=None):
    try:
        args, names, precisions = parse_args(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.allocator == "reuse" and not tune_cpu_allocator(large=True):
        print("note: --allocator reuse not applied (not glibc); timing glibc's default")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, mkldnn {torch.backends.mkldnn.is_available()}")
    before = loadavg()
    try:
        results = [bench_backbone(n, args, precisions) for n in names]
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    use = resource.getrusage(resource.RUSAGE_SELF)
    cpu = {"allocator": args.allocator, "user_s": round(use.ru_utime, 2), "system_s": round(use.ru_stime, 2),
           "minor_faults": use.ru_minflt}
    print(f"allocator {args.allocator}: CPU {cpu['user_s']:.1f} s user, {cpu['system_s']:.1f} s system, "
          f"{cpu['minor_faults']} minor page faults (the whole run, GEMM included)")
    write_json(args.out, results[0] if len(results) == 1 else {"backbones": results})
    if args.json:
        write_json(args.json, {
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "loadavg_before": before, "loadavg_after": loadavg(),
            "seconds": args.seconds, "batch_sizes": args.batch_sizes, "layouts": args.layouts, "process": cpu,
            "backbones": {r["backbone"]: {"input": r["input"], "precisions": r["precisions"], "runs": r["runs"]}
                          for r in results}})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
