"""The one record type every dataset reader yields."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass
class Record:
    image_id: str            # stable id, unique within a dataset (Flickr8k: the file name)
    path: Path               # image file on disk
    split: str               # one of SPLITS, or "restval"/"" for unused images
    captions: list[str] = field(default_factory=list)   # raw captions; may be empty (blind test split)
    objects: list[dict] | None = None   # synthetic only: [{"color","shape","box":[x0,y0,x1,y1]}] in pixels
