"""Caption new images with a trained run (or an ensemble of runs): the same backbone(s) and
preprocessing as the run's features, then beam search.

A run's checkpoint records the provenance of every cache it was trained on. `Encoder` rebuilds
exactly those backbones and preprocessing (refusing weights whose sha256 differs from the recorded
one) and rounds the features through the stored dtype, so a new image gets the features its cache
would hold; for a fused run, every backbone runs and the vectors are concatenated per region, as in
store.FusedStore.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.training import runs
from pipeline.config import CaptionConfig
from pipeline.decoder.decode import Ensemble, Hypothesis, beam_search
from pipeline.device import resolve_device
from pipeline.errors import UserError
from pipeline.data.text import Vocab


@dataclass
class Captioned:
    path: Path
    caption: str
    words: list[str]          # generated words (no specials), aligned with alphas
    alphas: torch.Tensor      # (T, L)
    hypothesis: Hypothesis
    grid: tuple[int, int]     # attention grid (gh, gw), gh * gw = L


def open_images(paths: Sequence[str | Path]):
    """PIL images, decoded but not converted: the backbone's preprocessing (backbones.to_rgb) converts
    them exactly as extraction does (transparency on white, 16-bit scaled)."""
    from PIL import Image, UnidentifiedImageError
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise UserError(f"{p}: no such image file.")
        try:
            with Image.open(p) as im:
                im.load()
                out.append(im.copy())
        except Image.DecompressionBombError as e:
            raise UserError(f"{p}: refused by Pillow's decompression-bomb limit ({e}). Downscale the image, or "
                            f"raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file.") from e
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise UserError(f"{p}: not a readable image ({e}). Pass a JPEG/PNG file.") from e
    return out


class Encoder:
    """The backbone(s) that made a run's caches, rebuilt for new images: images -> (n, L, C) float32."""

    def __init__(self, provenances: Sequence[dict], *, weights_dir: str | Path = "weights",
                 weights: Sequence[str] = (), device: str = "auto"):
        from pipeline.cache import store
        from pipeline.extraction.backbones import get_spec, load_backbone

        self.device = resolve_device(device)
        names = [p.get("backbone") for p in provenances]
        given = _weights_by_backbone(weights, names)
        self.parts = []
        for prov in provenances:
            name = prov.get("backbone")
            spec = get_spec(name)
            recorded = prov.get("weights_sha256")
            if recorded == "random":
                raise UserError(f"the features were made with a randomly initialised {name}; they cannot be "
                                f"reproduced for new images. Re-extract with real weights.")
            if store._norm(prov.get("preprocessing")) != store._norm(spec.preprocessing):
                raise UserError(f"backbone {name}: this code's preprocessing {spec.preprocessing} differs from the "
                                f"recorded {prov.get('preprocessing')}; re-extract the features with this version.")
            module, _, sha = load_backbone(name, given.get(name), weights_dir)
            if sha != recorded:
                where = given.get(name) or f"the default under {weights_dir}"
                raise UserError(f"backbone {name}: weights {where} have sha256 {sha}, not the {recorded} recorded in "
                                f"the features' provenance. Pass the same weights with --weights "
                                f"{'' if len(set(names)) == 1 else name + '='}PATH (or --weights-dir).")
            stored = np.float16 if prov.get("dtype", "float16") == "float16" else np.float32
            module = module.to(self.device).to(memory_format=torch.channels_last)
            self.parts.append((spec, module, stored))

    @torch.inference_mode()
    def __call__(self, images: list, batch_size: int = 16) -> np.ndarray:
        outs = []
        for spec, module, stored in self.parts:
            chunks = []
            for i in range(0, len(images), batch_size):
                x = torch.stack([spec.preprocess(im) for im in images[i:i + batch_size]])     # (B, 3, H, W)
                x = x.to(self.device).contiguous(memory_format=torch.channels_last)
                amp = getattr(torch, spec.amp) if (self.device == "cuda" and spec.amp) else None
                with torch.autocast(self.device, dtype=amp, enabled=amp is not None):
                    y = module(x)                                                          # (B, C, h, w)
                chunks.append(y.float().flatten(2).transpose(1, 2).cpu().numpy().astype(stored))  # (B, L, C)
            if not chunks:
                return np.zeros((0, spec.num_regions, sum(s.feature_dim for s, _, _ in self.parts)), np.float32)
            outs.append(np.concatenate(chunks).astype(np.float32))
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=2)


def _weights_by_backbone(weights: Sequence[str], names: Sequence[str]) -> dict:
    out = {}
    for w in weights:
        name, sep, path = w.partition("=")
        if not sep:
            if len(set(names)) != 1:
                raise UserError(f"--weights {w}: the run reads features of several backbones ({', '.join(names)}); "
                                f"say which with --weights BACKBONE=PATH.")
            name, path = names[0], w
        if name not in names:
            raise UserError(f"--weights {w}: the run has no {name} features (its backbones: {', '.join(names)}).")
        out[name] = path
    return out


def words_and_maps(h: Hypothesis, vocab: Vocab) -> tuple[list[str], torch.Tensor]:
    """The caption's words with their attention maps: specials (<end>, <unk>, ...) dropped."""
    keep = [(vocab.itos[t], h.alphas[i]) for i, t in enumerate(h.tokens)
            if t not in (vocab.pad, vocab.start, vocab.end, vocab.unk)]
    if not keep:
        return [], h.alphas[:0]
    return [w for w, _ in keep], torch.stack([a for _, a in keep])


def caption_images(paths: Sequence[str | Path], run_dirs: Sequence[str | Path | None] | str | Path | None,
                   cfg: CaptionConfig, log=print) -> list[Captioned]:
    """Caption image files with one run or an ensemble of runs (same vocabulary; each member's
    features are computed by its own backbone(s))."""
    if run_dirs is None or isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    device = resolve_device(cfg.device)
    loaded = [runs.load_run(r, device=device, log=log) for r in run_dirs]
    for r in loaded[1:]:
        if r.vocab != loaded[0].vocab:
            raise UserError(f"cannot ensemble {loaded[0].run_dir} and {r.run_dir}: their vocabularies differ.")
    keys, encoders, inputs = [], [], []
    for r in loaded:
        provs = [f.get("provenance") for f in r.features]
        if not provs or not all(provs):
            raise UserError(f"{r.run_dir}: the checkpoint does not record the features' provenance, so the "
                            f"backbone and preprocessing for new images are unknown. Retrain with this version.")
        key = repr(provs)
        if key not in keys:
            keys.append(key)
            encoders.append(Encoder(provs, weights_dir=cfg.weights_dir, weights=cfg.weights, device=device))
        inputs.append(keys.index(key))
    model = loaded[0].model if len(loaded) == 1 else Ensemble([r.model for r in loaded], inputs)
    grid = tuple(loaded[0].features[0]["provenance"].get("grid") or (0, 0))
    images = open_images(paths)
    feats = [torch.as_tensor(enc(images, cfg.batch_size)) for enc in encoders]       # (n, L, C) float32 each
    out = []
    for i in range(0, len(images), cfg.batch_size):
        x = tuple(f[i:i + cfg.batch_size].to(device) for f in feats)
        for j, h in enumerate(beam_search(model, x if len(x) > 1 else x[0], beam=cfg.beam, max_len=cfg.max_len,
                                          length_norm=cfg.length_norm)):
            words, maps = words_and_maps(h, vocab=loaded[0].vocab)
            out.append(Captioned(Path(paths[i + j]), " ".join(words), words, maps, h,
                                 grid_of(grid, h.alphas.shape[1])))
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


def grid_of(grid: Sequence[int], L: int) -> tuple[int, int]:
    """The attention grid (gh, gw) of L regions: the recorded one, else square, else one row."""
    if grid and len(grid) == 2 and int(grid[0]) * int(grid[1]) == L:
        return int(grid[0]), int(grid[1])
    s = int(round(L ** 0.5))
    return (s, s) if s * s == L else (1, L)
