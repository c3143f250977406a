"""`pipeline caption DIR_OR_FILES...` (inference/caption_batch.py): folders, batches, bad photos skipped,
--out appended row by row and resumed, and outputs that never replace a photo or a file the project did
not write. A tiny run (test_extract's tiny backbone) is trained once for the module."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from test_extract import make_records, run, tiny_spec

from pipeline.cli import main
from pipeline.extraction import backbones
from pipeline.inference import caption as caption_mod
from pipeline.inference.caption_batch import Options, caption_command
from pipeline.inference.caption_files import STAMP, stamped


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run of the tiny backbone (registered for the module), and the CLI arguments that caption with it."""
    from pipeline.config import DecoderConfig, TrainConfig
    from pipeline.training.train import train
    saved = dict(backbones.BACKBONES)
    backbones.BACKBONES["tiny"] = tiny_spec("tiny")
    root = tmp_path_factory.mktemp("capfolder")
    recs = make_records(root, n=12)
    run(recs, root / "f.h5")
    dcfg = DecoderConfig(embed_dim=8, hidden_dim=8, attention_dim=8, dropout=0.0, embed_dropout=0.0,
                         context_dropout=0.0, hidden_dropout=0.0)
    train(TrainConfig(features=(str(root / "f.h5"),), epochs=1, batch_size=4, min_count=1, lr=1e-2), dcfg,
          root / "run", echo=lambda s: None)
    yield ["--run", root / "run", "--weights-dir", root, "--device", "cpu", "--beam", "2"]
    backbones.BACKBONES.clear()
    backbones.BACKBONES.update(saved)


def cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["caption", *map(str, args)], catch_exceptions=False)
    return res.exit_code, res.output


def photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(p := folder / f"p{i}.jpg")
        out.append(p)
    return out


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line]


class Counting:
    """Wraps make_captioner: records the names of every batch the captioner was given, and starts each caption
    with its image's size (the tiny run's captions are all alike), so a row shows which image it was made from."""

    def __init__(self, monkeypatch, fail_after: int | None = None):
        self.batches, self.made, self.fail_after = [], 0, fail_after
        real = caption_mod.make_captioner

        def make(*a, **kw):
            self.made += 1
            captioner = real(*a, **kw)
            call = captioner.__call__

            class Wrapped(type(captioner)):
                def __call__(inner, images, names, **k):
                    if self.fail_after is not None and len(self.batches) == self.fail_after:
                        raise KeyboardInterrupt      # a kill between two batches
                    self.batches.append([Path(n).name for n in names])
                    out = call(images, names, **k)
                    for im, r in zip(images, out):
                        r.caption = f"{im.width}x{im.height} {r.caption}".strip()
                    return out
            captioner.__class__ = Wrapped
            return captioner
        monkeypatch.setattr(caption_mod, "make_captioner", make)


def test_a_folder_is_captioned_in_batches_and_bad_photos_are_skipped(tiny_run, tmp_path, monkeypatch):
    """Before: a folder was "no such image file", and one unreadable photo aborted every caption."""
    d = tmp_path / "album"
    good = photos(d, 5)
    (d / "broken.jpg").write_bytes(np.random.default_rng(1).bytes(100))
    (d / "notes.txt").write_text("not a photo")
    photos(d / "sub", 1, seed=2)
    seen = Counting(monkeypatch)
    code, out = cli(d, *tiny_run, "--out", tmp_path / "c.jsonl", "--batch-size", "2")
    assert code == 0, out
    got = rows(tmp_path / "c.jsonl")
    assert [r["path"] for r in got] == [str(p.resolve()) for p in good]          # sorted, sub/ not read
    assert [r["caption"].split(" ")[0] for r in got] == [f"30x{20 + i}" for i in range(5)]    # each its own photo
    assert {r["model"] for r in got} == {str(tiny_run[1].resolve())}
    skipped = [ln for ln in out.splitlines() if ln.startswith("skipped: ")]
    assert skipped == [ln for ln in skipped if "broken.jpg: not a readable image" in ln] and len(skipped) == 1
    assert seen.batches == [["p0.jpg"], ["p1.jpg", "p2.jpg"], ["p3.jpg", "p4.jpg"]]   # broken.jpg left its batch
    assert "captioned 5 photos" in out and "1 unreadable, skipped" in out
    seen.batches = []
    code, out = cli(d, *tiny_run, "--out", tmp_path / "c.jsonl")          # again: only broken.jpg is left, still bad
    assert code == 0 and seen.batches == [] and len(rows(tmp_path / "c.jsonl")) == 5, out
    assert "captioned 0 photos" in out and "5 already in" in out and "1 unreadable, skipped" in out
    # the batched beam search: the captions of one photo at a time
    alone = [cli(p, *tiny_run)[1].splitlines()[-1].split("\t") for p in good]
    assert alone == [[str(p), r["caption"]] for p, r in zip(good, got)]
    code, out = cli(d, "--recursive", *tiny_run, "--out", tmp_path / "r.jsonl")
    got = [str(Path(r["path"]).relative_to(d.resolve())) for r in rows(tmp_path / "r.jsonl")]
    assert code == 0 and got == [p.name for p in good] + ["sub/p0.jpg"]


def test_a_rerun_captions_nothing_and_a_killed_run_resumes(tiny_run, tmp_path, monkeypatch):
    d = tmp_path / "album"
    photos(d, 5)
    out_file = tmp_path / "c.jsonl"
    seen = Counting(monkeypatch, fail_after=2)
    code, out = cli(d, *tiny_run, "--out", out_file, "--batch-size", "2")     # Ctrl-C after two batches
    assert code == 1 and "Aborted!" in out
    assert [Path(r["path"]).name for r in rows(out_file)] == ["p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg"]
    with out_file.open("a") as f:
        f.write('{"path": "/torn/by/a/ki')                                   # a torn last line
    seen.fail_after, seen.batches = None, []
    code, out = cli(d, *tiny_run, "--out", out_file, "--batch-size", "2")
    assert code == 0 and "dropped an incomplete last line" in out, out
    assert seen.batches == [["p4.jpg"]] and len(rows(out_file)) == 5          # only what was missing
    made = seen.made
    code, out = cli(d, *tiny_run, "--out", out_file)
    assert code == 0 and "all 5 photos are captioned there already" in out
    assert seen.made == made and len(rows(out_file)) == 5                      # no model even loaded


def test_csv_and_jsonl_out_keep_odd_names_and_resume(tiny_run, tmp_path):
    d = tmp_path / "album"
    a, b = photos(d, 2)
    a = a.rename(d / "a, with comma.jpg")
    b = b.rename(d / "b\u2028line separator.jpg")         # str.splitlines would cut its JSON line in two
    for _ in range(2):
        code, out = cli(d, *tiny_run, "--out", tmp_path / "c.jsonl")
        assert code == 0 and [r["path"] for r in rows(tmp_path / "c.jsonl")] == [str(a), str(b)], out
    assert "nothing to do" in out
    code, out = cli(a, b, *tiny_run, "--out", tmp_path / "c.csv")
    assert code == 0, out
    table = list(csv.reader((tmp_path / "c.csv").open()))
    assert table[0] == ["path", "caption", "model", "attention"] and [r[0] for r in table[1:]] == [str(a), str(b)]
    code, out = cli(d, *tiny_run, "--out", tmp_path / "c.csv")
    assert code == 0 and "nothing to do" in out and len(list(csv.reader((tmp_path / "c.csv").open()))) == 3


def test_url_nothing_readable_and_strict_are_one_clear_error(tiny_run, tmp_path):
    code, out = cli("https://example.com/dog.jpg", *tiny_run)
    assert code == 2 and out.count("\n") == 1 and "Download the photo first" in out and "https:/e" not in out
    d = tmp_path / "bad"
    d.mkdir()
    for n in ("x.jpg", "y.png"):
        (d / n).write_bytes(b"not an image")
    code, out = cli(d, *tiny_run)
    assert code == 2 and out.splitlines()[-1] == "error: nothing captioned: none of the 2 photos could be read " \
                                                 "(each is listed above); pass JPEG/PNG files."
    good = photos(tmp_path / "mixed", 3)
    (tmp_path / "mixed" / "p1.jpg").write_bytes(b"broken")
    code, out = cli(tmp_path / "mixed", *tiny_run, "--strict", "--out", tmp_path / "s.jsonl", "--batch-size", "1")
    assert code == 2 and "p1.jpg: not a readable image" in out and "--strict" in out
    assert [r["path"] for r in rows(tmp_path / "s.jsonl")] == [str(good[0].resolve())]
    code, out = cli(tmp_path / "empty_dir_is_missing", *tiny_run)
    assert code == 2 and "no such image file" in out
    (tmp_path / "nothing").mkdir()
    code, out = cli(tmp_path / "nothing", *tiny_run)
    assert code == 2 and "no image files" in out and "--recursive" in out


def test_several_files_one_unreadable_prints_the_others(tiny_run, tmp_path):
    a, b = photos(tmp_path, 2)
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    code, out = cli(a, tmp_path / "bad.jpg", b, *tiny_run)
    lines = out.splitlines()
    assert code == 0, out
    assert [ln.split("\t")[0] for ln in lines if "\t" in ln] == [str(a), str(b)]
    assert sum(ln.startswith("skipped: ") and "bad.jpg" in ln for ln in lines) == 1


def test_outputs_never_replace_a_photo_or_a_file_the_project_did_not_write(tiny_run, tmp_path):
    """Before: `caption --attention photo.jpg photo.jpg` replaced the photo by its attention picture."""
    (photo,) = photos(tmp_path / "p", 1)
    before = photo.read_bytes()
    for flag, target in (("--attention", photo), ("--out", photo)):
        code, out = cli(photo, *tiny_run, flag, target)
        assert code == 2 and "that is the photo" in out and photo.read_bytes() == before, out
    mine = tmp_path / "mine.png"
    Image.new("RGB", (4, 4)).save(mine)
    code, out = cli(photo, *tiny_run, "--attention", mine)
    assert code == 2 and "never replaced" in out and stamped(mine) is None
    for name, text in (("notes.jsonl", '{"a": 1}\n'), ("one_line.jsonl", "no newline at all"),
                       ("table.csv", "path,caption\nx,y\n"), ("torn.csv", "a,b")):
        foreign = tmp_path / name
        foreign.write_text(text)
        code, out = cli(photo, *tiny_run, "--out", foreign)
        assert code == 2 and "not a captions file" in out and foreign.read_text() == text, name
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.figure().savefig(old := tmp_path / "old_attention.png")                   # an earlier version's figure
    plt.close("all")
    code, out = cli(photo, *tiny_run, "--attention", old)
    assert code == 0 and stamped(old) is not None, out
    # --attention-dir: a name held by another file moves the picture to a name with the photo's key
    att = tmp_path / "att"
    att.mkdir()
    (att / "p0.attention.png").write_bytes(b"someone else's")
    code, out = cli(photo, *tiny_run, "--attention-dir", att, "--out", tmp_path / "o.jsonl")
    assert code == 0, out
    (row,) = rows(tmp_path / "o.jsonl")
    pic = Path(row["attention"])
    assert pic.parent == att and pic.name.startswith("p0.") and pic.name.endswith(".attention.png")
    assert (att / "p0.attention.png").read_bytes() == b"someone else's" and stamped(pic) is not None
    assert Image.open(pic).text[STAMP.decode()] == stamped(pic)                    # a valid PNG chunk
    code, out = cli(photo, *tiny_run, "--attention", pic)                           # its own picture: replaced
    assert code == 0 and out.splitlines()[-1] == f"attention: {pic}"


def test_attention_pictures_in_the_photo_folder_are_not_captioned_next_time(tiny_run, tmp_path):
    d = tmp_path / "album"
    photos(d, 2)
    assert cli(d, *tiny_run, "--attention-dir", d)[0] == 0
    assert sorted(p.name for p in d.iterdir()) == ["p0.attention.png", "p0.jpg", "p1.attention.png", "p1.jpg"]
    code, out = cli(d, *tiny_run)
    assert code == 0 and [ln.split("\t")[0] for ln in out.splitlines() if "\t" in ln] == [str(d / "p0.jpg"),
                                                                                          str(d / "p1.jpg")]
    assert out.splitlines()[-1].startswith("captioned 2 photos in ")


def test_the_same_run_or_model_twice_is_refused(tiny_run, tmp_path):
    (photo,) = photos(tmp_path, 1)
    code, out = cli(photo, *tiny_run, "--run", tiny_run[1])
    assert code == 2 and out.count("\n") == 1 and "given twice" in out
    m = tmp_path / "model"
    m.mkdir()
    (m / "model.json").write_text("{}")
    code, out = cli(photo, "--model", m, "--model", m)
    assert code == 2 and f"--model {m}: given twice (as --model {m})" in out


def test_an_out_file_of_another_model_is_refused(tiny_run, tmp_path):
    (photo,) = photos(tmp_path, 1)
    out_file = tmp_path / "c.jsonl"
    out_file.write_text(json.dumps({"path": "/x.jpg", "caption": "a dog", "model": "vgg19_soft"}) + "\n")
    code, out = cli(photo, *tiny_run, "--out", out_file)
    assert code == 2 and "holds captions by vgg19_soft" in out and len(rows(out_file)) == 1


def test_progress_bar_on_stderr(tiny_run, tmp_path, capsys):
    from pipeline.config import CaptionConfig
    d = tmp_path / "album"
    photos(d, 3)
    cfg = CaptionConfig(device="cpu", weights_dir=str(tiny_run[3]), beam=2)
    n = caption_command([str(d)], [tiny_run[1]], [], cfg, Options(out=str(tmp_path / "c.jsonl"), progress=True),
                        draw=None, echo=print)
    err = capsys.readouterr().err
    assert n == 3 and "caption: 100%" in err and "3/3" in err
