"""The results browser (pipeline/reporting/browse.py, pipeline/browse_assets/).

* site files written from fake data (fast): layout, maps round trip, default order, paging, the
  placeholder for a missing image, replacing an earlier site, refusing to replace anything else;
* `pipeline browse` end to end on tiny trained runs over synthetic shapes (real images and boxes),
  `--compare`, and the refusal of runs whose splits hold different images;
* the page itself in headless Chromium driven by Playwright: cards with their images, sorting, the
  word filter, a word's attention overlay (the same smoothing as viz.upsample_alpha), play, object
  boxes, the compare view, no console errors; and a 5,000-image site that opens quickly and pages.
  It skips where Playwright or Debian's chromium (`apt-get install chromium`) is missing.

Also a small command line for the figures in docs/browse.md:
    .venv/bin/python tests/test_browse.py size [--images DIR]       size of a fake 1,000-image site
    .venv/bin/python tests/test_browse.py fixture-site OUT           the fixture below as a site
    .venv/bin/python tests/test_browse.py screenshot SITE OUT.png    Playwright screenshot of a site
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_shapes  # noqa: E402

from pipeline.reporting import browse  # noqa: E402
from pipeline.reporting.browse import BrowseConfig, RunResult, SiteData, check_same_images, write_site  # noqa: E402
from pipeline.errors import UserError  # noqa: E402

CHROMIUM = os.environ.get("PIPELINE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
METRICS = ("CIDEr", "Bleu_4", "Bleu_1", "METEOR", "ROUGE_L")
FILLER = ("a man woman dog child boy girl people is are in on with the of and at near red blue green white black "
          "running playing sitting standing grass water street beach snow ball shirt field").split()


# -- fake data --------------------------------------------------------------------------------------
def _fake_scores(rng, n):
    return [{m: float(rng.random() * (2 if m == "CIDEr" else 1)) for m in METRICS} for _ in range(n)]


def _object_maps(words, objs, rng, grid=(14, 14), frame=(224, 224)):
    """(T, L) maps: object words look at the middle of their object's box, other words anywhere."""
    gh, gw = grid
    maps = rng.random((len(words), gh * gw)) * 0.05
    from pipeline.data.synth import objects_named_by
    for t, w in enumerate(words):
        named = objects_named_by(w, objs)
        if named:
            x0, y0, x1, y1 = named[0]["box"]
            cy, cx = int((y0 + y1) / 2 * gh / frame[0]), int((x0 + x1) / 2 * gw / frame[1])
            maps[t, cy * gw + cx] += 1.0
        else:
            maps[t, rng.integers(gh * gw)] += 0.5
    return maps / maps.sum(1, keepdims=True)


def shapes_site_data(tmp_path: Path, n: int = 8, runs: int = 2, seed: int = 0) -> SiteData:
    """Real synthetic images with boxes; run A says the first reference, run B the last one, cut short
    for some images; scores are random (fixed seed)."""
    from pipeline.data import datasets
    from pipeline.data.text import tokenize
    root = make_shapes(tmp_path, 0, n, 0, seed)
    recs = [r for r in datasets.load_records("shapes", root) if r.split == "val"]
    rng = np.random.default_rng(seed)
    results = []
    for k in range(runs):
        words = [tokenize(r.captions[0] if k == 0 else r.captions[-1])[: None if (i + k) % 3 else 4]
                 for i, r in enumerate(recs)]
        maps = [_object_maps(w, r.objects, rng) for w, r in zip(words, recs)]
        results.append(RunResult("soft" if k == 0 else "hard", words, maps, _fake_scores(rng, n),
                                 {"CIDEr": 1.5 - 0.2 * k, "Bleu_4": 0.5}, {"run": f"runs/{k}", "beam": 3}))
    return SiteData(f"shapes {' vs '.join(r.label for r in results)} — val", "val", [r.image_id for r in recs],
                    [r.path for r in recs], [r.captions for r in recs], results, (14, 14),
                    [r.objects for r in recs], (224, 224))


def text_site_data(n: int, image_paths, *, runs: int = 1, words_avg: int = 12, seed: int = 0,
                   references=None) -> SiteData:
    """n images with captions of about `words_avg` words (one 196-region map per word) and five references."""
    rng = np.random.default_rng(seed)
    results = []
    for k in range(runs):
        lens = np.clip(rng.poisson(words_avg, n), 3, 20)
        words = [[str(w) for w in rng.choice(FILLER, size=int(m))] for m in lens]
        maps = [rng.random((len(w), 196), np.float32) ** 8 for w in words]     # peaky, like trained attention
        results.append(RunResult(f"run{k}", words, maps, _fake_scores(rng, n), {"CIDEr": 0.5}, {"beam": 3}))
    refs = references or [[" ".join(rng.choice(FILLER, size=11)) + " ." for _ in range(5)] for _ in range(n)]
    return SiteData(f"{n} images", "val", [f"{100000 + i}" for i in range(n)], list(image_paths), refs, results,
                    (14, 14))


def read_js(path: Path, call: str):
    """The JSON arguments of a data file written as `call(args);`."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith(call + "(") and text.rstrip().endswith(");")
    return json.loads("[" + text[len(call) + 1:text.rstrip().rindex(")")] + "]")


def expected_order(data: SiteData) -> list[str]:
    """Image ids in the default view: CIDEr x100 as shown (or B - A) ascending, ties by position."""
    def key(i):
        s = [round(100 * r.scores[i]["CIDEr"], 2) for r in data.runs]
        return s[1] - s[0] if len(s) == 2 else s[0], i
    return [data.image_ids[i] for i in sorted(range(len(data.image_ids)), key=key)]


# -- site files -----------------------------------------------------------------------------------
def test_write_site_files(tmp_path):
    data = shapes_site_data(tmp_path, n=7)
    data.image_paths[2] = tmp_path / "gone.jpg"          # a missing image becomes a placeholder
    out = tmp_path / "site"
    lines = []
    index_html = write_site(data, out, BrowseConfig(page_size=3), log=lines.append)
    assert index_html == out / "index.html" and "7 images, 3 pages of 3" in lines[-1] and "1 image file" in lines[-1]
    for name in ("index.html", "app.js", "style.css", "data/index.js", "data/page_0001.js", "data/page_0003.js",
                 "img/missing.jpg", browse.MARKER):
        assert (out / name).is_file(), name
    assert not (out / "data/page_0004.js").exists()
    html = (out / "index.html").read_text()
    assert "http://" not in html and "https://" not in html and "https://" not in (out / "app.js").read_text()
    (ix,) = read_js(out / "data/index.js", "BROWSE.index")
    order = expected_order(data)
    assert ix["images"]["id"] == order and ix["count"] == 7 and ix["pages"] == 3 and ix["grid"] == [14, 14]
    assert ix["sort"] == {"key": "CIDEr:d", "dir": "asc"} and ix["has_objects"] and ix["frame"] == [224, 224]
    pos = {i: k for k, i in enumerate(data.image_ids)}
    gone = order.index(data.image_ids[2])
    assert ix["images"]["missing"] == [gone]
    assert sorted(p.name for p in (out / "img").iterdir()) == sorted([f"{k:06d}.jpg" for k in range(7) if k != gone]
                                                                     + ["missing.jpg"])
    first = pos[order[0]]
    assert ix["images"]["caption"][1][0] == " ".join(data.runs[1].words[first])
    assert ix["images"]["score"][0]["CIDEr"][0] == round(100 * data.runs[0].scores[first]["CIDEr"], 2)
    assert "red" in " ".join(ix["images"]["refwords"]) or "blue" in " ".join(ix["images"]["refwords"])
    assert Image.open(out / f"img/{(gone + 1) % 7:06d}.jpg").size == (224, 224)
    n, page = read_js(out / "data/page_0002.js", "BROWSE.page")
    assert n == 2 and page["start"] == 3 and len(page["refs"]) == 3 and len(page["runs"]) == 2
    j = pos[order[3]]
    q = browse.dequantize_maps(page["runs"][0]["maps"][0], (14, 14))
    want = data.runs[0].maps[j]
    assert q.shape == want.shape and q.max(1).tolist() == [255] * len(want)
    assert np.abs(q / 255.0 - want / want.max(1, keepdims=True)).max() <= 0.5 / 255 + 1e-9
    assert page["objects"][0] == data.objects[j]
    # object words name their boxes, with the attention mass inside them
    words = data.runs[0].words[j]
    for t, w in enumerate(words):
        named, inbox = page["runs"][0]["named"][0][t], page["runs"][0]["inbox"][0][t]
        if w in ("red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle", "star",
                 "cross") and named:
            assert inbox is not None and inbox[0] > inbox[1]      # the fake maps look inside the box
        elif not named:
            assert inbox is None
    # a re-run replaces the site; anything else is refused
    data.runs = data.runs[:1]
    write_site(data, out, BrowseConfig(page_size=50), log=lines.append)
    (ix,) = read_js(out / "data/index.js", "BROWSE.index")
    assert ix["pages"] == 1 and len(ix["runs"]) == 1 and not (out / "data/page_0002.js").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".site.")]     # no temporary left over
    other = tmp_path / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not a site written by `pipeline browse`"):
        write_site(data, other)
    assert (other / "keep.txt").exists()


def test_quantize_and_unscored():
    q = np.frombuffer(browse.quantize_maps(np.array([[0.0, 0.2, 0.4], [0, 0, 0]])), np.uint8)
    assert q.tolist() == [0, 128, 255, 0, 0, 0] and browse.quantize_maps(np.zeros((0, 196))) == b""
    data = text_site_data(4, [None] * 4)
    data.runs[0].scores = [None, {"CIDEr": 0.5}, None, {"CIDEr": 0.1}]
    order, sort = browse.default_order(data)
    assert order.tolist() == [3, 1, 0, 2] and sort == {"key": "CIDEr:0", "dir": "asc"}
    data.runs[0].scores = [None] * 4
    assert browse.default_order(data)[1] == {"key": "id", "dir": "asc"}


def test_runs_with_different_grids(tmp_path):
    data = text_site_data(3, [None] * 3, runs=2)
    data.runs[1].grid = (7, 7)
    data.runs[1].maps = [np.random.default_rng(0).random((len(w), 49)) for w in data.runs[1].words]
    write_site(data, tmp_path / "s", log=lambda *_: None)
    (ix,) = read_js(tmp_path / "s/data/index.js", "BROWSE.index")
    _, page = read_js(tmp_path / "s/data/page_0001.js", "BROWSE.page")
    assert [r["grid"] for r in ix["runs"]] == [[14, 14], [7, 7]]
    assert browse.dequantize_maps(page["runs"][1]["maps"][0], (7, 7)).shape[1] == 49
    data.runs[1].grid = None
    with pytest.raises(ValueError, match="regions 196"):
        write_site(data, tmp_path / "t", log=lambda *_: None)
    assert not (tmp_path / "t").exists() and [p.name for p in tmp_path.iterdir()] == ["s"]


def test_check_same_images():
    assert check_same_images(["a", "b", "c"], ["c", "a", "b"], what_a="A", what_b="B", split="val").tolist() == [1, 2, 0]
    with pytest.raises(UserError, match=r"different images \(3 vs 3 images, 2 in common; 'c' is only in A\)"):
        check_same_images(["a", "b", "c"], ["a", "b", "d"], what_a="A", what_b="B", split="val")
    with pytest.raises(UserError, match="same dataset"):
        check_same_images(["a", "b"], ["a", "b", "c"], what_a="A", what_b="B", split="val")


def test_demo_ends_with_the_browser(tmp_path, monkeypatch):
    import pipeline.demo as demo
    calls = []
    demo.run_demo(calls.append, tmp_path / "d", train=2, val=2, test=2, epochs=1, weights_dir="w", backbone="vgg19")
    assert calls[-1][:5] == ["browse", "--run", str(tmp_path / "d/runs/shapes_vgg19_soft"), "--split", "val"]
    assert calls[-1][-2:] == ["--out", str(tmp_path / "d/browse")]


# -- pipeline browse end to end -----------------------------------------------------------------------
def shapes_store(tmp_path: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """A cache of a tiny synthetic set with real images and boxes; instead of a backbone, each 16x16
    cell's mean colour (and a few noise channels) is its annotation vector."""
    import h5py

    from pipeline.data import datasets

    from pipeline.cache import identity, layout
    root = make_shapes(tmp_path, n_train, n_val, 0, seed)
    recs = datasets.load_records("shapes", root)
    prov = {"backbone": "test-cell-colour", "weights_sha256": "0" * 64, "preprocessing": {"kind": "none"},
            "input_size": [224, 224], "grid": [14, 14], "dataset": f"shapes-test-{n_train}-{n_val}",
            "split_hashes": identity.split_hashes(recs),
            "code_version": "test", "created": "test"}
    path = tmp_path / f"shapes_{n_train}_{n_val}.h5"
    layout.create(path, recs, prov, num_regions=196, feature_dim=6, dtype="float32", dataset_root=root)
    rng = np.random.default_rng(seed)
    feats = np.zeros((len(recs), 196, 6), np.float32)
    for k, r in enumerate(recs):
        px = np.asarray(Image.open(root / r.path if not Path(r.path).is_absolute() else r.path).convert("RGB")
                        .resize((224, 224)), np.float32) / 255
        feats[k, :, :3] = px.reshape(14, 16, 14, 16, 3).mean((1, 3)).reshape(196, 3)
        feats[k, :, 3:] = rng.normal(size=(196, 3)) * 0.1
    with h5py.File(path, "r+") as f:
        f["features"][...] = feats
        f["done"][...] = True
    return path


def tiny_run(features: Path, run_dir: Path, seed: int = 0) -> Path:
    from pipeline.training.train import DecoderConfig, TrainConfig, train
    train(TrainConfig(features=str(features), epochs=1, max_steps=2, batch_size=8, min_count=1, lr=3e-3, seed=seed,
                      log_every=1000),
          DecoderConfig(embed_dim=12, hidden_dim=12, attention_dim=12, dropout=0.0, embed_dropout=0.0, context_dropout=0.0, hidden_dropout=0.0), run_dir, echo=lambda *_: None)
    return run_dir


@pytest.mark.slow
def test_cli_browse_compare_and_refusal(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main
    feats = shapes_store(tmp_path, 8, 5)
    a, b = tiny_run(feats, tmp_path / "runs/a"), tiny_run(feats, tmp_path / "runs/b", seed=1)
    other = tiny_run(shapes_store(tmp_path, 8, 6, seed=1), tmp_path / "runs/other")
    cli = lambda *args: CliRunner().invoke(main, ["browse", "--device", "cpu", "--workers", "1", *args])

    res = cli("--run", str(a), "--split", "val", "--beam", "2")
    assert res.exit_code == 0, res.output + repr(res.exception)
    site = a / "browse_val"
    assert f"open {site / 'index.html'}" in res.output and (site / browse.MARKER).exists()
    (ix,) = read_js(site / "data/index.js", "BROWSE.index")
    assert ix["count"] == 5 and ix["has_objects"] and ix["images"]["missing"] == [] and ix["runs"][0]["label"] == "a"
    assert {"CIDEr", "Bleu_4"} <= set(ix["metrics"]) and all(len(ix["images"]["score"][0][m]) == 5 for m in ix["metrics"])
    assert ix["runs"][0]["info"]["beam"] == 2
    _, page = read_js(site / "data/page_0001.js", "BROWSE.page")
    assert len(page["objects"]) == 5 and all(o and "box" in o[0] for o in page["objects"])
    assert all(len(r) == 5 for r in page["refs"])
    assert [Image.open(site / f"img/{k:06d}.jpg").size for k in range(5)] == [(224, 224)] * 5

    res = cli("--run", str(a), "--compare", str(b), "--page-size", "2", "--thumb", "64")
    assert res.exit_code == 0, res.output + repr(res.exception)
    (ix,) = read_js(a / "browse_val_vs_b/data/index.js", "BROWSE.index")
    assert [r["label"] for r in ix["runs"]] == ["a", "b"] and ix["pages"] == 3 and ix["sort"]["key"] == "CIDEr:d"
    assert Image.open(a / "browse_val_vs_b/img/000000.jpg").size == (64, 64)

    res = cli("--run", str(a), "--compare", str(other), "--out", str(tmp_path / "nope"))
    assert res.exit_code == 2 and "different images" in res.output and "5 vs 6 images" in res.output
    assert not (tmp_path / "nope").exists()
    res = cli("--run", str(a), "--out", str(a))          # the run directory is not a site: refused
    assert res.exit_code == 2 and "not a site written by `pipeline browse`" in res.output
    assert (a / "last.pt").exists()


# -- in the browser -------------------------------------------------------------------------------------
def _chromium_or_skip():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set PIPELINE_CHROMIUM)")


class Browser:
    """One headless Chromium (Playwright) with a fresh profile; pages record console errors."""

    def __init__(self, viewport=(1200, 900)):
        from playwright.sync_api import sync_playwright
        self.profile = tempfile.mkdtemp(prefix="browse-chromium-")
        self.pw = sync_playwright().start()
        self.ctx = self.pw.chromium.launch_persistent_context(
            self.profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": viewport[0], "height": viewport[1]})
        self.errors: list[str] = []

    def open(self, site: Path, hash_: str = ""):
        page = self.ctx.new_page()
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url}"))
        page.goto((site / "index.html").resolve().as_uri() + hash_)
        page.wait_for_function("window.BROWSE && BROWSE.ready", timeout=20000)
        return page

    def close(self):
        self.ctx.close()
        self.pw.stop()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def chromium():
    _chromium_or_skip()
    b = Browser()
    yield b
    b.close()


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sites")
    data = shapes_site_data(tmp, n=8)
    compare = write_site(data, tmp / "compare", BrowseConfig(page_size=3), log=lambda *_: None).parent
    single_data = shapes_site_data(tmp, n=8)
    single_data.runs = single_data.runs[:1]
    single = write_site(single_data, tmp / "single", BrowseConfig(page_size=3), log=lambda *_: None).parent
    blind = text_site_data(5, [None] * 5)                      # a withheld test split: nothing scored
    blind.runs[0].scores, blind.runs[0].corpus = [None] * 5, {}
    blind.notes = ["split 'test' has no reference captions: nothing is scored."]
    unscored = write_site(blind, tmp / "unscored", log=lambda *_: None).parent
    return {"compare": (compare, data), "single": (single, single_data), "unscored": (unscored, blind)}


def _card_ids(page) -> list[str]:
    return page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.id)")


def _images_ok(page) -> list:
    page.wait_for_function("Array.from(document.querySelectorAll('.card img')).every(i => i.complete)")
    return page.eval_on_selector_all(".card img", "is => is.map(i => i.naturalWidth)")


def _overlay_pixels(canvas) -> dict:
    return canvas.evaluate("""c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let lo = 255, hi = 0, n = 0; for (let i = 0; i < d.length; i += 4) { if (d[i+3]) n++; lo = Math.min(lo, d[i]);
        hi = Math.max(hi, d[i]); } return {n, lo, hi, shown: getComputedStyle(c).display !== 'none'}; }""")


def test_page_single_run(chromium, sites):
    site, data = sites["single"]
    page = chromium.open(site, "#ms=120")
    order = expected_order(data)
    assert _card_ids(page) == order[:3]                       # page 1 of the default view: worst CIDEr first
    widths = _images_ok(page)
    assert len(widths) == 3 and all(w > 0 for w in widths)
    assert page.inner_text("#count").startswith("8 of 8 images")
    page.wait_for_selector(".card .refs li:not(.loading)")

    # sorting: best first, then by image id
    page.select_option("#dir", "desc")
    assert _card_ids(page) == order[::-1][:3]
    page.select_option("#sort", "id")
    page.select_option("#dir", "asc")
    assert _card_ids(page) == sorted(data.image_ids)[:3]

    # the word filter: count and cards change
    word = "triangle" if any("triangle" in w for w in data.runs[0].words) else data.runs[0].words[0][1]
    want = [i for i, w in zip(data.image_ids, data.runs[0].words) if word in w]
    page.fill("#filter", word)
    page.wait_for_function(f"document.querySelector('#count').textContent.startsWith('{len(want)} of 8')")
    assert _card_ids(page) == sorted(want)[:3]
    page.fill("#filter", "zebra")
    page.wait_for_function("document.querySelector('#count').textContent.startsWith('0 of 8')")
    assert _card_ids(page) == [] and "No image has the word" in page.inner_text("#cards")
    page.fill("#filter", "")
    page.wait_for_function("document.querySelector('#count').textContent.startsWith('8 of 8')")

    # paging
    page.click("nav.pager >> nth=0 >> button.next")
    assert _card_ids(page) == sorted(data.image_ids)[3:6]
    page.click("nav.pager >> nth=0 >> button.first")

    # clicking a word shows its attention; object words highlight their box
    card = page.locator(".card").first
    i = data.image_ids.index(card.get_attribute("data-id"))
    words = data.runs[0].words[i]
    t = next(k for k, w in enumerate(words) if w in ("red", "green", "blue", "yellow", "purple", "orange"))
    canvas = card.locator("canvas.att")
    assert not _overlay_pixels(canvas)["shown"]
    page.check("#boxes")
    assert card.locator(".box").count() == len(data.objects[i]) and card.locator(".box").first.is_visible()
    card.locator(".w").nth(t).click()
    px = _overlay_pixels(canvas)
    assert px["shown"] and px["n"] > 0 and px["hi"] == 255 and px["lo"] == 0
    assert card.locator(".box.named").count() >= 1
    assert "attention in the named box" in card.locator(".wordinfo").inner_text()
    card.locator(".w").nth(t).click()                         # a second click unpins ...
    assert _overlay_pixels(canvas)["shown"]                   # ... but the mouse still hovers the word
    page.mouse.move(1, 1)
    assert not _overlay_pixels(canvas)["shown"]

    # play steps through the words, then stops
    card.locator("button.play").click()
    page.wait_for_function("document.querySelector('.card .w.active') && "
                           "document.querySelector('.card .w.active').dataset.t === '1'", timeout=5000)
    assert _overlay_pixels(canvas)["shown"]
    page.wait_for_function("document.querySelector('.card button.play').textContent === '▶'", timeout=10000)
    assert card.locator(".w.active").count() == 0

    # the state survives a reload through the URL
    assert "boxes=1" in page.url and "sort=id" in page.url
    page.reload()
    page.wait_for_function("window.BROWSE && BROWSE.ready")
    assert page.is_checked("#boxes") and page.input_value("#sort") == "id"
    page.close()
    assert chromium.errors == []


def test_page_compare(chromium, sites):
    site, data = sites["compare"]
    page = chromium.open(site)
    order = expected_order(data)
    assert _card_ids(page) == order[:3]                       # B - A on CIDEr, most worsened first
    assert all(w > 0 for w in _images_ok(page)) and page.locator(".card .panel").count() == 6
    first = data.image_ids.index(order[0])
    d = round(100 * data.runs[1].scores[first]["CIDEr"], 2) - round(100 * data.runs[0].scores[first]["CIDEr"], 2)
    assert page.locator(".card .delta").first.inner_text() == f"Δ CIDEr {'+' if d > 0 else ''}{d:.2f}"
    assert page.locator(".card .panel.run1 .label").first.inner_text() == "hard"
    page.select_option("#dir", "desc")
    assert _card_ids(page) == order[::-1][:3]
    page.select_option("#sort", "Bleu_4:1")
    want = sorted(range(8), key=lambda i: (-round(100 * data.runs[1].scores[i]["Bleu_4"], 2), order.index(data.image_ids[i])))
    assert _card_ids(page) == [data.image_ids[i] for i in want[:3]]
    # each side shows its own words' attention
    card = page.locator(".card").first
    card.locator(".panel.run1 .w").nth(0).click()
    assert _overlay_pixels(card.locator(".panel.run1 canvas.att"))["shown"]
    assert not _overlay_pixels(card.locator(".panel.run0 canvas.att"))["shown"]
    card.locator(".panel.run0 .w").nth(1).hover()
    assert _overlay_pixels(card.locator(".panel.run0 canvas.att"))["shown"]
    page.close()
    assert chromium.errors == []


def test_page_unscored_split(chromium, sites):
    site, data = sites["unscored"]
    page = chromium.open(site)
    assert _card_ids(page) == data.image_ids and page.input_value("#sort") == "id"
    assert all(w > 0 for w in _images_ok(page))                # the gray placeholder
    assert "no reference captions" in page.inner_text("#notes")
    page.locator(".card .w").first.click()
    assert _overlay_pixels(page.locator(".card canvas.att").first)["shown"]
    page.close()
    assert chromium.errors == []


def test_smoothing_matches_viz(chromium, sites):
    from pipeline.reporting.viz import upsample_alpha
    page = chromium.open(sites["single"][0])
    rng = np.random.default_rng(3)
    q = (rng.random(196) ** 4 * 255).round().astype(np.uint8)
    got = np.array(page.evaluate("q => BROWSE.smooth(q, 14, 14, 16)", q.tolist())).reshape(224, 224)
    assert np.abs(got - upsample_alpha(q.astype(np.float64), (14, 14))).max() < 1e-5
    page.close()


def test_page_5000_images(chromium, tmp_path):
    img = tmp_path / "tiny.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), np.uint8)).save(img)
    t0 = time.time()
    data = text_site_data(5000, [img] * 5000, runs=2, words_avg=6)
    write_site(data, tmp_path / "big", BrowseConfig(page_size=50), log=lambda *_: None)
    built = time.time() - t0
    (ix,) = read_js(tmp_path / "big/data/index.js", "BROWSE.index")
    assert ix["pages"] == 100 and (tmp_path / "big/data/page_0100.js").exists()
    index_mb = (tmp_path / "big/data/index.js").stat().st_size / 2**20
    assert index_mb < 3, index_mb

    t0 = time.time()
    page = chromium.open(tmp_path / "big")
    opened = time.time() - t0
    order = expected_order(data)
    assert _card_ids(page) == order[:50] and opened < 5, opened
    assert page.inner_text(".pager .pages").endswith("of 100") and page.input_value(".pager input.pageno") == "1"
    page.mouse.wheel(0, 20000)                                  # scroll to the bottom: pager there too
    page.click("nav.pager >> nth=1 >> button.next")
    assert _card_ids(page) == order[50:100] and page.locator(".card .rank").first.inner_text() == "#51"
    page.wait_for_selector(".card .refs li:not(.loading)")
    page.fill("nav.pager >> nth=0 >> input.pageno", "100")
    page.press("nav.pager >> nth=0 >> input.pageno", "Enter")
    assert _card_ids(page) == order[-50:]
    page.wait_for_selector(".card .refs li:not(.loading)")
    assert all(w > 0 for w in _images_ok(page))
    # sort by id: every card needs another page file; they load lazily
    t0 = time.time()
    page.select_option("#sort", "id")
    page.wait_for_function("document.querySelectorAll('.card .refs li.loading').length === 0")
    resorted = time.time() - t0
    assert _card_ids(page) == sorted(data.image_ids)[:50] and resorted < 5, resorted
    page.fill("#filter", "beach")
    want = sum(any("beach" in r.words[i] for r in data.runs) for i in range(5000))
    page.wait_for_function(f"document.querySelector('#count').textContent.startsWith('{want} of 5000')")
    print(f"5000-image site: built in {built:.1f} s, index {index_mb:.2f} MiB, first page in {opened:.2f} s "
          f"(app ready {page.evaluate('BROWSE.readyMs'):.0f} ms after navigation start), re-sorted in {resorted:.2f} s")
    page.close()
    assert chromium.errors == []


# -- the caption diagnostics: diversity and the gender-word filter (issue 18) -----------------------------
FEMALE_REFS = ["A woman walks.", "a woman walks a dog", "the lady walks her dog", "a dog on a leash", "a woman"]
MALE_REFS = ["A boy jumps.", "a boy in the air", "a young boy jumps", "a child jumps", "a kid"]


def gender_site_data(runs: int = 2) -> SiteData:
    """4 images: references agreeing on female, male, female, and on nothing; run A says the other gender
    for image 0, a neutral word for image 1, the same gender for image 2; run B is right on 0 and 1."""
    refs = [FEMALE_REFS, MALE_REFS, FEMALE_REFS, ["a man", "a woman", "a dog", "a man", "a woman"]]
    caps = [["a man walks a dog", "a child jumps", "a woman walks a dog", "a man and a woman"],
            ["a woman walks a dog", "a boy jumps", "a woman walks", "a dog"]][:runs]
    rng = np.random.default_rng(0)
    results = [RunResult(f"run{k}", [c.split() for c in cs], [rng.random((len(c.split()), 196)) for c in cs],
                         _fake_scores(rng, 4), {"CIDEr": 0.5}, {"beam": 3}) for k, cs in enumerate(caps)]
    return SiteData("gender", "val", [f"g{i}" for i in range(4)], [None] * 4, refs, results, (14, 14),
                    train_references=["A woman walks a dog.", "a cat", "A dog."])


def test_site_holds_diagnostics_and_gender_verdicts(tmp_path):
    data = gender_site_data()
    write_site(data, tmp_path / "site", log=lambda *_: None)
    (ix,) = read_js(tmp_path / "site/data/index.js", "BROWSE.index")
    pos = {i: k for k, i in enumerate(ix["images"]["id"])}             # site order -> the data's images
    g = ix["images"]["gender"]
    assert [g["ref"][pos[f"g{i}"]] for i in range(4)] == ["female", "male", "female", None]
    assert [g["verdict"][0][pos[f"g{i}"]] for i in range(4)] == ["wrong", "neutral", "right", None]
    assert [g["verdict"][1][pos[f"g{i}"]] for i in range(4)] == ["right", "right", "right", None]
    a, b = (r["diagnostics"] for r in ix["runs"])
    assert a["gender"]["counts"]["wrong"] == 1 and a["gender"]["counts"]["neutral"] == 1 and a["gender"]["images"] == 3
    assert b["gender"]["counts"]["right"] == 3
    assert a["diversity"]["novel"] == 0.75 and b["diversity"]["novel"] == 0.5    # B: "a dog" is a copy too
    assert a["diversity"]["vocab_size"] == 8 and b["diversity"]["mean_length"] == 3.25
    # a site where no image's references agree on a gender has no filter data
    write_site(text_site_data(3, [None] * 3, references=[["a dog"]] * 3), tmp_path / "s2", log=lambda *_: None)
    assert read_js(tmp_path / "s2/data/index.js", "BROWSE.index")[0]["images"]["gender"] is None


def test_page_gender_filter_and_diagnostics(chromium, tmp_path):
    data = gender_site_data()
    site = write_site(data, tmp_path / "site", log=lambda *_: None).parent
    page = chromium.open(site)
    assert page.is_visible("#gender")
    diag = page.locator("#summary .diag.run0").inner_text()
    assert "vocabulary 8 words" in diag and "75.0% not a training caption" in diag
    assert "other gender 33.3% (1), neutral 33.3% (1)" in diag
    page.select_option("#gender", "wrong")
    page.wait_for_function("document.querySelector('#count').textContent.startsWith('1 of 4')")
    assert _card_ids(page) == ["g0"]
    assert page.locator(".card .panel.run0 .gender.wrong").inner_text() == "gender: wrong (the references say female)"
    assert page.locator(".card .panel.run1 .gender.right").count() == 1
    page.select_option("#gender", "any")
    page.wait_for_function("document.querySelector('#count').textContent.startsWith('3 of 4')")
    assert sorted(_card_ids(page)) == ["g0", "g1", "g2"]
    page.select_option("#gender", "right")                     # either run's caption: B is right on all three
    page.wait_for_function("document.querySelector('#count').textContent.startsWith('3 of 4')")
    page.select_option("#gender", "mixed")
    page.wait_for_function("document.querySelector('#count').textContent.startsWith('0 of 4')")
    assert "gender filter" in page.inner_text("#cards")
    page.select_option("#gender", "neutral")
    page.wait_for_function("document.querySelector('#count').textContent.startsWith('1 of 4')")
    assert "g=neutral" in page.url
    page.reload()
    page.wait_for_function("window.BROWSE && BROWSE.ready")
    assert page.input_value("#gender") == "neutral" and _card_ids(page) == ["g1"]
    page.close()
    page = chromium.open(tmp_path / "site", "#g=any")
    assert len(_card_ids(page)) == 3
    page.close()
    shapes = write_site(shapes_site_data(tmp_path, n=3, runs=1), tmp_path / "shapes", log=lambda *_: None).parent
    page = chromium.open(shapes)                               # no gendered references: no filter
    assert not page.is_visible("#gender") and page.locator(".card .gender").count() == 0
    page.close()
    assert chromium.errors == []


# -- figures for docs/browse.md ---------------------------------------------------------------------
def _size_report(images: Path | None, n: int = 1000) -> None:
    """Size of a 1,000-image site (two runs and one) with 224 px JPEG thumbnails and ~12-word captions."""
    tmp = Path(tempfile.mkdtemp(prefix="browse-size-"))
    try:
        refs = None
        if images:
            names = [s for s in (images.parent / "Flickr_8k.devImages.txt").read_text().split() if s][:n] \
                if (images.parent / "Flickr_8k.devImages.txt").exists() else sorted(p.name for p in images.glob("*.jpg"))[:n]
            paths = [images / s for s in names]
            tok = images.parent / "Flickr8k.token.txt"
            if tok.exists():
                caps: dict = {}
                for line in tok.read_text().splitlines():
                    key, _, cap = line.partition("\t")
                    caps.setdefault(key.split("#")[0], []).append(cap)
                refs = [caps.get(s, []) for s in names]
            what = f"{len(paths)} photos from {images}"
        else:
            rng = np.random.default_rng(0)
            paths = []
            for i in range(n):   # smooth noise: compresses about like a photo
                small = rng.integers(0, 255, (12, 16, 3), np.uint8)
                p = tmp / f"src{i}.jpg"
                Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(p, quality=90)
                paths.append(p)
            what = f"{n} synthetic 500x375 pictures"
        for runs in (1, 2):
            data = text_site_data(len(paths), paths, runs=runs, words_avg=12, references=refs)
            words = sum(len(w) for r in data.runs for w in r.words)
            site = tmp / f"site{runs}"
            t0 = time.time()
            write_site(data, site, BrowseConfig(), log=lambda *_: None)
            size = lambda d: sum(f.stat().st_size for f in (site / d).rglob("*") if f.is_file())
            print(f"{what}, {runs} run(s), {words / len(paths) / runs:.1f} words per caption: total "
                  f"{browse.site_size(site) / 2**20:.1f} MiB (thumbnails {size('img') / 2**20:.1f}, index "
                  f"{(site / 'data/index.js').stat().st_size / 2**20:.2f}, pages {size('data') / 2**20:.1f}); "
                  f"written in {time.time() - t0:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _screenshot(site: Path, out: Path, word: int = 2) -> None:
    """Screenshot of a site with the object boxes on and a word of the first card shown."""
    b = Browser(viewport=(1180, 860))
    try:
        page = b.open(site)
        _images_ok(page)
        page.wait_for_selector(".card .refs li:not(.loading)")
        if page.locator("#boxes-label").is_visible():
            page.check("#boxes")
        page.locator(".card .w").nth(word).click()
        page.wait_for_timeout(200)
        page.screenshot(path=str(out))
        print(f"{out}: {out.stat().st_size / 1024:.0f} KiB; console errors: {b.errors or 'none'}")
    finally:
        b.close()


def _fixture_site(out: Path, n: int, runs: int) -> None:
    """The browser tests' shapes fixture (real synthetic images and boxes, scripted captions and
    attention), scored for real with pycocoevalcap, written as a site."""
    tmp = Path(tempfile.mkdtemp(prefix="browse-fixture-"))
    try:
        data = shapes_site_data(tmp, n=n, runs=runs)
        for r, label in zip(data.runs, ("scripted A", "scripted B")):
            r.label = label
            r.scores, r.corpus, _ = browse.per_image_scores([" ".join(w) for w in r.words], data.references)
        data.title = "synthetic shapes, scripted captions and attention (tests/test_browse.py) — val"
        write_site(data, out, BrowseConfig(page_size=12))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("size")
    s.add_argument("--images", type=Path, default=None, help="e.g. ../shared/flickr8k/images")
    s = sub.add_parser("fixture-site")
    s.add_argument("out", type=Path)
    s.add_argument("--images", type=int, default=24)
    s.add_argument("--runs", type=int, default=2, choices=(1, 2))
    s = sub.add_parser("screenshot")
    s.add_argument("site", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--word", type=int, default=2, help="which word of the first card to show")
    a = ap.parse_args()
    if a.cmd == "size":
        _size_report(a.images)
    elif a.cmd == "fixture-site":
        _fixture_site(a.out, a.images, a.runs)
    else:
        _screenshot(a.site, a.out, a.word)
