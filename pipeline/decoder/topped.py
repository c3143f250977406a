"""A decoder that reads a cache of an earlier backbone layer through the backbone's trainable top.

    a_i = EncoderTop(cached activations)  (B, L, C_cut) -> (B, L, C)     extraction/cuts.py
    then the Show, Attend and Tell decoder on a_i                         decoder/model.py

`TopDecoder` is a `Decoder` whose `init_state` first runs the top, so every path that reads features
(teacher forcing, sampling for SCST, greedy and beam search, ensembles) sees the fine-tuned annotation
vectors, computed once per image per batch. Its state dict is the decoder's (same keys) plus `top.*`:
a run's checkpoint holds the fine-tuned top. `build_decoder` is the one constructor training and
inference use; runs whose caches hold final layers get the plain `Decoder`, as before.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import DecoderConfig
from pipeline.decoder.model import Decoder
from pipeline.extraction.cuts import EncoderTop, build_top, top_layer


class TopDecoder(Decoder):
    """Decoder over EncoderTop(features): feats (B, L, C_cut) everywhere the Decoder takes (B, L, C)."""

    def __init__(self, cfg: DecoderConfig, vocab_size: int, top: EncoderTop):
        super().__init__(cfg, vocab_size, top.out_dim)
        self.top = top

    def init_state(self, feats: torch.Tensor):
        """feats (B, L, C_cut) -> the Decoder's ((h, c), (a, att_a)) with a = top(feats) (B, L, C)."""
        return super().init_state(self.top(feats))


def build_decoder(cfg: DecoderConfig, vocab_size: int, feature_dim: int, provenances, *,
                  pretrained_top: bool = False, train_top: bool = True, weights_dir: str | Path = "weights"):
    """Decoder for caches with these provenances: a TopDecoder when they hold an earlier layer (`layer` in
    the provenance), with the top at the backbone's pretrained weights (`pretrained_top`, a new run) or
    only its architecture (to load a checkpoint into). `train_top` False freezes the top.
    Building the top never draws from the global RNG, so the decoder's initial weights depend on the seed
    only, as for a plain run."""
    layer = top_layer(list(provenances or []))
    if not layer:
        return Decoder(cfg, vocab_size, feature_dim)
    top = build_top(provenances[0], pretrained=pretrained_top, weights_dir=weights_dir)
    if top.in_dim != feature_dim:
        raise ValueError(f"the cache has {feature_dim} channels, the top of {top.backbone}@{layer} takes {top.in_dim}")
    for p in top.parameters():
        p.requires_grad_(train_top)
    return TopDecoder(cfg, vocab_size, top)


def param_groups(model, top_lr: float) -> list:
    """The optimizer's parameters: a plain decoder's trainable ones (as before), or for a TopDecoder two
    groups, the decoder's (the optimizer's lr) and the top's (lr `top_lr`)."""
    if not isinstance(model, TopDecoder):
        return [p for p in model.parameters() if p.requires_grad]
    top = [p for p in model.top.parameters() if p.requires_grad]
    ids = {id(p) for p in model.top.parameters()}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in ids]}]
    if top:
        groups.append({"params": top, "lr": top_lr})
    return groups


def init_from_final_layer(init_ckpt: dict, st) -> bool:
    """Whether `--init-from` is a run on a backbone's final layer and `st` a cache of an earlier layer of the
    same extraction (same backbone, weights, preprocessing, images and captions; only `layer` and the cached
    channels differ): then the new run takes that run's decoder and starts its top from the pretrained weights
    (the two-phase recipe: train the decoder on the frozen encoder, then fine-tune the top with it)."""
    from pipeline.cache.identity import check_same_provenance
    from pipeline.extraction.backbones import get_spec
    init = [f.get("provenance") for f in init_ckpt.get("features") or []]
    layer = top_layer(st.provenances)
    if len(init) != 1 or not init[0] or init[0].get("layer") or not layer or len(st.provenances) != 1:
        return False
    prov = dict(st.provenances[0], layer=None, feature_dim=init[0].get("feature_dim"))
    check_same_provenance(init[0], prov, what="this cache of an earlier layer", where="--init-from")
    return (int(init_ckpt["feature_dim"]) == get_spec(prov["backbone"]).feature_dim
            and int(init_ckpt["num_regions"]) == st.num_regions)


def check_init(init_ckpt: dict, st, check_features, *, where: str) -> None:
    """--init-from's check: a final-layer run onto a cut cache of its extraction (init_from_final_layer), else
    `check_features` (the run's own provenance)."""
    if not init_from_final_layer(init_ckpt, st):
        check_features(init_ckpt, st, where=where)


def load_init(model, init_model) -> None:
    """--init-from's weights: all of them, or a final-layer run's decoder into a TopDecoder (its top kept at
    the pretrained weights it was built with)."""
    sd = init_model.state_dict()
    if isinstance(model, TopDecoder) and not isinstance(init_model, TopDecoder):
        sd = {**{k: v for k, v in model.state_dict().items() if k.startswith("top.")}, **sd}
    model.load_state_dict(sd)


def training_model(dcfg: DecoderConfig, vocab_size: int, st, cfg, *, resumed: bool, init_model=None):
    """training.state.setup's model: build_decoder for the store `st` with TrainConfig `cfg` (--weights-dir, --top-lr
    0 freezes the top), the top pretrained unless a checkpoint or a topped --init-from run brings its own,
    then the --init-from weights (load_init)."""
    model = build_decoder(dcfg, vocab_size, st.feature_dim, st.provenances, weights_dir=cfg.weights_dir,
                          pretrained_top=not resumed and not isinstance(init_model, TopDecoder),
                          train_top=cfg.top_lr > 0)
    if init_model is not None:
        load_init(model, init_model)
    return model
