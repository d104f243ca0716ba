"""Corpus file -> cached token array: read, check, hash, tokenize in a streaming pass, cache atomically."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from charlm import UserError
from charlm.vocab import CharVocab, StreamEncoder

PREPROCESS = ("none", "d2l")
_CACHE_FORMAT = 2  # bump when the layout or the bytes a build writes change (_SAMPLE* too), so caches are rebuilt
_BLOCK = 1 << 16  # corpus bytes decoded per step: malloc reuses such small buffers, so no page faults
_SAMPLES, _SAMPLE = 16, 1 << 18  # tokens.npy bytes hashed by each load: 16 blocks of 256 KiB, all of 4 MiB or less
_FILES = ("tokens.npy", "vocab.json", "manifest.json")  # in the order a build moves them into the cache


SEPARATOR = "\n\n"  # between the files of a folder or glob corpus: a blank line, so no word runs into the next
_GLOB = re.compile(r"[*?\[]")


def corpus_files(path: str | Path) -> list[Path]:
    """``data.path`` as the files it names: a file; a folder's files (sorted by name, hidden ones skipped, not
    recursive); or a glob's matches (sorted; ``**`` recurses)."""
    text = str(path)
    if _GLOB.search(text):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"data.path={text!r} matches no files; check the pattern, e.g. data.path='books/*.txt'.")
        return files
    folder = Path(text).expanduser()
    if folder.is_dir():
        files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
        if not files:
            raise UserError(f"data.path={text!r} is an empty folder; put UTF-8 text files in it, or pass a file.")
        return files
    return [_existing(folder)]


def read_corpus(path: str | Path) -> bytes:
    """The whole file, for a ``data.preprocess`` that rewrites the whole text (load_tokens streams otherwise)."""
    with _open(path := _existing(path)) as f:
        raw = f.read()
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
    if (path := Path(path).expanduser()).is_dir():
        raise _corpus_error(path, "is a directory; pass the path of a UTF-8 text file")
    if not path.is_file():
        raise _corpus_error(path, "does not exist; pass an existing UTF-8 text file as data.path")
    return path


def _open(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except PermissionError:
        raise _corpus_error(path, "is not readable (permission denied); chmod u+r it, or pass another file") from None


def _blocks(path: Path) -> Iterator[bytes]:
    with _open(path) as f:
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


def _files_key(files: list[Path], options: tuple) -> str:
    """SHA-1 of every file's content, each after a marker with its index, and of the options; all blank: error."""
    key, blank = hashlib.sha1(), True
    for i, path in enumerate(files):
        key.update(f"\0file {i}\0".encode())
        for block in _blocks(path):
            key.update(block)
            blank = blank and block.isspace()
    if blank:
        raise _corpus_error(files[0], "and the other files of this corpus are empty; pass files with text in them")
    key.update(repr(options).encode())
    return key.hexdigest()[:16]


def _tokenize_files(
    files: list[Path], sep: str, preprocess: str, unk: str | None, tokens_npy: Path
) -> tuple[CharVocab, list[int]]:
    """Write the tokens of the files joined by ``sep`` to ``tokens_npy``; return the vocab and each file's token
    count (its separator counted with it), so that a pre-split corpus's parts are exact slices of one array.

    Without a preprocess the corpus is decoded once, one block at a time, and its first-seen ids wait in an
    unnamed scratch file: both files go through the page cache, not this process's memory.
    """
    if preprocess != "none":  # a regex over the whole text: d2l's corpora are small
        pieces = [decode_corpus(read_corpus(f), f, preprocess) for f in files]
        joint = decode_corpus(sep.encode(), files[0], preprocess) if sep else ""
        text = joint.join(pieces)
        if not text:
            what = "and the other files are" if len(files) > 1 else "is"
            raise _corpus_error(files[0], f"{what} empty after data.preprocess={preprocess}; use another file")
        vocab = CharVocab.from_text(text, unk=unk)
        np.save(tokens_npy, vocab.encode(text))
        return vocab, [len(p) + (len(joint) if i < len(files) - 1 else 0) for i, p in enumerate(pieces)]
    counts = []
    with tempfile.TemporaryFile(dir=tokens_npy.parent) as scratch, tokens_npy.open("wb") as out:
        encoder = StreamEncoder(scratch)
        for i, path in enumerate(files):
            start = encoder._fed  # the file's first byte in the stream
            try:
                for block in _blocks(path):
                    encoder.write(block)
                encoder.write(b"", final=True)  # a character cut by the end of a file is an error in that file
            except UnicodeDecodeError as e:
                raise _not_utf8(path, encoder.position + e.start - start) from None
            if sep and i < len(files) - 1:
                encoder.write(sep.encode())
            counts.append(len(encoder) - sum(counts))
        vocab = encoder.vocab(unk)
        header = {"descr": np.lib.format.dtype_to_descr(vocab.dtype), "fortran_order": False}
        np.lib.format.write_array_header_1_0(out, header | {"shape": (len(encoder),)})
        for ids in encoder.ids(vocab):
            out.write(ids)
    return vocab, counts


class _BadCache(Exception):
    """A cache that fails its check; the message says which check."""


def _require(ok: bool, reason: str) -> None:
    if not ok:
        raise _BadCache(reason)


def _sampled_sha1(ids: np.ndarray) -> str:
    """SHA-1 of _SAMPLES evenly spaced blocks of the ids' bytes, the first and last included (all of a small array).

    Not of every byte: on a 211 MB corpus a full SHA-1 of tokens.npy adds 90% to a cached load (which already
    hashes the corpus for its key: 172 ms), while these 4 MiB add 2%. So a load catches a file rewritten, zeroed
    or swapped, but not a few bytes changed between the samples, an out-of-range id among them included (a max
    over every id would add 17%). The manifest's ``tokens_sha1`` covers every byte, for ``sha1sum tokens.npy``.
    """
    raw = ids.view(np.uint8)
    if len(raw) <= _SAMPLES * _SAMPLE:
        return hashlib.sha1(raw).hexdigest()
    sha1 = hashlib.sha1()
    for start in np.linspace(0, len(raw) - _SAMPLE, _SAMPLES, dtype=np.int64):
        sha1.update(raw[start : start + _SAMPLE])
    return sha1.hexdigest()


def _manifest(tokens_npy: Path, vocab_json: Path) -> dict:
    ids, vocab_raw = np.load(tokens_npy, mmap_mode="r"), vocab_json.read_bytes()
    return {
        "format": _CACHE_FORMAT,
        "tokens": len(ids),
        "dtype": ids.dtype.name,
        "tokens_bytes": tokens_npy.stat().st_size,
        "tokens_sha1": hashlib.sha1(np.memmap(tokens_npy, mode="r")).hexdigest(),
        "tokens_sample_sha1": _sampled_sha1(ids),
        "vocab_bytes": len(vocab_raw),
        "vocab_sha1": hashlib.sha1(vocab_raw).hexdigest(),
        "vocab_size": len(CharVocab.load(vocab_json)),
        "min_id": int(ids.min()),
        "max_id": int(ids.max()),
    }


def _read_cache(cache: Path) -> tuple[np.ndarray, CharVocab, dict] | None:
    """The cache's tokens and vocab, each file read once and those very bytes checked against the manifest.

    None if there is no manifest yet: no build has finished. _BadCache says what failed, when anything does.
    """
    try:
        manifest = json.loads((cache / "manifest.json").read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise _BadCache("manifest.json is not readable JSON") from None
    try:
        _require(manifest["format"] == _CACHE_FORMAT, f"manifest.json is of format {manifest['format']}")
        raw = (cache / "vocab.json").read_bytes()
        _require(len(raw) == manifest["vocab_bytes"], f"vocab.json has {len(raw)} bytes, not {manifest['vocab_bytes']}")
        _require(hashlib.sha1(raw).hexdigest() == manifest["vocab_sha1"], "vocab.json does not match its SHA-1")
        vocab = CharVocab.from_dict(json.loads(raw))
        _require(len(vocab) == manifest["vocab_size"], f"vocab.json has {len(vocab)} characters")
        _require(
            0 <= manifest["min_id"] <= manifest["max_id"] < len(vocab), "the manifest's id range is not the vocab's"
        )
        with (cache / "tokens.npy").open("rb") as f:
            size, expected = os.fstat(f.fileno()).st_size, manifest["tokens_bytes"]
            _require(size == expected, f"tokens.npy has {size} bytes, not {expected}")
            _require(np.lib.format.read_magic(f) == (1, 0), "tokens.npy is not a version 1.0 .npy file")
            header = np.lib.format.read_array_header_1_0(f)  # (shape, fortran_order, dtype)
            n, dtype = manifest["tokens"], np.dtype(manifest["dtype"])
            _require(header == ((n,), False, dtype), f"tokens.npy's header does not describe {n} {dtype} ids")
            tokens = np.memmap(f, dtype, mode="r", offset=f.tell(), shape=(n,))  # maps the file checked above
        _require(_sampled_sha1(tokens) == manifest["tokens_sample_sha1"], "tokens.npy does not match its sampled SHA-1")
    except (OSError, ValueError, KeyError, TypeError, UserError) as e:  # a missing file, bad JSON, a wrong shape
        raise _BadCache(f"{type(e).__name__}: {e}") from None
    counts = manifest.get("file_tokens", [len(tokens)])
    _require(sum(counts) == len(tokens), "the manifest's file_tokens do not add up to its tokens")
    return tokens, vocab, manifest


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a directory too, so that the renames into it are durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _build(files: list[Path], sep: str, preprocess: str, unk: str | None, cache: Path) -> None:
    """Tokenize into a temporary directory beside ``cache``, then move each file in by ``os.replace``."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{cache.name}.tmp", dir=cache.parent) as tmp:
        tokens_npy, vocab_json, manifest_json = (Path(tmp) / name for name in _FILES)
        vocab, counts = _tokenize_files(files, sep, preprocess, unk, tokens_npy)
        vocab.save(vocab_json)
        manifest = _manifest(tokens_npy, vocab_json) | ({"file_tokens": counts} if len(files) > 1 else {})
        manifest_json.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        cache.mkdir(exist_ok=True)
        for name in _FILES:
            _fsync(Path(tmp) / name)
            os.replace(Path(tmp) / name, cache / name)
        _fsync(cache)


def load_tokens(
    path: str | Path, preprocess: str = "none", unk: str | None = "\ufffd", cache_dir: str | Path | None = None
) -> tuple[np.ndarray, CharVocab]:
    """Tokenize ``path`` (a file, a folder or a glob: see ``corpus_files``; several files are joined by
    ``SEPARATOR``) once, and memory-map the result on later calls. See ``load_files`` for the cache."""
    files = corpus_files(path)
    tokens, vocab, _ = load_files(files, SEPARATOR, preprocess, unk, cache_dir, _corpus_name(path, files))
    return tokens, vocab


def _corpus_name(path: str | Path, files: list[Path]) -> str:
    """The cache directory's prefix: the file's stem, or the folder's (the glob's first fixed folder) name."""
    if len(files) == 1:
        return files[0].stem
    folder = Path(str(path)).expanduser()
    while _GLOB.search(str(folder)) or not folder.name:
        if folder == folder.parent:
            break
        folder = folder.parent
    return f"{folder.name or 'corpus'}-files"


def load_split(
    paths: list[str | Path], preprocess: str = "none", unk: str | None = "\ufffd", cache_dir: str | Path | None = None
) -> tuple[list[np.ndarray], CharVocab]:
    """A corpus that comes split (train, val, test files): one vocab over their union, and each file's tokens."""
    files = [_existing(p) for p in paths]
    tokens, vocab, counts = load_files(files, "", preprocess, unk, cache_dir, files[0].stem + "-split")
    ends = np.cumsum(counts)
    return [tokens[end - n : end] for n, end in zip(counts, ends, strict=True)], vocab


def load_files(
    files: list[Path], sep: str, preprocess: str, unk: str | None, cache_dir: str | Path | None, name: str
) -> tuple[np.ndarray, CharVocab, list[int]]:
    """Tokenize ``files`` joined by ``sep`` once and memory-map the result on later calls; also each file's
    token count (its separator included).

    The cache directory is keyed by the file's content hash plus the options that change the tokens, and
    holds ``tokens.npy`` (uint8/uint16/uint32 ids), ``vocab.json`` and ``manifest.json`` (sizes, hashes, id
    range). A cache that fails its check against the manifest is rebuilt, saying so in one line on stderr.

    Concurrent builders (DDP ranks loading at once) need no lock: each file reaches its name by ``os.replace``
    of a whole, fsynced file; every build of one key writes byte-identical files (the key covers the corpus,
    the options and _CACHE_FORMAT, tokenizing is deterministic, and the manifest records no time or pid); and a
    reader checks the very bytes it returns against the manifest it read. So a reader that pairs one build's
    tokens.npy with another build's manifest pairs identical copies, and a damaged file fails its check with
    any manifest. (Removing the manifest first would not stop such pairs: with two builders, one's manifest
    can land between the other's removal and its next replace.) The manifest moves in last, so until one build
    has finished there is none, and a reader builds the cache without calling it damaged.
    """
    if preprocess not in PREPROCESS:
        raise UserError(f"data.preprocess={preprocess!r} is not known; use one of {', '.join(PREPROCESS)}.")
    if len(files) == 1:  # the key of a one-file corpus is what it always was, so existing caches stay valid
        key = _cache_key(files[0], (_CACHE_FORMAT, preprocess, unk))
    else:
        key = _files_key(files, (_CACHE_FORMAT, preprocess, unk, sep, len(files)))
    cache = Path(cache_dir or "~/.cache/charlm").expanduser() / f"{name}-{key}"
    try:
        loaded = _read_cache(cache)
    except _BadCache as e:
        reason = " ".join(str(e).split())  # one line, whatever the exception said
        # One write() call, so that the lines of ranks loading at once do not interleave.
        sys.stderr.write(f"charlm: token cache {cache} failed its check ({reason}); rebuilding it.\n")
        sys.stderr.flush()
        loaded = None
    if loaded is None:
        try:
            _build(files, sep, preprocess, unk, cache)
        except OSError as e:  # a full disk or a read-only cache directory; a half-built cache is never renamed in
            raise UserError(
                f"cannot write the token cache in {str(cache.parent)!r} ({e.strerror or e}); free disk space there,"
                " or point CHARLM_CACHE (or paths.cache_dir) at a writable directory."
            ) from None
        try:
            loaded = _read_cache(cache)  # checks what was written
        except _BadCache as e:
            raise UserError(
                f"the token cache {str(cache)!r} failed its check right after it was written ({e}); the disk may be"
                " failing: point CHARLM_CACHE (or paths.cache_dir) at another disk."
            ) from None
    tokens, vocab, manifest = loaded
    return tokens, vocab, manifest.get("file_tokens", [len(tokens)])
