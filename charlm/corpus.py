"""Corpus file -> cached token array: read, check, hash, tokenize in a streaming pass, cache atomically."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from charlm import UserError
from charlm.vocab import CharVocab, StreamEncoder

PREPROCESS = ("none", "d2l")
_CACHE_FORMAT = 1  # bump when the cache layout changes, so stale caches are rebuilt
_BLOCK = 1 << 16  # corpus bytes decoded per step: malloc reuses such small buffers, so no page faults


def read_corpus(path: str | Path) -> bytes:
    """The whole file, for a ``data.preprocess`` that rewrites the whole text (load_tokens streams otherwise)."""
    path = _existing(path)
    raw = path.read_bytes()
    if not raw or raw.isspace():  # not ``raw.strip()``, which copies the whole corpus
        raise _corpus_error(path, "is empty; pass a file with text in it as data.path")
    return raw


def decode_corpus(raw: bytes, path: str | Path, preprocess: str = "none") -> str:
    """UTF-8 text, optionally reduced as d2l's ``read_time_machine`` does (lower-case letters and spaces)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e.start) from None
    if preprocess == "d2l":
        # d2l.TimeMachine._preprocess: every run of non-letters becomes one space, then lower-case.
        text = re.sub("[^A-Za-z]+", " ", text).lower()
    return text


def _corpus_error(path: str | Path, problem: str) -> UserError:
    return UserError(f"corpus file {str(path)!r} {problem}.")


def _not_utf8(path: str | Path, offset: int) -> UserError:
    return _corpus_error(path, f"is not valid UTF-8 at byte offset {offset}; convert it (e.g. iconv -t UTF-8)")


def _existing(path: str | Path) -> Path:
    if not (path := Path(path).expanduser()).is_file():
        raise _corpus_error(path, "does not exist; pass an existing UTF-8 text file as data.path")
    return path


def _blocks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        yield from iter(lambda: f.read(_BLOCK), b"")


def _cache_key(path: Path, options: tuple) -> str:
    """SHA-1 of the corpus file, read block by block, and of the options; a blank file is an error."""
    key, blank = hashlib.sha1(), True
    for block in _blocks(path):
        key.update(block)
        blank = blank and block.isspace()
    if blank:
        raise _corpus_error(path, "is empty; pass a file with text in it as data.path")
    key.update(repr(options).encode())
    return key.hexdigest()[:16]


def _tokenize(path: Path, preprocess: str, unk: str | None, tokens_npy: Path) -> CharVocab:
    """Write the corpus's tokens to ``tokens_npy`` and return its vocab.

    Without a preprocess the corpus is decoded once, one block at a time, and its first-seen ids wait in an
    unnamed scratch file: both files go through the page cache, not this process's memory.
    """
    if preprocess != "none":  # a regex over the whole text: d2l's corpora are small
        text = decode_corpus(read_corpus(path), path, preprocess)
        if not text:
            raise _corpus_error(path, f"is empty after data.preprocess={preprocess}; use another file")
        vocab = CharVocab.from_text(text, unk=unk)
        np.save(tokens_npy, vocab.encode(text))
        return vocab
    with tempfile.TemporaryFile(dir=tokens_npy.parent) as scratch, tokens_npy.open("wb") as out:
        encoder = StreamEncoder(scratch)
        try:
            for block in _blocks(path):
                encoder.write(block)
            encoder.write(b"", final=True)
        except UnicodeDecodeError as e:
            raise _not_utf8(path, encoder.position + e.start) from None
        vocab = encoder.vocab(unk)
        header = {"descr": np.lib.format.dtype_to_descr(vocab.dtype), "fortran_order": False}
        np.lib.format.write_array_header_1_0(out, header | {"shape": (len(encoder),)})
        for ids in encoder.ids(vocab):
            out.write(ids)
    return vocab


def load_tokens(
    path: str | Path, preprocess: str = "none", unk: str | None = "\ufffd", cache_dir: str | Path | None = None
) -> tuple[np.ndarray, CharVocab]:
    """Tokenize ``path`` once and memory-map the result on later calls.

    The cache directory is keyed by the file's content hash plus the options that change the tokens, and
    holds ``tokens.npy`` (uint8/uint16) next to ``vocab.json``. Both are written in a temporary directory and
    renamed, so concurrent ranks or an interrupted run never leave a half-written cache behind.
    """
    if preprocess not in PREPROCESS:
        raise UserError(f"data.preprocess={preprocess!r} is not known; use one of {', '.join(PREPROCESS)}.")
    path = _existing(path)
    key = _cache_key(path, (_CACHE_FORMAT, preprocess, unk))
    cache = Path(cache_dir or "~/.cache/charlm").expanduser() / f"{path.stem}-{key}"
    tokens_file, vocab_file = cache / "tokens.npy", cache / "vocab.json"
    if not (tokens_file.is_file() and vocab_file.is_file()):
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{cache.name}.tmp", dir=cache.parent) as tmp:
            _tokenize(path, preprocess, unk, Path(tmp) / tokens_file.name).save(Path(tmp) / vocab_file.name)
            cache.mkdir(exist_ok=True)
            os.replace(Path(tmp) / tokens_file.name, tokens_file)
            os.replace(Path(tmp) / vocab_file.name, vocab_file)
    return np.load(tokens_file, mmap_mode="r"), CharVocab.load(vocab_file)
