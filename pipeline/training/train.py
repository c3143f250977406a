"""Stage two: train the attention decoder from the feature cache(s) into runs/<name>/.

    train()                         the loop, on one screen
      setup()           -> (TrainState, Data)   new run, --init-from, or --resume from last.pt
      train_one_epoch() -> stop reason or None  one objective (objectives.py) over the epoch's batches
      evaluate()        -> val BLEU-1..4, CIDEr by real decoding (greedy, or beam)

One epoch of cross-entropy = every training caption once, in batches of one caption length
(batching.py); one epoch of self-critical training = every training image once. After each epoch the
model captions every val image, the `select_metric` (val BLEU-4 or CIDEr) selects best.pt, drives the
plateau LR schedule and early stopping (--patience).

`TrainState` holds everything a run is (model, optimizer, schedule, RNG, counters, history, settings,
vocabulary, the features' provenance) and builds the checkpoint dict in one place
(`to_checkpoint`/`from_checkpoint`). Checkpoints are written atomically, best.pt before last.pt;
`--max-minutes` checkpoints and stops mid-epoch, `--resume` continues from last.pt bit-exactly.
A run directory is locked while a process trains it (runs.run_lock).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline import distributed as dist_mod
from pipeline.training import compute as compute_mod, runs
from pipeline.training.curves import plot_curves
from pipeline.training.progress import EpochProgress
from pipeline.cache.readers import LazyFeatures, open_features
from pipeline.training.batching import BucketBatchSampler, DistributedBatchSampler, ImageBatchSampler, epoch_plan, select_lengths
from pipeline.training.batching import require_captions
from pipeline.config import TrainConfig
from pipeline.device import resolve_device
from pipeline.errors import UserError
from pipeline.fileio import write_json
from pipeline.config import DecoderConfig  # noqa: F401  (re-exported for callers)
from pipeline.decoder.model import Decoder
from pipeline.decoder.topped import check_init, param_groups, training_model   # a cache of an earlier layer
from pipeline.training.objectives import CrossEntropy, SelfCritical, TrainCiderD, reward_references, tokenized
from pipeline.provenance import COMPUTE_KEYS, ComputeMeter, add_compute, code_version
from pipeline.data.text import Vocab


# Settings a --resume may change: how long and where to run, not what is trained.
RESUMABLE = ("features", "epochs", "patience", "max_minutes", "max_steps", "device", "threads", "in_ram",
             "num_workers", "val_batch_size", "log_every")


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
        self.progress = Progress()

    def to_checkpoint(self, finished: bool) -> dict:
        p = self.progress
        return {"format_version": runs.CHECKPOINT_FORMAT, "code_version": code_version(),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": _rng_state(self.device),
                "epoch": p.epoch, "batch_in_epoch": p.batch_in_epoch, "step": p.step, "best_score": p.best_score,
                "best_epoch": p.best_epoch, "bad_epochs": p.bad_epochs, "history": p.history,
                "epoch_acc": p.epoch_acc, "finished": finished, "select_metric": self.cfg.metric,
                "vocab": self.vocab.to_dict(), "decoder_config": self.dcfg.to_dict(),
                "train_config": asdict(self.cfg), "features": self.features, "feature_dim": self.feature_dim,
                "num_regions": self.num_regions, "init_from": self.init_from, "compute": p.compute}

    def from_checkpoint(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"], self.device)
        acc, compute = compute_mod.restore(ckpt)     # a checkpoint from before compute recording: from here
        self.progress = Progress(ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"], ckpt["best_score"],
                                 ckpt["best_epoch"], ckpt["bad_epochs"], ckpt["history"], acc, compute)

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


# -- data -------------------------------------------------------------------------------------------
def fits_in_memory(st, device: torch.device, procs: int = 1, log=print) -> bool:
    """Whether the whole cache fits: host RAM (half of what is available, per process of this node),
    and on CUDA also the GPU's free memory (half of it), where the in-RAM cache is moved."""
    nbytes = st.num_images * st.num_regions * st.feature_dim * (2 if st.attrs.get("dtype") == "float16" else 4)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = math.inf
    if nbytes * procs >= 0.5 * avail:
        log(f"features ({nbytes / 2**30:.1f} GiB) do not fit in half the free RAM ({avail / 2**30:.1f} GiB): "
            f"reading them lazily from the file")
        return False
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes >= 0.5 * free:
            log(f"features ({nbytes / 2**30:.1f} GiB) do not fit in half the free GPU memory ({free / 2**30:.1f} GiB): "
                f"reading them lazily from the file")
            return False
    return True


class Features:
    """Rows -> (B, L, C) tensor: from memory (whole cache read once; on the GPU when training there)
    or lazily from the file(s)."""

    def __init__(self, st, in_ram: bool, device: torch.device):
        self.ram = torch.from_numpy(st.load_features()) if in_ram else None   # (N, L, C) stored dtype
        if self.ram is not None and device.type == "cuda":
            self.ram = self.ram.to(device)     # 1.6 GB for Flickr8k: no per-step host->device copy
        self.lazy = None if in_ram else LazyFeatures(st.paths)

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        if self.ram is not None:
            idx = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.ram.device, non_blocking=True)
            return self.ram[idx]
        return torch.from_numpy(self.lazy.read(rows))


class _Batches(torch.utils.data.Dataset):
    """Batch k of an epoch -> its tensors; a Dataset so DataLoader workers can read lazily."""

    def __init__(self, batches, collate):
        self.batches, self.collate = batches, collate

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        return self.collate(self.batches[k])


@dataclass
class Data:
    store: object                  # readers.FeatureStore | FusedStore
    features: Features
    refs: dict                     # val row -> raw reference captions
    sampler: object                # batching sampler of the objective
    collate: Callable              # batch indices -> batch tensors
    objective: object              # objectives.CrossEntropy | SelfCritical
    in_ram: bool


def _xe_data(st, vocab: Vocab, cfg: TrainConfig, features: Features, echo):
    rows, caps = st.captions_of("train")
    tokens = [np.array(vocab.encode_caption(c), dtype=np.int64) for c in caps]
    keep, dropped = select_lengths([len(t) - 2 for t in tokens], cfg.max_len)
    rows, tokens = np.asarray(rows)[keep], [t for t, k in zip(tokens, keep) if k]
    sampler = BucketBatchSampler([len(t) - 2 for t in tokens], cfg.batch_size, seed=cfg.seed)
    collate = lambda idx: (features(rows[idx]), torch.from_numpy(np.stack([tokens[i] for i in idx])))  # noqa: E731
    echo(f"{len(tokens)} train captions of {len(st.rows('train'))} images in {len(sampler.buckets)} lengths "
         f"({dropped['too_long']} longer than {cfg.max_len} words and {dropped['empty']} empty dropped)")
    if cfg.flip:    # one view (original / flipped) per caption and epoch: training/views.py
        from pipeline.training.views import flip_views
        sampler, collate = flip_views(sampler, rows, [c for c, k in zip(caps, keep) if k], tokens, vocab, st,
                                      features, seed=cfg.seed)
    return sampler, collate


def _scst_data(st, vocab: Vocab, cfg: TrainConfig, features: Features, echo):
    refs = {r: tokenized(c) for r, c in st.references("train").items() if c}
    refs = reward_references(refs, cfg.scst_reward_end)      # + " <end>" when the reward reads the end token
    rows = np.array(sorted(refs), dtype=np.int64)
    reward = TrainCiderD([refs[r] for r in rows])
    sampler = ImageBatchSampler(rows, cfg.batch_size, seed=cfg.seed)
    collate = lambda idx: (features(rows[idx]), torch.from_numpy(rows[idx]))   # noqa: E731
    objective = SelfCritical(reward, refs, vocab, samples=cfg.scst_samples, baseline=cfg.scst_baseline,
                             max_len=cfg.scst_max_len, end_token=cfg.scst_reward_end)
    echo(f"self-critical: {len(rows)} train images x {cfg.scst_samples} samples of <= {cfg.scst_max_len} words, "
         f"CIDEr-D reward{' with <end>' if cfg.scst_reward_end else ''}, document frequencies of their "
         f"{sum(len(v) for v in refs.values())} references, {cfg.scst_baseline} baseline")
    return sampler, collate, objective


# -- setup ------------------------------------------------------------------------------------------
def _resume_cfg(ckpt: dict, overrides: dict, run_dir: Path) -> TrainConfig:
    saved = dict(ckpt["train_config"])
    changed = {k: v for k, v in overrides.items() if saved.get(k) != v}
    fixed = sorted(k for k in changed if k not in RESUMABLE)
    if fixed:
        raise UserError(f"{run_dir}: --resume continues a run with its own settings; "
                        + ", ".join(f"--{k.replace('_', '-')} {changed[k]!r} (it was trained with {saved.get(k)!r})"
                                    for k in fixed)
                        + " cannot change. Start a new run (--init-from to start from this one's weights).")
    return TrainConfig.from_dict(dict(saved, **changed))


def setup(cfg: TrainConfig | None, dcfg: DecoderConfig | None, run_dir: Path, *, resume: bool, overrides: dict,
          echo) -> tuple[TrainState, Data, dist_mod.DistInfo]:
    """A new run (from cfg/dcfg, or from --init-from), or a resumed one (from last.pt)."""
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
    if not cfg.features:
        raise UserError("no feature file: pass --features FILE (several to fuse caches).")
    st = open_features(cfg.features)
    if ckpt is not None:
        runs.check_features(ckpt, st, where=str(run_dir))

    init, init_info = None, None
    if ckpt is None and cfg.init_from:
        init = runs.load_run(cfg.init_from, which="best" if (Path(cfg.init_from) / "best.pt").exists() else "last",
                             log=echo)
        check_init(init.ckpt, st, runs.check_features, where=f"--init-from {init.run_dir}")   # topped.py
        dcfg = DecoderConfig.from_dict(init.ckpt["decoder_config"])
        init_info = {"run": str(init.run_dir), "which": init.which, "epoch": init.ckpt["epoch"],
                     "code_version": init.ckpt.get("code_version")}
    elif ckpt is None and cfg.objective == "scst":
        raise UserError("--objective scst starts from a trained model: pass --init-from RUN (a cross-entropy run).")

    device = torch.device(resolve_device(cfg.device))
    dinfo = dist_mod.init_from_env(dist_mod.backend_for(device))   # WORLD_SIZE > 1: DDP
    if dinfo.distributed and device.type == "cuda":
        device = torch.device("cuda", dinfo.local_rank)
    if dinfo.distributed and cfg.objective == "scst":
        raise UserError("--objective scst runs in one process; start it without torchrun.")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)

    train_caps = st.captions_of("train")[1]
    if not train_caps:
        raise UserError(f"{st.path}: the train split has no captions.")
    if cfg.objective == "xe":
        require_captions(train_caps, cfg.max_len, st.path)    # before any work
    refs = {r: c for r, c in st.references("val").items() if c}
    if not refs:
        raise UserError(f"{st.path}: the val split has no captions; model selection needs them.")
    vocab = (Vocab.from_dict(ckpt["vocab"]) if ckpt else init.vocab if init else Vocab.build(train_caps, cfg.min_count))
    in_ram = cfg.in_ram == "yes" or (cfg.in_ram == "auto" and fits_in_memory(st, device, dinfo.local_world_size, echo))
    features = Features(st, in_ram, device)

    torch.manual_seed(cfg.seed)    # the model's initial weights depend on the seed only
    model = training_model(dcfg, len(vocab), st, cfg, resumed=ckpt is not None,
                           init_model=init and init.model).to(device)
    provs = [{"path": str(p), "provenance": prov} for p, prov in zip(st.paths, st.provenances)]
    state = TrainState(cfg, dcfg, vocab, model, provs, st.feature_dim, st.num_regions, device, init_info)
    if cfg.objective == "xe":
        sampler, collate = _xe_data(st, vocab, cfg, features, echo if ckpt is None else (lambda *_: None))
        objective = CrossEntropy(cfg.label_smoothing, dist_mod.all_reduce_sum_ if dinfo.distributed else None)
    else:
        sampler, collate, objective = _scst_data(st, vocab, cfg, features, echo if ckpt is None else (lambda *_: None))
    if dinfo.distributed:   # batch_size stays the global batch: the same steps for any world size
        sampler = DistributedBatchSampler(sampler, rank=dinfo.rank, world_size=dinfo.world_size)

    if ckpt is not None:
        state.from_checkpoint(ckpt)
        p = state.progress
        echo(f"resuming {run_dir} at epoch {p.epoch + 1}, batch {p.batch_in_epoch}, step {p.step} "
             f"(best val {cfg.metric} {p.best_score:.4f})")
    else:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        echo(f"{len(sampler)} batches/epoch, vocab {len(vocab)}, {len(refs)} val images, features "
             f"{'in memory' if in_ram else 'read lazily'}, device {device}"
             + (f", from {init.run_dir} ({init.which}.pt, epoch {init.ckpt['epoch']})" if init else ""))
    if dinfo.is_main:   # config.json says what the run is now (a --resume may have changed its settings)
        run_dir.mkdir(parents=True, exist_ok=True)
        vocab.save(run_dir / "vocab.json")
        write_json(run_dir / "config.json", {"train": asdict(cfg), "decoder": dcfg.to_dict(), "features": provs,
                                                  "vocab_size": len(vocab), "init_from": init_info})
    return state, Data(st, features, refs, sampler, collate, objective, in_ram), dinfo


# -- one epoch, validation ------------------------------------------------------------------------
class Diverged(Exception):
    """A non-finite loss; train() turns it into one UserError saying what the run directory still holds."""


def train_one_epoch(state: TrainState, data: Data, net, *, deadline: float, echo, on_step=None) -> str | None:
    """The epoch's remaining batches (from progress.batch_in_epoch). Returns "max-steps"/"max-minutes" when
    it stopped early (the caller checkpoints), None when the epoch is done."""
    cfg, model, opt, p = state.cfg, state.model, state.optimizer, state.progress
    batches, weights, sizes = epoch_plan(data.sampler, p.epoch)
    batches_left = _Batches(batches[p.batch_in_epoch:], data.collate)
    use_amp = state.device.type == "cuda"   # bf16 autocast on GPU only (on CPU it is ~20x slower than fp32)
    loader = (batches_left[k] for k in range(len(batches_left))) if data.in_ram or cfg.num_workers == 0 else \
        torch.utils.data.DataLoader(batches_left, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                                    pin_memory=use_amp)
    t_ep, acc = time.time(), p.epoch_acc
    sums = torch.zeros(4, device=state.device)       # loss, nll, reg, reward summed over steps: no per-step sync
    stop = None
    meter = EpochProgress(epoch=p.epoch + 1, total=len(batches), done=p.batch_in_epoch,
                          epochs_after=max(cfg.epochs - p.epoch - 1, 0),
                          val_s=float(p.history[-1].get("val_s", 0.0)) if p.history else 0.0,
                          deadline=deadline, log_every=cfg.log_every, echo=echo,
                          tty=None if _rank0() else False)
    for batch in loader:
        w = weights[p.batch_in_epoch]   # DDP: W * this rank's share of the batch; the average is the batch mean
        loss, parts = data.objective(net, model, batch, state.device, use_amp, w)
        opt.zero_grad(set_to_none=True)
        (loss * w if w != 1.0 else loss).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(state.params, cfg.grad_clip)
        opt.step()
        p.step, p.batch_in_epoch = p.step + 1, p.batch_in_epoch + 1
        sums += torch.stack([loss.detach(), parts["nll"], parts["reg"], parts.get("reward", sums[3] * 0)]) * w
        acc["steps"] += 1
        acc["captions"] += sizes[p.batch_in_epoch - 1]
        if on_step is not None:
            on_step(p.step, loss.detach())
        if p.step % cfg.log_every == 0 or p.batch_in_epoch == len(batches):
            _flush(acc, sums)
            if not math.isfinite(acc["loss"]):
                raise Diverged(f"non-finite loss at step {p.step} (epoch {p.epoch + 1})")
            meter.step(p.step, acc["loss"] / acc["steps"], acc["nll"] / acc["steps"])
        else:
            meter.step(p.step)
        out_of_time = deadline < math.inf and dist_mod.any_rank(time.time() > deadline, state.device)
        if (cfg.max_steps and p.step >= cfg.max_steps) or out_of_time:
            if p.batch_in_epoch < len(batches):
                stop = "max-minutes" if out_of_time else "max-steps"
            break
    meter.close()
    _flush(acc, sums)
    acc["train_s"] += time.time() - t_ep
    return stop


def _flush(acc: dict, sums: torch.Tensor) -> None:
    """Move the on-device step sums into the float accumulator (one host sync), then zero them."""
    loss, nll, reg, reward = dist_mod.all_reduce_mean_(sums).tolist()
    acc["loss"] += loss
    acc["nll"] += nll
    acc["reg"] += reg
    acc["reward"] += reward
    sums.zero_()


def evaluate(model, features: Features, refs: dict[int, list[str]], vocab: Vocab, cfg: TrainConfig,
             device: torch.device) -> tuple[dict, list[str]]:
    """Caption every val image by real decoding (greedy, or beam when cfg.beam > 1) of at most --max-len words,
    with the decoding rules of `pipeline score` (cfg's DecodingRules: <unk>, trigrams, bad endings, length
    norm); BLEU-1..4 and CIDEr on text.tokenize'd references (model selection scores; `pipeline score` gives
    the COCO-style ones)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pipeline.decoder import decode
    from pipeline.decoder.rules import Rules

    t0 = time.time()
    rows = np.array(sorted(refs))
    hyps, rules = [], Rules.from_config(cfg, vocab)
    for i in range(0, len(rows), cfg.val_batch_size):
        x = features(rows[i:i + cfg.val_batch_size]).to(device, torch.float32)   # (b, L, C)
        if cfg.beam > 1:
            hyps.extend(h.tokens for h in decode.beam_search(model, x, beam=cfg.beam, max_len=cfg.max_len,
                                                             length_norm=cfg.length_norm, rules=rules))
        else:
            hyps.extend(decode.greedy_decode(model, x, max_len=cfg.max_len, rules=rules)[0])
    caps = [vocab.decode(h) for h in hyps]
    gts = {int(r): tokenized(refs[int(r)]) for r in rows}
    res = {int(r): [c if c else "<empty>"] for r, c in zip(rows, caps)}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internals
        bleu, _ = Bleu(4).compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    return {**{f"bleu{i + 1}": float(s) for i, s in enumerate(bleu)}, "cider": float(cider),
            "val_s": round(time.time() - t0, 2)}, caps


# -- the loop ---------------------------------------------------------------------------------------
def train(cfg: TrainConfig | None, dcfg: DecoderConfig | None, run_dir: str | Path, *, resume: bool = False,
          overrides: dict | None = None, echo: Callable[[str], None] = print,
          on_step: Callable[[int, torch.Tensor], None] | None = None) -> dict:
    """Train (or resume) a run. With resume=True and a last.pt in run_dir, the saved settings are used;
    `overrides` may change the RESUMABLE ones (epochs, max_minutes, features, ...). `on_step(step, loss)`
    sees every step's detached loss (tests). Returns a summary dict."""
    run_dir = Path(run_dir)
    new_dir = not run_dir.exists()
    try:
        with runs.run_lock(run_dir) if _rank0() else contextlib.nullcontext():
            return _train(cfg, dcfg, run_dir, resume, overrides or {}, echo if _rank0() else (lambda *_: None),
                          on_step)
    except runs.Finished as e:
        if _rank0():
            echo(str(e))
        return e.summary
    except Diverged as e:
        has = runs.has_checkpoint(run_dir)
        raise UserError(f"training diverged: {e}. Lower --lr or raise --grad-clip protection; "
                        + (f"{run_dir}/last.pt keeps the last checkpointed state (--resume continues from it)."
                           if has else f"no checkpoint was written, so start {run_dir} again.")) from None
    finally:
        if new_dir and _rank0() and run_dir.is_dir() and [q.name for q in run_dir.iterdir()] == [".lock"]:
            (run_dir / ".lock").unlink()     # a run that failed before writing anything leaves no directory
            run_dir.rmdir()


def _train(cfg, dcfg, run_dir: Path, resume: bool, overrides: dict, echo, on_step) -> dict:
    meter = ComputeMeter()          # setup (reading the cache) counts too
    state, data, dinfo = setup(cfg, dcfg, run_dir, resume=resume, overrides=overrides, echo=echo)
    meter.gpus = int(state.device.type == "cuda")
    echo = echo if dinfo.is_main else (lambda *_: None)
    cfg, p, model = state.cfg, state.progress, state.model
    deadline = time.time() + cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
    net = dist_mod.wrap_ddp(model, state.device)   # DDP averages gradients over ranks; model stays the module
    dist_mod.seed_rank(cfg.seed, p.step)
    stop = "early-stopped" if p.bad_epochs >= cfg.patience else None
    model.train()
    while p.epoch < cfg.epochs and stop is None:
        stop = train_one_epoch(state, data, net, deadline=deadline, echo=echo, on_step=on_step)
        if stop is not None:
            state.add_compute(compute_mod.lap(meter, state.device))
            _save(state, run_dir, dinfo, finished=False)
            break
        model.eval()
        metrics, caps = evaluate(model, data.features, data.refs, state.vocab, cfg, state.device) \
            if dinfo.is_main else ({}, [""])
        model.train()
        state.add_compute(compute_mod.lap(meter, state.device))
        best = state.end_epoch(dist_mod.broadcast_object(metrics), echo)   # the other ranks wait here
        echo(f"  e.g. \"{caps[0]}\"")
        if p.bad_epochs >= cfg.patience:
            stop = "early-stopped"
        _save(state, run_dir, dinfo, finished=p.epoch >= cfg.epochs or stop is not None, best=best)
        if stop is None and p.epoch < cfg.epochs:
            if cfg.max_steps and p.step >= cfg.max_steps:
                stop = "max-steps"
            elif deadline < math.inf and dist_mod.any_rank(time.time() > deadline, state.device):
                stop = "max-minutes"
    dist_mod.barrier()   # rank 0's checkpoint is written before any rank returns
    if stop in ("max-minutes", "max-steps"):
        echo(f"stopped ({stop}) at epoch {p.epoch + 1}, step {p.step}; continue with --resume")
    elif stop == "early-stopped":
        echo(f"early stop: no val {cfg.metric} gain for {p.bad_epochs} epochs; best {p.best_score:.4f} "
             f"at epoch {p.best_epoch}")
    echo(compute_mod.summary(p.compute))
    return {"run": str(run_dir), "epoch": p.epoch, "step": p.step, "best_score": p.best_score,
            "best_epoch": p.best_epoch, "select_metric": cfg.metric, "stopped": stop or "done", "history": p.history,
            "compute": p.compute}


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def _save(state: TrainState, run_dir: Path, dinfo, *, finished: bool, best: bool = False) -> None:
    """best.pt (when this epoch is the best) before last.pt: a crash between the two leaves last.pt one
    epoch behind (redone bit-exactly on --resume), never a best.pt older than last.pt's record."""
    if dinfo.is_main:
        ckpt = state.to_checkpoint(finished)
        if best:
            runs.save_checkpoint(ckpt, run_dir / "best.pt")
        runs.save_checkpoint(ckpt, run_dir / "last.pt")
        if state.progress.batch_in_epoch == 0:
            runs.write_logs(run_dir, state.progress.history)
            plot_curves(run_dir)
    dist_mod.barrier()
