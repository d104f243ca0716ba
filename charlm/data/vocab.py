"""Vocabularies: CharVocab (Unicode code points, with a vectorised encoder and a streaming one) and ByteVocab
(raw bytes, for any file); ``vocab_from_dict`` reads either back from a checkpoint or a cache."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np

from charlm import UserError
from charlm.checks import choice

Unknown = Literal["error", "unk", "skip"]  # what encode does with characters outside the vocab
CODE_POINTS = 0x110000  # every Unicode code point is below this
_CHUNK = 1 << 16  # characters encoded per step: the 256 KiB UTF-32 scratch stays in cache, and malloc reuses it


def code_points(text: str) -> np.ndarray:
    """All code points of ``text`` as uint32, without a per-character Python loop."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class FirstSeenIds:
    """Ids for a text whose vocab is not known yet: each code point gets the next free id when first seen.

    So a text can be encoded in one pass over its blocks; ``CharVocab(chars).encode(chars)`` then maps these
    ids to the vocab's. The lookup table marks unseen code points with its dtype's largest value, so ids are
    uint8 up to 255 distinct characters, then uint16, then uint32; ids given out keep their values.
    """

    def __init__(self):
        self._cps = np.empty(0, dtype=np.uint32)  # id -> code point
        self._table = np.full(CODE_POINTS, 0xFF, dtype=np.uint8)  # code point -> id, or the dtype's max: unseen

    @property
    def chars(self) -> str:
        """The characters seen so far, in id order."""
        return self._cps.tobytes().decode("utf-32-le")

    def encode(self, cps: np.ndarray) -> np.ndarray:
        """Ids of the code points ``cps`` (uint32 array), numbering those not seen before."""
        ids = self._table.take(cps)
        unseen = np.iinfo(ids.dtype).max
        if len(ids) and ids.max() == unseen:
            self._number(np.unique(cps[ids == unseen]))
            ids = self._table.take(cps)
        return ids

    def _number(self, new: np.ndarray) -> None:
        count = len(self._cps) + len(new)
        if count > np.iinfo(self._table.dtype).max:  # widen the table; the ids given out keep their values
            dtype = np.uint16 if count <= 0xFFFF else np.uint32
            self._table = np.full(CODE_POINTS, np.iinfo(dtype).max, dtype=dtype)
            self._table[self._cps] = np.arange(len(self._cps))
        self._table[new] = np.arange(len(self._cps), count)
        self._cps = np.concatenate([self._cps, new])


class StreamEncoder:
    """Builds the vocab of UTF-8 text too large to hold while encoding it, one block of bytes at a time.

    ``write`` takes blocks cut anywhere, even inside a character, and appends each block's first-seen ids
    to ``scratch``, a binary file, so memory holds one block. After the last block, ``vocab`` is the vocab
    of the whole text and ``ids`` reads the text back from ``scratch`` in that vocab's ids: all of it in the
    order written, or runs of blocks in any order (members of an archive arrive in its order, and are joined
    in name order).
    """

    def __init__(self, scratch: BinaryIO):
        self.scratch = scratch
        self.position = 0  # stream offset that a UnicodeDecodeError's ``start`` from ``write`` counts from
        self._fed = 0  # bytes given to the decoder
        self._decoder = codecs.getincrementaldecoder("utf-8")()  # holds back a character cut by a block's end
        self._seen = FirstSeenIds()
        self._sizes: list[tuple[np.dtype, int]] = []  # dtype and length of each block's first-seen ids
        self._tokens = 0

    def __len__(self) -> int:
        return self._tokens

    @property
    def blocks(self) -> int:
        """Blocks written so far; ``ids`` reads back any ``range`` of them."""
        return len(self._sizes)

    def write(self, block: bytes, final: bool = False) -> None:
        """Encode the next block; ``final`` marks the end of the text, so a cut character there is an error."""
        self.position = self._fed - len(self._decoder.getstate()[0])
        ids = self._seen.encode(code_points(self._decoder.decode(block, final)))
        self._fed += len(block)
        self.scratch.write(ids)
        self._sizes.append((ids.dtype, len(ids)))
        self._tokens += len(ids)

    def vocab(self, unk: str | None = None) -> CharVocab:
        return CharVocab(self._seen.chars, unk=unk)

    def ids(self, vocab: CharVocab, runs: Iterable[range] | None = None) -> Iterator[np.ndarray]:
        """The text's ids in ``vocab`` (a vocab of at least its characters), block by block: every block in
        order, or the blocks of each of ``runs`` (ranges of block numbers, repeats allowed) in turn."""
        renumber = vocab.encode(self._seen.chars)  # first-seen id -> vocab id, in the vocab's dtype
        offsets = np.cumsum([0] + [dtype.itemsize * n for dtype, n in self._sizes])
        for run in [range(self.blocks)] if runs is None else runs:
            self.scratch.seek(int(offsets[run.start]) if run else 0)
            for dtype, n in self._sizes[run.start : run.stop]:
                yield renumber.take(np.frombuffer(self.scratch.read(n * dtype.itemsize), dtype))


class CharVocab:
    """Maps characters to ids 0..V-1 in code-point order, so the same text always gives the same vocab.

    ``unk`` is an optional character reserved for unknown input; it is part of the vocab (so it has
    an id and an output logit) even when the corpus never contains it, as d2l's ``<unk>`` is.
    ``keep_order=True`` keeps the order ``chars`` come in as the ids instead: a vocab that ``extend`` grew, whose
    first ids are another vocab's, and such a vocab read back (``from_dict``).
    """

    unit, bits = "char", "bpc"  # data.unit, and the name of the metric in bits per token: bits per character

    def __init__(self, chars: list[str] | str, unk: str | None = None, keep_order: bool = False):
        if keep_order:
            chars = list(dict.fromkeys([*chars, *([unk] if unk else [])]))
        else:
            chars = sorted(set(chars) | ({unk} if unk else set()))
        if any(len(c) != 1 for c in chars):
            raise UserError("every vocab entry must be a single character; rebuild the vocab from text.")
        if not chars:
            raise UserError("the vocab is empty; build it from a non-empty corpus.")
        self.chars = chars
        self.unk = unk
        self._cps = np.array([ord(c) for c in chars], dtype=np.uint32)  # id -> code point
        # Lookup table code point -> id; the extra last slot (-1) catches every code point above the vocab's.
        self._table = np.full(int(self._cps.max()) + 2, -1, dtype=np.int64)
        self._table[self._cps] = np.arange(len(chars))

    @classmethod
    def from_text(cls, text: str, unk: str | None = None) -> CharVocab:
        seen = FirstSeenIds()
        for start in range(0, len(text), _CHUNK):
            seen.encode(code_points(text[start : start + _CHUNK]))
        return cls(seen.chars, unk=unk)

    def extend(self, other: CharVocab) -> CharVocab:
        """This vocab with the characters of ``other`` that it lacks appended, in code-point order: every id of
        this vocab keeps its value, and characters ``other`` lacks stay. The unk character is ``other``'s."""
        new = sorted(set(other.chars) - set(self.chars))
        return CharVocab([*self.chars, *new], unk=other.unk, keep_order=True)

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocab) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"CharVocab(size={len(self)}, unk={self.unk!r})"

    @property
    def dtype(self) -> np.dtype:
        """Smallest unsigned dtype that holds every id: uint8 up to 256 chars, else uint16, else uint32."""
        return np.dtype(np.uint8 if len(self) <= 1 << 8 else np.uint16 if len(self) <= 1 << 16 else np.uint32)

    def encode(self, text: str, unknown: Unknown = "error") -> np.ndarray:
        """Encode ``text`` to ids of ``self.dtype``, chunk by chunk through the lookup table.

        ``unknown`` decides characters outside the vocab: ``error`` raises a UserError listing them,
        ``unk`` maps them to the unk character, ``skip`` drops them.
        """
        choice("unknown", unknown, Unknown)
        if unknown == "unk" and self.unk is None:
            raise UserError("unknown=unk needs a vocab with an unk character; use unknown=skip or unknown=error.")
        parts = []
        for start in range(0, len(text), _CHUNK):
            cps = code_points(text[start : start + _CHUNK])
            ids = self._table[np.minimum(cps, len(self._table) - 1)]
            missing = ids < 0
            if missing.any():
                if unknown == "error":
                    bad = "".join(sorted({chr(c) for c in np.unique(cps[missing])}))
                    raise UserError(
                        f"characters not in the vocab: {bad!r}; remove them or pass unknown=skip (or unknown=unk)."
                    )
                ids = ids[~missing] if unknown == "skip" else np.where(missing, self.chars.index(self.unk), ids)
            parts.append(ids.astype(self.dtype))
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)

    def decode(self, ids) -> str:
        """Inverse of ``encode`` for any int array, list or tensor of ids."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self._cps[ids].tobytes().decode("utf-32-le")

    def stream_decoder(self, streams: int) -> StreamDecoder:
        """Text of each step's ids [streams]: one character per stream."""
        return StreamDecoder(lambda ids: list(self.decode(ids)), lambda: [""] * streams)

    def to_dict(self) -> dict:
        saved = {"chars": "".join(self.chars), "unk": self.unk}
        # A vocab that ``extend`` grew is read back in its own order; a code-point-ordered one keeps the layout
        # every earlier checkpoint and cache has.
        return saved if self.chars == sorted(self.chars) else saved | {"order": "ids"}

    @classmethod
    def from_dict(cls, d: dict) -> CharVocab:
        return cls(list(d["chars"]), unk=d.get("unk"), keep_order=d.get("order") == "ids")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CharVocab:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


class StreamDecoder:
    """``decoder(ids [N]) -> N strings``, step after step; ``flush()`` -> what the last steps left undecoded."""

    def __init__(self, step, flush):
        self.step, self.flush = step, flush

    def __call__(self, ids) -> list[str]:
        return self.step(ids)


class ByteVocab:
    """Raw bytes as tokens: id = byte value, V = 256, so any file is a corpus (enwik8 is raw XML bytes, not
    always whole UTF-8 characters) and the metrics are bits per byte. Text in (a prompt) is encoded as UTF-8;
    text out is decoded as UTF-8 with U+FFFD for bytes that form no character."""

    unit, bits = "byte", "bpb"
    unk = None
    dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return 256

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteVocab)

    def __repr__(self) -> str:
        return "ByteVocab(size=256)"

    def encode(self, text: str | bytes, unknown: Unknown = "error") -> np.ndarray:
        """UTF-8 bytes of ``text`` as ids; every byte is in the vocab, so ``unknown`` never applies."""
        choice("unknown", unknown, Unknown)
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(raw, dtype=np.uint8).copy()

    def decode(self, ids) -> str:
        return _as_bytes(ids).decode("utf-8", "replace")

    def stream_decoder(self, streams: int) -> StreamDecoder:
        """Text of each step's ids [streams] through one incremental UTF-8 decoder per stream, so a character
        whose bytes come in several steps appears, whole, at its last byte (and "" before)."""
        decoders = [codecs.getincrementaldecoder("utf-8")("replace") for _ in range(streams)]
        return StreamDecoder(
            lambda ids: [d.decode(_as_bytes(ids)[i : i + 1]) for i, d in enumerate(decoders)],
            lambda: [d.decode(b"", final=True) for d in decoders],
        )

    def to_dict(self) -> dict:
        return {"unit": "byte"}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()), encoding="utf-8")


def _as_bytes(ids) -> bytes:
    """Any int array, list or tensor of byte ids -> bytes."""
    return np.asarray(ids, dtype=np.int64).reshape(-1).astype(np.uint8).tobytes()


Vocab = CharVocab | ByteVocab


def vocab_from_dict(d: dict) -> Vocab:
    """The vocab saved by ``to_dict`` (a checkpoint's ``vocab``, a cache's vocab.json); no ``unit``: characters."""
    return ByteVocab() if d.get("unit") == "byte" else CharVocab.from_dict(d)


def load_vocab(path: str | Path) -> Vocab:
    return vocab_from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
