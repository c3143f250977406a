"""Which ops of a decoder training step gain from more threads: per-op wall time at 1 and N threads.

    .venv/bin/python benchmarks/profile_threads.py --threads 2 --length 10

One process, random fp16 features, the default decoder (512/512/512, C=512, L=196, vocab 2538), batch 64 of one
caption length, the training step as train.py runs it (forward, label-smoothed NLL, backward, grad clip, Adam).
Run it with no other job on the machine: the figures are wall times (torch profiler, self time per op).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.decoder.model import Decoder, DecoderConfig  # noqa: E402
from pipeline.device import tune_cpu_allocator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="compared against 1 thread")
    ap.add_argument("--length", type=int, default=10, help="words per caption")
    ap.add_argument("--steps", type=int, default=8, help="timed steps (the profile takes half as many)")
    ap.add_argument("--rows", type=int, default=22, help="ops shown, the slowest at 1 thread first")
    args = ap.parse_args()
    tune_cpu_allocator()
    torch.manual_seed(0)
    V, B, T = 2538, 64, args.length
    model = Decoder(DecoderConfig(), V, 512)
    opt = torch.optim.Adam(model.parameters(), 4e-4)
    feats, tokens = torch.randn(B, 196, 512).half(), torch.randint(4, V, (B, T + 2))

    def step():
        logits = model(feats.float(), tokens)["logits"]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1), label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    per_op, wall = {}, {}
    for nt in (1, args.threads):
        torch.set_num_threads(nt)
        for _ in range(3):
            step()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        wall[nt] = (time.perf_counter() - t) / args.steps * 1e3
        n = max(args.steps // 2, 1)
        with profile() as prof:
            for _ in range(n):
                step()
        per_op[nt] = {e.key: e.self_cpu_time_total / n / 1e3 for e in prof.key_averages()}
    hi = args.threads
    print(f"{'op':40s} {'1 thread ms':>12s} {f'{hi} threads ms':>13s} {'speed-up':>9s}")
    for k in sorted(per_op[1], key=lambda k: -per_op[1][k])[:args.rows]:
        a, b = per_op[1][k], per_op[hi].get(k, float("nan"))
        print(f"{k[:40]:40s} {a:12.1f} {b:13.1f} {a / b:9.2f}")
    print(f"{'the whole step (timed, not profiled)':40s} {wall[1]:12.1f} {wall[hi]:13.1f} {wall[1] / wall[hi]:9.2f}")


if __name__ == "__main__":
    main()
