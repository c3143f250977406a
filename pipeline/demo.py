"""`make demo`: the whole pipeline on the embedded synthetic "shapes" set, on CPU, in minutes.

synthetic images -> VGG19 features (HDF5) -> soft-attention decoder -> score val/test (with attention
accuracy) -> caption two test images with attention maps -> the results browser of the val split.
Every step is the same CLI command a user would type; the demo only strings them together and
prints each command first.
"""
from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Callable

import click


def run_demo(invoke: Callable[[list[str]], None], out: Path, *, train: int, val: int, test: int, minutes: float,
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
    _run(["train", "--features", str(features), "--attention", "soft", "--run", str(run),
          "--max-minutes", str(minutes), "--resume"])
    for split in ("val", "test"):
        _run(["score", "--run", str(run), "--split", split, "--beam", "3"])
    images = sorted((data / "images").glob("test_*.jpg"))[:2]
    _run(["caption", *map(str, images), "--run", str(run), "--attention", str(out / "attention.png")])
    site = out / "browse"
    _run(["browse", "--run", str(run), "--split", "val", "--beam", "3", "--out", str(site)])
    click.secho(f"demo finished in {(time.time() - t0) / 60:.1f} min; attention maps: {out}/attention*.png",
                fg="green")
    click.secho(f"results browser (open it from disk, no server needed): {site / 'index.html'}", fg="green")
