"""Training throughput of the decoder: captions/s and achieved matmul GFLOP/s vs a plain fp32 GEMM.

    make bench-train                       # = .venv/bin/python benchmarks/bench_train.py
    python benchmarks/bench_train.py --steps 30 --attention hard --threads 2
    python benchmarks/bench_train.py --threads 2 --compare-eager   # eager / fp32 / bf16 projections (where auto has them)
    python benchmarks/bench_train.py --bf16-projections off         # the optimised step all in fp32

Setup: 512/512/512 (embed/hidden/attention), C=512, L=196, vocab 2,500, batch 64, Adam, grad clip,
real training steps (forward, loss, backward, clip, step) on random fp16 features gathered from RAM
like train.py does. Batches come from the bucket sampler over Flickr8k caption lengths (read from
../shared/flickr8k/Flickr8k.token.txt when present, else a built-in Flickr8k length histogram), so
lengths and the smaller tail batches of rare lengths are as in training. FLOPs count only the
matmuls of forward + backward (pipeline.decoder.model.count_flops). The GEMM reference is a 2048^3 fp32
matmul timed in the same process before and after; the load average is printed because other
processes on the machine change both numbers (captions per CPU-second of this process is printed
too: with --threads 1 it is what one core gives when it is not time-shared).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.training.batching import BucketBatchSampler, select_lengths  # noqa: E402
from pipeline.decoder.model import Decoder, DecoderConfig, count_flops  # noqa: E402
from pipeline.training.objectives import xe_loss  # noqa: E402
from pipeline.data.text import tokenize  # noqa: E402
from pipeline.decoder import fused  # noqa: E402
from pipeline.device import tune_cpu_allocator  # noqa: E402
from pipeline.config import TrainConfig  # noqa: E402
from pipeline.training.train import bf16_projections  # noqa: E402

TOKENS = Path(__file__).resolve().parents[2] / "shared" / "flickr8k" / "Flickr8k.token.txt"
# Flickr8k words-per-caption histogram (text.tokenize), lengths 1..30, used when the token file is absent.
FLICKR8K_HIST = {1: 2, 2: 20, 3: 107, 4: 451, 5: 1190, 6: 2305, 7: 3479, 8: 4282, 9: 4586, 10: 4403, 11: 3860,
                 12: 3154, 13: 2545, 14: 1897, 15: 1435, 16: 1056, 17: 783, 18: 587, 19: 422, 20: 300,
                 21: 216, 22: 160, 23: 111, 24: 82, 25: 59, 26: 44, 27: 33, 28: 22, 29: 17, 30: 12}


def caption_lengths() -> tuple[np.ndarray, str]:
    if TOKENS.exists():
        lens = [len(tokenize(line.split("\t", 1)[1])) for line in TOKENS.read_text().splitlines() if "\t" in line]
        return np.array(lens), str(TOKENS)
    return np.repeat(list(FLICKR8K_HIST), list(FLICKR8K_HIST.values())), "built-in Flickr8k histogram"


def gemm_gflops(device, n=2048, reps=10) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()



def xe_step(model, opt, params, pool, lengths, vocab: int, device):
    """One real cross-entropy training step (as train.py's) on a batch of caption indices `b`, with features
    drawn from `pool` (an fp16 "cache" in RAM, (P, L, C)) and random words of the batch's length."""
    use_amp = device.type == "cuda"

    def step(b):
        n = int(lengths[b[0]])
        x = pool[torch.randint(0, len(pool), (len(b),))].to(device, torch.float32)   # (B, L, C)
        y = torch.randint(4, vocab, (len(b), n + 2), device=device)                  # (B, T+1)
        y[:, 0], y[:, -1] = 1, 2
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(x, y)
        loss, _ = xe_loss(model, out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
    return step

def _timed(step, batches, warmup: int, device) -> tuple[float, float]:
    """(wall s, CPU s of this process) of the steps after `warmup` (untimed) steps."""
    for b in batches[:warmup]:
        step(b)
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    for b in batches[warmup:]:
        step(b)
    _sync(device)
    return time.perf_counter() - t, time.process_time() - c


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=25, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=2500)
    ap.add_argument("--dim", type=int, default=512, help="embed = hidden = attention size")
    ap.add_argument("--feature-dim", type=int, default=512)
    ap.add_argument("--regions", type=int, default=196)
    ap.add_argument("--attention", choices=["soft", "hard"], default="soft")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--compare-eager", action="store_true",
                    help="also time the eager step (no fused kernels, no deferred weight gradients) in this run: "
                         "first as before (allocator untuned), then alternating with the optimised step")
    ap.add_argument("--rounds", type=int, default=2, help="alternations with --compare-eager (best of each)")
    ap.add_argument("--bf16-projections", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                    help="the optimised step's projections W_a a and L_o as train --bf16-projections has them (auto, "
                         "as train: bf16 matmuls for soft attention on a CPU with bf16 units); when they are bf16, "
                         "--compare-eager also times the optimised step with fp32 projections in the same rounds")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    torch.manual_seed(0)

    lengths, source = caption_lengths()
    keep, _ = select_lengths(lengths, 30)
    lengths = lengths[keep]
    batches = BucketBatchSampler(lengths, args.batch_size, seed=0).batches(0)[: args.warmup + args.steps]
    cfg = DecoderConfig(embed_dim=args.dim, hidden_dim=args.dim, attention_dim=args.dim, attention=args.attention)
    model = Decoder(cfg, args.vocab, args.feature_dim).to(device).train()
    bf16 = bf16_projections(TrainConfig(features=("bench",), bf16_projections=args.bf16_projections), cfg, device)
    opt = torch.optim.Adam(model.parameters(), 4e-4, fused=True)   # as train.py
    pool = torch.randn(256, args.regions, args.feature_dim).half()     # fp16 "cache" in RAM
    step = xe_step(model, opt, list(model.parameters()), pool, lengths, args.vocab, device)

    gemm_before = gemm_gflops(device)
    timed = batches[args.warmup:]
    eager = {}
    if args.compare_eager:       # today's step first: eager kernels, the allocator as glibc leaves it
        fused.set_eager(True)
        eager["untuned"] = _timed(step, batches, args.warmup, device)
    if device.type == "cpu":
        tune_cpu_allocator()     # as train.py does on CPU
    if args.compare_eager:       # then alternate eager / optimised, best of --rounds each
        runs = []
        for _ in range(args.rounds):
            fused.set_eager(True)
            runs.append(("eager", _timed(step, batches, args.warmup, device)))
            fused.set_eager(False)
            if bf16:
                model.bf16_projections = False
                runs.append(("fp32_projections", _timed(step, batches, args.warmup, device)))
            model.bf16_projections = bf16
            runs.append(("fast", _timed(step, batches, args.warmup, device)))
        eager["tuned"] = min((r for k, r in runs if k == "eager"), key=lambda r: r[0])
        if bf16:
            eager["fp32_projections"] = min((r for k, r in runs if k == "fp32_projections"), key=lambda r: r[0])
        dt, cpu = min((r for k, r in runs if k == "fast"), key=lambda r: r[0])
    else:
        fused.set_eager(False)
        model.bf16_projections = bf16
        dt, cpu = _timed(step, batches, args.warmup, device)
    gemm_after = gemm_gflops(device)

    caps = sum(len(b) for b in timed)
    words = sum(len(b) * (int(lengths[b[0]]) + 1) for b in timed)
    flops = count_flops(cfg, args.vocab, args.feature_dim, args.regions, [int(lengths[i]) + 1 for b in timed for i in b])
    gemm = (gemm_before + gemm_after) / 2
    res = {"device": str(device), "fused_kernels": fused.available(), "threads": torch.get_num_threads(), "attention": args.attention,
           "bf16_projections": bf16,
           "steps": len(timed), "captions": caps, "seconds": round(dt, 3),
           "captions_per_s": round(caps / dt, 1), "words_per_s": round(words / dt, 1),
           # CPU seconds of this process: less sensitive to time-sharing with other processes
           "cpu_s": round(cpu, 3), "captions_per_cpu_s": round(caps / cpu, 1),
           "matmul_gflop_per_s": round(flops / dt / 1e9, 1), "gemm_gflop_per_s": round(gemm, 1),
           "gemm_before_after": [round(gemm_before, 1), round(gemm_after, 1)],
           "ratio_to_gemm": round(flops / dt / 1e9 / gemm, 3),
           "mean_words": round(float(np.mean([lengths[b[0]] for b in timed])), 2),
           "lengths_from": source, "loadavg": [round(v, 2) for v in os.getloadavg()], "cpus": os.cpu_count()}
    print(f"{res['captions_per_s']} captions/s ({res['words_per_s']} words/s), "
          f"{res['matmul_gflop_per_s']} GFLOP/s matmul = {res['ratio_to_gemm']:.2f} x fp32 GEMM "
          f"({res['gemm_gflop_per_s']} GFLOP/s; before/after {res['gemm_before_after']}), "
          f"{res['steps']} steps of batch <= {args.batch_size}, {device}, {res['threads']} threads, "
          f"load average {res['loadavg']}; {res['captions_per_cpu_s']} captions per CPU-second")
    what = {"untuned": "eager step (allocator untuned, as before)", "tuned": "eager step (allocator tuned)",
            "fp32_projections": "optimised step with fp32 projections"}
    for k, (edt, _) in eager.items():
        name = k if k == "fp32_projections" else f"eager_{k}"
        res[f"{name}_captions_per_s"] = round(caps / edt, 1)
        res[f"speedup_vs_{name}"] = round(edt / dt, 2)
        print(f"{what[k]}: {res[f'{name}_captions_per_s']} captions/s -> this step {res[f'speedup_vs_{name}']}x")
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
