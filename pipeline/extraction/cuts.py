"""Cut points of a backbone: the frozen prefix that stage one runs, and the trainable top that stage two
fine-tunes with the decoder from the cached activations (issue 18, the seeds' "unfreeze").

    image ──prefix (frozen, extraction)──▶ cache of layer `cut.layer` (B, L, C_cut)
          ──EncoderTop (trained with the decoder)──▶ annotation vectors a_i (B, L, C)

The cut points are registry entries (`backbones.Cut` in each `BackboneSpec.cuts`): VGG19 `conv5_4_input`
(relu5_3's output; the top is conv5_4 + ReLU) and `conv5_1_input` (pool4's output; the top is conv5_1 ..
conv5_4), 14x14x512 at 224 px; EfficientNet-Lite2 `last_stage_input` (block 19's output, 14x14x208 at 448
px; the top is the last MBConv block, the 1x1 head conv, its BatchNorm and ReLU6). `prefix` then `top` is
exactly the backbone `load_backbone` builds (tests/test_cuts.py: equal on random and real weights).

The top always runs in eval mode: its BatchNorm layers use (and keep) their ImageNet running statistics,
and EfficientNet's drop-connect stays off; their affine parameters and the convolutions train.
A cache's provenance names its cut in `layer`; a cache without `layer` holds the final layer.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.extraction.backbones import BackboneSpec, Cut, get_spec, load_backbone


def cut_of(spec: BackboneSpec, layer: str) -> Cut:
    """The registry entry of `layer` in `spec.cuts` (one clear error naming the choices)."""
    for c in spec.cuts:
        if c.layer == layer:
            return c
    have = ", ".join(c.layer for c in spec.cuts) or "none"
    raise UserError(f"--layer {layer}: backbone {spec.name} has no such cut point (its cut points: {have}).")


def spec_at(spec: BackboneSpec, layer: str | None) -> BackboneSpec:
    """The spec of what a cache of `layer` holds: the cut's channels (same grid, preprocessing, input)."""
    if not layer:
        return spec
    return dataclasses.replace(spec, feature_dim=cut_of(spec, layer).feature_dim, layer=layer)


class _EffPrefix(nn.Module):
    """EfficientNet-Lite's stem and blocks[:at] (what `extract_features` runs before the cut)."""

    def __init__(self, net, at: int):
        super().__init__()
        self.conv_stem, self.bn0, self.act = net._conv_stem, net._bn0, net._swish
        self.blocks = nn.ModuleList(net._blocks[:at])
        self.rate, self.total = net._global_params.drop_connect_rate, len(net._blocks)

    def forward(self, x):                               # (B, 3, H, W) -> (B, C_cut, h, w)
        x = self.act(self.bn0(self.conv_stem(x)))
        for i, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=self.rate * i / self.total if self.rate else self.rate)
        return x


class _EffTop(nn.Module):
    """EfficientNet-Lite's blocks[at:], head conv, BN and ReLU6 (the rest of `extract_features`)."""

    def __init__(self, net, at: int):
        super().__init__()
        self.blocks = nn.ModuleList(net._blocks[at:])
        self.conv_head, self.bn1, self.act = net._conv_head, net._bn1, net._swish
        self.rate, self.first, self.total = net._global_params.drop_connect_rate, at, len(net._blocks)

    def forward(self, x):                               # (B, C_cut, h, w) -> (B, C, h, w)
        for i, block in enumerate(self.blocks, self.first):
            x = block(x, drop_connect_rate=self.rate * i / self.total if self.rate else self.rate)
        return self.act(self.bn1(self.conv_head(x)))


def split(module: nn.Module, spec: BackboneSpec, cut: Cut) -> tuple[nn.Module, nn.Module]:
    """(prefix, top) of a backbone built by `load_backbone`: top(prefix(x)) == module(x)."""
    if isinstance(module, nn.Sequential) and spec.name.startswith("vgg"):
        return module[:cut.at], module[cut.at:]
    net = getattr(module, "net", None)
    if net is not None and hasattr(net, "_blocks"):
        return _EffPrefix(net, cut.at), _EffTop(net, cut.at)
    raise UserError(f"backbone {spec.name}: no split for cut {cut.layer} (a registry entry without a splitter).")


def load_prefix(name: str, layer: str | None, weights: str | None = None, weights_dir: str | Path = "weights"):
    """What extraction runs for `--layer`: -> (frozen module (B,3,H,W) -> (B, C_cut, h, w), spec at the
    cut, weights sha256). No layer: the whole backbone (`load_backbone`)."""
    module, spec, sha = load_backbone(name, weights, weights_dir)
    if not layer:
        return module, spec, sha
    prefix, _ = split(module, spec, cut_of(spec, layer))
    return prefix.eval(), spec_at(spec, layer), sha


class EncoderTop(nn.Module):
    """The backbone's layers after a cut, applied to cached activations: (B, L, C_cut) -> (B, L, C).

    Region l of the cache is grid cell (l // w, l % w) (row-major, as extraction flattens), so
    (B, L, C_cut) is the NHWC memory layout of the map: it is viewed as a channels-last (B, C_cut, h, w)
    tensor without a copy. Always in eval mode (BatchNorm statistics frozen; `train()` keeps it so).
    """

    def __init__(self, body: nn.Module, *, backbone: str, layer: str, grid: tuple[int, int], in_dim: int,
                 out_dim: int):
        super().__init__()
        self.body = body
        self.backbone, self.layer, self.grid, self.in_dim, self.out_dim = backbone, layer, tuple(grid), in_dim, out_dim
        super().train(False)

    def train(self, mode: bool = True):
        return super().train(False)      # BN in eval mode whatever the decoder does

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        B, L, C = feats.shape                                          # (B, L, C_cut)
        h, w = self.grid
        if L != h * w or C != self.in_dim:
            raise ValueError(f"EncoderTop({self.backbone}@{self.layer}) takes (B, {h * w}, {self.in_dim}), "
                             f"got {tuple(feats.shape)}")
        x = feats.reshape(B, h, w, C).permute(0, 3, 1, 2)             # (B, C_cut, h, w), channels-last strides
        y = self.body(x.to(next(self.body.parameters()).dtype) if not torch.is_autocast_enabled(x.device.type) else x)
        return y.permute(0, 2, 3, 1).reshape(B, L, -1)                 # (B, L, C), region l = y*w + x


def top_layer(provenances) -> str:
    """The cut layer of a run's caches ('' when they hold final layers); a cut cache cannot be fused."""
    layers = [(p or {}).get("layer") or "" for p in provenances]
    if any(layers) and len(layers) > 1:
        raise UserError("a cache of an earlier layer (extract --layer) cannot be fused with other caches: "
                        "train it alone (its top is trained with the decoder).")
    return layers[0] if layers else ""


def build_top(prov: dict, *, pretrained: bool, weights: str | None = None,
              weights_dir: str | Path = "weights") -> EncoderTop:
    """The trainable top of a cut cache (provenance `prov` with a `layer`).

    pretrained: the backbone's weights (refused when their sha256 differs from the cache's recorded one;
    a cache of random weights gets a fresh random top, tests only); else only the architecture (random
    values, for loading a checkpoint). The parameters require grad; the caller freezes them if asked.
    """
    name, layer = prov.get("backbone"), prov.get("layer")
    spec = get_spec(name)
    cut = cut_of(spec, layer)
    recorded = prov.get("weights_sha256")
    if pretrained and recorded != "random":
        module, _, sha = load_backbone(name, weights, weights_dir)
        if sha != recorded:
            raise UserError(f"backbone {name}: weights {weights or 'under ' + str(weights_dir)} have sha256 {sha}, not "
                            f"the {recorded} recorded in the cache of layer {layer}: its top must start from the "
                            f"weights that made the cache. Pass them with --weights-dir.")
    else:
        with torch.random.fork_rng():                 # building a random top never moves the global RNG
            module, _, _ = load_backbone(name, "random", weights_dir)
    _, body = split(module, spec, cut)
    for p in body.parameters():
        p.requires_grad_(True)
    return EncoderTop(body, backbone=name, layer=layer, grid=spec.grid, in_dim=cut.feature_dim,
                      out_dim=spec.feature_dim)
