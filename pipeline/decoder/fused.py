"""Fused CPU kernels for the attention score e_ti = w^T tanh(att_a_i + q) and its backward (training, fp32).

Why: in a training step on CPU the (B, L, A) attention tensor (64 x 196 x 512 fp32 = 25.7 MB) dominates.
Eager PyTorch passes over it about 14 times per decoding step (add, tanh, matvec forward; matmul for dw,
tanh_backward, scale by w, sum over L, and autograd's accumulation of the gradient of att_a backward),
each pass memory-bound. These two kernels pass over it 5 times:

    forward   one pass: read att_a, write t = tanh(att_a + q) (kept for backward), e = t @ w on the fly
    backward  one pass: read t, d = de (1 - t^2) w  added in place into ONE gradient buffer for att_a that
              every step of the caption shares (no per-step (B, L, A) gradient), dq = sum_i d and
              dw = sum_bi de t accumulated in registers / L1 on the way

The gradient buffer: `attention.prepare` wraps att_a (once per batch, `Decoder.init_state`) in `_Sink`,
an identity whose backward hands autograd the buffer the steps filled. The numbers equal the eager step's
to float32 rounding (tests/test_fused.py); only the summation order differs.

Groups (SCST: the K samples of an image share its att_a row, `Decoder.sample`): state row r reads image
r // K's row, which a thread reads from memory once for its K rows; t (B K, L, A: 128 MB at 64 x 5) is not
kept but recomputed by backward, which adds each image's K gradients into its one row of the buffer.
Cross-entropy (groups 1) keeps t: there keeping is the faster (7.3 against 11.7 ms of thread time for
forward + backward at 64 x 196 x 512, one thread).

Build: the C++ below is compiled at first use by the C++ toolchain PyTorch's inductor uses on CPU (the
machine's g++, OpenMP, the vector ISA it detects), cached under its cache dir (seconds, once per machine).
Without a compiler (or with PIPELINE_EAGER_STEP=1, `set_eager`) `available()` is False and the eager kernels run:
same numbers, slower. Float64 (parity tests), bf16 autocast and CUDA always use the eager path.
"""
from __future__ import annotations

import os
import threading
import warnings

import torch

_PRELUDE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
using Vec = at::vec::Vectorized<float>;
static constexpr int64_t V = Vec::size();
// tanh x = 1 - 2 / (exp(2x) + 1): Sleef's exp is 5x faster here than its tanh (u10), and the result is
// within 2.4e-7 (4 ulp of 1) of torch.tanh; +-inf exp gives exactly +-1.
static inline Vec tanh_(Vec x) { return Vec(1.f) - Vec(2.f) / ((x + x).exp() + Vec(1.f)); }
"""

# forward: e[s, i] = sum_a w[a] tanh(P[s / G, i, a] + q[s, a]) for state row s = b * G + g (G rows of q share
# image b's P: the K samples of an image in SCST); t[s, i, a] = the tanh, written only when `store` (else
# backward recomputes it). Row r = s * L + i: a thread's rows are consecutive, so an image's P (L x A, 400 KB at
# 196 x 512) is read from memory once for its G rows and then from cache.
_FORWARD = _PRELUDE + r"""
extern "C" void kernel(const float* P, const float* q, const float* w, float* e, float* t,
                       int64_t B, int64_t G, int64_t L, int64_t A, int64_t store, int64_t nt)
{
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < B * G * L; ++r) {
        const int64_t s = r / L, i = r - s * L;
        const float* p = P + ((s / G) * L + i) * A;
        const float* qs = q + s * A;
        float* tr = t + (store ? r * A : 0);
        Vec acc(0.f);
        for (int64_t a = 0; a < A; a += V) {
            const int64_t n = A - a < V ? A - a : V;
            Vec y = tanh_(Vec::loadu(p + a, n) + Vec::loadu(qs + a, n));
            if (store) y.store(tr + a, n);
            acc = at::vec::fmadd(y, Vec::loadu(w + a, n), acc);
        }
        e[r] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
    }
}
"""

# backward: d[s, i, a] = de[s, i] (1 - t^2) w[a], t as stored, or recomputed from P and q (`recompute`);
# Gr[b, i] (+)= sum_g d[b * G + g, i] (image b's rows; written when not `accumulate`, else added to);
# dq[s] = sum_i d[s, i]; dwp[thread] += de t. dq (B * G, A) and dwp (nt, A) arrive zeroed. Parallel over
# images: each thread owns its images' Gr rows, so no two threads write one.
_BACKWARD = _PRELUDE + r"""
template <bool RECOMPUTE, bool ADD>
static inline void row(const float* tr, const float* pr, const float* qs, const float* w, float de,
                       float* gr, float* dqs, float* dwl, int64_t A)
{
    const Vec gd(de);
    for (int64_t a = 0; a < A; a += V) {
        const int64_t n = A - a < V ? A - a : V;
        Vec tt = RECOMPUTE ? tanh_(Vec::loadu(pr + a, n) + Vec::loadu(qs + a, n)) : Vec::loadu(tr + a, n);
        Vec d = gd * Vec::loadu(w + a, n) * (Vec(1.f) - tt * tt);
        (ADD ? Vec::loadu(gr + a, n) + d : d).store(gr + a, n);
        (Vec::loadu(dqs + a, n) + d).store(dqs + a, n);
        at::vec::fmadd(gd, tt, Vec::loadu(dwl + a, n)).store(dwl + a, n);
    }
}

template <bool RECOMPUTE>
static void images(const float* t, const float* P, const float* q, const float* w, const float* de,
                   float* Gr, float* dq, float* dwp, int64_t B, int64_t G, int64_t L, int64_t A,
                   bool accumulate, int64_t nt)
{
    #pragma omp parallel num_threads(nt)
    {
        float* dwl = dwp + omp_get_thread_num() * A;
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < B; ++b) {
            for (int64_t g = 0; g < G; ++g) {
                const int64_t s = b * G + g;
                for (int64_t i = 0; i < L; ++i) {
                    const int64_t r = s * L + i;
                    const float* tr = RECOMPUTE ? nullptr : t + r * A;
                    const float* pr = RECOMPUTE ? P + (b * L + i) * A : nullptr;
                    float* gr = Gr + (b * L + i) * A;
                    if (accumulate || g > 0)
                        row<RECOMPUTE, true>(tr, pr, q + s * A, w, de[r], gr, dq + s * A, dwl, A);
                    else
                        row<RECOMPUTE, false>(tr, pr, q + s * A, w, de[r], gr, dq + s * A, dwl, A);
                }
            }
        }
    }
}

extern "C" void kernel(const float* t, const float* P, const float* q, const float* w, const float* de,
                       float* Gr, float* dq, float* dwp, int64_t B, int64_t G, int64_t L, int64_t A,
                       int64_t recompute, int64_t accumulate, int64_t nt)
{
    if (recompute)
        images<true>(t, P, q, w, de, Gr, dq, dwp, B, G, L, A, accumulate, nt);
    else
        images<false>(t, P, q, w, de, Gr, dq, dwp, B, G, L, A, accumulate, nt);
}
"""

_lock = threading.Lock()
_kernels: dict = {}          # "forward"/"backward" -> callable, or "error" -> the reason it is off


def _build():
    import logging
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)   # "No CUDA runtime is found" on CPU
    from torch._inductor.codecache import CppPythonBindingsCodeCache as Cache
    f32, i64 = "const float*", "int64_t"
    fwd = Cache.load_pybinding([f32, f32, f32, "float*", "float*"] + [i64] * 6, _FORWARD, needs_vec_isa=True)
    bwd = Cache.load_pybinding([f32] * 5 + ["float*"] * 3 + [i64] * 7, _BACKWARD, needs_vec_isa=True)
    return fwd, bwd


_eager = [os.environ.get("PIPELINE_EAGER_STEP", "0") == "1"]


def set_eager(eager: bool) -> bool:
    """Switch the optimised training step off (True) or on (False) in this process: the fused score kernels
    and the deferred weight gradients (deferred.StepLinear). Returns the previous setting. For parity tests and
    `benchmarks/bench_train.py --compare-eager`; PIPELINE_EAGER_STEP=1 sets it for a whole process."""
    old, _eager[0] = _eager[0], bool(eager)
    return old


def eager() -> bool:
    """True when the optimised training step is switched off (set_eager)."""
    return _eager[0]


def available() -> bool:
    """True when the fused kernels are built (or build now) and not switched off (set_eager). A failed
    build warns once and leaves the eager kernels in use."""
    if _eager[0]:
        return False
    if not _kernels:
        with _lock:
            if not _kernels:
                try:
                    _kernels["forward"], _kernels["backward"] = _build()
                except Exception as e:          # no compiler, no OpenMP: slower, same numbers
                    _kernels["error"] = f"{type(e).__name__}: {e}"
                    warnings.warn(f"fused attention kernels unavailable ({_kernels['error'][:300]}); the eager "
                                  f"kernels run instead (same numbers, slower training on CPU).")
    return "error" not in _kernels


def applies(att_a: torch.Tensor) -> bool:
    """Whether a training step's score can take the fused kernels: fp32 on CPU, no autocast, built."""
    return (att_a.device.type == "cpu" and att_a.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and available())


def forward(att_a: torch.Tensor, q: torch.Tensor, w: torch.Tensor, groups: int = 1, keep: bool = True):
    """att_a (B, L, A), q (B * groups, A), w (A,) fp32 -> e (B * groups, L) and t (B * groups, L, A) =
    tanh(att_a[r // groups] + q[r]) when `keep` (None otherwise: `backward` recomputes it)."""
    att_a, q, w = att_a.contiguous(), q.contiguous(), w.contiguous()
    B, L, A = att_a.shape
    R = q.size(0)
    if R != B * groups:
        raise ValueError(f"q has {R} rows, not {B} images x {groups} groups")
    e = att_a.new_empty(R, L)
    t = att_a.new_empty(R, L, A) if keep else att_a.new_empty(1)
    _kernels["forward"](att_a, q, w, e, t, B, groups, L, A, int(keep), torch.get_num_threads())
    return e, (t if keep else None)


def backward(t: torch.Tensor | None, w: torch.Tensor, de: torch.Tensor, grad: torch.Tensor | None,
             att_a: torch.Tensor | None = None, q: torch.Tensor | None = None, groups: int = 1):
    """d = de (1 - t^2) w, summed over each image's `groups` rows and added into `grad` (B, L, A) (a new
    buffer when None); t (B * groups, L, A) as `forward` kept it, or None to recompute it from att_a (B, L, A)
    and q (B * groups, A). Returns grad, dq (B * groups, A), dw (A,)."""
    R, L = de.shape
    A = w.numel()
    B = R // groups
    nt = torch.get_num_threads()
    de, w = de.contiguous().float(), w.contiguous()
    dummy = w.new_empty(1)                          # for the pointers the kernel does not read
    src = (t.contiguous(), dummy, dummy) if t is not None else (dummy, att_a.contiguous(), q.contiguous())
    accumulate = grad is not None
    grad = w.new_empty(B, L, A) if grad is None else grad
    dq, dwp = w.new_zeros(R, A), w.new_zeros(nt, A)
    _kernels["backward"](*src, w, de, grad, dq, dwp, B, groups, L, A, int(t is None), int(accumulate), nt)
    return grad, dq, dwp.sum(0)
