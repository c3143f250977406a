"""End to end: the demo's chain (synth -> extract -> train -> score -> caption -> browse) on a tiny set."""
import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "weights"


@pytest.mark.slow
@pytest.mark.skipif(not (WEIGHTS / "vgg19_oxford.pt").exists(),
                    reason="weights/vgg19_oxford.pt absent: run `make weights` (CI does)")
def test_demo_end_to_end(tmp_path):
    from pipeline.cache.readers import FeatureStore
    from pipeline.demo import TRAIN_ARGS
    from pipeline.inference.score import language_metrics
    from pipeline.training import runs

    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--train", "24", "--val", "6", "--test", "4",
                                       "--epochs", "2", "--weights-dir", str(WEIGHTS)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = out / "runs" / "shapes_vgg19_soft"
    assert (run / "best.pt").exists()
    # a fixed number of epochs (it trained for wall-clock minutes: fewer epochs on a loaded machine), with the
    # demo's own settings, not the Flickr8k defaults
    assert [r["epoch"] for r in runs.read_log(run)] == [1, 2]
    saved = json.loads((run / "config.json").read_text())
    given = dict(zip(TRAIN_ARGS[::2], TRAIN_ARGS[1::2]))
    assert (saved["train"]["lr"], saved["train"]["label_smoothing"], saved["train"]["epochs"]) == (1e-3, 0.0, 2)
    assert [saved["decoder"][k] for k in ("embed_dropout", "context_dropout", "hidden_dropout")] == [0.0] * 3
    assert [saved["train"][k] for k in ("ema", "lr_schedule", "lr_factor", "beam")] == [0.0, "plateau", 0.8, 1]
    assert given["--lr"] == "1e-3" and saved["decoder"]["attention"] == given["--attention"] == "soft"

    # the scores are pycocoevalcap's figures of the captions written, against every reference of the cache
    (path,) = run.glob("scores_val.*.json")
    scores = json.loads(path.read_text())
    captions = runs.read_results(runs.results_path(run, "val", scores))
    store = FeatureStore.open(out / "shapes_vgg19.h5")
    refs = {str(store.image_ids[r]): c for r, c in store.references("val").items()}
    assert sorted(captions) == sorted(refs) and len(captions) == 6 and all(c.strip() for c in captions.values())
    java = shutil.which("java") is not None
    want = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"] + (["METEOR"] if java else []) + ["ROUGE_L"]
    assert sorted(scores["metrics"]) == want
    assert scores["tokenizer"] == ("PTBTokenizer" if java else "python-fallback (no java)")
    assert scores["skipped"] == ([] if java else ["METEOR (no java)"]) + ["SPICE (jars missing: make spice)"]
    again, _ = language_metrics(captions, refs, log=lambda *a: None)
    assert again == pytest.approx(scores["metrics"], abs=1e-9)
    assert scores["num_scored"] == 6 and scores["attention"]["words"] > 0

    results = runs.read_results(runs.results_path(run, "test", scores))
    assert len(results) == 4 and all(c.strip() for c in results.values())
    assert len(list(out.glob("attention*.png"))) == 2
    site = out / "browse"
    assert (site / "index.html").exists() and (site / "data" / "index.js").exists()
    assert len(list((site / "img").glob("*.jpg"))) == 6                 # one thumbnail per val image
    assert f"{site / 'index.html'}" in result.output


def _demo(out, *extra):
    return CliRunner().invoke(main, ["demo", "--out", str(out), "--train", "6", "--val", "2", "--test", "2",
                                     "--epochs", "1", "--backbone", "tiny", *extra])


def test_demo_twice_second_run_succeeds_and_keeps_the_outputs(tmp_path, monkeypatch):
    """`make demo` a second time over a finished demo: every stage finds its work done (or redoes it in
    place) and the command exits 0 with the same run and valid outputs (it used to refuse the train options)."""
    from pipeline.extraction import backbones
    from pipeline.training import runs
    from test_extract import tiny_spec
    from test_shipped import no_java
    monkeypatch.setitem(backbones.BACKBONES, "tiny", tiny_spec())
    no_java(monkeypatch)                    # no JVM per scoring (slow on a shared CPU); the chain is the same

    out = tmp_path / "demo"
    first = _demo(out)
    assert first.exit_code == 0, first.output + repr(first.exception)
    run = out / "runs" / "shapes_tiny_soft"
    best = (run / "best.pt").read_bytes()
    second = _demo(out)
    assert second.exit_code == 0, second.output + repr(second.exception)
    assert "is finished: all 1 epochs are trained" in second.output
    assert (run / "best.pt").read_bytes() == best                       # the trained model is kept as it was
    assert [r["epoch"] for r in runs.read_log(run)] == [1]
    for split, n in (("val", 2), ("test", 2)):
        (path,) = run.glob(f"scores_{split}.*.json")
        scores = json.loads(path.read_text())
        assert scores["num_scored"] == n
        results = runs.read_results(runs.results_path(run, split, scores))
        assert len(results) == n and all(c.strip() for c in results.values())
    assert len(list(out.glob("attention*.png"))) == 2
    assert (out / "browse" / "index.html").exists() and len(list((out / "browse" / "img").glob("*.jpg"))) == 2


def test_resume_accepts_the_saved_decoder_values_and_refuses_a_real_change(tmp_path):
    """`pipeline train --resume` given the run's own decoder and training options continues it; a changed
    decoder or training setting is refused with the value the run was trained with, and nothing is written."""
    from helpers_store import make_store
    from pipeline.training import runs
    feats = make_store(tmp_path / "f.h5", {"train": 12, "val": 4}, L=16, C=8)
    run = tmp_path / "run"
    same = ["--features", str(feats), "--run", str(run), "--embed-dim", "12", "--hidden-dim", "12",
            "--attention-dim", "12", "--hidden-dropout", "0", "--attention", "soft", "--lr", "3e-3",
            "--batch-size", "8", "--min-count", "1", "--log-every", "1000", "--patience", "5"]
    r = CliRunner()
    first = r.invoke(main, ["train", *same, "--epochs", "1"])
    assert first.exit_code == 0, first.output
    again = r.invoke(main, ["train", *same, "--epochs", "2", "--resume"])
    assert again.exit_code == 0, again.output + repr(again.exception)
    assert "resuming" in again.output and [e["epoch"] for e in runs.read_log(run)] == [1, 2]
    before = (run / "last.pt").read_bytes()
    for changed, msg in ((["--hidden-dropout", "0.2"], r"--hidden-dropout 0\.2 \(it was trained with 0\.0\)"),
                         (["--attention", "hard"], r"--attention 'hard' \(it was trained with 'soft'\)"),
                         (["--lr", "0.1"], r"--lr 0\.1 \(it was trained with 0\.003\)")):
        res = r.invoke(main, ["train", *same, "--epochs", "3", "--resume", *changed])
        assert res.exit_code == 2 and re.search(msg + " cannot change", res.output), res.output
    assert (run / "last.pt").read_bytes() == before and [e["epoch"] for e in runs.read_log(run)] == [1, 2]
