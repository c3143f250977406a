"""The state of a training run, and how a run is set up: new, from --init-from, or resumed from last.pt.

    setup()           -> (TrainState, Data, DistInfo)   the settings (_settings: new or --resume), the cache,
                         --init-from (_init_from), the device and process group (_device), the data (data.py)
    TrainState        everything a run is (model, optimizer, schedule, RNG, counters in `Progress`, history,
                      settings, vocabulary, the features' provenance); `to_checkpoint` builds the checkpoint
                      dict in one place, `from_checkpoint` restores it bit-exactly
    RESUMABLE         the settings a --resume may change

Checkpoints hold only tensors and plain Python values (torch.load(weights_only=True) reads them), so no
class of this module is pickled into them.
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import distributed as dist_mod
from pipeline.cache import layout
from pipeline.cache.readers import open_features
from pipeline.config import DecoderConfig, TrainConfig
from pipeline.data.text import Vocab
from pipeline.decoder.model import Decoder
from pipeline.decoder.topped import check_init, param_groups, training_model   # a cache of an earlier layer
from pipeline.device import resolve_device
from pipeline.errors import UserError
from pipeline.fileio import write_json
from pipeline.provenance import COMPUTE_KEYS, add_compute, code_version
from pipeline.training import compute as compute_mod, runs
from pipeline.training.ema import WeightAverage
from pipeline.training.data import Data, Features, check_splits, fits_in_memory, make_data

# Settings a --resume may change: how long and where to run, not what is trained.
RESUMABLE = ("features", "epochs", "patience", "max_minutes", "max_steps", "device", "threads", "in_ram",
             "num_workers", "val_batch_size", "log_every", "decode_beam", "decode_length_norm", "bf16_projections")


# -- the state of a run -----------------------------------------------------------------------------
def _new_acc() -> dict:
    return {"loss": 0.0, "nll": 0.0, "reg": 0.0, "reward": 0.0, "steps": 0, "captions": 0, "train_s": 0.0,
            "wall_s": 0.0, "cpu_s": 0.0, "gpu_s": 0.0}     # compute of the epoch so far (provenance.ComputeMeter)


@dataclass
class Progress:
    epoch: int = 0                 # epochs finished
    batch_in_epoch: int = 0        # batches of the current epoch done
    step: int = 0                  # optimizer steps in total
    best_score: float = -1.0       # best val select_metric so far
    best_epoch: int = 0
    bad_epochs: int = 0            # epochs since the best one
    history: list = field(default_factory=list)     # one dict per finished epoch (log.jsonl)
    epoch_acc: dict = field(default_factory=_new_acc)
    compute: dict = field(default_factory=dict)     # the run's wall/cpu/gpu seconds in total, all sessions


class TrainState:
    """Everything a run is; `to_checkpoint` is the one place its checkpoint dict is built."""

    def __init__(self, cfg: TrainConfig, dcfg: DecoderConfig, vocab: Vocab, model: Decoder, features: list[dict],
                 feature_dim: int, num_regions: int, device: torch.device, init_from: dict | None = None):
        self.cfg, self.dcfg, self.vocab, self.model = cfg, dcfg, vocab, model
        self.features, self.feature_dim, self.num_regions, self.device = features, feature_dim, num_regions, device
        self.init_from = init_from               # {"run", "epoch", "code_version"} of --init-from, or None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = _optimizer(cfg, param_groups(model, cfg.top_lr))   # a fine-tuned top: its own lr
        self.scheduler = _scheduler(cfg, self.optimizer)
        self.ema = WeightAverage(model, cfg.ema) if cfg.ema > 0 else None   # --ema: ema.py
        self.progress = Progress()

    def to_checkpoint(self, finished: bool) -> dict:
        """With --ema, `model` is the average (what validation decoded) and `ema` the weights being trained."""
        p = self.progress
        model, ema = (self.model.state_dict(), None) if self.ema is None else \
            self.ema.to_checkpoint(self.model.state_dict())
        return {"format_version": runs.CHECKPOINT_FORMAT, "code_version": code_version(),
                "model": model, **({"ema": ema} if ema is not None else {}), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": _rng_state(self.device),
                "epoch": p.epoch, "batch_in_epoch": p.batch_in_epoch, "step": p.step, "best_score": p.best_score,
                "best_epoch": p.best_epoch, "bad_epochs": p.bad_epochs, "history": p.history,
                "epoch_acc": p.epoch_acc, "finished": finished, "select_metric": self.cfg.metric,
                "vocab": self.vocab.to_dict(), "decoder_config": self.dcfg.to_dict(),
                "train_config": asdict(self.cfg), "features": self.features, "feature_dim": self.feature_dim,
                "num_regions": self.num_regions, "init_from": self.init_from, "compute": p.compute}

    def from_checkpoint(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None:     # `model` was the average: the training weights back from `ema`
            self.ema.restore(ckpt.get("ema"), where="last.pt")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"], self.device)
        acc, compute = compute_mod.restore(ckpt)     # a checkpoint from before compute recording: from here
        self.progress = Progress(ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"], ckpt["best_score"],
                                 ckpt["best_epoch"], ckpt["bad_epochs"], ckpt["history"], acc, compute)

    def validation_weights(self):
        """A context in which the model holds the weights validation decodes with: the average with --ema."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def add_compute(self, lap: dict) -> None:
        """A stretch of compute (ComputeMeter.lap, summed over ranks) into the run's and the epoch's totals."""
        p = self.progress
        p.compute = add_compute(p.compute, lap)
        p.epoch_acc.update(add_compute({k: p.epoch_acc.get(k) for k in COMPUTE_KEYS}, lap))

    def end_epoch(self, metrics: dict, echo) -> bool:
        """Select, schedule, record one finished epoch; True when it is the best so far."""
        p, score = self.progress, metrics[self.cfg.metric]
        if self.cfg.lr_schedule == "plateau":
            self.scheduler.step(score)
        else:
            self.scheduler.step()
        improved = score > p.best_score
        if improved:
            p.best_score, p.best_epoch, p.bad_epochs = score, p.epoch + 1, 0
        else:
            p.bad_epochs += 1
        a, n = p.epoch_acc, max(p.epoch_acc["steps"], 1)
        p.history.append({"epoch": p.epoch + 1, "step": p.step, "objective": self.cfg.objective,
                          "loss": a["loss"] / n, "nll": a["nll"] / n, "reg": a["reg"] / n, "reward": a["reward"] / n,
                          "lr": self.optimizer.param_groups[0]["lr"], **metrics, "select": self.cfg.metric,
                          "best": p.best_score, "train_s": round(a["train_s"], 2),
                          "captions_per_s": round(a["captions"] / max(a["train_s"], 1e-9), 1),
                          **{k: round(a.get(k, 0.0), 2) for k in COMPUTE_KEYS},
                          **({"compute_partial": True} if a.get("compute_partial") else {}),
                          "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        h = p.history[-1]
        echo(f"epoch {p.epoch + 1}: loss {h['loss']:.3f} nll {h['nll']:.3f}"
             + (f" reward {h['reward']:.3f}" if self.cfg.objective == "scst" else "")
             + " | val BLEU-1..4 " + " ".join(f"{h[f'bleu{i}']:.3f}" for i in range(1, 5))
             + f" CIDEr {h['cider']:.3f} | {h['captions_per_s']} captions/s" + (" *best*" if improved else ""))
        p.epoch, p.batch_in_epoch, p.epoch_acc = p.epoch + 1, 0, _new_acc()
        return improved


def _optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "adam":   # fused: one kernel over all parameters, ~4x faster than foreach on CPU
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _scheduler(cfg: TrainConfig, opt):
    if cfg.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.lr_factor,
                                                          patience=cfg.lr_patience)
    step = cfg.lr_step if cfg.lr_schedule == "step" else 10 ** 9   # "none": a schedule that never decays
    return torch.optim.lr_scheduler.StepLR(opt, step_size=step, gamma=cfg.lr_factor)


def _rng_state(device: torch.device) -> dict:
    s = np.random.get_state()
    return {"python": random.getstate(), "numpy": [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])],
            "torch": torch.get_rng_state(),
            # only this process's GPU: a resume on a machine with another number of GPUs still works
            "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []}


def _set_rng_state(s: dict, device: torch.device) -> None:
    random.setstate(_tuples(s["python"]))
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(s["torch"])
    if device.type == "cuda" and s.get("cuda"):
        torch.cuda.set_rng_state(s["cuda"][0], device)


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# -- setup ------------------------------------------------------------------------------------------
def _resume_cfg(ckpt: dict, overrides: dict, run_dir: Path) -> TrainConfig:
    """The run's training settings with the resume's changes. `overrides` are the options given (training and
    decoder ones); one equal to the saved value is no change, so a run's own command line repeated resumes it.
    A real change of a setting not in RESUMABLE (no decoder setting is) is refused, naming them all."""
    train_cfg = dict(ckpt["train_config"])
    saved = {**train_cfg, **DecoderConfig.from_dict(ckpt["decoder_config"]).to_dict()}   # no name is in both
    changed = {k: v for k, v in overrides.items() if saved.get(k) != v}
    fixed = sorted(k for k in changed if k not in RESUMABLE)
    if fixed:
        raise UserError(f"{run_dir}: --resume continues a run with its own settings; "
                        + ", ".join(f"--{k.replace('_', '-')} {changed[k]!r} (it was trained with {saved.get(k)!r})"
                                    for k in fixed)
                        + " cannot change. Start a new run (--init-from to start from this one's weights).")
    return TrainConfig.from_dict(dict(train_cfg, **changed))


def setup(cfg: TrainConfig | None, dcfg: DecoderConfig | None, run_dir: Path, *, resume: bool, overrides: dict,
          echo, init_loader=None) -> tuple[TrainState, Data, dist_mod.DistInfo]:
    """A new run (from cfg/dcfg, or from --init-from), or a resumed one (from last.pt). `init_loader(ref, log)`
    loads --init-from as a LoadedRun (the app passes the shipped-model loader for a models/ folder); None: a run."""
    cfg, dcfg, ckpt = _settings(cfg, dcfg, run_dir, resume, overrides, echo)
    if not cfg.features:
        raise UserError("no feature file: pass --features FILE (several to fuse caches).")
    st = open_features(cfg.features)
    if ckpt is not None:
        runs.check_features(ckpt, st, where=str(run_dir))

    init, init_info = None, None
    if ckpt is None and cfg.init_from:
        init, init_info, dcfg = _init_from(cfg, st, echo, init_loader or load_init_run)
    elif ckpt is None and cfg.objective == "scst":
        raise UserError("--objective scst starts from a trained model: pass --init-from RUN (a cross-entropy run).")

    device, dinfo = _device(cfg)

    train_caps, refs = check_splits(st, cfg)
    vocab = (Vocab.from_dict(ckpt["vocab"]) if ckpt else init.vocab if init else Vocab.build(train_caps, cfg.min_count))
    in_ram = cfg.in_ram == "yes" or (cfg.in_ram == "auto" and fits_in_memory(st, device, dinfo.local_world_size, echo))
    features = Features(st, in_ram, device)

    torch.manual_seed(cfg.seed)    # the model's initial weights depend on the seed only
    model = training_model(dcfg, len(vocab), st, cfg, resumed=ckpt is not None,
                           init_model=init and init.model).to(device)
    provs = [{"path": str(p), "provenance": dict(prov, precision=layout.read_attrs(p).get("precision") or "fp32")}
             for p, prov in zip(st.paths, st.provenances)]     # precision: informational (identity.INFO_KEYS)
    state = TrainState(cfg, dcfg, vocab, model, provs, st.feature_dim, st.num_regions, device, init_info)
    data = make_data(st, vocab, cfg, features, refs, in_ram, dinfo, echo if ckpt is None else (lambda *_: None))

    if ckpt is not None:
        state.from_checkpoint(ckpt)
        p = state.progress
        echo(f"resuming {run_dir} at epoch {p.epoch + 1}, batch {p.batch_in_epoch}, step {p.step} "
             f"(best val {cfg.metric} {p.best_score:.4f})")
    else:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        echo(f"{len(data.sampler)} batches/epoch, vocab {len(vocab)}, {len(refs)} val images, features "
             f"{'in memory' if in_ram else 'read lazily'}, device {device}"
             + (f", from {init.run_dir} ({_which(init)})" if init else ""))
    if dinfo.is_main:   # config.json says what the run is now (a --resume may have changed its settings)
        run_dir.mkdir(parents=True, exist_ok=True)
        vocab.save(run_dir / "vocab.json")
        write_json(run_dir / "config.json", {"train": asdict(cfg), "decoder": dcfg.to_dict(), "features": provs,
                                                  "vocab_size": len(vocab), "init_from": init_info})
    return state, data, dinfo


def _settings(cfg: TrainConfig | None, dcfg: DecoderConfig | None, run_dir: Path, resume: bool, overrides: dict,
              echo) -> tuple[TrainConfig, DecoderConfig, dict | None]:
    """The run's settings and, for a --resume, its last.pt (else None): a resume takes the saved settings
    (RESUMABLE ones may change); a --resume of a run with no last.pt yet starts it."""
    ckpt = None
    if resume and not (run_dir / "last.pt").exists():
        if cfg is None:
            raise UserError(f"{run_dir}: nothing to resume (no last.pt) and no settings for a new run.")
        echo(f"{run_dir}: nothing to resume yet; starting a new run")   # so one command serves both
        resume = False
    if resume:
        ckpt = runs.load_checkpoint(run_dir / "last.pt")
        cfg = _resume_cfg(ckpt, overrides, run_dir)
        runs.refuse_finished(ckpt, cfg, run_dir)     # nothing left to train: say so, and how to train more
        dcfg = DecoderConfig.from_dict(ckpt["decoder_config"])
    elif runs.has_checkpoint(run_dir):
        raise UserError(f"{run_dir} already holds a run; add --resume to continue it, or pick another --run.")
    return cfg, dcfg, ckpt


def _which(init: runs.LoadedRun) -> str:
    if init.ckpt.get("average"):     # `pipeline average`'s run: a mean of decoders, trained for no epoch itself
        return f"{init.which}.pt: the mean of {len(init.ckpt['average']['members'])} decoders"
    return ("a shipped model" if init.which == "shipped" else f"{init.which}.pt") + f", epoch {init.ckpt['epoch']}"


def load_init_run(ref: str, log) -> runs.LoadedRun:
    """--init-from RUN: its best.pt, else last.pt."""
    if not Path(ref).is_dir():
        raise UserError(f"--init-from {ref}: no such run directory or shipped model. Pass a run made by "
                        f"`pipeline train` (runs/NAME) or a shipped model's name (`pipeline models` lists them).")
    return runs.load_run(ref, which="best" if (Path(ref) / "best.pt").exists() else "last", log=log)


def _init_from(cfg: TrainConfig, st, echo, loader) -> tuple[runs.LoadedRun, dict, DecoderConfig]:
    """--init-from: the run (or shipped model) `loader` loads, checked against the cache `st`; its decoder
    settings, and what the checkpoint records of it (`init_from`)."""
    init = loader(cfg.init_from, echo)
    check_init(init.ckpt, st, runs.check_features, where=f"--init-from {init.run_dir}")   # topped.py
    dcfg = DecoderConfig.from_dict(init.ckpt["decoder_config"])
    init_info = {"run": str(init.run_dir), "which": init.which, "epoch": init.ckpt["epoch"],
                 "code_version": init.ckpt.get("code_version")}
    return init, init_info, dcfg


def _device(cfg: TrainConfig) -> tuple[torch.device, dist_mod.DistInfo]:
    """The device and, under torchrun (WORLD_SIZE > 1), the process group; --threads."""
    device = torch.device(resolve_device(cfg.device))
    dinfo = dist_mod.init_from_env(dist_mod.backend_for(device))   # WORLD_SIZE > 1: DDP
    if dinfo.distributed and device.type == "cuda":
        device = torch.device("cuda", dinfo.local_rank)
    if dinfo.distributed and cfg.objective == "scst":
        raise UserError("--objective scst runs in one process; start it without torchrun.")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    return device, dinfo
