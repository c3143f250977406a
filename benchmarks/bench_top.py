"""Training step time of the decoder alone vs the decoder + a fine-tuned VGG19 top (issue 18 part 2).

    nice -n 19 .venv/bin/python benchmarks/bench_top.py --threads 1 --steps 4
    .venv/bin/python benchmarks/bench_top.py --layers "" conv5_4_input conv5_1_input --device cuda --steps 20

Each configuration runs real training steps as train.py does (forward, xe loss, backward, grad clip, fused
Adam with the top in its own parameter group) on random fp16 tensors of the real shapes: batches of 64
captions of Flickr8k lengths (bench_train.caption_lengths), features (64, 196, 512) gathered from an
in-RAM pool, 512/512/512 decoder, vocabulary 2,500. Layer "" is the decoder alone on the final-layer
cache; conv5_4_input adds conv5_4 + ReLU (one 3x3x512x512 conv on 14x14 per caption), conv5_1_input
conv5_1 .. conv5_4. The top's weights are random (timing does not depend on their values). Prints
seconds per step (wall and CPU), and minutes per Flickr8k epoch (485 steps of 64 captions), with the load.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import caption_lengths  # noqa: E402
from pipeline.config import DecoderConfig  # noqa: E402
from pipeline.decoder.topped import build_decoder, param_groups  # noqa: E402
from pipeline.training.batching import BucketBatchSampler, select_lengths  # noqa: E402
from bench_train import xe_step  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

EPOCH_STEPS = 485          # Flickr8k: 30,000 train captions (<= 30 words) in batches of 64 captions of one length


def run(layer: str, batches, lengths, args, device) -> dict:
    torch.manual_seed(0)
    prov = [{"backbone": "vgg19", "layer": layer, "weights_sha256": "random"}] if layer else [{"backbone": "vgg19"}]
    model = build_decoder(DecoderConfig(), args.vocab, 512, prov, pretrained_top=True).to(device).train()
    opt = torch.optim.Adam(param_groups(model, 1e-4), lr=4e-4, fused=True)       # as train.py
    params = [p for p in model.parameters() if p.requires_grad]
    pool = torch.randn(256, 196, 512).half()                          # an fp16 "cache" in RAM
    step = xe_step(model, opt, params, pool, lengths, args.vocab, device)

    for b in batches[: args.warmup]:
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    timed = batches[args.warmup:]
    t, c = time.perf_counter(), time.process_time()
    for b in timed:
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt, cpu = time.perf_counter() - t, time.process_time() - c
    s = dt / len(timed)
    return {"layer": layer or "final (decoder alone)", "steps": len(timed),
            "captions": int(sum(len(b) for b in timed)), "s_per_step": round(s, 3),
            "cpu_s_per_step": round(cpu / len(timed), 3), "min_per_flickr8k_epoch": round(s * EPOCH_STEPS / 60, 1),
            "loadavg": [round(v, 2) for v in os.getloadavg()]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", nargs="+", default=["", "conv5_4_input"],
                    help='"" (decoder alone), conv5_4_input, conv5_1_input')
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=2500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lengths, source = caption_lengths()
    lengths = lengths[select_lengths(lengths, 30)[0]]
    # full batches of 64 only (the tail batches of rare lengths are shorter), Flickr8k's length mix
    batches = [b for b in BucketBatchSampler(lengths, 64, seed=0).batches(0) if len(b) == 64][: args.warmup + args.steps]
    out = {"device": str(device), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "mean_words": round(float(np.mean([lengths[b[0]] for b in batches[args.warmup:]])), 2),
           "lengths_from": source, "loadavg_start": [round(v, 2) for v in os.getloadavg()], "runs": []}
    for layer in args.layers:
        r = run(layer, batches, lengths, args, device)
        out["runs"].append(r)
        print(f"{r['layer']}: {r['s_per_step']} s/step (CPU {r['cpu_s_per_step']} s), "
              f"{r['min_per_flickr8k_epoch']} min per Flickr8k epoch ({EPOCH_STEPS} steps), load {r['loadavg']}",
              flush=True)
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
