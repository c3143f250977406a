"""--distill FILE: a teacher's captions of the train images as cross-entropy targets (training/distill.py):
which captions a run trains on, the errors for a wrong file, and a resume that refuses a changed file."""
import json

import numpy as np
import pytest
import torch

from helpers_store import make_store
from pipeline.cache.readers import open_features
from pipeline.config import DecoderConfig, TrainConfig
from pipeline.data.text import Vocab
from pipeline.errors import UserError
from pipeline.training.data import Features, _xe_data
from pipeline.training.distill import teacher_captions
from pipeline.training.runs import load_checkpoint
from pipeline.training.train import train
from test_ema import SMALL
TEACHER = ["a red circle on grass", "a blue square", "a green triangle near a red circle"]


@pytest.fixture
def feats(tmp_path):
    return make_store(tmp_path / "f.h5", {"train": 6, "val": 3}, L=16, C=8)


def _teacher(tmp_path, st, rows, captions=TEACHER, name="results_train.beam3_ln0.7.json"):
    path = tmp_path / name
    path.write_text(json.dumps([{"image_id": st.image_ids[r], "caption": c} for r, c in zip(rows, captions)]))
    return path


def _cfg(feats, **kw):
    return TrainConfig(**dict(dict(features=str(feats), epochs=2, batch_size=4, min_count=1, lr=3e-3,
                                   log_every=1000, lr_schedule="none", ema=0.0), **kw))


def _trained_on(st, cfg):
    """Every (row, caption tokens) one epoch of cross-entropy batches holds."""
    vocab = Vocab.build(st.captions_of("train")[1] + TEACHER, 1)
    features = Features(st, True, torch.device("cpu"))
    sampler, collate = _xe_data(st, vocab, cfg, features, lambda *_: None)
    seen = []
    for idx in sampler.batches(0):
        x, y = collate(idx)
        for xi, yi in zip(x, y):
            row = next(r for r in range(st.num_images) if np.array_equal(features(np.array([r]))[0], xi))
            seen.append((row, vocab.decode(yi.tolist())))
    return sorted(seen)


def test_the_teacher_captions_are_added_to_the_human_ones_or_replace_them(tmp_path, feats):
    st = open_features(feats)
    rows = st.rows("train")[[0, 2, 5]].tolist()
    path = _teacher(tmp_path, st, rows)
    human = sorted((int(r), " ".join(c.lower().split())) for r, c in zip(*st.captions_of("train")))
    teacher = sorted(zip(rows, TEACHER))
    both = _trained_on(st, _cfg(feats, distill=str(path)))
    assert both == sorted(human + teacher)
    alone = _trained_on(st, _cfg(feats, distill=str(path), human_captions=False))
    assert alone == teacher


def test_a_file_of_other_images_or_not_coco_results_is_refused_naming_the_entry(tmp_path, feats):
    st = open_features(feats)
    val = _teacher(tmp_path, st, [st.rows("train")[0], st.rows("val")[1]], TEACHER[:2], "v.json")
    with pytest.raises(UserError, match=r"entry 1, image 'img00007', is a val image of .*train split"):
        teacher_captions(val, st)
    other = tmp_path / "o.json"
    other.write_text(json.dumps([{"image_id": "elsewhere.jpg", "caption": "a dog"}]))
    with pytest.raises(UserError, match="entry 0, image 'elsewhere.jpg', is not in"):
        teacher_captions(other, st)
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"image_id": 1}))
    with pytest.raises(UserError, match="not COCO results"):
        teacher_captions(bad, st)
    with pytest.raises(UserError, match="no such file.*--split train"):
        teacher_captions(tmp_path / "missing.json", st)


def test_settings_that_cannot_work_together_are_refused(feats):
    with pytest.raises(UserError, match="--no-human-captions leaves no captions"):
        _cfg(feats, human_captions=False)
    with pytest.raises(UserError, match="--objective scst does not read them"):
        TrainConfig(features=str(feats), objective="scst", init_from="x", distill="t.json")


def test_a_run_records_the_file_and_its_resume_refuses_a_changed_one(tmp_path, feats):
    st = open_features(feats)
    path = _teacher(tmp_path, st, st.rows("train")[:3].tolist())
    run = tmp_path / "run"
    train(_cfg(feats, distill=str(path), max_steps=2, epochs=3), DecoderConfig(**SMALL), run, echo=lambda *_: None)
    recorded = load_checkpoint(run / "last.pt")["train_config"]["distill_sha256"]
    assert recorded == teacher_captions(path, st)[2] and len(recorded) == 64
    assert json.loads((run / "config.json").read_text())["train"]["distill_sha256"] == recorded
    path.write_text(path.read_text().replace("a red circle", "a black circle"))
    with pytest.raises(UserError, match="changed since this run started"):
        train(None, None, run, resume=True, overrides={"max_steps": 0}, echo=lambda *_: None)
