"""Shared test fixtures: tiny datasets written into tmp directories (never the shared data).

Helpers (plain functions, also importable: `from conftest import make_shapes, make_flickr8k`):
    make_shapes(tmp_path, n_train, n_val, n_test, seed=0) -> Path     synthetic shapes set root
    make_flickr8k(tmp_path, n_train, n_val, n_test, ...) -> Path      Flickr8k-layout set root
Fixtures:
    shapes_root      session-wide 8/4/4 synthetic set (treat as read-only)
    shapes_factory   callable(n_train=6, n_val=2, n_test=2, seed=0) -> Path, in this test's tmp_path
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

SHARED_FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "flickr8k"


def make_shapes(tmp_path: Path, n_train: int = 6, n_val: int = 2, n_test: int = 2, seed: int = 0) -> Path:
    """Generate a tiny synthetic shapes set (224x224 JPEGs, 5 captions, boxes) under tmp_path; return its root."""
    from pipeline.data import synth

    root = Path(tmp_path) / f"shapes_{n_train}_{n_val}_{n_test}_{seed}"
    synth.generate(root, synth.SynthConfig(train=n_train, val=n_val, test=n_test, seed=seed))
    return root


def make_flickr8k(tmp_path: Path, n_train: int = 4, n_val: int = 2, n_test: int = 2, *, n_unsplit: int = 1,
                  bogus: bool = True, test_captions: bool = False, karpathy_json: bool = True,
                  image_size: int = 32) -> Path:
    """A tiny Flickr8k in the official layout (token file, three split lists, images/) plus its
    Karpathy json, mimicking the shared copy: blind test split, the bogus `.jpg.1` entry, and
    images in no split. Image k of the set is a solid colour; names are `<k>_abc.jpg`."""
    root = Path(tmp_path) / "flickr8k"
    (root / "images").mkdir(parents=True)
    counts = {"train": n_train, "val": n_val, "test": n_test, "": n_unsplit}
    names, split_of = [], {}
    for split, n in counts.items():
        for _ in range(n):
            name = f"{1000 + len(names)}_abc.jpg"
            names.append(name)
            split_of[name] = split
    for k, name in enumerate(names):
        Image.new("RGB", (image_size, image_size), (40 * k % 256, 90, 200)).save(root / "images" / name)

    def captions(name: str) -> list[str]:
        return [f"A dog number {name[:4]} runs , take {j} ." for j in range(5)]

    lines = []
    for name in names:
        if split_of[name] == "test" and not test_captions:
            continue
        lines += [f"{name}#{j}\t{c}" for j, c in enumerate(captions(name))]
        if bogus and name == names[0]:
            lines += [f"{name}.1#{j}\tpeople waiting for the subway" for j in range(5)]
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    for split, fname in (("train", "Flickr_8k.trainImages.txt"), ("val", "Flickr_8k.devImages.txt"),
                         ("test", "Flickr_8k.testImages.txt")):
        (root / fname).write_text("\n".join(n for n in names if split_of[n] == split))  # no final newline, as shipped
    if karpathy_json:
        images = [{"filename": n, "split": split_of[n],
                   "sentences": [] if split_of[n] == "test" and not test_captions
                   else [{"raw": c, "tokens": c.lower().split()} for c in captions(n)]}
                  for n in names if split_of[n]]
        (root / "dataset_flickr8k.json").write_text(json.dumps({"dataset": "flickr8k", "images": images}))
    return root


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), 8, 4, 4)


@pytest.fixture
def shapes_factory(tmp_path):
    def factory(n_train: int = 6, n_val: int = 2, n_test: int = 2, seed: int = 0) -> Path:
        return make_shapes(tmp_path, n_train, n_val, n_test, seed)
    return factory


@pytest.fixture(autouse=True)
def _spice_only_where_asked(request, monkeypatch):
    """SPICE (when `make spice` installed it) costs ~15 s of Java start-up per scoring call: tests that
    score run without it unless marked `spice` (tests/test_spice.py runs the real thing)."""
    if request.node.get_closest_marker("spice") is None:
        import pipeline.inference.score
        monkeypatch.setattr(pipeline.inference.score, "spice_available", lambda: False)
