"""SLURM: a job's identity, its shape against the Trainer's, and requeue on preemption (save at a step boundary,
``scontrol requeue``, and resume in the same run directory)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.plugins.environments import SLURMEnvironment

from charlm import UserError


def slurm_job() -> str | None:
    """This SLURM job's id (``<array job id>_<task id>`` for an array task, as ``scontrol`` and Lightning name it),
    or None outside a job step that Lightning treats as SLURM (srun / sbatch; not ``salloc``'s interactive shell)."""
    if not SLURMEnvironment.detect():
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ.get("SLURM_JOB_ID")


def run_last_ckpt(output_dir: str | Path) -> Path:
    """Where a run's ``last.ckpt`` lives (``callbacks.last_checkpoint`` and ``preemption_checkpoint`` write it)."""
    return Path(output_dir).expanduser() / "checkpoints" / "last.ckpt"


def requeued_resume_path(output_dir: str | Path) -> str | None:
    """``last.ckpt`` of this run directory if this is a requeued SLURM job (``SLURM_RESTART_COUNT`` >= 1; the run
    directory is the job's own, see ``charlm.runs.dirs.run_stamp``), else None (also when the job stopped before its
    first checkpoint)."""
    if slurm_job() is None or int(os.environ.get("SLURM_RESTART_COUNT") or 0) < 1:
        return None
    last = run_last_ckpt(output_dir)
    return str(last) if last.is_file() else None


class SlurmRequeue(pl.Callback):
    """SLURM's requeue signal (SIGUSR1, ``#SBATCH --signal=USR1@90``): at the next step boundary, on every rank
    together, write ``last.ckpt`` and run ``scontrol requeue <job id>`` on rank 0. Training goes on until SLURM's
    SIGTERM, which ``PreemptionCheckpoint`` turns into a final ``last.ckpt`` and exit 143; the requeued job finds
    its run directory again and resumes from that file (``requeued_resume_path``).

    Hand-written rather than Lightning's ``SLURMEnvironment(auto_requeue=True)`` (``build`` passes
    ``auto_requeue=False``; the environment's ranks and addresses are still Lightning's). Lightning saves and
    requeues inside the signal handler, which fires between any two bytecodes: the checkpoint can hold a half-done
    step, and under DDP the save's collectives can meet another rank's gradient all-reduce and hang (an open
    Lightning bug). It also saves ``hpc_ckpt_<n>.ckpt`` files, one more per requeue, and while one exists every
    later ``trainer.test`` / ``validate(ckpt_path=None)`` under SLURM loads it instead of the model in memory.
    """

    def __init__(self, ckpt_path: str | Path):
        self.ckpt_path = Path(ckpt_path)
        self._requested = False
        self._installed = False

    def _install(self) -> None:
        # After Lightning registered its handlers (before the sanity check), so its teardown restores the original.
        if not self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self._record)
            self._installed = True

    def _record(self, signum, frame) -> None:
        self._requested = True  # nothing else here: the handler may run in the middle of a step

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        # One rank that got the signal is enough; every rank takes the same branch (saving is collective).
        if not trainer.strategy.reduce_boolean_decision(self._requested, all=False):
            return
        self._requested = False
        trainer.save_checkpoint(self.ckpt_path, weights_only=False)
        if trainer.is_global_zero:
            requeue(slurm_job(), self.ckpt_path)


def requeue(job: str | None, ckpt_path: Path) -> None:
    """``scontrol requeue JOB``; a failure is one line (the job then runs on until its time limit)."""
    try:
        done = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True, timeout=60)
        why = done.stderr.strip() or f"exit code {done.returncode}"
    except (OSError, subprocess.TimeoutExpired) as e:
        done, why = None, str(e)
    if done is not None and done.returncode == 0:
        print(f"saved {ckpt_path} and requeued SLURM job {job}", file=sys.stderr)
    else:
        print(
            f"warning: saved {ckpt_path} but could not requeue SLURM job {job} ({why}); submit the job again with"
            f" --requeue, or resume with ckpt_path={ckpt_path}.",
            file=sys.stderr,
        )


def check_slurm_shape(num_nodes: int, devices) -> None:
    """Under SLURM, the job's nodes and tasks per node must be the Trainer's ``num_nodes`` and ``devices`` (one task
    per device). Lightning checks the same when the Trainer is built, but as a traceback."""
    if slurm_job() is None:
        return
    nodes, per_node = os.environ.get("SLURM_NNODES"), os.environ.get("SLURM_NTASKS_PER_NODE")
    tasks = os.environ.get("SLURM_NTASKS", "1")
    if per_node is None and tasks.isdigit() and int(tasks) > 1:
        raise UserError(
            f"this SLURM job asks for --ntasks={tasks}, which Lightning cannot place; submit with --nodes=N"
            " --ntasks-per-node=<devices per node> instead."
        )
    if nodes and nodes.isdigit() and int(nodes) != num_nodes:
        raise UserError(
            f"this SLURM job has {nodes} node(s) but trainer.num_nodes={num_nodes}; pass trainer.num_nodes={nodes}"
            f" (or submit with --nodes={num_nodes})."
        )
    if per_node and per_node.isdigit() and isinstance(devices, int) and devices > 0 and int(per_node) != devices:
        raise UserError(
            f"this SLURM job runs {per_node} task(s) per node but trainer.devices={devices}; pass"
            f" trainer.devices={per_node} (or submit with --ntasks-per-node={devices}): one task per device."
        )
