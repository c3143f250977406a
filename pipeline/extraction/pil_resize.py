"""Pillow's resize and the backbone's normalisation as tensor ops on any device (the GPU input path).

Pillow's resize is a separable filter (two 1-D passes, each rounded to uint8, in the order Pillow picks)
in 22-bit fixed-point integer arithmetic; `resize_like_pil` computes exactly that with int32 tensor ops
(Pillow's taps and weights, `pil_coefficients`), so it equals Pillow bit for bit for any size, up or down,
bilinear or bicubic. (Float resizes, even torch's antialiased interpolate in float64, differ from Pillow by
one grey level on up to ~4% of the values: Pillow's 22-bit weights break exact .5 ties.) `normalize` is
the float32 arithmetic of backbones.preprocess_image in the same order.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np

from pipeline.errors import UserError

PRECISION_BITS = 22       # Pillow's fixed-point resampling (libImaging/Resample.c: 32 - 8 - 2)


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _bicubic(x: float) -> float:
    a, x = -0.5, abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


_FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0)}


@functools.lru_cache(maxsize=512)
def pil_coefficients(in_size: int, out_size: int, resample: str = "bilinear") -> tuple[np.ndarray, np.ndarray]:
    """Pillow's resampling taps for one axis: (index (out, K) int64, weight (out, K) int32 in 2**-22 units).

    Pillow's precompute_coeffs + normalize_coeffs_8bpc, step for step: the filter's support grows with the
    downscale factor (antialiasing), the double weights are normalised per output pixel and rounded to
    22-bit fixed point. Unused taps have weight 0 (and a valid index)."""
    if resample not in _FILTERS:
        raise UserError(f"preprocessing resample {resample!r}: the tensor path knows bilinear and bicubic. "
                        f"Use --decode cpu for this backbone.")
    fn, fsupport = _FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = fsupport * filterscale
    K = int(math.ceil(support)) * 2 + 1
    idx = np.zeros((out_size, K), np.int64)
    kk = np.zeros((out_size, K), np.int32)
    one = 1 << PRECISION_BITS
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [fn((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = sum(w)
        for x in range(xmax):
            k = w[x] / ww if ww != 0.0 else w[x]
            kk[xx, x] = int(-0.5 + k * one) if k < 0 else int(0.5 + k * one)
            idx[xx, x] = xmin + x
        idx[xx, xmax:] = min(xmin, in_size - 1)
    return idx, kk


def _resample_axis(x, out_size: int, dim: int, resample: str):
    """One Pillow pass along `dim` (2: rows, 3: columns) of x (N, C, h, w) int32 0..255, in Pillow's integer
    arithmetic: start at 2**21, add pixel * weight per tap, shift right by 22, clip to 0..255."""
    import torch
    idx, kk = pil_coefficients(int(x.shape[dim]), int(out_size), resample)
    idx = torch.from_numpy(idx).to(x.device)
    kk = torch.from_numpy(kk).to(x.device)
    shape = list(x.shape)
    shape[dim] = out_size
    acc = torch.full(shape, 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=x.device)
    for k in range(idx.shape[1]):
        w = kk[:, k].view(-1, 1) if dim == 2 else kk[:, k]
        acc += x.index_select(dim, idx[:, k]) * w
    return (acc >> PRECISION_BITS).clamp_(0, 255)


@functools.lru_cache(maxsize=1)
def pillow_orders_passes() -> bool:
    """Whether the installed Pillow runs the vertical pass first when the height shrinks more than twice as
    much as the width (Pillow 13's ImagingResampleInner does; older ones always go horizontal first).
    Decided once by resizing a 40x20 probe both ways and comparing with Pillow itself."""
    from PIL import Image
    import torch
    a = np.random.default_rng(0).integers(0, 256, (40, 20, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(a).resize((50, 30), Image.BILINEAR)).transpose(2, 0, 1)
    x = torch.from_numpy(a.transpose(2, 0, 1).copy())[None].to(torch.int32)
    v_first = _resample_axis(_resample_axis(x, 30, 2, "bilinear"), 50, 3, "bilinear")[0].numpy()
    return bool(np.array_equal(v_first, want))


def vertical_first(h: int, w: int, H: int, W: int) -> bool:
    """Pillow's pass order for (h, w) -> (H, W): vertical first when the height shrinks by more than twice
    the width's shrink, in pixels (Pillow >= the version that `pillow_orders_passes` detects)."""
    return pillow_orders_passes() and (h - H) > 0 and (h - H) > (w - W) * 2


def resize_like_pil(x, size: Sequence[int], resample: str = "bilinear"):
    """x (N, 3, h, w) uint8 (or integer-valued) -> (N, 3, H, W) float32 with the values of Pillow's
    `Image.resize((W, H), BILINEAR | BICUBIC)` on the same pixels, bit for bit: two passes (in Pillow's
    order, `vertical_first`), each in Pillow's 8-bit fixed-point arithmetic (`pil_coefficients`) and
    clipped to uint8. Same size: unchanged (Pillow returns a copy). Any device; int32 tensor ops only."""
    import torch
    H, W = int(size[0]), int(size[1])
    h, w = (int(v) for v in x.shape[-2:])
    if (h, w) == (H, W):
        return x.float()
    x = x.to(torch.int32)
    passes = [(W, 3), (H, 2)] if not vertical_first(h, w, H, W) else [(H, 2), (W, 3)]
    for n, dim in passes:
        if x.shape[dim] != n:
            x = _resample_axis(x, n, dim, resample)
    return x.float()


def normalize(x, pp: dict):
    """x (N, 3, H, W) float32 RGB 0..255 -> the backbone's input: * scale/255, channel order, (x - mean) / std.
    The float32 operations of backbones.preprocess_image, in the same order (same values on CPU)."""
    import torch
    x = x * (float(pp["scale"]) / 255.0)
    if pp["channels"] == "BGR":
        x = x.flip(1)
    elif pp["channels"] != "RGB":
        raise UserError(f"preprocessing channels {pp['channels']!r}: expected RGB or BGR.")
    mean = torch.tensor(pp["mean"], dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pp["std"], dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess_uint8(images: Sequence, pp: dict):
    """Decoded images, a list of uint8 (3, h_i, w_i) tensors on one device -> (N, 3, H, W) float32 there.
    Images of one size are resized in one call (a dataset of equal sizes: one call per batch)."""
    import torch
    H, W = pp["resize"]
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape[-2:]), []).append(i)
    if len(groups) == 1:
        return normalize(resize_like_pil(torch.stack(list(images)), (H, W), pp["resample"]), pp)
    out = torch.empty(len(images), 3, H, W, dtype=torch.float32, device=images[0].device)
    for idx in groups.values():
        x = resize_like_pil(torch.stack([images[i] for i in idx]), (H, W), pp["resample"])
        out[torch.tensor(idx, device=out.device)] = normalize(x, pp)
    return out
