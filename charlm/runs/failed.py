"""What a run leaves when it is refused or fails before its first checkpoint: nothing in a directory it did not
create (another run's, or a folder the user already had), and no run directory, which TensorBoard and
``ls outputs/<name>`` would list, but its record under ``outputs/.failed/``, which its error names.

Only what this invocation created is ever moved or removed. Hydra creates the run directory before the task
starts, so ``NewRunDirs`` (a Hydra callback, ``hydra.callbacks`` in conf/train.yaml) notes beforehand whether it
exists; the task notes what is in it (``failed_run_set_aside``). Until the run's settings are accepted,
``train.log`` holds its lines in memory (``RunLogFile``) and ``.hydra/`` is not written
(``charlm.config.build``)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from charlm import user_error_in
from charlm.runs.dirs import RUNS, shown, write_run_record

FAILED = ".failed"  # RUNS/.failed/<the run's path under RUNS>

# What a run writes into its directory before its first checkpoint (and <job name>.log: Hydra's job log, train.log,
# or train_process_1.log of another DDP rank)
WRITTEN = (".hydra", "checkpoints", "hparams.yaml", "metrics.json", "train.log")

_new_dirs: set[Path] = set()  # run (or sweep) directories that did not exist when Hydra was about to create them


class NewRunDirs(Callback):
    """Note whether a run's directory (a sweep's: its sweep directory, which holds its jobs') exists before Hydra
    creates it; a job's directory under a sweep directory that existed counts as the user's."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _note_new(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _note_new(config.hydra.sweep.dir)


def _note_new(path: object) -> None:
    path = Path(str(path)).expanduser().absolute()
    if not path.exists():
        _new_dirs.add(path)


class RunLogFile(logging.FileHandler):
    """``train.log``: a FileHandler that holds its lines until the run's settings are accepted (``write_held``;
    not ``release``, which is the handler's lock), so that a refused command writes nothing into a directory; and
    that drops a line once its run directory is gone, where the plain one raised a traceback (a data-parallel run
    that fails before its first checkpoint has its directory set aside by rank 0 while another rank may still log
    its error line, shown on stderr all the same)."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None, delay: bool = True):
        super().__init__(filename, mode, encoding, delay=delay)
        self.held: list[logging.LogRecord] | None = []  # None once written

    def emit(self, record: logging.LogRecord) -> None:
        if self.held is not None:
            self.held.append(record)
        elif self.stream is not None or os.path.isdir(os.path.dirname(self.baseFilename)):
            super().emit(record)

    def write_held(self) -> None:
        """Write the lines held so far into the file, and each later one as it comes."""
        held, self.held = self.held or [], None
        for record in held:
            self.emit(record)


def _file_handlers() -> Iterator[tuple[logging.Logger, logging.FileHandler]]:
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in list(getattr(logger, "handlers", ())):
            if isinstance(handler, logging.FileHandler):
                yield logger, handler


def release_run_logs() -> None:
    """The run is accepted: its ``train.log`` (``RunLogFile``) gets the lines held so far, and the ones to come."""
    for _, handler in _file_handlers():
        if isinstance(handler, RunLogFile):
            handler.write_held()


def set_aside_failed_run(cfg: DictConfig, new: bool, before: set[str]) -> Path | None:
    """Clear what a run that failed before its first checkpoint created out of the run directories: its record
    (``.hydra/``, ``train.log``) moves to the same path under ``outputs/.failed/`` (a directory elsewhere: to
    ``.failed/`` beside it), its TensorBoard event files are deleted (TensorBoard lists every directory holding
    one, hidden ones too), and a run directory it created (``new``) goes, with the directories above it that it
    leaves empty. The record of a run refused before it was accepted is written there first: it says what was run.
    ``before``: the names the directory held when the run began, the user's or another run's, never touched.
    Returns where the record went; None where nothing was kept: nothing was created, or a checkpoint or anything
    else than a run writes is there (then everything stays as it is)."""
    run = Path(cfg.paths.output_dir).expanduser().absolute()
    kept = None
    if run.is_dir() and not any(run.glob("checkpoints/*.ckpt")):
        if new and not (run / ".hydra").exists():
            write_run_record(cfg)
        made = [e for e in run.iterdir() if e.name not in before]
        if all(e.name in WRITTEN or e.suffix == ".log" or "tfevents" in e.name for e in made):
            kept = _move_out(run, made, new)
    _log_files_follow(run, kept)
    return kept


def _move_out(run: Path, made: list[Path], new: bool) -> Path | None:
    for entry in made:
        if "tfevents" in entry.name:
            entry.unlink()
        elif entry.name == "checkpoints":  # this run's, and it holds no checkpoint
            shutil.rmtree(entry)
    record = [e for e in made if e.exists()]
    runs = RUNS.absolute()
    kept = None
    if record:
        kept = runs / FAILED / run.relative_to(runs) if run.is_relative_to(runs) else run.parent / FAILED / run.name
        for n in range(1, 1000):  # a requeued SLURM job that fails again keeps the same stamp
            if not kept.exists():
                break
            kept = kept.with_name(f"{kept.name.split('~')[0]}~{n}")
        kept.mkdir(parents=True)
        for entry in record:
            os.replace(entry, kept / entry.name)
    if new and not any(run.iterdir()):
        run.rmdir()
        for parent in run.parents if run.is_relative_to(runs) else ():
            if parent == runs or any(parent.iterdir()):
                break
            parent.rmdir()
    return kept


def _log_files_follow(run: Path, kept: Path | None) -> None:
    """Point the logging file handlers that write under ``run`` (Hydra's ``train.log``) at ``kept``, where the
    record moved, so the error line still logged after this lands in it; or drop them where nothing was kept and
    they have not written (a refused run's lines are on the terminal). A handler that opened its file already
    writes on through the moved file; one that opens it on its first line (``delay``) would otherwise fail to
    find the directory."""
    for logger, handler in _file_handlers():
        path = Path(handler.baseFilename)
        if not path.is_relative_to(run):
            continue
        held = isinstance(handler, RunLogFile) and handler.held is not None
        if kept is not None:
            handler.baseFilename = str(kept / path.relative_to(run))
            if held:
                handler.write_held()
        elif held or handler.stream is None:
            logger.removeHandler(handler)


def _snapshot(run: Path) -> dict[Path, tuple[bytes, int]]:
    """The record files of a run directory (``.hydra/``, the logs, ``hparams.yaml``): bytes and mtime."""
    files = [*run.glob(".hydra/*"), *run.glob("*.log"), run / "hparams.yaml"]
    return {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files if f.is_file()}


def _checkpoints(run: Path) -> dict[Path, tuple[int, int]]:
    return {f: (f.stat().st_size, f.stat().st_mtime_ns) for f in run.glob("checkpoints/*.ckpt")}


def restore_refused_resume(run: Path, before: set[str], record: dict[Path, tuple[bytes, int]]) -> None:
    """Put a run's record back as it was when a command that wrote no checkpoint into it was refused (a resume
    whose setting Lightning refuses once it fits, after the record was rewritten): its files' bytes and mtimes,
    no new event files, and no more lines in its ``train.log`` (its error line is on the terminal)."""
    for logger, handler in _file_handlers():
        if Path(handler.baseFilename).is_relative_to(run):
            logger.removeHandler(handler)
            handler.close()
    for path in [*run.glob(".hydra/*"), *run.glob("*.log"), run / "hparams.yaml", *run.glob("*tfevents*")]:
        if path.is_file() and path not in record and (path.parent != run or path.name not in before):
            path.unlink()
    for path, (data, mtime) in record.items():  # only what changed: the directory may be read-only
        if not path.is_file() or path.read_bytes() != data:
            path.write_bytes(data)
        if path.stat().st_mtime_ns != mtime:
            os.utime(path, ns=(mtime, mtime))


@contextmanager
def failed_run_set_aside(cfg: DictConfig) -> Iterator[None]:
    """A run that fails inside this block before its first checkpoint leaves nothing it created in the run
    directories (``set_aside_failed_run``); its error says where its record went, at the end of a UserError's
    one line."""
    run = Path(cfg.paths.output_dir).expanduser().absolute()
    new = not run.exists() or any(d == run or d in run.parents for d in _new_dirs)
    before = {e.name for e in run.iterdir()} if run.is_dir() else set()
    record, checkpoints = _snapshot(run), _checkpoints(run)
    try:
        yield
    except BaseException as e:
        if os.environ.get("LOCAL_RANK", "0") != "0":  # DDP ranks > 0 share rank 0's directory
            raise
        if checkpoints and user_error_in(e) is not None and _checkpoints(run) == checkpoints:
            # refused before it saved: the run stays as it was (a read-only directory, which nothing changed,
            # cannot be written back to: the refusal is what to show)
            with contextlib.suppress(OSError):
                restore_refused_resume(run, before, record)
            raise
        kept = set_aside_failed_run(cfg, new, before)
        if kept is not None:
            where = f"the run's record: {shown(kept)}/"
            cause = user_error_in(e)
            if cause is not None:
                cause.args = (f"{cause} ({where})",)
            else:
                print(where, file=sys.stderr)
        raise
