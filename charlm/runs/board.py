"""TensorBoard that opens on the learning curves: tag sections in the order a user reads them, no single-point
clutter, and an HPARAMS entry of the settings runs are compared by, whose metrics are the run's own curves.

TensorBoard lists tag sections (the text before the first ``/``) in code-point order and expands the first
ones, so the metric names Lightning sees (``val/bpc``, ``train/loss_step``, ``lr-AdamW``, ...: what checkpoints
monitor and the progress bar shows) are written under numbered sections:

    1_val/{bpc,loss,ppl,full_*}   2_train/{bpc,loss,ppl,loss_step}
    3_optim/{lr-*,grad_norm,chars_per_s,chars_seen,eta_min,...}   4_test/*

The CUSTOM SCALARS tab (``LAYOUT``, written once when the event file is opened) puts train and val on one chart:
bits per character (or byte), and loss with the per-step train loss.

Lightning's TensorBoardLogger has no tag mapping, adds an ``epoch`` scalar to every logging call, and its
``log_hyperparams(params, metrics)`` writes each metric again as a one-point scalar (the ``hp/*`` cards):
this subclass maps the tags, drops ``epoch`` and writes the HPARAMS summaries alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from charlm.data.corpus import corpus_name

# (prefix of the Lightning name, section it is written under, part of the name that the section replaces);
# the first match wins
SECTIONS = (
    ("val/", "1_val/", "val/"),
    ("val_full/", "1_val/full_", "val_full/"),  # the whole val split after training on data.val_chars
    ("train/grad_norm", "3_optim/", "train/"),
    ("train/skipped_steps", "3_optim/", "train/"),
    ("train/chars_per_s", "3_optim/", "train/"),
    ("train/chars_seen", "3_optim/", "train/"),
    ("train/eta_min", "3_optim/", "train/"),
    ("train/", "2_train/", "train/"),
    ("lr-", "3_optim/", ""),
    ("test/", "4_test/", "test/"),
)


# {category: {chart: ["Multiline", [tag regexes]]}}: train next to val (bpb: a byte-level model's bits per byte)
LAYOUT = {
    "train vs val": {
        "bits per character (bpc) or byte (bpb)": ["Multiline", [r"^2_train/bp[cb]$", r"^1_val/bp[cb]$"]],
        "loss (nats)": ["Multiline", [r"^2_train/loss_step$", r"^2_train/loss$", r"^1_val/loss$"]],
    }
}


def board_tag(name: str) -> str:
    """The TensorBoard tag of a logged metric: ``val/bpc`` -> ``1_val/bpc``, ``lr-AdamW`` -> ``3_optim/lr-AdamW``."""
    for prefix, section, replaced in SECTIONS:
        if name.startswith(prefix):
            return section + name[len(replaced) :]
    return name


class CurvesFirstLogger(TensorBoardLogger):
    """A TensorBoardLogger that writes ``board_tag`` names, no ``epoch`` scalar, the custom-scalars ``LAYOUT``,
    and ``log_run`` for HPARAMS."""

    @property
    def experiment(self) -> SummaryWriter:
        opening = self._experiment is None
        writer = super().experiment
        if opening and rank_zero_only.rank == 0:
            writer.add_custom_scalars(LAYOUT)
        return writer

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({board_tag(k): v for k, v in metrics.items() if k != "epoch"}, step)

    @rank_zero_only
    def log_run(self, params: Mapping[str, object]) -> None:
        """The HPARAMS entry: ``params`` (values str, int, float or bool) against the run's curves: the tab reads
        each one's last logged value.

        Only the session summaries are written, not the experiment summary that ``hparams()`` makes: given one,
        TensorBoard takes the first run's as the whole table's and lists its settings by name. Without one it
        builds the table from every run's settings and lists first those whose values differ between runs (its
        first five are the columns shown), then the metrics, whose names sort the val curves first."""
        _, ssi, sei = hparams_summaries(dict(params), {})  # metrics are named in the experiment summary alone
        writer = self.experiment._get_file_writer()
        for summary in (ssi, sei):
            writer.add_summary(summary)
        writer.flush()


def log_hparams(cfg: DictConfig, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Each logger's HPARAMS entry for the finished run: ``curated_hparams`` against its final ``metrics``; for
    ``CurvesFirstLogger`` against the curves themselves."""
    params = curated_hparams(cfg, trainer)
    for logger in trainer.loggers:
        if isinstance(logger, CurvesFirstLogger):
            logger.log_run(params)
        else:
            logger.log_hyperparams(params, metrics)


def curated_hparams(cfg: DictConfig, trainer: pl.Trainer) -> dict[str, object]:
    """What runs are compared by: every model and optimiser setting, the data and trainer settings that change
    results, the seed. No ``_target_``, paths or callback plumbing, and not the run's name, which TensorBoard shows
    as the run's directory (``<name>/<settings>/<stamp>``)."""
    params: dict[str, object] = {
        f"{group}.{k}": v
        for group in ("model", "optim")
        for k, v in OmegaConf.to_container(cfg[group], resolve=True).items()
        if not k.startswith("_")
    }
    data = cfg.data
    params["data.corpus"] = corpus_name(data.path, data.get("train_path"))
    params["data.unit"] = data.get("unit", "char")
    for name in ("preprocess", "batch_size", "seq_len", "eval_batch_size", "batch_order", "splits"):
        params[f"data.{name}"] = OmegaConf.to_container(data[name]) if name == "splits" else data[name]
    t = cfg.trainer
    params |= {f"trainer.{k}": t.get(k) for k in ("max_epochs", "max_steps", "max_time", "gradient_clip_val")}
    params["trainer.precision"] = str(trainer.precision)
    if "recipes" in cfg:  # a budget preset's per-precision recipe (conf/experiment/shakespeare_5min.yaml)
        params["recipe"] = cfg.recipe
    params["trainer.processes"] = trainer.world_size
    params["seed"] = cfg.seed
    params |= {"init_from": cfg.get("init_from"), "freeze": cfg.get("freeze", "none")}  # where the weights started
    return {
        k: "null" if v is None else (str(v) if isinstance(v, list | tuple | dict) else v) for k, v in params.items()
    }
