"""Caption new images with a trained run: same backbone + preprocessing as its features, then beam search.

The run's checkpoint records the provenance of the features it was trained on; `extract.encode_images`
rebuilds exactly that backbone/preprocessing (and refuses other weights), so a new image gets the
features the decoder was trained on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .decode import Hypothesis, beam_search
from .errors import UserError
from .score import load_model, resolve_run, run_provenance
from .text import Vocab


@dataclass
class CaptionConfig:
    beam: int = 3
    max_len: int = 20
    length_norm: float | None = None
    batch_size: int = 16
    device: str = "cpu"
    weights_dir: str = "weights"


@dataclass
class Captioned:
    path: Path
    caption: str
    words: list[str]          # generated words (no specials), aligned with alphas
    alphas: torch.Tensor      # (T, L)
    hypothesis: Hypothesis
    grid: tuple[int, int]     # attention grid (gh, gw), gh * gw = L


def open_images(paths: Sequence[str | Path]):
    from PIL import Image, UnidentifiedImageError
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise UserError(f"{p}: no such image file.")
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"{p}: not a readable image ({e}). Pass a JPEG/PNG file.") from e
    return out


def words_and_maps(h: Hypothesis, vocab: Vocab) -> tuple[list[str], torch.Tensor]:
    """The caption's words with their attention maps: specials (<end>, <unk>, ...) dropped."""
    keep = [(vocab.itos[t], h.alphas[i]) for i, t in enumerate(h.tokens)
            if t not in (vocab.pad, vocab.start, vocab.end, vocab.unk)]
    if not keep:
        return [], h.alphas[:0]
    return [w for w, _ in keep], torch.stack([a for _, a in keep])


def caption_images(paths: Sequence[str | Path], run: str | Path | None, cfg: CaptionConfig) -> list[Captioned]:
    run_dir = resolve_run(run)
    model, vocab, ckpt = load_model(run_dir, cfg.device)
    prov = run_provenance(ckpt)
    if not prov:
        raise UserError(f"{run_dir}: the checkpoint does not record the features' provenance, so the backbone "
                        f"and preprocessing for new images are unknown. Retrain with this version.")
    images = open_images(paths)
    from .extract import encode_images
    feats = encode_images(images, prov, cfg.weights_dir)                       # (n, L, C) float32
    feats = torch.as_tensor(feats, dtype=torch.float32)
    out = []
    for i in range(0, len(images), cfg.batch_size):
        x = feats[i:i + cfg.batch_size].to(cfg.device)
        for j, h in enumerate(beam_search(model, x, beam=cfg.beam, max_len=cfg.max_len,
                                          length_norm=cfg.length_norm)):
            words, maps = words_and_maps(h, vocab)
            grid = grid_of(prov, h.alphas.shape[1])
            out.append(Captioned(Path(paths[i + j]), " ".join(words), words, maps, h, grid))
    return out


def attention_paths(out: str | Path, images: Sequence[str | Path]) -> list[Path]:
    """One PNG per image: OUT itself for one image, else OUT_<image stem>.png (numbered if stems repeat)."""
    out = Path(out)
    if len(images) == 1:
        return [out]
    stems = [Path(p).stem for p in images]
    paths = []
    for i, s in enumerate(stems):
        name = s if stems.count(s) == 1 else f"{s}_{i}"
        paths.append(out.with_name(f"{out.stem}_{name}{out.suffix or '.png'}"))
    return paths


def grid_of(ckpt_prov: dict, L: int) -> tuple[int, int]:
    g = (ckpt_prov or {}).get("grid")
    if g and int(g[0]) * int(g[1]) == L:
        return int(g[0]), int(g[1])
    s = int(round(L ** 0.5))
    return (s, s) if s * s == L else (1, L)
