"""The one assembly: where the configs live, the resolvers they use, ``compose(overrides)`` and ``build(cfg)``.

``charlm-train`` / ``train.py``, ``charlm-generate`` / ``generate.py``, the benchmarks and the tests all compose
and build through here, so a run in a test is the run a user gets.

Importing this module registers what the configs need and nothing else: the ``${charlm_*:}`` resolvers and the
``model/base``, ``data/base`` and ``sampling`` nodes, which Hydra builds from the Python defaults
(``RNNConfig`` + ``OptimConfig``, ``CharDataModule``'s signature, ``SamplingConfig``) so that no yaml file
restates a default; a group file lists only what it changes.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.plugins.environments import SLURMEnvironment

from charlm import UserError
from charlm.callbacks import NonFiniteGuard
from charlm.checkpoint import AtomicCheckpointIO, check_run_dir, other_runs_checkpoints, write_atomic
from charlm.data import CharDataModule
from charlm.hardware import default_precision, recipe_for
from charlm.model import RNNConfig
from charlm.module import CharLM, load_checkpoint
from charlm.optim import OptimConfig
from charlm.sampling import SamplingConfig
from charlm.slurm import SlurmRequeue, check_slurm_shape, requeued_resume_path, run_last_ckpt, slurm_job

PACKAGE = Path(__file__).resolve().parent


def _shipped(in_package: str, in_checkout: str) -> Path:
    """A wheel carries conf/ and data/ inside the package (see pyproject.toml); a checkout has them beside it."""
    inside = PACKAGE / in_package
    return inside if inside.is_dir() else PACKAGE.parent / in_checkout


CONF_DIR = _shipped("conf", "conf")  # train.yaml, generate.yaml and the config groups
DATA_DIR = _shipped("corpora", "data")  # the shipped corpora: timemachine.txt, tinyshakespeare.txt


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
    (``data=...``), else the corpus file's name; safe as a directory name. Without ``data_path`` (in
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


def corpus_name(path: str | None, train_path: str | None = None) -> str:
    """A corpus's short name: the file's stem, a folder's or glob's folder name, or a pre-split corpus's folder."""
    if train_path not in (None, "", "null", "None"):
        return Path(str(train_path)).expanduser().resolve().parent.name or "split"
    if path in (None, "", "null", "None"):
        return "run"
    p = Path(str(path)).expanduser()
    while any(c in p.name for c in "*?[") and p != p.parent:
        p = p.parent
    return (p.name if p.is_dir() or p != Path(str(path)).expanduser() else p.stem) or "run"


def safe_name(text: str, limit: int = 200) -> str:
    """``text`` as one directory name: path separators and other odd characters become ``_``; at most ``limit``."""
    return re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", str(text)).strip("._")[:limit] or "run"


def model_defaults() -> dict:
    """Every ``model.*`` setting with its Python default: the fields of RNNConfig and OptimConfig."""
    return {**asdict(RNNConfig()), **asdict(OptimConfig()), "betas": list(OptimConfig.betas)}


def data_defaults() -> dict:
    """Every ``data.*`` setting with its Python default: CharDataModule's signature (path is required)."""
    params = inspect.signature(CharDataModule.__init__).parameters.values()
    return {p.name: MISSING if p.default is p.empty else p.default for p in params if p.name != "self"}


def config_groups() -> str:
    """One line per config group with its options, as Hydra's ``$APP_CONFIG_GROUPS`` lists them (a user's config
    directory included) but without ``base``: the nodes built from the Python defaults, which every option of
    model/ and data/ starts from. For ``--help`` (conf/hydra/help/), while Hydra is composing."""
    loader = GlobalHydra.instance().config_loader()
    lines = []
    for group in sorted(g for g in loader.list_groups("") if g != "hydra"):
        options = [name for name in sorted(loader.get_group_options(group)) if name != "base"]
        lines.append(f"  {group}: {', '.join(options)}")
    return "\n".join(lines)


OmegaConf.register_new_resolver("charlm_data", lambda: str(DATA_DIR), replace=True)
OmegaConf.register_new_resolver("charlm_config_groups", config_groups, replace=True)
OmegaConf.register_new_resolver(
    "charlm_precision", lambda accelerator="auto": default_precision(accelerator)[0], replace=True
)
OmegaConf.register_new_resolver("charlm_recipe", recipe_for, replace=True)
OmegaConf.register_new_resolver("charlm_run_id", run_id, replace=True, use_cache=True)
OmegaConf.register_new_resolver("charlm_run_stamp", run_stamp, replace=True, use_cache=True)
OmegaConf.register_new_resolver("charlm_run_name", run_name, replace=True)
OmegaConf.register_new_resolver("charlm_safe_name", safe_name, replace=True)
_store = ConfigStore.instance()
_store.store(
    group="model", name="base", node={"_target_": "charlm.module.CharLM", "_convert_": "all"} | model_defaults()
)
_store.store(
    group="data", name="base", node={"_target_": "charlm.data.CharDataModule", "_convert_": "all"} | data_defaults()
)
_store.store(name="sampling", node=asdict(SamplingConfig()))


def compose(overrides: Sequence[str] = (), config_name: str = "train", return_hydra_config: bool = False) -> DictConfig:
    """The config that ``charlm-train`` (``config_name="train"``) or ``charlm-generate`` would run with."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


# Checkpoint settings that fix the shapes of the weights: a resume must not change them.
ARCHITECTURE = ("cell", "num_layers", "hidden_size", "proj_size", "embedding_size", "tie_weights", "layer_norm")


def check_resume(path: str, dm: CharDataModule, model_cfg: DictConfig) -> None:
    """Refuse, before training, a checkpoint that is missing, corrupt, newer than this charlm, diverged, or was
    trained on another vocab or another architecture."""
    saved = load_checkpoint(path)
    if saved.vocab != dm.vocab:
        raise UserError(f"checkpoint {path!r} was trained on a different vocab; resume with the same data config.")
    for name in ARCHITECTURE:
        if name in model_cfg and saved.hparams.get(name) != model_cfg[name]:
            raise UserError(
                f"checkpoint {path!r} has model.{name}={saved.hparams.get(name)} but this run asks for"
                f" {model_cfg[name]}; resume with model.{name}={saved.hparams.get(name)} or drop ckpt_path."
            )


MAX_TIME = re.compile(r"\d+:\d\d:\d\d:\d\d")


def check_trainer(cfg: DictConfig) -> None:
    """Type-check the Trainer settings (and the seed) that Lightning only checks once training runs, after files
    are written, or refuses without naming the fix."""
    t = cfg.trainer

    def whole(name: str, minimum: int) -> None:
        value = t.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise UserError(f"trainer.{name}={value!r} must be a whole number >= {minimum}; e.g. trainer.{name}=10.")

    for name, minimum in (
        ("max_epochs", -1),
        ("max_steps", -1),
        ("min_epochs", 0),
        ("log_every_n_steps", 1),
        ("num_nodes", 1),
    ):
        whole(name, minimum)
    for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "val_check_interval"):
        value = t.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
            raise UserError(f"trainer.{name}={value!r} must be a fraction (float) or a number of batches (int).")
    clip = t.get("gradient_clip_val")
    if clip is not None and (not isinstance(clip, int | float) or not math.isfinite(clip) or clip < 0):
        raise UserError(f"trainer.gradient_clip_val={clip!r} must be a finite number >= 0 (0 or null: no clipping).")
    max_time = t.get("max_time")
    if isinstance(max_time, str) and not MAX_TIME.fullmatch(max_time.strip()):
        raise UserError(f"trainer.max_time={max_time!r} is not DD:HH:MM:SS; e.g. trainer.max_time=00:00:05:00.")
    check_devices(t)
    check_slurm_shape(t.get("num_nodes", 1), t.get("devices"))
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise UserError(f"seed={seed!r} must be a whole number from 0 to 2**32 - 1; e.g. seed=0.")


def check_devices(t: DictConfig) -> None:
    """Refuse a device setting Lightning would refuse without naming the fix: no devices, or GPUs on a machine
    without CUDA."""
    devices = t.get("devices")
    if devices in (0, "0") or (isinstance(devices, int) and not isinstance(devices, bool) and devices < -1):
        raise UserError(
            f"trainer.devices={devices} is not a number of devices; pass trainer.devices=1 (or N, or -1 for all)."
        )
    accelerator = str(t.get("accelerator"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        if t.get("strategy") == "ddp":
            raise UserError(
                "trainer=ddp needs CUDA GPUs but none is visible; use trainer=ddp_cpu trainer.devices=N for"
                " processes on the CPU, or trainer=cpu."
            )
        raise UserError(
            f"trainer.accelerator={accelerator} needs a CUDA GPU but none is visible; use trainer=cpu or"
            " trainer.accelerator=auto."
        )


def write_run_record(cfg: DictConfig) -> None:
    """Write Hydra's record of the run, ``.hydra/`` (``config.yaml``, ``hydra.yaml``, ``overrides.yaml``), into the
    run directory, as Hydra does when ``hydra.output_subdir`` is set; nothing outside a Hydra app.

    train.yaml sets ``hydra.output_subdir: null``, and this writes nothing into a directory that holds another run's
    checkpoints (``other_runs_checkpoints``; ``check_run_dir`` then refuses the run), because Hydra writes the
    record before the task function runs: a run refused for pointing at another run's directory rewrote that
    run's record with its own config. Checking earlier in a Hydra callback would cover single runs only
    (``on_run_start``): a sweep's jobs get no hook before the write (``on_job_start`` comes after it), and
    snapshotting and restoring the old files would not survive a launcher's worker process. Only rank 0 calls
    this (DDP ranks > 0 re-run the script into its directory)."""
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


def check_recipe(cfg: DictConfig) -> None:
    """A budget preset with per-precision ``recipes``: ``recipe`` (picked by ``trainer.precision``, or set) must
    name one of them."""
    if "recipes" not in cfg:
        return
    if cfg.recipe not in cfg.recipes:
        names = " or ".join(f"recipe={name}" for name in cfg.recipes)
        raise UserError(
            f"recipe={cfg.recipe!r} is not a recipe of this experiment; pass {names}, or leave recipe out to pick"
            " the one tuned for trainer.precision."
        )


def build(cfg: DictConfig) -> tuple[CharDataModule, CharLM, pl.Trainer]:
    """Seed, then data -> model -> callbacks -> loggers -> Trainer, in that order; user errors surface before
    anything is written."""
    # Our datasets load in the main process and shard themselves by rank, so their __len__ is exact.
    warnings.filterwarnings("ignore", message=r".*IterableDataset.*has `__len__` defined")
    # CharDataModule.state_dict restores the position inside an epoch, which Lightning cannot see.
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended")
    requeued = requeued_resume_path(cfg.paths.output_dir)
    if requeued:  # a requeued SLURM job goes on from its own last.ckpt, whatever ckpt_path it was given
        if os.environ.get("SLURM_PROCID", "0") == "0":
            print(f"SLURM job {slurm_job()} was requeued: resuming from {requeued}", file=sys.stderr)
        cfg.ckpt_path = requeued
    rank_zero = os.environ.get("LOCAL_RANK", "0") == "0"  # DDP ranks > 0 re-run this script into rank 0's directory
    if rank_zero:
        write_run_record(cfg)  # also for a run that a bad setting stops below, as Hydra did: what was run
    check_trainer(cfg)
    check_recipe(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = instantiate(cfg.data)
    dm.check_sizes()  # fail before anything is built; setup() checks again with the real number of ranks
    if cfg.ckpt_path:
        check_resume(cfg.ckpt_path, dm, cfg.model)
    model = instantiate(cfg.model, vocab=dm.vocab.to_dict())
    if rank_zero:
        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        check_run_dir(cfg.paths.output_dir, cfg.ckpt_path, cfg.overwrite_run_dir, sweep=multirun)
    loggers = [instantiate(lg) for lg in (cfg.logger or {}).values() if lg]
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c]
    if not loggers:  # Lightning refuses a LearningRateMonitor without a logger: logger=none alone must work
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks.append(NonFiniteGuard(cfg.on_nonfinite, cfg.loss_limit))
    # A user's own trainer.plugins (e.g. a MixedPrecision plugin with its own GradScaler) join charlm's.
    plugins = [AtomicCheckpointIO(), *(instantiate(p) for p in cfg.trainer.get("plugins") or ())]
    if slurm_job() is not None:  # SlurmRequeue says why it, not Lightning's auto_requeue, saves and requeues
        callbacks.append(SlurmRequeue(run_last_ckpt(cfg.paths.output_dir)))
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    return dm, model, trainer
