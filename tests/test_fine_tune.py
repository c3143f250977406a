"""Stage two fine-tunes the top of the encoder from a cache of an earlier layer (issue 18 part 2): the top
trains with its own learning rate, the checkpoint holds it, resume is bit-exact, decoding runs it, a frozen
top reproduces the run on the final-layer cache, and runs without a top keep loading."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers_store import make_store
from pipeline.cli import main
from pipeline.config import DecoderConfig, ScoreConfig, TrainConfig
from pipeline.decoder.decode import beam_search
from pipeline.decoder.model import Decoder
from pipeline.decoder.topped import TopDecoder
from pipeline.errors import UserError
from pipeline.extraction.cuts import build_top
from pipeline.training import runs
from pipeline.training.runs import load_run
from pipeline.training.train import train

SMALL = dict(embed_dim=12, hidden_dim=12, attention_dim=12, dropout=0.3)
N = {"train": 4, "val": 2}
CUT = {"backbone": "vgg19", "layer": "conv5_4_input", "weights_sha256": "random"}


def cut_store(path, n=N):
    """A cache of VGG19 conv5_4's input (random backbone weights): 14x14x512 rows, structured captions."""
    make_store(path, n, L=196, C=512, backbone="vgg19")
    with h5py.File(path, "r+") as f:
        f.attrs["layer"], f.attrs["weights_sha256"] = CUT["layer"], CUT["weights_sha256"]
    return path


def final_store(path, cut, n=N):
    """The final-layer cache of the same images: the cut cache through the seed-0 random top, in float16."""
    torch.manual_seed(0)
    top = build_top(CUT, pretrained=True)
    with h5py.File(cut, "r") as f, torch.no_grad():
        a = top(torch.from_numpy(f["features"][()]).float()).numpy()
    make_store(path, n, L=196, C=512, backbone="vgg19")
    with h5py.File(path, "r+") as f:
        f["features"][...] = a.astype(np.float16)
        f.attrs["weights_sha256"] = "random"
    return path


def _cfg(feats, **kw):
    return TrainConfig(**dict(dict(features=str(feats), epochs=1, batch_size=8, min_count=1, lr=3e-3, log_every=1000,
                                   seed=0), **kw))


def _losses(cfg, run, **kw):
    got = {}
    res = train(cfg, kw.pop("dcfg", DecoderConfig(**SMALL)), run, echo=lambda _: None,
                on_step=lambda s, loss: got.__setitem__(s, loss.item()), **kw)
    return got, res


def _top_keys(sd):
    return {k: v for k, v in sd.items() if k.startswith("top.")}


def test_frozen_top_run_equals_the_final_cache_run(tmp_path):
    """--top-lr 0 on conv5_4's input trains like the decoder on conv5_4's output: same initial decoder, same
    batches and dropout; the step losses differ only by the float16 rounding of the two caches."""
    cut = cut_store(tmp_path / "cut.h5")
    final = final_store(tmp_path / "final.h5", cut)
    a, _ = _losses(_cfg(cut, top_lr=0.0, max_steps=2), tmp_path / "a")
    b, _ = _losses(_cfg(final, max_steps=2), tmp_path / "b")
    assert a.keys() == b.keys() == {1, 2}
    np.testing.assert_allclose([a[1], a[2]], [b[1], b[2]], rtol=1e-5)
    sd = load_run(tmp_path / "a", "last").ckpt["model"]
    torch.manual_seed(0)
    start = build_top(CUT, pretrained=True).state_dict()
    assert _top_keys(sd).keys() == {f"top.{k}" for k in start}
    assert all(torch.equal(sd[f"top.{k}"], v) for k, v in start.items())          # frozen: still pretrained


def test_fine_tuned_top_is_trained_checkpointed_resumed_and_decoded(tmp_path):
    cut = cut_store(tmp_path / "cut.h5")
    ref, _ = _losses(_cfg(cut, top_lr=1e-3, max_steps=3), tmp_path / "a")
    got, res = _losses(_cfg(cut, top_lr=1e-3, max_steps=1), tmp_path / "b")
    assert res["stopped"] == "max-steps"
    later, _ = _losses(None, tmp_path / "b", resume=True, overrides={"max_steps": 3}, dcfg=None)
    assert later == {2: ref[2], 3: ref[3]}                      # bit-exact resume, top included
    r = load_run(tmp_path / "a", "last")
    assert isinstance(r.model, TopDecoder) and not r.model.training and not r.model.top.training
    torch.manual_seed(0)
    start = build_top(CUT, pretrained=True).state_dict()
    top = _top_keys(r.ckpt["model"])
    assert any(not torch.equal(top[f"top.{k}"], v) for k, v in start.items())    # the top was trained
    opt = r.ckpt["optimizer"]["param_groups"]
    assert len(opt) == 2 and opt[1]["lr"] == 1e-3 and opt[0]["lr"] == 3e-3
    # decoding runs the fine-tuned top: the same beams as a plain decoder on top(cached activations)
    from pipeline.inference.score import decode_split
    d = decode_split([r], "val", ScoreConfig(beam=2, max_len=6, progress=False, workers=1, device="cpu"))
    st = runs.open_run_features(r.ckpt, r.run_dir)
    x = torch.from_numpy(st.load_features(d.rows)).float()
    plain = Decoder(r.model.cfg, r.model.vocab_size, 512).eval()
    plain.load_state_dict({k: v for k, v in r.ckpt["model"].items() if not k.startswith("top.")})
    with torch.no_grad():
        want = beam_search(plain, r.model.top(x), beam=2, max_len=6)
    assert [h.tokens for h in d.hyps] == [h.tokens for h in want]


def test_runs_without_a_top_keep_loading_and_caches_do_not_mix(tmp_path):
    cut = cut_store(tmp_path / "cut.h5")
    final = final_store(tmp_path / "final.h5", cut)
    train(_cfg(final, max_steps=1), DecoderConfig(**SMALL), tmp_path / "plain", echo=lambda _: None)
    r = load_run(tmp_path / "plain", "last")
    assert type(r.model) is Decoder and not _top_keys(r.ckpt["model"])
    # a checkpoint written before cut points: no `layer` key in its provenance
    ckpt = r.ckpt
    for f in ckpt["features"]:
        f["provenance"].pop("layer", None)
    runs.save_checkpoint(ckpt, tmp_path / "plain" / "last.pt")
    old = load_run(tmp_path / "plain", "last")
    assert type(old.model) is Decoder
    runs.check_features(old.ckpt, runs.open_run_features(old.ckpt, old.run_dir), where="old")
    from pipeline.cache.readers import open_features
    with pytest.raises(UserError, match="layer"):                     # ... never reads a cut cache
        runs.check_features(old.ckpt, open_features(cut), where="old")
    train(_cfg(cut, max_steps=1), DecoderConfig(**SMALL), tmp_path / "top", echo=lambda _: None)
    with pytest.raises(UserError, match="layer"):                     # nor a cut run the final cache
        train(None, None, tmp_path / "top", resume=True, overrides={"features": (str(final),)}, echo=lambda _: None)


def test_init_from_a_final_layer_run_takes_its_decoder_and_the_pretrained_top(tmp_path):
    """The two-phase recipe: --init-from a run on conv5_4's output, onto conv5_4's input, starts from that
    run's decoder and the pretrained top (a topped --init-from brings its own top); another extraction's run
    is refused."""
    cut = cut_store(tmp_path / "cut.h5")
    final = final_store(tmp_path / "final.h5", cut)
    train(_cfg(final, max_steps=2), DecoderConfig(**SMALL), tmp_path / "xe", echo=lambda _: None)
    tiny = dict(lr=1e-9, top_lr=1e-9, max_steps=1)                 # one step that moves nothing measurably
    train(_cfg(cut, init_from=str(tmp_path / "xe"), **tiny), None, tmp_path / "ft", echo=lambda _: None)
    xe, ft = load_run(tmp_path / "xe", "last"), load_run(tmp_path / "ft", "last")
    assert isinstance(ft.model, TopDecoder) and ft.ckpt["init_from"]["run"] == str(tmp_path / "xe")
    torch.manual_seed(0)
    start = build_top(CUT, pretrained=True).state_dict()
    for k, v in xe.ckpt["model"].items():
        torch.testing.assert_close(ft.ckpt["model"][k], v, rtol=0, atol=1e-6)
    for k, v in start.items():
        torch.testing.assert_close(ft.ckpt["model"][f"top.{k}"], v, rtol=0, atol=1e-6)
    with torch.no_grad():                                           # and the top was trained away from it
        ft.model.top.body[0].weight.add_(1.0)
    runs.save_checkpoint(dict(ft.ckpt, model=ft.model.state_dict()), tmp_path / "ft" / "last.pt")
    train(_cfg(cut, init_from=str(tmp_path / "ft"), **tiny), None, tmp_path / "ft2", echo=lambda _: None)
    top2 = load_run(tmp_path / "ft2", "last").ckpt["model"]["top.body.34.weight"]
    torch.testing.assert_close(top2, start["body.34.weight"] + 1.0, rtol=0, atol=1e-6)
    other = make_store(tmp_path / "other.h5", N, L=196, C=512, backbone="resnet-x")
    train(_cfg(other, max_steps=1), DecoderConfig(**SMALL), tmp_path / "xo", echo=lambda _: None)
    with pytest.raises(UserError, match="--init-from.*backbone"):
        train(_cfg(cut, init_from=str(tmp_path / "xo"), **tiny), None, tmp_path / "bad", echo=lambda _: None)


def test_cli_top_lr_and_refusals(tmp_path):
    cut = cut_store(tmp_path / "cut.h5")
    r = CliRunner()
    args = ["train", "--features", str(cut), "--min-count", "1", "--batch-size", "8", "--max-steps", "1",
            "--embed-dim", "8", "--hidden-dim", "8", "--attention-dim", "8"]
    res = r.invoke(main, args + ["--run", str(tmp_path / "r"), "--top-lr", "2e-4"])
    assert res.exit_code == 0, res.output
    assert load_run(tmp_path / "r", "last").ckpt["optimizer"]["param_groups"][1]["lr"] == 2e-4
    res = r.invoke(main, args + ["--run", str(tmp_path / "s"), "--top-lr", "-1"])
    assert res.exit_code == 2 and "--top-lr -1" in res.output
    with h5py.File(cut, "r+") as f:
        f.attrs["weights_sha256"] = "e" * 64            # a cache of weights other than these
    res = r.invoke(main, args + ["--run", str(tmp_path / "t"), "--weights-dir", str(tmp_path)])
    assert res.exit_code == 2 and "weights" in res.output


VGG_REAL = Path(__file__).resolve().parents[1] / "weights"


@pytest.mark.skipif(not (VGG_REAL / "vgg19_oxford.pt").is_file(), reason="Oxford VGG19 weights absent: run `make weights`")
def test_caption_runs_the_frozen_prefix_then_the_fine_tuned_top(tmp_path):
    """On a new image, `caption` computes the cut cache's row (the frozen prefix, same weights) and decodes
    it through the run's fine-tuned top: the same caption as beam search over the cached row."""
    from conftest import make_shapes
    from pipeline.config import CaptionConfig
    from pipeline.data import datasets
    from pipeline.extraction.extract import extract
    from pipeline.inference.caption import Encoder, caption_images, open_images
    root = make_shapes(tmp_path, 1, 1, 0)
    recs = datasets.load_records("shapes", root)
    cut = tmp_path / "cut.h5"
    extract(recs, cut, dataset="shapes", backbone="vgg19", weights_dir=VGG_REAL, layer="conv5_4_input",
            progress=False, workers=0, device="cpu")
    train(_cfg(cut, max_steps=2, top_lr=1e-3, batch_size=5, weights_dir=str(VGG_REAL)), DecoderConfig(**SMALL),
          tmp_path / "run", echo=lambda _: None)
    r = load_run(tmp_path / "run", "last")
    enc = Encoder([f["provenance"] for f in r.features], weights_dir=VGG_REAL, device="cpu")
    st = runs.open_run_features(r.ckpt, r.run_dir)
    got = enc(open_images([recs[0].path]))                                     # (1, 196, 512): the prefix
    np.testing.assert_array_equal(got, st.load_features([0]).astype(np.float32))
    cfg = CaptionConfig(beam=2, max_len=6, device="cpu", weights_dir=str(VGG_REAL))
    out = caption_images([recs[0].path], [tmp_path / "run"], cfg, log=lambda _: None)
    from pipeline.decoder.rules import Rules
    with torch.no_grad():
        want = beam_search(r.model, torch.from_numpy(got), beam=2, max_len=6, rules=Rules.from_config(cfg, r.vocab))[0]
    assert out[0].hypothesis.tokens == want.tokens and out[0].caption == r.vocab.decode(want.tokens)
