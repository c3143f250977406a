"""`pipeline serve`: a captioning page on 127.0.0.1, served by LitServe (the optional `serve` extra).

    pipeline serve [--model NAME | --run RUN ...] [--port 8008]

    GET  /                 the page (assets/index.html, serve.js, serve.css)
    GET  /browse/app.js    the results browser's script, whose attention overlay the page draws with
    GET  /api/model        what is loaded: members, backbones, val scores, limits
    POST /api/caption      {"name", "data": base64 photo} -> caption, every final beam with its score, and
                           each beam's per-word attention maps (uint8, base64, as the results browser's)
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
the page), and UploadGuard refuses bodies over the size limit (413) and more than `max_pending` uploads
at once (503, "busy") before they reach the model.
"""
import json
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

        def setup(self, device):
            from dataclasses import replace

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


class UploadGuard:
    """ASGI middleware in front of /api/caption: a body over the limit gets 413 without reaching the app
    (read and dropped up to DRAIN x the limit, so that the client gets the answer), and more than
    `max_pending` uploads at once get 503 (busy); both with {"detail": message}."""

    def __init__(self, app, max_body: int, max_pending: int, message_large: str):
        self.app, self.max_body, self.max_pending, self.message_large = app, max_body, max_pending, message_large
        self.pending = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != CAPTION_PATH:
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _drain(receive, DRAIN * self.max_body)    # read it (up to a bound) so the client gets the answer
            return await _reply(send, 413, self.message_large)
        if self.pending >= self.max_pending:
            return await _reply(send, 503, f"The server is busy captioning {self.pending} other photos; try again "
                                           f"in a few seconds.")
        self.pending += 1
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.max_body:            # no (or a false) Content-Length
                raise _TooLarge
            return msg
        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await _drain(receive, DRAIN * self.max_body)
            await _reply(send, 413, self.message_large)
        finally:
            self.pending -= 1


class _TooLarge(Exception):
    pass


DRAIN = 4   # a refused body is read up to DRAIN x the limit before the answer (a client that is still
            # sending would see a reset connection instead of the message); beyond that the connection closes


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
                                                      "max_pending": cfg.max_pending, "message_large": large})])
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
    import os
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


def check_port(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
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
    server.run(host="127.0.0.1", port=cfg.port, num_api_servers=1, log_level="warning",
               generate_client_file=False, api_server_worker_type="process")
