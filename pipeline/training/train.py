"""Stage two: train the attention decoder from the feature cache(s) into runs/<name>/.

    train()                         the loop, on one screen
      setup()           -> (TrainState, Data)   new run, --init-from, or --resume from last.pt (state.py)
      train_one_epoch() -> stop reason or None  one objective (objectives.py) over the epoch's batches (data.py)
      evaluate()        -> val BLEU-1..4, CIDEr by real decoding (greedy, or beam)

One epoch of cross-entropy = every training caption once, in batches of one caption length
(batching.py); one epoch of self-critical training = every training image once. After each epoch the
model captions every val image, the `select_metric` (val BLEU-4 or CIDEr) selects best.pt, drives the
plateau LR schedule and early stopping (--patience). With --ema DECAY, validation decodes with the
moving average of the weights (ema.py), which is what best.pt and last.pt hold as `model`.

`TrainState` (state.py) holds everything a run is (model, optimizer, schedule, RNG, counters, history,
settings, vocabulary, the features' provenance) and builds the checkpoint dict in one place
(`to_checkpoint`/`from_checkpoint`). Checkpoints are written atomically, best.pt before last.pt;
`--max-minutes`, Ctrl-C and SIGTERM (interrupt.py) checkpoint and stop mid-epoch, `--resume` continues from
last.pt bit-exactly.
A run directory is locked while a process trains it (runs.run_lock).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline import distributed as dist_mod
from pipeline.config import DecoderConfig, TrainConfig  # noqa: F401  (DecoderConfig re-exported for callers)
from pipeline.data.text import Vocab
from pipeline.errors import UserError
from pipeline import device as device_mod
from pipeline.provenance import ComputeMeter
from pipeline.training import compute as compute_mod, runs
from pipeline.training.batching import epoch_plan
from pipeline.training.curves import plot_curves
from pipeline.training.data import Batches, Data, Features
from pipeline.training.objectives import tokenized
from pipeline.training.interrupt import SIGNAL_NAMES, StopRequest
from pipeline.training.progress import EpochProgress
from pipeline.training.state import RESUMABLE, TrainState, setup  # noqa: F401  (RESUMABLE re-exported)


# -- one epoch, validation ------------------------------------------------------------------------
class Diverged(Exception):
    """A non-finite loss; train() turns it into one UserError saying what the run directory still holds."""


def train_one_epoch(state: TrainState, data: Data, net, *, deadline: float, echo, on_step=None,
                    stop_request: StopRequest | None = None) -> str | None:
    """The epoch's remaining batches (from progress.batch_in_epoch). Returns "max-steps", "max-minutes" or the
    signal's name ("SIGINT", "SIGTERM": interrupt.py) when it stopped early (the caller checkpoints), None when
    the epoch is done."""
    cfg, model, opt, p = state.cfg, state.model, state.optimizer, state.progress
    batches, weights, sizes = epoch_plan(data.sampler, p.epoch)
    batches_left = Batches(batches[p.batch_in_epoch:], data.collate)
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
        if state.ema is not None:      # --ema: the moving average follows every step (ema.py)
            state.ema.update()
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
        early = _stop_early(deadline, stop_request, state.device, p.step)
        if (cfg.max_steps and p.step >= cfg.max_steps) or early:
            if p.batch_in_epoch < len(batches):
                stop = early or "max-steps"
            break
    meter.close()
    _flush(acc, sums)
    acc["train_s"] += time.time() - t_ep
    return stop


def _stop_early(deadline: float, stop_request: StopRequest | None, device, step: int) -> str | None:
    """"max-minutes" past the deadline, the signal's name after SIGINT/SIGTERM, else None. Under DDP every rank
    agrees: one collective a step with a deadline, every 16th step without one (a second only to stop)."""
    ddp = dist_mod.current().distributed
    if ddp and deadline == math.inf and step % 16:
        return None
    late, sig = time.time() > deadline, (stop_request.signal if stop_request is not None else None)
    if ddp:
        if not dist_mod.any_rank(late or sig is not None, device):
            return None
        late, sig = dist_mod.any_rank(late, device), sig or "SIGTERM"   # another rank may have got the signal
    return "max-minutes" if late else sig


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
          on_step: Callable[[int, torch.Tensor], None] | None = None, init_loader=None) -> dict:
    """Train (or resume) a run. With resume=True and a last.pt in run_dir, the saved settings are used;
    `overrides` may change the RESUMABLE ones (epochs, max_minutes, features, ...). `on_step(step, loss)`
    sees every step's detached loss (tests). `init_loader(ref, log)` loads --init-from (state.setup).
    Returns a summary dict."""
    run_dir = Path(run_dir)
    new_dir = not run_dir.exists()
    try:
        with runs.run_lock(run_dir) if _rank0() else contextlib.nullcontext():
            return _train(cfg, dcfg, run_dir, resume, overrides or {}, echo if _rank0() else (lambda *_: None),
                          on_step, init_loader)
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


def _train(cfg, dcfg, run_dir: Path, resume: bool, overrides: dict, echo, on_step, init_loader) -> dict:
    meter = ComputeMeter()          # setup (reading the cache) counts too
    state, data, dinfo = setup(cfg, dcfg, run_dir, resume=resume, overrides=overrides, echo=echo,
                               init_loader=init_loader)
    meter.gpus = int(state.device.type == "cuda")
    if state.device.type == "cpu":
        device_mod.tune_cpu_allocator()        # reuse the step's large buffers instead of page-faulting them each step
    echo = echo if dinfo.is_main else (lambda *_: None)
    cfg, p, model = state.cfg, state.progress, state.model
    model.bf16_projections = bf16_projections(cfg, model.cfg, state.device)
    if cfg.bf16_projections == "auto" and state.device.type == "cpu":
        echo(f"bf16 projections (auto): {'on, this CPU has bf16 units' if model.bf16_projections else 'off'}")
    deadline = time.time() + cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
    net = dist_mod.wrap_ddp(model, state.device)   # DDP averages gradients over ranks; model stays the module
    dist_mod.seed_rank(cfg.seed, p.step)
    stop = "early-stopped" if p.bad_epochs >= cfg.patience else None
    model.train()
    with StopRequest() as stop_request:      # Ctrl-C / SIGTERM: checkpoint after the step, then stop
        stop = _loop(state, data, net, run_dir, dinfo, meter, deadline, stop, stop_request, echo, on_step)
    dist_mod.barrier()   # rank 0's checkpoint is written before any rank returns
    if stop in ("max-minutes", "max-steps") or stop in SIGNAL_NAMES:
        echo(f"stopped ({stop}) at epoch {p.epoch + 1}, step {p.step}; continue with --resume")
    elif stop == "early-stopped":
        echo(f"early stop: no val {cfg.metric} gain for {p.bad_epochs} epochs; best {p.best_score:.4f} "
             f"at epoch {p.best_epoch}")
    echo(compute_mod.summary(p.compute))
    return {"run": str(run_dir), "epoch": p.epoch, "step": p.step, "best_score": p.best_score,
            "best_epoch": p.best_epoch, "select_metric": cfg.metric, "stopped": stop or "done", "history": p.history,
            "compute": p.compute}


def _loop(state: TrainState, data: Data, net, run_dir: Path, dinfo, meter, deadline: float, stop: str | None,
          stop_request: StopRequest, echo, on_step) -> str | None:
    """Epochs until done, early-stopped or stopped (max-steps, max-minutes, a signal); -> the stop reason."""
    cfg, p, model = state.cfg, state.progress, state.model
    while p.epoch < cfg.epochs and stop is None:
        stop = train_one_epoch(state, data, net, deadline=deadline, echo=echo, on_step=on_step,
                               stop_request=stop_request)
        if stop is not None:
            state.add_compute(compute_mod.lap(meter, state.device))
            _save(state, run_dir, dinfo, finished=False)
            break
        model.eval()
        with state.validation_weights():     # --ema: the average decodes, selects best.pt
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
            else:
                stop = _stop_early(deadline, stop_request, state.device, 0)   # step 0: DDP ranks agree now
    return stop


def bf16_projections(cfg: TrainConfig, dcfg: DecoderConfig, device: torch.device) -> bool:
    """Whether the training steps compute W_a a and L_o in bf16 (Decoder._project). auto: on a CPU with bf16
    units for soft-attention cross-entropy (measured against fp32: docs/training.md "bf16 projections"), off for
    hard attention and SCST (not measured); on: refused on a CPU without bf16 units (oneDNN emulates bf16 there,
    hundreds of times slower than fp32). CUDA: off (its step runs under bf16 autocast anyway)."""
    if cfg.bf16_projections == "off" or device.type != "cpu":
        return False
    if cfg.bf16_projections == "auto":
        return cfg.objective == "xe" and dcfg.attention == "soft" and device_mod.cpu_has_fast_bf16()
    if not device_mod.cpu_has_fast_bf16():
        raise UserError("--bf16-projections on: this CPU has no bf16 units (no amx_bf16 or avx512_bf16 in "
                        "/proc/cpuinfo), where bf16 matmuls are emulated and far slower than fp32. Train with "
                        "--bf16-projections auto or off (a --resume may change it).")
    return True


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
