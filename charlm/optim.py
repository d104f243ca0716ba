"""Optimiser settings checks and the LR schedule that resumes exactly (its wall-clock progress is state)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from charlm import UserError


def check_optim(lr: float, min_lr: float, weight_decay: float, momentum: float, betas) -> None:
    """Refuse learning rates and optimiser settings that would train nothing or diverge at once."""
    if not (math.isfinite(lr) and lr > 0):
        raise UserError(f"model.lr={lr} must be a positive finite number; e.g. model.lr=0.002.")
    if not (math.isfinite(min_lr) and 0 <= min_lr <= lr):
        raise UserError(f"model.min_lr={min_lr} must be in [0, model.lr={lr}]; e.g. model.min_lr=0.")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise UserError(f"model.weight_decay={weight_decay} must be >= 0 and finite; e.g. model.weight_decay=0.01.")
    if not 0 <= momentum < 1:
        raise UserError(f"model.momentum={momentum} must be in [0, 1); e.g. model.momentum=0.9.")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise UserError(f"model.betas={list(betas)} must be two numbers in [0, 1); e.g. model.betas=[0.9,0.999].")


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up over ``warmup_steps``, then (``cosine``) a cosine from the LR down to ``floor`` x LR.

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
        cosine: bool,
        clock: Callable[[], tuple[float, float]] | None = None,
    ):
        self.warmup_steps, self.total_steps, self.floor, self.cosine = warmup_steps, total_steps, floor, cosine
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
        if not self.cosine:
            return 1.0
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * self.progress(step)))

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "clock")}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the progress (step, warm-up end time); the shape of the schedule comes from this run's config."""
        config = ("warmup_steps", "total_steps", "floor", "cosine")
        self.__dict__.update({k: v for k, v in state_dict.items() if k not in config})
