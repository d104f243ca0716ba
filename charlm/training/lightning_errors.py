"""Lightning's and torch's own errors for a setting the user gave, as one ``UserError`` line naming the setting.

charlm does not re-check what Lightning checks (``trainer.precision``, ``trainer.limit_*``, ``trainer.devices``,
``trainer.val_check_interval`` against the epoch, an accelerator whose package is missing): where the Trainer is
built and where it fits (``charlm.config.build``, ``charlm.cli.train``), ``settings_refused`` catches the
exception types Lightning raises for a bad argument and names the ``trainer.*`` setting its message names. Only
errors raised inside Lightning's own code are translated, so a bug of charlm's still shows its traceback. A model
or a batch too large to allocate is translated wherever it fails: the size asked, the memory available, the
settings that set it.
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException

from charlm import UserError, user_error_in

Stage = Literal["model", "trainer", "fit"]  # building the model | building the Trainer | fit, validate, test

LIGHTNING = ("pytorch_lightning", "lightning_fabric")  # the packages whose errors are translated
REFUSALS = (MisconfigurationException, ValueError, TypeError, ImportError)  # what Lightning raises for an argument

# The fix for the settings Lightning refuses most; any other: change it, or leave it out for its default.
FIXES = {
    "precision": "pass trainer.precision=32-true, bf16-mixed or 16-mixed, or leave it out for the machine's default",
    "accelerator": "pass trainer.accelerator=cpu, gpu or auto, or install the package it names",
    "strategy": "pass trainer.strategy=auto or ddp, or install the package it names",
    "devices": "pass trainer.devices=1 (or N, or -1 for all)",
    "val_check_interval": "pass at most the epoch's number of batches, or a fraction of the epoch such as 0.5",
    "limit_train_batches": "pass a fraction in [0, 1] or a whole number of batches",
    "limit_val_batches": "pass a fraction in [0, 1] or a whole number of batches (0: no validation)",
    "limit_test_batches": "pass a fraction in [0, 1] or a whole number of batches",
}

# Which settings size the memory a stage allocates: the model's weights; the activations of a batch too.
SIZED_BY = {
    "model": ("model.hidden_size", "model.num_layers"),
    "trainer": ("model.hidden_size", "model.num_layers"),
    "fit": ("model.hidden_size", "model.num_layers", "data.batch_size", "data.seq_len"),
}


@contextmanager
def settings_refused(cfg: Mapping, stage: Stage) -> Iterator[None]:
    """Raise the UserError that ``refused`` makes of an error inside this block, from it; other errors (and a
    UserError, also one that Hydra's instantiate wrapped) go on as they are."""
    try:
        yield
    except Exception as e:
        error = None if user_error_in(e) is not None else refused(e, cfg, stage)
        if error is None:
            raise
        raise error from e


def refused(error: BaseException, cfg: Mapping, stage: Stage) -> UserError | None:
    """The UserError for ``error`` (or the error that Hydra's instantiate wrapped in it), or None where it is none
    of a setting's: a failed allocation, or an error of Lightning's naming a ``trainer.*`` setting."""
    cause = error.__cause__ if type(error).__name__ == "InstantiationException" and error.__cause__ else error
    asked = allocation(cause)
    if asked is not None:
        return _out_of_memory(asked, cfg, stage)
    if not isinstance(cause, REFUSALS):
        return None
    trainer = cfg.get("trainer") or {}
    unknown = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
    if stage == "trainer" and isinstance(cause, TypeError) and unknown:
        return UserError(
            f"trainer.{unknown[1]} is not an argument of Lightning's Trainer; check its spelling, or drop it."
        )
    if not _raised_in_lightning(cause):
        return None
    key = _named_setting(str(cause), trainer, cause)
    if key is None:
        return None
    reason = str(cause).strip().replace("`", "").split(". ")[0].rstrip(".")
    reason = reason if len(reason) <= 200 else reason[:197] + "..."
    fix = FIXES.get(key, f"change trainer.{key}, or leave it out for its default")
    return UserError(f"trainer.{key}={trainer.get(key)!r} is refused by Lightning ({reason}); {fix}.")


def allocation(error: BaseException) -> int | None:
    """The bytes a failed allocation asked for (0 where the message does not say), or None for other errors."""
    text = str(error)
    if isinstance(error, torch.OutOfMemoryError):  # CUDA: "Tried to allocate 20.00 GiB"
        found = re.search(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB)", text)
        units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
        return int(float(found[1]) * units[found[2]]) if found else 0
    if isinstance(error, RuntimeError) and "can't allocate memory" in text:  # DefaultCPUAllocator
        found = re.search(r"allocate (\d+) bytes", text)
        return int(found[1]) if found else 0
    if isinstance(error, MemoryError):
        return 0
    return None


def available_memory(device: str = "cpu") -> int | None:
    """Bytes of memory free on ``device`` now (CUDA: the current GPU's), or None where the system does not say."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # the loop returns at PiB


def _out_of_memory(asked: int, cfg: Mapping, stage: Stage) -> UserError:
    device = "cuda" if str((cfg.get("trainer") or {}).get("accelerator")) in ("gpu", "cuda") else "cpu"
    free = available_memory(device)
    what = f"{human_bytes(asked)} of memory" if asked else "more memory than there is"
    kind = "GPU memory" if device == "cuda" else "memory"
    have = f"{human_bytes(free)} of {kind} is available" if free is not None else f"the {kind} available is not known"
    settings = []
    for name in SIZED_BY[stage]:
        group, key = name.split(".")
        value = (cfg.get(group) or {}).get(key)
        if value is not None:
            settings.append(f"{name}={value}")
    where = "the model's weights" if stage in ("model", "trainer") else "training"
    return UserError(f"{where} asked for {what} but {have}; lower {' or '.join(settings)}.")


def _raised_in_lightning(error: BaseException) -> bool:
    """The innermost frame of ``error`` is Lightning's own code (not charlm's, nor a user's callback)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and any(f"{os.sep}{package}{os.sep}" in frames[-1].filename for package in LIGHTNING)


def _named_setting(message: str, trainer: Mapping, error: BaseException) -> str | None:
    """The Trainer argument a message of Lightning's names first (``val_check_interval`` before the
    ``check_val_every_n_epoch`` its advice names); a package it needs: the accelerator, strategy or precision
    whose code asked for it."""
    lower = message.lower()
    found = [(m.start(), key) for key in trainer for m in [re.search(rf"\b{re.escape(key.lower())}\b", lower)] if m]
    if found:
        return min(found)[1]
    if isinstance(error, ImportError):
        innermost = traceback.extract_tb(error.__traceback__)[-1].filename
        for folder, key in (("accelerators", "accelerator"), ("strategies", "strategy"), ("precision", "precision")):
            if f"{os.sep}{folder}{os.sep}" in innermost or f"{os.sep}{folder}." in innermost:
                return key
        return "accelerator"
    return None
