"""Extraction input that a GPU does not wait for: JPEG bytes -> nvjpeg -> resize and normalise on the GPU.

The CPU input path (extract._Images in DataLoader workers) decodes with Pillow, resizes, normalises in
numpy and ships (3, H, W) float32 tensors through shared memory and pinned memory to the GPU: 0.6 MB per
224-px image, 2.4 MB per 448-px one. This path moves only the compressed bytes (~30 KB) off the CPU:

    reader threads (CPU)   read each file, sniff its JPEG header (`jpeg_header`)
        fast path          8-bit, 3-component, baseline/extended/progressive JPEG ending with EOI
                           -> the bytes, as a uint8 tensor
        anything else      PNG, gray or CMYK JPEG, 12-bit, arithmetic-coded, truncated, unreadable, missing
                           -> `backbones.open_image`, the function the CPU path's workers call (Pillow
                              and backbones.preprocess_image, or a zero image and "ErrorType: message")
    decode thread          torchvision.io.decode_jpeg(list of bytes, device) -> uint8 (3, h, w) on `device`
                           (nvjpeg on CUDA: the hardware JPEG engines for baseline JPEGs); when the batch
                           call fails, images are decoded one by one and the ones refused go to `open_image`
                           `preprocess_uint8`: `resize_like_pil` + scale, channel order, mean/std as tensor ops
                           (pil_resize.py)
    consumer               backbones.Batch(rows (B,) int64, x (B, 3, H, W) float32 on `device`, errs [B] str,
                           '' = good, pictures [B]): the contract of extract's DataLoader batches

The stages are plain functions, testable without threads: `read_image` (one file, a reader thread) and
`assemble_batch` (one batch, the decode thread); `GpuBatches` runs them on a `prefetch.Prefetcher`.
Batches come in the order of `rows`. The decode thread works one or two batches ahead of the consumer,
so on a GPU the decode of batch k+1 (NVJPG engines) overlaps the network on batch k (SMs); its small
preprocessing kernels run on the same (default) stream as the network.

Same cache as the CPU path: `resize_like_pil` is Pillow's resize bit for bit and `normalize` the
float32 arithmetic of backbones.preprocess_image in the same order (pil_resize.py). So on CPU, where torchvision and Pillow both decode with libjpeg-turbo, the preprocessed
tensors are identical (measured on Flickr8k for 224->224, 224->448, 224->28 and on a 500x375->224 photo;
tests/test_cuda.py). On CUDA only the decoder differs: nvjpeg's IDCT and chroma upsampling are not
libjpeg-turbo's, a few grey levels here and there (gpu_check reports by how much, docs/gpu.md).

The module runs on CPU too (decode_jpeg on CPU): that is how its tests run without a GPU.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from pipeline.cache.identity import Picture, read_picture
from pipeline.errors import UserError
from pipeline.extraction.backbones import Batch, open_image
from pipeline.extraction.pil_resize import preprocess_uint8
from pipeline.extraction.prefetch import Prefetcher

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


# ---- the two stages, as plain functions ----------------------------------------------------------------

@dataclass
class Read:
    """One image after the reader stage: JPEG bytes for the fast path, or the CPU path's result."""
    row: int
    data: object = None        # uint8 (n,) CPU tensor of the file's bytes (fast path)
    x: object = None           # (3, H, W) float32 (the CPU path, done in the reader thread)
    err: str = ""
    picture: Picture | None = None
    why: str = ""              # why the header sent it to the CPU path ('' = fast path)


def read_image(path: str, row: int, pp: dict) -> Read:
    """The reader stage for one file: its bytes read once (and recorded as a Picture); a JPEG the tensor
    decoder reads like Pillow keeps its bytes, anything else goes through `backbones.open_image` now."""
    import torch
    try:
        data, picture = read_picture(path)
        why = fast_path_refusal(data)
    except OSError:
        data, picture, why = None, None, "unreadable file"
    if data is not None and not why:
        return Read(row, data=torch.frombuffer(bytearray(data), dtype=torch.uint8), picture=picture)
    x, err, picture = open_image(path, pp, read=None if data is None else (data, picture))
    return Read(row, x=x, err=err, picture=picture, why=why)


def assemble_batch(items: Sequence[Read], pp: dict, device, paths: Sequence[str],
                   stats: "DecodeStats | None" = None) -> Batch:
    """The decode stage for one batch: decode the fast ones (`decode_many`), preprocess them on `device`,
    put the CPU-path ones in place. A file the tensor decoder refuses goes to `open_image` (same verdict
    as the CPU path). -> Batch in the order of `items`; `stats` counts what happened."""
    import torch
    stats = stats if stats is not None else DecodeStats()
    H, W = pp["resize"]
    for it in items:
        if it.data is None:
            stats.pil += 1
            stats.refusals[it.why] = stats.refusals.get(it.why, 0) + 1
    fast = [i for i, it in enumerate(items) if it.data is not None]
    t0 = time.perf_counter()
    decoded = decode_many([items[i].data for i in fast], device)
    t1 = time.perf_counter()
    ok = []
    for i, img in zip(fast, decoded):
        if img is None:             # the tensor decoder refused it: the CPU path decides
            it = items[i]
            it.x, it.err, it.picture = open_image(paths[it.row], pp, read=(it.data.numpy().tobytes(), it.picture))
            it.data = None
            stats.pil_after_decode_error += 1
        else:
            ok.append((i, img))
    if len(ok) == len(items) and ok:
        x = preprocess_uint8([img for _, img in ok], pp)
    else:
        x = torch.empty(len(items), 3, H, W, dtype=torch.float32, device=device)
        if ok:
            x[torch.tensor([i for i, _ in ok], device=device)] = preprocess_uint8([m for _, m in ok], pp)
        slow = [i for i, it in enumerate(items) if it.data is None]
        if slow:
            x[torch.tensor(slow, device=device)] = torch.stack([items[i].x for i in slow]).to(device)
    errs = [it.err for it in items]
    stats.fast += len(ok)
    stats.bad += sum(1 for e in errs if e)
    stats.decode_s += t1 - t0
    stats.preprocess_s += time.perf_counter() - t1
    return Batch(np.array([it.row for it in items], np.int64), x, errs, [it.picture for it in items])


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


# ---- the iterator ------------------------------------------------------------------------------------

class GpuBatches(Prefetcher):
    """Iterator of backbones.Batch(rows (B,) int64, x (B, 3, H, W) float32 on `device`, errs, pictures)
    over `rows`: `read_image` on `threads` reader threads (up to threads + 1 batches ahead), `assemble_batch`
    on the decode thread (`prefetch` batches ahead of the consumer).

    Iterate, and `close()` it (or use it as a context manager) when stopping early. An unexpected error in
    a thread (CUDA out of memory, ...) is raised by the next `next()`. Bad images never raise: they come
    with a zero image and their error, as on the CPU path.
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
        self.stats = DecodeStats()
        threads = max(1, int(threads if threads is not None else min(8, os.cpu_count() or 1)))
        jobs = (self.rows[s:s + self.batch_size] for s in range(0, len(self.rows), self.batch_size))
        super().__init__(jobs, self._read_batch, self._assemble, threads=threads, ahead=threads + 1,
                         depth=prefetch, setup=self._setup, name="gpu_images")

    def _setup(self) -> None:
        import torch
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)      # a new thread starts on GPU 0

    def _read_batch(self, rows: np.ndarray) -> list[Read]:
        return [read_image(self.paths[int(r)], int(r), self.pp) for r in rows]

    def _assemble(self, items: list[Read]) -> Batch:
        return assemble_batch(items, self.pp, self.device, self.paths, self.stats)


def gpu_batches(paths: Sequence[str], rows, preprocessing: dict, batch_size: int, device="cuda", *,
                threads: int | None = None, prefetch: int = 2) -> GpuBatches:
    """Batches of `rows` (indices into `paths`) preprocessed by `preprocessing` (a backbone's dict) on
    `device`: an iterator of backbones.Batch, the contract of extract's DataLoader batches. `threads` file
    readers (default min(8, CPUs)) work up to threads + 1 batches ahead; `prefetch` decoded batches wait on
    the device. Close it when stopping early."""
    return GpuBatches(paths, rows, preprocessing, batch_size, device, threads=threads, prefetch=prefetch)
