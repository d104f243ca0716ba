"""Callbacks the tests inject from the command line (+callbacks.NAME._target_=tests.probe.X): they record batches,
kill the run at a chosen step or inside a save, stop it, replace the wall clock with one that advances per step, or
raise a warning no library knows."""

import os
import signal
import sys
import time
import types
import warnings

import numpy as np
import pytorch_lightning as pl
import pytorch_lightning.callbacks.timer

import charlm.training.checkpoint


class RecordBatches(pl.Callback):
    def __init__(self, out: str):
        self.out, self.batches = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0:
            self.batches.append(batch[0].cpu().numpy())

    def on_train_end(self, trainer, pl_module):
        np.save(f"{self.out}/rank{trainer.global_rank}.npy", np.concatenate(self.batches, axis=1))  # [B, L]


class RecordShapes(pl.Callback):
    """(global step, batch size, sequence length) of every training batch, as out/shapes.npy [steps, 3]."""

    def __init__(self, out: str):
        self.out, self.shapes = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.shapes.append((trainer.global_step, *batch[0].shape))

    def on_train_end(self, trainer, pl_module):
        np.save(f"{self.out}/shapes.npy", np.array(self.shapes))


class KillAt(pl.Callback):
    """Send ``signal`` (a name: SIGKILL, SIGTERM, SIGINT) to this process when training reaches ``step``."""

    def __init__(self, step: int, signal: str = "SIGKILL"):
        self.step, self.signal = step, getattr(signal_module, signal)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            _kill(self.signal)


signal_module = signal


def _kill(sig: int) -> None:
    """Signal this process. A SIGKILL never reaches pytest's own process: a resume in the test process gets the
    run's overrides back, this probe among them, and the kill would take the rest of the suite (or an xdist
    worker) down instead of failing the one test. SIGTERM and SIGINT are for the test process too: its handlers
    stop the run there."""
    if sig == signal.SIGKILL and "pytest" in sys.modules:
        raise AssertionError("a SIGKILL probe reached the test process; drop it on resume with ~callbacks.NAME")
    os.kill(os.getpid(), sig)


class KillInSave(pl.Callback):
    """Send ``signal`` (SIGKILL; SIGINT: a Ctrl+C) to this process at ``phase``
    (``charlm.training.checkpoint.SAVE_PHASES``) of the ``nth`` write of ``name``."""

    def __init__(self, phase: str, nth: int = 2, name: str = "last.ckpt", signal: str = "SIGKILL"):
        assert phase in charlm.training.checkpoint.SAVE_PHASES, phase
        self.phase, self.nth, self.name, self.reached = phase, nth, name, 0
        self.signal = getattr(signal_module, signal)

    def _hook(self, phase, path):
        if phase == self.phase and path.name == self.name:
            self.reached += 1
            if self.reached == self.nth:
                _kill(self.signal)

    def setup(self, trainer, pl_module, stage):
        charlm.training.checkpoint.save_phase_hooks.append(self._hook)

    def teardown(self, trainer, pl_module, stage):
        charlm.training.checkpoint.save_phase_hooks.remove(self._hook)


class StepClock(pl.Callback):
    """Lightning's Timer (trainer.max_time) reads ``seconds_per_step`` x optimizer steps instead of the wall clock,
    so a time-budgeted run, its wall-clock cosine schedule and its resume are reproducible."""

    def __init__(self, seconds_per_step: float = 1.0):
        self.seconds_per_step = seconds_per_step

    def setup(self, trainer, pl_module, stage):
        clock = lambda: trainer.global_step * self.seconds_per_step  # noqa: E731
        pytorch_lightning.callbacks.timer.time = types.SimpleNamespace(monotonic=clock)

    def teardown(self, trainer, pl_module, stage):
        pytorch_lightning.callbacks.timer.time = time


class NanGradAt(pl.Callback):
    """Make every gradient of optimizer step ``step`` NaN (the loss stays finite), as a blow-up would."""

    def __init__(self, step: int):
        self.step = step

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                p.grad.fill_(float("nan"))


class RisingScore(pl.Callback):
    """Log ``probe/score`` = the epoch: a monitor that never improves after epoch 0."""

    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.log("probe/score", float(trainer.current_epoch))


class NanLossAt(pl.Callback):
    """Make the logits, and so the loss, of optimizer step ``step`` NaN: the model itself blew up."""

    def __init__(self, step: int):
        self.step, self._hook = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self._hook = pl_module.net.decoder.register_forward_hook(lambda mod, args, out: out * float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class RecordValidations(pl.Callback):
    """Append the global step of every validation (not the sanity check) to ``out``/validations.txt."""

    def __init__(self, out: str):
        self.out = out

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            with open(f"{self.out}/validations.txt", "a") as f:
                f.write(f"{trainer.global_step}\n")


class StopAt(pl.Callback):
    """Stop the run after optimizer step ``step``, as ``max_steps`` or ``max_time`` would, without changing the
    run's limits (which a step- or time-annealed schedule reads): the epoch end hooks save ``last.ckpt`` there."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


class WarnAtStart(pl.Callback):
    """Raise a ``UserWarning`` saying ``message`` when training starts: a warning on nobody's list of known ones."""

    def __init__(self, message: str):
        self.message = message

    def on_train_start(self, trainer, pl_module):
        warnings.warn(self.message, UserWarning, stacklevel=1)
