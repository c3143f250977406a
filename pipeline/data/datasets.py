"""Dataset readers: dataset files on disk -> list[Record].

A dataset is one entry of `DATASETS` (name -> reader, default root, accepted options).
`load_records(name, root=None, **options)` is the only entry point other stages use.

Readers are strict about what would silently corrupt training (a line without a tab, bytes that
are not UTF-8, an image listed but absent) and lenient, with one summary warning, about the
known blemishes of the public files (the bogus `2258277193_586949ec62.jpg.1` entry of
Flickr8k.token.txt, empty captions).
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from pipeline.errors import UserError
from pipeline.data.records import SPLITS, Record

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_LISTED = 5          # how many offending names an error message shows


def shared_dir() -> Path:
    """Where the shared datasets live: $PIPELINE_SHARED, else ../shared next to the repo."""
    env = os.environ.get("PIPELINE_SHARED")
    return Path(env).expanduser().resolve() if env else (REPO_ROOT.parent / "shared").resolve()


# ---- reading text files -------------------------------------------------------------------------

def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text without the newline) of every line; refuses bytes that are not UTF-8."""
    if not path.is_file():
        raise UserError(f"{path}: file not found. Put it there, or pass --root to the directory that holds it.")
    out = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}). "
                            f"Re-save the file as UTF-8.") from None
        if lineno == 1:
            text = text.lstrip("\ufeff")  # a BOM is not part of the first name
        out.append((lineno, text))
    return out


def _read_json(path: Path, fix: str):
    if not path.is_file():
        raise UserError(f"{path}: file not found. {fix}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{lineno}: not UTF-8 text (byte 0x{data[e.start]:02x}). Re-save the file as UTF-8.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}). {fix}") from None


def _check_images_exist(records: list[Record], where: dict[str, str], images_dir: Path) -> None:
    """One error for all missing images: the count and the first few, with where they are listed."""
    missing = [r for r in records if not r.path.is_file()]
    if missing:
        shown = ", ".join(f"{r.path.name} ({where.get(r.image_id, '?')})" for r in missing[:MAX_LISTED])
        raise UserError(f"{images_dir}: {len(missing)} of {len(records)} listed images are missing on disk, "
                        f"e.g. {shown}. Put the image files in {images_dir}, or pass --root to the dataset directory.")


def is_inside(path: Path, folder: Path) -> bool:
    """Whether `path` lies inside `folder` as written (`..` collapsed, an absolute path kept as is) and
    once symbolic links are followed: the one test of every reader of image paths (datasets, browse)."""
    base, p = Path(os.path.abspath(folder)), Path(os.path.abspath(path))
    return p.is_relative_to(base) and p.resolve().is_relative_to(base.resolve())


def _check_inside(records: list[Record], where: dict[str, str], images_dir: Path) -> None:
    """One error naming the entries whose image lies outside the image folder: a name with `..`, an
    absolute path, or a symbolic link leading out. Extraction would read such a file and the results
    browser copy it into its thumbnails, so every reader refuses them here."""
    outside = [r for r in records if not is_inside(r.path, images_dir)]
    if outside:
        shown = ", ".join(f"{r.image_id!r} ({where.get(r.image_id, '?')})" for r in outside[:MAX_LISTED])
        raise UserError(f"{images_dir}: {len(outside)} image entr{'y points' if len(outside) == 1 else 'ies point'} "
                        f"outside this folder (a '..' or absolute path, or a symbolic link leading out), e.g. "
                        f"{shown}. Put the images inside {images_dir} and list them by their name there.")


def _warn_empty(path: Path, n_empty: int, example: str) -> None:
    if n_empty:
        log.warning("%s: skipped %d empty caption(s) (first at %s).", path, n_empty, example)


# ---- Flickr8k, official files -------------------------------------------------------------------

FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",      # the official "dev" list is our validation split
    "test": "Flickr_8k.testImages.txt",
}


def read_flickr8k(root: Path, *, captions_file: str = "Flickr8k.token.txt", images_dir: str = "images",
                  check_images: bool = True) -> list[Record]:
    """Flickr8k from its official files: records in split-file order (train, val, test).

    Images in no split list are dropped; entries whose name is not an image file name (the bogus
    `2258277193_586949ec62.jpg.1`) are skipped with one warning; a split image with no caption
    lines (the blind test split) gets an empty caption list.
    """
    split_of: dict[str, str] = {}
    where: dict[str, str] = {}
    order: list[str] = []
    for split, fname in FLICKR8K_SPLIT_FILES.items():
        path = root / fname
        for lineno, line in _read_lines(path):
            name = line.strip()
            if not name:
                continue
            if name in split_of:
                if split_of[name] == split:
                    continue  # listed twice in the same file: harmless
                raise UserError(f"{path}:{lineno}: {name} is also listed in the {split_of[name]} split "
                                f"({where[name]}); an image belongs to one split. Remove one of the two lines.")
            split_of[name] = split
            where[name] = f"{fname}:{lineno}"
            order.append(name)

    captions: dict[str, list[str]] = {name: [] for name in order}
    path = root / captions_file
    bogus: Counter = Counter()
    no_split: set[str] = set()
    n_empty, first_empty = 0, ""
    for lineno, line in _read_lines(path):
        if not line.strip():
            continue
        if "\t" not in line:
            raise UserError(f"{path}:{lineno}: no tab between image key and caption ({line[:60]!r}). "
                            f"Each line must be NAME.jpg#K<TAB>caption.")
        key, caption = line.split("\t", 1)
        name = key.rpartition("#")[0] if "#" in key else key
        name = name.strip()
        caption = caption.strip()
        if not name.lower().endswith(IMAGE_SUFFIXES):
            bogus[name] += 1
            continue
        if name not in captions:
            no_split.add(name)
            continue
        if not caption:
            n_empty, first_empty = n_empty + 1, first_empty or f"line {lineno}"
            continue
        captions[name].append(caption)

    if bogus:
        log.warning("%s: skipped %d caption line(s) of %d entr%s not named like an image file (e.g. %s).",
                    path, sum(bogus.values()), len(bogus), "y" if len(bogus) == 1 else "ies", next(iter(bogus)))
    _warn_empty(path, n_empty, first_empty)
    if no_split:
        log.info("%s: %d image(s) with captions are in no split list; dropped.", path, len(no_split))

    image_dir = root / images_dir
    records = [Record(image_id=name, path=image_dir / name, split=split_of[name], captions=captions[name])
               for name in order]
    _check_inside(records, where, image_dir)
    if check_images:
        _check_images_exist(records, where, image_dir)
    return records


# ---- Karpathy split json (Flickr8k, Flickr30k, COCO) and the synthetic shapes ------------------

KARPATHY_SPLITS = SPLITS + ("restval",)


def read_karpathy(root: Path, *, json_name: str, images_dir: str = "images", restval_to_train: bool = False,
                  check_images: bool = True, with_objects: bool = False, fix: str = "") -> list[Record]:
    """Records of a Karpathy `dataset_*.json` (images[*].{filename, filepath?, split, sentences[*].raw}).

    The image is at ROOT/images/[filepath/]filename. COCO's "restval" images keep split "restval"
    (unused) unless `restval_to_train`. Entries with no sentences are valid (a blind test split).
    """
    path = root / json_name
    fix = fix or f"Put Karpathy's {json_name} in {root} (see docs/datasets.md)."
    data = _read_json(path, fix)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise UserError(f"{path}: no top-level 'images' list; this is not a Karpathy split file. {fix}")

    image_dir = root / images_dir
    records, where = [], {}
    n_empty, first_empty = 0, ""
    for i, entry in enumerate(images):
        at = f"{json_name} images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise UserError(f"{path}: images[{i}] has no 'filename' string. Each image needs filename, split, sentences.")
        split = entry.get("split")
        if split not in KARPATHY_SPLITS:
            raise UserError(f"{path}: images[{i}] ({entry['filename']}) has split {split!r}; "
                            f"expected one of {', '.join(KARPATHY_SPLITS)}.")
        if split == "restval" and restval_to_train:
            split = "train"
        captions = []
        for j, sentence in enumerate(entry.get("sentences") or []):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if raw is None and isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
                raw = " ".join(sentence["tokens"])
            if not isinstance(raw, str):
                raise UserError(f"{path}: images[{i}].sentences[{j}] has no 'raw' caption string.")
            if not raw.strip():
                n_empty, first_empty = n_empty + 1, first_empty or f"images[{i}].sentences[{j}]"
                continue
            captions.append(raw.strip())
        if not isinstance(entry.get("filepath", ""), str):
            raise UserError(f"{path}: images[{i}] ({entry['filename']}) has a 'filepath' that is not a string "
                            f"({entry['filepath']!r}); it names the folder of the image under {image_dir}.")
        image_path = image_dir / entry.get("filepath", "") / entry["filename"]
        objects = _objects_of(entry, path, i) if with_objects else None
        records.append(Record(image_id=entry["filename"], path=image_path, split=split,
                              captions=captions, objects=objects))
        if entry["filename"] in where:
            raise UserError(f"{path}: images[{i}] repeats filename {entry['filename']} "
                            f"(first at {where[entry['filename']]}). Image file names must be unique.")
        where[entry["filename"]] = at

    _warn_empty(path, n_empty, first_empty)
    _check_inside(records, where, image_dir)
    if check_images:
        _check_images_exist(records, where, image_dir)
    return records


def _objects_of(entry: dict, path: Path, i: int) -> list[dict]:
    objects = entry.get("objects")
    if not isinstance(objects, list):
        raise UserError(f"{path}: images[{i}] has no 'objects' list. Regenerate the set with `pipeline synth`.")
    for k, o in enumerate(objects):
        box = o.get("box") if isinstance(o, dict) else None
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                and isinstance(o.get("color"), str) and isinstance(o.get("shape"), str)):
            raise UserError(f"{path}: images[{i}].objects[{k}] needs color, shape and box [x0,y0,x1,y1]. "
                            f"Regenerate the set with `pipeline synth`.")
    return objects


def read_shapes(root: Path, *, check_images: bool = True) -> list[Record]:
    """The synthetic set written by pipeline.data.synth (shapes.json is written last: absent = incomplete)."""
    return read_karpathy(root, json_name="shapes.json", check_images=check_images, with_objects=True,
                         fix=f"No complete synthetic set here; create it with `pipeline synth --out {root}`.")


# ---- registry -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetSpec:
    reader: Callable[..., list[Record]]
    root: Callable[[], Path]            # default root, computed when asked (PIPELINE_SHARED may change)
    options: tuple[str, ...] = ()       # keyword options the reader accepts
    about: str = ""
    fix: str = "Put the files there or pass --root (see docs/datasets.md)."   # when the root is absent


_COMMON = ("images_dir", "check_images")

DATASETS: dict[str, DatasetSpec] = {
    "flickr8k": DatasetSpec(
        read_flickr8k, lambda: shared_dir() / "flickr8k", _COMMON + ("captions_file",),
        "Flickr8k, official token + split files"),
    "flickr8k_karpathy": DatasetSpec(
        partial(read_karpathy, json_name="dataset_flickr8k.json"), lambda: shared_dir() / "flickr8k", _COMMON,
        "Flickr8k, Karpathy dataset_flickr8k.json"),
    "flickr30k": DatasetSpec(
        partial(read_karpathy, json_name="dataset_flickr30k.json"), lambda: shared_dir() / "flickr30k", _COMMON,
        "Flickr30k, Karpathy dataset_flickr30k.json"),
    "coco": DatasetSpec(
        partial(read_karpathy, json_name="dataset_coco.json"), lambda: shared_dir() / "coco",
        _COMMON + ("restval_to_train",), "MS COCO 2014, Karpathy dataset_coco.json"),
    "shapes": DatasetSpec(
        read_shapes, lambda: REPO_ROOT / "data" / "shapes", ("check_images",),
        "synthetic coloured shapes with boxes (pipeline synth)",
        "Create it with `pipeline synth --out DIR` (default DIR: data/shapes), or pass --root."),
}


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    return DATASETS[name]


def default_root(name: str) -> Path:
    return _spec(name).root()


def load_records(name: str, root: str | Path | None = None, **options) -> list[Record]:
    """All records of dataset `name` read from `root` (default: `default_root(name)`)."""
    spec = _spec(name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise UserError(f"dataset {name!r} has no option {', '.join(unknown)}; "
                        f"it accepts {', '.join(spec.options) or 'none'}.")
    root = Path(root).expanduser().resolve() if root is not None else spec.root()
    if not root.is_dir():
        raise UserError(f"{root}: no such directory for dataset {name!r}. {spec.fix}")
    return spec.reader(root, **options)


def split_counts(records: list[Record]) -> dict[str, tuple[int, int]]:
    """split -> (images, captions), the usual splits first (with zeros when empty)."""
    counts: dict[str, list[int]] = {s: [0, 0] for s in SPLITS}
    for r in records:
        c = counts.setdefault(r.split, [0, 0])
        c[0] += 1
        c[1] += len(r.captions)
    return {s: (n, m) for s, (n, m) in counts.items()}
