"""The GPU code paths: CUDA tests (marked `cuda`, each skipped without a CUDA device) and their CPU tests
(not marked, so CI runs them):

  CPU   pipeline.extraction.gpu_images (the GPU input path, run with the CPU JPEG decoder) against the CPU input path
        (backbones.open_image / extract._Images) on real Flickr8k JPEGs and on odd files;
        training/data.py fits_in_memory's GPU-memory branch (torch.cuda.mem_get_info faked);
        benchmarks/gpu_check.py: its dry run (--device cpu --tiny), its pytest command line, its no-GPU exit.
  CUDA  extraction, the GPU input path (nvjpeg), training with bf16 autocast, beam search (= CPU),
        captioning, fits_in_memory: `python -m pytest -m cuda` (gpu_check's pytest part runs exactly these).

The differences measured between the two input paths are printed (pytest -s) and documented in docs/gpu.md.
"""
from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_FLICKR8K
from pipeline.extraction import backbones
from pipeline.extraction import gpu_images
from pipeline.extraction.backbones import caffe_preprocessing, imagenet_preprocessing, preprocess_image, tflite_preprocessing
from pipeline.errors import UserError
from pipeline.extraction.gpu_images import fast_path_refusal, gpu_batches, jpeg_header
from pipeline.extraction.pil_resize import resize_like_pil

REPO = Path(__file__).resolve().parents[1]
FLICKR_IMAGES = SHARED_FLICKR8K / "images"
HAS_CUDA = torch.cuda.is_available()


def cuda_test(f):
    """Marked `cuda` (gpu_check's subset) and skipped with a reason where no CUDA device is visible."""
    f = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device visible (torch.cuda.is_available() is False)")(f)
    return pytest.mark.cuda(f)


# the three resize cases of extraction: no resize (vgg19), upsample (efficientnet_lite2), downsample (tests' tiny)
CASES = {
    "224->224 vgg19 (no resize)": caffe_preprocessing(224),
    "224->448 efficientnet_lite2 (upsample)": tflite_preprocessing(448),
    "224->28 tiny (downsample)": imagenet_preprocessing(28),
}


def grid_backbone(size: int, seed: int = 0) -> torch.nn.Module:
    """(B, 3, size, size) -> (B, 8, 14, 14): one patchifying conv, a stand-in backbone for any input size."""
    torch.manual_seed(seed)
    k = size // 14
    return torch.nn.Conv2d(3, 8, k, stride=k).eval()


def stored_features(module, x: torch.Tensor) -> np.ndarray:
    """The network step of extraction on CPU: (B,3,H,W) -> (B, L, C) in the stored dtype (float16)."""
    with torch.inference_mode():
        return module(x.float().cpu()).flatten(2).transpose(1, 2).to(torch.float16).numpy()


def levels(a: torch.Tensor, b: torch.Tensor, pp: dict) -> torch.Tensor:
    """|a - b| of two preprocessed batches in grey levels (0..255 pixel units) per value."""
    per_level = torch.tensor(pp["std"], dtype=torch.float32).view(1, 3, 1, 1) / (pp["scale"] / 255.0)
    return (a.float().cpu() - b.float().cpu()).abs() * per_level


def through_both_paths(paths, pp, device, batch_size=4):
    """The GPU input path (this module on `device`) and the CPU one (preprocess_image) for the same files.
    -> (gpu x (N,3,H,W) on CPU, cpu x, rows, errs, stats)."""
    rows = np.arange(len(paths))
    with gpu_batches(paths, rows, pp, batch_size, device, threads=2) as it:
        batches = list(it)
        stats = it.stats
    got_rows = np.concatenate([b.rows for b in batches])
    x = torch.cat([b[1].cpu() for b in batches])
    errs = [e for b in batches for e in b[2]]
    ref = torch.stack([preprocess_image(Image.open(paths[r]), pp) for r in got_rows])
    return x, ref, got_rows, errs, stats


def compare(paths, pp, device, name):
    """-> dict of the measured differences (printed) between the two input paths and their feature rows."""
    x, ref, rows, errs, stats = through_both_paths(paths, pp, device)
    assert list(rows) == list(range(len(paths))) and not any(errs)
    assert x.dtype == torch.float32 and x.shape == ref.shape == (len(paths), 3, *pp["resize"])
    lv = levels(x, ref, pp)
    net = grid_backbone(pp["resize"][0])
    fa, fb = stored_features(net, x), stored_features(net, ref)
    fd = np.abs(fa.astype(np.float32) - fb.astype(np.float32))
    m = {"max_levels": float(lv.max()), "mean_levels": float(lv.mean()),
         "fraction_differing": float((lv > 0.5).float().mean()), "fraction_over_8": float((lv > 8.5).float().mean()),
         "feature_max_abs_diff": float(fd.max()),
         "feature_max_abs": float(np.abs(fb.astype(np.float32)).max()), "fast": stats.fast, "pil": stats.pil}
    print(f"\n[{device}] {name}: {len(paths)} images: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items()))
    return m, fa, fb


@pytest.fixture(scope="module")
def flickr_paths():
    if not FLICKR_IMAGES.is_dir():
        pytest.skip(f"{FLICKR_IMAGES} is absent: the real-image comparison needs Flickr8k's JPEGs")
    names = sorted(p for p in os.listdir(FLICKR_IMAGES) if p.endswith(".jpg"))[:6]
    return [str(FLICKR_IMAGES / n) for n in names]


def smooth_jpeg(path: Path, w: int, h: int, seed: int = 0, **save) -> Path:
    """A photo-like JPEG (smooth colour fields plus noise) of w x h pixels."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 255, (h // 25 + 2, w // 25 + 2, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    a = np.clip(np.asarray(base, np.int16) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(a).save(path, quality=90, **save)
    return path


# ---- CPU: the GPU input path against the CPU one ---------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_gpu_input_path_on_cpu_equals_pil_path_on_flickr8k(flickr_paths, name):
    """Same files, both input paths, the GPU one with the CPU JPEG decoder: libjpeg-turbo on both sides and
    Pillow's resize arithmetic on both sides give identical tensors, hence identical cache rows."""
    pp = CASES[name]
    m, fa, fb = compare(flickr_paths, pp, "cpu", name)
    assert m["fast"] == len(flickr_paths) and m["pil"] == 0          # every Flickr8k JPEG takes the fast path
    assert m["max_levels"] == 0 and np.array_equal(fa, fb)


def test_downsampling_a_500x375_jpeg(tmp_path):
    """A larger photo squashed to 224 (Pillow's antialiasing filter spans ~5 source pixels): identical too."""
    paths = [str(smooth_jpeg(tmp_path / f"big{i}.jpg", 500, 375, seed=i)) for i in range(3)]
    m, fa, fb = compare(paths, caffe_preprocessing(224), "cpu", "500x375->224 vgg19 (downsample)")
    assert m["max_levels"] == 0 and np.array_equal(fa, fb)


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
@pytest.mark.parametrize("src,dst", [((37, 53), (28, 28)), ((20, 30), (45, 61)), ((20, 1), (45, 3)), ((224, 224), (224, 224)),
                                     ((224, 224), (448, 448)), ((375, 500), (224, 224)),
                                     ((40, 20), (30, 50)), ((100, 1000), (10, 999))])   # Pillow 13: vertical pass first
def test_resize_like_pil_is_pillow_bit_for_bit(src, dst, resample):
    """Pillow's fixed-point arithmetic and pass order, not a float approximation: float bilinear resizes (even
    in float64) round ~4% of the values of a 20->45 upsample the other way (Pillow's 22-bit weights break exact
    .5 ties), and the wrong pass order changes ~20% of them."""
    rng = np.random.default_rng(sum(src) + sum(dst))
    a = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
    flt = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[resample]
    want = np.asarray(Image.fromarray(a).resize((dst[1], dst[0]), flt), np.float32).transpose(2, 0, 1)
    got = resize_like_pil(torch.from_numpy(a.transpose(2, 0, 1).copy())[None], dst, resample)[0]
    assert got.dtype == torch.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.numpy(), want)


def _jpeg(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", **kw)
    return b.getvalue()


def test_jpeg_header_decides_the_fast_path(monkeypatch):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    plain = _jpeg(rgb)
    h = jpeg_header(plain)
    assert (h.sof, h.precision, h.height, h.width, h.components, h.adobe_transform) == (0xC0, 8, 40, 50, 3, None)
    assert fast_path_refusal(plain) == ""
    assert fast_path_refusal(_jpeg(rgb, progressive=True)) == "" and jpeg_header(_jpeg(rgb, progressive=True)).sof == 0xC2
    assert fast_path_refusal(_jpeg(rgb.convert("L"))) == "grayscale JPEG"
    assert fast_path_refusal(_jpeg(rgb.convert("CMYK"))) == "CMYK JPEG"
    png = io.BytesIO()
    rgb.save(png, "PNG")
    assert fast_path_refusal(png.getvalue()) == "not a JPEG" and jpeg_header(b"") is None
    assert fast_path_refusal(plain[:len(plain) // 2]) == "no EOI marker (truncated)"
    sos = plain.index(b"\xff\xda")
    assert jpeg_header(plain).scan_start == sos + 2 + int.from_bytes(plain[sos + 2:sos + 4], "big")
    stray = plain[:sos + 30] + b"\xff\x42" + plain[sos + 32:]
    assert fast_path_refusal(stray) == "damaged scan data (stray marker)"
    adobe = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"        # APP14, transform 0: RGB-coded
    assert fast_path_refusal(plain[:2] + adobe + plain[2:]) == "RGB-coded JPEG"
    assert jpeg_header(plain[:2] + adobe + plain[2:]).adobe_transform == 0
    sof = plain.index(b"\xff\xc0")
    assert h.component_ids == (1, 2, 3)
    rgb_ids = bytearray(plain)
    rgb_ids[sof + 10], rgb_ids[sof + 13], rgb_ids[sof + 16] = b"RGB"
    assert fast_path_refusal(bytes(rgb_ids)) == "RGB-coded JPEG"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert fast_path_refusal(plain) == "larger than Pillow's MAX_IMAGE_PIXELS"


def odd_files(d: Path, decoder_error: bool = True) -> list[str]:
    """Every kind of file an extraction meets: fast-path JPEGs, ones for Pillow, broken and missing ones.
    decoder_error: also a JPEG whose header and scan look fine but whose Huffman table is bogus, so the
    tensor decoder fails on it (libjpeg-turbo on CPU does; what nvjpeg does with it is not pinned down)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    good = _jpeg(rgb)
    files = {"good.jpg": good, "progressive.jpg": _jpeg(rgb, progressive=True), "gray.jpg": _jpeg(rgb.convert("L")),
             "cmyk.jpg": _jpeg(rgb.convert("CMYK")), "truncated.jpg": good[:len(good) // 2],
             "garbage.jpg": b"\xff\xd8" + bytes(rng.integers(0, 255, 300, dtype=np.uint8)) + b"\xff\xd9"}
    bad = bytearray(good)                           # header intact and EOI present, stray markers in the scan
    sos = good.index(b"\xff\xda")
    for k in range(sos + 20, len(bad) - 2, 7):
        if bad[k + 1] != 0:
            bad[k] = 0xFF
    files["corrupt_scan.jpg"] = bytes(bad)
    if decoder_error:
        dht = bytearray(good)
        j = good.index(b"\xff\xc4")
        dht[j + 5:j + 21] = b"\xff" * 16               # the code-length counts of the first Huffman table
        files["bad_huffman.jpg"] = bytes(dht)
    for name, data in files.items():
        (d / name).write_bytes(data)
    rgba = np.dstack([np.asarray(rgb), rng.integers(0, 255, (40, 50), dtype=np.uint8)])
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    smooth_jpeg(d / "photo.jpg", 64, 48)
    names = ["good.jpg", "progressive.jpg", "gray.jpg", "cmyk.jpg", "rgba.png", "truncated.jpg", "corrupt_scan.jpg",
             "garbage.jpg", "photo.jpg", "missing.jpg"] + (["bad_huffman.jpg"] if decoder_error else [])
    return [str(d / n) for n in names]


def check_like_cpu_path(paths, device, pp):
    """Rows, bad images and error messages exactly as extract._Images gives them; good pixels close.
    -> (max, mean) grey-level difference over the good images."""
    from pipeline.extraction.extract import _Images
    rows = np.arange(len(paths))[::-1].copy()                  # any order of any rows
    with gpu_batches(paths, rows, pp, 4, device, threads=3) as it:
        batches = list(it)
        stats = it.stats
    assert [len(b[0]) for b in batches] == [4] * (len(paths) // 4) + ([len(paths) % 4] if len(paths) % 4 else [])
    got = {int(r): (x.cpu(), e) for b in batches for r, x, e in zip(b.rows, b.x, b.errs)}
    pictures = {int(r): p for b in batches for r, p in zip(b.rows, b.pictures)}
    assert list(got) == list(rows)
    ref = _Images(paths, rows, pp)
    diffs = []
    for i in range(len(rows)):
        r, x_ref, e_ref, picture_ref = ref[i]
        x, e = got[r]
        assert e == e_ref, (paths[r], e, e_ref)
        assert pictures[r] == picture_ref and (picture_ref is None) == paths[r].endswith("missing.jpg")
        if e:
            assert torch.count_nonzero(x) == 0
        else:
            diffs.append(levels(x[None], x_ref[None], pp))
    bad = {Path(paths[r]).name for r, (_, e) in got.items() if e}
    decoder_error = any(p.endswith("bad_huffman.jpg") for p in paths)
    assert bad == {"truncated.jpg", "corrupt_scan.jpg", "garbage.jpg", "missing.jpg"} | (
        {"bad_huffman.jpg"} if decoder_error else set())
    assert stats.bad == len(bad) and stats.pil == 7          # gray, cmyk, png, truncated, stray markers, garbage, missing
    assert stats.refusals["grayscale JPEG"] == 1 and stats.refusals["CMYK JPEG"] == 1
    assert stats.refusals["damaged scan data (stray marker)"] == 1 and stats.refusals["unreadable file"] == 1
    assert stats.fast + stats.pil_after_decode_error == 3 + decoder_error   # good, progressive, photo (+ bad table)
    if device == "cpu":
        assert stats.fast == 3 and stats.pil_after_decode_error == decoder_error
    d = torch.cat([t.flatten() for t in diffs])
    return float(d.max()), float(d.mean())


def test_odd_files_like_the_cpu_path(tmp_path):
    worst, mean = check_like_cpu_path(odd_files(tmp_path / "odd"), "cpu", imagenet_preprocessing(28))
    assert worst == 0


def test_close_early_stops_threads_and_errors_reach_the_consumer(flickr_paths, monkeypatch):
    before = threading.active_count()
    it = gpu_batches(flickr_paths, np.arange(len(flickr_paths)), CASES["224->28 tiny (downsample)"], 1, "cpu",
                     threads=2)
    rows, x, errs, _ = next(it)
    assert rows.tolist() == [0] and x.shape == (1, 3, 28, 28) and errs == [""]
    it.close()
    it.close()                                               # idempotent
    with pytest.raises(StopIteration):
        next(it)
    t0 = time.time()
    while threading.active_count() > before and time.time() - t0 < 10:
        time.sleep(0.05)
    assert threading.active_count() <= before

    def boom(datas, device):
        raise MemoryError("simulated out of memory on the device")
    monkeypatch.setattr(gpu_images, "decode_many", boom)
    with gpu_batches(flickr_paths, np.arange(2), CASES["224->28 tiny (downsample)"], 2, "cpu") as it:
        with pytest.raises(MemoryError, match="simulated"):
            next(it)


def test_assemble_batch_is_a_plain_function(tmp_path, monkeypatch):
    """The decode stage without threads: read_image per file, assemble_batch per batch. Rows keep their
    order, each image equals what the CPU path's open_image gives (the same function decides the odd
    ones), and a decoder that refuses a JPEG sends it to open_image too."""
    from pipeline.cache.identity import read_picture
    paths = odd_files(tmp_path / "odd")
    pp = imagenet_preprocessing(28)
    rows = [4, 0, 9, 1]                                        # rgba.png, good.jpg, missing.jpg, progressive.jpg
    items = [gpu_images.read_image(paths[r], r, pp) for r in rows]
    assert [it.why for it in items] == ["not a JPEG", "", "unreadable file", ""]
    stats = gpu_images.DecodeStats()
    batch = gpu_images.assemble_batch(items, pp, torch.device("cpu"), paths, stats)
    assert batch.rows.tolist() == rows and batch.x.shape == (4, 3, 28, 28)
    for j, r in enumerate(rows):
        x, err, picture = backbones.open_image(paths[r], pp)
        assert torch.equal(batch.x[j], x) and batch.errs[j] == err and batch.pictures[j] == picture
    assert batch.errs[2].startswith("FileNotFoundError") and batch.pictures[2] is None
    assert batch.pictures[1] == read_picture(paths[0])[1]
    assert (stats.fast, stats.pil, stats.pil_after_decode_error, stats.bad) == (2, 2, 0, 1)
    monkeypatch.setattr(gpu_images, "decode_many", lambda datas, device: [None] * len(datas))   # refuses all
    items = [gpu_images.read_image(paths[r], r, pp) for r in rows]
    again = gpu_images.assemble_batch(items, pp, torch.device("cpu"), paths, stats)
    assert torch.equal(again.x, batch.x) and again.errs == batch.errs and stats.pil_after_decode_error == 2


def test_prefetcher_keeps_order_passes_errors_and_stops():
    """The generic prefetcher: results in job order whatever the threads' timing, an error of either stage
    raised by the consumer after the results before it, an exception *object* as a result returned, and
    close() stopping its threads."""
    import random
    from pipeline.extraction.prefetch import Prefetcher

    def slow_double(j):
        time.sleep(random.random() * 0.01)
        return 2 * j
    with Prefetcher(range(30), slow_double, lambda r: r + 1, threads=4, depth=2) as it:
        assert list(it) == [2 * j + 1 for j in range(30)]

    def read(j):
        if j == 5:
            raise KeyError("job 5")
        return ValueError(j) if j == 1 else j
    it = Prefetcher(range(10), read, threads=3)
    got = [next(it) for _ in range(5)]
    assert got[0] == 0 and isinstance(got[1], ValueError) and got[2:] == [2, 3, 4]
    with pytest.raises(KeyError, match="job 5"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)
    with Prefetcher(range(3), lambda j: j, lambda r: 1 // (r - 2)) as it:
        with pytest.raises(ZeroDivisionError):
            list(it)
    before = threading.active_count()
    it = Prefetcher(iter(range(10 ** 6)), lambda j: j, threads=2, depth=1)
    assert next(it) == 0
    it.close()
    t0 = time.time()
    while threading.active_count() >= before and time.time() - t0 < 10:
        time.sleep(0.05)
    assert threading.active_count() < before + 1


def test_resolve_decode_and_bad_settings():
    from pipeline.extraction.gpu_images import resolve_decode
    assert resolve_decode("auto", "cuda") == "gpu" and resolve_decode("auto", "cpu") == "cpu"
    assert resolve_decode("gpu", "cpu") == "gpu" and resolve_decode("cpu", "cuda") == "cpu"
    with pytest.raises(UserError, match="--decode x: choose auto, cpu or gpu"):
        resolve_decode("x", "cpu")
    with pytest.raises(UserError, match="--batch-size 0"):
        gpu_batches([], np.arange(0), CASES["224->28 tiny (downsample)"], 0, "cpu")
    with pytest.raises(UserError, match="resample 'lanczos'"):
        resize_like_pil(torch.zeros(1, 3, 4, 4), (2, 2), "lanczos")


def test_extract_caches_equal_with_both_decoders(tmp_path, monkeypatch):
    """Once extract() has a decode= option (docs/gpu.md), both input paths must write the same cache."""
    import inspect
    from pipeline.cache import readers
    from pipeline.extraction.extract import extract
    from test_extract import make_records, tiny_spec
    if "decode" not in inspect.signature(extract).parameters:
        pytest.skip("pipeline.extraction.extract.extract has no decode= option yet (wiring of pipeline.extraction.gpu_images: docs/gpu.md)")
    monkeypatch.setitem(backbones.BACKBONES, "tiny", tiny_spec())
    recs = make_records(tmp_path, n=12, bad=(5,))
    out = {}
    for mode in ("cpu", "gpu"):
        out[mode] = tmp_path / f"{mode}.h5"
        extract(recs, out[mode], dataset="syn", backbone="tiny", progress=False, workers=0, batch_size=3,
                skip_bad=True, device="cpu", decode=mode)
    a, b = (readers.FeatureStore.open(out[m]) for m in ("cpu", "gpu"))
    assert np.array_equal(a.bad, b.bad) and a.bad.sum() == 1 and a.done.all() and b.done.all()
    fa, fb = a.load_features().astype(np.float32), b.load_features().astype(np.float32)
    np.testing.assert_allclose(fa, fb, rtol=0, atol=0.01 * np.abs(fa).max())


# ---- CPU: fits_in_memory's GPU branch ------------------------------------------------------------

def test_fits_in_memory_checks_free_gpu_memory(monkeypatch):
    from pipeline.training import data as tdata
    st = types.SimpleNamespace(num_images=10_000, num_regions=196, feature_dim=512, attrs={"dtype": "float16"})
    gib = 2 ** 30                                                     # the cache: 1.87 GiB
    monkeypatch.setattr(tdata.os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 16 * 2 ** 20,   # 64 GiB free RAM
                                                           "SC_PAGE_SIZE": 4096}[name])
    asked = []

    def mem_get_info(free):
        def fake(device=None):
            asked.append(device)
            return free, 80 * gib
        return fake
    dev = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info(3 * gib))
    lines = []
    assert tdata.fits_in_memory(st, dev, 1, lines.append) is False
    assert len(lines) == 1 and "GPU memory (3.0 GiB)" in lines[0] and "1.9 GiB" in lines[0], lines
    assert "lazily" in lines[0] and asked == [dev]
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info(60 * gib))
    lines = []
    assert tdata.fits_in_memory(st, dev, 1, lines.append) is True and lines == []
    # on CPU the GPU is never asked; host RAM is checked first (one line naming RAM, not the GPU)
    asked.clear()
    assert tdata.fits_in_memory(st, torch.device("cpu"), 1, lines.append) is True and asked == []
    monkeypatch.setattr(tdata.os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 2 ** 19, "SC_PAGE_SIZE": 4096}[name])
    assert tdata.fits_in_memory(st, dev, 1, lines.append) is False
    assert len(lines) == 1 and "free RAM (2.0 GiB)" in lines[0] and "GPU" not in lines[0] and asked == []


# ---- CPU: benchmarks/gpu_check.py --------------------------------------------------------------------

def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod                 # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_dry_run_writes_every_section(tmp_path):
    """The dry run of `make gpu-check`: every part's code on a few images and steps, on the CPU. `java` is
    kept off PATH so that `pipeline score` uses its Python fallback (METEOR's JVM would triple the time).
    Without the optional EfficientNet-Lite2 code (`make efficientnet`) its part is left out and, the
    other parts checked, the test skips saying so (it failed on a fresh clone: issue 20)."""
    gc = load_gpu_check()
    env = dict(os.environ, PATH=str(Path(sys.executable).parent), PYTHONUNBUFFERED="1")
    eff = subprocess.run([sys.executable, "-c", "import efficientnet_lite_pytorch"], env=env,
                         capture_output=True).returncode == 0       # as the dry run will see it
    parts = [p for p in gc.PARTS if eff or p != "extract_efficientnet_lite2"]
    t0 = time.time()
    # the dry run checks code paths, not speed: budgets x10, so that a busy machine does not time a part out
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                        "--parts", ",".join(parts), "--budget-scale", "10", "--max-minutes", "40",
                        "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
    print(f"\ngpu_check dry run: {time.time() - t0:.1f} s\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    md = (tmp_path / "gpu_check.md").read_text()
    assert report["ok"] and report["tiny"] and report["device"] == "cpu" and report["failed"] == []
    assert list(report["parts"]) == parts
    env = report["environment"]
    for k in ("torch", "cuda", "torchvision", "cpus", "gpu"):
        assert k in env
    assert report["parts"]["pytest"]["status"] == "skipped" and "-m cuda" in report["parts"]["pytest"]["command"]
    for name in parts[2:]:
        part = report["parts"][name]
        assert part["status"] == "passed", (name, part)
        assert part["figures"] and all(f["command"] and f["unit"] for f in part["figures"]), name
        assert f"| {name} | passed" in md
    for backbone in ("vgg19", "efficientnet_lite2") if eff else ("vgg19",):
        names = [f["name"] for f in report["parts"][f"extract_{backbone}"]["figures"]]
        for want in ("decode+resize only", "network only", "end to end, GPU input path", "end to end, CPU input path",
                     "GPU waits for input", "extract() end to end", "GPU path vs Pillow"):
            assert any(n.startswith(want) for n in names), (backbone, want, names)
    assert [f["name"] for f in report["parts"]["e2e_cli"]["figures"]] == [
        "pipeline synth", "pipeline extract", "pipeline train", "pipeline score", "pipeline caption"]
    assert "--device cpu" in report["parts"]["e2e_cli"]["figures"][2]["command"]
    assert md.startswith("# GPU check") and "| part | status | figure | value | unit | target | command |" in md
    if not eff:
        pytest.skip("every part passed but extract_efficientnet_lite2, left out: the optional EfficientNet-Lite2 "
                    "code is not installed (make efficientnet)")


def test_gpu_check_pytest_part_command_and_summary(tmp_path):
    gc = load_gpu_check()
    cmd = gc.pytest_command("-x -k 'beam and cuda'")
    assert cmd[:6] == [sys.executable, "-m", "pytest", "-q", "-m", "cuda"] and cmd[-3:] == ["-x", "-k", "beam and cuda"]
    args = types.SimpleNamespace(tiny=False, run_pytest=False, pytest_args="-x")
    ctx = gc.Ctx(args, "cuda", gc.Sizes(), tmp_path, tmp_path, budget=100)
    calls = []

    def fake_run(cmd, **kw):
        calls.append((cmd, kw))
        return subprocess.CompletedProcess(cmd, fake_run.rc, stdout=fake_run.out, stderr="")
    fake_run.rc, fake_run.out = 0, "....s\n6 passed, 1 skipped, 2 deselected in 12.30s\n"
    res = gc.part_pytest(ctx, run=fake_run)
    assert calls[0][0] == gc.pytest_command("-x") and calls[0][1]["cwd"] == str(REPO) and calls[0][1]["timeout"] == 98
    assert "status" not in res and res["counts"] == {"passed": 6, "skipped": 1, "deselected": 2}
    fake_run.rc, fake_run.out = 1, "F.\n1 failed, 1 passed in 3.0s\n"
    res = gc.part_pytest(ctx, run=fake_run)
    assert res["status"] == "failed" and "exit status 1" in res["reason"] and res["counts"]["failed"] == 1
    args.tiny = True                                   # the dry run skips it unless --run-pytest
    assert gc.part_pytest(ctx, run=fake_run)["status"] == "skipped"
    args.run_pytest = True
    assert "status" not in gc.part_pytest(ctx, run=lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, "1 passed", ""))


def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path, monkeypatch, capsys):
    gc = load_gpu_check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main(["--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0] and not (tmp_path / "o").exists()
    assert gc.main(["--device", "cpu", "--out", str(tmp_path / "o")]) == 2      # full sizes on CPU: refused


# ---- CUDA ----------------------------------------------------------------------------------------

@pytest.fixture
def no_tf32():
    """fp32 matmuls and convolutions as on the CPU (extraction turns TF32 on for the whole process)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def tiny(monkeypatch):
    from test_extract import tiny_spec
    monkeypatch.setitem(backbones.BACKBONES, "tiny", tiny_spec())
    return "tiny"


@cuda_test
def test_extract_on_cuda_matches_cpu(tmp_path, tiny):
    from pipeline.cache import readers
    from test_extract import make_records, run
    recs = make_records(tmp_path, n=12, bad=(5,))
    a = run(recs, tmp_path / "cpu.h5", device="cpu", skip_bad=True).path
    b = run(recs, tmp_path / "cuda.h5", device="cuda", skip_bad=True).path
    sa, sb = readers.FeatureStore.open(a), readers.FeatureStore.open(b)
    assert np.array_equal(sa.bad, sb.bad) and sa.bad.sum() == 1
    fa, fb = sa.load_features().astype(np.float32), sb.load_features().astype(np.float32)
    np.testing.assert_allclose(fb, fa, rtol=0, atol=0.01 * np.abs(fa).max())    # TF32 convolutions on CUDA


@cuda_test
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_input_path_on_cuda_close_to_pil_path(flickr_paths, name):
    """nvjpeg (hardware engines for baseline JPEGs) vs Pillow's libjpeg-turbo: IDCT and chroma upsampling
    differ, so a few grey levels here and there; the mean stays well under one level."""
    m, fa, fb = compare(flickr_paths, CASES[name], "cuda", name)
    assert m["fast"] == len(flickr_paths)
    assert m["mean_levels"] <= 3 and m["fraction_over_8"] <= 0.05        # max_levels: printed, not bounded
    np.testing.assert_allclose(fa.astype(np.float32), fb.astype(np.float32), rtol=0, atol=0.1 * m["feature_max_abs"])


@cuda_test
def test_gpu_input_path_on_cuda_odd_files_like_cpu_path(tmp_path):
    worst, mean = check_like_cpu_path(odd_files(tmp_path / "odd", decoder_error=False), "cuda",
                                      imagenet_preprocessing(28))
    print(f"\n[cuda] odd files, the good ones: max {worst:.3g}, mean {mean:.3g} grey levels from the CPU path")
    assert mean <= 3


@cuda_test
def test_gpu_batches_on_the_current_cuda_device(flickr_paths):
    with gpu_batches(flickr_paths[:2], np.arange(2), caffe_preprocessing(224), 2, "cuda") as it:
        rows, x, errs, _ = next(it)
    assert x.is_cuda and x.device.index == torch.cuda.current_device() and x.dtype == torch.float32
    assert x.shape == (2, 3, 224, 224) and errs == ["", ""]


@cuda_test
def test_train_on_cuda_bf16_then_decode_on_cpu(tmp_path):
    from helpers_store import make_store
    from pipeline.config import DecoderConfig, TrainConfig
    from pipeline.decoder.decode import beam_search, greedy_decode
    from pipeline.training.runs import load_run
    from pipeline.cache.readers import FeatureStore
    from pipeline.training.train import train
    feats = make_store(tmp_path / "f.h5", {"train": 12, "val": 4}, L=16, C=8)
    cfg = TrainConfig(features=str(feats), epochs=1, batch_size=8, min_count=1, lr=3e-3, log_every=1000,
                      device="cuda")
    losses, lines = [], []
    res = train(cfg, DecoderConfig(embed_dim=12, hidden_dim=12, attention_dim=12), tmp_path / "run",
                echo=lines.append, on_step=lambda s, loss: losses.append((loss.device.type, loss.item())))
    assert res["stopped"] == "done" and res["epoch"] == 1 and losses
    assert all(d == "cuda" and math.isfinite(v) for d, v in losses)
    assert any("device cuda" in line and "features in memory" in line for line in lines), lines
    r = load_run(tmp_path / "run", device="cpu")
    assert next(r.model.parameters()).device.type == "cpu"
    x = torch.from_numpy(FeatureStore.open(feats).load_features(np.arange(4)).astype(np.float32))
    toks, _ = greedy_decode(r.model, x, max_len=10)
    hyps = beam_search(r.model, x, beam=3, max_len=10)
    assert len(toks) == len(hyps) == 4 and all(math.isfinite(h.score) for h in hyps)


@cuda_test
def test_beam_search_on_cuda_equals_cpu(no_tf32):
    from pipeline.decoder.decode import beam_search, greedy_decode
    from pipeline.decoder.model import Decoder, DecoderConfig
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(embed_dim=32, hidden_dim=32, attention_dim=32), 40, 16).eval()
    feats = torch.rand(6, 16, 16)
    cpu = beam_search(model, feats, beam=3, max_len=12)
    gpu = beam_search(model.to("cuda"), feats.to("cuda"), beam=3, max_len=12)
    assert [h.tokens for h in gpu] == [h.tokens for h in cpu]
    np.testing.assert_allclose([h.score for h in gpu], [h.score for h in cpu], rtol=1e-4, atol=1e-4)
    assert all(not h.alphas.is_cuda for h in gpu)
    assert greedy_decode(model, feats.to("cuda"), max_len=12)[0] == greedy_decode(model.cpu(), feats, max_len=12)[0]


@cuda_test
def test_caption_on_cuda(tmp_path, tiny, shapes_factory, no_tf32):
    from pipeline.cache import readers
    from pipeline.inference.caption import Encoder, caption_images, open_images
    from pipeline.config import CaptionConfig, DecoderConfig, TrainConfig
    from pipeline.data.datasets import load_records
    from pipeline.training.train import train
    from test_extract import run
    root = shapes_factory(6, 2, 2)
    recs = load_records("shapes", root)
    feats = run(recs, tmp_path / "f.h5").path
    train(TrainConfig(features=str(feats), epochs=1, batch_size=8, min_count=1, log_every=1000, device="cpu"),
          DecoderConfig(embed_dim=12, hidden_dim=12, attention_dim=12), tmp_path / "run", echo=lambda *_: None)
    paths = sorted((root / "images").glob("test_*.jpg"))
    prov = readers.FeatureStore.open(feats).provenance
    on_gpu = Encoder([prov], weights_dir=tmp_path, device="cuda")(open_images(paths))
    on_cpu = Encoder([prov], weights_dir=tmp_path, device="cpu")(open_images(paths))
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=0, atol=2e-3 * np.abs(on_cpu).max())
    got = caption_images(paths, tmp_path / "run", CaptionConfig(device="cuda", weights_dir=str(tmp_path)),
                         log=lambda *_: None)
    ref = caption_images(paths, tmp_path / "run", CaptionConfig(device="cpu", weights_dir=str(tmp_path)),
                         log=lambda *_: None)
    assert len(got) == len(ref) == len(paths) and all(c.path == r.path for c, r in zip(got, ref))
    assert all(c.alphas.shape[1] == 196 and not c.alphas.is_cuda and c.grid == (14, 14) for c in got)
    # features equal up to an fp16 rounding, so the best captions score the same (a near-tie between two
    # captions of a barely trained model may still pick the other one: compare scores, not strings)
    np.testing.assert_allclose([c.hypothesis.score for c in got], [c.hypothesis.score for c in ref], atol=1e-2)


@cuda_test
def test_fits_in_memory_on_cuda(tmp_path, monkeypatch):
    from helpers_store import make_store
    from pipeline.training import data as tdata
    from pipeline.cache.readers import FeatureStore
    st = FeatureStore.open(make_store(tmp_path / "f.h5", {"train": 8, "val": 4}))
    asked = []
    real = torch.cuda.mem_get_info
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or real(device))
    lines = []
    assert tdata.fits_in_memory(st, torch.device("cuda"), 1, lines.append) is True and lines == [] and asked
