"""`make demo`: the whole pipeline on the embedded synthetic "shapes" set, on CPU, in minutes.

synthetic images -> VGG19 features (HDF5) -> soft-attention decoder -> score val/test (with attention
accuracy) -> caption two test images with attention maps -> the results browser of the val split.
Every step is the same CLI command a user would type; the demo only strings them together and
prints each command first. Run again over the same --out, each stage finds its work done (the data set and
the cache are complete, the training `--resume`s a finished run, which only says so) or redoes it in place,
so a second `make demo` succeeds and deletes nothing.

The decoder trains a fixed number of epochs (not a time budget), so a fresh clone shows the same
numbers on a busy machine as on an idle one, only later. Its settings are the demo's own (TRAIN_ARGS):
the train defaults are the Flickr8k recipe, whose dropouts and label smoothing regularise 30,000 noisy
human captions over 10+ epochs; the synthetic captions are a function of the picture, and a few
epochs on 500 images need the faster rate and no regularisation (docs/training.md has the comparison).
"""
from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Callable

import click


EPOCHS = 12     # the whole demo under 10 minutes on the 2-core CPU (README, "Speed")
# The demo's training settings (see the module docstring): every one given, so a change of a train default
# does not change the demo.
TRAIN_ARGS = ("--attention", "soft", "--lr", "1e-3", "--embed-dropout", "0", "--context-dropout", "0",
              "--hidden-dropout", "0", "--label-smoothing", "0", "--batch-size", "64", "--seed", "0",
              # no weight average (its 1,000-step span is longer than the whole demo), plateau schedule, greedy val
              "--ema", "0", "--lr-schedule", "plateau", "--lr-factor", "0.8", "--beam", "1",
              # one thread: this small decoder gains little from two, and two threads on a core that another
              # job holds ran 8x slower (0.2 vs 1.7 batches/s, same numbers); results do not depend on it
              "--threads", "1")


def run_demo(invoke: Callable[[list[str]], None], out: Path, *, train: int, val: int, test: int, epochs: int,
             weights_dir: str, backbone: str) -> None:
    """`invoke(args)` runs one `pipeline` command line (cli.py passes its own click group, so this module
    does not import the CLI that imports it)."""
    def _run(args: list[str]) -> None:
        click.secho("$ pipeline " + shlex.join(args), fg="cyan")
        t0 = time.time()
        invoke(args)
        click.echo(f"  ({time.time() - t0:.0f} s)")

    out = Path(out)
    data, features, run = out / "shapes", out / f"shapes_{backbone}.h5", out / "runs" / f"shapes_{backbone}_soft"
    t0 = time.time()
    _run(["synth", "--out", str(data), "--train", str(train), "--val", str(val), "--test", str(test)])
    if backbone == "vgg19":
        _run(["weights", "--dir", weights_dir])
    _run(["extract", "--dataset", "shapes", "--root", str(data), "--backbone", backbone,
          "--weights-dir", weights_dir, "--out", str(features)])
    _run(["train", "--features", str(features), "--run", str(run), *TRAIN_ARGS, "--epochs", str(epochs),
          "--patience", str(epochs), "--resume"])
    for split in ("val", "test"):
        _run(["score", "--run", str(run), "--split", split, "--beam", "3"])
    images = sorted((data / "images").glob("test_*.jpg"))[:2]
    _run(["caption", *map(str, images), "--run", str(run), "--attention", str(out / "attention.png")])
    site = out / "browse"
    _run(["browse", "--run", str(run), "--split", "val", "--beam", "3", "--out", str(site)])
    click.secho(f"demo finished in {(time.time() - t0) / 60:.1f} min; attention maps: {out}/attention*.png",
                fg="green")
    click.secho(f"results browser (open it from disk, no server needed): {site / 'index.html'}", fg="green")
