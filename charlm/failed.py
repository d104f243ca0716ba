"""What is left of a run that failed before its first checkpoint (a refused setting, a crash, a divergence): not
a run directory, which TensorBoard and ``ls outputs/<name>`` would list, but its record under ``outputs/.failed/``,
which its error names."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from charlm import user_error_in
from charlm.runs import RUNS, shown

FAILED = ".failed"  # RUNS/.failed/<the run's path under RUNS>

# What a run writes into its directory before its first checkpoint (and <job name>.log: Hydra's job log, train.log,
# or train_process_1.log of another DDP rank)
WRITTEN = (".hydra", "checkpoints", "hparams.yaml", "metrics.json", "train.log")


def set_aside_failed_run(output_dir: str | Path) -> Path | None:
    """Clear the directory of a run that failed before its first checkpoint out of the run directories: its record
    (``.hydra/``, ``train.log``) moves to the same path under ``outputs/.failed/`` (a directory elsewhere: to
    ``.failed/`` beside it), its TensorBoard event files are deleted (TensorBoard lists every directory holding
    one, hidden ones too), and the directories above it that it leaves empty go. Returns where the record went,
    None when nothing was kept or moved: a directory that holds a checkpoint, or anything else than a run
    writes, stays as it is."""
    run = Path(output_dir).expanduser().absolute()
    if not run.is_dir() or any(run.glob("checkpoints/*.ckpt")):
        return None
    entries = list(run.iterdir())
    if not all(e.name in WRITTEN or e.suffix == ".log" or "tfevents" in e.name for e in entries):
        return None
    for entry in entries:
        if "tfevents" in entry.name:
            entry.unlink()
        elif entry.name == "checkpoints":
            shutil.rmtree(entry)
    runs = RUNS.absolute()
    kept = None
    if any(run.iterdir()):
        kept = runs / FAILED / run.relative_to(runs) if run.is_relative_to(runs) else run.parent / FAILED / run.name
        for n in range(1, 1000):  # a requeued SLURM job that fails again keeps the same stamp
            if not kept.exists():
                break
            kept = kept.with_name(f"{kept.name.split('~')[0]}~{n}")
        kept.parent.mkdir(parents=True, exist_ok=True)
        os.replace(run, kept)
    else:
        run.rmdir()
    _log_files_follow(run, kept)
    for parent in run.parents if run.is_relative_to(runs) else ():
        if parent == runs or any(parent.iterdir()):
            break
        parent.rmdir()
    return kept


def _log_files_follow(run: Path, kept: Path | None) -> None:
    """Point the logging file handlers that write under ``run`` (Hydra's ``train.log``) at ``kept``, where it
    moved, so the error line still logged after this lands in the record; or drop them where nothing was kept.
    A handler that opened its file already writes on through the moved file; one that opens it on its first line
    (``delay``) would otherwise fail to find the directory."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in list(getattr(logger, "handlers", ())):
            if not isinstance(handler, logging.FileHandler):
                continue
            path = Path(handler.baseFilename)
            if not path.is_relative_to(run):
                continue
            if kept is not None:
                handler.baseFilename = str(kept / path.relative_to(run))
            elif handler.stream is None:
                logger.removeHandler(handler)


@contextmanager
def failed_run_set_aside(output_dir: str | Path) -> Iterator[None]:
    """A run that fails inside this block before its first checkpoint leaves no run directory
    (``set_aside_failed_run``); its error says where its record went, at the end of a UserError's one line."""
    try:
        yield
    except BaseException as e:
        if os.environ.get("LOCAL_RANK", "0") != "0":  # DDP ranks > 0 share rank 0's directory
            raise
        kept = set_aside_failed_run(output_dir)
        if kept is not None:
            where = f"the run's record: {shown(kept)}/"
            cause = user_error_in(e)
            if cause is not None:
                cause.args = (f"{cause} ({where})",)
            else:
                print(where, file=sys.stderr)
        raise
