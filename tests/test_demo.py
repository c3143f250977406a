"""End to end: the demo's chain (synth -> extract -> train -> score -> caption -> browse) on a tiny set."""
import json
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
