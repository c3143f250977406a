"""The files `pipeline caption` writes: the --out captions file (JSONL or CSV) and the attention pictures.

--out gets one row per photo as it is captioned: path (the resolved photo), caption, model, attention (the
picture, when one is written). Each row is one write() of a complete line, so a killed run leaves at most a
torn last line, which is dropped when the file is next opened; a file that is not such a captions file is
never written to. An attention PNG carries a stamp, a tEXt chunk right after IHDR (keyword STAMP, the
photo's key), so a later run knows which pictures it may replace and which files are not photos.
"""
from __future__ import annotations

import csv
import io
import json
import os
import zlib
from pathlib import Path
from typing import Callable

from pipeline.errors import UserError
from pipeline.fileio import atomic_write, disk_error, fresh_file

FIELDS = ("path", "caption", "model", "attention")
STAMP = b"pipeline-attention"          # the tEXt keyword of the attention PNGs written here
_PNG = b"\x89PNG\r\n\x1a\n"


# -- attention pictures --------------------------------------------------------------------------------
def png_texts(path: Path) -> dict[bytes, bytes]:
    """The tEXt chunks before the image data of a PNG file (not a link); {} for any other file."""
    path, texts = Path(path), {}
    if path.is_symlink() or not path.is_file():
        return texts
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return texts
    i = 8 if head[:8] == _PNG else len(head)
    while i + 8 <= len(head) and head[i + 4:i + 8] != b"IDAT":
        n = int.from_bytes(head[i:i + 4], "big")
        if head[i + 4:i + 8] == b"tEXt":
            key, _, text = head[i + 8:i + 8 + n].partition(b"\0")
            texts[key] = text
        i += 12 + n
    return texts


def stamped(path: Path) -> str | None:
    """The photo key an attention PNG written here carries; None for any other file (or a link)."""
    key = png_texts(path).get(STAMP)
    return None if key is None else key.decode("ascii", "replace")


def replaceable(path: Path) -> bool:
    """Whether --attention may write `path`: nothing there, a picture stamped here, or a matplotlib PNG (the
    attention figures of versions before the stamp: a figure, never a photo)."""
    if not os.path.lexists(path):
        return True
    texts = png_texts(path)
    return STAMP in texts or texts.get(b"Software", b"").startswith(b"Matplotlib")


def stamp_png(data: bytes, key: str) -> bytes:
    """`data` (a PNG) with a tEXt chunk STAMP=key right after its IHDR chunk."""
    if data[:8] != _PNG or data[12:16] != b"IHDR":
        return data
    body = STAMP + b"\0" + key.encode("ascii")
    chunk = len(body).to_bytes(4, "big") + b"tEXt" + body + zlib.crc32(b"tEXt" + body).to_bytes(4, "big")
    return data[:33] + chunk + data[33:]


def write_picture(draw: Callable, out: Path, key: str, *args, **kw) -> Path:
    """draw(*args, tmp, **kw) into a temporary beside `out`, stamped with the photo's `key` (PNG), then renamed
    over `out`: a picture is whole or absent, and nothing is written through a link."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")     # the suffix picks matplotlib's format
    try:
        fresh_file(tmp)
        draw(*args, tmp, **kw)
        if out.suffix.lower() == ".png":
            tmp.write_bytes(stamp_png(tmp.read_bytes(), key))
        os.replace(tmp, out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise disk_error(out, e) from e
        raise
    return out


# -- the captions file ----------------------------------------------------------------------------------
class CaptionsFile:
    """--out: the rows written so far (read once: `done`, `models`), then one appended line per caption."""

    def __init__(self, path: Path, log=print):
        self.path, self.fd = self.check_name(path), None
        self.csv = self.path.suffix.lower() == ".csv"
        rows = self._read(log)
        self.done = {r["path"] for r in rows}
        self.models = sorted({r["model"] for r in rows})

    @staticmethod
    def check_name(path: Path) -> Path:
        if Path(path).suffix.lower() not in (".jsonl", ".csv"):
            raise UserError(f"--out {path}: name a .jsonl or .csv file (one row per photo).")
        return Path(path)

    def _read(self, log) -> list[dict]:
        p = self.path
        if p.is_symlink() or (p.exists() and not p.is_file()):
            raise UserError(f"--out {p}: not a regular file (a folder or a link); nothing is written through it. "
                            f"Choose another --out.")
        if not p.exists():
            return []
        data = p.read_bytes()
        whole = data[:data.rfind(b"\n") + 1]
        try:
            rows = (_csv_rows if self.csv else _jsonl_rows)(whole.decode("utf-8", "surrogateescape"))
            self._check_tail(data[len(whole):], whole)
        except (ValueError, csv.Error) as e:
            raise UserError(f"--out {p}: not a captions file written by `pipeline caption` ({e}), so it is never "
                            f"written to. Choose another --out.") from None
        if len(whole) < len(data):
            atomic_write(p, lambda tmp: tmp.write_bytes(whole))
            log(f"{p}: dropped an incomplete last line (a run stopped while writing it).")
        return rows

    def _check_tail(self, tail: bytes, whole: bytes) -> None:
        """A torn last line is the start of a row this class writes (else the file is not ours: ValueError)."""
        start = (",".join(FIELDS) + "\n").encode() if self.csv and not whole else b"" if self.csv else b'{"path": '
        n = min(len(tail), len(start))
        if tail[:n] != start[:n]:
            raise ValueError("its last line is not a row")

    def check_model(self, model: str) -> None:
        if any(m != model for m in self.models):
            raise UserError(f"--out {self.path}: holds captions by {', '.join(self.models)}, not {model}; adding "
                            f"to it would mix models. Choose another --out, or caption with that model.")

    def add(self, path: str, caption: str, model: str, attention: str = "") -> None:
        """One complete row, written with one write() and flushed to the file."""
        if self.csv:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerow([path, caption, model, attention])
            line = buf.getvalue()
        else:
            row = {"path": path, "caption": caption, "model": model, **({"attention": attention} if attention else {})}
            line = json.dumps(row, ensure_ascii=False) + "\n"
        data = line.encode("utf-8", "surrogateescape")
        try:
            if self.fd is None:
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                self.fd = os.open(self.path, flags, 0o644)
                if self.csv and os.fstat(self.fd).st_size == 0:
                    data = (",".join(FIELDS) + "\n").encode() + data
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as e:
            raise disk_error(self.path, e) from e

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.fsync(self.fd)
            except OSError as e:
                raise disk_error(self.path, e) from e
            finally:
                os.close(self.fd)
                self.fd = None


def _jsonl_rows(text: str) -> list[dict]:
    rows = []
    for i, line in enumerate(text.split("\n"), 1):       # (not splitlines: U+2028 may be in a caption)
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise ValueError(f"line {i}: {e}") from None
        if not (isinstance(r, dict) and isinstance(r.get("path"), str) and isinstance(r.get("caption"), str)
                and isinstance(r.get("model"), str)):
            raise ValueError(f"line {i} is not a row of path, caption and model")
        rows.append(r)
    return rows


def _csv_rows(text: str) -> list[dict]:
    table = list(csv.reader(io.StringIO(text)))
    if table and tuple(table[0]) != FIELDS:
        raise ValueError(f"its header is not {','.join(FIELDS)}")
    for i, r in enumerate(table[1:], 2):
        if len(r) != len(FIELDS):
            raise ValueError(f"row {i} has {len(r)} fields, not {len(FIELDS)}")
    return [dict(zip(FIELDS, r)) for r in table[1:]]
