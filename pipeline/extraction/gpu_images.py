"""Extraction input that a GPU does not wait for: JPEG bytes -> nvjpeg -> resize and normalise on the GPU.

The CPU input path (extract._Images in DataLoader workers) decodes with Pillow, resizes, normalises in
numpy and ships (3, H, W) float32 tensors through shared memory and pinned memory to the GPU: 0.6 MB per
224-px image, 2.4 MB per 448-px one. This path moves only the compressed bytes (~30 KB) off the CPU:

    reader threads (CPU)   read each file, sniff its JPEG header (`jpeg_header`)
        fast path          8-bit, 3-component, baseline/extended/progressive JPEG ending with EOI
                           -> the bytes, as a uint8 tensor
        anything else      PNG, gray or CMYK JPEG, 12-bit, arithmetic-coded, truncated, unreadable, missing
                           -> `pil_item`: exactly what extract._Images does (backbones.preprocess_image, or
                              a zero image and "ErrorType: message" for a bad image)
    decode thread          torchvision.io.decode_jpeg(list of bytes, device) -> uint8 (3, h, w) on `device`
                           (nvjpeg on CUDA: the hardware JPEG engines for baseline JPEGs); when the batch
                           call fails, images are decoded one by one and the ones refused go to `pil_item`
                           `preprocess_uint8`: `resize_like_pil` + scale, channel order, mean/std as tensor ops
    consumer               (rows (B,) int64, x (B, 3, H, W) float32 on `device`, errs [B] str, '' = good)

which is the contract of the batches of extract's DataLoader (extract._collate), so extraction swaps one
iterator for the other (docs/gpu.md). Batches come in the order of `rows`. The decode thread works one
or two batches ahead of the consumer, so on a GPU the decode of batch k+1 (NVJPG engines) overlaps the
network on batch k (SMs); its small preprocessing kernels run on the same (default) stream as the network.

Same cache as the CPU path: Pillow's resize is a separable filter (two 1-D passes, each
rounded to uint8, in the order Pillow picks) in 22-bit fixed-point integer arithmetic; `resize_like_pil`
computes exactly that with int32 tensor ops (Pillow's taps and weights, `pil_coefficients`), so it equals
Pillow bit for bit for any size, up or down, bilinear or bicubic. (Float resizes, even torch's antialiased
interpolate in float64, differ from Pillow by one grey level on up to ~4% of the values: Pillow's 22-bit
weights break exact .5 ties.) `normalize` is the float32 arithmetic of backbones.preprocess_image in
the same order. So on CPU, where torchvision and Pillow both decode with libjpeg-turbo, the preprocessed
tensors are identical (measured on Flickr8k for 224->224, 224->448, 224->28 and on a 500x375->224 photo;
tests/test_cuda.py). On CUDA only the decoder differs: nvjpeg's IDCT and chroma upsampling are not
libjpeg-turbo's, a few grey levels here and there (gpu_check reports by how much, docs/gpu.md).

The module runs on CPU too (decode_jpeg on CPU): that is how its tests run without a GPU.
"""
from __future__ import annotations

import functools
import math
import os
import queue
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from pipeline.errors import UserError

DECODE_CHOICES = ("auto", "cpu", "gpu")
_FAST_SOF = (0xC0, 0xC1, 0xC2)          # baseline, extended sequential, progressive (Huffman)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_TV_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"


def resolve_decode(decode: str, device: str) -> str:
    """`--decode auto|cpu|gpu` -> 'cpu' (Pillow in DataLoader workers) or 'gpu' (this module).

    auto: gpu when extraction runs on CUDA. gpu on a CPU device runs this module's path with the CPU
    JPEG decoder (the same cache; used by the tests)."""
    if decode not in DECODE_CHOICES:
        raise UserError(f"--decode {decode}: choose auto, cpu or gpu.")
    if decode == "auto":
        return "gpu" if str(device).startswith("cuda") else "cpu"
    if decode == "gpu":
        check_available()
    return decode


def check_available() -> None:
    """One UserError when this torchvision cannot decode JPEGs (built without its image extension)."""
    from torchvision.io import image as tv_image
    if not tv_image._has_image_ops():
        raise UserError("--decode gpu: this torchvision was built without its image extension "
                        "(torchvision.io.decode_jpeg is unavailable). Use --decode cpu, or reinstall "
                        "torchvision==0.29.1 from PyPI.")


# ---- the JPEG header ---------------------------------------------------------------------------------

class JpegHeader(NamedTuple):
    sof: int                # the frame marker, e.g. 0xC0 baseline, 0xC2 progressive
    precision: int          # bits per sample
    height: int
    width: int
    components: int         # 1 gray, 3 YCbCr (or RGB), 4 CMYK/YCCK
    adobe_transform: int | None   # APP14 "Adobe" colour transform flag (0: no YCbCr transform), None if absent
    component_ids: tuple = ()     # b"RGB" ids mean RGB-coded for libjpeg
    scan_start: int = -1          # offset of the first scan's entropy-coded data (-1: no scan found)


_SCAN_MARKERS = np.zeros(256, bool)     # what may follow 0xFF inside and between scans
_SCAN_MARKERS[[0x00, 0xFF, 0xC4, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xD0, 0xD8), *range(0xE0, 0xF0)]] = True


def jpeg_header(data: bytes) -> JpegHeader | None:
    """Walk the marker segments up to the first scan (SOS); None when `data` is not a JPEG, is malformed,
    or has no frame header (SOFn) before its first scan."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, n, adobe, frame = 2, len(data), None, None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF:                                   # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD7:              # standalone markers
            i += 2
            continue
        if m == 0xD9:                                   # EOI before any scan
            return None
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2:
            return None
        if m == 0xEE and data[i + 4:i + 9] == b"Adobe" and i + 15 < n:
            adobe = data[i + 15]
        if m in _SOF and frame is None:
            if i + 10 > n:
                return None
            nc = data[i + 9]
            ids = tuple(data[i + 10 + 3 * c] for c in range(nc) if i + 10 + 3 * c < n)
            frame = (m, data[i + 4], (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8], nc, ids)
        if m == 0xDA:                                   # the first scan: the header is complete
            if frame is None:
                return None
            m_, p, h, w, nc, ids = frame
            return JpegHeader(m_, p, h, w, nc, adobe, ids, min(i + 2 + length, n))
        i += 2 + length
    return None


def scan_markers_ok(data: bytes, start: int) -> bool:
    """Inside entropy-coded data a 0xFF byte is followed by 0x00 (stuffing), a restart marker, or the next
    segment's marker. Anything else is damage that libjpeg (hence the CPU path) refuses but a hardware
    decoder might turn into pixels. A cheap check: one vectorised pass over the bytes."""
    a = np.frombuffer(data, np.uint8)[start:]
    ff = np.flatnonzero(a[:-1] == 0xFF)
    return bool(_SCAN_MARKERS[a[ff + 1]].all())


def fast_path_refusal(data: bytes) -> str:
    """'' when the tensor decoder takes these bytes; else why they go to Pillow instead.

    Only what both decoders read the same way goes the fast way: 8-bit 3-component JPEGs (YCbCr, not
    RGB-coded: Adobe transform 0 or component ids R, G, B) in Huffman baseline/extended/progressive coding,
    within Pillow's decompression-bomb limit (Pillow refuses or warns above it), ending with EOI and
    without stray markers in the scan data (damage Pillow refuses on the CPU path, so it must be refused
    here too: the CPU path's verdict on an image must stand)."""
    from PIL import Image
    h = jpeg_header(data)
    if h is None:
        return "not a JPEG"
    if h.sof not in _FAST_SOF:
        return f"JPEG coding 0x{h.sof:02X}"
    if h.precision != 8:
        return f"{h.precision}-bit JPEG"
    if h.components != 3:
        return {1: "grayscale JPEG", 4: "CMYK JPEG"}.get(h.components, f"{h.components}-component JPEG")
    if h.adobe_transform == 0 or h.component_ids == tuple(b"RGB"):
        return "RGB-coded JPEG"
    if h.width < 1 or h.height < 1:
        return "JPEG without a size"
    limit = Image.MAX_IMAGE_PIXELS
    if limit and h.width * h.height > limit:
        return "larger than Pillow's MAX_IMAGE_PIXELS"
    if data.rstrip(b"\0")[-2:] != b"\xff\xd9":
        return "no EOI marker (truncated)"
    if not scan_markers_ok(data, h.scan_start):
        return "damaged scan data (stray marker)"
    return ""


# ---- the CPU path, image by image --------------------------------------------------------------------

def pil_item(path: str, pp: dict):
    """(x (3, H, W) float32, '') or (zeros, 'ErrorType: message'): what extract._Images gives for `path`."""
    import torch
    from PIL import Image
    from pipeline.extraction.backbones import preprocess_image
    try:
        with Image.open(path) as im:
            im.load()
            x = preprocess_image(im, pp)
        return x, ""
    except Exception as e:   # noqa: BLE001 - any decode failure makes the image "bad", as extract._Images
        h, w = pp["resize"]
        return torch.zeros(3, h, w), f"{type(e).__name__}: {e}"


# ---- tensor preprocessing (any device) ------------------------------------------------------------

PRECISION_BITS = 22       # Pillow's fixed-point resampling (libImaging/Resample.c: 32 - 8 - 2)


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _bicubic(x: float) -> float:
    a, x = -0.5, abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


_FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0)}


@functools.lru_cache(maxsize=512)
def pil_coefficients(in_size: int, out_size: int, resample: str = "bilinear") -> tuple[np.ndarray, np.ndarray]:
    """Pillow's resampling taps for one axis: (index (out, K) int64, weight (out, K) int32 in 2**-22 units).

    Pillow's precompute_coeffs + normalize_coeffs_8bpc, step for step: the filter's support grows with the
    downscale factor (antialiasing), the double weights are normalised per output pixel and rounded to
    22-bit fixed point. Unused taps have weight 0 (and a valid index)."""
    if resample not in _FILTERS:
        raise UserError(f"preprocessing resample {resample!r}: the tensor path knows bilinear and bicubic. "
                        f"Use --decode cpu for this backbone.")
    fn, fsupport = _FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = fsupport * filterscale
    K = int(math.ceil(support)) * 2 + 1
    idx = np.zeros((out_size, K), np.int64)
    kk = np.zeros((out_size, K), np.int32)
    one = 1 << PRECISION_BITS
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [fn((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = sum(w)
        for x in range(xmax):
            k = w[x] / ww if ww != 0.0 else w[x]
            kk[xx, x] = int(-0.5 + k * one) if k < 0 else int(0.5 + k * one)
            idx[xx, x] = xmin + x
        idx[xx, xmax:] = min(xmin, in_size - 1)
    return idx, kk


def _resample_axis(x, out_size: int, dim: int, resample: str):
    """One Pillow pass along `dim` (2: rows, 3: columns) of x (N, C, h, w) int32 0..255, in Pillow's integer
    arithmetic: start at 2**21, add pixel * weight per tap, shift right by 22, clip to 0..255."""
    import torch
    idx, kk = pil_coefficients(int(x.shape[dim]), int(out_size), resample)
    idx = torch.from_numpy(idx).to(x.device)
    kk = torch.from_numpy(kk).to(x.device)
    shape = list(x.shape)
    shape[dim] = out_size
    acc = torch.full(shape, 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=x.device)
    for k in range(idx.shape[1]):
        w = kk[:, k].view(-1, 1) if dim == 2 else kk[:, k]
        acc += x.index_select(dim, idx[:, k]) * w
    return (acc >> PRECISION_BITS).clamp_(0, 255)


@functools.lru_cache(maxsize=1)
def pillow_orders_passes() -> bool:
    """Whether the installed Pillow runs the vertical pass first when the height shrinks more than twice as
    much as the width (Pillow 13's ImagingResampleInner does; older ones always go horizontal first).
    Decided once by resizing a 40x20 probe both ways and comparing with Pillow itself."""
    from PIL import Image
    import torch
    a = np.random.default_rng(0).integers(0, 256, (40, 20, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(a).resize((50, 30), Image.BILINEAR)).transpose(2, 0, 1)
    x = torch.from_numpy(a.transpose(2, 0, 1).copy())[None].to(torch.int32)
    v_first = _resample_axis(_resample_axis(x, 30, 2, "bilinear"), 50, 3, "bilinear")[0].numpy()
    return bool(np.array_equal(v_first, want))


def vertical_first(h: int, w: int, H: int, W: int) -> bool:
    """Pillow's pass order for (h, w) -> (H, W): vertical first when the height shrinks by more than twice
    the width's shrink, in pixels (Pillow >= the version that `pillow_orders_passes` detects)."""
    return pillow_orders_passes() and (h - H) > 0 and (h - H) > (w - W) * 2


def resize_like_pil(x, size: Sequence[int], resample: str = "bilinear"):
    """x (N, 3, h, w) uint8 (or integer-valued) -> (N, 3, H, W) float32 with the values of Pillow's
    `Image.resize((W, H), BILINEAR | BICUBIC)` on the same pixels, bit for bit: two passes (in Pillow's
    order, `vertical_first`), each in Pillow's 8-bit fixed-point arithmetic (`pil_coefficients`) and
    clipped to uint8. Same size: unchanged (Pillow returns a copy). Any device; int32 tensor ops only."""
    import torch
    H, W = int(size[0]), int(size[1])
    h, w = (int(v) for v in x.shape[-2:])
    if (h, w) == (H, W):
        return x.float()
    x = x.to(torch.int32)
    passes = [(W, 3), (H, 2)] if not vertical_first(h, w, H, W) else [(H, 2), (W, 3)]
    for n, dim in passes:
        if x.shape[dim] != n:
            x = _resample_axis(x, n, dim, resample)
    return x.float()


def normalize(x, pp: dict):
    """x (N, 3, H, W) float32 RGB 0..255 -> the backbone's input: * scale/255, channel order, (x - mean) / std.
    The float32 operations of backbones.preprocess_image, in the same order (same values on CPU)."""
    import torch
    x = x * (float(pp["scale"]) / 255.0)
    if pp["channels"] == "BGR":
        x = x.flip(1)
    elif pp["channels"] != "RGB":
        raise UserError(f"preprocessing channels {pp['channels']!r}: expected RGB or BGR.")
    mean = torch.tensor(pp["mean"], dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pp["std"], dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess_uint8(images: Sequence, pp: dict):
    """Decoded images, a list of uint8 (3, h_i, w_i) tensors on one device -> (N, 3, H, W) float32 there.
    Images of one size are resized in one call (a dataset of equal sizes: one call per batch)."""
    import torch
    H, W = pp["resize"]
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape[-2:]), []).append(i)
    if len(groups) == 1:
        return normalize(resize_like_pil(torch.stack(list(images)), (H, W), pp["resample"]), pp)
    out = torch.empty(len(images), 3, H, W, dtype=torch.float32, device=images[0].device)
    for idx in groups.values():
        x = resize_like_pil(torch.stack([images[i] for i in idx]), (H, W), pp["resample"])
        out[torch.tensor(idx, device=out.device)] = normalize(x, pp)
    return out


def decode_many(datas: Sequence, device) -> list:
    """JPEG byte tensors -> uint8 (3, h, w) tensors on `device`, None for each one the decoder refuses.

    One batched call (nvjpeg decodes a list in one go on CUDA); it returns nothing when one image fails,
    so a failed batch is decoded again one image at a time to find the culprit(s)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    if not datas:
        return []
    warnings.filterwarnings("ignore", message=_TV_DEPRECATION, category=DeprecationWarning)
    try:
        out = decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        out = []
        for d in datas:
            try:
                out.append(decode_jpeg([d], mode=ImageReadMode.RGB, device=device)[0])
            except RuntimeError:
                out.append(None)
    return [o if o is not None and o.dim() == 3 and o.shape[0] == 3 else None for o in out]


# ---- the iterator ------------------------------------------------------------------------------------

@dataclass
class _Read:
    """One image after the reader: JPEG bytes for the fast path, or the CPU path's result."""
    row: int
    data: object = None        # uint8 (n,) CPU tensor of the file's bytes (fast path)
    x: object = None           # (3, H, W) float32 (the CPU path, done in the reader thread)
    err: str = ""


@dataclass
class DecodeStats:
    """What happened to the images so far (reported by `pipeline extract` and gpu_check)."""
    fast: int = 0              # decoded by the tensor decoder (nvjpeg on CUDA)
    pil: int = 0               # sent to the CPU path by their header (PNG, gray, CMYK, truncated, ...)
    pil_after_decode_error: int = 0   # the tensor decoder refused them; the CPU path decided
    bad: int = 0               # unreadable: zero image + error message, as the CPU path
    refusals: dict = field(default_factory=dict)   # reason -> count (header refusals)
    decode_s: float = 0.0      # decode thread: seconds in the decoder
    preprocess_s: float = 0.0  # decode thread: seconds launching resize/normalise (asynchronous on CUDA)

    def as_dict(self) -> dict:
        return {"fast": self.fast, "pil": self.pil, "pil_after_decode_error": self.pil_after_decode_error,
                "bad": self.bad, "refusals": dict(self.refusals), "decode_s": round(self.decode_s, 3),
                "preprocess_s": round(self.preprocess_s, 3)}


_DONE = object()


class GpuBatches:
    """Iterator of (rows (B,) int64, x (B, 3, H, W) float32 on `device`, errs list[str]) over `rows`.

    Start it, iterate, and `close()` it (or use it as a context manager) when stopping early: close stops
    the reader and decode threads. An unexpected error in a thread (CUDA out of memory, ...) is raised by
    the next `next()`. Bad images never raise: they come with a zero image and their error, as on the CPU
    path. See the module docstring for the stages.
    """

    def __init__(self, paths: Sequence[str], rows, preprocessing: dict, batch_size: int, device="cuda", *,
                 threads: int | None = None, prefetch: int = 2):
        import torch
        if batch_size < 1:
            raise UserError(f"--batch-size {batch_size}: must be >= 1.")
        self.paths, self.pp, self.batch_size = paths, dict(preprocessing), int(batch_size)
        self.rows = np.asarray(rows, dtype=np.int64)
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:   # the caller's current GPU (torchrun: its local rank)
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self.threads = max(1, int(threads if threads is not None else min(8, os.cpu_count() or 1)))
        self.stats = DecodeStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="gpu_images-read")
        self._thread = threading.Thread(target=self._decode_loop, name="gpu_images-decode", daemon=True)
        self._finished = False
        self._thread.start()

    # -- consumer side -----------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        item = self._q.get()
        if item is _DONE:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        """Stop the threads (idempotent); batches not yet taken are dropped."""
        self._finished = True
        self._stop.set()
        while True:                      # unblock a decode thread waiting on a full queue
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:   # noqa: BLE001 - interpreter shutdown
            pass

    # -- reader threads ----------------------------------------------------------------------------
    def _read_batch(self, rows: np.ndarray) -> list[_Read]:
        import torch
        out = []
        for r in rows:
            r = int(r)
            path = self.paths[r]
            try:
                with open(path, "rb") as f:
                    data = f.read()
                why = fast_path_refusal(data)
            except OSError:
                data, why = None, "unreadable file"
            if data is not None and not why:
                out.append(_Read(r, data=torch.frombuffer(bytearray(data), dtype=torch.uint8)))
            else:
                x, err = pil_item(path, self.pp)
                with self._lock:
                    self.stats.pil += 1
                    self.stats.refusals[why] = self.stats.refusals.get(why, 0) + 1
                out.append(_Read(r, x=x, err=err))
        return out

    # -- decode thread -----------------------------------------------------------------------------
    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _decode_loop(self):
        import torch
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)      # a new thread starts on GPU 0
            starts = range(0, len(self.rows), self.batch_size)
            ahead = self.threads + 1                    # read batches in flight
            futures = []
            it = iter(starts)
            for s in it:
                futures.append(self._pool.submit(self._read_batch, self.rows[s:s + self.batch_size]))
                if len(futures) >= ahead:
                    break
            while futures and not self._stop.is_set():
                items = futures.pop(0).result()
                s = next(it, None)
                if s is not None:
                    futures.append(self._pool.submit(self._read_batch, self.rows[s:s + self.batch_size]))
                if not self._put(self._assemble(items)):
                    return
            self._put(_DONE)
        except BaseException as e:   # noqa: BLE001 - handed to the consumer
            self._put(e)

    def _assemble(self, items: list[_Read]):
        """One batch: decode the fast ones, preprocess on the device, put the CPU-path ones in place."""
        import torch
        H, W = self.pp["resize"]
        fast = [i for i, it in enumerate(items) if it.data is not None]
        t0 = time.perf_counter()
        decoded = decode_many([items[i].data for i in fast], self.device)
        t1 = time.perf_counter()
        ok = []
        for i, img in zip(fast, decoded):
            if img is None:             # the tensor decoder refused it: the CPU path decides
                items[i].x, items[i].err = pil_item(self.paths[items[i].row], self.pp)
                items[i].data = None
                with self._lock:
                    self.stats.pil_after_decode_error += 1
            else:
                ok.append((i, img))
        n_fast = len(ok)
        if n_fast == len(items):
            x = preprocess_uint8([img for _, img in ok], self.pp)
        else:
            x = torch.empty(len(items), 3, H, W, dtype=torch.float32, device=self.device)
            if ok:
                x[torch.tensor([i for i, _ in ok], device=self.device)] = preprocess_uint8([m for _, m in ok],
                                                                                             self.pp)
            slow = [i for i, it in enumerate(items) if it.data is None]
            cpu = torch.stack([items[i].x for i in slow])
            x[torch.tensor(slow, device=self.device)] = cpu.to(self.device, non_blocking=False)
        t2 = time.perf_counter()
        errs = [it.err for it in items]
        with self._lock:
            self.stats.fast += n_fast
            self.stats.bad += sum(1 for e in errs if e)
            self.stats.decode_s += t1 - t0
            self.stats.preprocess_s += t2 - t1
        rows = np.array([it.row for it in items], np.int64)
        return rows, x, errs


def gpu_batches(paths: Sequence[str], rows, preprocessing: dict, batch_size: int, device="cuda", *,
                threads: int | None = None, prefetch: int = 2) -> GpuBatches:
    """Batches of `rows` (indices into `paths`) preprocessed by `preprocessing` (a backbone's dict) on
    `device`: an iterator of (rows (B,) int64, x (B, 3, H, W) float32 on device, errs list[str]), the
    contract of extract's DataLoader batches. `threads` file readers (default min(8, CPUs)) work up to
    threads + 1 batches ahead; `prefetch` decoded batches wait on the device. Close it when stopping early."""
    return GpuBatches(paths, rows, preprocessing, batch_size, device, threads=threads, prefetch=prefetch)
