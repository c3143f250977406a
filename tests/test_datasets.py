"""Dataset readers: tiny on-disk fixtures for the formats and the errors; the shared Flickr8k when present."""
from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner

from conftest import SHARED_FLICKR8K, make_flickr8k
from pipeline.data import datasets
from pipeline.cli import main
from pipeline.errors import UserError


def by_split(records):
    out = {}
    for r in records:
        out.setdefault(r.split, []).append((r.image_id, r.captions))
    return out


# ---- Flickr8k official files --------------------------------------------------------------------

def test_flickr8k_reads_splits_in_file_order_and_skips_bogus(tmp_path, caplog):
    root = make_flickr8k(tmp_path, 4, 2, 2, n_unsplit=1)
    with caplog.at_level(logging.INFO, logger="pipeline.data.datasets"):
        records = datasets.load_records("flickr8k", root)
    assert [r.image_id for r in records] == [f"{1000 + k}_abc.jpg" for k in range(8)]  # unsplit 1008 dropped
    assert [r.split for r in records] == ["train"] * 4 + ["val"] * 2 + ["test"] * 2
    assert records[0].captions[0] == "A dog number 1000 runs , take 0 ."
    assert records[0].path == root / "images" / "1000_abc.jpg"
    assert datasets.split_counts(records) == {"train": (4, 20), "val": (2, 10), "test": (2, 0)}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1000_abc.jpg.1" in warnings[0] and "5 caption line(s)" in warnings[0]


def test_both_flickr8k_readers_agree_on_tiny_set(tmp_path):
    root = make_flickr8k(tmp_path, 3, 2, 2, test_captions=True)
    assert by_split(datasets.load_records("flickr8k", root)) == by_split(datasets.load_records("flickr8k_karpathy", root))


@pytest.mark.skipif(not (SHARED_FLICKR8K / "Flickr8k.token.txt").is_file(),
                    reason=f"shared Flickr8k not found at {SHARED_FLICKR8K}")
def test_shared_flickr8k_both_readers_identical():
    official = datasets.load_records("flickr8k", SHARED_FLICKR8K)
    karpathy = datasets.load_records("flickr8k_karpathy", SHARED_FLICKR8K)
    assert datasets.split_counts(official) == {"train": (6000, 30000), "val": (1000, 5000), "test": (1000, 0)}
    assert datasets.split_counts(karpathy) == datasets.split_counts(official)
    a, b = by_split(official), by_split(karpathy)
    assert a["train"] == b["train"] and a["val"] == b["val"]
    assert [i for i, _ in a["test"]] == [i for i, _ in b["test"]]
    assert all(r.path.name == r.image_id for r in official)


def test_missing_caption_file(tmp_path):
    root = make_flickr8k(tmp_path)
    (root / "Flickr8k.token.txt").unlink()
    with pytest.raises(UserError, match=r"Flickr8k\.token\.txt: file not found"):
        datasets.load_records("flickr8k", root)


def test_line_without_tab_names_file_and_line(tmp_path):
    root = make_flickr8k(tmp_path)
    path = root / "Flickr8k.token.txt"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace("\t", " ")
    path.write_text("\n".join(lines))
    with pytest.raises(UserError, match=r"Flickr8k\.token\.txt:3: no tab"):
        datasets.load_records("flickr8k", root)


def test_missing_images_listed_in_one_error(tmp_path):
    root = make_flickr8k(tmp_path, 4, 2, 2)
    for name in ("1001_abc.jpg", "1002_abc.jpg", "1006_abc.jpg"):
        (root / "images" / name).unlink()
    with pytest.raises(UserError) as e:
        datasets.load_records("flickr8k", root)
    msg = str(e.value)
    assert "3 of 8 listed images are missing" in msg
    assert "1001_abc.jpg (Flickr_8k.trainImages.txt:2)" in msg and "1006_abc.jpg" in msg
    assert len(datasets.load_records("flickr8k", root, check_images=False)) == 8


def test_empty_caption_is_warned_and_skipped(tmp_path, caplog):
    root = make_flickr8k(tmp_path, bogus=False)
    path = root / "Flickr8k.token.txt"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].split("\t")[0] + "\t  "
    path.write_text("\n".join(lines))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.datasets"):
        records = datasets.load_records("flickr8k", root)
    assert len(records[0].captions) == 4
    assert any("1 empty caption" in r.getMessage() and "line 2" in r.getMessage() for r in caplog.records)


def test_non_utf8_names_file_and_line(tmp_path):
    root = make_flickr8k(tmp_path)
    path = root / "Flickr8k.token.txt"
    lines = path.read_bytes().splitlines()
    lines[3] = lines[3] + b" caf\xe9"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(UserError, match=r"Flickr8k\.token\.txt:4: not UTF-8"):
        datasets.load_records("flickr8k", root)


def test_image_in_two_splits_is_an_error(tmp_path):
    root = make_flickr8k(tmp_path, 2, 1, 1)
    (root / "Flickr_8k.devImages.txt").write_text("1001_abc.jpg\n")
    with pytest.raises(UserError, match=r"devImages\.txt:1: 1001_abc\.jpg is also listed in the train split"):
        datasets.load_records("flickr8k", root)


# ---- Karpathy json ------------------------------------------------------------------------------

def write_karpathy(root, images, name="dataset_coco.json"):
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps({"images": images}))
    return root


def test_karpathy_filepath_restval_and_blind_test(tmp_path):
    root = tmp_path / "coco"
    for sub, name in (("train2014", "a.jpg"), ("val2014", "b.jpg"), ("val2014", "c.jpg"), ("val2014", "d.jpg")):
        (root / "images" / sub).mkdir(parents=True, exist_ok=True)
        (root / "images" / sub / name).write_bytes(b"x")
    sent = [{"raw": "A cat ."}, {"tokens": ["a", "dog"]}]
    write_karpathy(root, [
        {"filepath": "train2014", "filename": "a.jpg", "split": "train", "sentences": sent},
        {"filepath": "val2014", "filename": "b.jpg", "split": "restval", "sentences": sent},
        {"filepath": "val2014", "filename": "c.jpg", "split": "val", "sentences": sent},
        {"filepath": "val2014", "filename": "d.jpg", "split": "test", "sentences": []},
    ])
    records = datasets.load_records("coco", root)
    assert [r.split for r in records] == ["train", "restval", "val", "test"]
    assert records[0].captions == ["A cat .", "a dog"]
    assert records[1].path == root / "images" / "val2014" / "b.jpg"
    assert records[3].captions == []
    assert datasets.load_records("coco", root, restval_to_train=True)[1].split == "train"
    with pytest.raises(UserError, match="no option restval_to_train"):
        datasets.load_records("flickr30k", root, restval_to_train=True)


def test_karpathy_errors(tmp_path):
    root = tmp_path / "f30k"
    with pytest.raises(UserError, match="no such directory"):
        datasets.load_records("flickr30k", root)
    write_karpathy(root, [{"filename": "a.jpg", "split": "train", "sentences": []}], "dataset_flickr30k.json")
    with pytest.raises(UserError, match=r"1 of 1 listed images are missing.*a\.jpg"):
        datasets.load_records("flickr30k", root)
    write_karpathy(root, [{"filename": "a.jpg", "split": "dev", "sentences": []}], "dataset_flickr30k.json")
    with pytest.raises(UserError, match=r"images\[0\] \(a\.jpg\) has split 'dev'"):
        datasets.load_records("flickr30k", root, check_images=False)
    (root / "dataset_flickr30k.json").write_bytes(b'{"images": [\n{"filename": "\xff.jpg"}]}')
    with pytest.raises(UserError, match=r"dataset_flickr30k\.json:2: not UTF-8"):
        datasets.load_records("flickr30k", root)
    (root / "dataset_flickr30k.json").write_text('{"images": [\n\n{"filename": }]}')
    with pytest.raises(UserError, match=r"dataset_flickr30k\.json:3: not valid JSON"):
        datasets.load_records("flickr30k", root)


# ---- entries outside the image folder ------------------------------------------------------------

def test_entries_outside_the_image_folder_are_refused_by_name(tmp_path):
    """`..`, an absolute path and a symbolic link leading out of images/: each reader refuses the entry
    by name (extraction would read the file, and the browser copy it into its thumbnails)."""
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"private")
    root = make_flickr8k(tmp_path, 2, 1, 1)
    train = root / "Flickr_8k.trainImages.txt"
    names = train.read_text().split("\n")
    for bad in ("../../secret.jpg", str(secret)):
        train.write_text("\n".join(names + [bad]))
        with pytest.raises(UserError, match=rf"1 image entry points outside.*{bad}.*Flickr_8k\.trainImages\.txt:3"):
            datasets.load_records("flickr8k", root, check_images=False)
    train.write_text("\n".join(names))
    (root / "images" / names[0]).unlink()
    (root / "images" / names[0]).symlink_to(secret)                     # a link out of images/
    with pytest.raises(UserError, match=rf"outside.*{names[0]}"):
        datasets.load_records("flickr8k", root)
    (root / "images" / names[0]).unlink()
    (root / "images" / "real.jpg").write_bytes(b"x")
    (root / "images" / names[0]).symlink_to(root / "images" / "real.jpg")   # a link inside is fine
    assert len(datasets.load_records("flickr8k", root)) == 4
    coco = tmp_path / "coco"
    (coco / "images").mkdir(parents=True)
    for entry, shown in (({"filepath": "../..", "filename": "secret.jpg"}, "secret.jpg"),
                         ({"filename": str(secret)}, str(secret))):
        write_karpathy(coco, [dict(entry, split="train", sentences=[])])
        with pytest.raises(UserError, match=rf"outside.*{shown}.*images\[0\]"):
            datasets.load_records("coco", coco, check_images=False)
    write_karpathy(coco, [{"filepath": 7, "filename": "a.jpg", "split": "train", "sentences": []}])
    with pytest.raises(UserError, match=r"images\[0\] \(a\.jpg\) has a 'filepath' that is not a string"):
        datasets.load_records("coco", coco, check_images=False)


# ---- registry, shapes, CLI ----------------------------------------------------------------------

def test_registry_and_default_roots(monkeypatch, tmp_path):
    assert {"flickr8k", "flickr8k_karpathy", "flickr30k", "coco", "shapes"} <= set(datasets.DATASETS)
    assert datasets.default_root("shapes") == datasets.REPO_ROOT / "data" / "shapes"
    assert datasets.default_root("flickr8k") == (datasets.REPO_ROOT.parent / "shared" / "flickr8k").resolve()
    monkeypatch.setenv("PIPELINE_SHARED", str(tmp_path))
    assert datasets.default_root("flickr8k") == tmp_path.resolve() / "flickr8k"
    with pytest.raises(UserError, match="unknown dataset 'nope'; choose one of flickr8k"):
        datasets.load_records("nope")


def test_shapes_reader_carries_objects(shapes_root, tmp_path):
    records = datasets.load_records("shapes", shapes_root)
    assert datasets.split_counts(records) == {"train": (8, 40), "val": (4, 20), "test": (4, 20)}
    assert all(r.objects and {"color", "shape", "box"} <= set(r.objects[0]) for r in records)
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="pipeline synth"):
        datasets.load_records("shapes", tmp_path / "half")


def test_cli_datasets_counts_and_errors(tmp_path):
    root = make_flickr8k(tmp_path, 3, 2, 2)
    result = CliRunner().invoke(main, ["datasets", "flickr8k", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert "train" in result.output and "       3        15" in result.output
    assert "test            2         0" in result.output
    listing = CliRunner().invoke(main, ["datasets"])
    assert listing.exit_code == 0 and "flickr8k_karpathy" in listing.output
    bad = CliRunner().invoke(main, ["datasets", "coco", "--root", str(tmp_path / "none")])
    assert bad.exit_code == 2 and "no such directory" in bad.output
