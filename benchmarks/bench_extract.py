"""Extraction throughput on CPU: VGG19 (conv1_1..conv5_4, 224x224) images/s and achieved GFLOP/s,
next to a fp32 GEMM (torch.mm) GFLOP/s measured in the same run on the same threads.

    make bench-extract                       # defaults below
    python benchmarks/bench_extract.py --batch-sizes 1,8,32 --threads 2 --seconds 10
    python benchmarks/bench_extract.py --backbone efficientnet_lite2 --batch-sizes 4,16 --layouts channels_last

Other registry backbones (--backbone) report images/s only (their FLOPs are not counted here).

The ratio VGG19 GFLOP/s / GEMM GFLOP/s says how close the conv trunk runs to the machine's matmul
peak (target >= 0.90). FLOPs are counted from the layer shapes (2 * MACs of the 16 convs: 39.0 GFLOP
per image). Other processes on the machine lower both figures; the ratio is the comparable number.
Results are also written to bench_out/bench_extract.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.extraction.backbones import BACKBONES, load_backbone  # noqa: E402


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


def trunk_rate(module, bs: int, size: int, channels_last: bool, seconds: float) -> float:
    x = torch.randn(bs, 3, size, size)
    m = module
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        m = module.to(memory_format=torch.channels_last)
    else:
        m = module.to(memory_format=torch.contiguous_format)
    with torch.inference_mode():
        t = timed(lambda: m(x), seconds)
    return bs / t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="vgg19", choices=sorted(BACKBONES))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default = physical cores)")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--layouts", default="channels_last,contiguous")
    ap.add_argument("--gemm-n", type=int, default=4096)
    ap.add_argument("--seconds", type=float, default=8.0, help="minimum timing per measurement")
    ap.add_argument("--weights-dir", default="weights")
    ap.add_argument("--out", default="bench_out/bench_extract.json")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = BACKBONES[args.backbone]
    try:
        module, _, sha = load_backbone(spec.name, None, args.weights_dir)
    except Exception as e:  # noqa: BLE001 - same FLOPs either way; say so
        print(f"note: real weights unavailable ({e}); timing the random-init net (same FLOPs)")
        module, _, sha = load_backbone(spec.name, "random")
    flops = spec.flops_per_image or float("nan")   # nan: not counted for this backbone
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, mkldnn {torch.backends.mkldnn.is_available()}")
    print(f"{spec.name} at {spec.input_size} -> {spec.grid[0]}x{spec.grid[1]}x{spec.feature_dim}: "
          + (f"{flops / 1e9:.2f} GFLOP/image" if flops == flops else "FLOPs not counted") + f"; weights {sha[:12]}")

    # The machine may be shared: GEMM is measured right before and after every VGG19 measurement and
    # each ratio uses the mean of its two neighbours, so load changes hit both sides alike.
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    rows = []
    g_prev = gemm_gflops(args.gemm_n, args.seconds)
    print(f"GEMM fp32 torch.mm {args.gemm_n}x{args.gemm_n}: {g_prev:.1f} GFLOP/s")
    for layout in args.layouts.split(","):
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            ips = trunk_rate(module, bs, spec.input_size, layout == "channels_last", args.seconds)
            g_next = gemm_gflops(args.gemm_n, args.seconds)
            gemm = (g_prev + g_next) / 2
            gf = ips * flops / 1e9
            rows.append({"layout": layout, "batch": bs, "img_s": ips, "gflops": gf, "gemm_gflops": gemm,
                         "ratio": gf / gemm})
            print(f"{spec.name} {layout:>13} batch {bs:>3}: {ips:6.2f} img/s  {gf:7.1f} GFLOP/s  "
                  f"GEMM {g_prev:6.1f}/{g_next:6.1f}  ratio {gf / gemm:.2f}")
            g_prev = g_next
    best = max(rows, key=lambda r: r["ratio"] if flops == flops else r["img_s"])   # nan: FLOPs not counted
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if flops == flops:
        print(f"best: {best['layout']} batch {best['batch']}: {best['img_s']:.2f} img/s, {best['gflops']:.1f} GFLOP/s "
              f"= {best['ratio']:.2f} x GEMM ({best['gemm_gflops']:.1f} GFLOP/s); target >= 0.90")
    else:
        print(f"best: {best['layout']} batch {best['batch']}: {best['img_s']:.2f} img/s (FLOPs not counted for "
              f"{spec.name})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"backbone": spec.name, "threads": torch.get_num_threads(), "flops_per_image": flops,
                               "runs": rows, "best": best}, indent=1))


if __name__ == "__main__":
    main()
