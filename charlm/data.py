"""Corpus -> cached token array -> contiguous splits -> TBPTT streams or random windows, sharded per rank."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from charlm import UserError
from charlm.cache import load_split, load_tokens
from charlm.corpus import Preset, Tokenizing, split_paths
from charlm.vocab import Vocab

SAMPLING = ("tbptt", "random")
STAGES = ("train", "val", "test")

Batch = tuple[torch.Tensor, torch.Tensor, bool]  # x [B, T] int64, y [B, T] int64, reset: streams start afresh


def check_splits(splits: Sequence[float]) -> tuple[float, float, float]:
    splits = tuple(float(f) for f in splits)
    if len(splits) != 3 or any(f < 0 for f in splits) or abs(sum(splits) - 1) > 1e-6 or min(splits[:2]) <= 0:
        raise UserError(
            f"data.splits={list(splits)} is not valid; give three fractions [train, val, test] that sum to 1, "
            "with train and val above 0."
        )
    return splits


def split_tokens(tokens: np.ndarray, splits: Sequence[float]) -> dict[str, np.ndarray]:
    """Contiguous train / val / test slices (views, no copy) in corpus order."""
    n = len(tokens)
    a = round(n * splits[0])
    b = a + round(n * splits[1])
    return dict(zip(STAGES, (tokens[:a], tokens[a:b], tokens[b:]), strict=True))


class StreamBatches(IterableDataset):
    """TBPTT batches: the split is cut into ``world_size * batch_size`` contiguous streams.

    With 2 ranks, 2 streams each, the split a b c d e f g h i j k l m n o p q r is laid out as::

        rank 0: stream 0  a b c d    rank 1: stream 0  i j k l
                stream 1  e f g h            stream 1  m n o p

    and batch k is columns [k*T, (k+1)*T) of its rank's block: batch k+1 continues every stream exactly
    where batch k stopped, so the model may carry its hidden state across batches. ``y`` is the same block
    shifted by one character. Every rank yields the same number of batches.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ):
        self.stream_len = (len(tokens) - 1) // (batch_size * world_size)
        base = rank * batch_size * self.stream_len
        span = batch_size * self.stream_len
        self.x = tokens[base : base + span].reshape(batch_size, self.stream_len)  # [B, L]
        self.y = tokens[base + 1 : base + span + 1].reshape(batch_size, self.stream_len)  # [B, L]
        self.seq_len = seq_len
        self.drop_last = drop_last
        self.start = 0  # batches to skip on the next pass (a resume inside an epoch); see CharDataModule.state_dict
        self.position = 0  # batches handed out in the current pass

    def __len__(self) -> int:
        full, rest = divmod(self.stream_len, self.seq_len)
        return full + (rest > 0 and not self.drop_last)

    def __iter__(self) -> Iterator[Batch]:
        start, self.start = self.start, 0
        for k in range(start, len(self)):
            cols = slice(k * self.seq_len, (k + 1) * self.seq_len)
            self.position = k + 1
            yield _to_long(self.x[:, cols]), _to_long(self.y[:, cols]), k == 0


class RandomWindows(IterableDataset):
    """d2l / nanoGPT-style batches of independent random windows; the model resets its state every batch.

    An epoch has as many batches as TBPTT would, and its windows are drawn from a generator seeded by
    (seed, epoch, rank), so a resumed run draws the same windows it would have drawn.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: Callable[[], int] = lambda: 0,
    ):
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.rank, self.seed, self.epoch = rank, seed, epoch
        self.num_batches = (len(tokens) - 1) // (batch_size * world_size * seq_len)
        self.start, self.position = 0, 0  # as in StreamBatches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        start, self.start = self.start, 0
        rng = np.random.default_rng([self.seed, self.epoch(), self.rank])
        offsets = np.arange(self.seq_len + 1)
        for k in range(self.num_batches):
            starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
            if k < start:  # a resume inside the epoch: draw the skipped windows, so later ones are the same
                continue
            window = np.asarray(self.tokens[starts[:, None] + offsets])  # [B, T+1]
            self.position = k + 1
            yield _to_long(window[:, :-1]), _to_long(window[:, 1:]), True


def _to_long(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.int64))


class CharDataModule(pl.LightningDataModule):
    """Character (or byte) corpus -> (x, y, reset) batches per stage, sharded by rank without a DistributedSampler.

    Evaluation always uses TBPTT streams of ``eval_batch_size`` with the state carried, so that val / test
    numbers cover every token of the split once and do not depend on the training sampler. ``val_chars``
    limits validation during training to the first ``val_chars`` tokens of the val split (a fixed slice, the
    same every time); ``full_val = True`` lifts it, for the full evaluation at the end of a run.

    The corpus is one of: ``path`` (a file, a folder or a glob, cut by ``splits``); ``path`` a folder holding
    the three ``split_files``; or ``train_path``, ``val_path`` and ``test_path``. ``preset`` names a standard
    corpus (``Preset``'s fields), so a missing file gets an error saying where it goes and how to get it.
    """

    def __init__(
        self,
        path: str | None = None,
        preprocess: str = "none",
        splits: Sequence[float] = (0.9, 0.05, 0.05),
        batch_size: int = 32,
        seq_len: int = 64,
        eval_batch_size: int = 16,
        sampling: str = "tbptt",
        unk: str | None = "\ufffd",
        cache_dir: str | None = None,
        seed: int = 0,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        unit: str = "char",
        split_files: Sequence[str] | None = None,
        preset: dict | None = None,
        val_chars: int | None = None,
    ):
        super().__init__()
        self.tokenizing = Tokenizing(unit=unit, preprocess=preprocess, unk=unk)
        self.split_paths = split_paths(path, train_path, val_path, test_path, split_files)
        if preset:
            Preset(**preset).check(path, split_files or ())
        if sampling not in SAMPLING:
            raise UserError(f"data.sampling={sampling!r} is not known; use one of {', '.join(SAMPLING)}.")
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("eval_batch_size", eval_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"data.{name}={value!r} must be a positive integer; set it to 1 or more.")
        if val_chars is not None and (isinstance(val_chars, bool) or not isinstance(val_chars, int) or val_chars < 1):
            raise UserError(f"data.val_chars={val_chars!r} must be a positive integer, or null for the whole split.")
        self.path, self.preprocess, self.splits = path, preprocess, check_splits(splits)
        self.batch_size, self.seq_len, self.eval_batch_size = batch_size, seq_len, eval_batch_size
        self.sampling, self.unk, self.cache_dir, self.seed = sampling, unk, cache_dir, seed
        self.val_chars, self.full_val = val_chars, False
        self._parts: dict[str, np.ndarray] = {}
        self._vocab: Vocab | None = None
        self._train: StreamBatches | RandomWindows | None = None
        self._resume_position = 0

    def _load(self) -> tuple[dict[str, np.ndarray], Vocab]:
        if self._vocab is None:
            options = vars(self.tokenizing)
            if self.split_paths:  # as it comes: data.splits does not apply
                parts, self._vocab = load_split(self.split_paths, self.cache_dir, **options)
                self._parts = dict(zip(STAGES, parts, strict=True))
            else:
                tokens, self._vocab = load_tokens(self.path, self.cache_dir, **options)
                self._parts = split_tokens(tokens, self.splits)
        return self._parts, self._vocab

    @property
    def vocab(self) -> Vocab:
        return self._load()[1]

    @property
    def parts(self) -> dict[str, np.ndarray]:
        """The splits' tokens; the val split cut to ``val_chars`` unless ``full_val``."""
        parts = self._load()[0]
        return parts | {"val": parts["val"][: self.val_chars]} if self.val_is_cut and not self.full_val else parts

    @property
    def val_is_cut(self) -> bool:
        """Whether ``val_chars`` leaves part of the val split out of validation during training."""
        return bool(self.val_chars) and self.val_chars < len(self._load()[0]["val"])

    def check_sizes(self, world_size: int = 1) -> None:
        """Raise a UserError, before any training, if a split cannot fill one batch on every rank."""
        for stage, part in self.parts.items():
            if stage == "test" and self.splits[2] == 0:
                continue
            batch = self.batch_size if stage == "train" else self.eval_batch_size
            need = batch * world_size * self.seq_len + 1
            if len(part) < need:
                name = "batch_size" if stage == "train" else "eval_batch_size"
                tokens = "bytes" if self.tokenizing.unit == "byte" else "characters"
                raise UserError(
                    f"the {stage} split has {len(part):,} {tokens} but data.{name}={batch} x seq_len"
                    f" {self.seq_len} x {world_size} rank(s) needs at least {need:,}; lower data.{name} /"
                    " data.seq_len or use a larger corpus."
                )

    def setup(self, stage: str | None = None) -> None:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.check_sizes(world)
        self.rank, self.world_size = rank, world

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer else 0

    def _loader(self, dataset: IterableDataset) -> DataLoader:
        # batch_size=None: the datasets yield whole batches already. A generator of its own: otherwise every
        # iterator draws its base seed from torch's global RNG, which dropout uses, and a resumed run (which
        # creates iterators at other moments) would see other dropout masks.
        return DataLoader(dataset, batch_size=None, generator=torch.Generator())

    def state_dict(self) -> dict:
        """Where training stands inside the epoch: the batches handed out in the current pass (Lightning does not
        prefetch from a loader of known length, so that is the number trained on), 0 once the epoch (after
        ``limit_train_batches``) is complete. Lightning saves it in every checkpoint.

        Not the stateful-DataLoader protocol: Lightning loads a loader's state only when it builds the loader
        after restoring, but ``configure_optimizers`` (``estimated_stepping_batches``) builds it before."""
        if self._train is None or self.trainer is None:
            return {}
        position = self._train.position
        return {"train_position": position if position < self.trainer.num_training_batches else 0}

    def load_state_dict(self, state: dict) -> None:
        self._resume_position = state.get("train_position", 0)

    def train_dataloader(self) -> DataLoader:
        part = self.parts["train"]
        if self.sampling == "random":
            ds = RandomWindows(part, self.batch_size, self.seq_len, self.rank, self.world_size, self.seed, self._epoch)
        else:
            ds = StreamBatches(part, self.batch_size, self.seq_len, self.rank, self.world_size)
        ds.start, self._resume_position = self._resume_position, 0  # the pass after a resume skips what was done
        self._train = ds
        return self._loader(ds)

    def _eval_loader(self, stage: str) -> DataLoader:
        ds = StreamBatches(
            self.parts[stage], self.eval_batch_size, self.seq_len, self.rank, self.world_size, drop_last=False
        )
        return self._loader(ds)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
