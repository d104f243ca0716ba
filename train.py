"""Train a character language model: ``python train.py [hydra overrides]``. Configs live in conf/."""

from __future__ import annotations

import math
import os
import re
import sys
import warnings
from datetime import datetime

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from charlm import ROOT, UserError, reported_user_errors
from charlm.callbacks import LastCheckpoint, NonFiniteGuard, PreemptionCheckpoint
from charlm.checkpoint import AtomicCheckpointIO, check_run_dir
from charlm.data import CharDataModule
from charlm.module import STAGES, CharLM, load_checkpoint
from charlm.sampling import sample_text


def fast_precision(accelerator: str = "auto") -> str:
    """``bf16-mixed`` where the hardware runs bf16 natively (a CUDA GPU with bf16, or an x86 CPU with
    AVX512-BF16 or AMX: ~1.8x faster LSTM training here), else ``32-true``: emulated bf16 would be slower."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    cpu_checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return "bf16-mixed" if any(getattr(torch.cpu, name, lambda: False)() for name in cpu_checks) else "32-true"


OmegaConf.register_new_resolver("charlm_root", lambda: str(ROOT), replace=True)
OmegaConf.register_new_resolver("charlm_precision", fast_precision, replace=True)
# Run directories: two runs started in the same second must not share one (microseconds and the pid).
OmegaConf.register_new_resolver(
    "charlm_run_id", lambda: f"{datetime.now():%H-%M-%S-%f}-{os.getpid()}", replace=True, use_cache=True
)
# Our datasets load in the main process and shard themselves by rank, so their __len__ is exact.
warnings.filterwarnings("ignore", message=r".*IterableDataset.*has `__len__` defined")
# CharDataModule.state_dict restores the position inside an epoch, which Lightning cannot see.
warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended")


ARCHITECTURE = ("cell", "num_layers", "hidden_size", "embedding_size", "tie_weights", "layer_norm")


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
    """Type-check the Trainer settings that Lightning only checks once training runs (after files are written)."""
    t = cfg.trainer

    def whole(name: str, minimum: int) -> None:
        value = t.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise UserError(f"trainer.{name}={value!r} must be a whole number >= {minimum}; e.g. trainer.{name}=10.")

    for name, minimum in (("max_epochs", -1), ("max_steps", -1), ("min_epochs", 0), ("log_every_n_steps", 1)):
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


def build(cfg: DictConfig) -> tuple[CharDataModule, CharLM, pl.Trainer]:
    """Seed, then data -> model -> callbacks -> loggers -> Trainer, in that order; user errors surface before
    anything is written."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    check_trainer(cfg)
    dm = instantiate(cfg.data)
    dm.check_sizes()  # fail before anything is built; setup() checks again with the real number of ranks
    if cfg.ckpt_path:
        check_resume(cfg.ckpt_path, dm, cfg.model)
    model = instantiate(cfg.model, vocab=dm.vocab.to_dict())
    if os.environ.get("LOCAL_RANK", "0") == "0":  # DDP ranks > 0 re-run this script into rank 0's directory
        check_run_dir(cfg.paths.output_dir, cfg.ckpt_path, cfg.overwrite_run_dir)
    loggers = [instantiate(lg) for lg in (cfg.logger or {}).values() if lg]
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c]
    if not loggers:  # Lightning refuses a LearningRateMonitor without a logger: logger=none alone must work
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks.append(NonFiniteGuard(cfg.on_nonfinite))
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    return dm, model, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    """Build, fit, test; return the final metrics."""
    dm, model, trainer = build(cfg)
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=cfg.ckpt_path, weights_only=True)
    except SIGTERMException:  # SIGTERM or Ctrl+C: PreemptionCheckpoint has written last.ckpt
        stop = next((c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)), None)
        name = stop.signal if stop else "SIGTERM"
        where = f"; resume with ckpt_path={stop.ckpt_path}" if stop else ""
        print(f"stopped by {name} after step {trainer.global_step}{where}", file=sys.stderr)
        raise SystemExit(130 if name == "SIGINT" else 143) from None
    epoch_metrics = [f"{stage}/{name}" for stage in STAGES for name in ("loss", "ppl", "bpc")]
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in epoch_metrics}
    best_cb = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)
    last_cb = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
    best = best_cb.best_model_path if best_cb else ""
    last = str(last_cb.path) if last_cb and last_cb.path.is_file() else ""
    run_test = bool(cfg.test and dm.splits[2] > 0)
    if run_test:
        trainer.test(model, datamodule=dm, ckpt_path=best or None, weights_only=True, verbose=False)
        metrics |= {k: float(v) for k, v in trainer.callback_metrics.items() if k in epoch_metrics}
    params = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(params, metrics={f"hp/{k.replace('/', '_')}": v for k, v in metrics.items()})

    if trainer.is_global_zero:
        report(cfg, trainer, model, metrics, "best" if run_test and best else "final", best, last)
    return metrics


def report(
    cfg: DictConfig, trainer: pl.Trainer, model: CharLM, metrics: dict[str, float], weights: str, best: str, last: str
) -> None:
    for stage in STAGES:
        if f"{stage}/loss" in metrics:
            print(
                f"{stage}: loss {metrics[f'{stage}/loss']:.4f} nats | ppl {metrics[f'{stage}/ppl']:.3f}"
                f" | bpc {metrics[f'{stage}/bpc']:.4f}"
            )
    if cfg.sample_length:
        model.eval()
        gen = torch.Generator(model.device).manual_seed(cfg.seed)
        prompt = cfg.callbacks.get("text_sample", {}).get("prompt", "") if cfg.callbacks else ""
        text = sample_text(
            model.net, model.vocab, prompt, cfg.sample_length, temperature=0.8, unknown="skip", generator=gen
        )[0]
        print(f"sample ({weights} weights, temperature 0.8):\n{text}\n")
    if best:
        print(f"checkpoints: {best} (best val loss), {last or '-'} (last)")
    if trainer.loggers:
        print(f"tensorboard: tensorboard --logdir {trainer.loggers[0].log_dir}   (all runs: --logdir outputs)")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with reported_user_errors():
        metrics = train(cfg)
    return metrics.get(cfg.optimized_metric)  # what a sweeper (e.g. Optuna) minimises


if __name__ == "__main__":
    main()
