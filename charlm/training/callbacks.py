"""Only what Lightning lacks: text samples in TensorBoard, a divergence guard, and a checkpoint on preemption."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint, Timer
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.trainer.connectors import signal_connector
from pytorch_lightning.utilities.exceptions import SIGTERMException

from charlm import Diverged
from charlm.checks import choice, number, whole
from charlm.infer.generation import GenerationConfig, sample_text
from charlm.training.module import logs_step_metrics

NonFinitePolicy = Literal["stop", "skip"]  # a non-finite loss or gradient: stop the run | skip the step


class TextSample(pl.Callback):
    """Log ``length`` sampled characters after ``prompt`` as TensorBoard text, on rank 0, after each validation.

    Prompt characters the vocab lacks are skipped, so a preset prompt never stops training. The sampling
    ``settings`` default to ``GenerationConfig``'s, as in ``charlm-generate``; the end-of-run sample uses these.
    """

    def __init__(
        self,
        prompt: str = "The ",
        length: int = 200,
        temperature: float = GenerationConfig.temperature,
        top_k: int = GenerationConfig.top_k,
        top_p: float = GenerationConfig.top_p,
        stop: str | None = GenerationConfig.stop,
        seed: int = 0,
    ):
        self.prompt, self.length, self.seed = prompt, length, seed
        self.settings = GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p, stop=stop)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        generator = torch.Generator(pl_module.device).manual_seed(self.seed)
        text = sample_text(
            pl_module.net,
            pl_module.vocab,
            self.prompt,
            self.length,
            self.settings,
            unknown="skip",
            generator=generator,
        )[0]
        # Indented lines render verbatim in TensorBoard's markdown, keeping the model's line breaks.
        block = "\n".join("    " + line for line in text.split("\n"))
        for logger in loggers:
            logger.experiment.add_text("sample", block, trainer.global_step)


class LastCheckpoint(Checkpoint):
    """``last.ckpt`` is always the latest state: written at every epoch end, when training stops (also inside an
    epoch, by ``max_steps`` or ``max_time``), and inside an epoch every ``every_n_train_steps`` steps and every
    ``every_n_minutes`` of training (0 turns a trigger off).

    Lightning's ModelCheckpoint takes only one of these triggers, and refreshes its ``save_last`` file only when
    it saves a top-k file, so a run whose val loss stopped improving kept a stale ``last.ckpt``. ``clock`` is
    injectable for tests.
    """

    def __init__(
        self,
        dirpath: str,
        filename: str = "last",
        every_n_train_steps: int = 0,
        every_n_minutes: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        whole("callbacks.last_checkpoint.every_n_train_steps", every_n_train_steps, 0, example="0 (off)")
        number("callbacks.last_checkpoint.every_n_minutes", every_n_minutes, 0, example="5 (0: off)")
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.every_n_train_steps, self.every_n_minutes, self.clock = every_n_train_steps, every_n_minutes, clock
        self._last_save_time = 0.0
        self._saved_at: tuple[int, str] | None = None  # (global step, moment) of the last save

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_save_time = self.clock()

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        n = self.every_n_train_steps
        due = bool(n) and trainer.global_step % n == 0
        if self.every_n_minutes:  # rank 0's clock decides, so that every rank saves (saving is collective)
            due |= trainer.strategy.broadcast(self.clock() - self._last_save_time >= 60 * self.every_n_minutes)
        if due:
            self._save(trainer, "step")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, "epoch")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._saved_at != (trainer.global_step, "epoch"):
            self._save(trainer, "end")

    def _save(self, trainer: pl.Trainer, moment: str) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_at, self._last_save_time = (trainer.global_step, moment), self.clock()


class NonFiniteGuard(pl.Callback):
    """Stop a run that diverged: a training step whose loss or gradient norm is not finite (or, with
    ``on_nonfinite=skip``, skip that step), or whose loss exceeds ``loss_limit`` x its starting loss: the larger
    of ln V (a uniform guess over the V tokens) and the run's first loss, as char-rnn stops at 3x its first loss.
    The first loss is state, so a resumed run keeps its reference.

    Runs in ``on_before_optimizer_step``, after backward (and a gradient scaler's unscaling) and before clipping
    and the update, so a stopped run's weights, ``last.ckpt`` and ``best.ckpt`` are all from before the bad step.
    Logs ``train/grad_norm`` (before clipping). A skipped step updates nothing: its gradients are dropped
    (optimisers skip parameters without a gradient, momentum included), the carried TBPTT state restarts, and
    ``train/skipped_steps`` counts it. A non-finite val loss also stops the run, before the checkpoint callbacks
    see it.

    Under a gradient scaler (``16-mixed``), non-finite gradients with a finite loss are an overflow of the scaled
    gradients: the scaler skips that update and lowers its scale, so the run goes on (``train/overflow_steps``
    counts them). Only ``MAX_OVERFLOWS`` in a row, where even a tiny scale overflows, count as divergence.
    """

    MAX_OVERFLOWS = 40  # consecutive overflow steps: the scaler's scale has halved 40 times (2^16 -> 2^-24)

    def __init__(self, policy: NonFinitePolicy = "stop", loss_limit: float | None = 3.0):
        choice("on_nonfinite", policy, NonFinitePolicy)
        if loss_limit is not None:
            number("loss_limit", loss_limit, 1, low_open=True, example="3 (null: off)")
        self.policy, self.loss_limit = policy, loss_limit
        self.skipped = self.overflows = self.overflows_in_a_row = 0
        self.first_loss: float | None = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        loss = float(pl_module.last_train_loss)
        finite_loss, finite_norm = math.isfinite(loss), math.isfinite(float(norm))
        if self.first_loss is None and finite_loss:
            self.first_loss = loss
        start = max(math.log(max(2, len(pl_module.vocab))), self.first_loss or 0.0)
        bound = self.loss_limit * start if self.loss_limit else math.inf
        # every rank takes the same branch
        too_high = trainer.strategy.reduce_boolean_decision(finite_loss and loss > bound, all=False)
        bad = trainer.strategy.reduce_boolean_decision(not (finite_loss and finite_norm), all=False)
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        overflow = scaled and bad and trainer.strategy.reduce_boolean_decision(finite_loss, all=True)
        if logs_step_metrics(trainer):
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        step = trainer.global_step
        if too_high:
            raise Diverged(
                f"training diverged at step {step}: loss {loss:.4g} nats is over loss_limit={self.loss_limit:g} x"
                f" the starting loss {start:.3g}; {_kept(trainer)}: lower optim.lr or keep trainer.gradient_clip_val."
            )
        if overflow:
            self.overflows += 1
            self.overflows_in_a_row += 1
            pl_module.log("train/overflow_steps", float(self.overflows), on_step=True, on_epoch=False)
            if self.overflows_in_a_row < self.MAX_OVERFLOWS:
                return  # the scaler skips this update and lowers its scale
            raise Diverged(
                f"training diverged at step {step}: the scaled gradients overflowed {self.overflows_in_a_row} steps"
                f" in a row; {_kept(trainer)}: lower optim.lr or train in bf16-mixed or 32-true."
            )
        self.overflows_in_a_row = 0
        if not bad:
            return
        if self.policy == "stop":
            raise Diverged(
                f"training diverged at step {step} (loss {loss:.4g}, gradient norm {float(norm):.4g});"
                f" {_kept(trainer)}: lower optim.lr, keep trainer.gradient_clip_val, or pass on_nonfinite=skip."
            )
        self.skipped += 1
        for p in pl_module.parameters():
            p.grad = None
        pl_module.reset_train_state()
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if trainer.sanity_checking or loss is None or math.isfinite(float(loss)):
            return
        raise Diverged(
            f"val/loss is {float(loss)} at step {trainer.global_step}; {_kept(trainer)}: lower optim.lr or keep"
            " trainer.gradient_clip_val."
        )

    def state_dict(self) -> dict:
        counts = {"skipped": self.skipped, "overflows": self.overflows, "overflows_in_a_row": self.overflows_in_a_row}
        return counts | {"first_loss": self.first_loss}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = state_dict["skipped"]
        self.overflows = state_dict.get("overflows", 0)  # absent from older checkpoints
        self.overflows_in_a_row = state_dict.get("overflows_in_a_row", 0)
        self.first_loss = state_dict.get("first_loss")


def _kept(trainer: pl.Trainer) -> str:
    """What the user still has after a divergence: the checkpoints written so far (from before the bad step)."""
    written = []
    for cb in trainer.checkpoint_callbacks:
        path = cb.path if isinstance(cb, LastCheckpoint) else getattr(cb, "best_model_path", "")
        if path and Path(path).is_file():
            written.append(Path(path).name)
    if not written:
        return "no checkpoint was written yet"
    return f"{' and '.join(sorted(set(written)))} keep the last good state"


def _not_sigterm_notice(record: logging.LogRecord) -> bool:
    return "Received SIGTERM" not in record.getMessage()


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM or the first Ctrl+C, finish the current step, write a resumable ``last.ckpt``, and stop.

    Lightning turns SIGTERM into a ``SIGTERMException`` at the next step boundary; SIGINT is routed to the same
    path here (a second Ctrl+C interrupts at once). Lightning's signal connector logs "Received SIGTERM" for both,
    so that line is filtered out while fitting: the stop line ``charlm-train`` prints names the real signal.

    Not Lightning's ``OnExceptionCheckpoint``: that one saves for every error (whose state may be half-updated),
    deletes its file at teardown, and makes every later ``fit(ckpt_path=None)`` resume silently from its file, so a
    run with ``overwrite_run_dir=true`` would not start afresh.
    """

    def __init__(self, dirpath: str, filename: str = "last"):
        self.ckpt_path = str(Path(dirpath) / f"{filename}.ckpt")
        self._previous_sigint = None
        self.signal = "SIGTERM"  # what stopped the run, for its exit code
        self.at_once = False  # a second Ctrl+C came

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._previous_sigint = signal.signal(signal.SIGINT, self._sigint)  # on every rank: Ctrl+C reaches all
        logging.getLogger(signal_connector.__name__).addFilter(_not_sigterm_notice)

    def _sigint(self, signum, frame) -> None:
        self.signal = "SIGINT"
        signal.signal(signal.SIGINT, self._sigint_again)
        os.kill(os.getpid(), signal.SIGTERM)

    def _sigint_again(self, signum, frame) -> None:
        """A second Ctrl+C: stop at once, wherever the run is (a save in flight leaves the previous file whole);
        ``charlm-train`` reports it as one line (``Interrupted``), Lightning's exit after a KeyboardInterrupt
        included."""
        self.at_once = True
        raise KeyboardInterrupt

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)
        self.teardown(trainer, pl_module, "fit")  # Lightning skips callbacks' teardown after an exception

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        logging.getLogger(signal_connector.__name__).removeFilter(_not_sigterm_notice)
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None


class Throughput(pl.Callback):
    """Training speed in characters per second (all ranks together) and the time left, in the progress bar and
    TensorBoard (``train/chars_per_s``, ``train/eta_min``), over the last ``window`` optimizer steps; and the
    characters trained on since the run began (``train/chars_seen``, all ranks together: an x axis on which runs
    with other batch shapes compare fairly).

    Lightning's ThroughputMonitor logs items per second to the loggers only, not to the progress bar, and knows
    no time left; tqdm's own estimate covers the current epoch only. The time left is the smaller of what the
    step limit (``max_epochs`` / ``max_steps``: Lightning's estimate of the run's steps) and ``max_time`` leave.
    Validation time counts, as it does for the user waiting. Updated on the steps Lightning logs
    (``logs_step_metrics``). The count of characters is saved in checkpoints, so a resumed run goes on counting;
    one resumed from a checkpoint without it counts the earlier batches at the shape of its first batch.
    ``clock`` is injectable for tests."""

    def __init__(self, window: int = 50, clock: Callable[[], float] = time.monotonic):
        whole("callbacks.throughput.window", window, 1, example=50)
        self.window, self.clock = window, clock
        self._marks: list[tuple[float, int]] = []  # (time, characters trained by this process) at each step
        self._seen: int | None = None  # characters trained on since the run began; None: not known yet

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._marks, self._chars = [(self.clock(), 0)], 0
        if trainer.global_step == 0:
            self._seen = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        chars = batch[1].numel() * trainer.world_size  # y [B, T] on every rank
        if self._seen is None:  # resumed from a checkpoint without the count: the batches before, at this shape
            self._seen = trainer.fit_loop.epoch_loop.batch_progress.total.completed * chars
        self._seen += chars
        self._chars += chars
        self._marks = [*self._marks[-self.window :], (self.clock(), self._chars)]
        (t0, c0), (t1, c1) = self._marks[0], self._marks[-1]
        if logs_step_metrics(trainer):
            pl_module.log("train/chars_seen", float(self._seen), on_step=True, on_epoch=False, rank_zero_only=True)
        if t1 <= t0 or not logs_step_metrics(trainer):
            return
        steps_per_s = (len(self._marks) - 1) / (t1 - t0)
        left = [(trainer.estimated_stepping_batches - trainer.global_step) / steps_per_s]
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if timer is not None and timer.time_remaining("train") is not None:
            left.append(timer.time_remaining("train"))
        finite = [s for s in left if math.isfinite(s)]
        metrics = {"train/chars_per_s": (c1 - c0) / (t1 - t0)}
        if finite:
            metrics["train/eta_min"] = max(0.0, min(finite)) / 60
        pl_module.log_dict(metrics, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)

    def state_dict(self) -> dict:
        return {"chars_seen": self._seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self._seen = state_dict["chars_seen"]


ProgressWhen = Literal["auto", "always", "never"]  # auto: when there is no progress bar to watch


class ProgressLog(pl.Callback):
    """A plain progress line in the log (stdout and ``train.log``) every ``every_n_steps`` optimizer steps and every
    ``every_s`` seconds of training (0 turns a trigger off), for runs nobody watches on a terminal (``> log``,
    nohup, a SLURM job): epoch, step, train loss, the last val loss, chars/s and the time left (``Throughput``'s).
    ``when=auto`` writes it where the progress bar is off or stdout is not a terminal. ``clock`` is injectable for
    tests."""

    def __init__(
        self,
        every_s: float = 30.0,
        every_n_steps: int = 0,
        when: ProgressWhen = "auto",
        clock: Callable[[], float] = time.monotonic,
    ):
        number("callbacks.progress_log.every_s", every_s, 0, example="30 (0: off)")
        whole("callbacks.progress_log.every_n_steps", every_n_steps, 0, example="0 (off)")
        choice("callbacks.progress_log.when", when, ProgressWhen)
        self.every_s, self.every_n_steps, self.when, self.clock = every_s, every_n_steps, when, clock
        self.active, self._last = False, 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        no_bar = trainer.progress_bar_callback is None or not sys.stdout.isatty()
        self.active = trainer.is_global_zero and (self.when == "always" or (self.when == "auto" and no_bar))
        self._last = self.clock()

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if not self.active:
            return
        step, now = trainer.global_step, self.clock()
        due = bool(self.every_n_steps) and step % self.every_n_steps == 0
        due |= bool(self.every_s) and now - self._last >= self.every_s
        if due:
            self._last = now
            logging.getLogger("charlm").info(progress_line(trainer))


def progress_line(trainer: pl.Trainer) -> str:
    """``epoch 1 | step 120/840 | train loss 1.8421 | val loss 1.9013 | 12,345 chars/s | ETA 3.2 min``; ``-`` for
    what is not known yet."""
    m = trainer.callback_metrics

    def shown(key: str, form: str) -> str:
        return format(float(m[key]), form) if key in m else "-"

    total = trainer.estimated_stepping_batches
    steps = f"{trainer.global_step}/{total}" if math.isfinite(total) else str(trainer.global_step)
    return (
        f"epoch {trainer.current_epoch} | step {steps} | train loss {shown('train/loss_step', '.4f')}"
        f" | val loss {shown('val/loss', '.4f')} | {shown('train/chars_per_s', ',.0f')} chars/s"
        f" | ETA {shown('train/eta_min', '.1f')} min"
    )
