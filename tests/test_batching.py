from collections import Counter

import numpy as np

from pipeline.training.batching import BucketBatchSampler, select_lengths


def _lengths(seed=0, n=1000):
    rng = np.random.default_rng(seed)
    return rng.integers(3, 25, size=n)


def test_one_length_per_batch_and_each_caption_once():
    lengths = _lengths()
    s = BucketBatchSampler(lengths, 16, seed=3)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)
        for b in batches:
            assert len({int(lengths[i]) for i in b}) == 1
            assert 1 <= len(b) <= 16
        seen = Counter(i for b in batches for i in b)
        assert sorted(seen) == list(range(len(lengths))) and set(seen.values()) == {1}


def test_deterministic_per_seed_and_epoch():
    lengths = _lengths()
    a = BucketBatchSampler(lengths, 16, seed=1)
    b = BucketBatchSampler(lengths, 16, seed=1)
    same = lambda x, y: all(np.array_equal(p, q) for p, q in zip(x, y)) and len(x) == len(y)
    assert same(a.batches(0), b.batches(0))
    assert same(a.batches(5), b.batches(5))
    assert not same(a.batches(0), a.batches(1))
    assert not same(a.batches(0), BucketBatchSampler(lengths, 16, seed=2).batches(0))


def test_rare_length_gives_a_smaller_batch():
    lengths = [5] * 10 + [9] * 3           # length 9: fewer captions than a batch
    batches = BucketBatchSampler(lengths, 4, seed=0).batches(0)
    sizes = sorted((int(lengths[b[0]]), len(b)) for b in batches)
    assert sizes == [(5, 2), (5, 4), (5, 4), (9, 3)]


def test_select_lengths_drops_long_and_empty():
    keep, dropped = select_lengths([0, 3, 30, 31, 50], max_len=30)
    assert keep.tolist() == [False, True, True, False, False]
    assert dropped == {"too_long": 2, "empty": 1}
