import re

import numpy as np
import pytest
import torch

import charlm.data.corpus
from charlm import UserError
from charlm.data.batches import BatchSchedule, RandomWindows, StreamBatches
from charlm.data.cache import load_tokens
from charlm.data.corpus import read_corpus
from charlm.data.datamodule import CharDataModule, split_tokens
from charlm.data.vocab import CharVocab
from tests.conftest import ROOT, make_text


def test_stream_batches_continue_each_stream_and_shift_targets():
    tokens = np.arange(1001)
    batches = list(StreamBatches(tokens, batch_size=4, seq_len=10))
    assert [r for _, _, r in batches] == [True] + [False] * (len(batches) - 1)
    for x, y, _ in batches:
        assert x.dtype == torch.int64 and x.shape == (4, 10)
        assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y, x + 1)
    for (x0, _, _), (x1, _, _) in zip(batches, batches[1:], strict=False):
        assert torch.equal(x1[:, 0], x0[:, -1] + 1)  # batch k+1 starts where batch k stopped, per stream


def test_streams_are_disjoint_and_contiguous_across_ranks():
    tokens = np.arange(2 * 3 * 50 + 1)
    seen = []
    for rank in range(2):
        ds = StreamBatches(tokens, batch_size=3, seq_len=10, rank=rank, world_size=2)
        assert len(ds) == 5  # every rank yields the same number of batches
        streams = torch.cat([x for x, _, _ in ds], dim=1)  # [B, L]
        for row in streams:
            assert torch.equal(row, torch.arange(row[0], row[0] + 50))  # one contiguous stretch
            seen.append(set(row.tolist()))
    assert sum(map(len, seen)) == len(set().union(*seen)) == 300


def test_eval_streams_keep_the_partial_last_batch():
    ds = StreamBatches(np.arange(2 * 25 + 1), batch_size=2, seq_len=10, drop_last=False)
    shapes = [x.shape[1] for x, _, _ in ds]
    assert shapes == [10, 10, 5] and sum(shapes) * 2 == 50


def test_scheduled_stream_lengths_follow_the_run_step_and_streams_stay_contiguous():
    """With data.schedule, batch k is schedule.at(first_step + k) columns long, and each stream still continues
    exactly where the previous batch stopped (carried state stays valid); the epoch keeps its len() batches."""
    tokens = np.arange(4 * 200 + 1)
    schedule = BatchSchedule([[3, 4, 5], [6, 4, 8]], batch_size=4, seq_len=10)
    for first in (0, 4, 100):  # epoch 0, an epoch starting inside the ramp, one after it
        ds = StreamBatches(tokens, 4, 10, schedule=schedule, first_step=lambda f=first: f)
        batches = list(ds)
        assert len(batches) == len(ds) == 20
        assert [x.shape[1] for x, _, _ in batches] == [schedule.at(first + k)[1] for k in range(20)]
        streams = torch.cat([x for x, _, _ in batches], dim=1)  # [B, sum of lengths]
        for row in streams:
            assert torch.equal(row, torch.arange(row[0], row[0] + streams.shape[1]))
        assert torch.equal(torch.cat([y for _, y, _ in batches], dim=1), streams + 1)
    assert [x.shape[1] for x, _, _ in list(StreamBatches(tokens, 4, 10, schedule=schedule))[:7]] == [5] * 3 + [
        8
    ] * 3 + [10]


def test_scheduled_random_windows_take_each_steps_shape_and_resume_to_the_same_windows():
    tokens = np.arange(20_000)
    schedule = BatchSchedule([[5, 2, 8], [9, 3, 16]], batch_size=4, seq_len=32)
    ds = RandomWindows(tokens, 4, 32, schedule=schedule, first_step=lambda: 2)
    batches = list(ds)
    assert [tuple(x.shape) for x, _, _ in batches[:8]] == [(2, 8)] * 3 + [(3, 16)] * 4 + [(4, 32)]
    assert all(torch.equal(y, x + 1) for x, y, _ in batches)
    ds.start = 6  # a resume after six batches of this epoch: the same windows from there on
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[6:], list(ds), strict=True))


@pytest.mark.parametrize(
    ("schedule", "batch_order", "message"),
    [
        (
            [[10, 8, 16]],
            "tbptt",
            r"batches of 8 x 16, but TBPTT streams keep data.batch_size=4 .* data.batch_order=random",
        ),
        ([[10, 4, 32]], "tbptt", r"at most data.seq_len=16 columns"),
        ([[10, 4, 8], [5, 4, 8]], "random", r"until_step values \[10, 5\] must increase"),
        ([[10, 4]], "random", r"entry \[10, 4\] must be three positive integers"),
        ([[0, 4, 8]], "random", r"entry \[0, 4, 8\] must be three positive integers"),
        ("10,4,8", "random", r"must be a list of \[until_step, batch_size, seq_len\]"),
    ],
)
def test_a_bad_schedule_is_one_line_naming_the_fix(tmp_path, schedule, batch_order, message):
    path = tmp_path / "t.txt"
    path.write_text(make_text(), encoding="utf-8")
    with pytest.raises(UserError, match=message):
        CharDataModule(str(path), batch_size=4, seq_len=16, batch_order=batch_order, schedule=schedule)


def test_random_windows_reset_every_batch_and_depend_on_epoch_and_rank():
    tokens = np.arange(5000)
    epoch = [0]
    ds = RandomWindows(tokens, 4, 16, epoch=lambda: epoch[0])
    first = [x for x, y, reset in ds]
    assert all(reset for _, _, reset in ds)
    x, y, _ = next(iter(ds))
    assert torch.equal(y, x + 1) and all(torch.equal(r, torch.arange(r[0], r[0] + 16)) for r in x)
    assert torch.equal(first[0], next(iter(ds))[0])  # same epoch: same windows (exact resume)
    epoch[0] = 1
    assert not torch.equal(first[0], next(iter(ds))[0])
    other_rank = RandomWindows(tokens, 4, 16, rank=1, world_size=2)
    assert not torch.equal(first[0], next(iter(other_rank))[0])


def test_cache_is_reused_and_keyed_by_content(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcabc", encoding="utf-8")
    tokens, vocab = load_tokens(corpus, cache_dir=tmp_path / "cache")
    assert isinstance(tokens, np.memmap) and vocab.decode(tokens) == "abcabc"
    (cache_dir,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in cache_dir.iterdir()) == ["manifest.json", "tokens.npy", "vocab.json"]
    mtime = (cache_dir / "tokens.npy").stat().st_mtime_ns
    load_tokens(corpus, cache_dir=tmp_path / "cache")
    assert (cache_dir / "tokens.npy").stat().st_mtime_ns == mtime  # not re-tokenized
    corpus.write_text("abcabd", encoding="utf-8")
    tokens, vocab = load_tokens(corpus, cache_dir=tmp_path / "cache")
    assert vocab.decode(tokens) == "abcabd" and len(list((tmp_path / "cache").iterdir())) == 2


def test_d2l_preprocess_reproduces_d2l_corpus(tmp_path):
    tokens, vocab = load_tokens(ROOT / "data/timemachine.txt", preprocess="d2l", cache_dir=tmp_path)
    # d2l.TimeMachine: re.sub('[^A-Za-z]+', ' ', text).lower(); 26 letters + space, plus the reserved unk (d2l's <unk>)
    assert len(tokens) == 173428 and len(vocab) == 28
    assert vocab.decode(tokens[:30]) == "the time machine by h g wells "


def test_shipped_corpora_are_the_published_files():
    assert len((ROOT / "data/timemachine.txt").read_text(encoding="utf-8")) == 178979
    assert len((ROOT / "data/tinyshakespeare.txt").read_text(encoding="utf-8")) == 1115394


def test_splits_are_contiguous_fractions():
    parts = split_tokens(np.arange(1000), (0.9, 0.05, 0.05))
    assert [len(p) for p in parts.values()] == [900, 50, 50]
    assert np.array_equal(np.concatenate(list(parts.values())), np.arange(1000))


@pytest.mark.parametrize("splits", [(0.9, 0.1), (0.5, 0.2, 0.2), (1.0, 0.0, 0.0), (0.9, 0.2, -0.1)])
def test_bad_splits_are_rejected(splits, tmp_path):
    with pytest.raises(UserError, match="data.splits"):
        CharDataModule(str(tmp_path / "x.txt"), splits=splits)


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "does not exist"), (b"", "is empty"), (b"  \n", "is empty"), (b"abc\xff\xfedef", "byte offset 3")],
)
def test_bad_corpus_files_get_clear_errors(tmp_path, content, match):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=match):
        CharDataModule(str(path), cache_dir=str(tmp_path / "cache")).vocab  # noqa: B018 - loads the corpus


def test_too_small_corpus_states_the_minimum(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("x" * 1000, encoding="utf-8")  # splits 900 / 50 / 50
    dm = CharDataModule(str(path), batch_size=64, seq_len=16, eval_batch_size=1, cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError, match=r"train split has 900 characters .* at least 1,025"):
        dm.check_sizes(world_size=1)
    dm = CharDataModule(str(path), batch_size=4, seq_len=16, eval_batch_size=2, cache_dir=str(tmp_path / "c"))
    dm.check_sizes(world_size=1)  # val needs 2 x 16 + 1 = 33 <= 50
    with pytest.raises(UserError, match=r"val split .* 2 rank\(s\) needs at least 65"):
        dm.check_sizes(world_size=2)


MIXED = "Ça naïve 时间机器 Ελληνικά русский עברית العربية 🙂🚀 e\u0301 tab\tCRLF\r\n"  # 1- to 4-byte characters


def reference_tokens(text: str, unk: str | None = "\ufffd") -> tuple[np.ndarray, CharVocab]:
    vocab = CharVocab.from_text(text, unk=unk)
    return vocab.encode(text), vocab


@pytest.mark.parametrize("block", [1, 2, 3, 5, 7, 64])
def test_streamed_tokens_do_not_depend_on_where_blocks_cut_characters(tmp_path, monkeypatch, block):
    monkeypatch.setattr(charlm.data.corpus, "_BLOCK", block)
    text = MIXED * 5
    corpus = tmp_path / "mixed.txt"
    corpus.write_text(text, encoding="utf-8", newline="")
    tokens, vocab = load_tokens(corpus, cache_dir=tmp_path / "cache")
    expected, reference = reference_tokens(text)
    assert vocab == reference and tokens.dtype == expected.dtype and np.array_equal(tokens, expected)


def test_streamed_tokens_equal_whole_text_encode_on_a_multi_block_corpus(tmp_path):
    text = (MIXED + (ROOT / "data/timemachine.txt").read_text(encoding="utf-8")[:20000]) * 12  # > 2 blocks
    corpus = tmp_path / "mixed.txt"
    corpus.write_text(text, encoding="utf-8", newline="")
    assert corpus.stat().st_size > 2 * charlm.data.corpus._BLOCK
    for unk in ("\ufffd", None, "\U0001f600"):  # unk beyond, absent from, or inside the corpus's code points
        tokens, vocab = load_tokens(corpus, unk=unk, cache_dir=tmp_path / "cache")
        expected, reference = reference_tokens(text, unk)
        assert vocab == reference and tokens.dtype == expected.dtype and np.array_equal(tokens, expected)


@pytest.mark.parametrize(
    ("tail", "offset"),
    [(b"\xff rest", 0), (b"\xe4\xb8x", 0), (b"\xf0\x9f\x9a", 0), ("🚀".encode() + b"\x80", 4)],
)
def test_invalid_utf8_after_the_first_block_reports_its_file_offset(tmp_path, monkeypatch, tail, offset):
    head = (MIXED * 2).encode("utf-8")  # many blocks, cut inside characters
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(head + tail)
    for block in (16, 17, 18, 19):  # so that some block ends inside the invalid sequence
        monkeypatch.setattr(charlm.data.corpus, "_BLOCK", block)
        with pytest.raises(UserError, match=rf"not valid UTF-8 at byte offset {len(head) + offset};"):
            load_tokens(corpus, cache_dir=tmp_path / "cache")
        assert list((tmp_path / "cache").iterdir()) == []  # neither a cache entry nor a temporary file is left


def test_whitespace_only_corpus_is_empty(tmp_path):
    corpus = tmp_path / "blank.txt"
    corpus.write_bytes(b" \t\r\n" * 10)
    for load in (read_corpus, lambda p: load_tokens(p, cache_dir=tmp_path / "cache")):
        with pytest.raises(UserError, match="is empty"):
            load(corpus)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "data.batch_size=0 must be a whole number >= 1; e.g. data.batch_size=32."),
        ({"seq_len": 2.5}, "data.seq_len=2.5 must be a whole number >= 1"),
        ({"eval_batch_size": "abc"}, "data.eval_batch_size='abc' must be a whole number >= 1"),
        ({"val_chars": 0}, "data.val_chars=0 must be a whole number >= 1; e.g. data.val_chars=500000 (null: the whole"),
        ({"batch_order": "shuffled"}, "data.batch_order='shuffled' is not known; use one of tbptt, random."),
    ],
)
def test_bad_batch_shapes_are_one_line_errors(kwargs, match, tmp_path):
    with pytest.raises(UserError, match=re.escape(match)):
        CharDataModule(str(tmp_path / "x.txt"), **kwargs)


def write_books(folder, texts: dict[str, str]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_a_folder_or_glob_is_its_files_in_name_order_joined_by_a_blank_line(tmp_path):
    books = write_books(tmp_path / "books", {"b.txt": "bravo ünï", "a.txt": "alpha 中文", "c.md": "charlie"})
    (books / ".hidden").write_text("ZZZ", encoding="utf-8")
    joined = tmp_path / "joined.txt"
    joined.write_text("alpha 中文\n\nbravo ünï\n\ncharlie", encoding="utf-8")
    expected, vocab = load_tokens(joined, cache_dir=tmp_path / "c1")
    for path in (books, str(books) + "/", str(books / "*")):
        tokens, got = load_tokens(path, cache_dir=tmp_path / "c2")
        assert got == vocab and np.array_equal(tokens, expected), path
    tokens, txt_vocab = load_tokens(str(books / "*.txt"), cache_dir=tmp_path / "c2")
    assert txt_vocab.decode(tokens) == "alpha 中文\n\nbravo ünï"
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "c2").iterdir()) == ["books", "books"]


def test_a_folder_cache_is_keyed_by_every_file(tmp_path):
    books = write_books(tmp_path / "books", {"a.txt": "abc", "b.txt": "def"})
    load_tokens(books, cache_dir=tmp_path / "c")
    (books / "b.txt").write_text("deg", encoding="utf-8")  # the second file changes: a new cache, new tokens
    second, vocab = load_tokens(books, cache_dir=tmp_path / "c")
    assert vocab.decode(second) == "abc\n\ndeg" and len(list((tmp_path / "c").iterdir())) == 2


def test_a_bad_byte_names_its_file_and_a_character_cut_at_a_file_end_is_an_error(tmp_path):
    books = write_books(tmp_path / "books", {"a.txt": "abc"})
    (books / "b.txt").write_bytes(b"de\xfff")
    with pytest.raises(
        UserError, match=re.escape(f"corpus file '{books / 'b.txt'}' is not valid UTF-8 at byte offset 2")
    ):
        load_tokens(books, cache_dir=tmp_path / "c")
    (books / "b.txt").write_bytes("é".encode()[:1])  # half of a two-byte character, then the file ends
    (books / "c.txt").write_bytes("é".encode()[1:])
    with pytest.raises(UserError, match=re.escape(f"'{books / 'b.txt'}' is not valid UTF-8 at byte offset 0")):
        load_tokens(books, cache_dir=tmp_path / "c")


def test_a_pre_split_corpus_keeps_its_parts_with_one_vocab(tmp_path):
    split = write_books(tmp_path / "ptb", {"train.txt": make_text(4000, 1), "valid.txt": "Qaaa bbb" * 60})
    (split / "test.txt").write_text(make_text(500, 2), encoding="utf-8")
    dm = CharDataModule(
        None, batch_size=4, seq_len=16, eval_batch_size=2, cache_dir=str(tmp_path / "c"),
        train_path=str(split / "train.txt"), val_path=str(split / "valid.txt"), test_path=str(split / "test.txt"),
    )  # fmt: skip
    assert "Q" in dm.vocab.chars  # seen only in the val file
    for stage, name in zip(("train", "val", "test"), ("train.txt", "valid.txt", "test.txt"), strict=True):
        assert dm.vocab.decode(dm.parts[stage]) == (split / name).read_text(encoding="utf-8"), stage
    dm.check_sizes()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_path": "t.txt"}, "a pre-split corpus needs all three of its files; also give data.val_path"),
        ({"path": "x.txt", "train_path": "a", "val_path": "b", "test_path": "c"}, "are both given"),
        ({}, "no corpus given; pass data.path=FILE"),
    ],
)
def test_corpus_settings_that_cannot_work_are_one_line_errors(kwargs, match):
    with pytest.raises(UserError, match=re.escape(match)):
        CharDataModule(**({"path": None} | kwargs))


def test_an_empty_folder_or_a_glob_without_matches_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is an empty folder; put UTF-8 text files in it"):
        load_tokens(tmp_path / "empty", cache_dir=tmp_path / "c")
    with pytest.raises(UserError, match="matches no files; check the pattern"):
        load_tokens(str(tmp_path / "nope" / "*.txt"), cache_dir=tmp_path / "c")
