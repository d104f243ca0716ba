"""CharLM: the LightningModule. One shared step for train / val / test, carried TBPTT state, token-weighted
metrics, optimisers and LR schedules. Built from plain hyperparameters, so a checkpoint alone rebuilds it."""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Timer
from torch import nn
from torchmetrics import MeanMetric

from charlm import UserError
from charlm.model import RNNStack, State
from charlm.vocab import CharVocab

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "step", "plateau", "cosine")
STAGES = ("train", "val", "test")


class CharLM(pl.LightningModule):
    """Character language model over ``RNNStack``.

    Batches are ``(x, y, reset)``: when ``reset`` is False the previous batch of the same stage ended exactly
    where this one starts (TBPTT streams), so its final state, detached, is this batch's initial state.

    Schedules: ``step`` keeps ``lr`` for ``decay_start`` epochs then multiplies it by ``decay_factor`` each
    epoch (Zaremba); ``plateau`` multiplies by ``decay_factor`` after ``plateau_patience`` epochs without a
    better val/loss; ``cosine`` anneals per step to ``min_lr`` over the run (its steps, or its wall clock under
    ``trainer.max_time``, whichever ends it first); ``none`` keeps ``lr``. ``warmup_steps``
    ramps the LR linearly from 0 under ``none`` and ``cosine``.
    """

    def __init__(
        self,
        vocab: dict,
        cell: str = "lstm",
        num_layers: int = 2,
        hidden_size: int = 256,
        embedding_size: int | None = None,
        dropout: float = 0.0,
        tie_weights: bool = False,
        init_scale: float | None = None,
        impl: str = "fused",
        locked_dropout: bool = False,
        recurrent_dropout: float = 0.0,
        weight_drop: float = 0.0,
        layer_norm: bool = False,
        optimizer: str = "adamw",
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        scheduler: str = "none",
        warmup_steps: int = 0,
        min_lr: float = 0.0,
        decay_start: int = 4,
        decay_factor: float = 0.5,
        plateau_patience: int = 1,
    ):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise UserError(f"model.optimizer={optimizer!r} is not known; use one of {', '.join(OPTIMIZERS)}.")
        if scheduler not in SCHEDULERS:
            raise UserError(f"model.scheduler={scheduler!r} is not known; use one of {', '.join(SCHEDULERS)}.")
        if lr <= 0:
            raise UserError(f"model.lr={lr} must be positive; e.g. model.lr=0.002.")
        if not 0 < decay_factor <= 1:
            raise UserError(f"model.decay_factor={decay_factor} must be in (0, 1]; e.g. model.decay_factor=0.5.")
        if warmup_steps < 0:
            raise UserError(f"model.warmup_steps={warmup_steps} must be >= 0.")
        # logger=False: train.py logs the whole run config, with final metrics, as the TensorBoard hparams entry.
        self.save_hyperparameters(logger=False)
        self.vocab = CharVocab.from_dict(vocab)
        self.net = RNNStack(
            len(self.vocab), cell, num_layers, hidden_size, embedding_size, dropout, tie_weights, init_scale,
            impl, locked_dropout, recurrent_dropout, weight_drop, layer_norm,
        )  # fmt: skip
        # Token-weighted mean NLL per stage and epoch ("train" itself would clash with nn.Module.train).
        self.nll = nn.ModuleDict({f"{stage}_nll": MeanMetric() for stage in STAGES})
        self._state: dict[str, State | None] = dict.fromkeys(STAGES)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        return self.net(x, state)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor, bool], stage: str) -> torch.Tensor:
        x, y, reset = batch  # [B, T], [B, T], bool
        logits, state = self(x, None if reset else self._state[stage])  # [B, T, V]
        self._state[stage] = state.detach()  # truncate backprop at the batch boundary, keep the values
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))  # mean NLL, nats
        self.nll[f"{stage}_nll"].update(loss.detach(), weight=y.numel())
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        self.log("train/loss_step", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def _log_epoch(self, stage: str) -> None:
        # compute() all-reduces the weighted sums across ranks: exp(total NLL / total tokens), not a mean of ppl.
        loss = self.nll[f"{stage}_nll"].compute()
        self.nll[f"{stage}_nll"].reset()
        self.log_dict(
            {f"{stage}/loss": loss, f"{stage}/ppl": loss.exp(), f"{stage}/bpc": loss / math.log(2)},
            prog_bar=stage == "val",
        )

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            cls = torch.optim.Adam if hp.optimizer == "adam" else torch.optim.AdamW
            opt = cls(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        if hp.scheduler == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, factor=hp.decay_factor, patience=hp.plateau_patience
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val/loss"}}
        if hp.scheduler == "step":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: hp.decay_factor ** max(0, e + 1 - hp.decay_start))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if hp.scheduler == "none" and not hp.warmup_steps:
            return opt
        total = self.trainer.estimated_stepping_batches
        timer = next(
            (c for c in self.trainer.callbacks if isinstance(c, Timer) and c.time_remaining() is not None), None
        )
        if hp.scheduler == "cosine" and not math.isfinite(total) and timer is None:
            raise UserError(
                "model.scheduler=cosine needs a finite run;"
                " set trainer.max_epochs, trainer.max_steps or trainer.max_time."
            )

        warmup_done_at: list[float] = []  # seconds on the clock when warm-up ended

        def run_progress(step: int) -> float:
            """How far the run is after warm-up, 0 -> 1: by steps, or by wall clock under trainer.max_time,
            whichever is further."""
            done = (step - hp.warmup_steps) / max(1, total - hp.warmup_steps) if math.isfinite(total) else 0.0
            if timer is not None:
                elapsed = timer.time_elapsed("train")
                if not warmup_done_at:
                    warmup_done_at.append(elapsed)
                budget = elapsed + timer.time_remaining("train") - warmup_done_at[0]
                done = max(done, (elapsed - warmup_done_at[0]) / max(budget, 1e-9))
            return min(1.0, done)

        def factor(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            if hp.scheduler == "none":
                return 1.0
            floor = hp.min_lr / hp.lr
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * run_progress(step)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", **hparams) -> CharLM:
    """Load a CharLM from ``path`` with ``weights_only=True``: tensors and plain data only, never pickled code.

    ``hparams`` override the saved ones, e.g. ``impl="scratch"``: fused and scratch layers hold the same
    parameters under the same names, so the weights load either way with no conversion."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist; pass the path of a .ckpt written by train.py.")
    try:
        return CharLM.load_from_checkpoint(path, map_location=map_location, weights_only=True, **hparams)
    except pickle.UnpicklingError:
        raise UserError(
            f"checkpoint {str(path)!r} holds objects other than tensors and plain data, so it was refused;"
            " only load checkpoints written by train.py."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, TypeError) as e:
        raise UserError(
            f"checkpoint {str(path)!r} is corrupt or not a charlm checkpoint ({type(e).__name__});"
            " pass a .ckpt written by train.py."
        ) from None
