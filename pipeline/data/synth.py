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

from pipeline.errors import UserError

IMAGE_SIZE = 224
GENERATOR_VERSION = 3           # bump when the pictures or captions change: old sets are regenerated
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

def object_word(word: str) -> tuple[str, str] | None:
    """("color", "red") / ("shape", "circle") for a word naming objects ("circles" -> circle), else None."""
    word = word.lower()
    if word in COLORS:
        return "color", word
    singular = {p: s for s, p in PLURALS.items()}.get(word, word)
    return ("shape", singular) if singular in SHAPES else None


def objects_named_by(word: str, objects: list[dict]) -> list[dict]:
    """The objects a caption word names ("red" -> all red objects, "circles" -> all circles).

    Words that name no object (articles, sizes, counts) give [].
    """
    named = object_word(word)
    if named is None:
        return []
    kind, value = named
    return [o for o in objects if str(o[kind]).lower() == value]


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

def _np(o, sized=False) -> str:
    """Noun phrase without article: "[size] colour shape"."""
    size = f"{SIZE_WORDS[o['size']][0]} " if sized else ""
    return f"{size}{o['color']} {o['shape']}"


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def canonical_order(objects: list[dict]) -> list[dict]:
    """Objects in the order captions name them: by colour, then shape, in the order of COLORS and SHAPES.

    The order depends on what each object looks like, not on where it is: conv5_4 features keep
    an object's shape and colour but hardly its position (docs/tuning.md: a linear probe recovers
    shape 100%, colour 92%, which third of the image an object is in 62% against 40% by majority),
    so captions that name objects left to right, or say "on the left", cap BLEU for any decoder on
    these features. (A layout never repeats a colour-shape pair, so the order is total.)
    """
    colors, shapes = list(COLORS), list(SHAPES)
    return sorted(objects, key=lambda o: (colors.index(o["color"]), shapes.index(o["shape"])))


def captions_for(objects: list[dict], background: str, k: int = 5) -> list[str]:
    """Five true captions of different templates and lengths, each a function of the image alone.

    Every template is used for every image and objects are named in `canonical_order`, so an image
    has one correct wording per template: a model that sees the scene can match a reference exactly
    (random template draws or object orders would cap BLEU for any model, however good). Naming
    each object's shape after its colour is what needs attention: the decoder must look at the
    object of that colour to read its shape (and size).
    """
    order = canonical_order(objects)
    listed = " , ".join(_a(_np(o)) for o in order[:-1]) + (" and " if len(order) > 1 else "") + _a(_np(order[-1]))
    sized = " , ".join(_a(_np(o, True)) for o in order[:-1]) + (" and " if len(order) > 1 else "") \
        + _a(_np(order[-1], True))
    if len(order) == 1:
        out = [listed, sized, f"there is {sized}", f"a single {_np(order[0])}",
               f"{listed} on a {background} background"]
    else:
        count = COUNT_WORDS[len(order)]
        out = [listed, sized, f"there are {count} shapes : {sized}", f"{count} shapes : {listed}",
               f"{listed} on a {background} background"]
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


README = """Synthetic shapes dataset written by pipeline.data.synth (do not edit; regenerate with `pipeline synth`).

Parameters: {params}

images/<split>_<index>.jpg   {size}x{size} RGB JPEG, 1-{max_objects} non-overlapping coloured shapes
shapes.json                  images[*].{{filename, split, sentences[*].raw,
                             objects[*].{{color, shape, size, box [x0, y0, x1, y1]}}}}
Boxes are pixels in the {size}x{size} image, x1/y1 exclusive. Every caption is true of its image;
its colour words ({colors}) and shape words ({shapes}) name objects in it.
Read it with `pipeline.data.datasets.load_records("shapes", root)`.
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
