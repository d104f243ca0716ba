"""Token cache: a corpus tokenized once, keyed by its content and options, written atomically, verified on every
load against its manifest, and memory-mapped."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from charlm import UserError
from charlm.data.archives import archive_format
from charlm.data.corpus import (
    SEPARATOR,
    Tokenizing,
    blank_corpus,
    blocks,
    check_members,
    corpus_files,
    corpus_name,
    existing_file,
    tokenize_files,
)
from charlm.data.vocab import Vocab, load_vocab, vocab_from_dict

_CACHE_FORMAT = 2  # bump when the layout or the bytes a build writes change (_SAMPLE* too), so caches are rebuilt
_SAMPLES, _SAMPLE = 16, 1 << 18  # tokens.npy bytes hashed by each load: 16 blocks of 256 KiB, all of 4 MiB or less
_SCAN = 1 << 20  # tokens.npy bytes read per step when a build writes its manifest
_FILES = ("tokens.npy", "vocab.json", "manifest.json")  # in the order a build moves them into the cache


def _cache_key(path: Path, options: tuple) -> str:
    """SHA-1 of the corpus file (an archive's bytes as they are on disk), read block by block, and of the
    options; a blank file is an error."""
    key, blank = hashlib.sha1(), True
    for block in blocks(path):
        key.update(block)
        blank = blank and block.isspace()
    if blank:
        raise blank_corpus([path])
    key.update(repr(options).encode())
    return key.hexdigest()[:16]


def _files_key(files: list[Path], options: tuple) -> str:
    """SHA-1 of every file's content, each after a marker with its index, and of the options; all blank: error."""
    key, blank = hashlib.sha1(), True
    for i, path in enumerate(files):
        key.update(f"\0file {i}\0".encode())
        for block in blocks(path):
            key.update(block)
            blank = blank and block.isspace()
    if blank:
        raise blank_corpus(files)
    key.update(repr(options).encode())
    return key.hexdigest()[:16]


class _BadCache(Exception):
    """A cache that fails its check; the message says which check."""


def _require(ok: bool, reason: str) -> None:
    if not ok:
        raise _BadCache(reason)


def _sampled_sha1(ids: np.ndarray) -> str:
    """SHA-1 of _SAMPLES evenly spaced blocks of the ids' bytes, the first and last included (all of a small array).

    Not of every byte: on a 211 MB corpus a full SHA-1 of tokens.npy adds 90% to a cached load (which already
    hashes the corpus for its key: 172 ms), while these 4 MiB add 2%. So a load catches a file rewritten, zeroed
    or swapped, but not a few bytes changed between the samples; an out-of-range id among them is caught by the
    id range that every load reads (``_scan``): such an id would stop training with an IndexError. The
    manifest's ``tokens_sha1`` covers every byte, for ``sha1sum tokens.npy``.
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
    sha1 = hashlib.sha1()
    with tokens_npy.open("rb") as f:
        low, high = _scan(f, ids.dtype, ids.offset, sha1)
    return {
        "format": _CACHE_FORMAT,
        "tokens": len(ids),
        "dtype": ids.dtype.name,
        "tokens_bytes": tokens_npy.stat().st_size,
        "tokens_sha1": sha1.hexdigest(),
        "tokens_sample_sha1": _sampled_sha1(ids),
        "vocab_bytes": len(vocab_raw),
        "vocab_sha1": hashlib.sha1(vocab_raw).hexdigest(),
        "vocab_size": len(load_vocab(vocab_json)),
        "min_id": low,
        "max_id": high,
    }


def _scan(f: BinaryIO, dtype: np.dtype, offset: int, sha1=None) -> tuple[int | None, int | None]:
    """The smallest and largest id of the open .npy file ``f`` (None, None without ids), and with ``sha1`` every
    byte of it hashed into ``sha1``, read block by block with read(): a memory map of it would make every page of
    a gigabyte corpus resident in this process."""
    low = high = None
    f.seek(0)
    header = f.read(offset)
    if sha1 is not None:
        sha1.update(header)
    for block in iter(lambda: f.read(_SCAN), b""):
        if sha1 is not None:
            sha1.update(block)
        ids = np.frombuffer(block, dtype)  # _SCAN is a multiple of every id size
        low = int(ids.min()) if low is None else min(low, int(ids.min()))
        high = int(ids.max()) if high is None else max(high, int(ids.max()))
    return low, high


def _read_cache(cache: Path) -> tuple[np.ndarray, Vocab, dict] | None:
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
        vocab = vocab_from_dict(json.loads(raw))
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
            _require(
                _sampled_sha1(tokens) == manifest["tokens_sample_sha1"], "tokens.npy does not match its sampled SHA-1"
            )
            low, high = _scan(f, dtype, tokens.offset)  # every id, the ones between the samples too
            _require(
                (low, high) == (manifest["min_id"], manifest["max_id"]),
                f"tokens.npy holds ids {low}..{high}, not {manifest['min_id']}..{manifest['max_id']}",
            )
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


def _build(files: list[Path], sep: str, options: Tokenizing, cache: Path) -> None:
    """Tokenize into a temporary directory beside ``cache``, then move each file in by ``os.replace``."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{cache.name}.tmp", dir=cache.parent) as tmp:
        tokens_npy, vocab_json, manifest_json = (Path(tmp) / name for name in _FILES)
        vocab, counts = tokenize_files(files, sep, options, tokens_npy)
        vocab.save(vocab_json)
        manifest = _manifest(tokens_npy, vocab_json) | ({"file_tokens": counts} if len(files) > 1 else {})
        manifest_json.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        cache.mkdir(exist_ok=True)
        for name in _FILES:
            _fsync(Path(tmp) / name)
            os.replace(Path(tmp) / name, cache / name)
        _fsync(cache)


def load_tokens(path: str | Path, cache_dir: str | Path | None = None, **options) -> tuple[np.ndarray, Vocab]:
    """Tokenize ``path`` (a file, a folder or a glob: see ``corpus_files``; several files are joined by
    ``SEPARATOR``) once, and memory-map the result on later calls. ``options``: those of ``Tokenizing``.
    See ``load_files`` for the cache."""
    files = corpus_files(path)
    tokens, vocab, _ = load_files(files, SEPARATOR, Tokenizing(**options), cache_dir, corpus_name(path))
    return tokens, vocab


def load_split(
    paths: list[str | Path], cache_dir: str | Path | None = None, **options
) -> tuple[list[np.ndarray], Vocab]:
    """A corpus that comes split (train, val, test files): one vocab over their union, and each file's tokens."""
    files = [existing_file(p) for p in paths]
    tokens, vocab, counts = load_files(files, "", Tokenizing(**options), cache_dir, corpus_name(None, files[0]))
    ends = np.cumsum(counts)
    return [tokens[end - n : end] for n, end in zip(counts, ends, strict=True)], vocab


def load_files(
    files: list[Path], sep: str, options: Tokenizing, cache_dir: str | Path | None, name: str
) -> tuple[np.ndarray, Vocab, list[int]]:
    """Tokenize ``files`` joined by ``sep`` once and memory-map the result on later calls; also each file's
    token count (its separator included).

    The cache directory is keyed by the file's content hash (an archive's: of its compressed bytes, and of the
    ``data.members`` picked from it) plus the options that change the tokens, and
    holds ``tokens.npy`` (uint8/uint16/uint32 ids; for ``unit=byte`` the bytes themselves), ``vocab.json`` and
    ``manifest.json`` (sizes, hashes, id range). A cache that fails its check against the manifest is rebuilt,
    saying so in one line on stderr.

    Concurrent builders (DDP ranks loading at once) need no lock: each file reaches its name by ``os.replace``
    of a whole, fsynced file; every build of one key writes byte-identical files (the key covers the corpus,
    the options and _CACHE_FORMAT, tokenizing is deterministic, and the manifest records no time or pid); and a
    reader checks the very bytes it returns against the manifest it read. So a reader that pairs one build's
    tokens.npy with another build's manifest pairs identical copies, and a damaged file fails its check with
    any manifest. (Removing the manifest first would not stop such pairs: with two builders, one's manifest
    can land between the other's removal and its next replace.) The manifest moves in last, so until one build
    has finished there is none, and a reader builds the cache without calling it damaged.
    """
    check_members(files, options.members)
    # A corpus with an archive is keyed by the archive's bytes as they are on disk and by what is read from it.
    picks = ("archive", options.members) if any(archive_format(f) for f in files) else ()
    if len(files) == 1:  # the key of a one-file corpus is what it always was, so existing caches stay valid
        key = _cache_key(files[0], (_CACHE_FORMAT, *options.key, *picks))
    else:
        key = _files_key(files, (_CACHE_FORMAT, *options.key, sep, len(files), *picks))
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
            _build(files, sep, options, cache)
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
