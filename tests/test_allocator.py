"""pipeline.device.tune_cpu_allocator: freed memory kept for the next batch (glibc's mallopt).

The page-fault counts are the kernel's (getrusage), not timings: a block freed and allocated again is
faulted in afresh under glibc's defaults when it is over 32 MB, and not at all once the allocator keeps it.
Each case runs in its own interpreter, since mallopt holds for the rest of a process.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's (this libc: "
                           f"{platform.libc_ver()[0] or 'unknown'})")

PROBE = r"""
import json, resource, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from pipeline.device import tune_cpu_allocator
mode = sys.argv[2]
applied = tune_cpu_allocator(large=True) if mode == "large" else tune_cpu_allocator() if mode == "steps" else None
MB = 64                               # over glibc's largest mmap threshold (32 MB)
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
base = rss_mb()
np.ones(MB << 18, np.float32)         # one warm-up allocation, touched and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    a = np.ones(MB << 18, np.float32) # (64 MB) touched, then freed
    del a
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults, "kept_mb": rss_mb() - base, "block_mb": MB}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_large_mode_reuses_blocks_over_32_mb_that_the_default_faults_in_again():
    plain, steps, large = _probe("plain"), _probe("steps"), _probe("large")
    assert plain["applied"] is None and steps["applied"] is True and large["applied"] is True
    # glibc's default: each 64 MB block is unmapped when freed (nothing kept) and faulted in afresh, at least
    # once per 2 MB page (transparent huge pages) of each of the 3 blocks
    assert plain["kept_mb"] < 16 and plain["faults"] >= 3 * 32, plain
    # the training mode caps the mmap threshold at 32 MB: a 64 MB block is still mapped afresh
    assert steps["kept_mb"] < 16 and steps["faults"] >= 3 * 32, steps
    # large: the block comes from the heap, stays there when freed and is reused without a fault
    assert large["kept_mb"] >= 0.9 * large["block_mb"], large
    assert large["faults"] <= plain["faults"] / 10, (large, plain)


def test_extract_on_cpu_asks_for_the_reusing_allocator(monkeypatch, tmp_path):
    """`pipeline extract` (the CLI process) keeps freed activations on the CPU; on CUDA it leaves glibc alone."""
    from click.testing import CliRunner
    from pipeline import device as device_mod
    from pipeline.cli import main
    from pipeline.data import datasets
    from pipeline.extraction import extract as extract_mod
    calls = []
    monkeypatch.setattr(device_mod, "tune_cpu_allocator", lambda large=False: calls.append(large) or True)
    monkeypatch.setattr(datasets, "load_records", lambda name, root: [])
    done = SimpleNamespace(computed=0, bad=[], total=0, precision="fp32", conv="", seconds=0.0, images_per_s=0.0)
    monkeypatch.setattr(extract_mod, "extract", lambda records, out, **kw: done)
    args = ["extract", "--dataset", "flickr8k", "--root", str(tmp_path), "--backbone", "vgg19",
            "--out", str(tmp_path / "f.h5")]
    r = CliRunner().invoke(main, [*args, "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert calls == [True]
    monkeypatch.setattr(device_mod, "resolve_device", lambda name: "cuda")
    r = CliRunner().invoke(main, [*args, "--device", "cuda"])
    assert r.exit_code == 0, r.output
    assert calls == [True]               # not asked again: no CPU backbone in this process
