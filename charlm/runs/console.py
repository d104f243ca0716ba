"""What a training run shows: one header line before the progress bar, charlm's lines through the ``charlm``
logger, and the libraries' known noise silenced where it starts.

``charlm-train`` shows and keeps these lines through Hydra's job logging (conf/hydra/job_logging/charlm.yaml):
info on stdout, warnings and errors on stderr, all of them in ``<run dir>/train.log``. That config also sets
Lightning's loggers to WARNING, which drops its tips and info lines ("GPU available", "`Trainer(...)` was
configured") and keeps its warnings. Called from Python, ``charlm.cli.train`` shows nothing until the caller
configures logging (``logging.basicConfig(level=logging.INFO)``).
"""

from __future__ import annotations

import logging
import os
import warnings

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.utilities.model_summary import get_human_readable_count
from pytorch_lightning.utilities.warnings import PossibleUserWarning

from charlm.data.corpus import corpus_name
from charlm.data.datamodule import CharDataModule
from charlm.training.module import CharLM

log = logging.getLogger("charlm")

# Warnings that say nothing a charlm user can act on, each matched by its message (and origin where it has one).
KNOWN_WARNINGS = (
    # Our datasets load in the main process and shard themselves by rank, so their __len__ is exact.
    {"message": r".*IterableDataset.*has `__len__` defined"},
    # CharDataModule.state_dict restores the position inside an epoch, which Lightning cannot see.
    {"message": r".*resuming from a checkpoint that ended before the epoch ended"},
    # The epoch metrics come from torchmetrics, whose compute() has all-reduced them across ranks already.
    {
        "message": r"It is recommended to use `self\.log\('(train|val|val_full|test)/",
        "category": PossibleUserWarning,
        "module": r"pytorch_lightning\.trainer\.connectors\.logger_connector\.result",
    },
    # A resume continues in its own run directory, whose checkpoints are its own; a new run into a directory that
    # holds another run's checkpoints is refused before Lightning looks (charlm.runs.dirs).
    {"message": r"Checkpoint directory .* exists and is not empty"},
    # Lightning's own use of a torch API that torch deprecated; nothing in charlm calls it.
    {
        "message": r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "category": FutureWarning,
        "module": r"pytorch_lightning\.utilities\._pytree",
    },
)


def ignore_known_warnings() -> None:
    """Ignore ``KNOWN_WARNINGS``; every other warning still shows."""
    for known in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", **known)


class Below(logging.Filter):
    """Pass the records below ``level``: stdout's handler leaves warnings and errors to stderr's."""

    def __init__(self, level: str = "WARNING"):
        super().__init__()
        self.level = logging.getLevelName(level)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def header(cfg: DictConfig, dm: CharDataModule, model: CharLM, trainer: pl.Trainer) -> str:
    """The one line before the progress bar: what is trained, on what, at which precision, and where to, e.g.
    ``training lstm 2x256 (1.1 M params) on timemachine (vocab 28, 173,390 train chars) | bf16-mixed | outputs/...``.
    """
    net = model.rnn_cfg
    params = get_human_readable_count(sum(p.numel() for p in model.parameters()))
    corpus = corpus_name(cfg.data.get("path"), cfg.data.get("train_path"))
    unit = dm.vocab.unit
    data = f"vocab {len(dm.vocab)}, {len(dm.parts['train']):,} train {unit}s"
    resume = f" | resuming {cfg.ckpt_path}" if cfg.ckpt_path else ""
    return (
        f"training {net.cell} {net.num_layers}x{net.hidden_size} ({params} params) on {corpus} ({data})"
        f" | {trainer.precision} | {shown_path(cfg.paths.output_dir)}{resume}"
    )


def shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies inside it (``outputs/...``), else absolute."""
    relative = os.path.relpath(os.path.abspath(path))
    outside = relative == os.pardir or relative.startswith(os.pardir + os.sep)
    return os.path.abspath(path) if outside else relative
