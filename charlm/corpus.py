"""Corpus sources -> tokens: which files a corpus is (a file, a folder, a glob, a pre-split triple, a preset), how
they are checked and decoded, and one streaming pass that writes their tokens (characters or bytes) as .npy."""

from __future__ import annotations

import glob
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from charlm import UserError
from charlm.vocab import ByteVocab, CharVocab, StreamEncoder, Vocab

PREPROCESS = ("none", "d2l", "ptb_char")
UNITS = ("char", "byte")
_BLOCK = 1 << 16  # corpus bytes decoded per step: malloc reuses such small buffers, so no page faults

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
    return [existing_file(folder)]


@dataclass(frozen=True, kw_only=True)
class Tokenizing:
    """What turns a corpus's bytes into tokens (so also what its cache is keyed by): ``data.unit``,
    ``data.preprocess`` and ``data.unk``."""

    unit: str = "char"  # char: Unicode characters of UTF-8 text | byte: raw bytes, any file (V = 256)
    preprocess: str = "none"  # none | d2l (lower-case letters and spaces) | ptb_char (awd-lstm-lm's pennchar)
    unk: str | None = "\ufffd"  # a character reserved for unknown input (char only)

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise UserError(f"data.unit={self.unit!r} is not known; use data.unit=char or data.unit=byte.")
        if self.preprocess not in PREPROCESS:
            raise UserError(f"data.preprocess={self.preprocess!r} is not known; use one of {', '.join(PREPROCESS)}.")
        if self.unit == "byte" and self.preprocess != "none":
            raise UserError(
                f"data.preprocess={self.preprocess} rewrites characters, not bytes; set data.unit=char or"
                " data.preprocess=none."
            )

    @property
    def key(self) -> tuple:
        """The options as the cache key has always had them for characters, so existing caches stay valid."""
        return (self.preprocess, self.unk) if self.unit == "char" else (self.preprocess, "byte")


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A standard corpus that ``data=NAME`` reads from ``data.path``; nothing downloads it, so when it is missing
    the error says where it goes, how to get it and how to check the download."""

    name: str  # the data=... option
    get: str  # how to obtain the file(s), as a command or a URL
    size: int | None = None  # bytes of the published file (a single-file corpus), checked when present
    checksum: str | None = None  # e.g. "SHA-1 57b8..." of the published file

    def check(self, path: str | Path, files: Sequence[str] = ()) -> None:
        """A UserError if ``path`` (or ``files`` inside the folder ``path``) is missing; a one-line warning if the
        file is not the published size, as then its numbers do not compare with the published ones."""
        folder = Path(path).expanduser()
        missing = [f for f in files if not (folder / f).is_file()] if files else [] if folder.is_file() else ["."]
        facts = ", ".join(f for f in (f"{self.size:,} bytes" if self.size else "", self.checksum or "") if f)
        if missing:
            what = f"{', '.join(files)} in the folder" if files else "the file"
            raise UserError(
                f"data={self.name} needs {what} {str(folder)!r}{f' ({facts})' if facts else ''}, and nothing here"
                f" downloads it: {self.get}, or pass data.path=WHERE_IT_IS."
            )
        if self.size and not files and (size := folder.stat().st_size) != self.size:
            sys.stderr.write(
                f"charlm: {folder} has {size:,} bytes, not the {self.size:,} of the published {self.name}; its"
                " results will not compare with published ones.\n"
            )


def read_corpus(path: str | Path) -> bytes:
    """The whole file, for a ``data.preprocess`` that rewrites the whole text (load_tokens streams otherwise)."""
    with _open(path := existing_file(path)) as f:
        raw = f.read()
    if not raw or raw.isspace():  # not ``raw.strip()``, which copies the whole corpus
        raise corpus_error(path, "is empty; pass a file with text in it as data.path")
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
    elif preprocess == "ptb_char":
        text = _ptb_char(text, path)
    return text


def _ptb_char(text: str, path: str | Path) -> str:
    """awd-lstm-lm's pennchar files hold one sentence per line, its symbols separated by spaces ("_" between
    words), and its reader makes each symbol a token and ends every line with <eos>. Here: each line's symbols
    joined, and "\n" as <eos>, so the tokens (and so the bits per character) are the same as awd-lstm-lm's."""
    lines = text.split("\n")
    if lines[-1] == "":  # a file that ends with a newline has no line after it
        lines.pop()
    symbols = [line.split() for line in lines]
    long = next((sym for line in symbols for sym in line if len(sym) > 1), None)
    if long is not None:
        raise corpus_error(path, f"has the symbol {long!r}; data.preprocess=ptb_char needs one character per symbol")
    return "".join("".join(line) + "\n" for line in symbols)


def corpus_error(path: str | Path, problem: str) -> UserError:
    return UserError(f"corpus file {str(path)!r} {problem}.")


def _not_utf8(path: str | Path, offset: int) -> UserError:
    return corpus_error(path, f"is not valid UTF-8 at byte offset {offset}; convert it (e.g. iconv -t UTF-8)")


def existing_file(path: str | Path) -> Path:
    if (path := Path(path).expanduser()).is_dir():
        raise corpus_error(path, "is a directory; pass the path of a UTF-8 text file")
    if path.exists() and not path.is_file():  # a device (/dev/zero: endless), a FIFO, a socket
        raise corpus_error(path, "is not a regular file or a directory; pass a UTF-8 text file or a folder of them")
    if not path.is_file():
        raise corpus_error(path, "does not exist; pass an existing UTF-8 text file as data.path")
    return path


def _open(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except PermissionError:
        raise corpus_error(path, "is not readable (permission denied); chmod u+r it, or pass another file") from None


def blocks(path: Path) -> Iterator[bytes]:
    with _open(path) as f:
        yield from iter(lambda: f.read(_BLOCK), b"")


def tokenize_files(files: list[Path], sep: str, options: Tokenizing, tokens_npy: Path) -> tuple[Vocab, list[int]]:
    """Write the tokens of the files joined by ``sep`` to ``tokens_npy``; return the vocab and each file's token
    count (its separator counted with it), so that a pre-split corpus's parts are exact slices of one array.

    Bytes are copied as they are. Characters, without a preprocess, are decoded once, one block at a time, and
    their first-seen ids wait in an unnamed scratch file: both files go through the page cache, not this
    process's memory.
    """
    preprocess, unk = options.preprocess, options.unk
    if options.unit == "byte":
        return ByteVocab(), _copy_bytes(files, sep, tokens_npy)
    if preprocess != "none":  # a regex over the whole text: d2l's corpora are small
        pieces = [decode_corpus(read_corpus(f), f, preprocess) for f in files]
        joint = decode_corpus(sep.encode(), files[0], preprocess) if sep else ""
        text = joint.join(pieces)
        if not text:
            what = "and the other files are" if len(files) > 1 else "is"
            raise corpus_error(files[0], f"{what} empty after data.preprocess={preprocess}; use another file")
        vocab = CharVocab.from_text(text, unk=unk)
        np.save(tokens_npy, vocab.encode(text))
        return vocab, [len(p) + (len(joint) if i < len(files) - 1 else 0) for i, p in enumerate(pieces)]
    counts = []
    with tempfile.TemporaryFile(dir=tokens_npy.parent) as scratch, tokens_npy.open("wb") as out:
        encoder = StreamEncoder(scratch)
        for i, path in enumerate(files):
            start = encoder._fed  # the file's first byte in the stream
            try:
                for block in blocks(path):
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


def _copy_bytes(files: list[Path], sep: str, tokens_npy: Path) -> list[int]:
    """The files' bytes joined by ``sep``, block by block, as a uint8 .npy: the tokens of ``data.unit=byte``."""
    sizes = [f.stat().st_size for f in files]
    counts = [n + (len(sep.encode()) if i < len(files) - 1 else 0) for i, n in enumerate(sizes)]
    with tokens_npy.open("wb") as out:
        header = {"descr": "|u1", "fortran_order": False, "shape": (sum(counts),)}
        np.lib.format.write_array_header_1_0(out, header)
        for i, path in enumerate(files):
            copied = 0
            for block in blocks(path):
                copied += out.write(block)
            if copied != sizes[i]:
                raise corpus_error(path, "changed while it was read; wait until it is complete, then run again")
            if sep and i < len(files) - 1:
                out.write(sep.encode())
    return counts


def split_paths(
    path: str | None, train: str | None, val: str | None, test: str | None, files: Sequence[str] | None
) -> list[str] | None:
    """The three files of a pre-split corpus, or None for one corpus that ``data.splits`` cuts."""
    split = {"train_path": train, "val_path": val, "test_path": test}
    given = [name for name, value in split.items() if value]
    if given and len(given) < 3:
        missing = ", ".join(f"data.{name}" for name in split if name not in given)
        raise UserError(f"a pre-split corpus needs all three of its files; also give {missing}.")
    if given and path:
        raise UserError(
            "data.path and data.train_path / val_path / test_path are both given; pass one corpus"
            " (e.g. add data.path=null)."
        )
    if not given and not path:
        raise UserError(
            "no corpus given; pass data.path=FILE (or a folder, or a glob such as 'books/*.txt'), or"
            " data.train_path, data.val_path and data.test_path."
        )
    if files:
        if given or len(files) != 3:
            raise UserError(
                "data.split_files names the train, val and test files inside the folder data.path; give three"
                " names, and no data.train_path / val_path / test_path."
            )
        return [str(Path(path).expanduser() / name) for name in files]
    return [train, val, test] if given else None


def corpus_name(path: str | Path | None, train_path: str | Path | None = None) -> str:
    """A corpus's short name, which names its runs, its HPARAMS entry and its token cache: a file's stem, a
    folder's name (a glob's: its first folder without a wildcard), or a pre-split corpus's folder (of its train
    file); ``run`` when no corpus is given. The strings ``null`` / ``None`` are Hydra overrides that give none."""
    if train_path not in (None, "", "null", "None"):
        return Path(str(train_path)).expanduser().resolve().parent.name or "split"
    if path in (None, "", "null", "None"):
        return "run"
    given = folder = Path(str(path)).expanduser()
    while _GLOB.search(str(folder)) and folder != folder.parent:
        folder = folder.parent
    return (folder.name if folder.is_dir() or folder != given else folder.stem) or "run"
