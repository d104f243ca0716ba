"""Corpus sources -> tokens: which files a corpus is (a file, a folder, a glob, a pre-split triple, a preset; any of
them compressed or an archive, see ``charlm.data.archives``), how they are checked and decoded, and one streaming pass
that writes their tokens (characters or bytes) as .npy."""

from __future__ import annotations

import glob
import logging
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
from charlm.data.archives import Member, archive_format, holds_members, listed_size, member_globs, members, stem
from charlm.data.vocab import ByteVocab, CharVocab, StreamEncoder, Vocab

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
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True) if Path(p).is_file())
        if not matches:
            raise UserError(f"data.path={text!r} matches no files; check the pattern, e.g. data.path='books/*.txt'.")
        return read_once(matches)
    folder = Path(text).expanduser()
    if folder.is_dir():
        files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
        if not files:
            raise UserError(f"data.path={text!r} is an empty folder; put UTF-8 text files in it, or pass a file.")
        return files
    return [existing_file(folder)]


def read_once(files: list[Path]) -> list[Path]:
    """``files`` with each real file once (the first path reaching it): a ``**`` glob follows symlinks to folders,
    so a link to a folder above (``books/loop -> .``) reaches the same files again and again. Says how many
    paths it skipped, in one line."""
    seen: set[Path] = set()
    once = []
    for f in files:
        real = f.resolve()
        if real not in seen:
            seen.add(real)
            once.append(f)
    if len(once) < len(files):
        logging.getLogger("charlm").warning(
            f"data.path: skipped {len(files) - len(once)} files reached twice through symlinks (each file is read once)"
        )
    return once


@dataclass(frozen=True, kw_only=True)
class Tokenizing:
    """What turns a corpus's files into tokens (so also what its cache is keyed by): ``data.unit``,
    ``data.preprocess``, ``data.unk``, and ``data.members`` for archives."""

    unit: str = "char"  # char: Unicode characters of UTF-8 text | byte: raw bytes, any file (V = 256)
    preprocess: str = "none"  # none | d2l (lower-case letters and spaces) | ptb_char (awd-lstm-lm's pennchar)
    unk: str | None = "\ufffd"  # a character reserved for unknown input (char only)
    members: tuple[str, ...] | None = None  # data.members: globs picking the members of archives; None: all

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", member_globs(self.members))  # also from "*.c,*.h" or a list
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
        """The options as the cache key has always had them for characters, so existing caches stay valid
        (``members`` is keyed where a corpus has an archive)."""
        return (self.preprocess, self.unk) if self.unit == "char" else (self.preprocess, "byte")


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A standard corpus that ``data=NAME`` reads from ``data.path``; nothing downloads it, so when it is missing
    the error says where it goes, how to get it and how to check the download."""

    name: str  # the data=... option
    get: str  # how to obtain the file(s), as a command or a URL
    size: int | None = None  # bytes of the published file (a single-file corpus), checked when present
    checksum: str | None = None  # e.g. "SHA-1 57b8..." of the published file
    archive: str | None = None  # the file as distributed (enwik8.zip), read when the file itself is not there

    def check(self, path: str | Path, files: Sequence[str] = ()) -> str:
        """The corpus to read: ``path``, or the distributed ``archive`` beside it when only that is there.

        A UserError if neither (or one of ``files`` inside the folder ``path``) is there; a one-line warning if
        the file (a zip's members: its directory lists their sizes) is not the published size, as then its
        numbers do not compare with the published ones."""
        folder = Path(path).expanduser()
        if not files and not folder.is_file() and self.archive and (folder.parent / self.archive).is_file():
            path = folder = folder.parent / self.archive
        missing = [f for f in files if not (folder / f).is_file()] if files else [] if folder.is_file() else ["."]
        facts = ", ".join(f for f in (f"{self.size:,} bytes" if self.size else "", self.checksum or "") if f)
        if missing:
            what = f"{', '.join(files)} in the folder" if files else "the file"
            also = f" or {self.archive!r} as distributed beside it" if self.archive else ""
            raise UserError(
                f"data={self.name} needs {what} {str(folder)!r}{f' ({facts})' if facts else ''}{also}, and nothing"
                f" here downloads it: {self.get}, or pass data.path=WHERE_IT_IS."
            )
        size = (listed_size(folder) if archive_format(folder) else folder.stat().st_size) if not files else None
        if self.size and size is not None and size != self.size:
            sys.stderr.write(
                f"charlm: {folder} has {size:,} bytes, not the {self.size:,} of the published {self.name}; its"
                " results will not compare with published ones.\n"
            )
        return str(path)


def read_corpus(path: str | Path, globs: tuple[str, ...] | None = None) -> bytes:
    """The whole file (an archive's picked members in name order, joined by SEPARATOR), for a
    ``data.preprocess`` that rewrites the whole text (load_tokens streams otherwise)."""
    path = existing_file(path)
    if archive_format(path):
        texts = sorted((m.name, b"".join(m.blocks)) for m in file_members(path, globs))
        raw = SEPARATOR.encode().join(text for _, text in texts)
    else:
        with _open(path) as f:
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


def _not_utf8(path: str | Path, offset: int, member: str | None = None) -> UserError:
    where = f"member {member!r} " if member else ""
    return corpus_error(path, f"{where}is not valid UTF-8 at byte offset {offset}; convert it (e.g. iconv -t UTF-8)")


def blank_corpus(files: Sequence[Path]) -> UserError:
    if len(files) == 1:
        return corpus_error(files[0], "is empty; pass a file with text in it as data.path")
    return corpus_error(files[0], "and the other files of this corpus are empty; pass files with text in them")


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
    """The file's bytes as they are on disk (an archive's too: what its cache key hashes)."""
    with _open(path) as f:
        yield from iter(lambda: f.read(_BLOCK), b"")


def file_members(path: Path, globs: tuple[str, ...] | None = None) -> Iterator[Member]:
    """A corpus file as the parts it is read in: a plain file is one, its size taken before reading; a compressed
    file or an archive its picked members (``charlm.data.archives.members``), decompressed as they are read."""
    if not archive_format(path):
        yield Member(path.name, path.stat().st_size, blocks(path))
        return
    with _open(path) as f:
        yield from members(f, path, globs)


def check_members(files: Sequence[Path], globs: tuple[str, ...] | None) -> None:
    """``data.members`` picks members of a .zip or .tar; a UserError if the corpus has none to pick from."""
    if globs is not None and not any(holds_members(f) for f in files):
        raise UserError(
            f"data.members={','.join(globs)!r} picks files inside a .zip or .tar, and {str(files[0])!r} is not one;"
            " drop data.members (a folder or a glob as data.path picks files itself)."
        )


def tokenize_files(files: list[Path], sep: str, options: Tokenizing, tokens_npy: Path) -> tuple[Vocab, list[int]]:
    """Write the tokens of the files joined by ``sep`` to ``tokens_npy``; return the vocab and each file's token
    count (its separator counted with it), so that a pre-split corpus's parts are exact slices of one array. An
    archive's picked members are joined by SEPARATOR in name order, as a folder's files are.

    Bytes are copied as they are. Characters, without a preprocess, are decoded once, one block at a time, and
    their first-seen ids wait in an unnamed scratch file, in the order the blocks came (a tar's members come in
    its own order): both files go through the page cache, not this process's memory.
    """
    preprocess, unk, globs = options.preprocess, options.unk, options.members
    if options.unit == "byte":
        return ByteVocab(), _copy_bytes(files, sep, globs, tokens_npy)
    if preprocess != "none":  # a regex over the whole text: d2l's corpora are small
        pieces = [decode_corpus(read_corpus(f, globs), f, preprocess) for f in files]
        joint = decode_corpus(sep.encode(), files[0], preprocess) if sep else ""
        text = joint.join(pieces)
        if not text:
            what = "and the other files are" if len(files) > 1 else "is"
            raise corpus_error(files[0], f"{what} empty after data.preprocess={preprocess}; use another file")
        vocab = CharVocab.from_text(text, unk=unk)
        np.save(tokens_npy, vocab.encode(text))
        return vocab, [len(p) + (len(joint) if i < len(files) - 1 else 0) for i, p in enumerate(pieces)]
    counts, layout = [], []  # layout: (runs of scratch blocks, tokens) in the order they are written out
    with tempfile.TemporaryFile(dir=tokens_npy.parent) as scratch, tokens_npy.open("wb") as out:
        encoder = StreamEncoder(scratch)
        joints: dict[str, tuple[range, int]] = {}  # a separator is encoded once, and its blocks written each time

        def joint(text: str) -> tuple[range, int]:
            if text not in joints:
                first, before = encoder.blocks, len(encoder)
                encoder.write(text.encode())
                joints[text] = range(first, encoder.blocks), len(encoder) - before
            return joints[text]

        for i, path in enumerate(files):
            parts = []
            for member in file_members(path, globs):
                first, before, start = encoder.blocks, len(encoder), encoder._fed  # start: its first byte
                try:
                    for block in member.blocks:
                        encoder.write(block)
                    encoder.write(b"", final=True)  # a character cut by the end of a file is an error in that file
                except UnicodeDecodeError as e:
                    for _ in member.blocks:  # a damaged archive reads as bad text: then say it is damaged
                        pass
                    name = member.name if holds_members(path) else None
                    raise _not_utf8(path, encoder.position + e.start - start, name) from None
                parts.append((member.name, (range(first, encoder.blocks), len(encoder) - before)))
            parts.sort(key=lambda part: part[0])  # stable; a zip's come sorted, a tar's in the archive's order
            pieces = [piece for k, (_, run) in enumerate(parts) for piece in ([joint(SEPARATOR)] if k else []) + [run]]
            if sep and i < len(files) - 1:
                pieces.append(joint(sep))
            counts.append(sum(n for _, n in pieces))
            layout += pieces
        if not len(encoder) or "".join(encoder.vocab().chars).isspace():
            raise blank_corpus(files)
        vocab = encoder.vocab(unk)
        _npy_header(out, vocab.dtype, sum(counts))
        for ids in encoder.ids(vocab, (run for run, _ in layout)):
            out.write(ids)
    return vocab, counts


def _npy_header(out: BinaryIO, dtype: np.dtype | str, length: int) -> None:
    """The .npy header of ``length`` ids. numpy pads it so that any length fits in the same bytes: a header
    written before the length is known can be rewritten in place."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (length,)}
    np.lib.format.write_array_header_1_0(out, header)


def _copy_bytes(files: list[Path], sep: str, globs: tuple[str, ...] | None, tokens_npy: Path) -> list[int]:
    """The files' bytes joined by ``sep``, block by block, as a uint8 .npy: the tokens of ``data.unit=byte``."""
    counts, blank = [], True
    with tokens_npy.open("wb") as out:
        _npy_header(out, np.uint8, 0)  # the length is known at the end
        for i, path in enumerate(files):
            begin = out.tell()
            blank = _copy_file(path, globs, out) and blank
            if sep and i < len(files) - 1:
                out.write(sep.encode())
            counts.append(out.tell() - begin)
        if blank:
            raise blank_corpus(files)
        out.seek(0)
        _npy_header(out, np.uint8, sum(counts))
    return counts


def _copy_file(path: Path, globs: tuple[str, ...] | None, out: BinaryIO) -> bool:
    """Copy one file's bytes (an archive's picked members in name order, joined by SEPARATOR) to ``out`` at its
    position, leaving it at their end; whether they were all blank.

    A tar's members come in the archive's order: once one comes out of name order, the rest are only listed
    (a tar lists each member's size), and a second pass over the archive writes every member at its place."""
    joint, base, listed, blank = SEPARATOR.encode(), out.tell(), [], True
    in_order = True  # every member so far came in name order, so was written at its place
    for member in file_members(path, globs):
        in_order = in_order and not (listed and member.name < listed[-1][0])
        if not in_order:
            listed.append((member.name, member.size))
            continue
        if listed:
            out.write(joint)
        copied = 0
        for block in member.blocks:
            copied += out.write(block)
            blank = blank and block.isspace()
        if member.size is not None and copied != member.size:
            raise corpus_error(path, "changed while it was read; wait until it is complete, then run again")
        listed.append((member.name, copied))
    if in_order:
        return blank
    order = sorted(range(len(listed)), key=lambda k: listed[k][0])
    places, at = {}, base
    for rank, k in enumerate(order):
        if rank:
            out.seek(at)
            at += out.write(joint)
        places[k], at = at, at + listed[k][1]
    for k, member in enumerate(file_members(path, globs)):
        out.seek(places[k])
        for block in member.blocks:
            out.write(block)
            blank = blank and block.isspace()
    out.seek(at)
    return blank


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
        if archive_format(path):
            raise UserError(
                f"data.split_files names files in a folder, and data.path={path!r} is an archive; unpack it, or"
                " pass each split as data.train_path / val_path / test_path."
            )
        if given or len(files) != 3:
            raise UserError(
                "data.split_files names the train, val and test files inside the folder data.path; give three"
                " names, and no data.train_path / val_path / test_path."
            )
        return [str(Path(path).expanduser() / name) for name in files]
    return [train, val, test] if given else None


def corpus_name(path: str | Path | None, train_path: str | Path | None = None) -> str:
    """A corpus's short name, which names its runs, its HPARAMS entry and its token cache: a file's stem (an
    archive's name without its ending: ``enwik8.zip`` -> ``enwik8``), a folder's name (a glob's: its first folder
    without a wildcard), or a pre-split corpus's folder (of its train file); ``run`` when no corpus is given. The
    strings ``null`` / ``None`` are Hydra overrides that give none."""
    if train_path not in (None, "", "null", "None"):
        return Path(str(train_path)).expanduser().resolve().parent.name or "split"
    if path in (None, "", "null", "None"):
        return "run"
    given = folder = Path(str(path)).expanduser()
    while _GLOB.search(str(folder)) and folder != folder.parent:
        folder = folder.parent
    return (folder.name if folder.is_dir() or folder != given else stem(folder)) or "run"
