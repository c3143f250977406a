"""The real shipped models under models/: `pipeline score --model NAME --split val` (each card's command)
gives the card's val scores. Its own module: tests/test_shipped.py's tiny fixtures switch METEOR off for
the whole of their module, and the cards hold METEOR."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.inference import shipped

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "flickr8k"


def cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.output

def _real_models() -> list:
    root = REPO / "models"
    return sorted(p.parent.name for p in root.glob(f"*/{shipped.MANIFEST}")) if root.is_dir() else []


@pytest.mark.slow
@pytest.mark.spice                    # the card's scores include SPICE when `make spice` installed it
@pytest.mark.parametrize("name", _real_models() or [pytest.param(None, marks=pytest.mark.skip(
    reason="no shipped model under models/ yet (`pipeline export RUN --name NAME` adds one)"))])
def test_real_models_reproduce_their_cards(name, monkeypatch, tmp_path):
    """`pipeline score --model NAME --split val` (the card's command) gives the card's val scores."""
    if not SHARED.is_dir():
        pytest.skip(f"no Flickr8k at {SHARED} (the shared data set)")
    monkeypatch.delenv(shipped.ENV, raising=False)
    m = shipped.read_manifest(REPO / "models" / name)
    loaded = shipped.load_model(name)                                  # sha256s checked
    try:
        shipped.check_cache([loaded])
    except UserError as e:
        pytest.skip(str(e))
    feats = [str(Path(f["path"]).resolve()) for f in loaded.features]  # relative to the repo root: resolve before chdir
    from pipeline.cache.layout import read_attrs
    made = {read_attrs(p).get("precision") or "fp32" for p in feats}
    card_made = {(f.get("provenance") or {}).get("precision") or "fp32" for f in m["features"]}
    if made != {"fp32"} or card_made != {"fp32"}:   # bf16 features differ a little between machines (oneDNN's kernels)
        pytest.skip(f"the card was scored from {'/'.join(sorted(card_made))} features and the cache here was extracted "
                    f"in {'/'.join(sorted(made))}: scores are exact only from fp32 features on both sides "
                    f"(`make extract PRECISION=fp32`); bf16 vs fp32 is benchmarks/bf16_check.py's business")
    monkeypatch.chdir(tmp_path)                                        # results go to tmp_path/runs/model_NAME
    dec = m["scores"]["decoding"]                                      # the card's decoding, whatever the model's choice
    args = m["scores"]["command"].split()[2:] + ["--beam", str(dec["beam"]), "--length-norm", str(dec["length_norm"])]
    code, out = cli("score", *args, *[x for p in feats for x in ("--features", p)])
    assert code == 0, out
    got = json.loads(sorted((tmp_path / "runs" / f"model_{name}").glob("scores_val*.json"))[-1].read_text())
    card = m["scores"][m["scores"]["stored"]]["metrics"]
    if "SPICE" not in got["metrics"]:                                  # no `make spice` here: the rest must match
        card = {k: v for k, v in card.items() if k != "SPICE"}
    assert got["metrics"] == pytest.approx(card, abs=1e-6)
    if m.get("decoding"):                      # the decoding chosen on val (its own scores), what a plain command uses
        shutil.rmtree(tmp_path / "runs")
        assert cli("score", *m["scores"]["command"].split()[2:], *[x for p in feats for x in ("--features", p)])[0] == 0
        got = json.loads(next((tmp_path / "runs" / f"model_{name}").glob("scores_val*.json")).read_text())["metrics"]
        want = m["decoding"].get("val") or card   # exported with its decoding: the card's scores are at it
        assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-6)
