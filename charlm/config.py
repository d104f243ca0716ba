"""The one assembly: where the configs live, what they need registered (``register``), ``compose(overrides)``
and ``build(cfg)``.

``charlm-train`` / ``train.py``, ``charlm-generate`` / ``generate.py``, the benchmarks and the tests all compose
and build through here, so a run in a test is the run a user gets. Importing this module registers nothing.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
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
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.plugins.environments import SLURMEnvironment

from charlm import UserError
from charlm.checks import choice, flag, number, required_ckpt, whole
from charlm.data.datamodule import CharDataModule
from charlm.hardware import default_precision, recipe_for
from charlm.infer.generation import GenerationConfig
from charlm.nn.rnn import ARCHITECTURE, RNNConfig
from charlm.runs.console import ignore_known_warnings
from charlm.runs.dirs import (
    check_run_dir,
    check_writable,
    run_dir,
    run_id,
    run_name,
    run_overrides,
    run_settings,
    run_stamp,
    write_run_record,
)
from charlm.runs.failed import release_run_logs
from charlm.runs.slurm import SlurmRequeue, check_slurm_shape, requeued_resume_path, run_last_ckpt, slurm_job
from charlm.training.callbacks import NonFiniteGuard
from charlm.training.checkpoint import AtomicCheckpointIO
from charlm.training.finetune import architecture_from, copy_weights, parse_freeze
from charlm.training.lightning_errors import settings_refused
from charlm.training.module import CharLM, load_checkpoint
from charlm.training.optim import OptimConfig

PACKAGE = Path(__file__).resolve().parent
REPORTED = ("train", "val", "val_full", "test")  # val_full: the whole val split after training on data.val_chars


# The modules that moved into packages in 0.3.0: a config whose ``_target_`` names an old one is told the new name.
MOVED = {
    "charlm.vocab": "charlm.data.vocab",
    "charlm.chunks": "charlm.data.chunks",
    "charlm.archives": "charlm.data.archives",
    "charlm.corpus": "charlm.data.corpus",
    "charlm.cache": "charlm.data.cache",
    "charlm.batches": "charlm.data.batches",
    "charlm.data": "charlm.data.datamodule",
    "charlm.cells": "charlm.nn.cells",
    "charlm.mincells": "charlm.nn.mincells",
    "charlm.model": "charlm.nn.rnn",
    "charlm.stepper": "charlm.nn.stepper",
    "charlm.generation": "charlm.infer.generation",
    "charlm.beam": "charlm.infer.beam",
    "charlm.optim": "charlm.training.optim",
    "charlm.checkpoint": "charlm.training.checkpoint",
    "charlm.resume": "charlm.training.resume",
    "charlm.finetune": "charlm.training.finetune",
    "charlm.module": "charlm.training.module",
    "charlm.callbacks": "charlm.training.callbacks",
    "charlm.lightning_errors": "charlm.training.lightning_errors",
    "charlm.slurm": "charlm.runs.slurm",
    "charlm.runs": "charlm.runs.dirs",
    "charlm.failed": "charlm.runs.failed",
    "charlm.sweeps": "charlm.runs.sweeps",
    "charlm.board": "charlm.runs.board",
    "charlm.console": "charlm.runs.console",
}


def check_targets(cfg: DictConfig) -> None:
    """Refuse a ``_target_`` (a user's own config file) that names a charlm module by its path before 0.3.0."""

    def walk(node: object, key: str) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                walk(value, f"{key}.{name}" if key else str(name))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{key}[{i}]")
        elif key.endswith("_target_") and isinstance(node, str) and node.rpartition(".")[0] in MOVED:
            module, _, name = node.rpartition(".")
            raise UserError(
                f"{key}={node} names a module of charlm before 0.3.0; {module} is now {MOVED[module]}:"
                f" write {MOVED[module]}.{name}."
            )

    walk(OmegaConf.to_container(cfg, resolve=False), "")


def _shipped(in_package: str, in_checkout: str) -> Path:
    """A wheel carries conf/ and data/ inside the package (see pyproject.toml); a checkout has them beside it."""
    inside = PACKAGE / in_package
    return inside if inside.is_dir() else PACKAGE.parent / in_checkout


CONF_DIR = _shipped("conf", "conf")  # train.yaml, generate.yaml and the config groups
DATA_DIR = _shipped("corpora", "data")  # the shipped corpora: timemachine.txt, tinyshakespeare.txt


# Settings that moved: the old key still works, with a one-line notice. Its node keeps it as an interpolation of
# the new key, so that overrides, sweeps and search spaces over the old key compose; ``move_renamed`` then moves
# a value set on it to the new key.
RENAMED = {f"model.{f.name}": f"optim.{f.name}" for f in fields(OptimConfig)} | {"data.sampling": "data.batch_order"}
_noticed: set[str] = set()  # old keys already reported in this process


def old_keys(group: str) -> dict[str, str]:
    """The old keys of ``group``'s node, each interpolating the key it moved to."""
    return {old.split(".", 1)[1]: f"${{{new}}}" for old, new in RENAMED.items() if old.startswith(f"{group}.")}


def move_renamed(cfg: DictConfig) -> DictConfig:
    """Move the value of each old key that a config file or an override set to its new key, and drop the old
    keys; a value set on an old key wins over its new key's. Says so once per key and process, on stderr."""
    for old, new in RENAMED.items():
        group, key = old.split(".", 1)
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or key not in node:
            continue
        value = OmegaConf.to_container(node, resolve=False)[key]
        with open_dict(node):
            del node[key]
        if value == f"${{{new}}}":
            continue
        OmegaConf.update(cfg, new, value, merge=False)
        if old not in _noticed and os.environ.get("LOCAL_RANK", "0") == "0":  # DDP ranks > 0 re-run the script
            _noticed.add(old)
            print(f"note: {old} is now {new}; {old} still works", file=sys.stderr)
    return cfg


def model_defaults() -> dict:
    """Every ``model.*`` setting with its Python default: the fields of RNNConfig."""
    return asdict(RNNConfig())


def optim_defaults() -> dict:
    """Every ``optim.*`` setting with its Python default: the fields of OptimConfig."""
    return asdict(OptimConfig()) | {"betas": list(OptimConfig.betas)}


def data_defaults() -> dict:
    """Every ``data.*`` setting with its Python default: CharDataModule's signature (path is required)."""
    params = inspect.signature(CharDataModule.__init__).parameters.values()
    # base_vocab is known at run time only (build passes it), as the model's vocab is: no setting.
    skipped = ("self", "base_vocab")
    return {p.name: MISSING if p.default is p.empty else p.default for p in params if p.name not in skipped}


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


def register() -> None:
    """Register what the shipped configs need: the ``${charlm_*:}`` resolvers, and the ``model/base``,
    ``optim/base``, ``data/base`` and ``generation`` nodes, which Hydra builds from the Python defaults so that no
    yaml file restates a default. ``compose`` and the apps (``charlm-train``, ``charlm-generate``) call it before
    Hydra composes; calling it again changes nothing."""
    resolvers = {
        "charlm_data": lambda: str(DATA_DIR),
        "charlm_config_groups": config_groups,
        "charlm_precision": lambda accelerator="auto": default_precision(accelerator)[0],
        "charlm_recipe": recipe_for,
        "charlm_run_name": run_name,
        "charlm_run_settings": run_settings,
        "charlm_run_dir": run_dir,
    }
    for name, resolver in resolvers.items():
        OmegaConf.register_new_resolver(name, resolver, replace=True)
    for name, resolver in (("charlm_run_id", run_id), ("charlm_run_stamp", run_stamp)):  # one value per run
        OmegaConf.register_new_resolver(name, resolver, replace=True, use_cache=True)
    store = ConfigStore.instance()
    model = {"_target_": "charlm.training.module.CharLM", "_convert_": "all"} | model_defaults() | old_keys("model")
    store.store(group="model", name="base", node=model)
    store.store(group="optim", name="base", node=optim_defaults())
    data = (
        {"_target_": "charlm.data.datamodule.CharDataModule", "_convert_": "all"} | data_defaults() | old_keys("data")
    )
    store.store(group="data", name="base", node=data)
    store.store(name="generation", node=asdict(GenerationConfig()))


def compose(overrides: Sequence[str] = (), config_name: str = "train", return_hydra_config: bool = False) -> DictConfig:
    """The config that ``charlm-train`` (``config_name="train"``) or ``charlm-generate`` would run with; a resume from
    a run's checkpoint with that run's overrides, into its directory (``charlm.runs.dirs.run_overrides``)."""
    register()
    if config_name == "train":
        overrides = [*run_overrides(list(overrides), in_run_dir=True), *overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
    return move_renamed(cfg)


def check_resume(path: str, saved: CharLM, dm: CharDataModule, cfg: DictConfig) -> None:
    """Refuse, before training, the checkpoint ``saved`` (``load_checkpoint`` has refused one that is missing,
    corrupt, newer than this charlm or diverged) if it was trained on another vocab, another architecture or
    with other parts frozen."""
    if saved.vocab != dm.vocab:
        raise UserError(f"checkpoint {path!r} was trained on a different vocab; resume with the same data config.")
    for name in ARCHITECTURE:
        if name in cfg.model and saved.hparams.get(name) != cfg.model[name]:
            raise UserError(
                f"checkpoint {path!r} has model.{name}={saved.hparams.get(name)} but this run asks for"
                f" {cfg.model[name]}; resume with model.{name}={saved.hparams.get(name)} or drop ckpt_path."
            )
    frozen, asked = saved.hparams.get("freeze", "none"), str(parse_freeze(cfg.freeze))
    if frozen != asked:  # the optimiser state holds the trainable parameters only
        raise UserError(f"checkpoint {path!r} was trained with freeze={frozen}; resume with freeze={frozen}.")


def command_line(cfg: DictConfig) -> list[str]:
    """The overrides given on the command line, as Hydra records them: in an app, or in a config composed with
    ``return_hydra_config``; none for a config made otherwise."""
    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return list(OmegaConf.select(cfg, "hydra.overrides.task", default=None) or [])


def load_start(cfg: DictConfig) -> tuple[CharLM | None, CharLM | None]:
    """The checkpoints a run starts from: ``init_from``'s and ``ckpt_path``'s, each checked as ``load_checkpoint``
    checks it; at most one of them. ``init_from``'s architecture is set in ``cfg.model``, and so is that of a run
    it started, resumed."""
    if cfg.init_from and cfg.ckpt_path:
        raise UserError(
            "init_from and ckpt_path are both given; pass init_from alone to start a new run from a checkpoint's"
            " weights, or ckpt_path alone to resume its run exactly."
        )
    if cfg.ckpt_path:
        saved = load_checkpoint(cfg.ckpt_path, resume=True)
        if saved.hparams.get("init_from"):  # its architecture is the one init_from gave it, not the config's
            architecture_from(cfg.model, saved.hparams, command_line(cfg), cfg.ckpt_path, refuse=False)
        return None, saved
    if not cfg.init_from:
        if str(parse_freeze(cfg.freeze)) != "none":
            raise UserError(
                f"freeze={cfg.freeze} keeps weights that init_from brings; pass init_from=PATH, or drop freeze."
            )
        return None, None
    cfg.init_from = str(required_ckpt(cfg.init_from, key="init_from"))  # a run directory: its best.ckpt
    start = load_checkpoint(cfg.init_from)
    architecture_from(cfg.model, start.hparams, command_line(cfg), cfg.init_from)
    return start, None


MAX_TIME = re.compile(r"\d+:\d\d:\d\d:\d\d")


def check_trainer(cfg: DictConfig) -> None:
    """Type-check the Trainer settings (and the seed) that Lightning only checks once training runs, after files
    are written, or refuses without naming the fix."""
    t = cfg.trainer
    for name, minimum in (
        ("max_epochs", -1),
        ("max_steps", -1),
        ("min_epochs", 0),
        ("log_every_n_steps", 1),
        ("num_nodes", 1),
    ):
        if t.get(name) is not None:
            whole(f"trainer.{name}", t.get(name), minimum, example=10)
    # Lightning divides by these without checking them (a ZeroDivisionError once fit has begun)
    if t.get("accumulate_grad_batches") is not None:
        whole("trainer.accumulate_grad_batches", t.accumulate_grad_batches, 1, example="1 (no accumulation)")
    if t.get("check_val_every_n_epoch") is not None:
        whole("trainer.check_val_every_n_epoch", t.check_val_every_n_epoch, 1, example="1 (null: by steps)")
    for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "val_check_interval"):
        value = t.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
            raise UserError(f"trainer.{name}={value!r} must be a fraction (float) or a number of batches (int).")
    if t.get("gradient_clip_val") is not None:
        number("trainer.gradient_clip_val", t.gradient_clip_val, 0, example="1.0 (0 or null: no clipping)")
    max_time = t.get("max_time")
    if isinstance(max_time, str) and not MAX_TIME.fullmatch(max_time.strip()):
        raise UserError(f"trainer.max_time={max_time!r} is not DD:HH:MM:SS; e.g. trainer.max_time=00:00:05:00.")
    check_devices(t)
    check_slurm_shape(t.get("num_nodes", 1), t.get("devices"))
    whole("seed", cfg.get("seed"), 0, maximum=2**32 - 1, example=0)


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


def check_run_end(cfg: DictConfig) -> None:
    """The settings a run uses only once it has trained (the sample it prints, the test, the metric it returns to
    a sweeper), checked before it trains."""
    whole("sample_length", cfg.get("sample_length"), 0, example="200 (0: none)")
    flag("test", cfg.get("test"))
    bits = "bpb" if cfg.data.get("unit") == "byte" else "bpc"
    metrics = [f"{stage}/{name}" for stage in REPORTED for name in ("loss", "ppl", bits)]
    choice("optimized_metric", cfg.get("optimized_metric"), metrics)
    sample = (cfg.get("callbacks") or {}).get("text_sample")
    if sample:
        whole("callbacks.text_sample.length", sample.get("length", 200), 0, example="200")


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
    anything is written into the run directory: its record (``.hydra/``) and ``train.log`` only once all of them
    are checked, so that a refused command changes nothing there."""
    move_renamed(cfg)  # a config from the Hydra app; compose() has moved them already
    check_targets(cfg)
    ignore_known_warnings()
    requeued = requeued_resume_path(cfg.paths.output_dir)
    if requeued:  # a requeued SLURM job goes on from its own last.ckpt, whatever ckpt_path it was given
        if os.environ.get("SLURM_PROCID", "0") == "0":
            print(f"SLURM job {slurm_job()} was requeued: resuming from {requeued}", file=sys.stderr)
        cfg.ckpt_path, cfg.init_from = requeued, None  # the run's own checkpoint records its init_from
    rank_zero = os.environ.get("LOCAL_RANK", "0") == "0"  # DDP ranks > 0 re-run this script into rank 0's directory
    if rank_zero:
        check_writable(cfg.paths.output_dir, cfg.ckpt_path)
    check_trainer(cfg)
    check_run_end(cfg)
    check_recipe(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    start, saved = load_start(cfg)
    # A run that init_from started reads its corpus in the vocab it extended, and so does its resume.
    base = start or (saved if saved is not None and saved.hparams.get("init_from") else None)
    dm = instantiate(cfg.data, base_vocab=None if base is None else base.vocab.to_dict())
    dm.check_sizes()  # fail before anything is built; setup() checks again with the real number of ranks
    if saved is not None:
        check_resume(cfg.ckpt_path, saved, dm, cfg)
    origin = {"init_from": (saved.hparams.get("init_from") if saved else cfg.init_from), "freeze": cfg.freeze}
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    with settings_refused(cfg, "model"):  # a model too large to allocate
        model = instantiate(cfg.model, vocab=dm.vocab.to_dict(), **origin, **optim)
    if start is not None:
        new_chars = "".join(dm.vocab.chars[len(start.vocab) :]) if dm.vocab.unit == "char" else ""
        copy_weights(model.net, start.net, new_chars)
        if rank_zero and new_chars:
            print(f"init_from: {len(new_chars)} characters new to the vocab: {new_chars!r}", file=sys.stderr)
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
    with settings_refused(cfg, "trainer"):  # a trainer.* value Lightning refuses
        trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    if rank_zero:
        write_run_record(cfg)
    release_run_logs()
    return dm, model, trainer
