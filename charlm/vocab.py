"""CharVocab: a deterministic vocabulary of Unicode code points with a vectorised encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from charlm import UserError

UNKNOWN_POLICIES = ("error", "unk", "skip")
_CHUNK = 1 << 24  # characters encoded per step: bounds the UTF-32 scratch buffer to 64 MiB


def _code_points(text: str) -> np.ndarray:
    """All code points of ``text`` as uint32, without a per-character Python loop."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class CharVocab:
    """Maps characters to ids 0..V-1 in code-point order, so the same text always gives the same vocab.

    ``unk`` is an optional character reserved for unknown input; it is part of the vocab (so it has
    an id and an output logit) even when the corpus never contains it, as d2l's ``<unk>`` is.
    """

    def __init__(self, chars: list[str] | str, unk: str | None = None):
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
        per_chunk = [np.unique(_code_points(text[i : i + _CHUNK])) for i in range(0, len(text), _CHUNK)]
        cps = np.unique(np.concatenate(per_chunk)) if per_chunk else []
        return cls([chr(c) for c in cps], unk=unk)

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

    def encode(self, text: str, unknown: str = "error") -> np.ndarray:
        """Encode ``text`` to ids of ``self.dtype``, chunk by chunk through the lookup table.

        ``unknown`` decides characters outside the vocab: ``error`` raises a UserError listing them,
        ``unk`` maps them to the unk character, ``skip`` drops them.
        """
        if unknown not in UNKNOWN_POLICIES:
            raise UserError(f"unknown={unknown!r} is not a policy; use one of {', '.join(UNKNOWN_POLICIES)}.")
        if unknown == "unk" and self.unk is None:
            raise UserError("unknown=unk needs a vocab with an unk character; use unknown=skip or unknown=error.")
        parts = []
        for start in range(0, len(text), _CHUNK):
            cps = _code_points(text[start : start + _CHUNK])
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

    def to_dict(self) -> dict:
        return {"chars": "".join(self.chars), "unk": self.unk}

    @classmethod
    def from_dict(cls, d: dict) -> CharVocab:
        return cls(list(d["chars"]), unk=d.get("unk"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CharVocab:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
