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

# forward: e[r] = sum_a w[a] tanh(P[r, a] + q[r / L, a]); t[r, a] = the tanh (r = b * L + i).
_FORWARD = _PRELUDE + r"""
extern "C" void kernel(const float* P, const float* q, const float* w, float* e, float* t,
                       int64_t B, int64_t L, int64_t A, int64_t nt)
{
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < B * L; ++r) {
        const float* p = P + r * A;
        const float* qb = q + (r / L) * A;
        float* tr = t + r * A;
        Vec acc(0.f);
        int64_t a = 0;
        for (; a + V <= A; a += V) {
            Vec y = tanh_(Vec::loadu(p + a) + Vec::loadu(qb + a));
            y.store(tr + a);
            acc = at::vec::fmadd(y, Vec::loadu(w + a), acc);
        }
        if (a < A) {
            int64_t n = A - a;
            Vec y = tanh_(Vec::loadu(p + a, n) + Vec::loadu(qb + a, n));
            y.store(tr + a, n);
            acc = at::vec::fmadd(y, Vec::loadu(w + a, n), acc);
        }
        e[r] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
    }
}
"""

# backward: d[r, a] = de[r] (1 - t[r, a]^2) w[a]; G (+)= d; dq[b] = sum_i d[b, i]; dwp[thread] += de t.
# dq (B, A) and dwp (nt, A) arrive zeroed; G is written (accumulate 0) or added to (accumulate 1).
_BACKWARD = _PRELUDE + r"""
extern "C" void kernel(const float* t, const float* w, const float* de, float* G, float* dq, float* dwp,
                       int64_t B, int64_t L, int64_t A, int64_t accumulate, int64_t nt)
{
    #pragma omp parallel num_threads(nt)
    {
        float* dwl = dwp + omp_get_thread_num() * A;
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < B; ++b) {
            float* dqb = dq + b * A;
            for (int64_t i = 0; i < L; ++i) {
                int64_t r = b * L + i;
                const float* tr = t + r * A;
                float* gr = G + r * A;
                Vec g(de[r]);
                int64_t a = 0;
                for (; a < A; a += V) {
                    int64_t n = A - a < V ? A - a : V;
                    Vec tt = Vec::loadu(tr + a, n);
                    Vec d = g * Vec::loadu(w + a, n) * (Vec(1.f) - tt * tt);
                    Vec o = accumulate ? Vec::loadu(gr + a, n) + d : d;
                    o.store(gr + a, n);
                    (Vec::loadu(dqb + a, n) + d).store(dqb + a, n);
                    at::vec::fmadd(g, tt, Vec::loadu(dwl + a, n)).store(dwl + a, n);
                }
            }
        }
    }
}
"""

_lock = threading.Lock()
_kernels: dict = {}          # "forward"/"backward" -> callable, or "error" -> the reason it is off


def _build():
    import logging
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)   # "No CUDA runtime is found" on CPU
    from torch._inductor.codecache import CppPythonBindingsCodeCache as Cache
    f32, i64 = "const float*", "int64_t"
    fwd = Cache.load_pybinding([f32, f32, f32, "float*", "float*", i64, i64, i64, i64], _FORWARD,
                               needs_vec_isa=True)
    bwd = Cache.load_pybinding([f32, f32, f32, "float*", "float*", "float*", i64, i64, i64, i64, i64], _BACKWARD,
                               needs_vec_isa=True)
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


def forward(att_a: torch.Tensor, q: torch.Tensor, w: torch.Tensor):
    """att_a (B, L, A), q (B, A), w (A,) fp32 -> e (B, L), t (B, L, A) = tanh(att_a + q)."""
    att_a, q, w = att_a.contiguous(), q.contiguous(), w.contiguous()
    B, L, A = att_a.shape
    e, t = att_a.new_empty(B, L), torch.empty_like(att_a)
    _kernels["forward"](att_a, q, w, e, t, B, L, A, torch.get_num_threads())
    return e, t


def backward(t: torch.Tensor, w: torch.Tensor, de: torch.Tensor, grad: torch.Tensor | None):
    """d = de (1 - t^2) w added into `grad` (B, L, A) (a new buffer when None); returns grad, dq (B, A), dw (A,)."""
    B, L, A = t.shape
    nt = torch.get_num_threads()
    de = de.contiguous().float()
    accumulate = grad is not None
    grad = torch.empty_like(t) if grad is None else grad
    dq, dwp = t.new_zeros(B, A), t.new_zeros(nt, A)
    _kernels["backward"](t, w.contiguous(), de, grad, dq, dwp, B, L, A, int(accumulate), nt)
    return grad, dq, dwp.sum(0)
