"""The token ids of a text too large to hold, read from a binary file one chunk of bytes at a time, and read again
from any token on: what ``charlm.score`` walks through, in one place or in several at once."""

from __future__ import annotations

import bisect
import codecs
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from charlm import UserError
from charlm.data.vocab import Vocab


class ChunkedText:
    """UTF-8 text (raw bytes, for a byte vocab) in ``file`` as ids of ``vocab``, ``chunk`` bytes per read.

    ``unknown`` is ``CharVocab.encode``'s policy for characters outside the vocab; each block also counts them.
    A seekable file can be read from several places at once (each ``blocks`` iterator seeks before it reads);
    ``count`` walks it once and keeps one mark per block, so that ``cursor`` can start at any token."""

    def __init__(self, file: BinaryIO, vocab: Vocab, unknown: str, chunk: int):
        self.file, self.vocab, self.unknown, self.chunk = file, vocab, unknown, chunk
        self.seekable = file.seekable()
        self._marks: list[tuple[int, int]] = [(0, 0)]  # (tokens before a block, the byte offset its text starts at)

    def blocks(self, offset: int = 0) -> Iterator[tuple[int, np.ndarray, int]]:
        """(byte offset of the block's first character, its ids, its characters outside the vocab) from
        ``offset``, which is a character boundary; the last block is empty."""
        decoder = codecs.getincrementaldecoder("utf-8")()  # holds back a character cut by a block's end
        position = offset
        while True:
            if self.seekable:
                self.file.seek(position)
            data = self.file.read(self.chunk)
            start = position - len(decoder.getstate()[0])
            position += len(data)
            if self.vocab.unit == "byte":
                yield start, self.vocab.encode(data), 0
            else:
                try:
                    text = decoder.decode(data, final=not data)
                except UnicodeDecodeError as e:
                    raise UserError(
                        f"the text is not UTF-8 (bad byte at offset {start + e.start}); save it as UTF-8 or score it"
                        " with a byte-level model (data.unit=byte)."
                    ) from None
                yield start, *self._encode(text)
            if not data:
                return

    def _encode(self, text: str) -> tuple[np.ndarray, int]:
        ids = self.vocab.encode(text, unknown=self.unknown)
        if self.unknown == "skip":
            return ids, len(text) - len(ids)
        if self.unknown == "unk":  # ids of the unk character that the text did not hold as such
            return ids, int((ids == self.vocab.chars.index(self.vocab.unk)).sum()) - text.count(self.vocab.unk)
        return ids, 0  # error: encode raised for any

    def count(self) -> tuple[int, int]:
        """Read the whole (seekable) file once: (tokens, characters outside the vocab); raises what reading raises,
        so bad input is refused before any scoring. Keeps one mark per block: a few bytes per ``chunk``."""
        tokens = unknown = 0
        self._marks = []
        for offset, ids, missing in self.blocks():
            self._marks.append((tokens, offset))
            tokens += len(ids)
            unknown += missing
        return tokens, unknown

    def cursor(self, start: int = 0) -> Cursor:
        """The ids from token ``start`` on (after ``count``, or 0)."""
        k = bisect.bisect_right(self._marks, (start, float("inf"))) - 1
        before, offset = self._marks[k]
        return Cursor(self.blocks(offset), start - before)


class Cursor:
    """``take(n)``: the next ``n`` ids (fewer at the end of the text), holding at most about one block."""

    def __init__(self, blocks: Iterator[tuple[int, np.ndarray, int]], skip: int = 0):
        self._blocks, self._skip = blocks, skip
        self._buffer = np.empty(0, dtype=np.int64)
        self.unknown = 0  # characters outside the vocab in the blocks read so far

    def take(self, n: int) -> np.ndarray:
        while len(self._buffer) < n + self._skip:
            block = next(self._blocks, None)
            if block is None:
                break
            self.unknown += block[2]
            self._buffer = np.concatenate([self._buffer, block[1].astype(np.int64)])
        out = self._buffer[self._skip : self._skip + n]
        self._buffer, self._skip = self._buffer[self._skip + n :], 0
        return out
