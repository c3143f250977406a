"""What the captioning page may upload, checked before any model sees it: one clear message per bad file.

    check_upload(name, data, cfg) -> PIL image, or UploadError(status, message)

Refused, each with its own message: an empty file (400), a file over `max_upload_mb` (413), bytes that
are not base64 (400), a file Pillow cannot read as an image (415), an image with more than
`max_pixels` pixels, a decompression bomb (413). The image is decoded in memory (never written to disk).
"""
from __future__ import annotations

import base64
import binascii
import io

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
    try:
        return open_image(io.BytesIO(raw), name, max_pixels=cfg.max_pixels)
    except UserError as e:
        status = 413 if "decompression-bomb" in str(e) else 415
        raise UploadError(status, str(e)) from e
