"""Scalars from the TensorBoard event files of one run, as train.py writes them into its run directory."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator, ScalarEvent

from charlm import UserError
from charlm.runs.board import board_tag


def event_dir(path: str | Path) -> Path:
    """``path`` if it holds event files, else its ``tb/`` if that does (where earlier versions of train.py wrote
    them); a UserError if neither does."""
    path = Path(path).expanduser()
    for candidate in (path, path / "tb"):
        if any(candidate.glob("events.out.tfevents.*")):
            return candidate
    raise UserError(f"no TensorBoard event files in {str(path)!r}; pass a run directory of train.py.")


class RunEvents:
    """Every scalar of one run, with wall-clock times counted from the run's first event."""

    def __init__(self, path: str | Path):
        self.dir = event_dir(path)
        self._acc = EventAccumulator(str(self.dir), size_guidance={"scalars": 0})  # 0: keep every point
        self._acc.Reload()
        self.start = self._acc.FirstEventTimestamp()  # wall_time of the first event written, in seconds
        self.tags = set(self._acc.Tags()["scalars"])

    def has(self, tag: str) -> bool:
        """Whether the run logged ``tag`` (a Lightning name, under either of the names ``scalars`` reads)."""
        return board_tag(tag) in self.tags or tag in self.tags

    def scalars(self, tag: str) -> list[ScalarEvent]:
        """The points of ``tag`` (a Lightning name such as ``val/bpc``, written as ``board_tag(tag)``; runs from
        before charlm 0.2 wrote it as is) in step order; a UserError if the run never logged it."""
        tag = board_tag(tag) if board_tag(tag) in self.tags else tag
        if tag not in self.tags:
            raise UserError(
                f"the run in {str(self.dir)!r} logged no {tag!r} scalars; let it run past its first validation."
            )
        return sorted(self._acc.Scalars(tag), key=lambda e: (e.step, e.wall_time))

    def seconds(self, tag: str) -> list[float]:
        """Wall-clock seconds since the run's first event at each point of ``tag``."""
        return [e.wall_time - self.start for e in self.scalars(tag)]

    def values(self, tag: str) -> list[float]:
        return [e.value for e in self.scalars(tag)]
