"""`pipeline serve`: a captioning page on 127.0.0.1, served by LitServe (the optional `serve` extra).

    pipeline serve [--model NAME | --run RUN ...] [--port 8008]

    GET  /                 the page (assets/index.html, serve.js, serve.css)
    GET  /browse/app.js    the results browser's script, whose attention overlay the page draws with
    GET  /api/model        what is loaded: members, backbones, val scores, limits
    POST /api/caption      {"name", "data": base64 photo}, or a form upload (curl -F file=@photo.jpg) ->
                           caption, every final beam with its score, and each beam's per-word attention maps
                           (uint8, base64, as the results browser's)
    GET  /health           200 once the model is loaded (LitServe's)

Why LitServe (Lightning AI, Apache-2.0; litserve==0.2.19): a library made to serve models. The model lives
in a worker process fed by a request queue (the page stays responsive while a caption is computed, and a
worker that crashes does not take the page down), with per-request timeouts and a health check, on
FastAPI/uvicorn. It runs fully offline: no telemetry in its code, and this server serves only its own
files (no CDN; the OpenAPI/Swagger pages, which load from a CDN, are switched off). Gradio was checked and
not chosen: it requires Pillow < 13 (this project pins 13), pulls in pandas and huggingface-hub, and
needs configuring against Google Fonts, a CDN script and analytics to stay offline. The standard
library's http.server would do for one user, but has no worker process, queue or timeout: a long
caption would block the page and a crash in the model would stop the server.

Bad input never reaches the model: uploads.check_upload turns it into one message (HTTP 4xx, shown on
the page), and UploadGuard refuses bodies over the size limit (413, chunked or not) and more than
`max_pending` uploads at once (503, "busy") before they reach the model. HostGuard answers only requests
addressed to a local name (DNS rebinding), and every process LitServe starts ends with `pipeline serve`
(die_with_parent), so a killed server leaves nothing holding the port.
"""
import json
import os
import socket
import time
from pathlib import Path
from typing import Sequence

from pipeline.config import CaptionConfig, ServeConfig
from pipeline.errors import UserError
from pipeline.serving import uploads

ASSETS = Path(__file__).with_name("assets")
BROWSE_APP = Path(__file__).resolve().parents[1] / "reporting" / "browse_assets" / "app.js"
CAPTION_PATH = "/api/caption"
EXTRA = "pip install -e '.[serve]' (make serve)"

try:                                      # the optional extra; serve() says how to install it when absent
    import litserve as ls
    from fastapi import HTTPException
    from pydantic import BaseModel
except ImportError:                       # pragma: no cover - exercised where the extra is missing
    ls = None
    BaseModel = object


class CaptionRequest(BaseModel):
    name: str = "photo"
    data: str = ""                        # the file, base64


def describe(captioner) -> dict:
    """What /api/model says about the loaded members."""
    from pipeline.inference import shipped
    out = []
    for r in captioner.loaded:
        m = r.ckpt.get("manifest") if shipped.is_shipped(r) else None
        val = shipped.val_metrics(m) if m else None
        out.append({"name": r.run_dir.name, "kind": "shipped model" if m else "run",
                    "backbones": [(f.get("provenance") or {}).get("backbone") for f in r.features], "val": val})
    return {"members": out, "label": " + ".join(d["name"] for d in out)}


def caption_response(c, grid, seconds: float, label: str) -> dict:
    """JSON of one captioned photo: every beam with its words, score and attention maps."""
    from pipeline.reporting.browse_site import quantize_maps
    import base64
    beams = [{"caption": b.caption, "words": b.words, "score": round(float(b.score), 4), "ended": bool(b.ended),
              "maps": base64.b64encode(quantize_maps(b.alphas.numpy())).decode()} for b in c.beams]
    return {"model": label, "name": c.path.name, "grid": list(c.grid or grid), "caption": c.caption,
            "beams": beams, "seconds": round(seconds, 3)}


if ls is not None:
    class CaptionAPI(ls.LitAPI):
        """The model, in LitServe's inference worker: request -> checked image -> all beams."""

        def __init__(self, members: Sequence, cfg: ServeConfig, ccfg: CaptionConfig):
            super().__init__(max_batch_size=1, api_path=CAPTION_PATH)
            self.members, self.cfg, self.ccfg = list(members), cfg, ccfg
            self.serve_pid = os.getpid()            # `pipeline serve`, which starts the worker

        def setup(self, device):
            from dataclasses import replace
            die_with_parent(self.serve_pid)

            from pipeline.inference.caption import Captioner
            ccfg = replace(self.ccfg, device="cuda" if str(device).startswith("cuda") else "cpu", batch_size=1)
            self.captioner = Captioner(self.members, ccfg, log=lambda *_: None)
            self.label = describe(self.captioner)["label"]

        def decode_request(self, request: CaptionRequest):
            try:
                raw = uploads.decode_b64(request.name, request.data, self.cfg)
                return request.name, uploads.check_upload(request.name, raw, self.cfg)
            except uploads.UploadError as e:
                raise HTTPException(status_code=e.status, detail=e.message) from None

        def predict(self, x):
            name, image = x
            t0 = time.perf_counter()
            try:
                c = self.captioner([image], [name], all_beams=True)[0]
            except UserError as e:
                raise HTTPException(status_code=422, detail=f"{name}: {e}") from None
            return caption_response(c, self.captioner.grid, time.perf_counter() - t0, self.label)

        def encode_response(self, output):
            return output


class HostGuard:
    """ASGI middleware in front of every route: a request whose Host header is not a name of this server
    (localhost, 127.0.0.1, [::1], or --host) gets 400 and reaches nothing, so a web page of another site
    whose name was made to resolve to 127.0.0.1 (DNS rebinding) cannot read or use the page."""

    def __init__(self, app, host: str = ""):
        self.app, self.host = app, host

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refused = uploads.check_host(_header(scope, b"host"), self.host)
            if refused:
                return await _reply(send, 400, refused)
        return await self.app(scope, receive, send)


class UploadGuard:
    """ASGI middleware in front of /api/caption: a body over the limit gets 413, whether it says its length
    or not (chunked: counted as it arrives; read and dropped up to DRAIN x the limit, so that the client gets
    the answer), and more than `max_pending` uploads at once get 503 (busy); all with {"detail": message}.
    The body is read here and handed on whole: a form upload (curl -F file=@photo.jpg) as the page's own
    JSON, another kind than JSON or a form gets 415."""

    def __init__(self, app, max_body: int, max_pending: int, message_large: str):
        self.app, self.max_body, self.max_pending, self.message_large = app, max_body, max_pending, message_large
        self.pending = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != CAPTION_PATH:
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _drain(receive, DRAIN * self.max_body)    # read it (up to a bound) so the client gets the answer
            return await _reply(send, 413, self.message_large)
        if self.pending >= self.max_pending:
            return await _reply(send, 503, f"The server is busy captioning {self.pending} other photos; try again "
                                           f"in a few seconds.")
        self.pending += 1
        try:
            body = await _read_body(receive, self.max_body)
            if body is None:                    # no (or a false) Content-Length
                await _drain(receive, DRAIN * self.max_body)
                return await _reply(send, 413, self.message_large)
            try:
                scope, body = _as_json(scope, body)
            except uploads.UploadError as e:
                return await _reply(send, e.status, e.message)
            await self.app(scope, _replay(body, receive), send)
        except _Gone:
            return
        finally:
            self.pending -= 1


class _Gone(Exception):
    """The client disconnected before its body was read: nobody to answer."""


DRAIN = 4   # a refused body is read up to DRAIN x the limit before the answer (a client that is still
            # sending would see a reset connection instead of the message); beyond that the connection closes


def _header(scope, name: bytes) -> str | None:
    value = dict(scope.get("headers") or []).get(name)
    return None if value is None else value.decode("latin-1")


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it is over `limit` bytes."""
    parts, seen = [], 0
    while True:
        msg = await receive()
        if msg.get("type") != "http.request":
            raise _Gone
        parts.append(msg.get("body", b""))
        seen += len(parts[-1])
        if seen > limit:
            return None
        if not msg.get("more_body"):
            return b"".join(parts)


def _replay(body: bytes, receive):
    """An ASGI receive that gives the body read ahead in one message, then what the client sends (its disconnect)."""
    first = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return first.pop() if first else await receive()
    return replay


def _as_json(scope, body: bytes):
    """(scope, body) for the caption route: JSON as it came; a form upload as the page's own JSON (a file field
    as {"name", "data"}); another kind UploadError(415)."""
    content_type = _header(scope, b"content-type") or ""
    kind = content_type.partition(";")[0].strip().lower()
    if kind in ("", "application/json") or kind.endswith("+json"):
        return scope, body
    if kind != "multipart/form-data":
        raise uploads.UploadError(415, f"POST {CAPTION_PATH} takes JSON or a form upload, not {kind}: "
                                       f"{uploads.FORM_HINT}.")
    body = uploads.as_json(*uploads.from_multipart(content_type, body))
    drop = (b"content-type", b"content-length", b"transfer-encoding")
    headers = [(k, v) for k, v in scope.get("headers") or [] if k not in drop]
    return dict(scope, headers=headers + [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(body)).encode())]), body


async def _drain(receive, limit: int) -> None:
    seen = 0
    while seen <= limit:
        msg = await receive()
        if msg.get("type") != "http.request":
            return
        seen += len(msg.get("body", b""))
        if not msg.get("more_body"):
            return


async def _reply(send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def build_server(members: Sequence, cfg: ServeConfig, ccfg: CaptionConfig, info: dict):
    """The LitServer with the page's routes (LitServe's own "/" replaced by the page)."""
    from fastapi.responses import JSONResponse
    from pipeline.device import resolve_device
    accelerator = "cuda" if resolve_device(ccfg.device) == "cuda" else "cpu"
    large = uploads.too_large(None, None, cfg)
    server = ls.LitServer(CaptionAPI(members, cfg, ccfg), accelerator=accelerator, devices=1, workers_per_device=1,
                          timeout=cfg.timeout, disable_openapi_url=True,
                          middlewares=[(UploadGuard, {"max_body": uploads.body_limit(cfg),
                                                      "max_pending": cfg.max_pending, "message_large": large}),
                                       (HostGuard, {"host": cfg.host})])      # the last one listed is the outermost
    app = server.app
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in ("/", "/docs", "/redoc")]
    files = {"/": (ASSETS / "index.html", "text/html"), "/serve.js": (ASSETS / "serve.js", "text/javascript"),
             "/serve.css": (ASSETS / "serve.css", "text/css"), "/browse/app.js": (BROWSE_APP, "text/javascript")}
    for path, (file, media) in files.items():
        app.add_api_route(path, _file_route(file, media), methods=["GET"], include_in_schema=False)
    app.add_api_route("/api/model", lambda: JSONResponse(info), methods=["GET"], include_in_schema=False)
    return server


def _file_route(file: Path, media: str):
    """An endpoint that serves one fixed file (it takes no parameters: nothing from the request picks a path)."""
    from fastapi.responses import FileResponse

    def endpoint():
        return FileResponse(file, media_type=media, headers={"cache-control": "no-cache"})
    return endpoint


def _stop_on_signals() -> None:
    """SIGTERM (kill) and SIGINT (Ctrl-C, also when started in the background of a shell, which ignores it)
    both stop the server through LitServe's graceful shutdown, which ends its worker processes too."""
    import signal
    main = os.getpid()

    def stop(signum, frame):
        if os.getpid() != main:                  # LitServe's forked uvicorn process, being terminated: as default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def die_with_parent(parent: int) -> None:
    """End this process when `parent` (the `pipeline serve` process) ends, even by kill -9 (Linux's
    PR_SET_PDEATHSIG; elsewhere a thread that watches it), and at once when it is gone already. Without it
    LitServe's processes would go on serving, and holding the port, after their parent was killed."""
    import ctypes
    import signal
    import sys
    import threading
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(1, ctypes.c_ulong(signal.SIGKILL)) == 0   # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)
    if not armed:
        def watch():
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)
        threading.Thread(target=watch, name="watch-parent", daemon=True).start()


_FORKING = [0]     # the pid of the process that forks, as its child sees it


def _children_die_with_parent() -> None:
    """Every process forked from here on (LitServe's HTTP server and its queue manager, both of which hold the
    listening socket) ends with the process that forked it; the model worker, started fresh, does it itself."""
    os.register_at_fork(before=lambda: _FORKING.__setitem__(0, os.getpid()),
                        after_in_child=lambda: die_with_parent(_FORKING[0]))


def check_port(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds: closed connections do not count
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise UserError(f"--port {port}: 127.0.0.1:{port} is in use ({e.strerror}); pass another --port.") from e


def serve(members: Sequence | None, cfg: ServeConfig, ccfg: CaptionConfig, log=print) -> None:
    """Load the model(s) once here (every error is one UserError before anything listens), then run the
    LitServer on 127.0.0.1 until Ctrl-C."""
    if ls is None:
        raise UserError(f"pipeline serve needs the optional serving packages: {EXTRA}.")
    from pipeline.inference.caption import Captioner, default_members
    if cfg.port < 1024:
        raise UserError(f"--port {cfg.port}: must be >= 1024 (LitServe's range).")
    check_port(cfg.port)
    members = list(members) if members else default_members(ccfg, log)
    captioner = Captioner(members, ccfg, log=log)         # checks weights, sha256s and backbones up front
    info = {**describe(captioner), "beam": ccfg.beam, "max_len": getattr(captioner, "max_len", ccfg.max_len),
            "max_upload_mb": cfg.max_upload_mb, "max_pixels": cfg.max_pixels, "grid": list(captioner.grid)}
    del captioner
    server = build_server(members, cfg, ccfg, info)
    log(f"serving {info['label']} on http://127.0.0.1:{cfg.port}/ (Ctrl-C stops)")
    _stop_on_signals()
    _children_die_with_parent()
    server.run(host="127.0.0.1", port=cfg.port, num_api_servers=1, log_level="warning",
               generate_client_file=False, api_server_worker_type="process")
