"""How much of each object's colour, shape, size and place a synthetic-shapes feature cache keeps.

    .venv/bin/python benchmarks/probe_shapes.py features/shapes2k_vgg19.h5

For every object of every image, the annotation vectors of the grid cells its box touches are
max-pooled into one C-vector (log1p, as the features are sparse ReLU outputs with a long tail).
A linear softmax classifier (Adam, weight decay 1e-4, full batch) is fitted on the train split
and scored on val, for: colour, shape, size, and which third of the image (left/middle/right,
top/middle/bottom) the object's centre is in. Next to each accuracy is the majority-class rate.

An attention decoder can only say what these vectors carry: this is the ceiling of what a caption
can get right about an object, whatever the decoder (docs/tuning.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.data import synth  # noqa: E402
from pipeline.inference.score import grid_and_size, cell_overlap  # noqa: E402
from pipeline.cache.readers import FeatureStore  # noqa: E402


def object_vectors(st: FeatureStore, feats: np.ndarray, split: str):
    """(n_objects, C) pooled vectors and the label of each property per object."""
    grid, image_size = grid_and_size(st)                          # the mapping attention accuracy uses
    xs, labels = [], {k: [] for k in ("colour", "shape", "size", "x third", "y third")}
    for row in st.rows(split):
        for o in st.objects[row]:
            touched = cell_overlap([o["box"]], grid, image_size).reshape(-1) > 0    # (L,) cells under the box
            xs.append(feats[row][touched].max(0))                                 # (C,)
            x0, y0, x1, y1 = o["box"]
            labels["colour"].append(list(synth.COLORS).index(o["color"]))
            labels["shape"].append(synth.SHAPES.index(o["shape"]))
            labels["size"].append(list(synth.SIZES).index(o["size"]))
            labels["x third"].append(min(int(3 * (x0 + x1) / 2 / image_size[1]), 2))
            labels["y third"].append(min(int(3 * (y0 + y1) / 2 / image_size[0]), 2))
    x = torch.from_numpy(np.log1p(np.stack(xs).astype(np.float32)))
    return x, {k: torch.tensor(v) for k, v in labels.items()}


def probe(x_tr, y_tr, x_va, y_va, steps: int = 500) -> float:
    torch.manual_seed(0)
    lin = torch.nn.Linear(x_tr.size(1), int(max(y_tr.max(), y_va.max())) + 1)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(x_tr), y_tr).backward()
        opt.step()
    with torch.no_grad():
        return (lin(x_va).argmax(1) == y_va).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("features", help="an HDF5 cache of the synthetic shapes set (it stores the boxes)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    st = FeatureStore.open(args.features)
    if st.objects is None:
        sys.exit(f"{args.features}: no /objects (boxes); this probe needs a synthetic shapes cache.")
    feats = st.load_features()
    x_tr, y_tr = object_vectors(st, feats, "train")
    x_va, y_va = object_vectors(st, feats, "val")
    print(f"{args.features}: {len(x_tr)} train / {len(x_va)} val objects, C={x_tr.size(1)}")
    print(f"{'property':<10} {'val acc':>8} {'majority':>9}")
    for k in y_tr:
        majority = np.bincount(y_va[k].numpy()).max() / len(y_va[k])
        print(f"{k:<10} {100 * probe(x_tr, y_tr[k], x_va, y_va[k]):8.1f} {100 * majority:9.1f}")


if __name__ == "__main__":
    main()
