"""What the captioning page may upload, checked before any model sees it: one clear message per bad file.

    check_upload(name, data, cfg) -> PIL image, or UploadError(status, message)

    from_multipart(content_type, body) -> (name, bytes) of the first file of a form upload (curl -F file=@x)
    check_host(host, extra) -> None, or the message for a Host header that is not this server's name

Refused, each with its own message: an empty file (400), a file over `max_upload_mb` (413), bytes that
are not base64 (400), a form upload that cannot be parsed or has no file (400), a file Pillow cannot read
as an image (415), an image with more than `max_pixels` pixels, a decompression bomb (413). The image is
decoded in memory (never written to disk). A request whose Host is not a local name (DNS rebinding: a web
page that names its own host but reaches 127.0.0.1) is refused (400) before it reaches any route.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
from email.parser import BytesHeaderParser
from email.policy import HTTP

from pipeline.config import ServeConfig
from pipeline.errors import UserError


class UploadError(Exception):
    """An upload the page must refuse: HTTP status and the one-line message shown on the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def limit_bytes(cfg: ServeConfig) -> int:
    return int(cfg.max_upload_mb * 1e6)


def body_limit(cfg: ServeConfig) -> int:
    """Largest request body: the photo base64'd (4/3) in a small JSON object."""
    return limit_bytes(cfg) * 4 // 3 + 64 * 1024


def too_large(name: str | None, size: int | None, cfg: ServeConfig) -> str:
    what = f"{name}: {size / 1e6:.1f} MB is" if name and size else "The photo is"
    return f"{what} over the {cfg.max_upload_mb:g} MB limit of this page. Pick a smaller photo (or downscale it)."


def decode_b64(name: str, data: str, cfg: ServeConfig) -> bytes:
    if len(data) > limit_bytes(cfg) * 4 // 3 + 4:
        raise UploadError(413, too_large(name, len(data) * 3 // 4, cfg))
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise UploadError(400, f"{name}: the upload is not base64 data ({e}); upload the file from the page.") from e
    return raw


def check_upload(name: str, raw: bytes, cfg: ServeConfig):
    """The PIL image of an uploaded file (loaded, not converted), or UploadError."""
    from pipeline.inference.caption import open_image
    name = (name or "the file").strip()[:200] or "the file"
    if not raw:
        raise UploadError(400, f"{name}: the file is empty (0 bytes). Pick a photo (JPEG or PNG).")
    if len(raw) > limit_bytes(cfg):
        raise UploadError(413, too_large(name, len(raw), cfg))
    with _no_pillow_limit():       # --max-pixels is the limit, also above Pillow's own
        pixels = _pixels(raw)
        if pixels and pixels[0] * pixels[1] > cfg.max_pixels:
            w, h = pixels
            raise UploadError(413, f"{name}: the image has {w * h:,} pixels ({w}x{h}), over --max-pixels "
                                   f"{cfg.max_pixels:,} (a guard against decompression bombs). Downscale it, or, if "
                                   f"you trust the file, restart pipeline serve with --max-pixels {w * h} or more.")
        try:
            return open_image(io.BytesIO(raw), name, max_pixels=cfg.max_pixels)
        except UserError as e:
            raise UploadError(415, str(e)) from e


@contextlib.contextmanager
def _no_pillow_limit():
    """Pillow's own decompression-bomb check off (the caller checks the size first); restored after."""
    from PIL import Image
    old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _pixels(raw: bytes) -> tuple[int, int] | None:
    """(width, height) from the image's header (nothing decoded); None when Pillow cannot read it."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(raw)) as im:
            return im.size
    except Exception:  # noqa: BLE001  (any unreadable file: open_image gives its message)
        return None


# -- form uploads ------------------------------------------------------------------------------------
FORM_HINT = "send the photo as a file field (curl -F file=@photo.jpg), or JSON {\"name\", \"data\": base64}"


def _headers(block: bytes):
    """A block of MIME headers, parsed (get_param('boundary'), get_filename())."""
    return BytesHeaderParser(policy=HTTP).parsebytes(block + b"\r\n\r\n")


def from_multipart(content_type: str, body: bytes) -> tuple[str, bytes]:
    """(file name, bytes) of the first file part of a multipart/form-data body, or UploadError(400)."""
    boundary = _headers(b"content-type: " + content_type.encode("latin-1", "replace")).get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise UploadError(400, f"the form upload has no boundary in its Content-Type; {FORM_HINT}.")
    delimiter = b"\r\n--" + boundary.encode("latin-1", "replace")
    chunks = (b"\r\n" + body).split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise UploadError(400, f"the form upload is not a complete multipart body (no closing boundary); {FORM_HINT}.")
    for chunk in chunks[1:-1]:
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise UploadError(400, f"a part of the form upload has no blank line after its headers; {FORM_HINT}.")
        name = _headers(head.lstrip(b" \t").removeprefix(b"\r\n")).get_filename()
        if name is not None:                    # a file field (a plain field has no filename)
            return name.strip() or "photo", data
    raise UploadError(400, f"the form upload has no file field; {FORM_HINT}.")


def as_json(name: str, raw: bytes) -> bytes:
    """The body the page itself sends for a photo: {"name", "data": base64}."""
    return json.dumps({"name": name, "data": base64.b64encode(raw).decode()}).encode()


# -- the Host header ------------------------------------------------------------------------------
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def host_name(host: str) -> str:
    """The name of a Host header, without its port or brackets, lower case: '[::1]:8008' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        name, closed, _ = host[1:].partition("]")
        return name if closed else host
    name, _, port = host.rpartition(":")
    return (name if name and port.isdigit() else host).rstrip(".")


def check_host(host: str | None, extra: str = "") -> str | None:
    """None when `host` (a Host header; None: absent, as HTTP/1.0 allows) names this server, else the
    message that refuses it: only local names are answered, and `extra` (--host)."""
    if host is None:
        return None
    allowed = LOCAL_NAMES + ((host_name(extra),) if extra else ())
    if host_name(host) in allowed:
        return None
    return (f"Host {host[:100]!r} is not a name of this server: pipeline serve answers requests to "
            f"{', '.join(n if ':' not in n else f'[{n}]' for n in allowed)} only (a web page of another site must "
            f"not reach it). Open the page as http://127.0.0.1:PORT/, or start pipeline serve with --host NAME "
            f"to be reached as NAME.")
