"""What made an artefact: code version, hashes (checked wherever two artefacts meet), and what it
cost (ComputeMeter: wall, CPU and GPU seconds, recorded by extraction and training; energy_kwh: an
estimate of the energy from those seconds, its power figures defined here once)."""
from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

from pipeline import __version__


def code_version() -> str:
    """Package version plus the git commit (and '+dirty') when run from a checkout."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    if not sha:
        return __version__
    return f"{__version__}+g{sha}{'.dirty' if dirty else ''}"


def file_digest(path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


def sha256_strings(items) -> str:
    """Order-sensitive hash of a sequence of strings (e.g. the image ids of a split)."""
    h = hashlib.sha256()
    for s in items:
        h.update(s.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


# -- compute: what an artefact cost ----------------------------------------------------------------
COMPUTE_KEYS = ("wall_s", "cpu_s", "gpu_s")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) and of its children that have
    ended and been waited for (DataLoader workers once shut down, java scorers)."""
    import resource
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class ComputeMeter:
    """Wall, CPU and GPU seconds since the last `lap()` (or since it was made).

    GPU seconds are the wall seconds the process held its GPU(s) (`gpus` of them when `device` is
    CUDA), not kernel time: the figure accounting of GPU hours uses. 0 on CPU."""

    def __init__(self, device="cpu", gpus: int = 1):
        self.gpus = gpus if str(device).startswith("cuda") else 0
        self._mark = (time.perf_counter(), cpu_seconds())

    def lap(self) -> dict:
        """{"wall_s", "cpu_s", "gpu_s"} since the last lap; starts the next one."""
        now = (time.perf_counter(), cpu_seconds())
        (w0, c0), self._mark = self._mark, now
        wall = now[0] - w0
        return {"wall_s": wall, "cpu_s": now[1] - c0, "gpu_s": wall * self.gpus}


def add_compute(total: dict | None, lap: dict) -> dict:
    """`total` (None or a dict with COMPUTE_KEYS and anything else) plus `lap`, rounded to ms."""
    out = dict(total or {})
    for k in COMPUTE_KEYS:
        out[k] = round(float(out.get(k) or 0.0) + float(lap.get(k) or 0.0), 3)
    return out


# -- energy: an estimate from the compute records (not a measurement) ------------------------------
# Power per busy CPU-second: the TDP per core of an Intel Xeon Platinum 8480+ (350 W, 56 cores; Intel's
# spec sheet), a 4th-generation Xeon Scalable (Sapphire Rapids) like the cloud "Intel Xeon Processor"
# these runs used. One CPU-second (user + system, `cpu_seconds`) is counted as one core at TDP.
CPU_WATTS_PER_CORE = 350.0 / 56
# Power per GPU-second: an NVIDIA H100 SXM's maximum board power (700 W; NVIDIA's spec sheet). GPU seconds
# are the wall seconds a GPU was held (ComputeMeter), busy or not, so this is an upper bound.
GPU_WATTS = 700.0
JOULES_PER_KWH = 3.6e6


def energy_kwh(compute: dict | None) -> float | None:
    """kWh = (cpu_s x CPU_WATTS_PER_CORE + gpu_s x GPU_WATTS) / 3.6e6 of a compute record (a cache's
    `compute` attribute, a checkpoint's, summed log rows); None when it has no CPU seconds. It leaves out
    memory, disks, idle power and the data centre's overhead (PUE)."""
    if not isinstance(compute, dict) or compute.get("cpu_s") is None:
        return None
    return (float(compute["cpu_s"]) * CPU_WATTS_PER_CORE
            + float(compute.get("gpu_s") or 0.0) * GPU_WATTS) / JOULES_PER_KWH
