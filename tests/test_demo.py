"""End to end: the demo's chain (synth -> extract -> train -> score -> caption -> browse) on a tiny set."""
import json
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
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--train", "24", "--val", "6", "--test", "4",
                                       "--minutes", "0.3", "--weights-dir", str(WEIGHTS)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = out / "runs" / "shapes_vgg19_soft"
    assert (run / "best.pt").exists() and (run / "log.jsonl").exists()
    scores = json.loads((run / "scores_val.json").read_text())
    text = json.dumps(scores)
    for metric in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert metric in text
    results = json.loads((run / "results_test.json").read_text())
    assert len(results) == 4 and all(r["caption"].strip() for r in results)
    assert len(list(out.glob("attention*.png"))) == 2
    site = out / "browse"
    assert (site / "index.html").exists() and (site / "data" / "index.js").exists()
    assert len(list((site / "img").glob("*.jpg"))) == 6                 # one thumbnail per val image
    assert f"{site / 'index.html'}" in result.output
