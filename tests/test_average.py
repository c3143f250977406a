"""`pipeline average` (inference/average.py): the weighted mean of decoders' weights as one run that score, train
--init-from and the other commands read; what it records of its members, and the members it refuses."""
import json
from pathlib import Path

import pytest
import torch

from pipeline.config import ScoreConfig
from pipeline.inference import shipped
from pipeline.inference.average import mean_state, parse_weights
from pipeline.errors import UserError
from pipeline.provenance import sha256_file
from pipeline.training.runs import load_run
from test_shipped import QUIET, cli, here, tiny  # noqa: F401  (fixtures: the tiny run and its exports)

QUIET_LOG = dict(log=lambda *_: None)


def _fine_tuned(name: str, *extra) -> Path:
    """runs/NAME: one more epoch of tiny_run (`--init-from`), so its weights differ from tiny_run's."""
    if not Path("runs", name).exists():
        code, out = cli("train", "--features", "features/tiny.h5", "--init-from", "runs/tiny_run", "--epochs", "1",
                        "--batch-size", "4", "--lr", "3e-2", "--run", f"runs/{name}", "--threads", "1", *extra)
        assert code == 0, out
    return Path("runs", name)


def test_the_mean_is_each_tensor_weighted_and_decodes_as_a_run_with_those_weights(here):
    ft = _fine_tuned("tiny_ft")
    code, out = cli("average", "--run", "runs/tiny_run", "--run", ft, "--weight", "1", "--weight", "3",
                    "--out", "runs/avg")
    assert code == 0, out
    a, b = (load_run(r, **QUIET_LOG).model.state_dict() for r in ("runs/tiny_run", ft))
    assert any(not torch.equal(a[k], b[k]) for k in a)          # two different decoders
    mean = load_run("runs/avg", **QUIET_LOG)
    for k, v in mean.model.state_dict().items():
        want = (0.25 * a[k].double() + 0.75 * b[k].double()).to(v.dtype) if v.is_floating_point() else a[k]
        assert torch.equal(v, want), k
    members = mean.ckpt["average"]["members"]
    assert [m["weight"] for m in members] == [0.25, 0.75]
    assert [m["sha256"] for m in members] == [sha256_file(Path(r) / "best.pt") for r in ("runs/tiny_run", ft)]
    assert json.loads(Path("runs/avg/config.json").read_text())["average"] == mean.ckpt["average"]

    from pipeline.inference.score import decode_split
    by_hand = load_run("runs/tiny_run", **QUIET_LOG)
    by_hand.model.load_state_dict(mean.model.state_dict())
    cfg = ScoreConfig(**QUIET)
    got = decode_split([mean], "val", cfg, **QUIET_LOG)
    want = decode_split([by_hand], "val", cfg, **QUIET_LOG)
    assert [h.tokens for h in got.hyps] == [h.tokens for h in want.hyps]
    code, out = cli("score", "--run", "runs/avg", "--split", "val", "--workers", "1", "--beam", "2")
    assert code == 0, out
    assert list(Path("runs/avg").glob("scores_val.beam2_*.json"))


def test_a_shipped_member_counts_with_its_weights_and_sha256(here):
    code, out = cli("average", "--run", "runs/tiny_run", "--model", "tiny32", "--out", "runs/avg_shipped")
    assert code == 0, out
    run = load_run("runs/tiny_run", **QUIET_LOG).model.state_dict()
    got = load_run("runs/avg_shipped", **QUIET_LOG)
    assert all(torch.allclose(v, run[k], atol=1e-7) for k, v in got.model.state_dict().items())  # tiny32 = the run
    m = shipped.read_manifest(here["models"] / "tiny32")
    rec = got.ckpt["average"]["members"][1]
    assert rec["model"] == "tiny32" and rec["sha256"] == m["files"]["decoder"]["sha256"] and rec["weight"] == 0.5


def test_train_starts_from_the_mean_and_never_resumes_it(here):
    ft = _fine_tuned("tiny_ft")
    if not Path("runs/avg2").exists():
        assert cli("average", "--run", "runs/tiny_run", "--run", ft, "--out", "runs/avg2")[0] == 0
    code, out = cli("train", "--run", "runs/avg2", "--resume")
    assert code == 2 and "runs/avg2" in out
    code, out = cli("train", "--features", "features/tiny.h5", "--init-from", "runs/avg2", "--epochs", "1",
                    "--batch-size", "4", "--lr", "1e-12", "--run", "runs/from_avg", "--threads", "1")
    assert code == 0, out
    assert "the mean of 2 decoders" in out
    start, mean = (load_run(r, **QUIET_LOG).model.state_dict() for r in ("runs/from_avg", "runs/avg2"))
    assert all(torch.allclose(v.float(), mean[k].float(), atol=1e-6) for k, v in start.items())


def test_members_that_cannot_be_averaged_are_refused_naming_them_and_nothing_is_written(here):
    other = Path("runs/tiny_wide")
    if not other.exists():
        code, out = cli("train", "--features", "features/tiny.h5", "--epochs", "1", "--batch-size", "4",
                        "--min-count", "1", "--embed-dim", "8", "--attention-dim", "8", "--hidden-dim", "6", "--run", other, "--threads", "1")
        assert code == 0, out
    cases = [
        (("--run", "runs/tiny_run", "--run", other), "--run runs/tiny_wide (against --run runs/tiny_run): another "
                                                      "decoder (hidden_dim=6, not 8)"),
        (("--run", "runs/tiny_run", "--run", "runs/tiny_run"), "--run runs/tiny_run given twice"),
        (("--run", "runs/tiny_run"), "needs at least two members"),
        (("--run", "runs/tiny_run", "--model", "tiny32", "--weight", "1"), "--weight given 1 times for 2 members"),
        (("--run", "runs/tiny_run", "--model", "tiny32", "--weight", "1", "--weight", "-1"), "--weight -1.0: every"),
    ]
    for args, msg in cases:
        code, out = cli("average", *args, "--out", "runs/refused")
        assert code == 2 and msg in out, out
        assert not Path("runs/refused").exists()
    Path("runs/mine").mkdir(exist_ok=True)
    (Path("runs/mine") / "notes.txt").write_text("keep")
    code, out = cli("average", "--run", "runs/tiny_run", "--model", "tiny32", "--out", "runs/mine")
    assert code == 2 and "--out runs/mine: exists and is not an empty folder" in out
    assert [p.name for p in Path("runs/mine").iterdir()] == ["notes.txt"]
    assert not list(Path("runs").glob(".mine.average-*"))


def test_weights_are_normalised_and_the_mean_is_exact_in_float64():
    assert parse_weights([], 4) == [0.25] * 4
    assert parse_weights([1, 3], 2) == [0.25, 0.75]
    with pytest.raises(UserError, match="positive"):
        parse_weights([1, float("nan")], 2)
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    out = mean_state([a, b], [0.25, 0.75])
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0])) and out["n"].item() == 3


def test_an_exported_mean_names_its_members_on_the_card(here, tmp_path):
    from pipeline.config import ExportConfig
    from pipeline.inference.export import export_run
    ft = _fine_tuned("tiny_ft")
    if not Path("runs/avg3").exists():
        assert cli("average", "--run", "runs/tiny_run", "--run", ft, "--weight", "1", "--weight", "3",
                   "--out", "runs/avg3")[0] == 0
    d = export_run(Path("runs/avg3"), "tiny_avg", ExportConfig(dtype="float32"), ScoreConfig(**QUIET),
                   root=tmp_path / "models", log=lambda *_: None)
    m = shipped.read_manifest(d)
    json.loads((d / "model.json").read_text(), parse_constant=lambda c: pytest.fail(f"model.json holds {c}"))
    assert m["source"]["average"] == load_run("runs/avg3", **QUIET_LOG).ckpt["average"]
    assert m["source"]["train_command"] == ("pipeline average --run runs/tiny_run --run runs/tiny_ft "
                                            "--weight 0.25 --weight 0.75 --out RUN")
    card = (d / "README.md").read_text()
    assert "the weighted mean of 2 decoders' weights (`pipeline average`, docs/training.md): `runs/tiny_run` x 0.25" \
        in card
    assert "epoch 0" not in card
    assert cli("average", "--run", "runs/avg3", "--run", ft, "--out", "runs/avg_of_avg")[0] == 0
    rec = load_run("runs/avg_of_avg", **QUIET_LOG).ckpt["average"]["members"][0]
    assert rec["epoch"] is None and rec["average_of"] == ["runs/tiny_run", "runs/tiny_ft"]
    d = export_run(Path("runs/avg_of_avg"), "tiny_avg2", ExportConfig(dtype="float32"), ScoreConfig(**QUIET),
                   root=tmp_path / "models", log=lambda *_: None)
    assert "`runs/avg3` x 0.5 (the mean of `runs/tiny_run`, `runs/tiny_ft`, sha256" in (d / "README.md").read_text()


def test_the_folder_is_made_as_any_run_folder(here):
    import os
    assert cli("average", "--run", "runs/tiny_run", "--model", "tiny32", "--out", "runs/avg_mode")[0] == 0
    mask = os.umask(0)
    os.umask(mask)
    assert Path("runs/avg_mode").stat().st_mode & 0o777 == 0o777 & ~mask
    assert sorted(p.name for p in Path("runs/avg_mode").iterdir()) == [".pipeline-run", "best.pt", "config.json",
                                                                       "vocab.json"]
