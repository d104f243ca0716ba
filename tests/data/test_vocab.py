import json
import tempfile

import numpy as np
import pytest

from charlm import UserError
from charlm.data.vocab import CharVocab, FirstSeenIds, StreamEncoder, code_points

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
    with pytest.raises(UserError, match="is not known; use one of error, unk, skip"):
        vocab.encode("a", unknown="ignore")


def test_code_points_above_the_table_are_unknown_not_wrapped():
    vocab = CharVocab.from_text("a\u4e00")  # table ends just past U+4E00
    with pytest.raises(UserError):
        vocab.encode("\U0001f680")


def test_large_vocab_uses_uint16():
    text = "".join(chr(0x4E00 + i) for i in range(300))
    vocab = CharVocab.from_text(text)
    assert vocab.dtype == np.uint16 and vocab.decode(vocab.encode(text)) == text


MIXED = "Ça naïve 时间机器 Ελληνικά русский עברית العربية 🙂🚀 e\u0301 tab\tCRLF\r\n" * 3  # 1- to 4-byte characters


def stream_encode(data: bytes, block: int, unk: str | None = "\ufffd") -> tuple[CharVocab, np.ndarray]:
    """Feed ``data`` to a StreamEncoder in blocks of ``block`` bytes; return its vocab and ids."""
    with tempfile.TemporaryFile() as scratch:
        encoder = StreamEncoder(scratch)
        for start in range(0, len(data), block):
            encoder.write(data[start : start + block])
        encoder.write(b"", final=True)
        vocab = encoder.vocab(unk)
        ids = np.concatenate(list(encoder.ids(vocab)))
        assert len(encoder) == len(ids)
    return vocab, ids


@pytest.mark.parametrize("block", [1, 2, 3, 5, 7, 4096])
def test_stream_encoder_matches_whole_text_encode_when_blocks_cut_characters(block):
    reference = CharVocab.from_text(MIXED, unk="\ufffd")
    vocab, ids = stream_encode(MIXED.encode("utf-8"), block)
    assert vocab == reference and ids.dtype == reference.dtype
    assert ids.tolist() == reference.encode(MIXED).tolist()


@pytest.mark.parametrize(
    ("n", "dtype"),
    [(254, np.uint8), (255, np.uint8), (256, np.uint16), (300, np.uint16), (70_000, np.uint32)],
)
def test_stream_encoder_widens_ids_past_each_dtype(n, dtype):
    chars = [chr(c) for c in range(0x100, 0x100 + n + 2049) if not (0xD800 <= c < 0xE000 or c == 0xFFFD)][:n]
    text = "".join(chars) + "".join(chars[:3])  # the first ids are read back after the table has widened
    reference = CharVocab.from_text(text, unk="\ufffd")  # n characters plus unk
    vocab, ids = stream_encode(text.encode("utf-8"), 1000)
    assert vocab == reference and len(vocab) == n + 1 and reference.dtype == ids.dtype == dtype
    assert np.array_equal(ids, reference.encode(text))


def test_stream_encoder_narrows_ids_when_the_text_holds_unk():
    text = "".join(chr(0x100 + i) for i in range(255)) + "\ufffd"  # 256 first-seen ids need uint16; the vocab uint8
    vocab, ids = stream_encode(text.encode("utf-8"), 100)
    assert len(vocab) == 256 and ids.dtype == np.uint8 and vocab.decode(ids) == text


def test_stream_encoder_reports_where_invalid_utf8_starts():
    good = "ab🚀c".encode()  # 7 bytes
    for data, offset in [(good + b"\xff" + good, 7), (good + b"\xe4\xb8x", 7), (good + b"\xf0\x9f\x9a", 7)]:
        for block in (1, 2, 3, 8):
            with tempfile.TemporaryFile() as scratch:
                encoder = StreamEncoder(scratch)
                with pytest.raises(UnicodeDecodeError) as e:
                    for start in range(0, len(data), block):
                        encoder.write(data[start : start + block])
                    encoder.write(b"", final=True)
                assert encoder.position + e.value.start == offset, (data, block)


def test_first_seen_ids_keep_their_values_when_widened():
    seen = FirstSeenIds()
    first = seen.encode(code_points("bac"))
    assert first.dtype == np.uint8 and first.tolist() == [1, 0, 2]  # np.unique orders a block's new code points
    wide = seen.encode(code_points("".join(chr(0x4E00 + i) for i in range(300)) + "abc"))
    assert wide.dtype == np.uint16 and wide[-3:].tolist() == [0, 1, 2] and seen.chars[:3] == "abc"
