"""--device auto|cpu|cuda -> the device to use, with one clear error when CUDA is asked for but absent."""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import UserError


def resolve_device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: choose auto, cpu or cuda.")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible here. Use --device cpu or auto.")
    return name


def cpu_has_fast_bf16() -> bool:
    """A CPU with bf16 matrix units (AMX) or AVX-512 bf16 instructions, where bf16 matmuls pay (the VGG19
    trunk 3.7x fp32 on an AMX Xeon, 2.0x on an AVX-512 bf16 EPYC); elsewhere oneDNN emulates bf16, far
    slower than fp32 (0.35 against 132 GFLOP/s on an AVX2 EPYC)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD -1, M_TOP_PAD -2, M_MMAP_THRESHOLD -3, M_MMAP_MAX -4.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_MMAP_MAX = 32 << 20        # glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)
_tuned = {"steps": False, "large": False}


def tune_cpu_allocator(large: bool = False) -> bool:
    """Keep freed memory for reuse instead of handing it back to the OS after every batch (glibc only).

    A training step on CPU allocates a few dozen (B, L, A) tensors of 10-30 MB (attention buffers,
    their gradients) and frees them at the end of the step. glibc serves such sizes with mmap, or trims them
    off its heap, so every step page-faults them in again (zero-filled by the kernel: ~10 ms per 25 MB on
    this 2-core machine, measured in the fused attention kernel). With the mmap threshold at its maximum
    (32 MB) and no trimming, the next step reuses the same pages: +20% captions/s on one thread
    (benchmarks/bench_train.py). The cost: the process keeps its peak heap until it exits.

    large=True (`pipeline extract`, `caption`, `serve` on a CPU: cli._reuse_freed_memory) also serves blocks above
    32 MB from the heap (mmap off), so a backbone's activations are reused from batch to batch too:
    EfficientNet-Lite2 at 448 px (its expansion layers hold 4 x 96 x 224 x 224 floats = 77 MB at batch 4)
    page-faulted 1.1 M times in 6 batches, half its CPU time in the kernel, and none with large=True
    (docs/features.md "The allocator (CPU)"). The cost: a freed block goes back to the OS only from the heap's top,
    so the process keeps its peak memory until it exits.
    Idempotent; returns whether it applied (False off glibc or where mallopt refuses)."""
    if not _tuned["steps"]:
        _tuned["steps"] = _mallopt(((_M_MMAP_THRESHOLD, _MMAP_MAX), (_M_TRIM_THRESHOLD, 1 << 30),
                                    (_M_TOP_PAD, 64 << 20)))
    if large and _tuned["steps"] and not _tuned["large"]:
        _tuned["large"] = _mallopt(((_M_MMAP_MAX, 0),))
    return _tuned["large"] if large else _tuned["steps"]


def _mallopt(settings) -> bool:
    """glibc's mallopt(param, value) for each pair; False off glibc or when one is refused."""
    import ctypes
    import ctypes.util
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(p, v) == 1 for p, v in settings)
