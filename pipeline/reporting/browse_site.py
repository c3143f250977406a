"""The results browser's site: `SiteData` (plain lists: no model, no store) -> a static, self-contained site.

browse.py builds the SiteData from runs (`pipeline browse`); tests and the size measurements in
docs/browse.md build sites from fake data with `write_site` directly.

The site (open DIR/index.html from disk; no server, no network)
-----------------------------------------------------------------
    index.html, app.js, style.css   pipeline/reporting/browse_assets, copied verbatim
    data/index.js                   BROWSE.index({...}): every image's id, captions, scores and the
                                    words of its references: what sorting, filtering and paging need
    data/page_0001.js, ...          BROWSE.page(1, {...}): references, attention maps, objects of one
                                    page of `page_size` images, loaded only when a card needs it
    img/000000.jpg, ...             one JPEG thumbnail per image (longest side `thumb` px)
    .pipeline-browse                marker: a re-run may replace a directory holding it

* Data comes in <script src> files that call a global loader, because Chromium refuses fetch() and
  XHR of local files under file://, while scripts load.
* Images are numbered and paged in the default view order (worst first), so the first page of
  the default view reads exactly one data file. 5,000 COCO images are one index of about 1 MB and
  100 pages of 50 cards.
* Attention maps are stored as uint8, one byte per region: each word's (L,) map is divided by its
  maximum and scaled to 255, and all words of a caption are base64'd as one string (T x L bytes;
  196 bytes per word for 14x14). The browser upsamples the (gh, gw) map x16 (nearest), smooths it with
  a gaussian (sigma 8 px, edge padding) and rescales it to [0, 1] exactly as viz.upsample_alpha
  does, then draws it in gray at opacity 0.7 over the image, as the caption PNGs do. Dividing by the
  maximum changes nothing in that picture, since it is rescaled to [0, 1] anyway.
* Backbones squash-resize the whole image, so the attention grid maps onto the image
  proportionally whatever its aspect ratio; thumbnails keep the aspect ratio and the map is stretched
  over them. Object boxes are in pixels of the synthetic image (`frame`, 224x224) and are drawn in
  percent of it.
* The site is written into a temporary directory beside DIR and renamed into place: a failed run
  leaves the old site intact, and a re-run replaces it.
"""
from __future__ import annotations

import base64
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import BrowseConfig
from pipeline.errors import UserError

FORMAT = 1
ASSETS = ("index.html", "app.js", "style.css")
MARKER = ".pipeline-browse"
# per-image metrics, in the order the cards show them; CIDEr first because per-image BLEU-4 is 0
# for most captions without a matching 4-gram, which makes it a poor sort key
METRICS = ("CIDEr", "Bleu_4", "Bleu_1", "METEOR", "ROUGE_L")
DEFAULT_METRIC = "CIDEr"


@dataclass
class RunResult:
    """One run's output over the site's images, in SiteData order (N images)."""
    label: str
    words: list[list[str]]                   # (N,) generated words, specials dropped
    maps: list[np.ndarray]                   # (N,) (T_i, L) attention map of each word
    scores: list[dict | None]                # (N,) {metric: value in [0,1] (CIDEr can exceed 1)}, None: unscored
    corpus: dict = field(default_factory=dict)   # corpus-level metrics of the scored images, in [0,1]
    info: dict = field(default_factory=dict)     # run dir, checkpoint, epoch, beam, ... (shown in the header)
    grid: tuple[int, int] | None = None          # this run's attention grid, if not SiteData.grid


@dataclass
class SiteData:
    """Everything the site shows; per-image lists share one order (N images)."""
    title: str
    split: str
    image_ids: list[str]
    image_paths: list[Path | None]           # None (or a missing file): a gray placeholder
    references: list[list[str]]              # raw reference captions
    runs: list[RunResult]                    # one, or two (compare)
    grid: tuple[int, int] = (14, 14)         # attention grid (gh, gw), gh * gw = L
    objects: list[list[dict]] | None = None  # synthetic data: [{color, shape, box: [x0, y0, x1, y1]}]
    frame: tuple[int, int] | None = None     # (H, W) pixel frame of the boxes
    notes: list[str] = field(default_factory=list)
    train_references: list[str] | None = None  # the cache's training captions: which captions are copies
    image_root: Path | None = None           # the images' folder: a picture leading out of it is not copied


# -- the site -------------------------------------------------------------------------------------
def quantize_maps(maps: np.ndarray) -> bytes:
    """(T, L) float attention -> T*L bytes: each row scaled to its maximum (255); all-zero rows stay 0."""
    m = np.asarray(maps, dtype=np.float64)
    if m.size == 0:
        return b""
    m = m.reshape(len(m), -1)
    m = np.clip(m, 0, None)
    top = m.max(axis=1, keepdims=True)
    q = np.where(top > 0, np.rint(255 * m / np.where(top > 0, top, 1)), 0)
    return q.astype(np.uint8).tobytes()


def dequantize_maps(b64: str, grid: tuple[int, int]) -> np.ndarray:
    """Inverse of the page files' encoding: base64 -> (T, L) uint8."""
    raw = np.frombuffer(base64.b64decode(b64), dtype=np.uint8)
    return raw.reshape(-1, grid[0] * grid[1])


def sort_value(run_scores: list[list[dict | None]], i: int, metric: str) -> float | None:
    """The default sort key of image i: the metric of run A, or in a comparison B - A, on the rounded
    x100 values the index holds (so the page sorts exactly as the site is ordered)."""
    vals = [_num(s[i].get(metric)) if s[i] else None for s in run_scores]
    if any(v is None for v in vals):
        return None
    return vals[1] - vals[0] if len(vals) == 2 else vals[0]


def default_order(data: SiteData) -> tuple[np.ndarray, dict]:
    """Site order = the default view: worst first on CIDEr (run A, or B - A in a comparison),
    unscored images last, ties in the original order."""
    n = len(data.image_ids)
    scored = any(s is not None for r in data.runs for s in r.scores)
    metric = DEFAULT_METRIC if scored else None
    sort = {"key": f"{metric}:{'d' if len(data.runs) == 2 else 0}" if metric else "id", "dir": "asc"}
    if metric is None:
        return np.arange(n), sort
    keys = [sort_value([r.scores for r in data.runs], i, metric) for i in range(n)]
    order = sorted(range(n), key=lambda i: (keys[i] is None, keys[i] if keys[i] is not None else 0.0, i))
    return np.array(order, dtype=np.int64), sort


def _num(v, scale: float = 100.0, nd: int = 2):
    return round(float(v) * scale, nd) if v is not None and math.isfinite(float(v)) else None


def _js(call: str, *args) -> str:
    """`call(arg, ...);` with the arguments as JSON (a script file the page loads with <script src>)."""
    body = ",".join(json.dumps(a, ensure_ascii=False, separators=(",", ":"), allow_nan=False) for a in args)
    return f"{call}({body});\n"


def _thumbnail(src: Path | None, dst: Path, size: int, quality: int) -> tuple[int, int] | None:
    """Write a JPEG thumbnail (longest side `size`); None if the image is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    from pipeline.extraction.backbones import to_rgb
    if src is None or not Path(src).is_file():
        return None
    try:
        with Image.open(src) as im:
            im.draft("RGB", (size, size))          # JPEG: decode at a reduced scale, much faster
            im = to_rgb(im)
            im.thumbnail((size, size), Image.BICUBIC)
            im.save(dst, "JPEG", quality=quality, optimize=True)
            return im.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def _placeholder(dst: Path, size: int) -> None:
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (size, size), (90, 90, 90))
    ImageDraw.Draw(im).text((size // 2 - 40, size // 2 - 6), "no image file", fill=(220, 220, 220))
    im.save(dst, "JPEG", quality=70)


def _named(words: list[str], objs: list[dict]) -> list[list[int]]:
    from pipeline.data.synth import objects_named_by
    return [[k for k, o in enumerate(objs) if any(o is n for n in objects_named_by(w, objs))] for w in words]


def _in_box(maps: np.ndarray, named: list[list[int]], objs: list[dict], grid, frame) -> list:
    """Per word: [attention mass inside the named box(es), the boxes' area fraction] or None."""
    from pipeline.inference.score import cell_overlap
    out = []
    for a, idx in zip(maps, named):
        if not idx:
            out.append(None)
            continue
        cover = cell_overlap([objs[k]["box"] for k in idx], grid, frame).reshape(-1)   # (L,)
        a = np.asarray(a, np.float64).reshape(-1)
        a = a / max(a.sum(), 1e-12)
        out.append([round(float(a @ cover), 4), round(float(cover.mean()), 4)])
    return out


def check_replaceable(out: Path) -> None:
    """Refuse to replace a path that is not an earlier site (e.g. --out . or a run directory)."""
    from pipeline.fileio import is_own_dir
    if not is_own_dir(out, MARKER):
        raise UserError(f"{out}: exists and is not a site written by `pipeline browse` (no {MARKER} in it); "
                        f"it would be replaced. Pass another --out, or remove it first.")


def write_site(data: SiteData, out: str | Path, cfg: BrowseConfig | None = None, *, log=print) -> Path:
    """Write the site for `data` into `out` (replacing an earlier site there); return out/index.html."""
    cfg = cfg or BrowseConfig()
    out = Path(out)
    n = len(data.image_ids)
    if not 1 <= len(data.runs) <= 2:
        raise UserError(f"a site shows one run or two (a comparison), not {len(data.runs)}.")
    for name, seq in [("image_paths", data.image_paths), ("references", data.references)] + \
            [(f"{r.label}.{k}", getattr(r, k)) for r in data.runs for k in ("words", "maps", "scores")] + \
            ([("objects", data.objects)] if data.objects is not None else []):
        if len(seq) != n:
            raise ValueError(f"SiteData.{name} has {len(seq)} entries for {n} images")
    if cfg.page_size < 1 or cfg.thumb < 16:
        raise UserError(f"page size {cfg.page_size} / thumbnail size {cfg.thumb}: need >= 1 / >= 16.")
    check_replaceable(out)
    from pipeline.fileio import disk_error
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        t0 = time.time()
        stats = _write(data, tmp, cfg, log)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise disk_error(out, e) from e
        raise
    log(f"site: {out / 'index.html'} ({n} images, {stats['pages']} pages of {cfg.page_size}, "
        f"{stats['bytes'] / 2**20:.1f} MiB: thumbnails {stats['img_bytes'] / 2**20:.1f}, "
        f"data {stats['data_bytes'] / 2**20:.1f}; {time.time() - t0:.0f} s"
        + (f"; {stats['missing']} image file(s) missing, shown as placeholders" if stats["missing"] else "") + ")")
    return out / "index.html"


def _write(data: SiteData, site: Path, cfg: BrowseConfig, log) -> dict:
    """The site's files into the empty directory `site`: assets, thumbnails, data/index.js, the pages."""
    pkg = Path(__file__).parent / "browse_assets"
    for name in ASSETS:
        shutil.copyfile(pkg / name, site / name)
    (site / "data").mkdir()
    (site / "img").mkdir()
    n = len(data.image_ids)
    order, sort = default_order(data)
    ps = cfg.page_size
    pages = max(1, math.ceil(n / ps))

    sizes, missing = _thumbnails(data, order, site, cfg, log)
    index = _index(data, order, sort, sizes, missing, pages, cfg)
    (site / "data" / "index.js").write_text(_js("BROWSE.index", index), encoding="utf-8")
    for p in range(pages):
        page = _page(data, order[p * ps:(p + 1) * ps], start=p * ps)
        (site / "data" / f"page_{p + 1:04d}.js").write_text(_js("BROWSE.page", p + 1, page), encoding="utf-8")

    (site / MARKER).write_text(json.dumps({"format": FORMAT, "created": index["created"], "images": n}) + "\n")
    size = lambda d: sum(f.stat().st_size for f in (site / d).iterdir())
    img_bytes, data_bytes = size("img"), size("data")
    total = img_bytes + data_bytes + sum((site / a).stat().st_size for a in ASSETS)
    return {"pages": pages, "missing": len(missing), "bytes": total, "img_bytes": img_bytes, "data_bytes": data_bytes}


def _thumbnails(data: SiteData, order: np.ndarray, site: Path, cfg: BrowseConfig, log) -> tuple[list, list[int]]:
    """img/000000.jpg, ... in site order -> ((w, h) of each, the site positions of missing images). A picture
    that leads out of `data.image_root` (a link planted since browse.images_folder checked) is not read:
    it is shown as missing, and said."""
    from pipeline.data.datasets import is_inside
    sizes, missing, outside = [], [], []
    for j, i in enumerate(order):
        src = data.image_paths[i]
        if src is not None and data.image_root is not None and not is_inside(src, data.image_root):
            outside.append(str(src))
            src = None
        wh = _thumbnail(src, site / "img" / f"{j:06d}.jpg", cfg.thumb, cfg.quality)
        if wh is None:
            missing.append(j)
            wh = (cfg.thumb, cfg.thumb)
        sizes.append(wh)
    if missing:
        _placeholder(site / "img" / "missing.jpg", cfg.thumb)
    if outside:
        log(f"note: {len(outside)} picture(s) lead outside the image folder {data.image_root} (a symbolic link "
            f"leading out, e.g. {outside[0]}): not copied into the site, shown as missing.")
    return sizes, missing


def _index(data: SiteData, order: np.ndarray, sort: dict, sizes: list, missing: list[int], pages: int,
           cfg: BrowseConfig) -> dict:
    """data/index.js: every image's id, captions, scores, reference words (what sorting, filtering, paging need)."""
    from pipeline import __version__
    from pipeline.inference.diagnostics import for_runs     # diversity and gender words, per run and image
    n, ps = len(data.image_ids), cfg.page_size
    metrics = [m for m in METRICS if any(s and m in s for r in data.runs for s in r.scores)]
    diags, agreed, verdicts = for_runs([[" ".join(w) for w in r.words] for r in data.runs], data.references,
                                       data.train_references)
    gender = {"ref": [agreed[i] for i in order], "verdict": [[v[i] for i in order] for v in verdicts]} \
        if any(agreed) else None
    return {
        "format": FORMAT, "title": data.title, "split": data.split, "count": n, "page_size": ps, "pages": pages,
        "grid": list(data.grid), "upscale": cfg.upscale, "frame": list(data.frame) if data.frame else None,
        "has_objects": data.objects is not None, "metrics": metrics, "sort": sort, "notes": data.notes,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "generator": f"pipeline {__version__} browse",
        "runs": [{"label": r.label, "info": r.info, "grid": list(r.grid or data.grid),
                  "corpus": {m: _num(v) for m, v in r.corpus.items()}, "diagnostics": dg}
                 for r, dg in zip(data.runs, diags)],
        "images": {
            "id": [data.image_ids[i] for i in order],
            "w": [w for w, _ in sizes], "h": [h for _, h in sizes], "missing": missing,
            "caption": [[" ".join(r.words[i]) for i in order] for r in data.runs],
            "score": [{m: [_num(r.scores[i].get(m)) if r.scores[i] else None for i in order] for m in metrics}
                      for r in data.runs],
            "refwords": [" ".join(sorted({w for c in data.references[i] for w in _words(c)})) for i in order],
            "gender": gender,
        },
    }


def _page(data: SiteData, idx: np.ndarray, *, start: int) -> dict:
    """One page file: the references, attention maps (and objects) of the images `idx` (site order)."""
    page = {"start": start, "refs": [list(data.references[i]) for i in idx], "runs": []}
    if data.objects is not None:
        page["objects"] = [data.objects[i] or [] for i in idx]
    for r in data.runs:
        grid = tuple(r.grid or data.grid)
        L = grid[0] * grid[1]
        maps, img = [], []
        for i in idx:
            m = np.asarray(r.maps[i], np.float32)
            if m.size == 0:
                m = m.reshape(0, L)
            if m.ndim != 2 or m.shape != (len(r.words[i]), L):
                raise ValueError(f"{r.label}: attention maps of image {data.image_ids[i]} are {m.shape}, not "
                                 f"(words {len(r.words[i])}, regions {L} of the grid {grid})")
            maps.append(base64.b64encode(quantize_maps(m)).decode("ascii"))
            img.append(m.astype(np.float64).sum(1))     # per word: 1 - the visual sentinel's share (decoder/model.py)
        entry = {"maps": maps}
        if any(np.any(np.abs(x - 1) > 1e-3) for x in img):     # a decoder with the sentinel (viz.image_shares)
            entry["img"] = [np.round(x, 3).tolist() for x in img]
        if data.objects is not None and data.frame:
            named = [_named(r.words[i], data.objects[i] or []) for i in idx]
            entry["named"] = named
            entry["inbox"] = [_in_box(r.maps[i], nm, data.objects[i] or [], grid, data.frame)
                              for i, nm in zip(idx, named)]
        page["runs"].append(entry)
    return page


def _words(caption: str) -> list[str]:
    """Lowercase words of a reference caption, for the word filter (punctuation dropped)."""
    from pipeline.data.text import tokenize
    return tokenize(caption)


def site_size(site: str | Path) -> int:
    """Bytes of every file under a site directory."""
    return sum(f.stat().st_size for f in Path(site).rglob("*") if f.is_file())
