"""Per-step linear layers whose weight gradients are computed once per batch, not once per step.

The recurrence applies h_proj (to h_{t-1}) and z_proj (to z_t) at every step t with a batch of B = 64 rows.
Autograd's Linear backward then runs, per step, two skinny matmuls: dx = dy W (needed at once: it flows to
step t - 1) and dW += dy^T x (K = B = 64, slow on CPU and a (out x in) read-modify-write each time). Here
dW is deferred: each step's backward keeps (x_t, dy_t) and a `_ParamSink` on the weights computes
dW = [dy_1 .. dy_T]^T [x_1 .. x_T] (and db = sum dy) in ONE matmul with K = T * B when autograd reaches it,
after every step (the sink is upstream of all of them). Same sums, another order: equal to float32 rounding
(tests/test_fused.py).

    lin = StepLinear(module)     # once per batch, in Decoder._unroll (training, grad on, no autocast)
    y = lin(x)                   # each step: x (B, in) -> y (B, out) = x W^T + b
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.decoder import fused


class _ParamSink(torch.autograd.Function):
    """Identity on (weight[, bias]) whose backward turns the steps' kept (x, dy) into their gradients."""

    @staticmethod
    def forward(ctx, box: dict, weight, *bias):
        ctx.set_materialize_grads(False)
        ctx.box = box
        return (weight.view_as(weight), *(b.view_as(b) for b in bias))

    @staticmethod
    def backward(ctx, gw, *gb):
        xs, dys = ctx.box.pop("x", []), ctx.box.pop("dy", [])
        dw = db = None
        if xs:
            dy = torch.cat(dys)                             # (T*B, out)
            dw = dy.t() @ torch.cat(xs)                     # (out, in): one matmul over all steps
            db = dy.sum(0) if gb else None                  # (out,)
        dw = gw if dw is None else (dw if gw is None else dw.add_(gw))
        grads = (None, dw)
        if gb:
            g = gb[0]
            grads += (g if db is None else (db if g is None else db.add_(g)),)
        return grads


class _StepMatmul(torch.autograd.Function):
    """y = x W^T (+ b) for one step; backward returns dx = dy W and keeps (x, dy) for the sink."""

    @staticmethod
    def forward(ctx, x, weight, bias, box: dict):           # x (B, in), weight (out, in), bias (out,) or None
        ctx.save_for_backward(x, weight)
        ctx.box = box
        return x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())

    @staticmethod
    def backward(ctx, dy):                                  # dy (B, out)
        x, weight = ctx.saved_tensors
        ctx.box["x"].append(x)
        ctx.box["dy"].append(dy)
        return (dy @ weight if ctx.needs_input_grad[0] else None), None, None, None


class StepLinear:
    """`module` (an nn.Linear) applied at every step of one recurrence, its weight gradient deferred to one
    matmul (module docstring). Falls back to the module itself where that does not apply: no grad, frozen
    weights, autocast (whose casts a custom Function would bypass), or the eager step (fused.set_eager)."""

    def __init__(self, module: nn.Linear):
        self.module = module
        w = module.weight
        self.active = (torch.is_grad_enabled() and w.requires_grad and not fused.eager()
                       and not torch.is_autocast_enabled(w.device.type))
        if self.active:
            self.box: dict = {"x": [], "dy": []}
            bias = () if module.bias is None else (module.bias,)
            views = _ParamSink.apply(self.box, w, *bias)
            self.weight, self.bias = views[0], (views[1] if bias else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return self.module(x)
        return _StepMatmul.apply(x, self.weight, self.bias, self.box)
