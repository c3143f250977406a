"""Synthetic shapes: deterministic files, valid boxes, true and varied captions, safe regeneration."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import make_shapes
from pipeline.data import synth
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.data.text import tokenize

COLOR = "|".join(synth.COLORS)
SHAPE = "|".join(synth.SHAPES)
SIZE = "|".join(w for ws in synth.SIZE_WORDS.values() for w in ws)
NP = re.compile(rf"(?:({SIZE}) )?({COLOR}) ({SHAPE})")   # "small red circle" -> (small, red, circle)


def entries(root):
    return json.loads((root / "shapes.json").read_text())["images"]


def test_same_arguments_give_identical_files_and_rerun_is_a_noop(tmp_path):
    a = make_shapes(tmp_path / "a", 3, 1, 1, seed=7)
    b = make_shapes(tmp_path / "b", 3, 1, 1, seed=7)
    assert (a / "shapes.json").read_bytes() == (b / "shapes.json").read_bytes()
    for f in (a / "images").iterdir():
        assert f.read_bytes() == (b / "images" / f.name).read_bytes()
    before = (a / "shapes.json").stat().st_mtime_ns
    assert synth.generate(a, synth.SynthConfig(3, 1, 1, seed=7)) is False
    assert (a / "shapes.json").stat().st_mtime_ns == before
    other = make_shapes(tmp_path / "c", 3, 1, 1, seed=8)
    assert (other / "shapes.json").read_bytes() != (a / "shapes.json").read_bytes()


def test_regenerates_half_written_or_changed_sets(tmp_path):
    root = tmp_path / "s"
    assert synth.generate(root, synth.SynthConfig(4, 1, 1))
    first = (root / "images" / "train_00000.jpg").read_bytes()
    (root / "shapes.json").unlink()                       # as if interrupted before the json
    assert synth.generate(root, synth.SynthConfig(4, 1, 1)) is True
    assert synth.generate(root, synth.SynthConfig(2, 1, 0)) is True
    names = sorted(p.name for p in (root / "images").iterdir())
    assert names == ["train_00000.jpg", "train_00001.jpg", "val_00000.jpg"]   # stale images removed
    assert (root / "images" / "train_00000.jpg").read_bytes() == first      # image i does not depend on counts
    assert [e["filename"] for e in entries(root)] == names


def test_refuses_a_foreign_directory_and_bad_counts(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(UserError, match="holds no synthetic shapes set"):
        synth.generate(tmp_path, synth.SynthConfig(1, 0, 0))
    with pytest.raises(UserError, match="--train must be >= 0"):
        synth.generate(tmp_path / "new", synth.SynthConfig(-1, 0, 0))


def test_images_objects_and_boxes(shapes_root):
    for e in entries(shapes_root):
        image = Image.open(shapes_root / "images" / e["filename"])
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (224, 224)
        pixels = np.asarray(image, dtype=int)
        objects = e["objects"]
        assert 1 <= len(objects) <= 3
        assert len({(o["color"], o["shape"]) for o in objects}) == len(objects)
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224
            assert o["size"] in synth.SIZES and o["color"] in synth.COLORS and o["shape"] in synth.SHAPES
            centre = pixels[(y0 + y1) // 2, (x0 + x1) // 2]
            assert np.abs(centre - synth.COLORS[o["color"]]).max() < 45, (e["filename"], o)
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                assert synth._disjoint(a["box"], b["box"])
        corner = pixels[0, 0]
        if not any(o["box"][0] == 0 and o["box"][1] == 0 for o in objects):
            assert corner.min() > 180  # light background


def test_captions_are_true_varied_and_name_objects(tmp_path):
    root = make_shapes(tmp_path, 40, 0, 0, seed=3)
    lengths, sized = set(), 0
    for e in entries(root):
        objects = e["objects"]
        named_in_order = [(o["color"], o["shape"]) for o in synth.canonical_order(objects)]
        caps = [s["raw"] for s in e["sentences"]]
        assert len(caps) == 5 and len(set(caps)) == 5
        assert caps == synth.captions_for(objects, e["background"])   # a function of the image alone
        for cap in caps:
            words = tokenize(cap)
            lengths.add(len(words))
            for w in words:
                if w in synth.OBJECT_WORDS:
                    assert synth.objects_named_by(w, objects), (cap, objects)
            phrases = NP.findall(cap)
            # every object named exactly once, in the canonical order, with its true size when sized
            assert [(c, s) for _, c, s in phrases] == named_in_order, (cap, objects)
            for size_word, c, s in phrases:
                if size_word:
                    o = next(o for o in objects if (o["color"], o["shape"]) == (c, s))
                    assert size_word in synth.SIZE_WORDS[o["size"]], (cap, o)
                    sized += 1
            if "background" in cap:
                assert f"{e['background']} background" in cap
            if "shapes" in words:
                assert synth.COUNT_WORDS[len(objects)] in words
    assert len(lengths) >= 8 and min(lengths) <= 4 and max(lengths) >= 15
    assert sized >= 40


def test_canonical_order_depends_on_looks_not_place():
    objects = [{"color": "blue", "shape": "star", "size": "small", "box": [0, 0, 40, 40]},
               {"color": "red", "shape": "cross", "size": "large", "box": [100, 100, 180, 180]},
               {"color": "blue", "shape": "circle", "size": "medium", "box": [50, 150, 108, 208]}]
    assert [(o["color"], o["shape"]) for o in synth.canonical_order(objects)] == \
        [("red", "cross"), ("blue", "circle"), ("blue", "star")]
    moved = [dict(o, box=b) for o, b in zip(objects, [o["box"] for o in objects[::-1]])]
    assert synth.captions_for(moved, "plain") == synth.captions_for(objects, "plain")
    assert synth.captions_for(objects, "plain")[0] == "a red cross , a blue circle and a blue star"
    assert synth.captions_for(objects[:1], "plain") == [
        "a blue star", "a small blue star", "there is a small blue star", "a single blue star",
        "a blue star on a plain background"]


def test_objects_named_by():
    objects = [{"color": "red", "shape": "circle", "box": [0, 0, 10, 10]},
               {"color": "blue", "shape": "circle", "box": [20, 20, 30, 30]},
               {"color": "red", "shape": "cross", "box": [40, 40, 50, 50]}]
    boxes = lambda w: [o["box"] for o in synth.objects_named_by(w, objects)]   # noqa: E731
    assert boxes("red") == [[0, 0, 10, 10], [40, 40, 50, 50]]
    assert boxes("circles") == [[0, 0, 10, 10], [20, 20, 30, 30]]
    assert boxes("crosses") == [[40, 40, 50, 50]]
    assert synth.object_word("Crosses") == ("shape", "cross") and synth.object_word("the") is None
    assert synth.objects_named_by("green", objects) == []
    assert synth.objects_named_by("the", objects) == []


def test_cli_synth(tmp_path):
    out = tmp_path / "shapes"
    args = ["synth", "--out", str(out), "--train", "2", "--val", "1", "--test", "1", "--seed", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "wrote 4 images" in result.output
    again = CliRunner().invoke(main, args)
    assert "already complete" in again.output
    counts = CliRunner().invoke(main, ["datasets", "shapes", "--root", str(out)])
    assert "test            1         5" in counts.output
