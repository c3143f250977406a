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

from pipeline.config import CaptionConfig, ServeConfig
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
             (bomb_png(), 413, "ok.txt: the image has 900,000,000 pixels (30000x30000), over --max-pixels "
                               "89,478,485 (a guard against decompression bombs). Downscale it, or, if you trust the "
                               "file, restart pipeline serve with --max-pixels 900000000 or more."),
             (bomb_png(10000, 10000), 413, "the image has 100,000,000 pixels (10000x10000), over --max-pixels"),
             (b"\0" * (LIMIT + 1), 413, "20.0 MB is over the 20 MB limit")]
    for data, status, msg in cases:
        with pytest.raises(uploads.UploadError) as e:
            uploads.check_upload("ok.txt", data, cfg)
        assert e.value.status == status and msg in e.value.message, e.value.message
    with pytest.raises(uploads.UploadError, match="not base64"):
        uploads.decode_b64("x", "**not base64**", cfg)
    small = ServeConfig(max_pixels=1000)                           # the page's own pixel limit
    with pytest.raises(uploads.UploadError, match=r"ok.png: the image has 1,200 pixels \(40x30\), over --max-pixels "
                                                  r"1,000 .* restart pipeline serve with --max-pixels 1200 or more"):
        uploads.check_upload("ok.png", png_bytes(), small)


def test_max_pixels_is_the_limit_also_above_pillows_own(monkeypatch):
    """--max-pixels raised over Pillow's decompression-bomb limit accepts the image (Pillow's limit, which
    the message told the user nothing about, refused it), and Pillow's limit is left as it was."""
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)          # Pillow's limit under the 40x30 = 1,200 pixels
    im = uploads.check_upload("ok.png", png_bytes(), ServeConfig(max_pixels=2000))
    assert im.size == (40, 30) and Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(uploads.UploadError, match=r"1,200 pixels \(40x30\), over --max-pixels 1,100"):
        uploads.check_upload("ok.png", png_bytes(), ServeConfig(max_pixels=1100))


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


BOUNDARY = "------------------------d74496d66958873e"


def form(fields: dict, files: dict, boundary: str = BOUNDARY) -> tuple[bytes, str]:
    """A multipart/form-data body as curl -F writes it, and its Content-Type."""
    out = b""
    for k, v in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    for k, (filename, data) in files.items():
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{filename}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_form_upload_gives_the_first_file_byte_for_byte_and_refuses_garbage():
    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 1000, 70_000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes() + b"\r\n--" + BOUNDARY[:10].encode() + b"\r\n\r\n"
        body, ctype = form({"note": "a field first"}, {"file": ("my photo.jpg", data), "second": ("b.jpg", b"x")})
        assert uploads.from_multipart(ctype, body) == ("my photo.jpg", data)
    no_file, ctype = form({"note": "no file"}, {})
    for content_type, body, msg in ((ctype, no_file, "the form upload has no file field"),
                                    ("multipart/form-data", no_file, "no boundary in its Content-Type"),
                                    (ctype, b"\xff\xfe garbage \x00", "not a complete multipart body"),
                                    (ctype, form({}, {"file": ("a.jpg", b"abc")})[0][:-12], "no closing boundary")):
        with pytest.raises(uploads.UploadError) as e:
            uploads.from_multipart(content_type, body)
        assert e.value.status == 400 and msg in e.value.message and "curl -F file=@photo.jpg" in e.value.message


def test_only_local_host_names_are_answered():
    for host in ("127.0.0.1:8008", "localhost", "LocalHost:80", "localhost.:9", "[::1]:8008", "[::1]", None):
        assert uploads.check_host(host) is None, host
    for host in ("evil.example:8008", "127.0.0.1.evil.example", "localhost.evil.example", "[::2]:8008", "", "::1"):
        msg = uploads.check_host(host)
        assert msg.startswith(f"Host {host!r} is not a name of this server") and "--host NAME" in msg, host
    assert uploads.check_host("photos.lan:8008", "Photos.LAN") is None             # --host adds one name
    assert uploads.check_host("localhost:8008", "photos.lan") is None
    assert "localhost, 127.0.0.1, [::1], photos.lan only" in uploads.check_host("evil.example", "photos.lan")


async def _asgi(app, scope: dict, chunks: list[bytes]) -> tuple[int, dict]:
    """One request through an ASGI app, the body in `chunks`; (status, JSON body)."""
    pending = [{"type": "http.request", "body": c, "more_body": k < len(chunks) - 1} for k, c in enumerate(chunks)]
    sent = []

    async def receive():
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(msg):
        sent.append(msg)
    await app(dict({"type": "http", "method": "POST", "path": "/api/caption", "query_string": b"",
                    "root_path": "", "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 8008)},
                   **scope), receive, send)
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def _caption_app():
    """A FastAPI app with the server's guards and a caption route that parses the page's JSON (as LitServe's
    route does: FastAPI turns what a body read raises into its own 400)."""
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from pipeline.serving.server import CAPTION_PATH, CaptionRequest, HostGuard, UploadGuard
    app = FastAPI()

    def caption(request):
        return {"name": request.name, "bytes": len(base64.b64decode(request.data))}
    caption.__annotations__ = {"request": CaptionRequest}          # (this module's annotations are strings)
    app.post(CAPTION_PATH)(caption)
    app.add_middleware(UploadGuard, max_body=1000, max_pending=2, message_large="The photo is over the limit.")
    app.add_middleware(HostGuard, host="photos.lan")
    return app


def test_guards_in_front_of_the_caption_route():
    """Chunked over the limit: 413 and the size message (FastAPI answered 400 'error parsing the body');
    a form upload is captioned as the page's JSON (it was a 500); another Host than a local name: 400."""
    app = _caption_app()
    host = [(b"host", b"127.0.0.1:8008")]
    ok = json.dumps({"name": "a.png", "data": base64.b64encode(b"abc").decode()}).encode()

    async def scenario():
        chunked = [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")]
        assert await _asgi(app, {"headers": host + chunked}, [ok]) == (200, {"name": "a.png", "bytes": 3})
        assert await _asgi(app, {"headers": host + chunked}, [b"x" * 600] * 3) == (
            413, {"detail": "The photo is over the limit."})
        body, ctype = form({"note": "hi"}, {"file": ("photo.jpg", b"\xff\xd8\xff\xe0 binary")})
        multipart = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
        assert await _asgi(app, {"headers": host + multipart}, [body[:50], body[50:]]) == (
            200, {"name": "photo.jpg", "bytes": 11})
        status, res = await _asgi(app, {"headers": host + multipart[:1]}, [b"\xff\xfe\x00 not a form"])
        assert status == 400 and res["detail"].startswith("the form upload is not a complete multipart body")
        status, res = await _asgi(app, {"headers": host + [(b"content-type", b"image/jpeg")]}, [b"\xff\xd8"])
        assert status == 415 and res["detail"].startswith("POST /api/caption takes JSON or a form upload, not "
                                                          "image/jpeg")
        for name, status in ((b"evil.example:8008", 400), (b"photos.lan", 200), (b"localhost:1", 200)):
            got, res = await _asgi(app, {"headers": [(b"host", name), chunked[0]]}, [ok])
            assert got == status and (status == 200 or "is not a name of this server" in res["detail"]), (name, res)
        rebound = {"method": "GET", "path": "/health", "headers": [(b"host", b"evil.example")]}
        got, res = await _asgi(app, rebound, [b""])
        assert got == 400 and res["detail"].startswith("Host 'evil.example' is not a name of this server")
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
def site(tiny, tmp_path_factory):  # noqa: F811
    """A folder with the sitecustomize.py that gives `pipeline serve`'s processes the tiny backbone."""
    pytest.importorskip("litserve", reason="the serve extra is not installed: make serve (pip install -e '.[serve]')")
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from pipeline.extraction import backbones\nfrom test_extract import tiny_spec\n"
        "backbones.BACKBONES.setdefault('tiny', tiny_spec('tiny'))\n")
    return site


def start_server(tiny, site: Path, port: int, *options: str) -> subprocess.Popen:  # noqa: F811
    """`pipeline serve --model tiny` on `port` in a session of its own, once /health answers."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               PIPELINE_MODELS=str(tiny["models"]), OMP_NUM_THREADS="1")
    log_path = site / f"server_{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--model", "tiny", "--port", str(port),
                                 "--device", "cpu", *options], cwd=tiny["root"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900              # a loaded 2-core machine: minutes
    while True:
        try:
            if _get(base + "/health", 2)[0] == 200:
                return proc
        except (OSError, urllib.error.URLError):
            pass
        if proc.poll() is not None or time.time() > deadline:
            _stop(proc)
            pytest.fail(f"pipeline serve did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server(tiny, site):  # noqa: F811
    port = _free_port()
    proc = start_server(tiny, site, port)
    yield f"http://127.0.0.1:{port}"
    _stop(proc)


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


def recorded_beam(tiny) -> int:  # noqa: F811
    """The beam size the tiny model's export recorded as its decoding (model.json), which a plain
    `pipeline serve --model tiny` uses: 2 (test_shipped exports with beam 2), not CaptionConfig's 3."""
    beam = json.loads((tiny["models"] / "tiny" / "model.json").read_text())["decoding"]["beam"]
    assert beam == 2 != CaptionConfig().beam
    return beam


def test_server_captions_a_photo_with_every_beam_and_its_maps(server, tiny):  # noqa: F811
    K = recorded_beam(tiny)
    status, page = _get(server + "/")
    assert status == 200 and b"Caption a photo" in page
    assert _get(server + "/browse/app.js")[1].count(b"B.overlay") == 1      # the results browser's script
    info = json.loads(_get(server + "/api/model")[1])
    assert info["members"][0]["name"] == "tiny" and info["beam"] == K and info["max_upload_mb"] == 20
    for url in ("/docs", "/openapi.json"):                         # no Swagger page (it loads from a CDN)
        with pytest.raises(urllib.error.HTTPError):
            _get(server + url)
    status, res = post(server, "photo.png", png_bytes())
    assert status == 200, res
    assert res["name"] == "photo.png" and res["grid"] == [14, 14] and len(res["beams"]) == K
    assert res["caption"] == res["beams"][0]["caption"]
    for b in res["beams"]:
        assert b["caption"] == " ".join(b["words"])
        assert len(base64.b64decode(b["maps"])) == 196 * len(b["words"])
    ended = [b["score"] for b in res["beams"] if b["ended"]]
    assert ended == sorted(ended, reverse=True)


def test_server_gives_one_message_per_bad_input_and_keeps_serving(server):
    cases = [("empty.jpg", b"", 400, "empty.jpg: the file is empty (0 bytes)"),
             ("notes.txt", b"a text file, not a photo\n", 415, "notes.txt: not a readable image"),
             ("bomb.png", bomb_png(), 413, "bomb.png: the image has 900,000,000 pixels (30000x30000), over "
                                           "--max-pixels 89,478,485"),
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


def request(base: str, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict]:
    """One request with exactly these headers (a Host of our choosing; a chunked body when `body` is an
    iterable of chunks); (status, JSON answer)."""
    import http.client
    conn = http.client.HTTPConnection(*base.removeprefix("http://").split(":"), timeout=120)
    try:
        conn.request(method, path, body, headers or {}, encode_chunked=body is not None
                     and not isinstance(body, bytes))
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def test_server_takes_form_uploads_and_refuses_chunked_bodies_over_the_limit(server, tiny):  # noqa: F811
    body, ctype = form({"note": "from a script"}, {"file": ("form photo.png", png_bytes(seed=3))})
    status, res = request(server, "POST", "/api/caption", body, {"content-type": ctype})    # curl -F file=@...
    assert status == 200 and res["name"] == "form photo.png" and len(res["beams"]) == recorded_beam(tiny), res
    assert res == post(server, "form photo.png", png_bytes(seed=3))[1] | {"seconds": res["seconds"]}
    status, res = request(server, "POST", "/api/caption", b"\xff\xfe\x00 not a form",
                          {"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert status == 400 and res["detail"].startswith("the form upload is not a complete multipart body"), res
    chunks = (b"x" * 10**6 for _ in range(30))                     # 30 MB, no Content-Length
    status, res = request(server, "POST", "/api/caption", chunks, {"content-type": "application/json"})
    assert (status, res) == (413, {"detail": "The photo is over the 20 MB limit of this page. Pick a smaller photo "
                                             "(or downscale it)."})
    assert post(server, "after.png", png_bytes(seed=98))[0] == 200


def test_server_answers_only_requests_to_a_local_name(server):
    port = server.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert request(server, "GET", "/api/model", headers={"host": host})[0] == 200, host
    for path in ("/", "/api/model", "/health"):                     # DNS rebinding: a page of evil.example
        status, res = request(server, "GET", path, headers={"host": f"evil.example:{port}"})
        assert status == 400 and res["detail"].startswith(f"Host 'evil.example:{port}' is not a name of this server")
    body = json.dumps({"name": "p.png", "data": base64.b64encode(png_bytes()).decode()}).encode()
    status, res = request(server, "POST", "/api/caption", body, {"host": "evil.example", "content-type":
                                                                  "application/json"})
    assert status == 400 and "--host NAME" in res["detail"]


def _children(pid: int) -> set[int]:
    """Every live process under `pid` (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in parents.items() if pp == p}
        todo += list(kids - out)
        out |= kids
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for p in pids:
        try:
            if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.add(p)
        except OSError:
            pass
    return alive


def _port_free(port: int) -> bool:
    """Whether a new server could listen on the port (bound as uvicorn binds, SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc (Linux)")
def test_killed_server_leaves_no_process_serving_and_frees_its_port(tiny, site):  # noqa: F811
    """kill -9 of `pipeline serve`: its HTTP server, queue manager and model worker end with it and the
    port is free again (they went on serving and holding it); --host adds one name the server answers to, and
    --beam overrides the model's recorded decoding."""
    import signal
    port = _free_port()
    proc = start_server(tiny, site, port, "--host", "photos.lan", "--beam", "3")
    try:
        base = f"http://127.0.0.1:{port}"
        status, info = request(base, "GET", "/api/model", headers={"host": f"photos.lan:{port}"})
        assert (status, info["beam"]) == (200, 3) and recorded_beam(tiny) == 2
        assert request(base, "GET", "/api/model", headers={"host": f"other.lan:{port}"})[0] == 400
        workers = _children(proc.pid)
        assert len(workers) >= 3, workers                           # uvicorn, the manager, the model worker
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.time() + 10
        while (_alive(workers) or not _port_free(port)) and time.time() < deadline:
            time.sleep(0.2)
        assert _alive(workers) == set() and _port_free(port)
    finally:
        _stop(proc)


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


def test_page_captions_a_photo_and_shows_a_words_attention(page, server, tiny, tmp_path):  # noqa: F811
    photo = _photo(tmp_path)
    page.set_input_files("#file", str(photo))
    page.wait_for_function("SERVE.result && !SERVE.busy", timeout=120000)
    res = page.evaluate("SERVE.result")
    words = page.eval_on_selector_all("#caption .w", "ws => ws.map(w => w.textContent)")
    assert words == res["beams"][0]["words"] and res["name"] == photo.name
    beams = page.eval_on_selector_all("#beams li", "ls => ls.map(l => l.textContent)")
    assert len(beams) == recorded_beam(tiny) and all(f"{b['score']:.2f}" in t for b, t in zip(res["beams"], beams))
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
