"""Pictures: per-word attention maps over the image (Fig. 2 of the paper) and training curves.

matplotlib with the Agg backend only (no display needed).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.figures import plt_agg as _plt, save_figure as _save


def _gaussian_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(round(3 * sigma)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def upsample_alpha(alpha: np.ndarray, grid: tuple[int, int], upscale: int = 16, sigma: float | None = None) -> np.ndarray:
    """(L,) attention -> (gh*upscale, gw*upscale) smooth map, like the paper's pyramid_expand(upscale=16, sigma=20).

    Each cell becomes an upscale x upscale block, then a separable gaussian (default sigma = upscale / 2 px,
    edge-padded) smooths the blocks; the map is rescaled to [0, 1] for display.
    """
    gh, gw = grid
    a = np.asarray(alpha, np.float64).reshape(gh, gw)
    big = np.kron(a, np.ones((upscale, upscale)))                     # (gh*u, gw*u)
    k = _gaussian_kernel(sigma or upscale / 2)
    r = len(k) // 2
    big = np.pad(big, r, mode="edge")
    big = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 0, big)
    big = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 1, big)
    lo, hi = big.min(), big.max()
    return (big - lo) / (hi - lo) if hi > lo else np.zeros_like(big)


SHARE_TOLERANCE = 1e-3   # maps summing to 1 within this are a plain soft decoder's: no image share drawn


def image_shares(alphas: np.ndarray) -> np.ndarray | None:
    """Per word, how much it came from the image: sum_i alpha_ti = 1 - beta_t for a decoder with the visual
    sentinel (decoder/model.py: its maps are the region slots of an (L+1)-way softmax), or None when every
    map sums to 1 (no sentinel: all of every word came from the image). alphas (T, L) -> (T,)."""
    a = np.asarray(alphas, np.float64)
    shares = a.reshape(len(a), -1).sum(1) if a.size else np.zeros(len(a))
    return shares if bool(np.any(np.abs(shares - 1.0) > SHARE_TOLERANCE)) else None


def attention_figure(image, words: Sequence[str], alphas: np.ndarray, out: str | Path, *,
                     grid: tuple[int, int] = (14, 14), upscale: int = 16, cols: int = 5,
                     title: str | None = None, shares: Sequence[float] | None | str = "auto") -> Path:
    """Save the image followed by one panel per word: the word's attention map over the image.

    image: PIL image (shown at gh*upscale x gw*upscale, 224 for 14x14); alphas (T, L) aligned with words.
    shares (T,): how much each word came from the image (1 - the sentinel's share), written under its map
    ("img 0.83"); "auto": image_shares(alphas), so a decoder with the sentinel gets them and others do not;
    None: none.
    """
    if isinstance(shares, str):
        shares = image_shares(alphas)
    plt = _plt()
    from PIL import Image

    size = (grid[1] * upscale, grid[0] * upscale)
    from pipeline.extraction.backbones import to_rgb
    img = np.asarray(to_rgb(image).resize(size, Image.BICUBIC))
    alphas = np.asarray(alphas)
    n = len(words) + 1
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    height = 2.6 if shares is None else 2.8                              # room for the shares under the maps
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, height * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(img)
    axes.flat[0].set_title(title or "input", fontsize=9)
    for i, w in enumerate(words):
        ax = axes.flat[i + 1]
        ax.imshow(img)
        # bright where attended, dark elsewhere, as in the paper's figures
        ax.imshow(upsample_alpha(alphas[i], grid, upscale), cmap="gray", alpha=0.7, vmin=0, vmax=1)
        ax.set_title(w, fontsize=11)
        if shares is not None:
            ax.text(0.5, -0.03, f"img {float(shares[i]):.2f}", transform=ax.transAxes, ha="center", va="top",
                    fontsize=8, color="0.25")
    return _save(fig, out)


def plot_bleu4(runs: dict[str, list[dict]], out: str | Path) -> Path | None:
    """Validation BLEU-4 (x100) per epoch of several runs (name -> log rows) in one plot."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for name, rows in runs.items():
        pts = [(r.get("epoch", i + 1), r["bleu4"]) for i, r in enumerate(rows) if isinstance(r.get("bleu4"), (int, float))]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, [100 * y for y in ys], marker=".", label=name)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel("val BLEU-4 (x100)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out)
