"""Caption new images with a trained run (or an ensemble of runs): the same backbone(s) and
preprocessing as the run's features, then beam search.

A run's checkpoint records the provenance of every cache it was trained on. `Encoder` rebuilds
exactly those backbones and preprocessing (refusing weights whose sha256 differs from the recorded
one) and rounds the features through the stored dtype, so a new image gets the features its cache
would hold; for a fused run, every backbone runs and the vectors are concatenated per region, as in
cache.readers.FusedStore.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.training import runs
from pipeline.config import CaptionConfig
from pipeline.decoder.decode import Ensemble, Hypothesis, beam_search
from pipeline.inference import decoding
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
    beams: list = field(default_factory=list)   # every final beam (Beam), best first, when asked for


def open_images(paths: Sequence[str | Path]):
    """PIL images, decoded but not converted: the backbone's preprocessing (backbones.to_rgb) converts
    them exactly as extraction does (transparency on white, 16-bit scaled)."""
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise UserError(f"{p}: no such image file.")
        with open(p, "rb") as f:
            out.append(open_image(f, str(p)))
    return out


def open_image(f, name: str, max_pixels: int | None = None):
    """One PIL image from a binary file object (a file, an upload), loaded; one UserError when it is not
    a readable image or has more than `max_pixels` pixels (default: Pillow's decompression-bomb limit)."""
    import warnings

    from PIL import Image, UnidentifiedImageError
    limit = max_pixels or Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)   # over the limit: refused, not warned
            with Image.open(f) as im:
                if limit and im.width * im.height > limit:
                    raise Image.DecompressionBombError(f"{im.width}x{im.height} = {im.width * im.height:,} pixels, "
                                                       f"more than the {limit:,} allowed")
                im.load()
                return im.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"{name}: refused by the decompression-bomb limit ({e}). Downscale the image, or "
                        f"raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file.") from e
    except UnidentifiedImageError as e:
        raise UserError(f"{name}: not a readable image (Pillow does not recognise the format). Pass a JPEG/PNG "
                        f"file.") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{name}: not a readable image ({e}). Pass a JPEG/PNG file.") from e


class Encoder:
    """The backbone(s) that made a run's caches, rebuilt for new images: images -> (n, L, C) float32.
    precision: auto|fp32|bf16 per backbone as extraction resolves it (backbones.resolve_precision): bf16
    autocast where the registry marks the backbone safe (its shipped decoder scores the same on val from bf16
    features) and the CPU has bf16 units."""

    def __init__(self, provenances: Sequence[dict], *, weights_dir: str | Path = "weights",
                 weights: Sequence[str] = (), device: str = "auto", precision: str = "auto"):
        from pipeline.cache.identity import normalized
        from pipeline.extraction.backbones import (autocast_dtype, conv_memory_format, cpu_conv_path, get_spec,
                                                   resolve_precision)
        from pipeline.extraction.cuts import load_prefix

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
            if normalized(prov.get("preprocessing")) != normalized(spec.preprocessing):
                raise UserError(f"backbone {name}: this code's preprocessing {spec.preprocessing} differs from the "
                                f"recorded {prov.get('preprocessing')}; re-extract the features with this version.")
            # a cache of an earlier layer (`layer`): its frozen prefix; the run's model holds the fine-tuned top
            module, spec, sha = load_prefix(name, prov.get("layer"), given.get(name), weights_dir)
            if sha != recorded:
                where = given.get(name) or f"the default under {weights_dir}"
                raise UserError(f"backbone {name}: weights {where} have sha256 {sha}, not the {recorded} recorded in "
                                f"the features' provenance. Pass the same weights with --weights "
                                f"{'' if len(set(names)) == 1 else name + '='}PATH (or --weights-dir).")
            stored = np.float16 if prov.get("dtype", "float16") == "float16" else np.float32
            resolved = resolve_precision(spec, precision, self.device)
            conv = cpu_conv_path(resolved, self.device)           # as extraction's: the same features bit for bit
            module = module.to(self.device).to(memory_format=conv_memory_format(conv))
            self.parts.append((spec, module, stored, autocast_dtype(resolved), conv))

    @torch.inference_mode()
    def __call__(self, images: list, batch_size: int = 16) -> np.ndarray:
        outs = []
        from pipeline.extraction.backbones import conv_memory_format, conv_path
        for spec, module, stored, amp, conv in self.parts:
            chunks = []
            for i in range(0, len(images), batch_size):
                x = torch.stack([spec.preprocess(im) for im in images[i:i + batch_size]])     # (B, 3, H, W)
                x = x.to(self.device).contiguous(memory_format=conv_memory_format(conv))
                with torch.autocast(self.device, dtype=amp, enabled=amp is not None), \
                        conv_path(conv):
                    y = module(x)                                                          # (B, C, h, w)
                chunks.append(y.float().flatten(2).transpose(1, 2).cpu().numpy().astype(stored))  # (B, L, C)
            if not chunks:
                return np.zeros((0, spec.num_regions, sum(p[0].feature_dim for p in self.parts)), np.float32)
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
    """The caption's words with their attention maps: <end>, <pad>, <start> dropped; <unk> (only emitted with
    --no-suppress-unk) shown as "<unk>"."""
    keep = [(vocab.itos[t], h.alphas[i]) for i, t in enumerate(h.tokens)
            if t not in (vocab.pad, vocab.start, vocab.end)]
    if not keep:
        return [], h.alphas[:0]
    return [w for w, _ in keep], torch.stack([a for _, a in keep])


@dataclass
class Beam:
    """One final hypothesis of the beam search, as the page shows it."""
    caption: str
    words: list[str]
    alphas: torch.Tensor      # (T, L)
    score: float              # (normalised) log-probability
    ended: bool               # False: stopped by max_len


class Captioner:
    """One run/shipped model or an ensemble (same vocabulary), with the backbone(s) each member reads:
    PIL images -> Captioned. `encoders` (provenance key -> Encoder) may be shared between Captioners."""

    def __init__(self, members: Sequence, cfg: CaptionConfig, log=print, encoders: dict | None = None):
        from pipeline.inference.shipped import load_member
        self.device = resolve_device(cfg.device)
        self.cfg = cfg
        self.loaded = [load_member(r, device=self.device, log=log) for r in members]
        first = self.loaded[0]
        for r in self.loaded[1:]:
            if r.vocab != first.vocab:
                raise UserError(f"cannot ensemble {first.run_dir} and {r.run_dir}: their vocabularies differ.")
        self.encoders = {} if encoders is None else encoders
        keys, inputs = [], []
        for r in self.loaded:
            provs = [f.get("provenance") for f in r.features]
            if not provs or not all(provs):
                raise UserError(f"{r.run_dir}: the checkpoint does not record the features' provenance, so the "
                                f"backbone and preprocessing for new images are unknown. Retrain with this version.")
            key = repr(provs)
            if key not in self.encoders:
                self.encoders[key] = Encoder(provs, weights_dir=cfg.weights_dir, weights=cfg.weights,
                                             device=self.device, precision=cfg.precision)
            if key not in keys:
                keys.append(key)
            inputs.append(keys.index(key))
        self.keys, self.vocab = keys, first.vocab
        self.model = first.model if len(self.loaded) == 1 else Ensemble([r.model for r in self.loaded], inputs)
        self.grid = tuple(first.features[0]["provenance"].get("grid") or (0, 0))
        self.max_len, self.max_len_rule = decoding.resolve_max_len(cfg, self.loaded, log=log)   # 0: auto
        self.rules = decoding.Rules.from_config(cfg, self.vocab)

    def __call__(self, images: list, names: Sequence, all_beams: bool = False) -> list[Captioned]:
        cfg, vocab = self.cfg, self.vocab
        feats = [torch.as_tensor(self.encoders[k](images, cfg.batch_size)) for k in self.keys]   # (n, L, C) each
        out = []
        for i in range(0, len(images), cfg.batch_size):
            x = tuple(f[i:i + cfg.batch_size].to(self.device) for f in feats)
            found = beam_search(self.model, x if len(x) > 1 else x[0], beam=cfg.beam, max_len=self.max_len,
                                length_norm=cfg.length_norm, rules=self.rules,
                                **({"all_beams": True} if all_beams else {}))
            for j, hs in enumerate(found):
                hs = hs if all_beams else [hs]
                beams = [Beam(" ".join(w), w, m, h.score, h.ended) for h in hs for w, m in [words_and_maps(h, vocab)]]
                b = beams[0]
                out.append(Captioned(Path(names[i + j]), b.caption, b.words, b.alphas, hs[0],
                                     grid_of(self.grid, hs[0].alphas.shape[1]), beams if all_beams else []))
        return out


def default_members(cfg: CaptionConfig, log=print, encoders: dict | None = None) -> list:
    """No --run, no --model: the newest run under runs/ (as before), else the best shipped model (val CIDEr)
    whose backbone weights are here, said in one line; one UserError when there is neither."""
    from pipeline.inference import shipped
    try:
        return [runs.latest_run()]
    except UserError:
        pass
    models = [m for m in shipped.list_models() if "error" not in m]
    why = []
    for m in models:
        provs = [f.get("provenance") for f in m["features"]]
        try:
            key = repr(provs)
            if encoders is not None and key not in encoders:
                encoders[key] = Encoder(provs, weights_dir=cfg.weights_dir, weights=cfg.weights,
                                        device=resolve_device(cfg.device), precision=cfg.precision)
            elif encoders is None:
                Encoder(provs, weights_dir=cfg.weights_dir, weights=cfg.weights, device="cpu")
        except UserError as e:
            why.append(f"{m['name']}: {e}")
            continue
        cider = shipped.val_metric(m)
        log(f"no trained run under runs/: captioning with the shipped model {m['name']} "
            f"({'+'.join(shipped.backbones_of(m))}, val CIDEr {100 * cider:.1f}); --model NAME picks another "
            f"(`pipeline models`)." if cider is not None else
            f"no trained run under runs/: captioning with the shipped model {m['name']}.")
        return [shipped.ModelRef(m["dir"])]
    if not models:
        raise UserError(f"nothing to caption with: no trained run under runs/ and no shipped model in "
                        f"{shipped.models_dir()}/. Train one (`pipeline train`) or pass --run DIR / --model NAME.")
    raise UserError("no trained run under runs/, and no shipped model's backbone weights are here: "
                    + "; ".join(why) + " (`make weights` fetches VGG19, `make efficientnet` EfficientNet-Lite2).")


def make_captioner(run_dirs: Sequence | str | Path | None, cfg: CaptionConfig, log=print) -> Captioner:
    """A Captioner of one run or shipped model, or an ensemble of them; None: `default_members` (the backbone
    it tried is kept, not loaded twice)."""
    encoders: dict = {}
    if run_dirs is None or isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs] if run_dirs is not None else default_members(cfg, log, encoders)
    return Captioner(run_dirs, cfg, log=log, encoders=encoders)


def caption_images(paths: Sequence[str | Path], run_dirs: Sequence | str | Path | None,
                   cfg: CaptionConfig, log=print) -> list[Captioned]:
    """Caption image files with one run or shipped model, or an ensemble of them (same vocabulary; each
    member's features are computed by its own backbone(s)). None: `default_members`. All or nothing: the
    command (caption_batch.py) is the one that skips unreadable files."""
    return make_captioner(run_dirs, cfg, log)(open_images(paths), list(paths))


def attention_paths(out: str | Path, images: Sequence[str | Path]) -> list[Path]:
    """One PNG per image: OUT itself for one image, else OUT_<image stem>.png (numbered if stems repeat).
    OUT without a picture suffix gets .png: the name of the file matplotlib writes, the one printed."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".pdf", ".svg"):
        out = out.with_name(out.name + ".png")
    if len(images) == 1:
        return [out]
    stems = [Path(p).stem for p in images]
    paths = []
    for i, s in enumerate(stems):
        name = s if stems.count(s) == 1 else f"{s}_{i}"
        paths.append(out.with_name(f"{out.stem}_{name}{out.suffix}"))
    return paths


def grid_of(grid: Sequence[int], L: int) -> tuple[int, int]:
    """The attention grid (gh, gw) of L regions: the recorded one, else square, else one row."""
    if grid and len(grid) == 2 and int(grid[0]) * int(grid[1]) == L:
        return int(grid[0]), int(grid[1])
    s = int(round(L ** 0.5))
    return (s, s) if s * s == L else (1, L)
