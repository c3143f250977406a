"""The captioning page (pipeline/serving/): upload checks, the upload guard, beam_search's other beams,
the real server (`pipeline serve` in a subprocess, on 127.0.0.1) with every bad input of the issue, and
the page in headless Chromium (Debian's chromium through Playwright, as tests/test_browse.py).

The server tests need the `serve` extra (`make serve`; CI installs it and fails without it) and run
the tiny shipped model of test_shipped; its spawned processes get the tiny backbone from a
sitecustomize.py on their PYTHONPATH (the registry is per process)."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_browse import CHROMIUM, CHROMIUM_ARGS, _chromium_or_skip
from test_shipped import tiny  # noqa: F401  (the module fixture: a tiny exported model)

from pipeline.config import ServeConfig
from pipeline.serving import uploads

REPO = Path(__file__).resolve().parents[1]
SHARED_IMAGES = REPO.parent / "shared" / "flickr8k" / "images"
LIMIT = 20 * 10**6


def png_bytes(w=40, h=30, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(w=30000, h=30000) -> bytes:
    """A 100-byte PNG that claims w x h pixels (the header is all Pillow reads before refusing it)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


# -- unit: what an upload may be ------------------------------------------------------------------------
def test_check_upload_refuses_each_bad_file_with_its_own_message():
    cfg = ServeConfig()
    im = uploads.check_upload("ok.png", png_bytes(), cfg)
    assert im.size == (40, 30)
    cases = [(b"", 400, "ok.txt: the file is empty"), (b"just some text\n", 415, "not a readable image"),
             (bomb_png(), 413, "ok.txt: refused by the decompression-bomb limit"),
             (bomb_png(10000, 10000), 413, "100000000 pixels"),
             (b"\0" * (LIMIT + 1), 413, "20.0 MB is over the 20 MB limit")]
    for data, status, msg in cases:
        with pytest.raises(uploads.UploadError) as e:
            uploads.check_upload("ok.txt", data, cfg)
        assert e.value.status == status and msg in e.value.message, e.value.message
    with pytest.raises(uploads.UploadError, match="not base64"):
        uploads.decode_b64("x", "**not base64**", cfg)
    small = ServeConfig(max_pixels=1000)                           # the page's own pixel limit
    with pytest.raises(uploads.UploadError, match=r"40x30 = 1,200 pixels, more than the 1,000 allowed"):
        uploads.check_upload("ok.png", png_bytes(), small)


def test_upload_guard_refuses_large_bodies_and_too_many_at_once():
    from pipeline.serving.server import CAPTION_PATH, UploadGuard
    gate = asyncio.Event()

    async def app(scope, receive, send):                            # holds every request until the gate opens
        await receive()
        await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = UploadGuard(app, max_body=100, max_pending=2, message_large="too large")

    async def call(length: int, body: bytes = b"x"):
        sent = []

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(msg):
            sent.append(msg)
        scope = {"type": "http", "path": CAPTION_PATH, "headers": [(b"content-length", str(length).encode())]}
        await guard(scope, receive, send)
        return sent[0]["status"], (json.loads(sent[1]["body"]) if sent[0]["status"] != 200 else sent[1]["body"])

    async def scenario():
        assert await call(101) == (413, {"detail": "too large"})
        held = [asyncio.create_task(call(1)) for _ in range(2)]
        await asyncio.sleep(0.01)
        status, body = await call(1)                                 # a third while two are pending
        assert status == 503 and body["detail"].startswith("The server is busy captioning 2 other photos")
        gate.set()
        assert [await t for t in held] == [(200, b"ok")] * 2
        assert await call(50, b"y" * 150) == (413, {"detail": "too large"})   # a body longer than it said
        assert guard.pending == 0
    asyncio.run(scenario())


def test_beam_search_returns_every_final_beam_best_first():
    from pipeline.config import DecoderConfig
    from pipeline.decoder.decode import beam_search
    from pipeline.decoder.model import Decoder
    torch.manual_seed(0)
    m = Decoder(DecoderConfig(embed_dim=8, hidden_dim=8, attention_dim=8), 12, 6).eval()
    x = torch.randn(4, 9, 6)
    for K, X in ((1, 0.0), (3, 0.0), (4, 0.7)):
        best = beam_search(m, x, beam=K, max_len=6, length_norm=X)
        every = beam_search(m, x, beam=K, max_len=6, length_norm=X, all_beams=True)
        for b, hs in zip(best, every):
            assert (hs[0].tokens, hs[0].score) == (b.tokens, b.score)      # the first is beam_search's answer
            assert len(hs) == K and len({tuple(h.tokens) for h in hs}) == K
            ended = [h.score for h in hs if h.ended]
            assert ended == sorted(ended, reverse=True) and all(h.alphas.shape == (len(h.tokens), 9) for h in hs)


# -- the server ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def post(base: str, name: str, data: bytes, timeout=120) -> tuple[int, dict]:
    body = json.dumps({"name": name, "data": base64.b64encode(data).decode()}).encode()
    req = urllib.request.Request(base + "/api/caption", body, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):  # noqa: F811
    pytest.importorskip("litserve", reason="the serve extra is not installed: make serve (pip install -e '.[serve]')")
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from pipeline.extraction import backbones\nfrom test_extract import tiny_spec\n"
        "backbones.BACKBONES.setdefault('tiny', tiny_spec('tiny'))\n")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               PIPELINE_MODELS=str(tiny["models"]), OMP_NUM_THREADS="1")
    log = open(site / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--model", "tiny", "--port", str(port),
                             "--device", "cpu"], cwd=tiny["root"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900              # a loaded 2-core machine: minutes
    while True:
        try:
            if _get(base + "/health", 2)[0] == 200:
                break
        except (OSError, urllib.error.URLError):
            pass
        if proc.poll() is not None or time.time() > deadline:
            _stop(proc)
            pytest.fail(f"pipeline serve did not start:\n{(site / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield base
    _stop(proc)
    log.close()


def _stop(proc) -> None:
    """Ctrl-C (LitServe's graceful shutdown), then whatever is left of the server's own process group
    (it was started in a session of its own: its uvicorn process and model worker)."""
    import signal
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_server_captions_a_photo_with_every_beam_and_its_maps(server):
    status, page = _get(server + "/")
    assert status == 200 and b"Caption a photo" in page
    assert _get(server + "/browse/app.js")[1].count(b"B.overlay") == 1      # the results browser's script
    info = json.loads(_get(server + "/api/model")[1])
    assert info["members"][0]["name"] == "tiny" and info["beam"] == 3 and info["max_upload_mb"] == 20
    for url in ("/docs", "/openapi.json"):                         # no Swagger page (it loads from a CDN)
        with pytest.raises(urllib.error.HTTPError):
            _get(server + url)
    status, res = post(server, "photo.png", png_bytes())
    assert status == 200, res
    assert res["name"] == "photo.png" and res["grid"] == [14, 14] and len(res["beams"]) == 3
    assert res["caption"] == res["beams"][0]["caption"]
    for b in res["beams"]:
        assert b["caption"] == " ".join(b["words"])
        assert len(base64.b64decode(b["maps"])) == 196 * len(b["words"])
    ended = [b["score"] for b in res["beams"] if b["ended"]]
    assert ended == sorted(ended, reverse=True)


def test_server_gives_one_message_per_bad_input_and_keeps_serving(server):
    cases = [("empty.jpg", b"", 400, "empty.jpg: the file is empty (0 bytes)"),
             ("notes.txt", b"a text file, not a photo\n", 415, "notes.txt: not a readable image"),
             ("bomb.png", bomb_png(), 413, "bomb.png: refused by the decompression-bomb limit"),
             ("big.jpg", os.urandom(LIMIT + 500_000), 413, "over the 20 MB limit of this page")]
    for name, data, status, msg in cases:
        got, body = post(server, name, data)
        assert (got, msg in body.get("detail", "")) == (status, True), (name, got, body)
    # ten uploads at once: each one a caption or the busy message, and the server goes on
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda k: post(server, f"p{k}.png", png_bytes(seed=k)), range(10)))
    assert {s for s, _ in answers} <= {200, 503} and any(s == 200 for s, _ in answers)
    assert all(b["detail"].startswith("The server is busy") for s, b in answers if s == 503)
    assert post(server, "after.png", png_bytes(seed=99))[0] == 200
    assert _get(server + "/health")[0] == 200


# -- the page in Chromium -----------------------------------------------------------------------------------
def _photo(tmp_path) -> Path:
    if SHARED_IMAGES.is_dir():
        return sorted(SHARED_IMAGES.glob("*.jpg"))[0]
    p = tmp_path / "synthetic.png"
    p.write_bytes(png_bytes(224, 224))
    return p


@pytest.fixture(scope="module")
def page(server):
    _chromium_or_skip()
    from playwright.sync_api import sync_playwright
    import shutil
    import tempfile
    profile = tempfile.mkdtemp(prefix="serve-chromium-")
    pw = sync_playwright().start()
    ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                                                viewport={"width": 1100, "height": 900})
    p = ctx.new_page()
    p.errors, p.urls = [], []
    p.on("pageerror", lambda e: p.errors.append(str(e)))
    p.on("console", lambda m: m.type == "error" and "the server responded with a status of 4" not in m.text
         and p.errors.append(m.text))
    p.on("request", lambda r: p.urls.append(r.url))
    p.goto(server + "/")
    p.wait_for_function("window.SERVE && SERVE.ready", timeout=20000)
    yield p
    ctx.close()
    pw.stop()
    shutil.rmtree(profile, ignore_errors=True)


def test_page_captions_a_photo_and_shows_a_words_attention(page, server, tmp_path):
    photo = _photo(tmp_path)
    page.set_input_files("#file", str(photo))
    page.wait_for_function("SERVE.result && !SERVE.busy", timeout=120000)
    res = page.evaluate("SERVE.result")
    words = page.eval_on_selector_all("#caption .w", "ws => ws.map(w => w.textContent)")
    assert words == res["beams"][0]["words"] and res["name"] == photo.name
    beams = page.eval_on_selector_all("#beams li", "ls => ls.map(l => l.textContent)")
    assert len(beams) == 3 and all(f"{b['score']:.2f}" in t for b, t in zip(res["beams"], beams))
    assert page.is_hidden("#message") and page.evaluate("document.querySelector('#photo').naturalWidth") > 0
    # click a word (of the first beam that has words: a tiny model's best caption may be empty): its map shows
    k = next(k for k, b in enumerate(res["beams"]) if b["words"])
    page.click(f"#beams li >> nth={k}")
    words = res["beams"][k]["words"]
    assert page.eval_on_selector_all("#caption .w", "ws => ws.map(w => w.textContent)") == words
    assert not page.eval_on_selector("#att", "c => c.classList.contains('on')")
    page.click("#caption .w >> nth=0")
    shown = page.eval_on_selector("#att", """c => { const d = c.getContext('2d').getImageData(0, 0, c.width,
        c.height).data; let hi = 0; for (let i = 0; i < d.length; i += 4) hi = Math.max(hi, d[i]);
        return {on: c.classList.contains('on'), w: c.width, hi, alpha: d[3]}; }""")
    assert shown == {"on": True, "w": 14 * 16, "hi": 255, "alpha": 179}       # the browser's overlay, drawn
    assert page.text_content("#wordinfo") == f"“{words[0]}”, word 1 of {len(words)}"
    print(f"upload to caption in the page: {page.evaluate('SERVE.lastMs'):.0f} ms ({photo.name})")


def test_page_gives_one_message_for_bad_files(page, tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("not a photo")
    page.set_input_files("#file", str(txt))
    page.wait_for_function("SERVE.message !== ''", timeout=60000)
    assert page.is_visible("#message") and page.is_hidden("#result")
    assert page.text_content("#message").startswith("notes.txt: not a readable image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    page.set_input_files("#file", str(empty))
    page.wait_for_function("SERVE.message.startsWith('empty.jpg')")
    assert page.text_content("#message") == "empty.jpg: the file is empty (0 bytes). Pick a photo (JPEG or PNG)."
    # ten photos dropped at once: a note, and the first one is captioned
    page.evaluate("""(b64) => { const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        for (let k = 0; k < 10; k++) dt.items.add(new File([bytes], `p${k}.png`, {type: "image/png"}));
        document.querySelector("#drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true})); }""",
                  base64.b64encode(png_bytes()).decode())
    page.wait_for_function("SERVE.result && SERVE.result.name === 'p0.png' && !SERVE.busy", timeout=120000)
    assert page.text_content("#message").startswith("One photo at a time: 10 files were given")
    assert page.errors == []
    port = page.url.split(":")[2].split("/")[0]
    assert all(u.startswith(f"http://127.0.0.1:{port}/") or u.startswith("blob:") or u.startswith("data:")
               for u in page.urls), page.urls                       # nothing from anywhere else
