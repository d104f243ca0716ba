import json

import numpy as np
import pytest

from charlm import UserError
from charlm.vocab import CharVocab

TEXTS = ["hello, world", "时间机器 The Time Machine", "emoji 🚀🌍 and e\u0301 combining", "tab\tnew\nline\r\n"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_including_non_ascii(text):
    vocab = CharVocab.from_text(text)
    ids = vocab.encode(text)
    assert ids.dtype == np.uint8 and len(ids) == len(text)
    assert vocab.decode(ids) == text


def test_vocab_is_deterministic_and_sorted():
    a, b = CharVocab.from_text("banana"), CharVocab.from_text("nabana")
    assert a == b and a.chars == ["a", "b", "n"]


def test_serialises_through_dict_and_json(tmp_path):
    vocab = CharVocab.from_text("时间 🚀 abc", unk="\ufffd")
    assert CharVocab.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab
    vocab.save(tmp_path / "vocab.json")
    again = CharVocab.load(tmp_path / "vocab.json")
    assert again == vocab and again.encode("时 🚀").tolist() == vocab.encode("时 🚀").tolist()


def test_unknown_policy_error_lists_the_characters():
    vocab = CharVocab.from_text("abc")
    with pytest.raises(UserError, match="'xz'"):
        vocab.encode("abzcx")


def test_unknown_policy_skip_and_unk():
    vocab = CharVocab.from_text("abc", unk="?")
    assert vocab.decode(vocab.encode("a🚀b", unknown="skip")) == "ab"
    assert vocab.decode(vocab.encode("a🚀b", unknown="unk")) == "a?b"
    with pytest.raises(UserError, match="unk character"):
        CharVocab.from_text("abc").encode("d", unknown="unk")
    with pytest.raises(UserError, match="not a policy"):
        vocab.encode("a", unknown="ignore")


def test_code_points_above_the_table_are_unknown_not_wrapped():
    vocab = CharVocab.from_text("a\u4e00")  # table ends just past U+4E00
    with pytest.raises(UserError):
        vocab.encode("\U0001f680")


def test_large_vocab_uses_uint16():
    text = "".join(chr(0x4E00 + i) for i in range(300))
    vocab = CharVocab.from_text(text)
    assert vocab.dtype == np.uint16 and vocab.decode(vocab.encode(text)) == text
