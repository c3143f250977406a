"""Synthetic "shapes" dataset: 224x224 images of 1-3 coloured shapes with true captions and boxes.

Small enough to extract and train on a CPU in minutes, and every object's box is known, so
attention can be scored against ground truth (`objects_named_by`). Generation is deterministic:
image i of a split depends only on (seed, split, i), so the same arguments give identical files.

Layout written under OUT:
    images/<split>_<i:05d>.jpg   224x224 RGB JPEG
    shapes.json                  Karpathy-like: images[*].{filename, split, sentences[*].raw,
                                 objects[*].{color, shape, size, box [x0,y0,x1,y1]}} + "params"
    README.txt
shapes.json is written last (tmp + rename): a set without it is incomplete and is regenerated.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import UserError

IMAGE_SIZE = 224
GENERATOR_VERSION = 2           # bump when the pictures or captions change: old sets are regenerated
SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}

# The words that name objects. Every colour or shape word in a caption names an object in the image.
COLORS = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (40, 75, 215),
    "yellow": (235, 205, 25),
    "purple": (135, 55, 170),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
SIZES = {"small": 40, "medium": 58, "large": 80}        # side of the object's square slot, pixels
SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium",), "large": ("large", "big")}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
OBJECT_WORDS = frozenset(COLORS) | frozenset(SHAPES) | frozenset(PLURALS.values())

GAP = 8          # minimum free pixels between two objects' boxes (keeps them non-overlapping)
MARGIN = 4       # minimum free pixels between a box and the image border


@dataclass
class SynthConfig:
    train: int = 500        # small by default: the demo extracts these with VGG19 on a CPU (~4 img/s)
    val: int = 100
    test: int = 100         # unlike Flickr8k, the synthetic test split has captions
    seed: int = 0
    captions_per_image: int = 5
    max_objects: int = 3
    jpeg_quality: int = 95

    def counts(self) -> dict[str, int]:
        return {"train": self.train, "val": self.val, "test": self.test}


# ---- object words (used by scoring) -------------------------------------------------------------

def objects_named_by(word: str, objects: list[dict]) -> list[list[int]]:
    """Boxes of the objects a caption word names ("red" -> all red objects, "circles" -> all circles).

    Words that name no object (articles, sizes, positions) give [].
    """
    word = word.lower()
    singular = {p: s for s, p in PLURALS.items()}.get(word, word)
    if word in COLORS:
        return [list(o["box"]) for o in objects if o["color"] == word]
    if singular in SHAPES:
        return [list(o["box"]) for o in objects if o["shape"] == singular]
    return []


# ---- drawing ------------------------------------------------------------------------------------

def _shape_points(shape: str, x0: float, y0: float, side: float) -> list[tuple[float, float]]:
    """Polygon of a shape inside the square slot (x0, y0, side); circles are handled apart."""
    x1, y1, cx, cy = x0 + side, y0 + side, x0 + side / 2, y0 + side / 2
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "cross":
        t = side / 6  # half the arm width
        return [(cx - t, y0), (cx + t, y0), (cx + t, cy - t), (x1, cy - t), (x1, cy + t), (cx + t, cy + t),
                (cx + t, y1), (cx - t, y1), (cx - t, cy + t), (x0, cy + t), (x0, cy - t), (cx - t, cy - t)]
    if shape == "star":
        r_out, r_in = side / 2, side / 5
        return [(cx + (r_out if k % 2 == 0 else r_in) * math.sin(k * math.pi / 5),
                 cy - (r_out if k % 2 == 0 else r_in) * math.cos(k * math.pi / 5)) for k in range(10)]
    raise ValueError(shape)


def _draw(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, side: int, fill) -> list[int]:
    """Draw one shape; return its tight box [x0, y0, x1, y1] (x1, y1 exclusive) in pixels."""
    if shape == "circle":
        draw.ellipse([x0, y0, x0 + side - 1, y0 + side - 1], fill=fill)
        return [x0, y0, x0 + side, y0 + side]
    pts = _shape_points(shape, x0, y0, side - 1)
    draw.polygon(pts, fill=fill)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return [math.floor(min(xs)), math.floor(min(ys)), math.ceil(max(xs)) + 1, math.ceil(max(ys)) + 1]


def _background(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A light plain or lightly textured background: (H, W, 3) uint8 and the word for it."""
    base = rng.integers(215, 246) + rng.integers(-8, 9, size=3)
    img = np.broadcast_to(base, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    textured = rng.random() < 0.5
    if textured:
        img = img + rng.normal(0, 6, size=(IMAGE_SIZE, IMAGE_SIZE, 1))           # grain
        img = img + np.linspace(-8, 8, IMAGE_SIZE)[:, None, None] * rng.choice([-1, 1])  # soft gradient
    return np.clip(img, 0, 255).astype(np.uint8), "textured" if textured else "plain"


def _disjoint(a, b) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _layout(rng: np.random.Generator, n: int) -> list[dict]:
    """n objects with distinct (colour, shape) pairs in non-overlapping slots."""
    while True:
        pairs = [(c, s) for c in COLORS for s in SHAPES]
        chosen = [pairs[k] for k in rng.choice(len(pairs), size=n, replace=False)]
        objects, slots = [], []
        for color, shape in chosen:
            size = str(rng.choice(list(SIZES)))
            side = SIZES[size]
            for _ in range(100):
                x0 = int(rng.integers(MARGIN, IMAGE_SIZE - MARGIN - side + 1))
                y0 = int(rng.integers(MARGIN, IMAGE_SIZE - MARGIN - side + 1))
                slot = [x0, y0, x0 + side, y0 + side]
                if all(_disjoint(slot, s) for s in slots):
                    break
            else:
                break  # no room: draw a new layout
            slots.append(slot)
            objects.append({"color": color, "shape": shape, "size": size, "slot": slot})
        if len(objects) == n:
            return objects


def render(rng: np.random.Generator, max_objects: int = 3) -> tuple[Image.Image, list[dict], str]:
    """One image, its objects (color, shape, size, box) and the background word."""
    pixels, background = _background(rng)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    objects = []
    for o in _layout(rng, int(rng.integers(1, max_objects + 1))):
        fill = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLORS[o["color"]])
        x0, y0, _, _ = o.pop("slot")
        o["box"] = _draw(draw, o["shape"], x0, y0, SIZES[o["size"]], fill)
        objects.append(o)
    return image, objects, background


# ---- captions -----------------------------------------------------------------------------------

def _center(o) -> tuple[float, float]:
    x0, y0, x1, y1 = o["box"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def position(o) -> str:
    """Where an object is in the image, e.g. "on the left", "in the top right corner", "in the middle"."""
    cx, cy = _center(o)
    lo, hi = 0.38 * IMAGE_SIZE, 0.62 * IMAGE_SIZE
    h = "left" if cx < lo else "right" if cx > hi else ""
    v = "top" if cy < lo else "bottom" if cy > hi else ""
    if h and v:
        return f"in the {v} {h} corner"
    if h:
        return f"on the {h}"
    if v:
        return f"at the {v}"
    return "in the middle"


def relation(a, b) -> str:
    """a's place relative to b along the axis where they are further apart ("above", "to the left of").

    Boxes never overlap, so they are separated along at least one axis; we name that axis
    when it is also the dominant one, which keeps the phrase true and natural.
    """
    (ax, ay), (bx, by) = _center(a), _center(b)
    sep_x = a["box"][2] <= b["box"][0] or b["box"][2] <= a["box"][0]
    sep_y = a["box"][3] <= b["box"][1] or b["box"][3] <= a["box"][1]
    use_x = sep_x and (abs(ax - bx) >= abs(ay - by) or not sep_y)
    if use_x:
        return "to the left of" if ax < bx else "to the right of"
    return "above" if ay < by else "below"


def _np(o, sized=False) -> str:
    """Noun phrase without article: "[size] colour shape"."""
    size = f"{SIZE_WORDS[o['size']][0]} " if sized else ""
    return f"{size}{o['color']} {o['shape']}"


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def captions_for(objects: list[dict], background: str, k: int = 5) -> list[str]:
    """Five true captions of different templates and lengths, each a function of the image alone.

    Objects are named left to right and every template is used for every image, so one image has
    one correct wording per template: a model that learns the scene can match a reference exactly
    (random template draws or object orders would cap BLEU for any model, however good).
    """
    order = sorted(objects, key=lambda o: _center(o))          # left to right, then top to bottom
    if len(order) == 1:
        o = order[0]
        out = [
            _a(_np(o)),
            _a(_np(o, True)),
            f"{_a(_np(o))} {position(o)}",
            f"there is {_a(_np(o, True))} {position(o)}",
            f"a single {_np(o)} on a {background} background",
        ]
    else:
        a, b, rest = order[0], order[1], order[2:]
        listed = " , ".join(_a(_np(o)) for o in order[:-1]) + f" and {_a(_np(order[-1]))}"
        count = COUNT_WORDS[len(order)]
        pair = f"{_a(_np(a))} {relation(a, b)} {_a(_np(b))}"
        if rest:
            pair += f" , and {_a(_np(rest[0]))} {position(rest[0])}"
        out = [
            listed,
            f"{count} shapes : {listed}",
            pair,
            f"there are {count} shapes , " + " and ".join(f"{_a(_np(o, True))} {position(o)}" for o in order),
            f"{listed} on a {background} background",
        ]
    return out[:k]


# ---- writing a set ------------------------------------------------------------------------------

def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: independent of how many other images the set has."""
    return np.random.default_rng([seed, SPLIT_INDEX[split], index])


def _params(cfg: SynthConfig) -> dict:
    return {**asdict(cfg), "generator_version": GENERATOR_VERSION, "image_size": IMAGE_SIZE}


def is_complete(out: str | Path, cfg: SynthConfig) -> bool:
    """True if `out` holds a finished set made with exactly these parameters."""
    out = Path(out)
    try:
        meta = json.loads((out / "shapes.json").read_text())
    except (OSError, ValueError):
        return False
    if meta.get("params") != _params(cfg):
        return False
    return all((out / "images" / im["filename"]).is_file() for im in meta.get("images", []))


README = """Synthetic shapes dataset written by pipeline.synth (do not edit; regenerate with `pipeline synth`).

Parameters: {params}

images/<split>_<index>.jpg   {size}x{size} RGB JPEG, 1-{max_objects} non-overlapping coloured shapes
shapes.json                  images[*].{{filename, split, sentences[*].raw,
                             objects[*].{{color, shape, size, box [x0, y0, x1, y1]}}}}
Boxes are pixels in the {size}x{size} image, x1/y1 exclusive. Every caption is true of its image;
its colour words ({colors}) and shape words ({shapes}) name objects in it.
Read it with `pipeline.datasets.load_records("shapes", root)`.
"""


def generate(out: str | Path, cfg: SynthConfig | None = None) -> bool:
    """Write the set to `out`; a no-op (returns False) if an identical finished set is there."""
    cfg = cfg or SynthConfig()
    out = Path(out)
    for split, n in cfg.counts().items():
        if n < 0:
            raise UserError(f"synth: --{split} must be >= 0 (got {n}).")
    if not 1 <= cfg.max_objects <= 3:
        raise UserError(f"synth: max_objects must be 1..3 (got {cfg.max_objects}).")
    if is_complete(out, cfg):
        return False
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another --out.")
    if out.exists() and any(out.iterdir()) and not (out / "README.txt").is_file() and not (out / "shapes.json").exists():
        raise UserError(f"{out}: directory is not empty and holds no synthetic shapes set; "
                        f"choose an empty or new --out directory.")

    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    (out / "shapes.json").unlink(missing_ok=True)  # from here on the set reads as incomplete
    params = _params(cfg)
    (out / "README.txt").write_text(README.format(
        params=json.dumps(params, sort_keys=True), size=IMAGE_SIZE, max_objects=cfg.max_objects,
        colors=", ".join(COLORS), shapes=", ".join(SHAPES)))

    entries = []
    for split, n in cfg.counts().items():
        for i in range(n):
            rng = image_rng(cfg.seed, split, i)
            image, objects, background = render(rng, cfg.max_objects)
            captions = captions_for(objects, background, cfg.captions_per_image)
            filename = f"{split}_{i:05d}.jpg"
            image.save(images_dir / filename, "JPEG", quality=cfg.jpeg_quality)
            entries.append({"filename": filename, "split": split, "background": background,
                            "sentences": [{"raw": c} for c in captions], "objects": objects})

    keep = {e["filename"] for e in entries}
    for stale in images_dir.glob("*_[0-9][0-9][0-9][0-9][0-9].jpg"):  # left by a larger earlier set
        if stale.name not in keep:
            stale.unlink()

    tmp = out / "shapes.json.tmp"
    tmp.write_text(json.dumps({"dataset": "shapes", "params": params, "images": entries}, indent=1))
    os.replace(tmp, out / "shapes.json")
    return True
