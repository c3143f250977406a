"""The benchmark scripts run end to end on tiny sizes (their figures are measured by hand, not here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(*args, timeout=600):
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow
def test_bench_scst_runs(tmp_path):
    out = tmp_path / "scst.json"
    _run(BENCH / "bench_scst.py", "--steps", "1", "--xe-steps", "1", "--warmup", "1", "--images", "4",
         "--threads", "1", "--json", out)
    res = json.loads(out.read_text())
    assert res["images_per_s"] > 0 and res["xe_captions_per_s"] > 0 and 0 <= res["reward_share"] <= 1


@pytest.mark.slow
def test_big_cache_and_out_of_core_benchmark_run(tmp_path):
    big, small = tmp_path / "big.h5", tmp_path / "small.h5"
    _run(BENCH / "make_big_cache.py", "--out", big, "--images", "400", "--val", "40", "--test", "40")
    _run(BENCH / "make_big_cache.py", "--out", small, "--images", "200")
    from pipeline.cache import readers
    st = readers.FeatureStore.open(big)
    assert st.num_images == 400 and st.done.all() and len(st.captions) == 2000 and st.feature_dim == 512
    out = tmp_path / "ooc.json"
    _run(BENCH / "bench_ooc.py", "--big", big, "--small", small, "--steps", "3", "--read-batches", "3",
         "--threads", "1", "--work", tmp_path / "work", "--json", out)
    res = json.loads(out.read_text())
    assert res["read"]["rows"] > 0 and res["lazy"]["steps"] == res["ram"]["steps"] == 3
    assert res["lazy"]["peak_pss_tree_mb"] > 0 and res["lazy_vs_ram"] > 0
