"""One-command GPU check (`make gpu-check`): the CUDA tests, then extraction, training and decoding throughput
and a small end-to-end CLI run on the GPU, into one JSON and one markdown table.

    make gpu-check                                   # = .venv/bin/python benchmarks/gpu_check.py
    .venv/bin/python benchmarks/gpu_check.py --parts extract_vgg19,train --images 4096
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gc   # dry run, seconds, no GPU

Parts (each with its own time budget; a failure is recorded and the next part runs; exit status 1 when
any part failed, 0 otherwise; without CUDA one line and exit 0):

  environment                 GPU name and memory, torch / CUDA / cuDNN / torchvision versions, CPUs
  pytest                      the CUDA test subset: python -m pytest -q -m cuda (tests/test_cuda.py)
  extract_vgg19               extraction from 3072 JPEG files (Flickr8k, ../shared/flickr8k/images), images/s:
  extract_efficientnet_lite2    decode + resize alone (pipeline.extraction.gpu_images), the network alone on a
                                preloaded batch, end to end with the GPU input path and with the CPU
                                DataLoader path (extract._Images), the share of end-to-end time the GPU
                                waits for input, pipeline.extraction.extract.extract() itself, and the pixel
                                difference between the GPU and the Pillow preprocessing
  train                       decoder training captions/s (benchmarks/bench_train.py: 512/512/512, bf16
                                autocast, Flickr8k caption lengths) at batch 64 and a larger batch
  decode                      batched beam search images/s, beam 3 (benchmarks/bench_decode.py)
  e2e_cli                     pipeline synth -> extract -> train --max-minutes 1 -> score -> caption, --device cuda

Writes OUT/gpu_check.json and OUT/gpu_check.md (OUT default bench_out/, git-ignored); every figure
carries the command that reproduces it. `--device cpu --tiny` runs the same code on a few images and
steps (the pytest part is skipped there: it would recurse into the test that runs the dry run) so this
script is tested in CI without a GPU (tests/test_cuda.py). The whole check stays under --max-minutes.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# Flickr8k's JPEGs: ../shared beside the checkout (as the tests expect), or shared/ inside it
FLICKR_IMAGES = next((p for p in (REPO.parent / "shared" / "flickr8k" / "images", REPO / "shared" / "flickr8k" / "images")
                      if p.is_dir()), REPO.parent / "shared" / "flickr8k" / "images")
PY = ".venv/bin/python"
PARTS = ("environment", "pytest", "extract_vgg19", "extract_efficientnet_lite2", "train", "decode", "e2e_cli")
# end-to-end extraction targets on one H100/H200-class GPU (issue 12), images/s
TARGETS = {"vgg19": 3000.0, "efficientnet_lite2": 2000.0}


@dataclass
class Sizes:
    """How big each measurement is: the GPU sizes, or the dry run's (--tiny)."""
    images: int = 3072                 # JPEG files per extraction measurement (= 24 x 128: no partial batch,
                                       # whose new shape would make cuDNN autotune inside the timed loop)
    batches: tuple = (32, 128)         # extraction batch sizes (end to end); the largest for the others
    diff_images: int = 64              # images compared pixel by pixel with the Pillow path
    train_batches: tuple = (64, 256)
    train_steps: int = 40
    train_extra: tuple = ()            # extra bench_train arguments
    decode_images: int = 1000
    decode_batches: tuple = (100, 1000)
    decode_extra: tuple = ()
    synth: tuple = (40, 10, 10)        # e2e: synthetic train / val / test images
    train_extra_cli: tuple = ()        # e2e: extra `pipeline train` arguments
    budgets: dict = field(default_factory=lambda: {
        "environment": 30, "pytest": 150, "extract_vgg19": 60, "extract_efficientnet_lite2": 60, "train": 45,
        "decode": 60, "e2e_cli": 150})
    max_minutes: float = 7.5


def tiny_sizes() -> Sizes:
    return Sizes(images=2, batches=(1,), diff_images=1, train_batches=(4,), train_steps=2,
                 train_extra=("--warmup", "1", "--dim", "32", "--vocab", "100", "--feature-dim", "16",
                              "--regions", "16"),
                 decode_images=6, decode_batches=(3,),
                 decode_extra=("--train-steps", "2", "--vocab", "100", "--model-cache", "", "--max-len", "8"),
                 synth=(2, 1, 1), train_extra_cli=("--epochs", "1"),
                 budgets={"environment": 30, "pytest": 150, "extract_vgg19": 60, "extract_efficientnet_lite2": 60,
                          "train": 30, "decode": 30, "e2e_cli": 120},
                 max_minutes=5.0)


@dataclass
class Ctx:
    args: argparse.Namespace
    device: str
    sizes: Sizes
    out: Path
    work: Path
    budget: float = 0.0                # seconds the running part may take (set by run_part)

    def reproduce(self, *extra: str) -> str:
        """The gpu_check command line that reproduces a figure of this run."""
        base = [PY, "benchmarks/gpu_check.py"]
        if self.args.tiny:
            base += ["--device", "cpu", "--tiny"]
        return shlex.join(base + list(extra))


def figure(name: str, value, unit: str, command: str, target: float | None = None, **more) -> dict:
    f = {"name": name, "value": value, "unit": unit, "command": command}
    if target is not None:
        f["target"] = target
        f["met"] = bool(value is not None and value >= target)
    f.update(more)
    return f


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise PartTimeout in the main thread after `seconds` (SIGALRM; a blocking C call ends first)."""
    def handler(signum, frame):
        raise PartTimeout(f"over its {seconds:.0f} s budget")
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _sync(device: str):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


# ---- environment -------------------------------------------------------------------------------------

def part_environment(ctx: Ctx) -> dict:
    import torch
    import torchvision
    env = {"device": ctx.device, "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "torchvision": torchvision.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
           "loadavg": [round(v, 2) for v in os.getloadavg()]}
    if ctx.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count(),
                   capability=f"{p.major}.{p.minor}")
    else:
        env.update(gpu=None)
    return {"environment": env, "figures": []}


# ---- pytest --------------------------------------------------------------------------------------

def pytest_command(extra: str | list[str] = "") -> list[str]:
    """The CUDA test subset's command line: every test marked `cuda` (tests/test_cuda.py), plus `extra`;
    -s keeps the differences the tests print (nvjpeg vs Pillow) in the part's log."""
    extra = shlex.split(extra) if isinstance(extra, str) else list(extra)
    return [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-s", "-p", "no:cacheprovider", *extra]


def parse_pytest_summary(text: str) -> dict:
    """'3 passed, 1 skipped in 4.20s' (last such line) -> {'passed': 3, 'skipped': 1}."""
    counts = {}
    for line in reversed(text.strip().splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)", line)
        if found:
            for n, what in found:
                counts[{"error": "errors", "warning": "warnings"}.get(what, what)] = int(n)
            break
    return counts


def part_pytest(ctx: Ctx, run=subprocess.run) -> dict:
    cmd = pytest_command(ctx.args.pytest_args)
    shown = shlex.join([PY] + cmd[1:])
    if ctx.args.tiny and not ctx.args.run_pytest:
        return {"status": "skipped", "reason": "dry run (--tiny): it would recurse into the test that runs this "
                                               "dry run; --run-pytest runs it anyway", "command": shown,
                "figures": []}
    p = run(cmd, cwd=str(REPO), capture_output=True, text=True, timeout=max(1.0, ctx.budget - 2))
    out = (p.stdout or "") + (p.stderr or "")
    (ctx.out / "gpu_check_pytest.log").write_text(out)
    counts = parse_pytest_summary(p.stdout or out)
    res = {"command": shown, "returncode": p.returncode, "counts": counts, "log": str(ctx.out / "gpu_check_pytest.log"),
           "figures": [figure(f"tests {k}", v, "tests", shown) for k, v in counts.items()]}
    if p.returncode != 0:
        res["status"] = "failed"
        res["reason"] = (f"pytest exit status {p.returncode}" + (" (no tests collected)" if p.returncode == 5 else "")
                         + "; tail:\n" + "\n".join(out.strip().splitlines()[-15:]))
    return res


# ---- extraction -----------------------------------------------------------------------------------

def image_files(ctx: Ctx, n: int) -> tuple[list[str], str]:
    """n JPEG paths: Flickr8k's (sorted) when present, else synthetic 224x224 JPEGs in the work folder."""
    if FLICKR_IMAGES.is_dir():
        names = sorted(p for p in os.listdir(FLICKR_IMAGES) if p.lower().endswith(".jpg"))[:n]
        if names:
            return [str(FLICKR_IMAGES / p) for p in names], f"{FLICKR_IMAGES} ({len(names)} of its JPEGs)"
    import numpy as np
    from PIL import Image
    d = ctx.work / "synthetic_jpegs"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = d / f"{i:05d}.jpg"
        if not p.exists():
            small = rng.integers(0, 255, (14, 14, 3), dtype=np.uint8)
            Image.fromarray(small).resize((224, 224), Image.BICUBIC).save(p, quality=90)
        paths.append(str(p))
    return paths, f"synthetic 224x224 JPEGs ({FLICKR_IMAGES} absent)"


def _load(backbone: str, notes: list):
    """(module, spec, weights label): the real weights when present, else random (throughput is the same)."""
    from pipeline.extraction.backbones import load_backbone
    from pipeline.errors import UserError
    try:
        module, spec, sha = load_backbone(backbone, None, str(REPO / "weights"))
        return module, spec, f"sha256 {sha[:12]}"
    except UserError as e:
        if "optional packages" in str(e):
            raise                       # the code is missing, not only the weights: the part fails
        notes.append(f"{backbone}: real weights unavailable ({e}); timed with weights='random' (same FLOPs)")
        module, spec, _ = load_backbone(backbone, "random")
        return module, spec, "random"


def _network(module, spec, device: str):
    """The network step exactly as extract._extract runs it: (B,3,H,W) -> (B, L, C) float16 on the host."""
    import torch
    module = module.to(device).to(memory_format=torch.channels_last)
    cuda = device == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = getattr(torch, spec.amp) if (cuda and spec.amp) else None

    @torch.inference_mode()
    def step(x):
        x = x.to(device, non_blocking=cuda).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device, dtype=amp, enabled=amp is not None):
            y = module(x)
        return y.flatten(2).transpose(1, 2).to(torch.float16).cpu().numpy()
    return step


def _timed_loop(batches, step, n_batches: int):
    """Run `step` over `batches` (an iterator of n_batches); the first ones (up to 2, never all) warm up
    untimed (nvjpeg and cuDNN initialisation). -> (images, seconds, seconds blocked waiting for a batch)."""
    warmup = min(2, n_batches - 1)
    it = iter(batches)
    for _ in range(warmup):
        b = next(it, None)
        if b is None:
            break
        step(b[1])
    n, wait, t0 = 0, 0.0, time.perf_counter()
    while True:
        tw = time.perf_counter()
        b = next(it, None)
        wait += time.perf_counter() - tw
        if b is None:
            break
        step(b[1])
        n += len(b[0])
    return n, time.perf_counter() - t0, wait


def _pixel_diff(paths, spec, gpu_x, rows, step) -> dict:
    """GPU-path vs Pillow-path preprocessing of the same images: grey levels (0..255) and feature rows."""
    import numpy as np
    import torch
    from PIL import Image
    from pipeline.extraction.backbones import preprocess_image
    pp = spec.preprocessing
    ref = torch.stack([preprocess_image(Image.open(paths[r]), pp) for r in rows])
    per_level = torch.tensor(pp["std"], dtype=torch.float32).view(1, 3, 1, 1) / (pp["scale"] / 255.0)
    lv = ((gpu_x.float().cpu() - ref).abs() * per_level)
    fa, fb = step(gpu_x), step(ref)
    scale = float(np.abs(fb.astype(np.float32)).max()) or 1.0
    fd = np.abs(fa.astype(np.float32) - fb.astype(np.float32))
    return {"images": len(rows), "max_levels": round(float(lv.max()), 3), "mean_levels": round(float(lv.mean()), 4),
            "fraction_values_differing": round(float((lv > 0.5).float().mean()), 5),
            "feature_max_abs_diff": round(float(fd.max()), 5), "feature_max_abs": round(scale, 3),
            "feature_max_rel_diff": round(float(fd.max()) / scale, 5)}


def part_extract(ctx: Ctx, backbone: str) -> dict:
    """One backbone's extraction figures. The TF32 / cuDNN-benchmark switches extraction turns on for the
    process are restored afterwards, so the training and decoding parts run as their benchmarks do alone."""
    import torch
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        return _part_extract(ctx, backbone)
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = flags


def _part_extract(ctx: Ctx, backbone: str) -> dict:
    import numpy as np
    import torch
    from pipeline.extraction.extract import _collate, _Images
    from pipeline.extraction.gpu_images import gpu_batches

    dev, sz, notes = ctx.device, ctx.sizes, []
    module, spec, weights = _load(backbone, notes)
    paths, source = image_files(ctx, sz.images)
    rows = np.arange(len(paths))
    step = _network(module, spec, dev)
    threads = min(8, os.cpu_count() or 1)
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))          # extract's default DataLoader workers
    big = max(sz.batches)
    nb = lambda b: math.ceil(len(paths) / b)     # noqa: E731 - batches of size b
    cmd = ctx.reproduce("--parts", f"extract_{backbone}", "--images", str(sz.images))
    figs = []

    # 1. decode + resize + normalise alone (the GPU input path), synchronised per batch
    with gpu_batches(paths, rows, spec.preprocessing, big, dev, threads=threads) as it:
        n, dt, _ = _timed_loop(it, lambda x: _sync(dev), nb(big))
        stats = it.stats.as_dict()
    figs.append(figure("decode+resize only (GPU input path)", round(n / dt, 1), "images/s", cmd, batch=big))

    # 2. the network alone on a preloaded batch (already on the device)
    with gpu_batches(paths, rows[:big], spec.preprocessing, big, dev, threads=threads) as it:
        b_rows, x0 = next(it)[:2]
    for _ in range(1 if ctx.args.tiny else 2):
        step(x0)
    reps = nb(len(b_rows))
    t0 = time.perf_counter()
    for _ in range(reps):
        step(x0)
    t_net = (time.perf_counter() - t0) / (reps * len(b_rows))          # seconds per image
    figs.append(figure("network only (preloaded batch)", round(1 / t_net, 1), "images/s", cmd, batch=len(b_rows)))

    # 3. end to end from JPEG files with the GPU input path, per batch size
    target = TARGETS.get(backbone) if dev == "cuda" else None
    for b in sz.batches:
        with gpu_batches(paths, rows, spec.preprocessing, b, dev, threads=threads) as it:
            n, dt, wait = _timed_loop(it, step, nb(b))
        figs.append(figure(f"end to end, GPU input path, batch {b}", round(n / dt, 1), "images/s", cmd,
                           target=target if b == big else None, batch=b))
        figs.append(figure(f"GPU waits for input (GPU input path, batch {b})", round(wait / dt, 3), "fraction of time",
                           cmd, network_bound_estimate=round(1 - min(1.0, n * t_net / dt), 3)))

    # 4. end to end with the CPU input path (what extract.py runs today: Pillow in DataLoader workers)
    loader = torch.utils.data.DataLoader(_Images(paths, rows, spec.preprocessing), batch_size=big, shuffle=False,
                                         num_workers=workers, collate_fn=_collate, pin_memory=dev == "cuda",
                                         prefetch_factor=4)
    n, dt, wait = _timed_loop(loader, step, nb(big))
    figs.append(figure(f"end to end, CPU input path (DataLoader, {workers} workers), batch {big}", round(n / dt, 1),
                       "images/s", cmd, batch=big))
    figs.append(figure(f"GPU waits for input (CPU input path, batch {big})", round(wait / dt, 3), "fraction of time",
                       cmd, network_bound_estimate=round(1 - min(1.0, n * t_net / dt), 3)))

    # 5. pipeline.extraction.extract.extract() itself (HDF5 writer included), with the GPU input path once it is wired in
    figs += _extract_api(ctx, backbone, paths, weights, big, cmd, notes)

    # 6. how far the GPU path's pixels are from Pillow's (nvjpeg vs libjpeg-turbo, resize rounding)
    k = min(sz.diff_images, len(paths), big)
    with gpu_batches(paths, rows[:k], spec.preprocessing, k, dev, threads=threads) as it:
        d_rows, d_x = next(it)[:2]
    diff = _pixel_diff(paths, spec, d_x, d_rows, step)
    figs.append(figure("GPU path vs Pillow: max difference", diff["max_levels"], "grey levels", cmd, **diff))
    return {"figures": figs, "notes": notes, "images": source, "weights": weights, "decode_stats": stats,
            "input_size": spec.input_size, "amp": spec.amp}


def _extract_api(ctx: Ctx, backbone, paths, weights, batch, cmd, notes) -> list:
    import inspect
    import shutil
    from pipeline.extraction.extract import extract
    from pipeline.data.records import Record
    recs = [Record(Path(p).name, Path(p), "train", ["a picture"]) for p in paths]
    modes = [None]
    if "decode" in inspect.signature(extract).parameters:
        modes = ["cpu", "gpu"]
    else:
        notes.append("pipeline.extraction.extract.extract has no decode= option yet: extract() measured with its current "
                     "(CPU) input path only; wire in pipeline.extraction.gpu_images (docs/gpu.md)")
    wdir = Path(tempfile.mkdtemp(prefix="gpu_check_extract_", dir=ctx.work))
    w = "random" if weights == "random" else None
    figs = []
    try:
        for mode in modes:
            kw = {} if mode is None else {"decode": mode}
            out = wdir / f"{backbone}_{mode or 'default'}.h5"
            res = extract(recs, out, dataset="gpu_check", backbone=backbone, weights=w,
                          weights_dir=str(REPO / "weights"), batch_size=batch, device=ctx.device, progress=False, **kw)
            out.unlink()
            label = f"extract() end to end{'' if mode is None else f', decode={mode}'}, batch {batch}"
            cli = shlex.join(["pipeline", "extract", "--dataset", "flickr8k", "--backbone", backbone, "--device",
                              ctx.device, "--batch-size", str(batch), "--out", f"/tmp/flickr8k_{backbone}.h5"]
                             + ([] if mode is None else ["--decode", mode]))
            figs.append(figure(label, round(res.images_per_s, 1), "images/s", cmd,
                               target=TARGETS.get(backbone) if (ctx.device == "cuda" and mode == "gpu") else None,
                               cli_equivalent=cli + " (all 8000 images)"))
    finally:
        shutil.rmtree(wdir, ignore_errors=True)
    return figs


# ---- training and decoding (the CPU benchmarks' code, on the GPU) ----------------------------------------

def _call_main(main, argv: list[str]):
    """Run a benchmark's main() with `argv` (bench_train.main reads sys.argv), its stdout captured."""
    import inspect
    buf, old = io.StringIO(), sys.argv
    sys.argv = [getattr(main, "__module__", "bench") + ".py"] + list(argv)
    try:
        with contextlib.redirect_stdout(buf):
            if inspect.signature(main).parameters:
                main(list(argv))
            else:
                main()
    finally:
        sys.argv = old
    return buf.getvalue()


def part_train(ctx: Ctx) -> dict:
    import bench_train
    figs, runs = [], []
    for b in ctx.sizes.train_batches:
        js = ctx.work / f"bench_train_{b}.json"
        argv = ["--device", ctx.device, "--batch-size", str(b), "--steps", str(ctx.sizes.train_steps),
                *ctx.sizes.train_extra, "--json", str(js)]
        _call_main(bench_train.main, argv)
        r = json.loads(js.read_text())
        runs.append(r)
        cmd = shlex.join([PY, "benchmarks/bench_train.py"] + argv[:-2])
        figs.append(figure(f"decoder training, batch {b}", r["captions_per_s"], "captions/s", cmd,
                           words_per_s=r["words_per_s"], matmul_gflop_per_s=r["matmul_gflop_per_s"],
                           ratio_to_fp32_gemm=r["ratio_to_gemm"]))
    return {"figures": figs, "runs": runs,
            "notes": ["Decoder 512/512/512, C=512, L=196, vocab 2,500, Flickr8k caption lengths, Adam + clip; "
                      "bf16 autocast on CUDA as the trainer"] if not ctx.args.tiny else ["tiny sizes"]}


def part_decode(ctx: Ctx) -> dict:
    import bench_decode
    figs, runs = [], []
    cache = [] if ctx.args.tiny else ["--model-cache", str(ctx.work / "bench_decode_model.pt")]
    for b in ctx.sizes.decode_batches:
        js = ctx.work / f"bench_decode_{b}.json"
        argv = ["--device", ctx.device, "--beams", "3", "--images", str(ctx.sizes.decode_images), "--batch-size",
                str(b), "--workers", "1", *cache, *ctx.sizes.decode_extra, "--out", str(js)]
        _call_main(bench_decode.main, argv)
        r = json.loads(js.read_text())
        runs.append(r)
        beam3 = [x for x in r["results"] if x["beam"] == 3][0]
        cmd = shlex.join([PY, "benchmarks/bench_decode.py"] + argv[:-2])
        figs.append(figure(f"beam search, beam 3, batch {b}", beam3["images_per_s"], "images/s", cmd,
                           mean_len=beam3["mean_len"], ended=beam3["ended"]))
    return {"figures": figs, "runs": runs,
            "notes": ["default-size Decoder trained briefly on random features so that it ends its captions "
                      "(bench_decode.train_tiny); fp32"]}


# ---- end to end through the CLI --------------------------------------------------------------------

def _cli(args: list[str], log: Path) -> tuple[bool, float, str]:
    """`pipeline ARGS` in this process (click, as pipeline.demo does). -> (ok, seconds, output tail)."""
    from pipeline.cli import main
    buf = io.StringIO()
    t0 = time.perf_counter()
    ok, tail = True, ""
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            main.main(args=list(args), prog_name="pipeline", standalone_mode=False)
        except SystemExit as e:          # a UserError: one line, exit 2
            ok = e.code in (0, None)
        except Exception:               # noqa: BLE001 - recorded as this step's failure
            ok = False
            traceback.print_exc(file=buf)
    dt = time.perf_counter() - t0
    out = buf.getvalue()
    with log.open("a") as f:
        f.write(f"$ pipeline {shlex.join(args)}\n{out}\n")
    tail = "\n".join(out.strip().splitlines()[-8:])
    return ok, dt, tail


def part_e2e(ctx: Ctx) -> dict:
    import shutil
    import torch
    from pipeline.extraction.backbones import load_backbone
    d = ctx.work / "e2e"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    log = ctx.out / "gpu_check_e2e.log"
    log.write_text("")
    dev, (ntr, nva, nte) = ctx.device, ctx.sizes.synth
    notes = []
    wfile = REPO / "weights" / "vgg19_oxford.pt"
    if wfile.is_file():
        wargs = ["--weights-dir", str(REPO / "weights")]
    else:   # captioning refuses features of a 'random' backbone: a saved random init has a real sha256
        module, _, _ = load_backbone("vgg19", "random")
        torch.save(module.state_dict(), d / "vgg19_random.pt")
        wargs = ["--weights", str(d / "vgg19_random.pt")]
        notes.append(f"{wfile} absent (`make weights`): VGG19 with a saved random initialisation")
    shapes, feats, run = d / "shapes", d / "shapes_vgg19.h5", d / "run"
    steps = [
        ("synth", ["synth", "--out", str(shapes), "--train", str(ntr), "--val", str(nva), "--test", str(nte)]),
        ("extract", ["extract", "--dataset", "shapes", "--root", str(shapes), "--backbone", "vgg19", *wargs,
                     "--out", str(feats), "--device", dev]),
        ("train", ["train", "--features", str(feats), "--run", str(run), "--max-minutes", "1", "--device", dev,
                   *ctx.sizes.train_extra_cli]),
        ("score", ["score", "--run", str(run), "--split", "val", "--beam", "3", "--device", dev]),
        ("caption", None),
    ]
    figs, failed = [], []
    for name, args in steps:
        if name == "caption":
            imgs = sorted((shapes / "images").glob("test_*.jpg"))[:2]
            args = ["caption", *map(str, imgs), "--run", str(run), "--device", dev,
                    "--attention", str(d / "attention.png"), *wargs]
        ok, dt, tail = _cli(args, log)
        wrote = {"synth": list(shapes.glob("images/*.jpg")), "extract": [feats] if feats.exists() else [],
                 "train": list(run.glob("*.pt")), "score": list(run.glob("scores_val.*.json")),
                 "caption": list(d.glob("attention*.png"))}[name]
        if ok and not wrote:
            ok, tail = False, f"it wrote nothing where expected\n{tail}"
        figs.append(figure(f"pipeline {name}", round(dt, 2), "s", "pipeline " + shlex.join(args), ok=ok))
        if not ok:
            failed.append(f"pipeline {name} failed:\n{tail}")
            break
        if name == "caption":
            notes.append("captions: " + " | ".join(line for line in tail.splitlines() if "\t" in line))
    res = {"figures": figs, "notes": notes, "log": str(log), "workdir": str(d)}
    if failed:
        res["status"] = "failed"
        res["reason"] = "\n".join(failed)
    return res


# ---- driver ------------------------------------------------------------------------------------------

def run_part(name: str, fn, ctx: Ctx, deadline: float) -> dict:
    left = deadline - time.time()
    if left < 5:
        return {"status": "skipped", "reason": f"out of time (the check is limited to {ctx.sizes.max_minutes} min)",
                "seconds": 0, "figures": []}
    budget = min(ctx.sizes.budgets.get(name, 60) * ctx.args.budget_scale, left)
    print(f"[gpu_check] {name} (budget {budget:.0f} s) ...", flush=True)
    ctx.budget = budget
    t0 = time.time()
    try:
        with time_limit(budget):
            res = fn(ctx)
        res.setdefault("status", "passed")
    except PartTimeout as e:
        res = {"status": "failed", "reason": f"timed out: {e}", "figures": []}
    except BaseException as e:   # noqa: BLE001 - recorded; the next part runs
        if isinstance(e, KeyboardInterrupt):
            raise
        res = {"status": "failed", "reason": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc()[-3000:], "figures": []}
    res["seconds"] = round(time.time() - t0, 2)
    res["budget_s"] = round(budget, 1)
    try:
        import torch
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
    except Exception:   # noqa: BLE001
        pass
    print(f"[gpu_check] {name}: {res['status']} in {res['seconds']} s"
          + (f" ({res['reason'].splitlines()[0]})" if res.get("reason") else ""), flush=True)
    return res


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check: {env.get('gpu') or 'no GPU (dry run on CPU)'}", "",
             f"torch {env.get('torch')} (CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}), torchvision "
             f"{env.get('torchvision')}, Python {env.get('python')}, {env.get('cpus')} CPUs"
             + (f", {env.get('gpu_memory_gib')} GiB GPU memory" if env.get("gpu_memory_gib") else "")
             + f"; {report['created']}; {'dry run (--device cpu --tiny)' if report['tiny'] else 'full sizes'}.",
             "", f"**{'all parts passed' if report['ok'] else 'FAILED: ' + ', '.join(report['failed'])}** "
                 f"(`{report['command']}`, {report['seconds']} s)", "",
             "| part | status | figure | value | unit | target | command |", "|---|---|---|---|---|---|---|"]
    for name, p in report["parts"].items():
        if name == "environment":
            continue
        figs = p.get("figures") or [{}]
        for i, f in enumerate(figs):
            tgt = ""
            if "target" in f:
                tgt = f"{_fmt(f['target'])} ({'met' if f['met'] else 'not met'})"
            lines.append(f"| {name if i == 0 else ''} | {p['status'] + (' (' + str(p['seconds']) + ' s)') if i == 0 else ''}"
                         f" | {f.get('name', '')} | {_fmt(f['value']) if 'value' in f else ''} | {f.get('unit', '')} "
                         f"| {tgt} | {('`' + f['command'] + '`') if f.get('command') else p.get('command', '')} |")
    lines.append("")
    for name, p in report["parts"].items():
        extra = [f"- {n}" for n in p.get("notes", [])]
        if p.get("reason"):
            extra.insert(0, "- **" + p["status"] + "**: " + p["reason"].replace("\n", "\n  "))
        if p.get("decode_stats"):
            extra.append(f"- GPU input path: {json.dumps(p['decode_stats'])}")
        if p.get("images"):
            extra.append(f"- images: {p['images']}; weights: {p.get('weights')}")
        if extra:
            lines += [f"**{name}**", ""] + extra + [""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="dry run sizes: a few images and steps (seconds)")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out", help="folder for gpu_check.json / .md")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    ap.add_argument("--images", type=int, default=None, help="JPEG files per extraction measurement")
    ap.add_argument("--pytest-args", default="", help="extra arguments for the CUDA test subset's pytest")
    ap.add_argument("--run-pytest", action="store_true", help="run the pytest part in the dry run too")
    ap.add_argument("--max-minutes", type=float, default=None, help="limit of the whole check [7.5; 5 with --tiny]")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    args = ap.parse_args(argv)

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False): nothing to check here; "
              "`benchmarks/gpu_check.py --device cpu --tiny` is the dry run.")
        return 0
    if args.device == "cpu" and not args.tiny:
        print("gpu_check: --device cpu runs only with --tiny (a dry run; the full sizes would take hours on a CPU).",
              file=sys.stderr)
        return 2
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"gpu_check: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}.", file=sys.stderr)
        return 2
    sizes = tiny_sizes() if args.tiny else Sizes()
    if args.images:
        sizes.images = args.images
    if args.max_minutes:
        sizes.max_minutes = args.max_minutes
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "gpu_check_work"
    work.mkdir(exist_ok=True)
    if args.tiny:
        torch.set_num_threads(1)     # the dry run is about code paths; one thread wins on a busy small CPU
    ctx = Ctx(args, args.device, sizes, out, work)
    t0 = time.time()
    deadline = t0 + sizes.max_minutes * 60
    fns = {"environment": part_environment, "pytest": part_pytest,
           "extract_vgg19": lambda c: part_extract(c, "vgg19"),
           "extract_efficientnet_lite2": lambda c: part_extract(c, "efficientnet_lite2"),
           "train": part_train, "decode": part_decode, "e2e_cli": part_e2e}
    results = {"environment": run_part("environment", part_environment, ctx, deadline)}
    for name in PARTS[1:]:
        if name in parts:
            results[name] = run_part(name, fns[name], ctx, deadline)
    failed = [n for n, r in results.items() if r["status"] == "failed"]
    report = {"schema": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": args.device,
              "tiny": args.tiny, "ok": not failed, "failed": failed,
              "command": shlex.join([PY, "benchmarks/gpu_check.py"] + list(argv if argv is not None else sys.argv[1:])),
              "seconds": round(time.time() - t0, 1), "environment": results["environment"].get("environment", {}),
              "parts": results}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(f"[gpu_check] {'all parts passed' if not failed else 'FAILED: ' + ', '.join(failed)} in "
          f"{report['seconds']} s -> {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
