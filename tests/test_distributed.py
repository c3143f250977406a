"""Distributed paths: sharding, the distributed batch sampler, shard merge, and 2-process
runs with torch.multiprocessing.spawn on CPU (gloo, 127.0.0.1 only). Kept tiny: 2 processes, a
few images/captions, 1 thread each."""
from __future__ import annotations

import os
import shutil
import socket
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline import distributed as D
from pipeline.cache import identity, layout, readers
from pipeline.cache.shards import merge_shards, shard_path, write_global_index
from pipeline.distributed import shard
from pipeline.training.batching import BucketBatchSampler, DistributedBatchSampler, ImageBatchSampler
from pipeline.errors import UserError
from pipeline.extraction.sharded import extract_distributed
from pipeline.data.records import Record


# ---- helpers ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_dist_env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      GLOO_SOCKET_IFNAME="lo", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


def spawn(fn, world: int, *args) -> None:
    """Run fn(rank, world, port, *args) in `world` fresh processes; a child's exception fails the test."""
    torch.multiprocessing.spawn(fn, args=(world, free_port()) + args, nprocs=world, join=True)


def tiny_backbone_spec():
    """(B,3,28,28) -> (B,8,14,14); weights fixed by a seed, so every process builds the same one."""
    from pipeline.extraction import backbones

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            with torch.no_grad():
                self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
                self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g))

        def forward(self, x):
            return torch.relu(self.conv(x))

    return backbones.BackboneSpec("dtiny", 28, (14, 14), 8, backbones.imagenet_preprocessing(28),
                                  lambda weights, weights_dir: (Tiny().eval(), "dtiny-seed0"))


def make_image_records(root: Path, n: int) -> list[Record]:
    from PIL import Image
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        p = root / "img" / f"{i:03d}.png"
        if not p.exists():
            Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(p)
        split = ["train", "val", "test", ""][i % 4]        # "" = in no split: not cached
        recs.append(Record(p.name, p, split, [f"caption {i} a", f"caption {i} b"]))
    return recs


def same_file(a: Path, b: Path) -> None:
    """Same layout, metadata, provenance attrs and features row for row (code_version, created and the
    compute record aside)."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert sorted(fa) == sorted(fb)
        for k in fa:
            x, y = fa[k][()], fb[k][()]
            assert x.dtype == y.dtype and x.shape == y.shape, k
            np.testing.assert_array_equal(x, y, err_msg=k)
        assert fa["features"].chunks == fb["features"].chunks or fb["features"].is_virtual
        ka = {k for k in fa.attrs}
        assert ka == set(fb.attrs)
        for k in ka - {"created", "code_version", "compute"}:   # compute: the record of the work (sessions differ)
            assert layout.decode_attr(fa.attrs[k]) == layout.decode_attr(fb.attrs[k]), k


# ---- shard ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 5, 17, 100])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_shard_disjoint_covering_balanced(n, world):
    idx = np.arange(100, 100 + n)
    parts = [shard(idx, r, world) for r in range(world)]
    assert np.array_equal(np.concatenate(parts), idx)               # covering, disjoint, in order
    assert max(map(len, parts)) - min(map(len, parts)) <= 1         # balanced
    assert all(np.array_equal(shard(idx, r, world), parts[r]) for r in range(world))  # deterministic
    assert np.array_equal(shard(n, 0, world), shard(np.arange(n), 0, world))
    with pytest.raises(ValueError):
        shard(idx, world, world)


# ---- sampler ----------------------------------------------------------------------------------------

def _lengths(seed=0, n=300):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 12, size=n)
    lengths[:2] = 20      # a length with 2 captions: fewer than 3 or 4 ranks
    lengths[2] = 21       # a length with 1 caption
    return lengths


def _dist(lengths, batch_size, seed, rank=0, world=1):
    return DistributedBatchSampler(BucketBatchSampler(lengths, batch_size, seed=seed), rank=rank, world_size=world)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 5, 8])
def test_sampler_exact_coverage_same_length_per_step(world, batch_size):
    lengths = _lengths()
    ranks = [_dist(lengths, batch_size, 3, r, world) for r in range(world)]
    single = BucketBatchSampler(lengths, batch_size, seed=3)
    for epoch in (0, 1):
        steps = [s.plan(epoch) for s in ranks]
        n_steps = {len(b) for b, _, _ in steps}
        assert n_steps == {len(ranks[0])} == {len(single)}              # same number of steps everywhere
        seen = Counter()
        for k in range(len(ranks[0])):
            parts = [steps[r][0][k] for r in range(world)]
            w = np.array([steps[r][1][k] for r in range(world)])
            assert all(len(p) >= 1 for p in parts)                       # no rank is ever idle
            assert len({int(lengths[i]) for p in parts for i in p}) == 1  # one caption length per step
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            assert w.sum() == pytest.approx(world)                       # mean of weighted means = mean
            real = np.concatenate([p for p, wr in zip(parts, w) if wr > 0])
            assert np.array_equal(np.sort(real), np.sort(single.batches(epoch)[k]))  # = single-process batch
            assert steps[0][2][k] == len(real)                           # items per step over all ranks
            seen.update(real.tolist())
        assert sorted(seen) == list(range(len(lengths))) and set(seen.values()) == {1}   # exactly once


def test_sampler_deterministic_and_world1_is_single_process():
    lengths = _lengths(1)
    a, b = _dist(lengths, 8, 1, 1, 3), _dist(lengths, 8, 1, 1, 3)
    same = lambda x, y: len(x) == len(y) and all(np.array_equal(p, q) for p, q in zip(x, y))
    assert same(a.plan(2)[0], b.plan(2)[0])
    assert not same(a.plan(2)[0], a.plan(3)[0])
    assert not same(a.plan(2)[0], _dist(lengths, 8, 2, 1, 3).plan(2)[0])
    batches, weights, _ = _dist(lengths, 8, 1).plan(4)
    assert same(batches, BucketBatchSampler(lengths, 8, seed=1).batches(4)) and set(weights) == {1.0}


def test_sampler_filler_has_zero_weight():
    lengths = [5] * 4 + [9]                    # length 9: one caption for 3 ranks
    steps = [_dist(lengths, 4, 0, r, 3).plan(0) for r in range(3)]
    k = next(i for i, b in enumerate(steps[0][0]) if lengths[b[0]] == 9)
    assert [s[1][k] for s in steps] == [3.0, 0.0, 0.0]
    assert all(s[0][k].tolist() == [4] for s in steps)


def test_image_batches_cover_every_image_once_per_epoch():
    s = ImageBatchSampler(np.arange(100, 123), 5, seed=2)
    for epoch in (0, 1):
        b = s.batches(epoch)
        assert len(b) == len(s) == 5 and sorted(np.concatenate(b).tolist()) == list(range(23))
    assert not all(np.array_equal(x, y) for x, y in zip(s.batches(0), s.batches(1)))
    parts = [DistributedBatchSampler(s, rank=r, world_size=2).plan(0)[0] for r in range(2)]
    assert sorted(np.concatenate(parts[0] + parts[1]).tolist()) == list(range(23))


# ---- shard merge (no processes) -----------------------------------------------------------------------

def _synthetic_records(n: int) -> list[Record]:
    return [Record(f"im{i}", Path(f"/data/im{i}.jpg"), ["train", "val", "test"][i % 3],
                   [f"a caption {i}", f"another {i}"], [{"shape": "circle", "box": [0, 0, i, i]}])
            for i in range(n)]


def _prov(records):
    return {"backbone": "syn", "weights_sha256": "0" * 64, "preprocessing": {"kind": "none"},
            "input_size": 28, "grid": [2, 2], "dataset": "syn", "split_hashes": identity.split_hashes(records),
            "captions_sha256": identity.captions_sha256(records), "code_version": "test", "created": "now"}


def _write(path, records, feats, bad=None):
    layout.create(path, records, _prov(records), num_regions=4, feature_dim=3, dtype="float16",
                 dataset_root="/data")
    with h5py.File(path, "r+") as f:
        f["features"][...] = feats
        if bad is not None:
            f["bad"][...] = bad
        f["done"][...] = True


@pytest.mark.parametrize("world", [2, 3])
def test_merge_vds_and_copy_equal_single_file(tmp_path, world):
    n = 11
    recs = _synthetic_records(n)
    feats = np.random.default_rng(0).normal(size=(n, 4, 3)).astype(np.float16)
    bad = np.zeros(n, bool)
    bad[4] = True
    ref = tmp_path / "ref.h5"
    _write(ref, recs, feats, bad)
    out = tmp_path / "dist" / "out.h5"
    out.parent.mkdir()
    shards = []
    for r in range(world):
        rows = shard(n, r, world)
        p = shard_path(out, r, world)
        _write(p, [recs[i] for i in rows], feats[rows], bad[rows])
        write_global_index(p, rows, r, world, n, of=out.name)
        shards.append(p)
    assert shards[0].name == f"out.rank0-of{world}.h5"
    merge_shards(out, shards, recs, mode="vds")
    with h5py.File(out, "r") as f:
        assert f["features"].is_virtual and f["done"].is_virtual and not f["captions"].is_virtual
        assert all(not os.path.isabs(m.file_name) for m in f["features"].virtual_sources())
    same_file(ref, out)
    st = readers.FeatureStore.open(out)
    np.testing.assert_array_equal(st.load_features([5, 0, 10]), feats[[5, 0, 10]])
    assert readers.LazyFeatures(out)[7].tolist() == feats[7].tolist()

    moved = tmp_path / "moved"                        # relative sources: the folder can move
    shutil.move(out.parent, moved)
    same_file(ref, moved / "out.h5")
    copy = moved / "copy.h5"
    merge_shards(copy, [moved / p.name for p in shards], recs, mode="copy")
    with h5py.File(copy, "r") as f:
        assert not f["features"].is_virtual
    for p in shards:
        (moved / p.name).unlink()
    same_file(ref, copy)                               # a copy merge stands alone
    with pytest.raises(UserError, match="incomplete"):  # a VDS whose shards are gone reads as not done
        readers.FeatureStore.open(moved / "out.h5")


def test_merge_refuses_incomplete_or_overlapping_shards(tmp_path):
    n = 6
    recs = _synthetic_records(n)
    feats = np.ones((n, 4, 3), np.float16)
    out = tmp_path / "out.h5"
    ps = []
    for r in range(2):
        rows = shard(n, r, 2)
        p = shard_path(out, r, 2)
        _write(p, [recs[i] for i in rows], feats[rows])
        write_global_index(p, rows, r, 2, n)
        ps.append(p)
    with pytest.raises(UserError, match="exactly once"):
        merge_shards(out, [ps[0], ps[0]], recs)
    with h5py.File(ps[1], "r+") as f:
        f["done"][0] = False
    with pytest.raises(UserError, match="incomplete"):
        merge_shards(out, ps, recs)
    assert not out.exists()


def test_single_process_helpers_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = D.init_from_env()
    assert not info.distributed and info.is_main and D.is_main()
    D.barrier()
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    assert D.any_rank(True) and not D.any_rank(False)
    D.cleanup()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError, match="torchrun"):
        D.init_from_env()


# ---- 2 processes: sharded extraction -------------------------------------------------------------------

def _extract_worker(rank, world, port, root, out, merge, reference):
    from pipeline.extraction import backbones
    from pipeline.extraction.extract import extract
    set_dist_env(rank, world, port)
    backbones.BACKBONES["dtiny"] = tiny_backbone_spec()
    root, out = Path(root), Path(out)
    recs = make_image_records(root, 14)
    kw = dict(dataset="syn", backbone="dtiny", batch_size=2, workers=0, progress=False, dataset_root=root,
              dtype="float32")
    info = D.init_from_env()
    assert info.world_size == world and info.rank == rank and info.backend == "gloo"
    try:
        res = extract_distributed(recs, out, merge=merge, echo=lambda s: None, **kw)
        assert res.computed == 11 and res.total == 11         # 14 images, 3 in no split
        # Resume per shard: forget 2 rows of shard 1, delete OUT; the re-run computes those 2 rows only.
        D.barrier()
        if rank == 0:
            with h5py.File(shard_path(out, 1, world), "r+") as f:
                f["done"][1:3] = False
                f["features"][1:3] = 0
            out.unlink()
        D.barrier()
        res = extract_distributed(recs, out, merge=merge, echo=lambda s: None, **kw)
        assert res.computed == 2
        res = extract_distributed(recs, out, merge=merge, echo=lambda s: None, **kw)
        assert res.computed == 0                              # complete: nothing to do
        if rank == 0:
            extract(recs, reference, **kw)                    # single-process reference
    finally:
        D.cleanup()


@pytest.mark.parametrize("merge", ["vds", "copy"])
def test_two_process_extraction_equals_single_process(tmp_path, merge):
    out, ref = tmp_path / "feats" / "syn.h5", tmp_path / "ref.h5"
    spawn(_extract_worker, 2, str(tmp_path / "data"), str(out), merge, str(ref))
    same_file(ref, out)
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.endswith(".lock")) == \
        ["syn.h5", "syn.rank0-of2.h5", "syn.rank1-of2.h5"]
    with h5py.File(shard_path(out, 1, 2), "r") as f:
        assert f["global_index"][()].tolist() == list(range(6, 11))
    assert readers.FeatureStore.open(out).num_images == 11


def _bad_image_worker(rank, world, port, root, out, result):
    from pipeline.extraction import backbones
    set_dist_env(rank, world, port)
    backbones.BACKBONES["dtiny"] = tiny_backbone_spec()
    recs = make_image_records(Path(root), 8)
    recs[6].path.write_bytes(b"not an image")            # in rank 1's shard
    D.init_from_env()
    try:
        extract_distributed(recs, out, dataset="syn", backbone="dtiny", workers=0, progress=False,
                              echo=lambda s: None)
    except UserError as e:
        Path(f"{result}.{rank}").write_text(str(e))
    finally:
        D.cleanup()


def test_error_on_one_rank_stops_every_rank_without_merge(tmp_path):
    out, result = tmp_path / "f.h5", tmp_path / "err"
    spawn(_bad_image_worker, 2, str(tmp_path / "data"), str(out), str(result))
    assert "could not be read" in Path(f"{result}.1").read_text()
    assert "rank 1:" in Path(f"{result}.0").read_text() and "006.png" in Path(f"{result}.0").read_text()
    assert not out.exists() and shard_path(out, 0, 2).exists()


# ---- 2 processes: DDP gradient averaging = mean loss over the whole batch -------------------------------

def _toy_data(n=23, L=4, C=6, V=12, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 5, size=n)
    lengths[0] = 7                                  # a length with one caption (fillers on rank 1)
    tokens = [np.r_[1, rng.integers(4, V, size=k), 2].astype(np.int64) for k in lengths]
    feats = rng.normal(size=(n, L, C)).astype(np.float32)
    return lengths, tokens, feats


def _toy_train(rank, world, steps, batch_size, ddp, attention="soft"):
    """`steps` optimizer steps of the decoder on toy data, as rank `rank` of `world` DDP processes
    (ddp=True), or as ONE process that computes every rank's part of each step in turn (ddp=False):
    gradients summed with the DDP weights / W, hard attention's samples drawn with each rank's seed
    for its part, and one baseline update per step over all parts' captions."""
    from pipeline.decoder.model import Decoder, DecoderConfig
    from pipeline.training.objectives import CrossEntropy, update_baseline, xe_loss
    lengths, tokens, feats = _toy_data()
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(embed_dim=8, hidden_dim=8, attention_dim=8, dropout=0.0, embed_dropout=0.0, context_dropout=0.0, hidden_dropout=0.0, attention=attention,
                                  hard_expected_prob=0.3), 12, 6).double()
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ranks = [rank] if ddp else range(world)
    plans = {r: DistributedBatchSampler(BucketBatchSampler(lengths, batch_size, seed=0), rank=r,
                                        world_size=world).plan(0) for r in ranks}
    xe = CrossEntropy(all_reduce=D.all_reduce_sum_ if ddp else None)
    for k in range(steps):
        opt.zero_grad()
        tot = torch.zeros(2, dtype=torch.float64)
        for r in ranks:
            idx, w = plans[r][0][k], float(plans[r][1][k])
            x = torch.from_numpy(feats[idx]).double()
            y = torch.from_numpy(np.stack([tokens[i] for i in idx]))
            torch.manual_seed(1000 * k + r)                  # the samples of rank r's part at step k
            if ddp:                                          # what train.train_one_epoch does
                loss, _ = xe(net, model, (x, y), torch.device("cpu"), False, w)
                (loss * w).backward()
            else:                                            # the same computation in one process
                loss, parts = xe_loss(model, model(x, y), y)
                (loss * w / world).backward()
                if "reward_sum" in parts and w > 0:
                    tot += torch.stack([parts["reward_sum"], parts["reward_n"]]).double()
        if not ddp and attention == "hard":
            update_baseline(model, tot[0], tot[1])
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)   # clipping sees the averaged gradient
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp_worker(rank, world, port, out, steps, batch_size, attention):
    set_dist_env(rank, world, port)
    D.init_from_env()
    try:
        state = _toy_train(rank, world, steps, batch_size, ddp=True, attention=attention)
        if D.is_main():
            torch.save(state, out)
    finally:
        D.cleanup()


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_two_process_ddp_equals_one_process_on_the_combined_batch(tmp_path, attention):
    """Soft: DDP's averaged gradient is the gradient of the mean loss over the whole batch. Hard: the
    same, and the REINFORCE moving baseline is updated from every rank's captions (an all-reduce), not
    from rank 0's share that DDP would broadcast."""
    lengths, _, _ = _toy_data()
    n_steps = len(BucketBatchSampler(lengths, 5, seed=0))       # a whole epoch: odd sizes and a filler
    ref = _toy_train(0, 2, n_steps, 5, ddp=False, attention=attention)
    spawn(_ddp_worker, 2, str(tmp_path / "ddp.pt"), n_steps, 5, attention)
    got = torch.load(tmp_path / "ddp.pt")
    if attention == "hard":
        assert ref["baseline"].item() != 0.0
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-9, atol=1e-10, msg=k)


# ---- 2 processes: pipeline.training.train with DDP -------------------------------------------------------------

def _train_args(feats, **kw):
    from pipeline.config import DecoderConfig, TrainConfig
    # fp32 projections: bf16's rounding of a weight gradient differs between one batch and its two halves
    cfg = TrainConfig(**dict(dict(features=(str(feats),), epochs=2, batch_size=7, min_count=1, lr=3e-3,
                                  log_every=1000, device="cpu", bf16_projections="off"), **kw))
    return cfg, DecoderConfig(embed_dim=12, hidden_dim=12, attention_dim=12, dropout=0.0, embed_dropout=0.0, context_dropout=0.0, hidden_dropout=0.0)


def _train_worker(rank, world, port, feats, run, resume, kw):
    from pipeline.training.train import train
    set_dist_env(rank, world, port)
    D.init_from_env()
    try:
        if resume:
            train(None, None, run, resume=True, overrides=kw, echo=lambda s: None)
        else:
            train(*_train_args(feats, **kw), run, echo=lambda s: None)
    finally:
        D.cleanup()


def _params(run, which="last"):
    return torch.load(Path(run) / f"{which}.pt", weights_only=True)


def _assert_same_params(a, b, tol=2e-5):
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=tol, atol=tol, msg=k)


@pytest.fixture
def train_feats(tmp_path):
    from helpers_store import make_store
    return make_store(tmp_path / "f.h5", {"train": 12, "val": 4}, L=16, C=8)


def test_two_process_train_equals_one_process(train_feats, tmp_path):
    """pipeline.training.train with 2 DDP ranks for a few steps = 1 process on the same (global) batches."""
    from pipeline.training.train import train
    train(*_train_args(train_feats, max_steps=5), tmp_path / "one", echo=lambda s: None)
    spawn(_train_worker, 2, str(train_feats), str(tmp_path / "two"), False, {"max_steps": 5})
    a, b = _params(tmp_path / "one"), _params(tmp_path / "two")
    assert a["step"] == b["step"] == 5 and a["batch_in_epoch"] == b["batch_in_epoch"]
    _assert_same_params(a, b)


def _signalled_worker(rank, world, port, feats, run, out):
    """Rank 1 alone gets SIGTERM at step 2; both ranks must stop together and rank 0 checkpoint."""
    import json
    import os
    import signal
    from pipeline.training.train import train
    set_dist_env(rank, world, port)
    D.init_from_env()
    kill = (lambda s, loss: os.kill(os.getpid(), signal.SIGTERM) if s == 2 else None) if rank == 1 else None
    try:
        res = train(*_train_args(feats, epochs=40), run, echo=lambda s: None, on_step=kill)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"stopped": res["stopped"], "step": res["step"]}))
    finally:
        D.cleanup()


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(train_feats, tmp_path):
    """Under DDP the ranks agree on a signal every 16th step (and after each validation): one signalled rank
    stops them all at one step, no rank left waiting in a collective, rank 0's last.pt at that step."""
    import json
    spawn(_signalled_worker, 2, str(train_feats), str(tmp_path / "run"), str(tmp_path))
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["step"] == got[1]["step"] and got[0]["stopped"] == "SIGTERM" and got[1]["stopped"] == "SIGTERM"
    ck = _params(tmp_path / "run")
    assert ck["step"] == got[0]["step"] >= 2 and not ck["finished"] and ck["epoch"] < 40


@pytest.mark.slow
def test_resume_with_another_number_of_processes(train_feats, tmp_path):
    """2 ranks stop mid-epoch, 1 process resumes through validation, 2 ranks finish: = 1 process."""
    from pipeline.training.train import train
    ref = train(*_train_args(train_feats, epochs=3), tmp_path / "one", echo=lambda s: None)
    run = tmp_path / "mixed"
    spawn(_train_worker, 2, str(train_feats), str(run), False, {"epochs": 3, "max_steps": 4})
    assert _params(run)["step"] == 4
    train(None, None, run, resume=True, overrides={"max_steps": 13}, echo=lambda s: None)
    spawn(_train_worker, 2, str(train_feats), str(run), True, {"max_steps": 0})
    a, b = _params(tmp_path / "one"), _params(run)
    assert b["finished"] and a["step"] == b["step"] and a["epoch"] == b["epoch"] == 3
    _assert_same_params(a, b, tol=1e-4)
    assert [h["bleu4"] for h in b["history"]] == pytest.approx([h["bleu4"] for h in ref["history"]], abs=1e-6)
    assert (run / "best.pt").exists() and len((run / "log.jsonl").read_text().splitlines()) == 3


def _cli_worker(rank, world, port, args):
    """One CLI command per process group, as under torchrun (a new group per command)."""
    from pipeline.extraction import backbones
    from pipeline.cli import main
    set_dist_env(rank, world, port)
    backbones.BACKBONES["dtiny"] = tiny_backbone_spec()
    try:
        main(args, standalone_mode=False)
    finally:
        D.cleanup()


@pytest.mark.slow
def test_cli_extract_and_train_under_two_processes(tmp_path):
    from conftest import make_shapes
    shapes = make_shapes(tmp_path, 4, 2, 2)
    out = tmp_path / "feats" / "shapes_dtiny.h5"
    spawn(_cli_worker, 2, ["extract", "--dataset", "shapes", "--root", str(shapes), "--backbone", "dtiny",
                           "--out", str(out), "--merge", "copy", "--workers", "0", "--device", "cpu"])
    spawn(_cli_worker, 2, ["train", "--features", str(out), "--run-dir", str(tmp_path / "run"), "--epochs", "1",
                           "--batch-size", "8", "--embed-dim", "8", "--hidden-dim", "8", "--attention-dim", "8",
                           "--min-count", "1", "--device", "cpu"])
    with h5py.File(out, "r") as f:
        assert not f["features"].is_virtual                     # --merge copy
    st = readers.FeatureStore.open(out)
    assert st.num_images == 8 and st.done.all() and st.objects is not None
    assert (tmp_path / "run" / "best.pt").exists() and _params(tmp_path / "run")["epoch"] == 1
