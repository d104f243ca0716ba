"""Corpus -> cached token array -> contiguous splits -> CharDataModule: batches per stage (``charlm.data.batches``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from charlm import UserError
from charlm.checks import choice, whole
from charlm.data.batches import BatchSchedule, RandomWindows, StreamBatches
from charlm.data.cache import load_split, load_tokens
from charlm.data.corpus import Preset, Tokenizing, split_paths
from charlm.data.vocab import Vocab, vocab_from_dict

BatchOrder = Literal["tbptt", "random"]  # TBPTT streams in corpus order | independent random windows
STAGES = ("train", "val", "test")


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


class CharDataModule(pl.LightningDataModule):
    """Character (or byte) corpus -> (x, y, reset) batches per stage, sharded by rank without a DistributedSampler.

    Evaluation always uses TBPTT streams of ``eval_batch_size`` with the state carried, so that val / test
    numbers cover every token of the split once and do not depend on the training sampler. ``val_chars``
    limits validation during training to the first ``val_chars`` tokens of the val split (a fixed slice, the
    same every time); ``full_val = True`` lifts it, for the full evaluation at the end of a run. ``schedule``
    (``charlm.data.batches.BatchSchedule``) gives training batches other shapes early in the run.

    The corpus is one of: ``path`` (a file, a folder or a glob, cut by ``splits``); ``path`` a folder holding
    the three ``split_files``; or ``train_path``, ``val_path`` and ``test_path``. Any of these files may be
    compressed or an archive (``charlm.data.archives``); ``members`` picks an archive's members. ``preset`` names a
    standard corpus (``Preset``'s fields), so a missing file gets an error saying where it goes and how to get it.

    ``base_vocab`` (a saved vocab, known at run time: ``init_from``) makes the vocab that vocab extended by the
    corpus's new characters (``CharVocab.extend``), so its ids keep their meaning for the weights trained on it.
    """

    def __init__(
        self,
        path: str | None = None,
        preprocess: str = "none",
        splits: Sequence[float] = (0.9, 0.05, 0.05),
        batch_size: int = 32,
        seq_len: int = 64,
        eval_batch_size: int = 16,
        batch_order: BatchOrder = "tbptt",
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
        schedule: Sequence[Sequence[int]] | None = None,
        members: str | Sequence[str] | None = None,
        base_vocab: dict | None = None,
    ):
        super().__init__()
        self.tokenizing = Tokenizing(unit=unit, preprocess=preprocess, unk=unk, members=members)
        if preset:
            path = Preset(**preset).check(path, split_files or ())
        self.split_paths = split_paths(path, train_path, val_path, test_path, split_files)
        choice("data.batch_order", batch_order, BatchOrder)
        whole("data.batch_size", batch_size, 1, example=32)
        whole("data.seq_len", seq_len, 1, example=64)
        whole("data.eval_batch_size", eval_batch_size, 1, example=16)
        if val_chars is not None:
            whole("data.val_chars", val_chars, 1, example="500000 (null: the whole split)")
        self.schedule = None if schedule is None else BatchSchedule(schedule, batch_size, seq_len)
        if self.schedule and batch_order == "tbptt":
            for size, width in self.schedule.shapes():
                if size != batch_size or width > seq_len:
                    raise UserError(
                        f"data.schedule asks for batches of {size} x {width}, but TBPTT streams keep"
                        f" data.batch_size={batch_size} (one stream a row) and at most data.seq_len={seq_len}"
                        " columns; vary only seq_len, up to data.seq_len, or use data.batch_order=random."
                    )
        self.path, self.preprocess, self.splits = path, preprocess, check_splits(splits)
        self.batch_size, self.seq_len, self.eval_batch_size = batch_size, seq_len, eval_batch_size
        self.batch_order, self.unk, self.cache_dir, self.seed = batch_order, unk, cache_dir, seed
        self.val_chars, self.full_val = val_chars, False
        self._parts: dict[str, np.ndarray] = {}
        self._vocab: Vocab | None = None
        self.base_vocab = None if base_vocab is None else vocab_from_dict(base_vocab)
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
            if self.base_vocab is not None:
                self._parts, self._vocab = self._in_base_vocab(self._parts, self._vocab)
        return self._parts, self._vocab

    def _in_base_vocab(self, parts: dict[str, np.ndarray], vocab: Vocab) -> tuple[dict[str, np.ndarray], Vocab]:
        """The splits renumbered into ``base_vocab`` extended by ``vocab``, the corpus's own.

        Renumbered here, in memory, rather than cached: the token cache holds the corpus in its own vocab, keyed
        by the corpus and the tokenizing options alone, so one cache serves every run on the corpus whatever it
        starts from. The cost is a copy of the tokens (none when the ids are unchanged: a byte vocab, or a corpus
        whose vocab the base begins with)."""
        base = self.base_vocab
        if base.unit != vocab.unit:
            raise UserError(
                f"the init_from checkpoint was trained on data.unit={base.unit} but this run reads"
                f" data.unit={vocab.unit}; set data.unit={base.unit}."
            )
        if base.unit == "byte":  # every byte is in the vocab already
            return parts, vocab
        extended = base.extend(vocab)
        ids = extended.encode("".join(vocab.chars))  # corpus id -> extended id, in the extended vocab's dtype
        if np.array_equal(ids, np.arange(len(vocab))):
            return parts, extended
        return {stage: ids.take(part) for stage, part in parts.items()}, extended

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
            seq_len = self.seq_len
            if stage == "train" and self.schedule:  # the largest random window fits the split too
                seq_len = max(t for _, t in self.schedule.shapes())
            need = batch * world_size * seq_len + 1
            if len(part) < need:
                name = "batch_size" if stage == "train" else "eval_batch_size"
                tokens = "bytes" if self.tokenizing.unit == "byte" else "characters"
                raise UserError(
                    f"the {stage} split has {len(part):,} {tokens} but data.{name}={batch} x seq_len"
                    f" {seq_len} x {world_size} rank(s) needs at least {need:,}; lower data.{name} /"
                    " data.seq_len (or data.schedule's) or use a larger corpus."
                )

    def setup(self, stage: str | None = None) -> None:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.check_sizes(world)
        self.rank, self.world_size = rank, world

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer else 0

    def _first_step(self) -> int:
        """The run-wide index of this epoch's first training batch: every epoch has the same number of batches."""
        return self._epoch() * self.trainer.num_training_batches if self.trainer else 0

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
        shape = {"schedule": self.schedule, "first_step": self._first_step}
        if self.batch_order == "random":
            layout = (part, self.batch_size, self.seq_len, self.rank, self.world_size)
            ds = RandomWindows(*layout, seed=self.seed, epoch=self._epoch, **shape)
        else:
            ds = StreamBatches(part, self.batch_size, self.seq_len, self.rank, self.world_size, **shape)
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
