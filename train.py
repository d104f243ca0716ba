"""Train a character language model: ``python train.py [hydra overrides]``. Configs live in conf/."""

from __future__ import annotations

import warnings

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from charlm import ROOT, UserError, reported_user_errors
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
# Our datasets load in the main process and shard themselves by rank, so their __len__ is exact.
warnings.filterwarnings("ignore", message=r".*IterableDataset.*has `__len__` defined")


def check_resume(path: str, dm: CharDataModule) -> None:
    """Refuse, before training, a checkpoint that is missing, corrupt, or was trained on another vocab."""
    if load_checkpoint(path).vocab != dm.vocab:
        raise UserError(f"checkpoint {path!r} was trained on a different vocab; resume with the same data config.")


def build(cfg: DictConfig) -> tuple[CharDataModule, CharLM, pl.Trainer]:
    """Seed, then data -> model -> callbacks -> loggers -> Trainer, in that order; user errors surface first."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = instantiate(cfg.data)
    dm.check_sizes()  # fail before anything is built; setup() checks again with the real number of ranks
    if cfg.ckpt_path:
        check_resume(cfg.ckpt_path, dm)
    model = instantiate(cfg.model, vocab=dm.vocab.to_dict())
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c]
    loggers = [instantiate(lg) for lg in (cfg.logger or {}).values() if lg]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return dm, model, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    """Build, fit, test; return the final metrics."""
    dm, model, trainer = build(cfg)
    trainer.fit(model, datamodule=dm, ckpt_path=cfg.ckpt_path, weights_only=True)
    epoch_metrics = [f"{stage}/{name}" for stage in STAGES for name in ("loss", "ppl", "bpc")]
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in epoch_metrics}
    ckpt_cb = trainer.checkpoint_callback
    best, last = (ckpt_cb.best_model_path, ckpt_cb.last_model_path) if ckpt_cb else ("", "")
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
