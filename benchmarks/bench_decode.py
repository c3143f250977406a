"""Decoding throughput: images/s of batched beam search for beam 1/3/5 over 1000 cached images.

    .venv/bin/python benchmarks/bench_decode.py                         # random features, tiny trained model
    .venv/bin/python benchmarks/bench_decode.py --run runs/NAME         # a real run (+ its features file)
    .venv/bin/python benchmarks/bench_decode.py --features F.h5 --split val

Without --run, a full-size Decoder (DecoderConfig defaults, vocabulary --vocab) is trained for
--train-steps steps on random features and synthetic captions of 8-16 words so that it ends its
captions by itself (an untrained decoder never emits <end> and every image would run to --max-len);
it is cached in bench_out/ for the next run. Timing excludes training and reading features.
fp32 throughout. Results go to stdout and, with --out, to a JSON file. --allocator reuse keeps freed memory
for the next batch (pipeline.device.tune_cpu_allocator(large=True), what `pipeline extract` does on a CPU);
--allocator default (the default, as `pipeline score`) leaves glibc's. Beam search gained nothing from it
(docs/features.md "The allocator (CPU)"), so `score` keeps glibc's.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.decoder.decode import decode_features  # noqa: E402


def random_features(n: int, L: int, C: int, seed: int = 0) -> np.ndarray:
    """(n, L, C) float32, non-negative like post-ReLU conv features."""
    rng = np.random.default_rng(seed)
    return np.abs(rng.standard_normal((n, L, C), dtype=np.float32))


def train_tiny(feats: np.ndarray, vocab: int, steps: int, batch: int, seed: int = 0, log=print):
    """A default-size Decoder taught to end its captions: synthetic 8-16 word captions, Zipf word choice."""
    from pipeline.decoder.model import Decoder, DecoderConfig
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Decoder(DecoderConfig(), vocab, feats.shape[2])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    zipf = 1.0 / np.arange(1, vocab - 4 + 1)
    zipf /= zipf.sum()
    t0 = time.time()
    model.train()
    for s in range(steps):
        idx = rng.integers(0, len(feats), batch)
        n = int(rng.integers(8, 17))                                  # one length per batch: no padding
        words = 4 + rng.choice(vocab - 4, size=(batch, n), p=zipf)
        tokens = torch.as_tensor(np.concatenate([np.ones((batch, 1)), words, np.full((batch, 1), 2)], 1)).long()
        out = model(torch.as_tensor(feats[idx]), tokens)               # logits (B, n+1, V)
        loss = F.cross_entropy(out["logits"].reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (s + 1) % 50 == 0:
            log(f"  train step {s + 1}/{steps}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    return model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="run directory (runs.load_run); default: train a tiny model")
    ap.add_argument("--features", help="HDF5 features file (default: the run's, else random)")
    ap.add_argument("--split", default="val", help="split of --features to decode (default val)")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--beams", default="1,3,5")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=20)
    ap.add_argument("--length-norm", type=float, default=None)
    ap.add_argument("--vocab", type=int, default=2500, help="vocabulary of the tiny model (Flickr8k: ~2500)")
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--model-cache", default="bench_out/bench_decode_model.pt",
                    help="the tiny trained model is kept here and reused ('' = always retrain)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4),
                    help="decoding processes, 1 thread each when > 1 (default, like `pipeline score`: one per core, <= 4)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="write results JSON here")
    ap.add_argument("--allocator", choices=("reuse", "default"), default="default",
                    help="reuse: freed memory kept for the next batch, as `pipeline extract` on CPU; "
                         "default: glibc's, as `score`")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.allocator == "reuse":
        from pipeline.device import tune_cpu_allocator
        tune_cpu_allocator(large=True)

    feats = src = None
    model = None
    if a.run:
        from pipeline.training.runs import feature_paths, load_run
        run = load_run(a.run)
        model = run.model
        a.features = a.features or [str(p) for p in feature_paths(run.ckpt, run.run_dir)]
    if isinstance(a.features, str):
        a.features = [a.features]
    if a.features and all(Path(f).exists() for f in a.features):
        from pipeline.cache.readers import open_features
        st = open_features(a.features)
        rows = st.rows(a.split)[:a.images]
        feats, src = st.load_features(rows).astype(np.float32), f"{a.features}:{a.split}"
    if feats is None:
        feats, src = random_features(a.images, 196, 512), "random L=196 C=512"
    print(f"features: {src} {feats.shape}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    if model is None:
        from pipeline.decoder.model import Decoder, DecoderConfig
        cache = Path(a.model_cache) if a.model_cache else None
        key = {"vocab": a.vocab, "steps": a.train_steps, "C": feats.shape[2]}
        if cache and cache.exists() and (c := torch.load(cache, weights_only=False)).get("key") == key:
            model = Decoder(DecoderConfig(), a.vocab, feats.shape[2])
            model.load_state_dict(c["model"])
            print(f"tiny trained decoder from {cache}")
        else:
            print(f"training a tiny default-size decoder ({a.train_steps} steps, vocab {a.vocab}) ...")
            t0 = time.time()
            model = train_tiny(feats, a.vocab, a.train_steps, 16)
            print(f"  trained in {time.time() - t0:.0f}s")
            if cache:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"key": key, "model": model.state_dict()}, cache)
    model = model.to(a.device).float().eval()

    decode_features(model, feats[:a.batch_size], beam=3, max_len=a.max_len, batch_size=a.batch_size,
                    device=a.device, progress=False)                  # warm-up
    results = []
    for k in [int(b) for b in a.beams.split(",")]:
        t0 = time.time()
        hyps = decode_features(model, feats, beam=k, max_len=a.max_len, length_norm=a.length_norm,
                               batch_size=a.batch_size, device=a.device, workers=a.workers, progress=False)
        dt = time.time() - t0
        r = {"beam": k, "images": len(feats), "seconds": round(dt, 2), "images_per_s": round(len(feats) / dt, 1),
             "mean_len": round(float(np.mean([len(h.tokens) for h in hyps])), 2),
             "ended": round(float(np.mean([h.ended for h in hyps])), 3)}
        results.append(r)
        print(f"beam {k}: {r['images_per_s']:7.1f} images/s  ({dt:.1f}s for {len(feats)}; mean length "
              f"{r['mean_len']}, {100 * r['ended']:.0f}% ended; batch {a.batch_size}, load {os.getloadavg()[0]:.1f})")
    if a.out:
        Path(a.out).write_text(json.dumps({"features": src, "batch_size": a.batch_size, "threads": torch.get_num_threads(),
                                           "workers": a.workers, "load": os.getloadavg()[0], "allocator": a.allocator,
                                           "results": results}, indent=1))


if __name__ == "__main__":
    main()
