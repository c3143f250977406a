"""Every setting of the pipeline's stages, as dataclasses: each default lives in its field, once.

    DecoderConfig  the decoder (model.py)         TrainConfig    training (train.py)
    ScoreConfig    decoding and scoring (score.py) CaptionConfig  captioning new images (caption.py)


    lr: float = setting(4e-4, "Learning rate.", gt=0)

`setting` keeps the help text and the allowed values with the default; `check` enforces them (one
UserError naming the option); `from_dict` refuses unknown keys (a typo in an override is an error,
not a silent no-op); cli.py builds its click options from these fields (`cli.options_from`), so a
default is never repeated in the command line layer.
"""
from __future__ import annotations

import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar

from pipeline.errors import UserError


def setting(default: Any, help: str, *, choices: tuple | None = None, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None, cli: bool = True,
            flag: str | None = None) -> Any:
    """A dataclass field with its help text and allowed values (choices, bounds); cli=False keeps it
    out of the command line (set by code, e.g. the features paths); flag: the option name when it is
    not --<field-name>."""
    meta = dict(help=help, choices=choices, ge=ge, gt=gt, le=le, lt=lt, cli=cli, flag=flag)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def option_name(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check(cfg) -> None:
    """Raise one UserError for the first value outside its field's choices or bounds."""
    for f in fields(cfg):
        m, v = f.metadata, getattr(cfg, f.name)
        if not m:
            continue
        name = option_name(f)
        if m.get("choices") is not None and v not in m["choices"]:
            raise UserError(f"{name} {v!r}: choose one of {', '.join(map(str, m['choices']))}.")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"{name} {v!r}: must be a finite number.")
        for key, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                              ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
            if m.get(key) is not None and not ok(v, m[key]):
                raise UserError(f"{name} {v!r}: must be {word} {m[key]:g}.")


def defaults(cls) -> dict:
    return {f.name: (f.default if f.default is not MISSING else f.default_factory()) for f in fields(cls)}


def shown_default(cls, name: str) -> tuple[Any, str]:
    """(the default, as --help shows it): off/on, none for "", and for a default by objective (a None field
    of a class with BY_OBJECTIVE) the cross-entropy value with every objective's shown, "xe 15, scst 20"."""
    d = defaults(cls)[name]
    if d is None and name in getattr(cls, "BY_OBJECTIVE", {}).get("xe", {}):
        per = {o: v[name] for o, v in cls.BY_OBJECTIVE.items()}
        return per["xe"], ", ".join(f"{o} {v}" for o, v in per.items())
    return d, "off" if d is False else "on" if d is True else (d if d != "" else "none")


# Settings a saved run may lack because it was written before they existed: the value that keeps such a
# run doing what it did (not today's default, which may have changed since). `from_dict` fills them in.
LEGACY: dict[str, dict[str, Any]] = {
    "DecoderConfig": {"embed_dropout": 0.0, "context_dropout": 0.0, "hidden_dropout": 0.0,
                      "reinforce_weight": 1.0, "entropy_weight": 0.002, "sentinel": False},
    "TrainConfig": {"label_smoothing": 0.0, "weight_decay": 0.0, "lr_schedule": "plateau",
                    # val decoding before the decoding rules existed: no length norm, nothing masked
                    "length_norm": 0.0, "block_trigrams": False, "remove_bad_endings": False, "suppress_unk": False,
                    "scst_reward_end": False, "ema": 0.0,
                    # the recipe before 2026-12-06 (docs/results.md "Seed spread"): every run saved since holds
                    # these keys, so this only guards a config written by hand without them
                    "epochs": 20, "lr_factor": 0.8, "beam": 1,
                    # a run saved before a run chose its own decoding was scored at the global default
                    "decode_beam": 3, "decode_length_norm": 0.7,
                    "bf16_projections": "off"},
}


def from_dict(cls, d: dict, what: str = ""):
    """cls(**d) of a saved settings dict, refusing keys that are not fields of cls; a key the dict lacks
    takes its LEGACY value when it has one (the behaviour of the code that saved it), else the default."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"unknown {what or cls.__name__} setting(s): {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(names))}).")
    return cls(**{**LEGACY.get(cls.__name__, {}), **d})


# -- the stages' settings ---------------------------------------------------------------------------
@dataclass
class DecoderConfig:
    embed_dim: int = setting(512, "m: word embedding size (E is V x m).", ge=1)
    hidden_dim: int = setting(512, "n: LSTM units.", ge=1)
    attention_dim: int = setting(512, "Width of the attention MLP (W_a, W_h).", ge=1)
    dropout: float = setting(0.5, "Dropout on the deep-output layer, before L_o (the paper's).", ge=0, lt=1)
    embed_dropout: float = setting(0.3, "Dropout on the word embedding E y_{t-1} (LSTM input and deep output).",
                                   ge=0, lt=1)
    context_dropout: float = setting(0.3, "Dropout on the context z_t where it enters the LSTM.", ge=0, lt=1)
    hidden_dropout: float = setting(0.3, "Dropout on the LSTM output h_t where it enters the deep output.",
                                    ge=0, lt=1)
    attention: str = setting("soft", "soft (deterministic, 4.2) or hard (stochastic, 4.1).", choices=("soft", "hard"))
    alpha_c: float = setting(1.0, "lambda of the doubly stochastic penalty (eq. 14); 0 turns it off.", ge=0)
    gate: bool = setting(True, "The scalar gate beta_t (4.2.1); off: z_t is the plain expectation.")
    deep_output_tanh: bool = setting(False, "Deviation: tanh before L_o, as the authors' code (eq. 7 has none).")
    sentinel: bool = setting(False, "Adaptive attention (Lu et al. 2017, 2.3): a visual sentinel as an (L+1)-th "
                                    "attention slot, so a word may come from the LSTM's memory instead of the "
                                    "image (soft attention only; decoder/model.py).")
    # hard attention (4.1): the paper's variance reductions, eq. 12
    hard_expected_prob: float = setting(0.5, "Hard attention: per caption, train with the expected context "
                                             "with this probability.", ge=0, le=1)
    baseline_decay: float = setting(0.9, "Hard attention: moving-average baseline b_k = d b_{k-1} + (1 - d) r_k.",
                                    ge=0, lt=1)
    reinforce_weight: float = setting(1.0, "Hard attention: lambda_r of eq. 12.", ge=0)
    entropy_weight: float = setting(0.002, "Hard attention: lambda_e of eq. 12 (bonus on H[alpha_t]).", ge=0)
    reward_per_word: bool = setting(True, "Hard attention: reward = log p(y|s,a) / T (one baseline for all "
                                          "caption lengths) instead of the paper's log p(y|s,a).")

    def __post_init__(self):
        check(self)
        if self.sentinel and self.attention != "soft":
            raise UserError(f"--sentinel needs --attention soft: {self.attention} attention reads one of the L "
                            f"regions (4.1) and has no slot for the sentinel; drop --sentinel or use soft attention.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        return from_dict(cls, d, "decoder")


@dataclass
class DecodingRules:
    """What a decoded caption may be (decoder/rules.py applies them): shared by score, caption, browse and the
    trainer's val decoding, so every decoding follows the same rules with the same defaults."""
    length_norm: float = setting(0.7, "Beam search ranks finished captions by logprob / length**X (length counts "
                                      "<end>; 0.7 measured best on Flickr8k val); 0: raw logprob.", ge=0)
    block_trigrams: bool = setting(True, "No word trigram twice in one caption (greedy and beam search).")
    remove_bad_endings: bool = setting(False, "No <end> right after a function word (a, an, the, and, of, in, on, "
                                              "with, to, at, for, ...): no caption ends mid-phrase.")
    suppress_unk: bool = setting(True, "Never emit <unk> (its log-probability masked); off: <unk> may be emitted "
                                       "and is printed as '<unk>'.")


@dataclass
class BeamDecoding(DecodingRules):
    """Decoding settings of score, caption and browse."""
    beam: int = setting(3, "Beam size (1: greedy).", ge=1, le=100)
    max_len: int = setting(0, "Longest caption in words (<end> not counted); 0: auto, the longest training caption "
                              "the run kept (read from its features cache).", ge=0)


@dataclass
class TrainConfig(DecodingRules):
    features: tuple = setting((), "Feature cache(s); several are fused (vectors concatenated per region).", cli=False)
    objective: str = setting("xe", "xe: cross-entropy with teacher forcing (the paper); scst: self-critical "
                                   "sequence training with a CIDEr-D reward (needs --init-from).", choices=("xe", "scst"))
    init_from: str = setting("", "Start from this run's best.pt weights, decoder settings and vocabulary "
                                 "(a new run; e.g. SCST after cross-entropy), or from a shipped model's "
                                 "(a models/ name or folder, `pipeline models`).")
    epochs: int = setting(None, "Epochs in total.", ge=1)
    batch_size: int = setting(64, "xe: captions per step (one length each); scst: images per step.", ge=1)
    optimizer: str = setting("adam", "adam, adamw (decoupled weight decay) or rmsprop (the paper's for Flickr8k).",
                             choices=("adam", "adamw", "rmsprop"))
    lr: float = setting(4e-4, "Learning rate.", gt=0)
    weight_decay: float = setting(0.0, "Weight decay (L2 for adam/rmsprop, decoupled for adamw).", ge=0)
    grad_clip: float = setting(5.0, "Max global gradient norm (0: off).", ge=0)
    ema: float = setting(None, "Exponential moving average of the decoder's weights, its decay per optimizer step "
                              "(e.g. 0.999; 0: off). On: validation decodes with the average, which selects "
                              "best.pt; best.pt and last.pt hold it as their model (last.pt also the weights "
                              "being trained, to resume). docs/training.md.", ge=0, lt=1)
    label_smoothing: float = setting(0.1, "xe: label smoothing epsilon (0: the plain NLL).", ge=0, lt=1)
    lr_schedule: str = setting(None, "plateau: lr x lr-factor after lr-patience epochs without a better val "
                                          "score; step: lr x lr-factor every lr-step epochs; none.",
                               choices=("plateau", "step", "none"))
    lr_factor: float = setting(None, "LR decay factor of the schedule.", gt=0, le=1)
    lr_patience: int = setting(2, "plateau schedule: epochs without a better val score before a decay.", ge=0)
    lr_step: int = setting(3, "step schedule: epochs between decays.", ge=1)
    patience: int = setting(4, "Early stop after this many epochs without a better val score.", ge=1)
    select_metric: str = setting("auto", "Val metric that selects best.pt and drives the plateau schedule and early "
                                         "stopping: bleu4, cider, or auto (cider for scst, bleu4 for xe).",
                                 choices=("auto", "bleu4", "cider"))
    beam: int = setting(None, "Val decoding beam (1: greedy), which selects best.pt.", ge=1)
    decode_beam: int = setting(None, "The beam this run's captions are decoded with afterwards (score, caption, "
                                     "browse, serve, export) unless --beam is given there; chosen on Flickr8k val "
                                     "(docs/results.md, decoding per shipped model).", ge=1, le=100)
    decode_length_norm: float = setting(None, "The length norm of that decoding, unless --length-norm is given "
                                              "there.", ge=0)
    max_len: int = setting(30, "Drop training captions longer than this (words); also the val decoding limit.", ge=1)
    min_count: int = setting(5, "Vocabulary: minimum word count in the train captions.", ge=1)
    scst_samples: int = setting(5, "scst: captions sampled per image.", ge=1)
    scst_baseline: str = setting("mean", "scst: reward baseline: the mean reward of the image's other samples, or "
                                         "the greedy caption's reward.", choices=("mean", "greedy"))
    scst_max_len: int = setting(16, "scst: longest sampled caption in words (<end> not counted).", ge=1)
    scst_reward_end: bool = setting(True, "scst: the CIDEr-D reward reads the end token (the field's recipe): a "
                                          "caption that ended is scored as 'w1 .. wn <end>' against references "
                                          "ending in <end>; one cut at --scst-max-len has no <end>.")
    seed: int = setting(0, "Random seed (weights, batches, dropout, sampling).", ge=0)
    device: str = setting("auto", "auto (cuda when available), cpu or cuda.", choices=("auto", "cpu", "cuda"))
    threads: int = setting(0, "CPU threads for torch (0: one per core); 1 per run when runs share the cores.", ge=0)
    bf16_projections: str = setting("auto", "CPU training: the two once-per-batch projections, the regions' "
                                            "attention keys W_a a and the output layer L_o, as bf16 matmuls "
                                            "(fp32 accumulation; outputs and weight gradients rounded to bf16), "
                                            "the rest fp32; validation and decoding stay fp32. on needs a CPU with "
                                            "bf16 units (amx_bf16/avx512_bf16); auto: on where it has them, for "
                                            "soft-attention cross-entropy (what was measured), off otherwise. "
                                            "docs/training.md.", choices=("auto", "on", "off"))
    max_minutes: float = setting(0.0, "Checkpoint and stop after this many minutes of training (0: no limit); "
                                      "continue with --resume.", ge=0)
    max_steps: int = setting(0, "Checkpoint and stop after this many optimizer steps in total (0: no limit).", ge=0)
    in_ram: str = setting("auto", "Features held in memory (yes), read lazily from the file (no), or auto: in "
                                  "memory when they fit (GPU memory checked on CUDA).", choices=("auto", "yes", "no"))
    num_workers: int = setting(0, "Reader processes when features are read lazily.", ge=0, flag="--workers")
    val_batch_size: int = setting(250, "Images per val decoding batch.", ge=1)
    log_every: int = setting(100, "Steps between progress lines (and non-finite loss checks).", ge=1)
    top_lr: float = setting(1e-4, "Learning rate of the encoder top, for a cache of an earlier layer (extract --layer): "
                                  "the backbone's last block(s), trained with the decoder from the cached activations "
                                  "(BatchNorm frozen); 0 keeps them at their pretrained weights.", ge=0)
    weights_dir: str = setting("weights", "Where the backbone weights are: the top of a cache of an earlier layer "
                                          "starts from them (sha256 checked against the cache's).")
    flip: bool = setting(False, "xe: per caption and epoch, train on the image's original or horizontally flipped "
                                "view (a cache made with extract --flip), drawn from the seed; 'left' and 'right' "
                                "are exchanged in the flipped view's caption. Validation reads the original view.")
    distill: str = setting("", "xe: also train on a teacher's captions of the train images (sequence-level "
                               "knowledge distillation): a results_train.*.json that `pipeline score --run TEACHER "
                               "[--run ...] --split train` wrote. docs/training.md.")
    human_captions: bool = setting(True, "xe: train on the dataset's captions; --no-human-captions with --distill "
                                         "trains on the teacher's alone.")
    distill_sha256: str = setting("", "The --distill file's sha256, recorded when the run starts (a resume "
                                      "refuses a changed file).", cli=False)

    # The settings whose default depends on --objective (a field above defaulting to None takes its value from
    # here, by objective; a run saves the value it got). xe: the recipe measured on Flickr8k VGG19, three seeds
    # against three of the recipe before it (docs/results.md "Default recipe"); scst: the recipe its runs used,
    # unchanged (an SCST epoch is ~94 steps at 64 images, so a 0.999 average would span ten epochs). decode_*:
    # beam 5 / length norm 0.9 beat beam 3 / 0.7 on all three metrics for three VGG19 seeds and the EfficientNet-Lite2
    # cross-entropy model; the SCST model's best stayed beam 3 / 0.7 (docs/results.md "Decoding per shipped model").
    BY_OBJECTIVE: ClassVar[dict] = {
        "xe": {"epochs": 15, "ema": 0.999, "lr_schedule": "step", "lr_factor": 0.5, "beam": 3,
               "decode_beam": 5, "decode_length_norm": 0.9},
        "scst": {"epochs": 20, "ema": 0.0, "lr_schedule": "plateau", "lr_factor": 0.8, "beam": 1,
                 "decode_beam": 3, "decode_length_norm": 0.7},
    }

    def __post_init__(self):
        one = isinstance(self.features, (str, os.PathLike))
        self.features = tuple(str(f) for f in ([self.features] if one else self.features))
        for name, value in self.BY_OBJECTIVE.get(self.objective, self.BY_OBJECTIVE["xe"]).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if isinstance(self.bf16_projections, bool):     # a run saved 2026-12-07, when it was an on/off flag
            self.bf16_projections = "on" if self.bf16_projections else "off"
        check(self)
        if self.flip and self.objective == "scst":
            raise UserError("--flip draws views per caption (cross-entropy); --objective scst does not read them.")
        if self.distill and self.objective == "scst":
            raise UserError("--distill adds cross-entropy targets; --objective scst does not read them (train the "
                            "student with cross-entropy first, then --init-from it for SCST).")
        if not self.human_captions and not self.distill:
            raise UserError("--no-human-captions leaves no captions to train on: give the teacher's with --distill.")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return from_dict(cls, d, "training")

    @property
    def metric(self) -> str:
        return ("cider" if self.objective == "scst" else "bleu4") if self.select_metric == "auto" else self.select_metric


@dataclass
class ScoreConfig(BeamDecoding):
    split: str = setting("val", "Split of the features file to decode and score.")
    batch_size: int = setting(100, "Images per beam-search batch.", ge=1)
    device: str = setting("auto", "auto (cuda when available), cpu or cuda.", choices=("auto", "cpu", "cuda"))
    workers: int = setting(0, "CPU decoding processes, one thread each (0: one per core, at most 4).", ge=0)
    hard_context: str = setting("expected", "Hard-attention decoders: read the expected context (deterministic), "
                                            "the argmax location, or a sampled location at each step.",
                                choices=("expected", "argmax", "sample"))
    progress: bool = setting(True, "Progress bar.", cli=False)

    def __post_init__(self):
        check(self)
        if self.workers == 0:
            self.workers = min(os.cpu_count() or 1, 4)


@dataclass
class CaptionConfig(BeamDecoding):
    batch_size: int = setting(16, "Images per batch.", ge=1)
    device: str = setting("auto", "auto (cuda when available), cpu or cuda: the backbone and the decoder.",
                          choices=("auto", "cpu", "cuda"))
    weights_dir: str = setting("weights", "Where the backbone weights named by the run's features provenance are.")
    precision: str = setting("auto", "The backbone's arithmetic: auto = bf16 where the backbone is marked safe and "
                                     "the CPU has bf16 units (or on CUDA), else fp32 (docs/features.md).",
                             choices=("auto", "fp32", "bf16"))
    weights: tuple = setting((), "Backbone weights file: PATH, or BACKBONE=PATH when the run reads several "
                                 "backbones' caches (repeatable).", cli=False)

    def __post_init__(self):
        check(self)




@dataclass
class BrowseConfig:
    page_size: int = setting(50, "Cards per page (and images per data file of the site).", ge=1, le=1000)
    thumb: int = setting(224, "Longest side of the JPEG thumbnails (pixels).", ge=16, le=1024)
    quality: int = setting(85, "JPEG quality of the thumbnails.", ge=1, le=100)
    upscale: int = setting(16, "Attention map upsampling in the browser (as viz.upsample_alpha).", ge=1, cli=False)

    def __post_init__(self):
        check(self)


@dataclass
class ExportConfig:
    dtype: str = setting("auto", "Weights stored as float16, float32, or auto: float16 when every val metric of the "
                                 "fp16 weights is within --fp16-tolerance of fp32 (both are measured).",
                         choices=("auto", "float16", "float32"))
    fp16_tolerance: float = setting(0.1, "auto: the largest fp16 - fp32 difference allowed on any val metric (x100).",
                                    ge=0)
    split: str = setting("val", "Split scored in fp32 and fp16 for the model card.")
    test_split: str = setting("test", "Split decoded into the card's test decoding file ('' for none).")
    max_file_mb: float = setting(25.0, "Refuse any file of the model larger than this (MB = 10^6 bytes).", gt=0)

    def __post_init__(self):
        check(self)


@dataclass
class ServeConfig:
    """The captioning page's server (`pipeline serve`); how it decodes is CaptionConfig's (beam, rules, device)."""
    port: int = setting(8008, "TCP port on 127.0.0.1.", ge=1024, le=65535)
    max_upload_mb: float = setting(20.0, "Largest photo accepted (MB = 10^6 bytes); larger ones get a message.", gt=0)
    max_pixels: int = setting(89_478_485, "Largest image accepted (width x height, Pillow's decompression-bomb "
                                          "limit); larger ones get a message.", ge=1)
    max_pending: int = setting(8, "Uploads waiting or being captioned at once; more get a 'busy' message.", ge=1)
    timeout: float = setting(120.0, "Seconds an upload may wait for its caption before it gets a message.", gt=0)
    host: str = setting("", "A further name the page is reached by (a reverse proxy's): requests are answered only "
                            "when their Host is localhost, 127.0.0.1, [::1] or this name; it still listens on "
                            "127.0.0.1 only.")

    def __post_init__(self):
        check(self)
