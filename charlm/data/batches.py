"""Training and evaluation batches from a token array: TBPTT streams or random windows, sharded per rank, and the
schedule of batch shapes (batch size and sequence length) over a run."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset

from charlm import UserError

Batch = tuple[torch.Tensor, torch.Tensor, bool]  # x [B, T] int64, y [B, T] int64, reset: streams start afresh


class BatchSchedule:
    """Batch shapes over a run: ``phases`` = ``[[until_step, batch_size, seq_len], ...]`` trains batches before
    step ``until_step`` (counted over training batches from the start of the run) on ``batch_size`` x ``seq_len``;
    after the last phase, ``data.batch_size`` x ``data.seq_len``. E.g. ``[[200, 32, 16], [600, 64, 32]]`` with
    128 x 64: small, short batches first (many cheap updates while the model is far from any optimum), then the
    full shape. The shape is a pure function of the step, so a resumed run draws the shapes it would have drawn.
    """

    def __init__(self, phases: Sequence[Sequence[int]], batch_size: int, seq_len: int):
        example = "e.g. data.schedule=[[200,32,16],[600,64,32]]"
        if isinstance(phases, str) or not isinstance(phases, Sequence):
            raise UserError(f"data.schedule={phases!r} must be a list of [until_step, batch_size, seq_len]; {example}.")
        self.phases: list[tuple[int, int, int]] = []
        for phase in phases:
            ok = isinstance(phase, Sequence) and not isinstance(phase, str) and len(phase) == 3
            if not ok or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in phase):
                raise UserError(
                    f"data.schedule entry {phase!r} must be three positive integers [until_step, batch_size, seq_len];"
                    f" {example}."
                )
            if self.phases and phase[0] <= self.phases[-1][0]:
                raise UserError(f"data.schedule's until_step values {[p[0] for p in phases]} must increase; {example}.")
            self.phases.append(tuple(phase))
        self.final = (batch_size, seq_len)

    def at(self, step: int) -> tuple[int, int]:
        """(batch_size, seq_len) of training batch ``step`` (0-based, over the whole run)."""
        return next(((b, t) for until, b, t in self.phases if step < until), self.final)

    def shapes(self) -> list[tuple[int, int]]:
        return [(b, t) for _, b, t in self.phases] + [self.final]


class _Batches(IterableDataset):
    """What both kinds of batches share: this rank's share of ``tokens`` in ``batch_size`` x ``seq_len`` batches,
    with an optional ``schedule`` of shapes over the run (``first_step()``: the run's step at this pass's start),
    and the position inside the pass that a resume restores (``start``: batches to skip on the next pass;
    ``position``: batches handed out in the current pass; see CharDataModule.state_dict)."""

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        schedule: BatchSchedule | None = None,
        first_step: Callable[[], int] = lambda: 0,
    ):
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.schedule, self.first_step = schedule, first_step
        self.start, self.position = 0, 0


class StreamBatches(_Batches):
    """TBPTT batches: the split is cut into ``world_size * batch_size`` contiguous streams.

    With 2 ranks, 2 streams each, the split a b c d e f g h i j k l m n o p q r is laid out as::

        rank 0: stream 0  a b c d    rank 1: stream 0  i j k l
                stream 1  e f g h            stream 1  m n o p

    and batch k is the next ``seq_len`` columns of its rank's block: batch k+1 continues every stream exactly
    where batch k stopped, so the model may carry its hidden state across batches. ``y`` is the same block
    shifted by one character. Every rank yields the same number of batches. With a ``schedule`` (training),
    batch k is ``schedule.at(first_step() + k)[1]`` columns long, at most ``seq_len``: an epoch keeps its
    ``len`` batches, so shorter ones leave the streams' ends for the next epoch's pass.
    """

    def __init__(self, *layout, drop_last: bool = True, **shape):  # layout and shape: _Batches' arguments
        super().__init__(*layout, **shape)
        tokens, batch_size, world_size, rank = self.tokens, self.batch_size, self.world_size, self.rank
        self.stream_len = (len(tokens) - 1) // (batch_size * world_size)
        base = rank * batch_size * self.stream_len
        span = batch_size * self.stream_len
        self.x = tokens[base : base + span].reshape(batch_size, self.stream_len)  # [B, L]
        self.y = tokens[base + 1 : base + span + 1].reshape(batch_size, self.stream_len)  # [B, L]
        self.drop_last = drop_last

    def __len__(self) -> int:
        full, rest = divmod(self.stream_len, self.seq_len)
        return full + (rest > 0 and not self.drop_last)

    def __iter__(self) -> Iterator[Batch]:
        start, self.start = self.start, 0
        first, column = self.first_step(), 0
        for k in range(len(self)):
            width = self.schedule.at(first + k)[1] if self.schedule else self.seq_len
            cols = slice(column, column + width)
            column += width
            if k < start:
                continue
            self.position = k + 1
            yield _to_long(self.x[:, cols]), _to_long(self.y[:, cols]), k == 0


class RandomWindows(_Batches):
    """d2l / nanoGPT-style batches of independent random windows; the model resets its state every batch.

    An epoch has as many batches as TBPTT would, and its windows are drawn from a generator seeded by
    (seed, epoch, rank), so a resumed run draws the same windows it would have drawn. With a ``schedule``,
    batch k has the shape ``schedule.at(first_step() + k)``.
    """

    def __init__(self, *layout, seed: int = 0, epoch: Callable[[], int] = lambda: 0, **shape):  # as _Batches'
        super().__init__(*layout, **shape)
        self.seed, self.epoch = seed, epoch
        self.num_batches = (len(self.tokens) - 1) // (self.batch_size * self.world_size * self.seq_len)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        start, self.start = self.start, 0
        rng = np.random.default_rng([self.seed, self.epoch(), self.rank])
        first = self.first_step()
        for k in range(self.num_batches):
            size, width = self.schedule.at(first + k) if self.schedule else (self.batch_size, self.seq_len)
            starts = rng.integers(0, len(self.tokens) - width, size=size)
            if k < start:  # a resume inside the epoch: draw the skipped windows, so later ones are the same
                continue
            window = np.asarray(self.tokens[starts[:, None] + np.arange(width + 1)])  # [B, T+1]
            self.position = k + 1
            yield _to_long(window[:, :-1]), _to_long(window[:, 1:]), True


def _to_long(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.int64))
