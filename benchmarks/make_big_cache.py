"""A COCO-sized feature cache without extracting it: random fp16 rows in the real HDF5 layout.

    .venv/bin/python benchmarks/make_big_cache.py --out features/coco_sized_random.h5          # 123,287 rows, ~25 GB
    .venv/bin/python benchmarks/make_big_cache.py --out /tmp/small.h5 --images 10000            # a subset to hold in RAM

The file is what `pipeline extract` writes (layout.create: metadata, provenance attributes, /done), for
123,287 images (Karpathy's COCO: 113,287 train with restval, 5,000 val, 5,000 test) x 196 x 512 fp16
(VGG19's shape; --dim 2048 for a ResNet-sized 99 GB one). Each image has 5 captions whose lengths
follow Flickr8k's words-per-caption histogram, with words drawn (Zipf-like) from a fixed list of
--words words, so a vocabulary built from any subset is the same size as from the whole set (the
decoder's cost depends on it). Feature rows are random normal values: only the I/O and the decoder's
cost matter for the out-of-core benchmark (benchmarks/bench_ooc.py). Rows are written in contiguous
blocks; /done is set last, so an interrupted run leaves a file that is refused as incomplete.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_train import caption_lengths  # noqa: E402
from pipeline.cache import layout  # noqa: E402
from pipeline.data.records import Record  # noqa: E402


def records(n: int, n_val: int, n_test: int, words: int, seed: int) -> list[Record]:
    rng = np.random.default_rng(seed)
    lengths, _ = caption_lengths()
    vocab = np.array([f"w{i:04d}" for i in range(words)])
    p = 1.0 / np.arange(1, words + 1)                      # Zipf-like word frequencies
    p /= p.sum()
    caps_len = rng.choice(lengths, size=(n, 5))
    flat = vocab[rng.choice(words, size=int(caps_len.sum()), p=p)]
    splits = np.array(["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test)
    out, k = [], 0
    for i in range(n):
        caps = []
        for m in caps_len[i]:
            caps.append(" ".join(flat[k:k + m]))
            k += m
        out.append(Record(f"{i:06d}", Path(f"img/{i:06d}.jpg"), str(splits[i]), caps))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--images", type=int, default=123_287)
    ap.add_argument("--val", type=int, default=5000)
    ap.add_argument("--test", type=int, default=5000)
    ap.add_argument("--regions", type=int, default=196)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--words", type=int, default=2500)
    ap.add_argument("--block", type=int, default=1024, help="rows per write")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.time()
    recs = records(a.images, min(a.val, a.images // 10), min(a.test, a.images // 10), a.words, a.seed)
    prov = {"backbone": "random-rows", "weights_sha256": "random", "preprocessing": {"kind": "none"},
            "input_size": 224, "grid": [14, 14] if a.regions == 196 else [a.regions, 1],
            "dataset": f"synthetic-coco-sized-{a.images}", "split_hashes": {}, "captions_sha256": ""}
    layout.create(a.out, recs, prov, num_regions=a.regions, feature_dim=a.dim, dtype="float16")
    rng = np.random.default_rng(a.seed)
    pool = rng.standard_normal((a.block, a.regions, a.dim), dtype=np.float32).astype(np.float16)
    t1 = time.time()
    with h5py.File(a.out, "r+") as f:
        d = f["features"]
        for i in range(0, a.images, a.block):
            j = min(i + a.block, a.images)
            d[i:j] = np.roll(pool[: j - i], i % 97, axis=2)   # rows differ between blocks (cheaply)
            if (i // a.block) % 20 == 0:
                print(f"\r{j}/{a.images} rows ({(time.time() - t1):.0f} s)", end="", flush=True)
        f.flush()
        f["done"][...] = True
    size = a.out.stat().st_size
    print(f"\n{a.out}: {a.images} images x {a.regions} x {a.dim} fp16, {size / 2**30:.1f} GiB, "
          f"{5 * a.images} captions; metadata {t1 - t0:.0f} s, features {time.time() - t1:.0f} s "
          f"({size / 2**20 / max(time.time() - t1, 1e-9):.0f} MiB/s written)")


if __name__ == "__main__":
    main()
