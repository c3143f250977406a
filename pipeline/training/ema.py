"""An exponential moving average of the decoder's trainable weights (--ema DECAY; 0, the default: off).

After optimizer step n the average is

    e_n = d_n e_(n-1) + (1 - d_n) w_n,    d_n = d (1 - d^(n-1)) / (1 - d^n)

i.e. the mean of the weights w_1 .. w_n after each step, w_k weighted by d^(n-k) and normalised (Adam's bias
correction of an average started at zero): the untrained initial weights count for nothing, and for large
n, d_n -> d, the plain EMA. Only parameters that train are averaged; buffers (hard attention's reward
baseline, a frozen BatchNorm's statistics) and frozen weights are the model's own.

Validation decodes with the average (`applied`), so it selects best.pt; both checkpoints hold it as
`model` (what `pipeline score`, `--init-from` and `export` load) and last.pt keeps the weights being
trained and the step count under `ema` (`to_checkpoint` / `restore`), so a resume continues bit-exactly.
"""
from __future__ import annotations

import contextlib

import torch

from pipeline.errors import UserError


class WeightAverage:
    """The moving average of `model`'s trainable parameters (a copy of each, same dtype and device)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.steps = float(decay), 0
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.average = [p.detach().clone() for p in self.params]

    def step_decay(self) -> float:
        """d_n of the next update (n = steps + 1)."""
        n, d = self.steps + 1, self.decay
        return d * (1 - d ** (n - 1)) / (1 - d ** n)

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: the average moves toward the weights by 1 - d_n."""
        weight = 1.0 - self.step_decay()
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], weight)
        self.steps += 1

    @contextlib.contextmanager
    def applied(self):
        """Inside: the model's parameters are the average; after: the training weights again, bit for bit
        (the two are swapped by copies, nothing recomputed)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for p, a in zip(self.params, self.average):
            w = p.detach().clone()
            p.copy_(a)
            a.copy_(w)

    def to_checkpoint(self, model_state: dict) -> tuple[dict, dict]:
        """(the model's state dict with the average in place of the trained parameters, the checkpoint's
        `ema` entry: decay, steps and the training weights)."""
        training = {n: model_state[n] for n in self.names}
        return {**model_state, **dict(zip(self.names, self.average))}, \
            {"decay": self.decay, "steps": self.steps, "training_weights": training}

    @torch.no_grad()
    def restore(self, entry: dict | None, where: str) -> None:
        """From a checkpoint whose `model` (the average) is loaded into the model: the average taken from
        the parameters, the training weights put back from `entry` (the checkpoint's `ema`)."""
        if not isinstance(entry, dict) or set(entry.get("training_weights") or {}) != set(self.names):
            raise UserError(f"{where}: trained with --ema {self.decay:g} but its checkpoint holds no (or another "
                            f"model's) training weights under 'ema'; it cannot be resumed. Start a new run.")
        self.steps = int(entry["steps"])
        for p, a, n in zip(self.params, self.average, self.names):
            a.copy_(p)
            p.copy_(entry["training_weights"][n])
