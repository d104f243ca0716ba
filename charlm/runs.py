"""Runs and their directories: what a run is called, where it goes, that it never writes over another run's
checkpoints, and the record of what it ran (``.hydra/``).

A single run goes to ``outputs/<name>/<stamp>``, a sweep's job to ``outputs/multirun/<name>/<date>_<id>/<job>``
(conf/train.yaml, through the ``${charlm_run_*:}`` resolvers that ``charlm.config.register`` adds). ``<name>``
is ``run_name``'s; ``<stamp>`` is unique per run, and per SLURM job, so that a requeued job finds its own
checkpoints again.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from charlm import UserError
from charlm.checkpoint import write_atomic
from charlm.corpus import corpus_name
from charlm.slurm import slurm_job


def run_id() -> str:
    """HH-MM-SS-<microseconds>-<pid>: two runs started in the same second never share a directory."""
    return f"{datetime.now():%H-%M-%S-%f}-{os.getpid()}"


def run_stamp() -> str:
    """The last part of a run's directory: ``<date>_<HH-MM-SS>-<microseconds>-<pid>``, unique per run; under SLURM
    ``slurm-<job id>``, the same for every task of the job and for the job requeued (on another day too), so that a
    requeued job finds its checkpoints again."""
    job = slurm_job()
    return f"slurm-{job}" if job else f"{datetime.now():%Y-%m-%d}_{run_id()}"


def run_name(data_path: str | None = None, train_path: str | None = None) -> str:
    """A run's name: ``name=...`` if given, else its experiment (``experiment=...``), else its corpus preset
    (``data=...``), else the corpus's name (``corpus_name``); safe as a directory name. Without ``data_path`` (in
    ``hydra.run.dir``, which must resolve on its own for ``--cfg hydra``) the ``data.path=`` override is used."""
    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    overrides = {}
    for item in hydra.overrides.task if hydra else ():
        key, _, value = item.lstrip("+~").partition("=")
        overrides[key] = value.strip("'\"")
    if overrides.get("name"):
        return safe_name(overrides["name"])
    choices = hydra.runtime.choices if hydra else {}
    name = choices.get("experiment")
    if name in (None, "null"):
        name = choices.get("data")
    if name in (None, "null", "text"):
        name = corpus_name(data_path or overrides.get("data.path"), train_path or overrides.get("data.train_path"))
    return safe_name(name)


def safe_name(text: str, limit: int = 200) -> str:
    """``text`` as one directory name: path separators and other odd characters become ``_``; at most ``limit``."""
    return re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", str(text)).strip("._")[:limit] or "run"


def other_runs_checkpoints(output_dir: str | Path, ckpt_path: str | None, overwrite: bool) -> list[str]:
    """The names of the checkpoints in ``output_dir``/checkpoints that a run there would replace, although it does
    not resume from one of them and was not told to (``overwrite``); none: the directory is this run's."""
    ckpt_dir = Path(output_dir).expanduser() / "checkpoints"
    existing = sorted(p.name for p in ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if not existing or overwrite:
        return []
    if ckpt_path and Path(ckpt_path).expanduser().resolve().parent == ckpt_dir.resolve():
        return []
    return existing


def check_run_dir(output_dir: str | Path, ckpt_path: str | None, overwrite: bool, sweep: bool = False) -> None:
    """Refuse to train into a directory that holds another run's checkpoints.

    Resuming from a checkpoint inside that directory is allowed (the run continues there), and so is
    ``overwrite_run_dir=true``. ``sweep``: the directory is a job's of a sweep (``-m``, Optuna), whose job
    numbers restart at 0 in every run: a sweep run again into the same ``hydra.sweep.dir`` meets its own jobs."""
    existing = other_runs_checkpoints(output_dir, ckpt_path, overwrite)
    if not existing:
        return
    ckpt_dir = Path(output_dir).expanduser() / "checkpoints"
    if sweep:
        raise UserError(
            f"the sweep job directory {str(output_dir)!r} already holds checkpoints ({', '.join(existing)}); run the"
            " sweep into a new hydra.sweep.dir (unset, each run gets its own; an Optuna study in a storage goes on"
            " there) or pass overwrite_run_dir=true to replace them."
        )
    raise UserError(
        f"the run directory {str(output_dir)!r} already holds checkpoints ({', '.join(existing)}); pick a new"
        f" hydra.run.dir, resume with ckpt_path={ckpt_dir}/last.ckpt, or pass overwrite_run_dir=true to replace them."
    )


def write_run_record(cfg: DictConfig) -> None:
    """Write Hydra's record of the run, ``.hydra/`` (``config.yaml``, ``hydra.yaml``, ``overrides.yaml``), into the
    run directory, as Hydra does when ``hydra.output_subdir`` is set; nothing outside a Hydra app.

    Hydra writes its record before the task function runs, so a run that ``check_run_dir`` then refuses for
    pointing at another run's directory would have replaced that run's record with its own. So train.yaml sets
    ``hydra.output_subdir: null``, and this writes nothing into a directory that holds another run's checkpoints.
    A Hydra callback could not check earlier for every run: a sweep's jobs get no hook before the write
    (``on_job_start`` comes after it), and a launcher's worker process would not see files restored by the
    parent. Only rank 0 calls this (DDP ranks > 0 re-run the script into its directory)."""
    if not HydraConfig.initialized():
        return
    hydra = HydraConfig.instance().cfg
    if hydra.hydra.output_subdir is not None:  # set on the command line: Hydra has written it itself
        return
    out = Path(hydra.hydra.runtime.output_dir)
    if other_runs_checkpoints(out, cfg.ckpt_path, cfg.overwrite_run_dir):
        return
    record = out / ".hydra"
    record.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra), ("overrides.yaml", hydra.hydra.overrides.task)):
        text = OmegaConf.to_yaml(node).encode()
        write_atomic(record / name, lambda f, text=text: f.write(text))
