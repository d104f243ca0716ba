"""Runs and their directories: what a run is called, where it goes, that it never writes over another run's
checkpoints, the record of what it ran (``.hydra/``), and what is left of a run that failed before its first
checkpoint.

A single run goes to ``outputs/<name>/<settings>/<stamp>`` (``outputs/<name>/<stamp>`` without overrides), a
sweep's job to ``outputs/multirun/<name>/<date>_<id>/<job>_<settings>`` (conf/train.yaml, through the
``${charlm_run_*:}`` resolvers that ``charlm.config.register`` adds). ``<name>`` is ``run_name``'s, ``<settings>``
``run_settings``' (``hidden_size=128,lr=0.01``); ``<stamp>`` is unique per run, and per SLURM job, so that a
requeued job finds its own checkpoints again. A resume from a run's checkpoint goes on in that run's directory
(``run_dir``) with that run's settings (``run_overrides``).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from datetime import datetime
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, ListConfig, OmegaConf

from charlm import UserError
from charlm.data.corpus import corpus_name
from charlm.runs.slurm import slurm_job
from charlm.training.checkpoint import write_atomic

RUNS = Path("outputs")  # every run's directory is under it: hydra.run.dir (run_dir) and hydra.sweep.dir start with it


def run_id() -> str:
    """HH-MM-SS-<microseconds>-<pid>: two runs started in the same second never share a directory."""
    return f"{datetime.now():%H-%M-%S-%f}-{os.getpid()}"


def run_stamp() -> str:
    """The last part of a run's directory: ``<date>_<HH-MM-SS>-<microseconds>-<pid>``, unique per run; under SLURM
    ``slurm-<job id>``, the same for every task of the job and for the job requeued (on another day too), so that a
    requeued job finds its checkpoints again."""
    job = slurm_job()
    return f"slurm-{job}" if job else f"{datetime.now():%Y-%m-%d}_{run_id()}"


def _hydra(root: DictConfig | None) -> DictConfig | None:
    """The Hydra node of the config being resolved (``_root_``), else the running app's.

    A sweep's directory is resolved by the sweeper before ``HydraConfig`` is set: read from the app's, it would
    name a sweep ``run`` (and put its multirun.yaml into ``outputs/multirun/run/``) while its jobs got the name."""
    if root is not None and "hydra" in root:
        return root.hydra
    return HydraConfig.get() if HydraConfig.initialized() else None


def parse_overrides(overrides: list[str]) -> list[Override]:
    return OverridesParser.create().parse_overrides([str(o) for o in overrides])


def run_name(data_path: str | None = None, train_path: str | None = None, *, _root_: DictConfig | None = None) -> str:
    """A run's name: ``name=...`` if given, else its experiment (``experiment=...``), else its corpus preset
    (``data=...``), else the corpus's name (``corpus_name``); safe as a directory name. Without ``data_path`` (in
    ``hydra.run.dir``, which must resolve on its own for ``--cfg hydra``) the ``data.path=`` override is used."""
    hydra = _hydra(_root_)
    overrides = {o.key_or_group: o.value() for o in parse_overrides(hydra.overrides.task)} if hydra else {}
    if overrides.get("name"):
        return safe_name(overrides["name"])
    choices = hydra.runtime.choices if hydra else {}
    name = choices.get("experiment")
    if name in (None, "null"):
        name = choices.get("data")
    if name in (None, "null", "text"):
        name = corpus_name(data_path or overrides.get("data.path"), train_path or overrides.get("data.train_path"))
    return safe_name(name)


def run_settings(limit: int = 120, *, _root_: DictConfig | None = None) -> str:
    """What sets a run apart, as a directory name: its overrides, sorted, ``,`` between them, without the keys of
    ``hydra.job.config.override_dirname.exclude_keys`` (paths and plumbing) or the one that gave the run its name
    (``experiment=``, ``data=``; ``data=text``, whose corpus names it).
    A dotted key is cut to its last part where that is still unambiguous: no other override ends in it and no
    top-level setting has it (``model.hidden_size=128,optim.lr=0.01`` -> ``hidden_size=128,lr=0.01``, but
    ``data.seed=1`` stays). At most ``limit`` characters; empty without overrides."""
    hydra = _hydra(_root_)
    if hydra is None:
        return ""
    exclude = set(hydra.job.config.override_dirname.exclude_keys)
    name = run_name(_root_=_root_)
    items = [
        (o.key_or_group, o.get_value_element_as_str())
        for o in parse_overrides(hydra.overrides.task)
        if o.get_key_element() not in exclude
        and not (o.key_or_group in ("experiment", "data") and safe_name(str(o.value())) in (name, "text"))
    ]
    top = set(_root_ or ()) - {"hydra"}
    leaves = [key.rsplit(".", 1)[-1] for key, _ in items]

    def short(key: str) -> str:
        leaf = key.rsplit(".", 1)[-1]
        return leaf if leaves.count(leaf) == 1 and leaf not in top else key

    text = ",".join(sorted(f"{short(key)}={value}" for key, value in items))
    return safe_name(text, limit) if text else ""


def run_dir(stamp: str, *, _root_: DictConfig | None = None) -> str:
    """``hydra.run.dir``: ``outputs/<name>/<settings>/<stamp>``; a resume from a run's checkpoint
    (``ckpt_path=<run>/checkpoints/last.ckpt``), that run's directory, so that the run goes on where it was: the
    same TensorBoard run, its steps continuing, and its checkpoints in place."""
    hydra = _hydra(_root_)
    ckpt = next((o.value() for o in parse_overrides(hydra.overrides.task) if o.key_or_group == "ckpt_path"), None)
    resumed = checkpoint_run(ckpt)
    if resumed is not None:
        return str(resumed)
    name, settings = run_name(_root_=_root_), run_settings(_root_=_root_)
    return str(RUNS / name / settings / stamp if settings else RUNS / name / stamp)


def checkpoint_run(ckpt: object) -> Path | None:
    """The run directory that holds the checkpoint file ``ckpt`` (``<run>/checkpoints/<name>.ckpt``), or None."""
    if not isinstance(ckpt, str) or not ckpt:
        return None
    path = Path(ckpt).expanduser()
    return path.parent.parent if path.parent.name == "checkpoints" and path.is_file() else None


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


def check_writable(output_dir: str | Path, ckpt_path: str | None) -> None:
    """Refuse a run directory (or its ``checkpoints/``) this process cannot write, a read-only mount or another
    user's folder, before anything is written: Hydra's record and Lightning's first save would end in a traceback."""
    run = Path(output_dir).expanduser()
    for folder in (run, run / "checkpoints"):
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            fix = (
                "copy the run somewhere writable (cp -r) and resume from the copy's checkpoints/last.ckpt"
                if ckpt_path
                else "pick another hydra.run.dir"
            )
            raise UserError(f"the run directory {str(output_dir)!r} is not writable; make it writable, or {fix}.")


def write_run_record(cfg: DictConfig) -> None:
    """Write Hydra's record of the run, ``.hydra/`` (``config.yaml``, ``hydra.yaml``, ``overrides.yaml``), into the
    run directory, as Hydra does when ``hydra.output_subdir`` is set; also for a config composed with its Hydra
    node (``compose(..., return_hydra_config=True)``), into ``paths.output_dir``; nothing for one without.

    Hydra writes its record before the task function runs, so a run refused for pointing at another run's
    directory, or a resume refused for a setting, would have replaced that run's record with its own. So
    train.yaml sets ``hydra.output_subdir: null``, and ``charlm.config.build`` calls this once the settings are
    accepted; for a run refused in a directory it created, ``charlm.runs.failed.set_aside_failed_run`` calls it, and
    moves the record out of the run directories. A Hydra callback could not write it later for every run: a
    sweep's jobs get no hook before Hydra's own write would be (``on_job_start`` comes after it), and a launcher's
    worker process would not see files restored by the parent. Only rank 0 calls this (DDP ranks > 0 re-run the
    script into its directory)."""
    if HydraConfig.initialized():
        hydra, out = HydraConfig.instance().cfg, Path(HydraConfig.get().runtime.output_dir)
    elif "hydra" in cfg:
        hydra, out = OmegaConf.create({"hydra": cfg.hydra}), Path(cfg.paths.output_dir).expanduser()
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    else:
        return
    if hydra.hydra.output_subdir is not None:  # set on the command line: Hydra has written it itself
        return
    record = out / ".hydra"
    record.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra), ("overrides.yaml", hydra.hydra.overrides.task)):
        text = OmegaConf.to_yaml(node).encode()
        write_atomic(record / name, lambda f, text=text: f.write(text))


def shown(path: str | Path) -> str:
    """``path`` as a user would type it: relative to the current directory where it is under it."""
    path = Path(path).expanduser().absolute()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


# A resume's own settings, never taken from the run it resumes
NOT_RESTORED = ("ckpt_path", "paths.output_dir", "overwrite_run_dir")


def run_overrides(overrides: list[str], in_run_dir: bool = False) -> list[str]:
    """For a resume from a run's checkpoint (``ckpt_path=<run>/checkpoints/last.ckpt``): the overrides that run was
    started with (``<run>/.hydra/overrides.yaml``) that ``overrides`` does not set again, so that a resume needs no
    more than ``ckpt_path=`` and its command line wins key by key. ``in_run_dir``: also
    ``paths.output_dir=<run>`` unless given (for ``compose``, which has no ``hydra.run.dir`` for ``run_dir``).

    They join the overrides Hydra composes, rather than being merged into its config afterwards: a restored
    ``model=gru`` picks its group's file, the checks see what will run, and the run's record lists them again."""
    try:
        given = parse_overrides(overrides)
    except Exception:  # a malformed override: Hydra reports it when it composes
        return []
    run = checkpoint_run(next((o.value() for o in given if o.key_or_group == "ckpt_path"), None))
    record = run / ".hydra" / "overrides.yaml" if run else None
    if record is None or not record.is_file():
        return []
    keys = {o.key_or_group for o in given}
    saved = _recorded_overrides(record)
    restored = [o.input_line for o in saved if o.key_or_group not in keys and o.key_or_group not in NOT_RESTORED]
    if in_run_dir and "paths.output_dir" not in keys:
        restored.append(f"paths.output_dir={hydra_quoted(str(run))}")
    return restored


def _recorded_overrides(record: Path) -> list[Override]:
    """The overrides a run's ``.hydra/overrides.yaml`` lists (a YAML list of ``key=value`` lines), or a UserError
    naming the file where it is damaged."""
    try:
        lines = OmegaConf.load(record)
        if not isinstance(lines, ListConfig) or not all(isinstance(line, str) for line in lines):
            raise ValueError("not a list of key=value lines")
        return parse_overrides(list(lines))
    except Exception as e:  # YAML's, OmegaConf's or Hydra's parse error, unreadable bytes
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{shown(record)} is damaged ({reason}); repair it (one '- key=value' line per override the run was"
            " started with), or delete it and give the run's settings again on the command line."
        ) from None


def command_line_with_run_overrides(argv: list[str]) -> list[str]:
    """``argv`` (``sys.argv``) with ``run_overrides`` added before its own overrides (as ``compose`` adds them: a
    ``~key`` of the resume then deletes what a restored ``+key.*`` added): Hydra's app reads its overrides from
    ``sys.argv``, and Lightning's DDP launcher starts the other ranks with it."""
    if not any(a.startswith("ckpt_path=") for a in argv[1:]):
        return argv
    from hydra._internal.utils import get_args_parser  # Hydra's own: which arguments are overrides

    args, _ = get_args_parser().parse_known_args(argv[1:])
    rest = list(argv[1:])
    for override in args.overrides:
        rest.remove(override)
    return [argv[0], *rest, *run_overrides(args.overrides), *args.overrides]


def hydra_quoted(value: str) -> str:
    """``value`` as a Hydra override's value: quoted where Hydra's grammar needs it (a run directory's ``=`` and
    ``,``)."""
    return value if re.fullmatch(r"[A-Za-z0-9_./+-]*", value) else "'" + value.replace("'", "\\'") + "'"


def resume_command(ckpt_path: str | Path) -> str:
    """The command that resumes a run from ``ckpt_path``, as it was started (``python train.py``, with this
    interpreter, or ``charlm-train``), to be pasted as printed."""
    script = Path(sys.argv[0])
    program = f"{shown(sys.executable)} {shown(script)}" if script.suffix == ".py" else "charlm-train"
    arg = "ckpt_path=" + hydra_quoted(shown(ckpt_path))
    plain = shlex.quote(arg) == arg or re.search(r'["$`\\!]', arg)  # else "...": reads better than '..'"'"'..'
    return f"{program} {shlex.quote(arg) if plain else chr(34) + arg + chr(34)}"
