"""What made an artefact: code version, hashes. Checked wherever two artefacts meet."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from pipeline import __version__


def code_version() -> str:
    """Package version plus the git commit (and '+dirty') when run from a checkout."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    if not sha:
        return __version__
    return f"{__version__}+g{sha}{'.dirty' if dirty else ''}"


def file_digest(path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


def sha256_strings(items) -> str:
    """Order-sensitive hash of a sequence of strings (e.g. the image ids of a split)."""
    h = hashlib.sha256()
    for s in items:
        h.update(s.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
