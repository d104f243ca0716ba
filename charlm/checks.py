"""The small checks every setting goes through, each with one error form: ``<key>=<value> <what is wrong>; <fix>.``

Settings arrive from YAML and the command line, so a value may be of any type: ``True`` is not a whole number
here (Python says it is), and ``"3"`` is not one either. Each check returns the value it accepted, so a caller
writes ``n = whole("trainer.max_steps", n, 1)``. Choice fields are typed ``Literal[...]`` where they are
declared, and ``choice`` reads the allowed values from that type, so the two cannot drift apart.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Iterable
from pathlib import Path

from charlm import UserError


def options(allowed: object) -> tuple[str, ...]:
    """The values of a ``Literal[...]`` type, or of any other iterable of strings."""
    args = typing.get_args(allowed)
    return tuple(args) if args else tuple(typing.cast(Iterable[str], allowed))


def _example(name: str, example: object) -> str:
    return "" if example is None else f"; e.g. {name}={example}"


def whole(name: str, value: object, minimum: int = 0, *, maximum: int | None = None, example: object = None) -> int:
    """``value`` as an int in [minimum, maximum], else a UserError naming ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise UserError(f"{name}={value!r} must be a whole number {bound}{_example(name, example)}.")
    return value


def number(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    high_open: bool = False,
    low_open: bool = False,
    example: object = None,
) -> float:
    """``value`` as a finite real number in the interval from ``low`` to ``high`` (either may be None: unbounded).

    ``low_open`` / ``high_open`` leave the bound itself out: ``number("model.dropout", p, 0, 1, high_open=True)``
    is [0, 1)."""
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            bound = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            bound = ("positive" if low == 0 else f"> {low}") if low_open else f">= {low}"
        elif high is not None:
            bound = f"< {high}" if high_open else f"<= {high}"
        else:
            bound = "a number"
        raise UserError(f"{name}={value!r} must be {bound}{_example(name, example)}.")
    return float(value)


def flag(name: str, value: object) -> bool:
    """``value`` as a bool; YAML's true/false only (a string or a number is refused)."""
    if not isinstance(value, bool):
        raise UserError(f"{name}={value!r} must be true or false.")
    return value


def choice(name: str, value: object, allowed: object) -> str:
    """``value`` if it is one of ``allowed`` (a ``Literal[...]`` type or an iterable of strings)."""
    values = options(allowed)
    if not isinstance(value, str) or value not in values:
        raise UserError(f"{name}={value!r} is not known; use one of {', '.join(values)}.")
    return value


def required_ckpt(ckpt: object, key: str = "ckpt") -> Path:
    """``ckpt=`` of charlm-generate and charlm-export (or charlm-train's ``init_from=``: ``key``) as a path; refuse a
    missing one before any work.

    A directory stands for the best checkpoint in it: a run directory's ``checkpoints/best.ckpt``, or, for a
    folder of runs (``ckpt=outputs/timemachine``), that of the run written last, so a user need not copy a
    time-stamped path."""
    if not ckpt:
        raise UserError(f"no checkpoint given; pass {key}=PATH/TO/best.ckpt.")
    path = Path(str(ckpt)).expanduser()
    if not path.is_dir():
        return path
    found = sorted(path.glob("**/checkpoints/best.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"no run under {str(path)!r} has a checkpoints/best.ckpt; pass {key}=PATH/TO/best.ckpt.")
    return found[-1]
