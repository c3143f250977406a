"""Tokenizer and vocabulary (pipeline/data/text.py)."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import UserError
from pipeline.data.text import SPECIALS, Vocab, tokenize


@pytest.mark.parametrize("caption, tokens", [
    ("A dog runs .", ["a", "dog", "runs"]),
    ("The dog's ball , isn't it ?", ["the", "dogs", "ball", "isnt", "it"]),
    ("don\u2019t `quote` \u2018me\u2019", ["dont", "quote", "me"]),
    ("A t-shirt;under_score/slash", ["a", "t", "shirt", "under", "score", "slash"]),
    ("2 dogs, 10 cats", ["2", "dogs", "10", "cats"]),
    ("Caf\u00e9 CR\u00c8ME", ["caf\u00e9", "cr\u00e8me"]),
    ("  ...  ", []),
    ("<end> <unk>", ["end", "unk"]),   # specials can never come out of a caption
])
def test_tokenize(caption, tokens):
    assert tokenize(caption) == tokens


def test_build_counts_order_and_min_count():
    vocab = Vocab.build(["a dog runs", "A dog sits", "a cat", "the dog", "the dog"], min_count=2)
    assert vocab.itos == list(SPECIALS) + ["dog", "a", "the"]       # by falling count, then alphabetically
    assert (vocab.pad, vocab.start, vocab.end, vocab.unk) == (0, 1, 2, 3)
    assert len(vocab) == 7 and vocab.counts == {"dog": 4, "a": 3, "the": 2}
    assert Vocab.build(["b a", "a b"], min_count=1).itos[4:] == ["a", "b"]


def test_encode_decode():
    vocab = Vocab.build(["a dog runs", "a dog sits"], min_count=1)
    ids = vocab.encode(["a", "dog", "flies"])
    assert ids == [vocab.stoi["a"], vocab.stoi["dog"], vocab.unk]
    full = vocab.encode_caption("A dog runs!")
    assert full[0] == vocab.start and full[-1] == vocab.end and len(full) == 5
    assert vocab.decode(full + [vocab.stoi["sits"]]) == "a dog runs"          # stops at <end>
    assert vocab.decode([vocab.start, vocab.pad, vocab.stoi["dog"], vocab.unk, vocab.stoi["sits"]]) == "dog sits"
    assert vocab.decode(torch.tensor(full)) == "a dog runs"                    # tensors of ids work too


def test_dict_and_file_round_trip(tmp_path):
    vocab = Vocab.build(["caf\u00e9 au lait", "caf\u00e9 noir"], min_count=1)
    assert Vocab.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocab.load(tmp_path / "vocab.json")
    assert loaded == vocab and loaded.min_count == 1 and loaded.counts == vocab.counts


@pytest.mark.parametrize("content, message", [
    ("not json", "cannot read vocabulary"),
    ("[1, 2]", "cannot read vocabulary"),
    ('{"words": []}', "cannot read vocabulary"),
    ('{"itos": ["a", "b", "c", "d"]}', "does not start with"),
])
def test_load_bad_files(tmp_path, content, message):
    path = tmp_path / "vocab.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as e:
        Vocab.load(path)
    assert str(path) in str(e.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(UserError, match="cannot read vocabulary"):
        Vocab.load(tmp_path / "absent.json")
