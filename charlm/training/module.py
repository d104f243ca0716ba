"""CharLM: the LightningModule. One shared step for train / val / test, carried TBPTT state, token-weighted
metrics; the optimiser and LR schedule that ``OptimConfig`` makes. Built from plain hyperparameters, so a
checkpoint alone rebuilds it."""

from __future__ import annotations

import io
import math
from dataclasses import asdict, fields
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Timer
from torch import nn
from torchmetrics import MeanMetric

from charlm import UserError, __version__
from charlm.data.datamodule import STAGES
from charlm.data.vocab import vocab_from_dict
from charlm.nn.rnn import RNNConfig, RNNStack, State
from charlm.training.checkpoint import (
    FORMAT,
    gather_objects,
    migrate,
    read_checkpoint,
    reopen_cut_epoch,
    rescale_lr,
    rng_states,
    set_rng_states,
)
from charlm.training.finetune import freeze_parts, parse_freeze
from charlm.training.optim import OptimConfig, fused_kernel_allowed
from charlm.training.resume import check_resumable


def logs_step_metrics(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes per-step metrics to the loggers after this training batch (every
    ``trainer.log_every_n_steps`` steps, and the last).

    Per-step ``self.log`` calls are made only then: each costs Python time in Lightning's result collection
    whether or not it is written, a visible share of a small model's step on a CPU (bench.step_overhead), and the
    values of the other steps would be dropped anyway. The progress bar keeps the last logged value. Lightning has
    no public switch for this; its own test is ``_logger_connector.should_update_logs``."""
    connector = getattr(trainer, "_logger_connector", None)
    return connector is None or bool(connector.should_update_logs or trainer.fast_dev_run)


def split_hparams(hparams: dict) -> tuple[RNNConfig, OptimConfig]:
    """Flat settings (``model.*`` and ``optim.*`` of the configs) -> the network's and the optimiser's configs
    (each validates itself)."""
    names = {cls: {f.name for f in fields(cls)} for cls in (RNNConfig, OptimConfig)}
    unknown = sorted(set(hparams) - names[RNNConfig] - names[OptimConfig])
    if unknown:
        known = ", ".join(sorted(names[RNNConfig] | names[OptimConfig]))
        raise UserError(f"model.{unknown[0]} is not a model setting; use one of {known}.")
    rnn, optim = ({k: v for k, v in hparams.items() if k in names[cls]} for cls in (RNNConfig, OptimConfig))
    return RNNConfig(**rnn), OptimConfig(**optim)


class CharLM(pl.LightningModule):
    """Character language model over ``RNNStack``: ``CharLM(vocab, **settings)``.

    ``settings`` are the fields of ``RNNConfig`` (the network: ``model.*`` in the configs) and ``OptimConfig``
    (optimiser and schedule: ``optim.*``), flat; the rest keep those classes' defaults, so ``CharLM(vocab)`` is
    the model that ``python train.py`` trains. The hyperparameters are saved as plain data (one flat dict with
    every setting, the layout every charlm checkpoint has), so a checkpoint alone rebuilds the model, with
    ``weights_only=True``.

    ``init_from`` records the checkpoint a run started from (``charlm.training.finetune``), and ``freeze`` what of its
    weights training keeps as they are (``parse_freeze``); both are saved with the hyperparameters, so a resume
    freezes the same parts.

    Batches are ``(x, y, reset)``: when ``reset`` is False the previous batch of the same stage ended exactly
    where this one starts (TBPTT streams), so its final state, detached, is this batch's initial state.
    """

    def __init__(self, vocab: dict, init_from: str | None = None, freeze: str = "none", **settings):
        super().__init__()
        self.rnn_cfg, self.optim_cfg = split_hparams(settings)
        self.freeze = parse_freeze(freeze)
        hparams = {"vocab": vocab, **asdict(self.rnn_cfg), **asdict(self.optim_cfg)}
        hparams |= {"init_from": init_from, "freeze": str(self.freeze)}
        hparams["betas"] = list(self.optim_cfg.betas)  # the layout of checkpoints before OptimConfig
        # logger=False: train.py logs the whole run config, with final metrics, as the TensorBoard hparams entry.
        self.save_hyperparameters(hparams, logger=False)
        self.vocab = vocab_from_dict(vocab)
        self.net = RNNStack(len(self.vocab), self.rnn_cfg)
        freeze_parts(self.net, self.freeze)
        # Token-weighted mean NLL per stage and epoch ("train" itself would clash with nn.Module.train).
        # A NaN loss must make the epoch mean NaN; torchmetrics' default drops it silently. nan_strategy=nan
        # "imputes" NaN with NaN; "disable" would also do, but torchmetrics 1.9 then ignores the weights.
        self.nll = nn.ModuleDict({f"{stage}_nll": MeanMetric(nan_strategy=math.nan) for stage in STAGES})
        self._state: dict[str, State | None] = dict.fromkeys(STAGES)
        self.last_train_loss = torch.zeros(())  # read by NonFiniteGuard before each optimiser step
        self._resume: dict | None = None  # this rank's saved TBPTT state and RNG states, until training restarts
        self.val_name = "val"  # what validation logs as: val, or val_full for the full evaluation after training

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        return self.net(x, state)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor, bool], stage: str) -> torch.Tensor:
        x, y, reset = batch  # [B, T], [B, T], bool
        logits, state = self(x, None if reset else self._state[stage])  # [B, T, V]
        self._state[stage] = state.detach()  # truncate backprop at the batch boundary, keep the values
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))  # mean NLL, nats
        if stage != "train" or torch.isfinite(loss):  # a non-finite train step stops the run or is skipped
            self.nll[f"{stage}_nll"].update(loss.detach(), weight=y.numel())
        return loss

    def reset_train_state(self) -> None:
        """Drop the carried TBPTT state, e.g. after a skipped non-finite step."""
        self._state["train"] = None

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        self.last_train_loss = loss.detach()
        if logs_step_metrics(self.trainer):
            self.log("train/loss_step", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def _log_epoch(self, stage: str) -> None:
        # compute() all-reduces the weighted sums across ranks: exp(total NLL / total tokens), not a mean of ppl.
        loss = self.nll[f"{stage}_nll"].compute()
        if stage != "train":  # train's sums live until the next epoch starts (on_train_epoch_start)
            self.nll[f"{stage}_nll"].reset()
        name, bits = self.val_name if stage == "val" else stage, self.vocab.bits  # bits: bpc, or bpb for bytes
        self.log_dict(
            {f"{name}/loss": loss, f"{name}/ppl": loss.exp(), f"{name}/{bits}": loss / math.log(2)},
            prog_bar=name == "val",
        )

    def on_train_epoch_start(self) -> None:
        # Reset here, not when the epoch's loss is logged: the last.ckpt of an epoch that a stop cut short is written
        # after that (reopen_cut_epoch), and its resume must go on summing the same epoch.
        self.nll["train_nll"].reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self):
        trainable = (p for p in self.parameters() if p.requires_grad)  # frozen ones never change, not even by decay
        opt = self.optim_cfg.make_optimizer(trainable, fused=self._fused_allowed())
        trainer = self.trainer
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer) and c.time_remaining() is not None), None)
        clock = None if timer is None else lambda: (timer.time_elapsed("train"), timer.time_remaining("train"))
        sched = self.optim_cfg.make_scheduler(opt, lambda: trainer.estimated_stepping_batches, clock)
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}

    def _fused_allowed(self) -> bool:
        """``fused_kernel_allowed`` for this run's precision plugin and clipping."""
        trainer = self.trainer
        scaler = getattr(trainer.precision_plugin, "scaler", None) is not None
        return fused_kernel_allowed(trainer.precision, bool(trainer.gradient_clip_val), scaler)

    # ---- exact resume: what the next step depends on beyond Lightning's own checkpoint state ----

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record, for every rank, the carried TBPTT state, the RNG states and the partial epoch's train-loss sums;
        an epoch cut short by a stop is recorded as unfinished (``reopen_cut_epoch``).

        Lightning writes rank 0's checkpoint only, so the ranks' parts are gathered here (every rank runs this
        hook: saving is collective)."""
        metric = self.nll["train_nll"]
        mine = {
            "tbptt_state": None if self._state["train"] is None else self._state["train"].detach().cpu(),
            "rng": rng_states(),
            "train_nll": {name: getattr(metric, name).detach().cpu() for name in metric._defaults},
        }
        checkpoint["charlm"] = {"format": FORMAT, "version": __version__, "ranks": gather_objects(mine)}
        if self._trainer is not None and "loops" in checkpoint:
            reopen_cut_epoch(self.trainer, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        ranks = migrate(checkpoint, "the checkpoint")["charlm"]["ranks"]
        self._resume = None
        if self._trainer is None:
            return
        rescale_lr(checkpoint, self.hparams.lr / checkpoint["hyper_parameters"].get("lr", self.hparams.lr))
        if not self._fused_allowed():  # e.g. a 32-true checkpoint resumed in bf16-mixed with clipping
            for opt in checkpoint.get("optimizer_states", []):
                for group in opt["param_groups"]:
                    if group.get("fused"):
                        group["fused"] = None
        if not ranks:
            return
        world = self.trainer.world_size
        if len(ranks) != world:
            raise UserError(
                f"the checkpoint was written by a run with {len(ranks)} process(es) but this run has {world}; resume"
                f" with the same trainer.devices x trainer.num_nodes ({len(ranks)}), since each process owns its"
                " own TBPTT streams."
            )
        self._resume = ranks[self.trainer.global_rank]

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Right before the first step after a resume, restore this rank's RNG states, carried state and sums.

        Not earlier: sanity-check validation and the dataloaders run in between, as they do not in an
        uninterrupted run."""
        if self._resume is None:
            return
        saved, self._resume = self._resume, None
        set_rng_states(saved["rng"])
        if self.trainer.fit_loop.epoch_loop.batch_progress.current.completed > 0:  # resumed inside an epoch
            state = saved["tbptt_state"]
            self._state["train"] = None if state is None else state.to(self.device)
            metric = self.nll["train_nll"]
            for name, value in saved["train_nll"].items():
                setattr(metric, name, value.to(self.device))


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", resume: bool = False, **hparams
) -> CharLM:
    """Load a CharLM from ``path``, checked as ``read_checkpoint`` does; refuse non-finite weights, and for a
    ``resume`` a checkpoint the resume contract says no run can resume from (``check_resumable``).

    ``hparams`` override the saved ones, e.g. ``impl="scratch"``: fused and scratch layers hold the same
    parameters under the same names, so the weights load either way with no conversion."""
    checkpoint, data = read_checkpoint(path, map_location)
    if resume:
        check_resumable(checkpoint, path)
    if not all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point()):
        raise UserError(
            f"checkpoint {str(path)!r} holds non-finite weights (its run diverged); use an earlier checkpoint,"
            " e.g. best.ckpt."
        )
    try:
        return CharLM.load_from_checkpoint(io.BytesIO(data), map_location=map_location, weights_only=True, **hparams)
    except (RuntimeError, KeyError, TypeError) as e:
        raise UserError(
            f"checkpoint {str(path)!r} is corrupt or not a charlm checkpoint ({type(e).__name__});"
            " pass a .ckpt written by train.py."
        ) from None
