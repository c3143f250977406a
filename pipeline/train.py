"""Training: features cache -> vocabulary -> length buckets -> decoder -> runs/<name>/.

One epoch = every training caption once (batches of one caption length, batching.py). After each
epoch the model captions the val images with real greedy (or beam) decoding, val BLEU-1..4 are
computed against the val references, and BLEU-4 drives model selection (best.pt), the LR schedule
(ReduceLROnPlateau) and early stopping (--patience).

Checkpoints (last.pt, best.pt) are one dict holding everything needed to resume bit-exactly:
model, optimizer, scheduler, RNG states, epoch + batch position inside the epoch, step, best
score, vocab, both configs, the features' provenance and path, and the history. They are written
atomically (tmp + os.replace). `--max-minutes` checkpoints and stops cleanly mid-epoch; `--resume`
continues from last.pt exactly where it stopped.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import distributed as dist_mod
from . import store as store_mod
from .batching import BucketBatchSampler, select_lengths
from .device import resolve_device
from .errors import UserError
from .model import Decoder, DecoderConfig
from .provenance import code_version
from .text import Vocab, tokenize


@dataclass
class TrainConfig:
    features: str = ""
    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "adam"       # "adam" (default) | "rmsprop" (the paper's choice for Flickr8k)
    lr: float = 4e-4
    weight_decay: float = 0.0
    grad_clip: float = 5.0        # max global grad norm; 0 disables
    lr_factor: float = 0.8        # ReduceLROnPlateau on val BLEU-4: lr *= lr_factor ...
    lr_patience: int = 2          # ... after this many epochs without improvement
    patience: int = 6             # early stopping: epochs without a new best val BLEU-4
    beam: int = 1                 # val decoding: 1 = greedy
    max_len: int = 30             # captions with more words are dropped (count logged); decode limit too
    min_count: int = 5            # vocabulary: words seen fewer times in train captions -> <unk>
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda
    threads: int = 0              # CPU threads for torch (0: torch's default, one per core). Use 1 per
                                  # run when several runs share the cores: oversubscribed threads spin-wait
    max_minutes: float = 0.0      # > 0: checkpoint and stop cleanly after this much training time
    max_steps: int = 0            # > 0: stop (checkpointed) after this many optimizer steps in total
    in_ram: str = "auto"          # auto | yes | no: load all features into RAM, or read rows lazily
    num_workers: int = 0          # DataLoader workers for lazy reading
    val_batch_size: int = 250
    log_every: int = 100          # steps between progress lines (and non-finite checks)

    def __post_init__(self):
        if self.optimizer not in ("adam", "rmsprop"):
            raise UserError(f"optimizer must be 'adam' or 'rmsprop', not {self.optimizer!r}.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"device must be auto, cpu or cuda, not {self.device!r}.")
        if self.in_ram not in ("auto", "yes", "no"):
            raise UserError(f"in_ram must be auto, yes or no, not {self.in_ram!r}.")
        for k in ("epochs", "batch_size", "beam", "max_len", "min_count", "val_batch_size", "log_every"):
            if int(getattr(self, k)) < 1:
                raise UserError(f"{k.replace('_', '-')} must be >= 1, not {getattr(self, k)!r}.")
        if not self.lr > 0:
            raise UserError(f"lr must be > 0, not {self.lr!r}.")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# -- checkpoints ------------------------------------------------------------------------------------
def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint under the real name


def _load_ckpt(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint. Train first (`pipeline train`), or check --run.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many kinds for a bad file)
        raise UserError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e}).") from e


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


def load_run(run_dir: str | Path, which: str = "best", device: str | torch.device = "cpu"):
    """(model in eval mode, vocab, checkpoint dict) of `runs/<name>/{best,last}.pt`."""
    run_dir = Path(run_dir)
    if which not in ("best", "last"):
        raise UserError(f"which must be 'best' or 'last', not {which!r}.")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory.")
    path = run_dir / f"{which}.pt"
    if which == "best" and not path.exists() and (run_dir / "last.pt").exists():
        raise UserError(f"{path}: no best checkpoint yet (no epoch finished); use which='last' or train longer.")
    ckpt = _load_ckpt(path)
    model = Decoder(DecoderConfig.from_dict(ckpt["decoder_config"]), len(ckpt["vocab"]["itos"]),
                    ckpt["feature_dim"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), Vocab.from_dict(ckpt["vocab"]), ckpt


# -- data -------------------------------------------------------------------------------------------
def _fits_in_ram(st: store_mod.FeatureStore, procs: int = 1) -> bool:
    nbytes = st.num_images * st.num_regions * st.feature_dim * (2 if st.attrs.get("dtype") == "float16" else 4)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return True
    return nbytes * procs < 0.5 * avail   # procs: processes of this node, each with its own copy


class _Features:
    """Rows -> (B, L, C) tensor, from RAM (whole cache read once) or lazily from the file."""

    def __init__(self, st: store_mod.FeatureStore, in_ram: bool, device: torch.device):
        self.ram = torch.from_numpy(st.load_features()) if in_ram else None   # (N, L, C) stored dtype
        if self.ram is not None and device.type == "cuda":
            self.ram = self.ram.to(device)     # 1.6 GB for Flickr8k: no per-step host->device copy
        self.lazy = None if in_ram else store_mod.LazyFeatures(st.path)

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        if self.ram is not None:
            idx = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.ram.device, non_blocking=True)
            return self.ram[idx]
        return torch.from_numpy(np.stack([self.lazy[int(r)] for r in rows]))


class _EpochBatches(torch.utils.data.Dataset):
    """Batch k of an epoch -> (feats (B, L, C), tokens (B, T+1)); a Dataset so workers can read lazily."""

    def __init__(self, batches, rows, tokens, features: _Features):
        self.batches, self.rows, self.tokens, self.features = batches, rows, tokens, features

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        idx = self.batches[k]
        return self.features(self.rows[idx]), torch.from_numpy(np.stack([self.tokens[i] for i in idx]))


def _val_bleu(model, feats: _Features, refs: dict[int, list[str]], vocab: Vocab, cfg: TrainConfig,
              device: torch.device) -> tuple[dict, list[str]]:
    """Caption every val image by real decoding (greedy, or beam when cfg.beam > 1); BLEU-1..4 on
    text.tokenize'd references (a model-selection score; `pipeline score` gives the COCO scores)."""
    from pycocoevalcap.bleu.bleu import Bleu

    rows = np.array(sorted(refs))
    hyps = []
    was_training = model.training
    model.eval()
    for i in range(0, len(rows), cfg.val_batch_size):
        x = feats(rows[i:i + cfg.val_batch_size]).to(device, torch.float32)   # (b, L, C)
        hyps.extend(_decode_batch(model, x, cfg))
    model.train(was_training)
    caps = [vocab.decode(h) for h in hyps]
    gts = {int(r): [" ".join(tokenize(c)) for c in refs[int(r)]] for r in rows}
    res = {int(r): [c if c else "<empty>"] for r, c in zip(rows, caps)}
    gts = {k: v for k, v in gts.items() if v}
    res = {k: res[k] for k in gts}
    if not gts:
        raise UserError("the val split has no reference captions; model selection needs them.")
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internals
        scores, _ = Bleu(4).compute_score(gts, res)
    return {f"bleu{i + 1}": float(s) for i, s in enumerate(scores)}, caps


def _decode_batch(model, x: torch.Tensor, cfg: TrainConfig) -> list[list[int]]:
    """Token ids per image by real decoding: greedy, or beam search when cfg.beam > 1."""
    from . import decode
    if cfg.beam > 1:
        return [h.tokens for h in decode.beam_search(model, x, beam=cfg.beam, max_len=cfg.max_len)]
    return decode.greedy_decode(model, x, max_len=cfg.max_len)[0]


# -- logging ----------------------------------------------------------------------------------------
LOG_FIELDS = ("epoch", "step", "loss", "nll", "reg", "lr", "bleu1", "bleu2", "bleu3", "bleu4",
              "best_bleu4", "train_s", "val_s", "captions_per_s", "time")


def _write_logs(run_dir: Path, history: list[dict]) -> None:
    """log.jsonl / log.csv / curves.png rewritten from the history (so a resumed run never duplicates)."""
    with open(run_dir / "log.jsonl.tmp", "w") as f:
        for h in history:
            f.write(json.dumps(h) + "\n")
    os.replace(run_dir / "log.jsonl.tmp", run_dir / "log.jsonl")
    with open(run_dir / "log.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, LOG_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)
    os.replace(run_dir / "log.csv.tmp", run_dir / "log.csv")
    from .viz import plot_curves
    plot_curves(run_dir)   # curves.png: train loss/NLL and val BLEU per epoch, from log.jsonl


# -- training ---------------------------------------------------------------------------------------
def train(cfg: TrainConfig, dcfg: DecoderConfig, run_dir: str | Path, *, resume: bool = False,
          overrides: dict | None = None, echo: Callable[[str], None] = print,
          on_step: Callable[[int, torch.Tensor], None] | None = None) -> dict:
    """Train (or resume) a run. With resume=True and a last.pt in run_dir, the saved configs are used
    and `overrides` replaces TrainConfig fields of them (e.g. epochs, max_minutes, patience, device,
    features); with no last.pt yet, a new run starts from cfg/dcfg. `on_step(step, loss)` sees every step's
    detached loss (tests). Returns a summary dict."""
    run_dir = Path(run_dir)
    ckpt = None
    if resume and not (run_dir / "last.pt").exists() and cfg is not None:
        echo(f"{run_dir}: nothing to resume yet; starting a new run")   # so one command serves both
        resume = False
    if resume:
        ckpt = _load_ckpt(run_dir / "last.pt")
        saved = dict(ckpt["train_config"], **(overrides or {}))
        cfg, dcfg = TrainConfig.from_dict(saved), DecoderConfig.from_dict(ckpt["decoder_config"])
    elif (run_dir / "last.pt").exists():
        raise UserError(f"{run_dir} already holds a run; add --resume to continue it, or pick another --run.")
    st = store_mod.FeatureStore.open(cfg.features)
    if ckpt is not None:
        store_mod.check_same_provenance(ckpt["provenance"], st.provenance, what=f"features file {st.path}",
                                        where=str(run_dir))
        if (st.num_regions, st.feature_dim) != (ckpt["num_regions"], ckpt["feature_dim"]):
            raise UserError(f"{st.path}: features are {st.num_regions}x{st.feature_dim}, the run {run_dir} "
                            f"was trained on {ckpt['num_regions']}x{ckpt['feature_dim']}.")
    device = torch.device(resolve_device(cfg.device))
    dinfo = dist_mod.init_from_env(dist_mod.backend_for(device))   # WORLD_SIZE > 1: DDP
    if dinfo.distributed and device.type == "cuda":
        device = torch.device("cuda", dinfo.local_rank)
    if not dinfo.is_main:
        echo = lambda *_: None   # noqa: E731 - only rank 0 logs
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    t_setup = time.time()

    # Vocabulary from the training captions only; captions -> <start> w.. <end> ids.
    train_rows, train_caps = st.captions_of("train")
    if not train_caps:
        raise UserError(f"{st.path}: the train split has no captions.")
    refs = {r: c for r, c in st.references("val").items() if c}
    if not refs:
        raise UserError(f"{st.path}: the val split has no captions; model selection needs them.")
    vocab = Vocab.from_dict(ckpt["vocab"]) if ckpt else Vocab.build(train_caps, cfg.min_count)
    tokens = [np.array(vocab.encode_caption(c), dtype=np.int64) for c in train_caps]
    keep, dropped = select_lengths([len(t) - 2 for t in tokens], cfg.max_len)
    rows = np.asarray(train_rows)[keep]
    tokens = [t for t, k in zip(tokens, keep) if k]
    if dinfo.distributed:   # batch_size stays the global batch: the same steps for any world size
        sampler = dist_mod.DistributedBucketSampler([len(t) - 2 for t in tokens], cfg.batch_size,
                                                    seed=cfg.seed, rank=dinfo.rank, world_size=dinfo.world_size)
    else:
        sampler = BucketBatchSampler([len(t) - 2 for t in tokens], cfg.batch_size, seed=cfg.seed)
    in_ram = cfg.in_ram == "yes" or (cfg.in_ram == "auto" and _fits_in_ram(st, dinfo.local_world_size))

    feats = _Features(st, in_ram, device)
    torch.manual_seed(cfg.seed)    # the model's initial weights depend on the seed only
    model = Decoder(dcfg, len(vocab), st.feature_dim).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":   # fused: one kernel over all parameters, ~4x faster than foreach on CPU
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    else:
        opt = torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.lr_factor,
                                                       patience=cfg.lr_patience)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"], device)
        epoch, pos, step = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]
        best, best_epoch, bad_epochs = ckpt["best_score"], ckpt["best_epoch"], ckpt["bad_epochs"]
        history, acc = ckpt["history"], ckpt["epoch_acc"]
        echo(f"resuming {run_dir} at epoch {epoch + 1}, batch {pos}, step {step} (best val BLEU-4 {best:.4f})")
    else:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        epoch = pos = step = bad_epochs = best_epoch = 0
        best, history = -1.0, []
        acc = _new_acc()
    if ckpt is None and dinfo.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        vocab.save(run_dir / "vocab.json")
        (run_dir / "config.json").write_text(json.dumps(
            {"train": asdict(cfg), "decoder": dcfg.to_dict(), "features": str(st.path),
             "provenance": st.provenance, "vocab_size": len(vocab)}, indent=1))
    if ckpt is None or step == 0:
        echo(f"{len(tokens)} train captions of {len(st.rows('train'))} images in {len(sampler.buckets)} lengths "
             f"({dropped['too_long']} longer than {cfg.max_len} words and {dropped['empty']} empty dropped), "
             f"{len(sampler)} batches/epoch, vocab {len(vocab)}, {len(refs)} val images, "
             f"features {'in RAM' if in_ram else 'read lazily'}, device {device}")

    def checkpoint(finished: bool, is_best: bool = False) -> None:
        if not dinfo.is_main:   # one copy of the (identical) state; no per-rank state is saved
            return
        d = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng": _rng_state(device), "epoch": epoch, "batch_in_epoch": pos, "step": step,
             "best_score": best, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
             "vocab": vocab.to_dict(), "decoder_config": dcfg.to_dict(), "train_config": asdict(cfg),
             "provenance": st.provenance, "features_path": str(st.path), "feature_dim": st.feature_dim,
             "num_regions": st.num_regions, "history": history, "epoch_acc": acc, "finished": finished,
             "code_version": code_version()}
        _atomic_save(d, run_dir / "last.pt")
        if is_best:
            tmp = run_dir / "best.pt.tmp"
            shutil.copyfile(run_dir / "last.pt", tmp)
            os.replace(tmp, run_dir / "best.pt")

    use_amp = device.type == "cuda"   # bf16 autocast on GPU only (on CPU it is ~20x slower than fp32)
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
    t0, stop_reason = time.time(), None
    if bad_epochs >= cfg.patience:
        stop_reason = "early-stopped"
    net = dist_mod.wrap_ddp(model, device)   # DDP averages gradients over ranks; model stays the module
    dist_mod.seed_rank(cfg.seed, step)
    model.train()
    while epoch < cfg.epochs and stop_reason is None:
        batches, step_w, n_caps = dist_mod.epoch_plan(sampler, epoch)
        data = _EpochBatches(batches[pos:], rows, tokens, feats)
        loader = (data[k] for k in range(len(data))) if in_ram or cfg.num_workers == 0 else torch.utils.data.DataLoader(
            data, batch_size=None, shuffle=False, num_workers=cfg.num_workers, pin_memory=use_amp)
        t_ep = time.time()
        sums = torch.zeros(3, device=device)      # loss, nll, reg summed over steps: no per-step sync
        for x, y in loader:
            x = x.to(device, torch.float32, non_blocking=True)   # (B, L, C)
            y = y.to(device, non_blocking=True)                  # (B, T+1), one length per batch
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = net(x, y)
            loss, parts = model.loss(out, y)
            w = step_w[pos]   # DDP: W * this rank's share of the batch; the average is the batch mean
            opt.zero_grad(set_to_none=True)
            (loss * w if w != 1.0 else loss).backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step, pos = step + 1, pos + 1
            sums += torch.stack([loss.detach(), parts["nll"], parts["reg"]]) * w
            acc["steps"] += 1
            acc["captions"] += n_caps[pos - 1]
            if on_step is not None:
                on_step(step, loss.detach())
            if step % cfg.log_every == 0 or pos == len(batches):
                _flush(acc, sums)
                if not math.isfinite(acc["loss"]):
                    raise UserError(f"training diverged: non-finite loss at step {step} (epoch {epoch + 1}); "
                                    f"{run_dir}/last.pt keeps the last good state. Lower --lr or raise "
                                    f"--grad-clip protection, then --resume.")
                if step % cfg.log_every == 0:
                    echo(f"epoch {epoch + 1} batch {pos}/{len(batches)} step {step} "
                         f"loss {acc['loss'] / acc['steps']:.3f} nll {acc['nll'] / acc['steps']:.3f}")
            out_of_time = budget_s < math.inf and dist_mod.any_rank(time.time() - t0 > budget_s, device)
            if (cfg.max_steps and step >= cfg.max_steps) or out_of_time:
                if pos < len(batches):
                    acc["train_s"] += time.time() - t_ep
                    _flush(acc, sums)
                    checkpoint(finished=False)
                    stop_reason = "max-minutes" if out_of_time else "max-steps"
                break
        if stop_reason is not None:
            break
        # -- end of epoch: validate with real decoding, select, schedule, log, checkpoint --------
        _flush(acc, sums)
        acc["train_s"] += time.time() - t_ep
        t_val = time.time()
        bleu, caps = _val_bleu(model, feats, refs, vocab, cfg, device) if dinfo.is_main else (None, [""])
        bleu = dist_mod.broadcast_object(bleu)   # the other ranks wait here
        sched.step(bleu["bleu4"])
        improved = bleu["bleu4"] > best
        if improved:
            best, best_epoch, bad_epochs = bleu["bleu4"], epoch + 1, 0
        else:
            bad_epochs += 1
        n = max(acc["steps"], 1)
        history.append({"epoch": epoch + 1, "step": step, "loss": acc["loss"] / n, "nll": acc["nll"] / n,
                        "reg": acc["reg"] / n, "lr": opt.param_groups[0]["lr"], **bleu, "best_bleu4": best,
                        "train_s": round(acc["train_s"], 2), "val_s": round(time.time() - t_val, 2),
                        "captions_per_s": round(acc["captions"] / max(acc["train_s"], 1e-9), 1),
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        echo(f"epoch {epoch + 1}: loss {history[-1]['loss']:.3f} nll {history[-1]['nll']:.3f} | val BLEU-1..4 "
             + " ".join(f"{bleu[f'bleu{i}']:.3f}" for i in range(1, 5))
             + f" | {history[-1]['captions_per_s']} captions/s | e.g. \"{caps[0]}\"" + (" *best*" if improved else ""))
        epoch, pos, acc = epoch + 1, 0, _new_acc()
        if bad_epochs >= cfg.patience:
            stop_reason = "early-stopped"
        finished = epoch >= cfg.epochs or stop_reason is not None
        checkpoint(finished=finished, is_best=improved)
        if dinfo.is_main:
            _write_logs(run_dir, history)
        dist_mod.barrier()
        if cfg.max_steps and step >= cfg.max_steps and not finished:
            stop_reason = "max-steps"
        elif budget_s < math.inf and dist_mod.any_rank(time.time() - t0 > budget_s, device) and not finished:
            stop_reason = "max-minutes"
    dist_mod.barrier()   # rank 0's checkpoint is written before any rank returns
    if stop_reason in ("max-minutes", "max-steps"):
        echo(f"stopped ({stop_reason}) at epoch {epoch + 1}, step {step}; continue with --resume")
    elif stop_reason == "early-stopped":
        echo(f"early stop: no val BLEU-4 gain for {bad_epochs} epochs; best {best:.4f} at epoch {best_epoch}")
    return {"run": str(run_dir), "epoch": epoch, "step": step, "best_bleu4": best, "best_epoch": best_epoch,
            "stopped": stop_reason or "done", "history": history, "setup_s": t0 - t_setup}


def _new_acc() -> dict:
    return {"loss": 0.0, "nll": 0.0, "reg": 0.0, "steps": 0, "captions": 0, "train_s": 0.0}


def _flush(acc: dict, sums: torch.Tensor) -> None:
    """Move the on-device step sums into the float accumulator (one host sync), then zero them."""
    loss, nll, reg = dist_mod.all_reduce_mean_(sums).tolist()
    acc["loss"] += loss
    acc["nll"] += nll
    acc["reg"] += reg
    sums.zero_()
