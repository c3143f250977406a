"""Sequence-level knowledge distillation (Kim & Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016):
a teacher's captions of the train images as cross-entropy targets (`pipeline train --distill FILE`).

The teacher is any run, shipped model or ensemble: `pipeline score --run A --run B --split train` decodes
every train image once (beam search) into results_train.<decoding>.json, COCO results
[{"image_id", "caption"}]. Kim & Rush train the student on the teacher's beam output, the mode of the
teacher's distribution, in place of the word-level distributions; an ensemble's mode is a single
caption per image that a single model can learn. With the dataset's captions kept (the default), each
train image has its human captions plus the teacher's; --no-human-captions trains on the teacher's alone.

    teacher_captions(path, store, sha256)  -> (rows (M,), captions (M,), sha256 of the file)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline.errors import UserError


def teacher_captions(path: str | Path, st, sha256: str = "") -> tuple[np.ndarray, list[str], str]:
    """The teacher's caption of each train image of `st` listed in `path`, as (store rows, raw captions,
    the file's sha256). sha256 given (a resumed run): the file must still be the one the run started with.
    One UserError for a missing or malformed file, an image that is not a train image of this cache, or a
    changed file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--distill {path}: no such file. Write the teacher's captions of the train images with "
                        f"`pipeline score --run TEACHER [--run ...] --split train` (results_train.<decoding>.json).")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if sha256 and digest != sha256:
        raise UserError(f"--distill {path}: the file changed since this run started (sha256 {digest[:12]}, the run "
                        f"recorded {sha256[:12]}); a resumed run must read the same captions. Restore the file, or "
                        f"start a new run.")
    try:
        items = json.loads(raw)
        pairs = [(str(it["image_id"]), str(it["caption"])) for it in items]
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"--distill {path}: not COCO results [{{\"image_id\", \"caption\"}}] ({type(e).__name__}: "
                        f"{e}); give a results_train.*.json written by `pipeline score --split train`.") from None
    train = set(st.rows("train").tolist())
    row_of = {str(i): r for r, i in enumerate(st.image_ids.tolist())}
    rows, caps = [], []
    for k, (image, caption) in enumerate(pairs):
        r = row_of.get(image)
        if r is None or r not in train:
            where = ("is not in" if r is None else "is marked bad in" if st.split[r] == "train"
                     else f"is a {st.split[r]} image of")
            raise UserError(f"--distill {path}: entry {k}, image {image!r}, {where} {st.path}'s train split; the "
                            f"teacher's captions must be of this cache's train images (`pipeline score --split "
                            f"train` on a run of this dataset). A teacher never sees val or test captions.")
        if caption.strip():
            rows.append(r)
            caps.append(caption)
    if not rows:
        raise UserError(f"--distill {path}: no non-empty captions.")
    return np.asarray(rows, dtype=np.int64), caps, digest
