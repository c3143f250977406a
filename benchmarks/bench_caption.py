"""Caption latency on this machine (docs/serving.md): backbone + beam search per photo, for one photo and
for a batch, and optionally the captioning page's time from upload to caption in headless Chromium.

    .venv/bin/python benchmarks/bench_caption.py --model NAME            # or --run RUN (several: an ensemble)
        [--images ../shared/flickr8k/images] [--n 16] [--beam 3] [--threads 2] [--page] [--json OUT]

One photo: the median of --repeat calls of Captioner on one photo (models loaded once, first call not
counted). Batch: one call on --n photos (batch size n), divided by n. --page: `pipeline serve` in a
subprocess, Chromium (Debian's, through Playwright) uploads the first photo --repeat times; the page's
own clock (window.SERVE.lastMs: file read, upload, caption, JSON back) is reported. --allocator reuse (the
default, as `pipeline caption` and `serve` on a CPU) keeps freed memory for the next call
(pipeline.device.tune_cpu_allocator(large=True)); --allocator default leaves glibc's (run it right after, to compare).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def photos(folder: Path, n: int) -> list[Path]:
    found = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    if len(found) < n:
        sys.exit(f"{folder}: {len(found)} photos, {n} wanted (--images DIR)")
    return found


def bench_cli(members, paths, args) -> dict:
    import torch
    from pipeline.config import CaptionConfig
    from pipeline.inference.caption import Captioner, open_images
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cap = Captioner(members, CaptionConfig(beam=args.beam, device="cpu", batch_size=args.n,
                                           weights_dir=args.weights_dir), log=lambda *_: None)
    load_s = time.perf_counter() - t0
    images = open_images(paths)
    cap(images[:1], paths[:1])                                        # warm-up
    one = []
    for k in range(args.repeat):
        t0 = time.perf_counter()
        cap(images[k % len(images):k % len(images) + 1], paths[:1])
        one.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    out = cap(images, paths)
    batch_s = time.perf_counter() - t0
    return {"load_s": round(load_s, 3), "one_photo_s": round(statistics.median(one), 3),
            "one_photo_all_s": [round(x, 3) for x in one], "batch": len(images),
            "batch_s": round(batch_s, 3), "batch_per_photo_s": round(batch_s / len(images), 3),
            "example": f"{paths[0].name}: {out[0].caption}"}


def bench_page(member_args, photo: Path, args) -> dict:
    from playwright.sync_api import sync_playwright
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", *member_args, "--port", str(port),
                             "--beam", str(args.beam), "--device", "cpu"], env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        import urllib.request
        t0 = time.perf_counter()
        while True:
            try:
                if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
                    break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > 300:
                    raise SystemExit("pipeline serve did not start")
                time.sleep(0.5)
        start_s = time.perf_counter() - t0
        chromium = os.environ.get("PIPELINE_CHROMIUM") or "/usr/bin/chromium"
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
            page = b.new_page()
            page.goto(base + "/")
            page.wait_for_function("window.SERVE && SERVE.ready", timeout=30000)
            times = []
            for k in range(args.repeat + 1):
                page.evaluate("SERVE.result = null")
                page.set_input_files("#file", str(photo))
                page.wait_for_function("SERVE.result && !SERVE.busy", timeout=120000)
                times.append(page.evaluate("SERVE.lastMs") / 1000)
            b.close()
        return {"server_start_s": round(start_s, 2), "upload_to_caption_s": round(statistics.median(times[1:]), 3),
                "first_upload_s": round(times[0], 3), "all_s": [round(t, 3) for t in times]}
    finally:
        import signal
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument("--run", action="append", default=[])
    ap.add_argument("--images", type=Path, default=REPO.parent / "shared" / "flickr8k" / "images")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--weights-dir", default="weights")
    ap.add_argument("--page", action="store_true", help="also time the page in headless Chromium")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--allocator", choices=("reuse", "default"), default="reuse",
                    help="reuse: freed memory kept for the next call, as `pipeline caption` on CPU; default: glibc's")
    args = ap.parse_args(argv)
    if args.allocator == "reuse":
        from pipeline.device import tune_cpu_allocator
        tune_cpu_allocator(large=True)
    from pipeline.inference.shipped import ModelRef
    members = [Path(r) for r in args.run] + [ModelRef(m) for m in args.model]
    if not members:
        ap.error("give --model NAME or --run RUN")
    paths = photos(args.images, args.n)
    res = {"members": [str(m) for m in members], "beam": args.beam, "threads": args.threads,
           "allocator": args.allocator, "load_average": os.getloadavg(), "cpu": bench_cli(members, paths, args)}
    if args.page:
        member_args = [x for r in args.run for x in ("--run", r)] + [x for m in args.model for x in ("--model", m)]
        res["page"] = bench_page(member_args, paths[0], args)
    res["load_average_after"] = os.getloadavg()
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
