"""Optimiser and schedule settings (``OptimConfig``), and the LR schedule that resumes exactly (its wall-clock
progress is state)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from charlm import UserError
from charlm.checks import choice, number, options, whole

Optimizer = Literal["sgd", "adam", "adamw"]
Decay = Literal["cosine", "linear", "wsd"]  # annealed per step over the run's steps or wall clock
Scheduler = Literal["none", "step", "plateau", Decay]
_FUSED_DEVICES = ("cpu", "cuda")  # Adam(W) fused kernels in torch 2.13 that charlm runs on


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The optimiser and LR schedule: the one place that lists their settings and defaults (``python train.py``'s,
    the ``optim.*`` settings of the configs).

    Schedules: ``step`` keeps ``lr`` for ``decay_start`` epochs then multiplies it by ``decay_factor`` each
    epoch (Zaremba); ``plateau`` multiplies by ``decay_factor`` after ``plateau_patience`` epochs without a
    better val/loss; ``cosine`` anneals per step to ``min_lr`` over the run (its steps, or its wall clock under
    ``trainer.max_time``, whichever ends it first), ``linear`` the same in a straight line, and ``wsd``
    (warm-up, stable, decay) keeps ``lr`` until the last ``cooldown`` fraction of the run, then decays linearly
    to ``min_lr``; ``none`` keeps ``lr``. ``warmup_steps`` ramps the LR linearly from 0 under all but ``step``
    and ``plateau``. Validated on construction, with one-sentence errors that name the ``optim.*`` setting to
    change: a rate that would train nothing or diverge at once is refused.
    """

    optimizer: Optimizer = "adamw"
    lr: float = 4e-3
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only
    betas: tuple[float, float] = (0.9, 0.999)  # adam / adamw
    scheduler: Scheduler = "cosine"  # step: Zaremba's per-epoch decay
    warmup_steps: int = 20  # linear warm-up (none / cosine / linear / wsd)
    min_lr: float = 0.0  # floor of cosine / linear / wsd
    cooldown: float = 0.2  # wsd: the fraction of the run (after warm-up) that decays
    decay_start: int = 4  # step: epochs at full lr
    decay_factor: float = 0.5  # step / plateau: lr multiplier
    plateau_patience: int = 1

    def __post_init__(self) -> None:
        choice("optim.optimizer", self.optimizer, Optimizer)
        choice("optim.scheduler", self.scheduler, Scheduler)
        lr = number("optim.lr", self.lr, 0, low_open=True, example=0.002)
        if number("optim.min_lr", self.min_lr, 0, example=0) > lr:
            raise UserError(f"optim.min_lr={self.min_lr} must be <= optim.lr={lr}; e.g. optim.min_lr=0.")
        number("optim.weight_decay", self.weight_decay, 0, example=0.01)
        number("optim.momentum", self.momentum, 0, 1, high_open=True, example=0.9)
        number("optim.cooldown", self.cooldown, 0, 1, low_open=True, example=0.2)
        number("optim.decay_factor", self.decay_factor, 0, 1, low_open=True, example=0.5)
        for name in ("warmup_steps", "decay_start", "plateau_patience"):
            whole(f"optim.{name}", getattr(self, name), 0, example=getattr(OptimConfig, name))
        betas = self.betas
        if isinstance(betas, str) or not isinstance(betas, Sequence) or len(betas) != 2:
            raise UserError(f"optim.betas={betas!r} must be two numbers in [0, 1); e.g. optim.betas=[0.9,0.999].")
        for i, beta in enumerate(betas):
            number(f"optim.betas[{i}]", beta, 0, 1, high_open=True, example=OptimConfig.betas[i])
        object.__setattr__(self, "betas", tuple(betas))  # a list from yaml or a checkpoint

    def make_optimizer(self, params: Iterable[torch.nn.Parameter], fused: bool = True) -> torch.optim.Optimizer:
        """The configured optimiser over ``params`` (its schedule: ``make_scheduler``). ``fused=False``
        keeps Adam(W) off torch's fused kernel (see ``fused_kernel_allowed``)."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.AdamW
        params = list(params)
        # torch's fused kernel (one pass over each tensor) where every parameter's device has one: faster than the
        # per-tensor loop, the more so the smaller the model (bench.step_overhead). It rounds like the loop it
        # replaces, not bit for bit; a checkpoint's saved ``fused`` flag wins on load where the kernel is allowed,
        # so a resumed run keeps the kernel it started with.
        fused = fused and bool(params)
        fused = fused and all(p.device.type in _FUSED_DEVICES and p.is_floating_point() for p in params)
        return cls(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay, fused=fused or None)

    def make_scheduler(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: Callable[[], float],
        clock: Callable[[], tuple[float, float]] | None = None,
    ) -> dict | None:
        """The LR schedule over ``optimizer`` as Lightning's ``lr_scheduler`` entry (the scheduler, when it steps,
        what it monitors), or None for a constant LR.

        ``total_steps()``: the run's optimizer steps, asked only by the schedules that anneal over them (Lightning
        builds the training data to count them); ``clock``: seconds elapsed and left under ``trainer.max_time``
        (``WarmupDecayLR``), or None without a time limit."""
        if self.scheduler == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, factor=self.decay_factor, patience=self.plateau_patience
            )
            return {"scheduler": plateau, "monitor": "val/loss"}
        if self.scheduler == "step":
            factor, start = self.decay_factor, self.decay_start
            step = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: factor ** max(0, epoch + 1 - start))
            return {"scheduler": step, "interval": "epoch"}
        if self.scheduler == "none" and not self.warmup_steps:
            return None
        total = total_steps()
        if self.scheduler in options(Decay) and not math.isfinite(total) and clock is None:
            raise UserError(
                f"optim.scheduler={self.scheduler} needs a finite run;"
                " set trainer.max_epochs, trainer.max_steps or trainer.max_time."
            )
        floor = self.min_lr / self.lr
        sched = WarmupDecayLR(optimizer, self.warmup_steps, total, floor, self.scheduler, clock, self.cooldown)
        return {"scheduler": sched, "interval": "step"}


def fused_kernel_allowed(precision: object, clipping: bool, scaler: bool | None = None) -> bool:
    """Whether Adam(W) may run torch's fused kernel in a run at ``precision``.

    The fused kernel unscales gradients inside its step. So under a gradient scaler (``16-mixed`` on a GPU;
    ``scaler=None``: Lightning's own choice for ``precision``) the callbacks before the step would see still-scaled
    gradients, and under mixed precision Lightning refuses to clip for such an optimizer at all. The kernel runs
    in full precision, and in ``bf16-mixed`` without clipping."""
    text = str(precision)
    if scaler is None:
        scaler = text == "16-mixed"
    return not scaler and not (text.endswith("mixed") and clipping)


class WarmupDecayLR(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up over ``warmup_steps``, then ``shape`` (a ``Decay``, or ``none``: constant) from the LR down to
    ``floor`` x LR; ``cooldown``: the fraction of the run in which ``wsd`` decays.

    Progress after warm-up is measured in steps out of ``total_steps`` or, when ``clock`` is given (seconds
    elapsed and remaining under ``trainer.max_time``, from Lightning's Timer, which itself resumes), by the
    wall clock; whichever is further. The clock time at which warm-up ended is part of ``state_dict``, so a
    resumed run continues the same schedule."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        total_steps: float,
        floor: float,
        shape: str,
        clock: Callable[[], tuple[float, float]] | None = None,
        cooldown: float = 0.2,
    ):
        self.warmup_steps, self.total_steps, self.floor, self.shape = warmup_steps, total_steps, floor, shape
        self.cooldown = cooldown
        self.clock = clock
        self.warmup_end_s: float | None = None  # clock reading when warm-up ended
        super().__init__(optimizer)

    def progress(self, step: int) -> float:
        w = self.warmup_steps
        done = (step - w) / max(1, self.total_steps - w) if math.isfinite(self.total_steps) else 0.0
        if self.clock is not None:
            elapsed, remaining = self.clock()
            if self.warmup_end_s is None:
                self.warmup_end_s = elapsed
            budget = elapsed + remaining - self.warmup_end_s
            done = max(done, (elapsed - self.warmup_end_s) / max(budget, 1e-9))
        return min(1.0, done)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.shape not in options(Decay):
            return 1.0
        p = self.progress(step)
        if self.shape == "cosine":
            left = 0.5 * (1 + math.cos(math.pi * p))
        elif self.shape == "linear":
            left = 1 - p
        else:  # wsd: flat, then a straight line over the last `cooldown` of the run
            left = min(1.0, (1 - p) / self.cooldown)
        return self.floor + (1 - self.floor) * left

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "clock")}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the progress (step, warm-up end time); the shape of the schedule comes from this run's config."""
        # "cosine": the flag that checkpoints hold where they have no "shape"
        config = ("warmup_steps", "total_steps", "floor", "shape", "cooldown", "cosine")
        self.__dict__.update({k: v for k, v in state_dict.items() if k not in config})
