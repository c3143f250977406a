"""caption / report / viz and the CLI wiring of score, caption, report (toy model, fake runs)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import pipeline.inference.caption as caption_mod
from pipeline.training import runs
from pipeline.inference.caption import attention_paths, words_and_maps
from pipeline.cli import main
from pipeline.decoder.decode import Hypothesis
from pipeline.errors import UserError
from pipeline.reporting.viz import attention_figure, upsample_alpha

from test_score import PROV, SCRIPTS, VOCAB, Scripted, make_store


def _fake_run(tmp_path, name, bleu, with_scores=True, attention="soft", dataset="shapes", backbones=("vgg19",)):
    """A run directory as train.py and score.py write it (config.json, log.jsonl fields, scores_val.json)."""
    d = tmp_path / "runs" / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({
        "train": {"epochs": 20}, "decoder": {"attention": attention},
        "features": [{"path": f"f_{b}.h5", "provenance": {"dataset": dataset, "backbone": b}} for b in backbones]}))
    (d / "log.jsonl").write_text("\n".join(json.dumps({"epoch": e + 1, "loss": 3 - e, "nll": 3.2 - e,
                                                       "bleu4": bleu * (e + 1) / 3, "cider": 0.3, "train_s": 50,
                                                       "val_s": 10}) for e in range(3)) + "\n")
    if with_scores:
        (d / "scores_val.json").write_text(json.dumps({"beam": 3, "metrics": {"Bleu_1": 0.6, "Bleu_4": bleu,
                                                                              "METEOR": 0.2, "ROUGE_L": 0.4,
                                                                              "CIDEr": 0.5},
                                                       "attention": {"words": 10, "mass_in_box": 0.6}}))
    return d


def test_upsample_and_attention_figure(tmp_path):
    a = np.zeros(196)
    a[0] = 1
    m = upsample_alpha(a, (14, 14))
    assert m.shape == (224, 224) and m[0, 0] == 1.0 and m[-1, -1] == 0.0
    img = Image.fromarray((np.random.rand(100, 80, 3) * 255).astype(np.uint8))
    out = attention_figure(img, ["a", "red", "circle"], np.eye(196)[[0, 5, 100]], tmp_path / "att.png")
    assert Image.open(out).size[0] > 300


def test_words_and_maps_and_paths():
    h = Hypothesis([VOCAB.stoi["a"], VOCAB.unk, VOCAB.stoi["red"], VOCAB.end], torch.eye(4, 196), -1.0)
    words, maps = words_and_maps(h, VOCAB)
    # <unk> (emitted only with --no-suppress-unk) stays visible, with its own map: no caption loses a word silently
    assert words == ["a", "<unk>", "red"] and maps.shape == (3, 196) and maps[2, 2] == 1
    assert attention_paths("o/att.png", ["x/a.jpg"]) == [__import__("pathlib").Path("o/att.png")]
    assert [p.name for p in attention_paths("o/att.png", ["x/a.jpg", "y/b.jpg", "z/b.jpg"])] == \
        ["att_a.png", "att_b_1.png", "att_b_2.png"]


LEGACY_NAME = "beam3_ln0_len20_noblocktri_nomaskunk"   # what a scores_val.json of before the names decoded


def test_report_and_curves(tmp_path, monkeypatch):
    _fake_run(tmp_path, "r1", 0.2)
    _fake_run(tmp_path, "r2", 0.25, with_scores=False)
    _fake_run(tmp_path, "r3", 0.3, attention="hard", dataset="flickr8k", backbones=("vgg19", "efficientnet_lite2"))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["report", "--curves"])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "runs" / "report.md").read_text()
    assert f"| r1 | shapes | vgg19 | soft | {LEGACY_NAME} | 60.00 | 20.00 |" in md and "| r2 | shapes | vgg19 | soft |  |" in md
    assert "| 3 | 3.0 |" in md   # epochs, minutes (3 x 60 s)
    assert "| r3 | flickr8k | vgg19+efficientnet_lite2 | hard |" in md
    assert (tmp_path / "runs" / "report.png").exists() and (tmp_path / "runs" / "r1" / "curves.png").exists()
    assert "SPICE" not in md                     # no run has SPICE: no column
    sc = tmp_path / "runs" / "r1" / "scores_val.json"
    sc.write_text(json.dumps(dict(json.loads(sc.read_text()), metrics={"Bleu_4": 0.2, "SPICE": 0.131})))
    assert CliRunner().invoke(main, ["report", "runs/r1", "runs/r2"]).exit_code == 0
    md = (tmp_path / "runs" / "report.md").read_text()
    assert "val SPICE" in md and "| 13.10 |" in md
    res = CliRunner().invoke(main, ["report", "nope"])
    assert res.exit_code == 2 and "not a directory" in res.output


def test_report_has_a_row_per_decoding(tmp_path):
    """`pipeline score` names its files by decoding (issue 20): report shows each decoding of a run, and the
    scores_val.json of a run scored before that, named by the settings it records."""
    from pipeline.reporting.report import make_report
    r1 = _fake_run(tmp_path, "r1", 0.2)
    new = {"beam": 3, "length_norm": 0.7, "max_len": 0, "block_trigrams": True, "suppress_unk": True,
           "remove_bad_endings": False, "hard_context": "expected"}
    (r1 / "scores_val.beam3_ln0.7.json").write_text(json.dumps(dict(new, metrics={"Bleu_1": 0.7, "Bleu_4": 0.3})))
    (r1 / "scores_test.beam3_ln0.7.json").write_text(json.dumps(dict(new, metrics={"Bleu_1": 0.65, "Bleu_4": 0.28})))
    (r1 / "scores_val.beam5_ln0.7.json").write_text(json.dumps(dict(new, beam=5, metrics={"Bleu_4": 0.31})))
    rows = make_report([r1], tmp_path / "report.md", log=lambda *a: None)["rows"]
    assert [(r["decoding"], r["val"].get("Bleu_4"), r["test"].get("Bleu_4")) for r in rows] == [
        ("beam3_ln0.7", 0.3, 0.28), (LEGACY_NAME, 0.2, None), ("beam5_ln0.7", 0.31, None)]
    md = (tmp_path / "report.md").read_text()
    assert "| run | dataset | backbone | attention | decoding | val Bleu-1 | val Bleu-4 |" in md
    assert "| r1 | shapes | vgg19 | soft | beam3_ln0.7 | 70.00 | 30.00 |" in md


def _patch_run(monkeypatch, tmp_path):
    path = tmp_path / "f.h5"
    make_store(path)
    run = tmp_path / "runs" / "toy"
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(b"")
    ckpt = {"features": [{"path": str(path), "provenance": PROV}], "epoch": 1, "num_regions": 196, "feature_dim": 4}
    fake = lambda run_dir, which=None, device="cpu", log=print: runs.LoadedRun(   # noqa: E731
        runs.resolve_run(run_dir), Scripted(SCRIPTS), VOCAB, ckpt, "best")
    monkeypatch.setattr(runs, "load_run", fake)
    return run


@pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer/METEOR need java: apt-get install default-jre-headless")
def test_cli_score(tmp_path, monkeypatch):
    run = _patch_run(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["score", "--split", "val", "--beam", "3", "--max-len", "20", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    (path,) = run.glob("scores_val.*.json")
    saved = json.loads(path.read_text())
    assert path.name == f"scores_val.{runs.decoding_name(saved)}.json" and saved["beam"] == 3 and saved["max_len"] == 20
    assert saved["run"] == str(run.relative_to(tmp_path))
    # the figures printed are the ones saved; SPICE (its jars are absent here: conftest) is skipped, saying so
    m = saved["metrics"]
    assert sorted(m) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr", "METEOR", "ROUGE_L"]
    assert f"  Bleu_4   {100 * m['Bleu_4']:6.2f}" in res.output and f"  CIDEr    {100 * m['CIDEr']:6.2f}" in res.output
    assert saved["skipped"] == ["SPICE (jars missing: make spice)"]
    assert saved["attention"]["words"] == 4 and saved["attention"]["mass_in_box"] == pytest.approx(0.75)
    res = CliRunner().invoke(main, ["score", "--split", "val", "--features", "missing.h5"])
    assert res.exit_code == 2 and "missing.h5" in res.output


def test_cli_caption_with_attention(tmp_path, monkeypatch):
    run = _patch_run(monkeypatch, tmp_path)
    feats = np.zeros((2, 196, 4), np.float32)
    feats[:, 0, 0] = [0, 1]

    class FakeEncoder:                      # the backbone of the run's provenance, faked
        def __init__(self, provenances, **kw):
            assert provenances == [PROV]

        def __call__(self, images, batch_size=16):
            return feats[:len(images)]
    monkeypatch.setattr(caption_mod, "Encoder", FakeEncoder)
    imgs = []
    for i in range(2):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(np.full((224, 224, 3), 40 * i, np.uint8)).save(p)
        imgs.append(str(p))
    res = CliRunner().invoke(main, ["caption", *imgs, "--run", str(run), "--attention", str(tmp_path / "att.png"),
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert f"{imgs[0]}\ta red circle" in res.output and f"{imgs[1]}\ta blue square and" in res.output
    assert (tmp_path / "att_im0.png").exists() and (tmp_path / "att_im1.png").exists()
    res = CliRunner().invoke(main, ["caption", str(tmp_path / "nope.jpg"), "--run", str(run)])
    assert res.exit_code == 2 and "no such image" in res.output


# ---- browse: its options and the results files of `pipeline score` (issue 20) --------------------------

def _index(site):
    text = (site / "data" / "index.js").read_text()
    return json.loads(text[len("BROWSE.index("):-len(");\n")])


def test_browse_reads_the_results_file_of_its_decoding(tmp_path, monkeypatch):
    import pipeline.inference.score as score_mod
    monkeypatch.setattr(score_mod, "java_available", lambda: False)   # the Python tokenizer: no JVM to start
    run = _patch_run(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    opts = ["--split", "val", "--beam", "2", "--max-len", "20", "--device", "cpu"]
    res = CliRunner().invoke(main, ["browse", "--run", str(run), "--out", "site", *opts])
    assert res.exit_code == 0, res.output
    info = _index(tmp_path / "site")["runs"][0]["info"]
    assert info["results_file"] is None and info["decoding"] == runs.decoding_name(config_of(opts))
    assert CliRunner().invoke(main, ["score", "--run", str(run), *opts]).exit_code == 0
    scored = runs.results_path(run, "val", config_of(opts))
    assert CliRunner().invoke(main, ["browse", "--run", str(run), "--out", "site", *opts]).exit_code == 0
    ix = _index(tmp_path / "site")
    assert ix["runs"][0]["info"]["results_file"] == str(scored) and not any("differ" in n for n in ix["notes"])
    scored.write_text(json.dumps([{"image_id": 0, "caption": "a blue circle"}, {"image_id": 1, "caption": "x"}]))
    assert CliRunner().invoke(main, ["browse", "--run", str(run), "--out", "site", *opts]).exit_code == 0
    assert f"toy: 2 of 2 captions differ from {scored}, which `pipeline score` wrote with the same decoding " \
           f"(from another checkpoint?)." in _index(tmp_path / "site")["notes"]


def config_of(opts):
    from pipeline.config import ScoreConfig
    return ScoreConfig(split="val", beam=int(opts[3]), max_len=int(opts[5]), device="cpu")


def test_browse_refuses_several_runs_and_an_images_folder_that_holds_none(tmp_path, monkeypatch):
    """`browse --run A --run B` silently browsed B; --images wanted the dataset root but said 'folder holding
    the images', and a wrong folder gave a site of gray placeholders."""
    run = _patch_run(monkeypatch, tmp_path)
    res = CliRunner().invoke(main, ["browse", "--run", str(run), "--run", str(tmp_path / "other")])
    assert res.exit_code == 2 and res.output.startswith("error: --run given 2 times: browse shows one run (or two: "
                                                        "--run A --compare B).")
    assert f"pipeline score --run {run} --run {tmp_path / 'other'}" in res.output
    (tmp_path / "data" / "images").mkdir(parents=True)        # the cache's paths are 0.png, 1.png: relative to data/images
    res = CliRunner().invoke(main, ["browse", "--run", str(run), "--images", str(tmp_path / "data"), "--device", "cpu"])
    assert res.exit_code == 2 and res.output.startswith(
        f"error: --images {tmp_path / 'data'}: none of the split's images is under it (e.g. {tmp_path / 'data'}/0.png)")
    assert "the dataset folder given to extract --root" in res.output and "dataset folder" in \
        CliRunner().invoke(main, ["browse", "--help"]).output.split("--images")[1]


def test_browse_disk_full_is_one_error(tmp_path, monkeypatch):
    """write_site called runs.disk_error, which does not exist: a full disk was an AttributeError."""
    import errno
    from pipeline.reporting import browse_site
    from pipeline.reporting.browse import RunResult, SiteData, write_site

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(browse_site, "_write", full)
    data = SiteData("t", "val", ["0"], [None], [["a red circle"]],
                    [RunResult("r", [["a"]], [np.zeros((1, 196), np.float32)], [None])])
    with pytest.raises(UserError, match=r"site: could not be written \(the disk is full"):
        write_site(data, tmp_path / "site")
    assert list(tmp_path.iterdir()) == []


# ---- report --by-seed (seed aggregation) and the energy estimate -------------------------------------------

def _seed_run(tmp_path, name, seed, bleu4, *, lr=4e-4, test=None, cpu_s=None, features=("f_vgg19.h5",)):
    """A fake run (as _fake_run) whose config.json records its seed and settings as train.py writes them."""
    d = _fake_run(tmp_path, name, bleu4)
    cfg = json.loads((d / "config.json").read_text())
    cfg["train"] = {"seed": seed, "lr": lr, "epochs": 20, "device": ("cpu", "auto", "cuda")[seed % 3], "threads": seed}
    cfg["features"] = [dict(f, path=str(p)) for f, p in zip(cfg["features"], features)]
    (d / "config.json").write_text(json.dumps(cfg))
    if test is not None:
        (d / "scores_test.json").write_text(json.dumps({"beam": 3, "metrics": {"Bleu_4": test}}))
    if cpu_s is not None:      # every epoch records its compute (train.py)
        log = [dict(json.loads(s), cpu_s=cpu_s, gpu_s=0.0) for s in (d / "log.jsonl").read_text().splitlines()]
        (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return d


def test_report_by_seed_shows_mean_and_sample_sd(tmp_path):
    from pipeline.reporting.report import Stat, make_report
    runs_ = [_seed_run(tmp_path, "s1", 1, 0.20, test=0.30, cpu_s=100.0),
             _seed_run(tmp_path, "s3", 3, 0.27, cpu_s=300.0),
             _seed_run(tmp_path, "s2", 2, 0.22, test=0.34, cpu_s=200.0),
             _seed_run(tmp_path, "lr", 1, 0.40, lr=1e-3)]          # another setting: not a seed of the others
    quiet = lambda *a: None                                        # noqa: E731
    plain = make_report(runs_, tmp_path / "plain.md", log=quiet)["rows"]
    assert [r["run"] for r in plain] == ["s1", "s3", "s2", "lr"] and "seeds" not in plain[0]
    rows = make_report(runs_, tmp_path / "report.md", log=quiet, by_seed=True)["rows"]
    assert [(r["run"], r["seeds"]) for r in rows] == [("s1, s2, s3", [1, 2, 3]), ("lr", [1])]
    b4 = rows[0]["val"]["Bleu_4"]     # mean 0.23; deviations -.03 -.01 .04: sd = sqrt(.0026 / 2) (n-1)
    assert b4.n == 3 and b4.mean == pytest.approx(0.23) and b4.sd == pytest.approx(0.0013 ** 0.5)
    assert rows[0]["val"]["Bleu_1"] == Stat(0.6, 0.0, 3, 3)
    t = rows[0]["test"]["Bleu_4"]     # two of the three seeds were scored on test
    assert (t.n, t.of) == (2, 3) and t.mean == pytest.approx(0.32) and t.sd == pytest.approx(0.02 * 2 ** 0.5)
    assert rows[0]["cpu_h"] == pytest.approx(3 * 600 / 3600) and rows[0]["epochs"] == 3   # compute: summed
    md = (tmp_path / "report.md").read_text()
    assert "| run | dataset | backbone | attention | decoding | seeds | val Bleu-1 | val Bleu-4 |" in md
    assert f"| s1, s2, s3 | shapes | vgg19 | soft | {LEGACY_NAME} | 1,2,3 (n=3) | 60.00 ± 0.00 | 23.00 ± 3.61 |" in md
    assert "| 32.00 ± 2.83 (n=2) |" in md and f"| lr | shapes | vgg19 | soft | {LEGACY_NAME} | 1 | 60.00 | 40.00 |" in md
    assert "mean ± sample sd" in md and "mean ± sample sd" not in (tmp_path / "plain.md").read_text()


def test_report_by_seed_keeps_other_caches_and_decodings_apart(tmp_path):
    """Same settings but another cache (provenance), or another decoding: not seeds of one row."""
    from pipeline.reporting.report import make_report
    a = _seed_run(tmp_path, "a", 1, 0.2)
    b = _seed_run(tmp_path, "b", 2, 0.3)
    c = _seed_run(tmp_path, "c", 3, 0.4)
    cfg = json.loads((c / "config.json").read_text())
    cfg["features"][0]["provenance"]["weights_sha256"] = "f" * 64
    (c / "config.json").write_text(json.dumps(cfg))
    (b / "scores_val.beam5_ln0.7.json").write_text(json.dumps({"beam": 5, "metrics": {"Bleu_4": 0.5}}))
    rows = make_report([a, b, c], tmp_path / "r.md", log=lambda *x: None, by_seed=True)["rows"]
    assert [(r["run"], r["decoding"], r["seeds"]) for r in rows] == [
        ("a, b", LEGACY_NAME, [1, 2]), ("b", "beam5_ln0.7", [2]), ("c", LEGACY_NAME, [3])]
    assert rows[0]["val"]["Bleu_4"].mean == pytest.approx(0.25)


def test_energy_estimate_arithmetic():
    from pipeline import provenance
    assert provenance.CPU_WATTS_PER_CORE == 350 / 56 and provenance.GPU_WATTS == 700
    # 1 CPU hour at 6.25 W = 22.5 kJ; half a GPU hour at 700 W = 1.26 MJ; 1 kWh = 3.6 MJ
    assert provenance.energy_kwh({"cpu_s": 3600, "gpu_s": 1800}) == pytest.approx((22_500 + 1_260_000) / 3.6e6)
    assert provenance.energy_kwh({"cpu_s": 3600}) == pytest.approx(0.00625)
    assert provenance.energy_kwh({"wall_s": 5}) is None and provenance.energy_kwh(None) is None


def test_report_shows_energy_of_training_and_extraction(tmp_path):
    from pipeline.extraction import compute as extraction_compute
    from pipeline.reporting.report import make_report
    from pipeline.training.compute import summary
    cache = tmp_path / "f.h5"
    make_store(cache)
    extraction_compute.record(cache, {"wall_s": 120.0, "cpu_s": 7200.0, "gpu_s": 360.0}, "cuda", images=12)
    run = _seed_run(tmp_path, "e", 0, 0.2, cpu_s=1200.0, features=(cache,))    # 3 epochs: 1 CPU hour
    row = make_report([run], tmp_path / "r.md", log=lambda *a: None)["rows"][0]
    assert row["kwh"] == pytest.approx(0.00625)
    assert row["extract_kwh"] == pytest.approx((7200 * 6.25 + 360 * 700) / 3.6e6) and row["extract_min"] == 2.0
    md = (tmp_path / "r.md").read_text()
    assert "| CPU h | kWh | extract min | extract kWh |" in md and "| 1.00 | 0.00625 | 2.0 | 0.0825 |" in md
    assert "CPU-seconds x 6.25 W per core + GPU-seconds x 700 W" in md
    assert summary({"wall_s": 60, "cpu_s": 1800}) == "compute so far: 1.0 min wall, 0.50 CPU h, ~0.0031 kWh"
