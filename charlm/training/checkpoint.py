"""Checkpoint files: atomic writes on any filesystem, a format version with migrations, and the edits a resume
makes to a checkpoint before Lightning restores it."""

from __future__ import annotations

import errno
import io
import os
import pickle
import random
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins import TorchCheckpointIO

from charlm import UserError, __version__

# Version of what charlm itself stores in a checkpoint (``checkpoint["charlm"]``); Lightning versions its own part.
# What all of a checkpoint carries for an exact resume, and which function saves and restores each piece:
# charlm.training.resume.
#   1: charlm 0.1.0: weights, hparams (with the vocab), optimiser, loops; no "charlm" entry.
#   2: charlm 0.2.0: + "charlm": {format, version, world_size, ranks: per-rank TBPTT state, RNG states, metric sums}.
FORMAT = 2


def checkpoint_format(checkpoint: dict) -> int:
    return int(checkpoint.get("charlm", {}).get("format", 1))


def migrate(checkpoint: dict, path: str | Path) -> dict:
    """Bring ``checkpoint`` to ``FORMAT`` in place; refuse one written by a newer charlm.

    1 -> 2 adds an empty "charlm" entry: weights and hparams are unchanged, and a resume from it starts with
    fresh TBPTT state and RNG streams, as charlm 0.1.0 did."""
    found = checkpoint_format(checkpoint)
    if found > FORMAT:
        written_by = checkpoint["charlm"].get("version", "?")
        raise UserError(
            f"checkpoint {str(path)!r} was written by charlm {written_by} (checkpoint format {found}), but this is"
            f" charlm {__version__} (format {FORMAT}); upgrade charlm to load it."
        )
    if found == 1:
        checkpoint["charlm"] = {"format": FORMAT, "version": "0.1.0", "migrated_from": 1, "ranks": None}
    return checkpoint


# The points a save passes, in order; ``write_atomic`` calls each hook of ``save_phase_hooks`` with (phase, path) at
# each. No hook is installed in a run: tests install one that kills the process there, to show that a save stopped
# at any phase leaves a whole checkpoint behind.
SAVE_PHASES = ("temp-created", "temp-written", "temp-synced", "replaced", "dir-synced")
save_phase_hooks: list[Callable[[str, Path], None]] = []


def _save_phase(phase: str, path: Path) -> None:
    for hook in save_phase_hooks:
        hook(phase, path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Every save lands whole or not at all, on any filesystem.

    Lightning's own save (``_atomic_save``) goes through an fsspec transaction whose temporary file lives in
    ``$TMPDIR``: when the run directory is on another filesystem (tmpfs, a network disk) the final move
    truncates the target and copies into it, so a kill during that copy destroys the previous good checkpoint.
    Here the temporary file sits in the target's own directory, is fsynced, and replaces the target with one
    ``os.replace``; a failed write (a full disk) removes the temporary file and leaves the previous one intact.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: torch.save(checkpoint, f))


class ModelCheckpoint(pl.callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, whose record follows a run that was moved (``mv run run2``) or copied
    (``cp -r orig copy``). Lightning's drops the best score of a checkpoint whose ``dirpath`` is not its own
    ("dirpath has changed"), so the next validation replaced ``best.ckpt`` with a worse model, and it kept the
    recorded ``best_model_path``: a copy tested, and reported, the original's ``best.ckpt``. Here the paths
    recorded under the old ``dirpath`` are read relative to it: where each names a file in this ``dirpath``, the
    record is this directory's, scores included. Else (a resume into a directory without them) Lightning's rule.

    The class keeps Lightning's name: a callback's state key is its class name and settings, so checkpoints of
    either load into the other."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and old != self.dirpath:
            state_dict = followed(state_dict, Path(old), Path(self.dirpath))
        super().load_state_dict(state_dict)


_RECORDED_PATHS = ("best_model_path", "kth_best_model_path", "last_model_path")  # and best_k_models' keys


def followed(state: dict[str, Any], old: Path, new: Path) -> dict[str, Any]:
    """A ModelCheckpoint's ``state`` with its paths under ``old`` moved to ``new``, where every one of them names
    a file there; else ``state`` as it is."""
    best_k = state.get("best_k_models") or {}
    paths = [p for p in (*(state.get(k) for k in _RECORDED_PATHS), *best_k) if p]
    if not paths or not all(Path(p).is_relative_to(old) and (new / Path(p).relative_to(old)).is_file() for p in paths):
        return state

    def moved(path: str) -> str:
        return str(new / Path(path).relative_to(old)) if path else path

    edited = {k: moved(state.get(k) or "") for k in _RECORDED_PATHS}
    return state | edited | {"best_k_models": {moved(p): v for p, v in best_k.items()}, "dirpath": str(new)}


def write_atomic(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, then rename it over ``path``.

    Temporary files of earlier writes to ``path`` that a SIGKILL left behind are removed first (one process
    writes a given checkpoint: rank 0)."""
    existed = path.exists()
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a checkpoint gets the usual permissions
        _save_phase("temp-created", path)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            _save_phase("temp-written", path)
            os.fsync(f.fileno())
        _save_phase("temp-synced", path)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if disk_full(e):
            then = "the previous file is intact: free disk space and resume from it" if existed else "free disk space"
            raise UserError(f"no space left to write {str(path)!r}; {then}.") from None
        raise
    _save_phase("replaced", path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    _save_phase("dir-synced", path)


def disk_full(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from or while handling (``__cause__``, ``__context__``), says
    the disk or the quota is full. torch.save's C++ writer reports a full disk as a RuntimeError (``unexpected pos
    ...``, or ``No space left``) with the OSError chained under it."""
    pending, seen = [error], set()
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, RuntimeError) and "No space left" in str(e):
            return True
        pending += [e.__cause__, e.__context__]
    return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def rng_states() -> dict:
    """torch (CPU and CUDA), numpy and Python RNG states, as tensors and plain data (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": list(random.getstate()),
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


def reopen_cut_epoch(trainer, checkpoint: dict) -> None:
    """Make a checkpoint written by the end hooks of an epoch that a stop cut short (``max_steps``, ``max_time``)
    resume inside that epoch.

    Lightning counts such an epoch as processed before its end hooks run, and those hooks write ``last.ckpt`` (and
    ``best.ckpt``). Resumed with larger limits, that state starts the next epoch: the rest of the cut one, its
    validation and its ``best.ckpt`` are lost, and the DataModule's ``train_position`` skips the same batches of
    the new epoch. With the epoch counted as not yet processed, the loops restart mid-epoch, as from a checkpoint
    written after any batch."""
    epochs, batches = trainer.fit_loop.epoch_progress.current, trainer.fit_loop.epoch_loop.batch_progress
    in_end_hooks = epochs.processed == epochs.started and epochs.completed < epochs.processed
    cut = not batches.is_last_batch and batches.current.ready < trainer.num_training_batches
    if in_end_hooks and cut:
        saved = checkpoint["loops"]["fit_loop"]["epoch_progress"]
        for counts in (saved["current"], saved["total"]):
            counts["processed"] -= 1


def rescale_lr(checkpoint: dict, ratio: float) -> None:
    """A resume with another ``optim.lr``: scale the saved optimiser and schedule learning rates by ``ratio``, so
    the schedule goes on from where it was, at the new base rate (Lightning would restore the old rates)."""
    if ratio == 1:
        return
    for opt in checkpoint.get("optimizer_states", []):
        for group in opt["param_groups"]:
            for key in ("lr", "initial_lr"):
                if key in group:
                    group[key] *= ratio
    for sched in checkpoint.get("lr_schedulers", []):
        for key in ("base_lrs", "_last_lr", "min_lrs"):
            if isinstance(sched.get(key), list):
                sched[key] = [v * ratio for v in sched[key]]


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (Lightning's ``all_gather`` takes tensors only)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, bytes]:
    """The checkpoint at ``path`` as plain data (``weights_only``: tensors and plain data, never pickled code),
    migrated to the current format, plus its bytes; every way it can be wrong is a one-line UserError."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"checkpoint {str(path)!r} is a directory; pass a .ckpt file, e.g. {path}/best.ckpt.")
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist; pass the path of a .ckpt written by train.py.")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"checkpoint {str(path)!r} cannot be read ({e.strerror}); check its permissions.") from None
    if not zipfile.is_zipfile(io.BytesIO(data)):  # torch.save writes a zip archive; text or garbage is not one
        if data.startswith(b"PK\x03\x04"):  # a zip archive's start without its end (the central directory)
            raise UserError(
                f"checkpoint {str(path)!r} is truncated ({len(data):,} bytes: a save or copy that did not finish) or"
                " corrupt; pass a complete .ckpt, e.g. the run's other checkpoint (last.ckpt or best.ckpt)."
            )
        raise UserError(
            f"{str(path)!r} is not a checkpoint (not a torch.save archive); pass a .ckpt written by train.py."
        )
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"checkpoint {str(path)!r} holds objects other than tensors and plain data, so it was refused;"
            " only load checkpoints written by train.py."
        ) from None
    except Exception as e:
        raise UserError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({type(e).__name__}); pass a .ckpt written by train.py."
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise UserError(f"{str(path)!r} is not a charlm checkpoint; pass a .ckpt written by train.py.")
    return migrate(checkpoint, path), data
