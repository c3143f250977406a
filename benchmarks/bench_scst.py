"""Self-critical training throughput: sampled captions/s and images/s, beside cross-entropy's captions/s.

    .venv/bin/python benchmarks/bench_scst.py --threads 2                      # untrained decoder
    .venv/bin/python benchmarks/bench_scst.py --threads 2 --run runs/flickr8k_vgg19_soft   # a trained one

One SCST step (objectives.SelfCritical, what `pipeline train --objective scst` runs) = sample K captions
per image with gradient (Decoder.sample), score them with the CIDEr-D reward against the image's
training references (TrainCiderD, document frequencies of the whole train split), baseline, backward,
clip, Adam step. The same process then times cross-entropy steps (objectives.CrossEntropy on batches
of one caption length, as bench_train.py) so the two figures share the machine's state. Features are
random fp16 rows (as bench_train.py); the references are Flickr8k's train captions when
../shared/flickr8k is present (else synthetic ones). An untrained decoder samples long captions (it
rarely draws <end>), so its figure is a lower bound; `--run` loads a trained run whose captions end
where real ones do. The reward's share of the step time is printed, and the minutes an epoch of the
Flickr8k train split (6000 images) takes at the measured rate.
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
from bench_train import caption_lengths  # noqa: E402
from pipeline.training.batching import BucketBatchSampler, select_lengths  # noqa: E402
from pipeline.config import DecoderConfig, TrainConfig  # noqa: E402
from pipeline.decoder.model import Decoder  # noqa: E402
from pipeline.training.objectives import CrossEntropy, SelfCritical, TrainCiderD, reward_references, tokenized  # noqa: E402
from pipeline.data.text import Vocab  # noqa: E402
from pipeline.device import tune_cpu_allocator  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "flickr8k"


def train_references() -> tuple[list[list[str]], str]:
    """Tokenized references of the Flickr8k train images (or 6000 synthetic images when absent)."""
    if (SHARED / "Flickr8k.token.txt").exists():
        from pipeline.data.datasets import load_records
        recs = [r for r in load_records("flickr8k", SHARED, check_images=False) if r.split == "train"]
        return [tokenized(r.captions) for r in recs], "Flickr8k train captions"
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(500)]
    return [[" ".join(rng.choice(words, 10)) for _ in range(5)] for _ in range(6000)], "synthetic captions"


class _Timed:
    """Wraps the reward to measure its share of a step."""

    def __init__(self, reward):
        self.reward, self.seconds = reward, 0.0

    def __call__(self, cands, refs):
        t = time.perf_counter()
        out = self.reward(cands, refs)
        self.seconds += time.perf_counter() - t
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="timed SCST steps")
    ap.add_argument("--xe-steps", type=int, default=15, help="timed cross-entropy steps (0: skip)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--images", type=int, default=64, help="images per SCST step (--batch-size of train)")
    ap.add_argument("--samples", type=int, default=5, help="captions sampled per image")
    ap.add_argument("--max-len", type=int, default=16)
    ap.add_argument("--baseline", choices=["mean", "greedy"], default="mean")
    ap.add_argument("--run", type=Path, default=None, help="a trained run to sample from (else an untrained decoder)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    tune_cpu_allocator()                    # as train.py does on CPU

    refs, source = train_references()
    t0 = time.perf_counter()
    end = TrainConfig().scst_reward_end                            # the reward train.py uses
    rrefs = reward_references(dict(enumerate(refs)), end)
    reward = _Timed(TrainCiderD(list(rrefs.values())))
    df_s = time.perf_counter() - t0
    if args.run:
        from pipeline.training.runs import load_run, open_run_features
        r = load_run(args.run)
        model, vocab = r.model, r.vocab
        pool = torch.from_numpy(open_run_features(r.ckpt, r.run_dir).load_features(range(256)))   # real rows
    else:
        vocab = Vocab.build([c for rs in refs for c in rs], 5)
        model = Decoder(DecoderConfig(), len(vocab), 512)
        pool = torch.randn(256, 196, 512).half()
    model.train()
    opt = torch.optim.Adam(model.parameters(), 5e-5, fused=True)
    scst = SelfCritical(reward, rrefs, vocab, samples=args.samples, baseline=args.baseline,
                        max_len=args.max_len, end_token=end)

    def scst_step(k):
        rows = torch.from_numpy(np.random.default_rng(k).choice(len(refs), args.images, replace=False))
        x = pool[torch.randint(0, len(pool), (args.images,))].float()
        loss, parts = scst(model, model, (x, rows), device, False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    for k in range(args.warmup):
        scst_step(k)
    reward.seconds = 0.0
    t, c = time.perf_counter(), time.process_time()
    for k in range(args.steps):
        scst_step(100 + k)
    dt, cpu = time.perf_counter() - t, time.process_time() - c
    images = args.steps * args.images
    res = {"threads": torch.get_num_threads(), "model": str(args.run or "untrained 512/512/512"),
           "images_per_step": args.images, "samples": args.samples, "baseline": args.baseline,
           "max_len": args.max_len, "steps": args.steps, "seconds": round(dt, 2),
           "images_per_s": round(images / dt, 2), "sampled_captions_per_s": round(images * args.samples / dt, 1),
           "reward_share": round(reward.seconds / dt, 3), "reward_df_build_s": round(df_s, 2),
           "cpu_s": round(cpu, 2), "flickr8k_epoch_min": round(6000 / (images / dt) / 60, 1),
           "references": source, "loadavg": [round(v, 2) for v in os.getloadavg()]}

    if args.xe_steps:
        lengths, _ = caption_lengths()
        lengths = lengths[select_lengths(lengths, 30)[0]]
        batches = BucketBatchSampler(lengths, 64, seed=0).batches(0)[: args.warmup + args.xe_steps]
        xe = CrossEntropy()
        V = len(vocab)

        def xe_step(b):
            n = int(lengths[b[0]])
            x = pool[torch.randint(0, len(pool), (len(b),))].float()
            y = torch.randint(4, V, (len(b), n + 2))
            y[:, 0], y[:, -1] = 1, 2
            loss, _ = xe(model, model, (x, y), device, False)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
        for b in batches[: args.warmup]:
            xe_step(b)
        t = time.perf_counter()
        for b in batches[args.warmup:]:
            xe_step(b)
        xdt = time.perf_counter() - t
        caps = sum(len(b) for b in batches[args.warmup:])
        res.update(xe_captions_per_s=round(caps / xdt, 1),
                   scst_vs_xe=round(res["sampled_captions_per_s"] / (caps / xdt), 3),
                   xe_flickr8k_epoch_min=round(29992 / (caps / xdt) / 60, 1))
    print(f"SCST: {res['images_per_s']} images/s = {res['sampled_captions_per_s']} sampled captions/s "
          f"({args.images} images x {args.samples} samples per step, {args.baseline} baseline, reward "
          f"{100 * res['reward_share']:.0f}% of the time), {res['threads']} threads; a Flickr8k epoch "
          f"(6000 images) takes {res['flickr8k_epoch_min']} min"
          + (f"; cross-entropy {res['xe_captions_per_s']} captions/s in the same process "
             f"(SCST/XE = {res['scst_vs_xe']}), an XE epoch {res['xe_flickr8k_epoch_min']} min"
             if args.xe_steps else "") + f"; load {res['loadavg']}")
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
