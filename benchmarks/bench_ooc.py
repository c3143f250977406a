"""Training from a cache larger than RAM: captions/s with the features read lazily from disk vs held in
RAM, peak RSS, and the random-read rate that would have to feed a GPU.

    .venv/bin/python benchmarks/make_big_cache.py --out features/coco_sized_random.h5          # ~25 GB
    .venv/bin/python benchmarks/make_big_cache.py --out features/coco_sized_10k.h5 --images 10000
    .venv/bin/python benchmarks/bench_ooc.py --big features/coco_sized_random.h5 --small features/coco_sized_10k.h5

Three measurements, each in its own process (so peak RSS is its own):
  read  random rows of the big cache in the trainer's batches (64 images of one caption length,
        shuffled), through readers.LazyFeatures, after evicting the file from the page cache
        (posix_fadvise DONTNEED): MB/s and rows/s from disk;
  lazy  `pipeline.training.train.train` on the big cache with --in-ram no (DataLoader workers read ahead);
  ram   the same model on the small cache (a 10,000-image subset) with --in-ram yes.
Captions/s is the trainer's own figure (captions / training seconds of the steps run); peak RSS is
ru_maxrss of the trainer process, and the peak PSS of the trainer with its reader processes (shared
pages counted once) is sampled every 0.5 s; disk reads come from /proc/self/io. The same
vocabulary size (make_big_cache.py draws words from one fixed list) keeps the two decoders the same.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _io_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def _peak_rss_mb() -> float:
    """Peak RSS of this process (ru_maxrss). Children are not added: a forked child (a DataLoader
    worker, even `git` run by code_version) reports the pages it shares with us as its own."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tree_pss_mb(pid: int) -> float:
    """Proportional set size of a process and its descendants (shared pages counted once), MB."""
    total, todo = 0.0, [pid]
    while todo:
        q = todo.pop()
        try:
            for line in Path(f"/proc/{q}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
            for task in Path(f"/proc/{q}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


class PeakPss:
    """Samples the process tree's PSS every `every` seconds in a thread; `.peak` in MB."""

    def __init__(self, every: float = 0.5):
        import threading
        self.peak, self.every, self.stop = 0.0, every, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, _tree_pss_mb(os.getpid()))
            self.stop.wait(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def child_read(a) -> dict:
    from pipeline.cache import readers
    from pipeline.training.batching import BucketBatchSampler, select_lengths
    st = readers.FeatureStore.open(a.big)
    rows, caps = st.captions_of("train")
    lengths = np.array([len(c.split()) for c in caps])
    keep, _ = select_lengths(lengths, 30)
    rows, lengths = rows[keep], lengths[keep]
    batches = BucketBatchSampler(lengths, 64, seed=0).batches(0)[: a.read_batches]
    _evict(a.big)
    lazy = readers.LazyFeatures(a.big)
    r0, t = _io_read_bytes(), time.perf_counter()
    n = 0
    for b in batches:
        x = lazy.read(rows[b])
        n += len(x)
    dt = time.perf_counter() - t
    row_mb = x[0].nbytes / 2**20
    return {"mode": "read", "rows": n, "seconds": round(dt, 2), "rows_per_s": round(n / dt, 1),
            "mb_per_s": round(n * row_mb / dt, 1), "disk_mb": round((_io_read_bytes() - r0) / 2**20, 1),
            "row_kb": round(row_mb * 1024, 1), "peak_rss_mb": round(_peak_rss_mb(), 1)}


def child_train(a, mode: str) -> dict:
    from pipeline.config import DecoderConfig, TrainConfig
    from pipeline.training.runs import load_run
    from pipeline.training.train import train
    path = a.big if mode == "lazy" else a.small
    if mode == "lazy":
        _evict(path)
    run = Path(a.work) / f"ooc_{mode}"
    cfg = TrainConfig(features=str(path), max_steps=a.steps, threads=a.threads, device="cpu", min_count=1,
                      in_ram="no" if mode == "lazy" else "yes", num_workers=a.workers if mode == "lazy" else 0,
                      log_every=10 ** 6)
    r0, t = _io_read_bytes(), time.perf_counter()
    with PeakPss() as pss:
        res = train(cfg, DecoderConfig(), run, echo=lambda s: None)
    wall = time.perf_counter() - t
    acc = load_run(run, "last").ckpt["epoch_acc"]
    assert res["stopped"] == "max-steps", res["stopped"]
    return {"mode": mode, "features": str(path), "steps": res["step"], "captions": acc["captions"],
            "train_s": round(acc["train_s"], 1), "captions_per_s": round(acc["captions"] / acc["train_s"], 1),
            "wall_s_with_setup": round(wall, 1), "disk_mb_self": round((_io_read_bytes() - r0) / 2**20, 1),
            "workers": cfg.num_workers, "threads": a.threads, "peak_rss_mb": round(_peak_rss_mb(), 1),
            "peak_pss_tree_mb": round(pss.peak, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--big", type=Path, required=True)
    ap.add_argument("--small", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=120, help="training steps per mode")
    ap.add_argument("--read-batches", type=int, default=300, help="batches of the read-only measurement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="reader processes of the lazy mode")
    ap.add_argument("--modes", default="read,lazy,ram")
    ap.add_argument("--work", default="/tmp/bench_ooc", help="where the throwaway runs go")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.child:
        out = child_read(a) if a.child == "read" else child_train(a, a.child)
        print("RESULT " + json.dumps(out))
        return
    import shutil
    shutil.rmtree(a.work, ignore_errors=True)
    results = {}
    for mode in a.modes.split(","):
        cmd = [sys.executable, __file__, "--child", mode] + sys.argv[1:]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [s for s in p.stdout.splitlines() if s.startswith("RESULT ")]
        if p.returncode or not line:
            raise SystemExit(f"{mode} failed:\n{p.stderr[-3000:]}")
        results[mode] = json.loads(line[-1][7:])
        print(json.dumps(results[mode]))
    if "lazy" in results and "ram" in results:
        results["lazy_vs_ram"] = round(results["lazy"]["captions_per_s"] / results["ram"]["captions_per_s"], 3)
        print(f"lazy / in-RAM captions/s = {results['lazy_vs_ram']}; lazy: peak RSS {results['lazy']['peak_rss_mb']} MB, "
              f"peak PSS with its readers {results['lazy']['peak_pss_tree_mb']} MB")
    results["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
