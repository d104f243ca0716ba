"""The token cache checks itself on load: a damaged cache is rebuilt, saying so once, and never trained on."""

import json
import multiprocessing
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from charlm import UserError
from charlm.data.cache import _SAMPLE, _SAMPLES, load_tokens
from charlm.data.corpus import read_corpus
from tests.conftest import make_text

TEXT = make_text() + "\u00e9\u4e2d"  # two non-ASCII characters, so vocab.json and the ids are not all ASCII


@pytest.fixture
def cached(tmp_path: Path) -> tuple[Path, Path]:
    """A corpus and its freshly built cache directory."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    load_tokens(corpus, cache_dir=tmp_path / "cache")
    (cache,) = (d for d in (tmp_path / "cache").iterdir() if d.is_dir())
    return corpus, cache


def reload(corpus: Path) -> str:
    tokens, vocab = load_tokens(corpus, cache_dir=corpus.parent / "cache")
    return vocab.decode(tokens)


def rewrite_ids(cache: Path, change) -> None:
    """Apply ``change`` to the ids in ``tokens.npy`` in place, keeping its header and size."""
    tokens = np.load(cache / "tokens.npy", mmap_mode="r+")
    change(tokens)
    tokens.flush()


def test_vocab_with_one_character_swapped_is_rebuilt(cached):
    corpus, cache = cached
    vocab = json.loads((cache / "vocab.json").read_text(encoding="utf-8"))
    assert "a" in vocab["chars"] and "z" not in vocab["chars"]
    vocab["chars"] = "".join(sorted(vocab["chars"].replace("a", "z")))  # same size: every id decodes, wrongly
    (cache / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    assert reload(corpus) == TEXT


def test_all_zero_tokens_are_rebuilt(cached):
    corpus, cache = cached
    rewrite_ids(cache, lambda ids: ids.fill(0))
    assert reload(corpus) == TEXT


def test_out_of_range_ids_are_rebuilt(cached):
    corpus, cache = cached
    rewrite_ids(cache, lambda ids: ids.__setitem__(len(ids) // 2, 250))  # the vocab has about 20 characters
    assert reload(corpus) == TEXT


def test_an_out_of_range_id_between_the_sampled_blocks_is_rebuilt(tmp_path, capfd):
    """A corpus larger than the sampled SHA-1's 16 blocks of 256 KiB, damaged between two of them: the cache
    passed its check and training stopped with an IndexError."""
    corpus = tmp_path / "big.txt"
    corpus.write_text(TEXT * (6_000_000 // len(TEXT)), encoding="utf-8")  # 6 MB: 2 MB between the samples
    load_tokens(corpus, cache_dir=tmp_path / "cache")
    (cache,) = (d for d in (tmp_path / "cache").iterdir() if d.is_dir())
    tokens = np.load(cache / "tokens.npy", mmap_mode="r")
    starts = np.linspace(0, tokens.nbytes - _SAMPLE, _SAMPLES, dtype=np.int64) // tokens.itemsize
    where = int(starts[7]) + _SAMPLE // tokens.itemsize + 100  # after the 8th sampled block, before the 9th
    assert where < starts[8]
    rewrite_ids(cache, lambda ids: ids.__setitem__(where, 250))  # the vocab has about 20 characters
    capfd.readouterr()
    tokens, vocab = load_tokens(corpus, cache_dir=tmp_path / "cache")
    assert tokens[where] < len(vocab) and tokens.max() < len(vocab)
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "failed its check (tokens.npy holds ids 0..250" in err and "rebuilding it" in err


@pytest.mark.parametrize("keep", [0, 100, -1])
def test_truncated_tokens_are_rebuilt(cached, keep):
    corpus, cache = cached
    raw = (cache / "tokens.npy").read_bytes()
    (cache / "tokens.npy").write_bytes(raw[:keep])
    assert reload(corpus) == TEXT


@pytest.mark.parametrize("content", ["", "not json", "[1, 2]", '{"chars": 5}', '{"chars": ["ab"]}', '{"unk": null}'])
def test_invalid_vocab_is_rebuilt(cached, content):
    corpus, cache = cached
    (cache / "vocab.json").write_text(content, encoding="utf-8")
    assert reload(corpus) == TEXT


def test_a_rebuild_is_reported_in_one_line_and_a_good_cache_silently(cached, capfd):
    corpus, cache = cached
    capfd.readouterr()
    rewrite_ids(cache, lambda ids: ids.fill(0))
    assert reload(corpus) == TEXT
    err = capfd.readouterr().err
    assert re.fullmatch(rf"charlm: token cache {re.escape(str(cache))} failed its check \(.+\); rebuilding it\.\n", err)
    assert reload(corpus) == TEXT and capfd.readouterr().err == ""


def _load_at_once(corpus: Path, barrier, results) -> None:
    barrier.wait()  # every process starts loading at the same moment
    try:
        tokens, vocab = load_tokens(corpus, cache_dir=corpus.parent / "cache")
        results.put(vocab.decode(tokens))
    except Exception as e:  # reported as the process's result, so that the test fails at once and says why
        results.put(repr(e))


@pytest.mark.parametrize("start", ["no cache", "damaged cache"])
def test_concurrent_builders_all_get_the_corpus(cached, start, capfd):
    corpus, cache = cached
    text = TEXT * 50  # a larger corpus, so that builds overlap
    corpus.write_text(text, encoding="utf-8")
    if start == "damaged cache":
        load_tokens(corpus, cache_dir=corpus.parent / "cache")
        (new,) = (d for d in (corpus.parent / "cache").iterdir() if d.is_dir() and d != cache)
        rewrite_ids(new, lambda ids: ids.fill(0))
    capfd.readouterr()
    ctx = multiprocessing.get_context("fork")  # the test module and its imports are already loaded
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_load_at_once, args=(corpus, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    texts = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * n and texts == [text] * n
    lines = capfd.readouterr().err.splitlines()  # the children's stderr too: capfd captures file descriptor 2
    if start == "no cache":
        assert lines == []  # a build under way is not a damaged cache
    else:
        assert 1 <= len(lines) <= n and all(" failed its check (" in line for line in lines)
    assert reload(corpus) == text
    assert not [p for p in (corpus.parent / "cache").iterdir() if ".tmp" in p.name]  # no temporary directory left


def test_a_directory_without_files_as_corpus_says_to_put_files_in_it(tmp_path):
    (tmp_path / "books").mkdir()
    with pytest.raises(UserError, match=r"is an empty folder; put UTF-8 text files in it, or pass a file"):
        load_tokens(tmp_path / "books", cache_dir=tmp_path / "cache")


def test_an_unreadable_corpus_says_to_make_it_readable(tmp_path, monkeypatch):
    corpus = tmp_path / "locked.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    corpus.chmod(0)  # enough unless the tests run as root, who may read anything: so open() refuses it too
    real_open = Path.open

    def refuse(self, *args, **kwargs):
        if self == corpus:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    for load in (read_corpus, lambda p: load_tokens(p, cache_dir=tmp_path / "cache")):
        with pytest.raises(UserError, match=r"is not readable .*; chmod u\+r it"):
            load(corpus)


def test_a_full_disk_while_building_the_cache_is_one_line_and_leaves_no_partial_cache(tmp_path):
    """The cache directory on a real 64 KB tmpfs; the corpus's tokens need 240 KB."""
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()})")
    try:
        corpus = tmp_path / "c.txt"
        corpus.write_text(make_text() * 40, encoding="utf-8")  # 240 K characters
        with pytest.raises(UserError, match="cannot write the token cache in .*point CHARLM_CACHE"):
            load_tokens(corpus, cache_dir=disk)
        assert list(disk.iterdir()) == []  # neither a cache entry nor a temporary directory is left
    finally:
        subprocess.run(["umount", str(disk)], check=False)
