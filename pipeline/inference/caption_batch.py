"""`pipeline caption DIR_OR_FILES...`: many photos in one command, batched, resumable, careful with files.

Folder arguments give their image files (sorted; `--recursive`: their subfolders' too). The next batch
of photos is decoded in a thread while the current one is encoded and beam-searched (caption.Captioner,
batched), with a progress bar on a terminal. An unreadable photo is reported in one line and skipped;
the command fails only when nothing could be captioned, or with `--strict` at the first bad photo.

With `--out`, each caption is appended to a captions file as it is made (caption_files.py) and a rerun
skips the photos already there (by resolved path). Outputs are checked before any work: none may be one
of the photos, --attention never replaces a file the project did not write, and in --attention-dir a
name held by another file moves the picture to a name with the photo's key.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from pipeline.config import setting
from pipeline.errors import UserError
from pipeline.fileio import FileLock
from pipeline.inference.caption_files import CaptionsFile, replaceable, stamped, write_picture

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class Photo:
    shown: str        # as given or listed: what is printed
    real: Path        # resolved: the key in --out

    @property
    def key(self) -> str:
        """A short stable name of the photo (its resolved path hashed): attention stamps and names."""
        return hashlib.sha256(str(self.real).encode("utf-8", "surrogateescape")).hexdigest()[:16]


@dataclass
class Options:
    """The files side of `pipeline caption` (cli.options_from makes the options); a path given as '' is None."""
    recursive: bool = setting(False, "A folder argument: also the photos in its subfolders.")
    out: Path | None = setting("", "Append path, caption and model per photo to this .jsonl or .csv as each is "
                                   "done; a rerun skips the photos already in it.")
    attention: Path | None = setting("", "Write the per-word attention maps to this PNG (several images: "
                                         "OUT_<image>.png).")
    attention_dir: Path | None = setting("", "Write each photo's attention maps to DIR/<photo name>.attention.png.")
    strict: bool = setting(False, "Stop at the first unreadable photo (exit 2) instead of skipping it.")
    progress: bool | None = setting(None, "A progress bar (None: when stderr is a terminal).", cli=False)

    def __post_init__(self):
        for name in ("out", "attention", "attention_dir"):
            value = getattr(self, name)
            setattr(self, name, Path(value) if value not in (None, "") else None)


# -- arguments ---------------------------------------------------------------------------------------
def list_photos(args: Sequence[str], recursive: bool = False) -> list[Photo]:
    """The photos the arguments name, in order, each once (by resolved path): a file as given (a missing or
    unreadable one is reported when read), a folder's image files. A URL, or a folder without image
    files, is one UserError."""
    for a in args:
        if _URL.match(str(a)):
            raise UserError(f"{a}: a URL; captioning works offline, on local files only. Download the photo "
                            f"first (e.g. `curl -O {a}`) and pass the file.")
    out, seen = [], set()
    for a in args:
        p = Path(a)
        for f in (_folder_photos(p, recursive) if p.is_dir() else [p]):
            real = f.resolve()
            if real not in seen:
                seen.add(real)
                out.append(Photo(str(f), real))
    return out


def _folder_photos(folder: Path, recursive: bool) -> list[Path]:
    """A folder's image files by suffix, sorted; hidden files and the attention pictures made here left out."""
    if recursive:
        files = []
        for root, dirs, names in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [Path(root) / n for n in sorted(names)]
    else:
        files = sorted(folder.iterdir())
    found = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
             and f.is_file() and stamped(f) is None]
    if not found:
        sub = "" if recursive else "; pass --recursive to caption the photos in its subfolders"
        raise UserError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder{sub}.")
    return found


def refuse_duplicates(run_dirs: Sequence, models: Sequence) -> None:
    """The same run or model given twice (`--run A --run A`): one UserError, as `pipeline score` says it."""
    flags = [*(("--run", r) for r in run_dirs), *(("--model", m) for m in models)]
    if len(flags) < 2:
        return
    from pipeline.inference.shipped import ModelRef, member_key
    keys = [member_key(ModelRef(v) if f == "--model" else v) for f, v in flags]
    for k, key in enumerate(keys):
        if key in keys[:k]:
            first = flags[keys.index(key)]
            raise UserError(f"{flags[k][0]} {flags[k][1]}: given twice (as {first[0]} {first[1]}); an ensemble of a "
                            f"model with itself is that model. Give each run or model once.")


def plan_outputs(photos: Sequence[Photo], opts: Options) -> dict[Path, Path]:
    """--attention's picture per photo (resolved photo -> path), after checking every output: none is one of
    the photos, and none is a file the project did not write."""
    reals = {p.real: p for p in photos}

    def not_a_photo(flag: str, path: Path) -> None:
        if (hit := reals.get(Path(path).resolve())) is not None:
            raise UserError(f"{flag} {path}: that is the photo {hit.shown}; writing there would replace it. Choose "
                            f"another name.")

    if opts.attention is not None and opts.attention_dir is not None:
        raise UserError("--attention and --attention-dir both given: pass one (--attention-dir names a picture "
                        "per photo).")
    for flag, path in (("--out", opts.out), ("--attention-dir", opts.attention_dir)):
        if path is not None:
            not_a_photo(flag, path)
    if opts.out is not None:
        CaptionsFile.check_name(opts.out)
    if opts.attention_dir is not None and opts.attention_dir.exists() and not opts.attention_dir.is_dir():
        raise UserError(f"--attention-dir {opts.attention_dir}: exists and is not a folder. Choose a folder.")
    fixed = {}
    if opts.attention is not None:
        from pipeline.inference.caption import attention_paths
        for p, target in zip(photos, attention_paths(opts.attention, [p.shown for p in photos])):
            not_a_photo("--attention", target)
            if not replaceable(target):
                raise UserError(f"--attention {target}: exists and was not written by `pipeline caption`, so it is "
                                f"never replaced. Remove it or choose another name.")
            fixed[p.real] = target
    return fixed


def attention_target(folder: Path, photo: Photo, photos: set) -> Path:
    """The photo's picture in --attention-dir: STEM.attention.png, else (a name held by another file, one of
    the photos, or another photo's picture) STEM.KEY.attention.png."""
    stem = Path(photo.shown).stem
    for name in (f"{stem}.attention.png", f"{stem}.{photo.key}.attention.png"):
        p = folder / name
        if p.resolve() not in photos and (not os.path.lexists(p) or stamped(p) == photo.key):
            return p
    raise UserError(f"{folder / name}: exists and was not written by `pipeline caption`, so it is never replaced. "
                    f"Remove it or choose another --attention-dir.")


# -- the command -------------------------------------------------------------------------------------------
def member_label(loaded: Sequence) -> str:
    """The model column: a shipped model's name, a run's resolved folder; '+' between ensemble members."""
    from pipeline.inference.shipped import is_shipped
    return "+".join(r.run_dir.name if is_shipped(r) else str(Path(r.run_dir).resolve()) for r in loaded)


def caption_command(args: Sequence[str], run_dirs: Sequence, models: Sequence, cfg, opts: Options, *,
                    draw: Callable, echo=print) -> int:
    """`pipeline caption`: list, check, skip what --out holds, caption the rest; returns how many were
    captioned. `draw(image, words, alphas, out, grid=, title=)` writes an attention picture (viz.py's)."""
    refuse_duplicates(run_dirs, models)
    photos = list_photos(args, opts.recursive)
    fixed = plan_outputs(photos, opts)
    with ExitStack() as stack:
        book = None
        if opts.out is not None:
            stack.enter_context(FileLock(opts.out.with_name(f".{opts.out.name}.lock"), f"--out {opts.out}",
                                         remove=True))
            book = CaptionsFile(opts.out, log=echo)
            stack.callback(book.close)
        todo = [p for p in photos if book is None or str(p.real) not in book.done]
        if not todo:
            echo(f"{opts.out}: all {len(photos)} photos are captioned there already (by {', '.join(book.models)}); "
                 f"nothing to do.")
            return 0
        from pipeline.inference.caption import make_captioner
        from pipeline.inference.shipped import ModelRef
        captioner = make_captioner([*run_dirs, *(ModelRef(m) for m in models)] or None, cfg, log=echo)
        label = member_label(captioner.loaded)
        if book is not None:
            book.check_model(label)
        run = _Run(captioner, label, book, fixed, opts, draw, echo, {p.real for p in photos},
                   single=len(photos) == 1)
        run.caption(todo)
        run.summary(len(photos) - len(todo))
        return run.captioned


def _read(batch: Sequence[Photo]) -> list:
    """(photo, PIL image or None, the error line or None) per photo: decoded, in the reading thread."""
    return [_read_one(p) for p in batch]


def _read_one(photo: Photo):
    from pipeline.inference.caption import open_image
    try:
        if not photo.real.is_file():
            raise UserError(f"{photo.shown}: no such image file.")
        with open(photo.real, "rb") as f:
            return photo, open_image(f, photo.shown), None
    except UserError as e:
        return photo, None, str(e)
    except OSError as e:
        return photo, None, f"{photo.shown}: could not be read ({e})."


class _Run:
    """One caption_command's loop: batches read ahead in a thread, captioned, written or printed."""

    def __init__(self, captioner, label, book, fixed, opts, draw, echo, photos: set, single: bool):
        self.captioner, self.label, self.book, self.fixed = captioner, label, book, fixed
        self.opts, self.draw, self.echo, self.single = opts, draw, echo, single
        self.photos = photos             # every photo of the command (resolved): never an output
        self.captioned, self.bad, self.seconds = 0, 0, 0.0

    def say(self, msg: str, err: bool = False) -> None:
        from tqdm import tqdm
        with tqdm.external_write_mode(file=sys.stderr):
            if err:
                print(msg, file=sys.stderr, flush=True)
            else:
                self.echo(msg)

    def caption(self, todo: list[Photo]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm
        bs = self.captioner.cfg.batch_size
        batches = [todo[i:i + bs] for i in range(0, len(todo), bs)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(1) as pool, tqdm(total=len(todo), unit="photo", desc="caption", file=sys.stderr,
                                                 disable=None if self.opts.progress is None else not self.opts.progress,
                                                 dynamic_ncols=True) as bar:
            ahead = pool.submit(_read, batches[0])
            for k in range(len(batches)):
                opened = ahead.result()
                if k + 1 < len(batches):
                    ahead = pool.submit(_read, batches[k + 1])
                for photo, _, err in opened:
                    if err is not None:
                        self.skip(err)
                self.batch([(p, im) for p, im, err in opened if err is None])
                bar.update(len(opened))
        self.seconds = time.perf_counter() - t0

    def batch(self, good: list) -> None:
        """Caption one batch; a batch that fails as a whole is captioned photo by photo, the failing ones skipped."""
        if not good:
            return
        try:
            results = self.captioner([im for _, im in good], [p.shown for p, _ in good])
        except Exception as e:  # noqa: BLE001  (one photo the backbone cannot take must not lose the batch)
            if len(good) == 1:
                self.skip(f"{good[0][0].shown}: could not be captioned ({type(e).__name__}: {e}).")
                return
            for one in good:
                self.batch([one])
            return
        for (photo, image), r in zip(good, results):
            self.done(photo, image, r)

    def done(self, photo: Photo, image, r) -> None:
        target = self.fixed.get(photo.real)
        if target is None and self.opts.attention_dir is not None:
            target = attention_target(self.opts.attention_dir, photo, self.photos)
        if target is not None:
            write_picture(self.draw, target, photo.key, image, r.words, r.alphas.numpy(), grid=r.grid,
                          title=Path(photo.shown).name)
        if self.book is not None:
            self.book.add(str(photo.real), r.caption, self.label, str(target or ""))
        else:
            self.say(f"{photo.shown}\t{r.caption}")
            if target is not None:
                self.say(f"attention: {target}")
        self.captioned += 1

    def skip(self, err: str) -> None:
        if self.single:
            raise UserError(err)
        if self.opts.strict:
            where = f"; the {self.captioned} captions before it are in {self.opts.out}" if self.book else ""
            raise UserError(f"{err} (--strict: stopped at the first bad photo{where}.)")
        self.bad += 1
        self.say(f"skipped: {err}", err=True)

    def summary(self, already: int) -> None:
        """The closing line; one UserError when no photo has a caption (here or in --out)."""
        n, s = self.captioned, max(self.seconds, 1e-9)
        if n == 0 and already == 0:
            raise UserError(f"nothing captioned: none of the {self.bad} photos could be read (each is listed above); "
                            f"pass JPEG/PNG files.")
        if self.book is None and self.bad == 0 and already == 0 and n == 1:
            return                                   # one photo: its caption line only, as always
        line = (f"captioned {n} photo{'s' if n != 1 else ''} in {s:.1f}s ({n / s:.2f} photos/s)"
                + (f"; {already} already in {self.opts.out}" if already else "")
                + (f"; {self.bad} unreadable, skipped (listed above)" if self.bad else "")
                + (f" -> {self.opts.out}" if self.book is not None else ""))
        self.say(line, err=self.book is None)
