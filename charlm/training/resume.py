"""The resume contract: every piece of state the next training step depends on, where a checkpoint keeps it, and
which function writes and reads it.

A resumed run is exact (the same losses and weights as the run that was never stopped) when everything the next
step reads is either in ``CARRIED`` or a pure function of the step (``DERIVED``). ``NOT_CARRIED`` lists what a
resume deliberately starts afresh. Where a checkpoint is written: ``charlm.training.callbacks.LastCheckpoint``
(every epoch, every N steps or minutes, at a stop), ``PreemptionCheckpoint`` (SIGTERM, Ctrl+C),
``charlm.runs.slurm.SlurmRequeue``; ``charlm.training.checkpoint.AtomicCheckpointIO`` writes it. What the settings
contribute is not state: a resume takes them from its own config, and ``charlm.config.check_resume`` refuses
another vocab or architecture.

``key`` is a path into the checkpoint dict, dots between levels: ``*`` stands for every item of a list (the
optimisers, the ranks) and a part ending in ``*`` for every key with that prefix. ``saved_by`` and
``restored_by`` name functions by their import path (tests resolve them); Lightning's own go through
``_CheckpointConnector.dump_checkpoint`` and its ``restore_*`` methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from charlm import UserError

_LIGHTNING = "pytorch_lightning.trainer.connectors.checkpoint_connector._CheckpointConnector"


@dataclass(frozen=True)
class Piece:
    """One piece of carried state. ``shows``: the setting under which losing it changes the run. ``everywhere``:
    every checkpoint a run can resume from holds it (``check_resumable``)."""

    name: str
    key: str
    saved_by: str
    restored_by: str
    shows: str
    everywhere: bool = False


CARRIED: tuple[Piece, ...] = (
    Piece(
        "weights",
        "state_dict",
        f"{_LIGHTNING}.dump_checkpoint",
        f"{_LIGHTNING}.restore_model",
        "always",
        everywhere=True,
    ),
    Piece(
        "optimizer moments and step counts",
        "optimizer_states.*.state",
        "torch.optim.Optimizer.state_dict",
        "torch.optim.Optimizer.load_state_dict",
        "Adam(W), SGD with momentum",
        everywhere=True,
    ),
    Piece(
        "fused-kernel flag",
        "optimizer_states.*.param_groups.*.fused",
        "torch.optim.Optimizer.state_dict",  # set by charlm.training.optim.OptimConfig.make_optimizer
        "charlm.training.module.CharLM.on_load_checkpoint",  # keeps it where fused_kernel_allowed, else clears it
        "Adam(W) in 32-true, or bf16-mixed without clipping: the fused kernel rounds unlike the loop",
    ),
    Piece(
        "LR schedule position",
        "lr_schedulers",
        "charlm.training.optim.WarmupDecayLR.state_dict",
        "charlm.training.optim.WarmupDecayLR.load_state_dict",
        "any schedule (warm-up, decay)",
        everywhere=True,
    ),
    Piece(
        "wall-clock schedule anchor",
        "lr_schedulers.*.warmup_end_s",
        "charlm.training.optim.WarmupDecayLR.state_dict",
        "charlm.training.optim.WarmupDecayLR.load_state_dict",
        "a decay over trainer.max_time",
    ),
    Piece(
        "timer",
        "callbacks.Timer.time_elapsed",
        "pytorch_lightning.callbacks.Timer.state_dict",
        "pytorch_lightning.callbacks.Timer.load_state_dict",
        "trainer.max_time: when the run stops, and a decay over it",
    ),
    Piece(
        "loop progress",
        "loops",
        f"{_LIGHTNING}._get_loops_state_dict",
        f"{_LIGHTNING}.restore_loops",
        "always: the epoch, the batch in it, the global step",
        everywhere=True,
    ),
    Piece(
        "epoch cut short by a stop",
        "loops.fit_loop.epoch_progress",
        "charlm.training.checkpoint.reopen_cut_epoch",
        f"{_LIGHTNING}.restore_loops",
        "a checkpoint written when max_steps, max_time or a callback stops the run inside an epoch",
    ),
    Piece(
        "data position",
        "CharDataModule.train_position",
        "charlm.data.datamodule.CharDataModule.state_dict",
        "charlm.data.datamodule.CharDataModule.load_state_dict",
        "a checkpoint inside an epoch",
    ),
    Piece(
        "carried TBPTT state",
        "charlm.ranks.*.tbptt_state",
        "charlm.training.module.CharLM.on_save_checkpoint",
        "charlm.training.module.CharLM.on_train_batch_start",
        "data.batch_order=tbptt, a checkpoint inside an epoch",
    ),
    Piece(
        "torch RNG",
        "charlm.ranks.*.rng.torch",
        "charlm.training.checkpoint.rng_states",
        "charlm.training.checkpoint.set_rng_states",
        "any dropout (model.dropout, recurrent_dropout, weight_drop)",
    ),
    Piece(
        "CUDA RNG",
        "charlm.ranks.*.rng.cuda",
        "charlm.training.checkpoint.rng_states",
        "charlm.training.checkpoint.set_rng_states",
        "dropout on a GPU",
    ),
    Piece(
        "numpy RNG",
        "charlm.ranks.*.rng.numpy",
        "charlm.training.checkpoint.rng_states",
        "charlm.training.checkpoint.set_rng_states",
        "never in charlm (nothing draws from it): kept for user callbacks",
    ),
    Piece(
        "Python RNG",
        "charlm.ranks.*.rng.python",
        "charlm.training.checkpoint.rng_states",
        "charlm.training.checkpoint.set_rng_states",
        "never in charlm (nothing draws from it): kept for user callbacks",
    ),
    Piece(
        "partial train-loss sums",
        "charlm.ranks.*.train_nll",
        "charlm.training.module.CharLM.on_save_checkpoint",
        "charlm.training.module.CharLM.on_train_batch_start",
        "train/loss of the epoch a checkpoint is inside",
    ),
    Piece(
        "state per rank",
        "charlm.ranks",
        "charlm.training.checkpoint.gather_objects",
        "charlm.training.module.CharLM.on_load_checkpoint",  # picks ranks[global_rank]; refuses another world size
        "several processes (DDP): each owns its own TBPTT streams and RNG",
    ),
    Piece(
        "gradient scaler",
        "MixedPrecision",
        "pytorch_lightning.plugins.MixedPrecision.state_dict",
        f"{_LIGHTNING}.restore_precision_plugin_state",
        "16-mixed with a GradScaler: its scale decides which steps overflow",
    ),
    Piece(
        "divergence guard",
        "callbacks.NonFiniteGuard",
        "charlm.training.callbacks.NonFiniteGuard.state_dict",
        "charlm.training.callbacks.NonFiniteGuard.load_state_dict",
        "loss_limit: the starting loss the limit multiplies; the skip and overflow counts",
    ),
    Piece(
        "best checkpoint record",
        "callbacks.ModelCheckpoint*",
        "pytorch_lightning.callbacks.ModelCheckpoint.state_dict",
        "charlm.training.checkpoint.ModelCheckpoint.load_state_dict",  # a moved or copied run's paths follow it
        "a resume in the run's own directory (moved or copied too): whether best.ckpt is replaced",
    ),
)


@dataclass(frozen=True)
class Derived:
    """State that is not saved because it is recomputed from what is: ``computed_by`` from ``source``."""

    name: str
    computed_by: str
    source: str


DERIVED: tuple[Derived, ...] = (
    Derived("batch shapes", "charlm.data.batches.BatchSchedule.at", "the global step"),
    Derived("TBPTT batches", "charlm.data.batches.StreamBatches", "the data position; the streams restart every epoch"),
    Derived(
        "random windows", "charlm.data.batches.RandomWindows", "data.seed, the epoch, the rank and the data position"
    ),
    Derived(
        "the loaders' seeds",
        "charlm.data.datamodule.CharDataModule._loader",
        "a generator of their own, not torch's RNG",
    ),
    Derived("step and plateau schedules", "pytorch_lightning.core.LightningModule.lr_schedulers", "the epoch"),
    Derived("text samples", "charlm.training.callbacks.TextSample", "their own seed"),
)

# Kept in memory only, and started afresh by a resume: none of them changes what is trained.
NOT_CARRIED: tuple[Derived, ...] = (
    Derived("time since the last save", "charlm.training.callbacks.LastCheckpoint", "when last.ckpt is next written"),
    Derived("speed window", "charlm.training.callbacks.Throughput", "train/chars_per_s and train/eta_min"),
    Derived("the checkpoint's global_step and epoch", "checkpoint", "informative: the loops' state is read"),
)


def check_resumable(checkpoint: dict, path: str | Path) -> None:
    """Refuse, before a resume trains, a checkpoint without a piece that every resumable one holds (the file of a
    weights-only save): a resume from it could not go on where its run stopped."""
    lost = [piece.name for piece in CARRIED if piece.everywhere and piece.key.split(".")[0] not in checkpoint]
    if lost:
        raise UserError(
            f"checkpoint {str(path)!r} holds no {' and no '.join(lost)} (a weights-only save), so no run can resume"
            f" from it exactly; pass init_from={path} instead to start a new run from its weights."
        )
