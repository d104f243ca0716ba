"""Corpora at scale: byte-level tokens (any file, bits per byte, split characters decoded whole), the standard
benchmark presets on small stand-ins of the same format, and validation on a fixed slice with a full pass at the
end."""

import re

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

import charlm.infer.generation
from bench.events import RunEvents
from charlm import UserError
from charlm.data.cache import load_split, load_tokens
from charlm.data.corpus import SEPARATOR, corpus_name
from charlm.data.datamodule import CharDataModule
from charlm.data.vocab import ByteVocab, vocab_from_dict
from charlm.infer.generation import GenerationConfig, stream_text
from charlm.training.module import load_checkpoint
from tests.conftest import assert_user_error, compose_train, make_text, rnn, run_cli, tiny_overrides

SHORT = (
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=20",
    "trainer.limit_val_batches=5",
    "trainer.limit_test_batches=5",
)
RAW = b"<page>\n  <title>caf\xc3\xa9 \xe2\x9c\x93</title>\xff\xfe\x00 raw bytes, not UTF-8\n</page>\n"


def test_a_corpus_has_one_name_for_its_runs_and_its_token_cache(tmp_path):
    """``corpus_name`` names a file by its stem, a folder or glob by its folder, a pre-split corpus by its train
    file's folder; the token cache is named the same way."""
    books = tmp_path / "books"
    books.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (books / name).write_text(make_text(500), encoding="utf-8")
    for path, expected in (
        (books / "a.txt", "a"),
        (books, "books"),
        (f"{books}/*.txt", "books"),
        (f"{tmp_path}/*/a.txt", tmp_path.name),
    ):
        assert corpus_name(str(path)) == expected
        cache = tmp_path / f"cache-{expected}"
        load_tokens(path, cache)
        assert [d.name.rsplit("-", 1)[0] for d in cache.iterdir()] == [expected]
    split = [str(books / name) for name in ("a.txt", "b.txt", "c.txt")]
    assert corpus_name(None, split[0]) == corpus_name("null", split[0]) == "books"
    load_split(split, tmp_path / "cache-split")
    assert [d.name.rsplit("-", 1)[0] for d in (tmp_path / "cache-split").iterdir()] == ["books"]
    assert corpus_name(None) == corpus_name("null") == "run"
    assert corpus_name(str(tmp_path / "books.tar.gz")) == "books"  # an archive is named without its ending


def test_byte_tokens_are_the_files_bytes_joined_by_the_separator(tmp_path):
    (tmp_path / "books").mkdir()
    (tmp_path / "books/a.bin").write_bytes(RAW)
    (tmp_path / "books/b.bin").write_bytes(b"\x80second")
    tokens, vocab = load_tokens(tmp_path / "books/a.bin", tmp_path / "c", unit="byte")
    assert isinstance(vocab, ByteVocab) and len(vocab) == 256 and tokens.dtype == np.uint8
    assert tokens.tobytes() == RAW  # not valid UTF-8, and every byte kept
    tokens, _ = load_tokens(tmp_path / "books", tmp_path / "c", unit="byte")
    assert tokens.tobytes() == RAW + SEPARATOR.encode() + b"\x80second"
    with pytest.raises(UserError, match="is not valid UTF-8"):  # the same file as characters
        load_tokens(tmp_path / "books/a.bin", tmp_path / "c")


def test_bytes_and_characters_of_one_file_have_separate_caches(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("héllo wörld " * 50, encoding="utf-8")
    chars, char_vocab = load_tokens(corpus, tmp_path / "c")
    raw, byte_vocab = load_tokens(corpus, tmp_path / "c", unit="byte")
    assert char_vocab.decode(chars) == byte_vocab.decode(raw) == corpus.read_text(encoding="utf-8")
    assert len(raw) == corpus.stat().st_size > len(chars)
    assert len(list((tmp_path / "c").iterdir())) == 2
    assert vocab_from_dict(byte_vocab.to_dict()) == byte_vocab and vocab_from_dict(char_vocab.to_dict()) == char_vocab


def test_the_stream_decoder_prints_a_character_split_across_steps_once_whole():
    texts = ["aé✓", "🙂bc"]  # 1 + 2 + 3 and 4 + 1 + 1 bytes
    columns = np.array([list(t.encode()) for t in texts])  # [2 streams, 6 steps]
    decode = ByteVocab().stream_decoder(2)
    pieces = [decode(torch.from_numpy(columns[:, k])) for k in range(columns.shape[1])]
    assert [p[0] for p in pieces] == ["a", "", "é", "", "", "✓"]
    assert [p[1] for p in pieces] == ["", "", "", "🙂", "b", "c"]
    assert decode.flush() == ["", ""]
    assert decode(torch.tensor([0xE2, ord("a")])) == ["", "a"]
    assert decode(torch.tensor([0x9C, ord("b")])) == ["", "b"]
    assert decode.flush() == ["\ufffd", ""]  # the first stream stopped inside a character: U+FFFD


def test_byte_generation_streams_whole_characters_and_stops_on_stop_text(monkeypatch):
    text = "Zürich ✓ done".encode()
    ids = [torch.tensor([b]) for b in text]
    monkeypatch.setattr(charlm.infer.generation, "generate", lambda *a, **k: (i for i in ids))
    pieces = [p[0] for p in stream_text(rnn(256, hidden_size=8), ByteVocab(), "Grüße ", len(ids))]
    assert pieces[0] == "Grüße " and "".join(pieces) == "Grüße Zürich ✓ done"
    assert "\ufffd" not in "".join(pieces)
    stopped = stream_text(rnn(256, hidden_size=8), ByteVocab(), "", len(ids), GenerationConfig(stop="✓"))
    assert "".join(p[0] for p in stopped) == "Zürich ✓"
    ids[:] = [torch.tensor([b]) for b in b"ab\xe2Acd"]  # 0xE2 then "A": one step decodes to "\ufffdA"
    stopped = stream_text(rnn(256, hidden_size=8), ByteVocab(), "", len(ids), GenerationConfig(stop="\ufffd"))
    assert "".join(p[0] for p in stopped) == "ab\ufffd"  # cut inside the step's text, just after the stop


def test_byte_training_reports_bits_per_byte_and_generates_utf8(tmp_path):
    corpus = tmp_path / "c.bin"
    corpus.write_bytes((make_text().encode() + RAW) * 3)
    out = tmp_path / "run"
    proc = run_cli("train.py", *tiny_overrides(corpus, out, "data.unit=byte", *SHORT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"val: loss \S+ nats \| ppl \S+ \| bpb \S+", proc.stdout) and "bpc" not in proc.stdout
    assert load_checkpoint(out / "checkpoints/best.ckpt").hparams.vocab == {"unit": "byte"}
    assert "1_val/bpb" in RunEvents(out).tags
    gen = run_cli("generate.py", f"ckpt={out / 'checkpoints/best.ckpt'}", 'prompt="Grüße"', "length=30", "seed=1")
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("Grüße")


def test_unknown_unit_and_byte_preprocess_are_one_line_errors(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    assert_user_error(
        run_cli("train.py", f"data.path={corpus}", "data.unit=word"), "data.unit='word' is not known; use data.unit"
    )
    with pytest.raises(UserError, match="data.preprocess=d2l rewrites characters, not bytes"):
        CharDataModule(str(corpus), unit="byte", preprocess="d2l")


def preset_dm(name: str, path, tmp_path, *extra: str) -> CharDataModule:
    cfg = compose_train([f"data={name}", f"data.path={path}", f"paths.cache_dir={tmp_path / 'cache'}", *extra])
    try:
        return instantiate(cfg.data)
    except InstantiationException as e:  # what the CLI reports: the UserError inside
        raise e.__cause__ from None


def test_a_missing_preset_file_says_where_it_goes_its_size_and_sha1(tmp_path):
    where = tmp_path / "nowhere" / "enwik8"
    assert_user_error(
        run_cli("train.py", "data=enwik8", f"data.path={where}"),
        f"data=enwik8 needs the file '{where}' (100,000,000 bytes, SHA-1 57b8363b814821dc9d47aa4d41f58733519076b2)",
    )
    with pytest.raises(UserError, match=r"data=text8 needs the file .* \(100,000,000 bytes, SHA-256 6e8901"):
        preset_dm("text8", tmp_path / "text8", tmp_path)
    (tmp_path / "pennchar").mkdir()
    (tmp_path / "pennchar/train.txt").write_text("a b\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"data=ptb_char needs train.txt, valid.txt, test.txt in the folder"):
        preset_dm("ptb_char", tmp_path / "pennchar", tmp_path)


def test_enwik8_preset_reads_bytes_split_90_5_5_and_warns_on_a_file_of_another_size(tmp_path, capsys):
    standin = tmp_path / "enwik8"
    rng = np.random.default_rng(0)
    standin.write_bytes((RAW * 2000)[:100_000] + rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    dm = preset_dm("enwik8", standin, tmp_path, "data.val_chars=null")
    assert "has 200,000 bytes, not the 100,000,000 of the published enwik8" in capsys.readouterr().err
    assert [len(dm.parts[s]) for s in ("train", "val", "test")] == [180_000, 10_000, 10_000]
    assert np.concatenate(list(dm.parts.values())).tobytes() == standin.read_bytes()
    assert dm.vocab.bits == "bpb"


def test_text8_preset_has_the_27_published_characters(tmp_path):
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", dtype=np.uint8)
    standin = tmp_path / "text8"
    standin.write_bytes(letters[rng.integers(0, 27, 100_000)].tobytes())
    dm = preset_dm("text8", standin, tmp_path)
    assert "".join(dm.vocab.chars) == " abcdefghijklmnopqrstuvwxyz"  # no reserved unknown character
    assert [len(dm.parts[s]) for s in ("train", "val", "test")] == [90_000, 5_000, 5_000]


def test_ptb_char_preset_makes_each_symbol_a_token_and_each_line_end_an_eos(tmp_path):
    folder = tmp_path / "pennchar"
    folder.mkdir()
    lines = {"train.txt": " a e r _ b a n k\n t h e _ e n d\n", "valid.txt": " n o _ i t\n", "test.txt": " o k\n"}
    for name, text in lines.items():
        (folder / name).write_text(text * 40, encoding="utf-8")
    dm = preset_dm("ptb_char", folder, tmp_path)
    assert dm.vocab.decode(dm.parts["train"][:17]) == "aer_bank\nthe_end\n"
    assert dm.vocab.decode(dm.parts["test"]) == "ok\n" * 40
    assert " " not in dm.vocab.chars and len(dm.parts["val"]) == 6 * 40  # awd-lstm-lm: 5 symbols + <eos>
    (folder / "test.txt").write_text(" o <unk> k\n", encoding="utf-8")
    with pytest.raises(UserError, match="has the symbol '<unk>'; data.preprocess=ptb_char needs one character"):
        preset_dm("ptb_char", folder, tmp_path).check_sizes()


def test_a_preset_trains_end_to_end_on_its_standin(tmp_path):
    folder = tmp_path / "pennchar"
    folder.mkdir()
    for name, seed in (("train.txt", 0), ("valid.txt", 1), ("test.txt", 2)):
        words = make_text(3000, seed).lower().split()
        sentences = ("_".join(words[i : i + 6]) for i in range(0, len(words), 6))
        (folder / name).write_text("".join(f" {' '.join(s)}\n" for s in sentences), encoding="utf-8")
    out = tmp_path / "run"
    proc = run_cli("train.py", *tiny_overrides(folder, out, "data=ptb_char", *SHORT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"test: loss \S+ nats \| ppl \S+ \| bpc \S+", proc.stdout)


def test_validation_every_n_steps_reads_a_fixed_slice_then_the_whole_split_at_the_end(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text(20000), encoding="utf-8")
    dm = CharDataModule(str(corpus), cache_dir=str(tmp_path / "cache"), val_chars=300, eval_batch_size=2, seq_len=16)
    whole = len(dm._load()[0]["val"])
    assert dm.val_is_cut and len(dm.parts["val"]) == 300 < whole
    assert np.array_equal(dm.parts["val"], dm._load()[0]["val"][:300])  # the first 300: the same every time
    dm.full_val = True
    assert len(dm.parts["val"]) == whole
    out = tmp_path / "run"
    extra = ["data.val_chars=300", "trainer.max_epochs=1", "trainer.limit_train_batches=20"]
    extra.append("trainer.val_check_interval=5")
    proc = run_cli("train.py", *tiny_overrides(corpus, out, *extra))
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = RunEvents(out)
    assert [e.step for e in events.scalars("val/loss")] == [4, 9, 14, 19]  # every 5 steps (Lightning counts from 0)
    (full,) = events.values("val_full/loss")
    assert re.search(rf"val_full: loss {full:.4f} nats", proc.stdout)
    assert full != events.values("val/loss")[-1]


def test_an_exported_byte_model_says_its_ids_are_bytes():
    from charlm.export import vocab_metadata
    from charlm.training.module import CharLM

    meta = vocab_metadata(CharLM({"unit": "byte"}, hidden_size=8))
    # chars: byte i as chr(i), so id = chars.index(ch) works for bytes read as Latin-1, as for characters
    assert (meta["unit"], meta["chars"], meta["start"]) == ("byte", "".join(map(chr, range(256))), "\n")
    assert vocab_metadata(CharLM({"chars": "ab\n", "unk": None}, hidden_size=8))["chars"] == "\nab"
