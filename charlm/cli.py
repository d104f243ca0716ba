"""The two commands: ``charlm-train`` (``train.py``) and ``charlm-generate`` (``generate.py``).

Each is a Hydra app over the shipped configs (``charlm.config.CONF_DIR``); add your own config directory with
``--config-dir DIR`` or ``hydra.searchpath=[file://DIR]``. Both turn a ``UserError`` into one line on stderr
and a non-zero exit.
"""

from __future__ import annotations

import sys

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from charlm import UserError, reported_user_errors
from charlm.callbacks import LastCheckpoint, PreemptionCheckpoint, TextSample
from charlm.config import CONF_DIR, build
from charlm.module import STAGES, CharLM, load_checkpoint
from charlm.sampling import SamplingConfig, sample_text, stream_text


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
        # The same prompt and settings as the TensorBoard samples (callbacks.text_sample.*) where there are any.
        shown = next((c for c in trainer.callbacks if isinstance(c, TextSample)), None)
        prompt, sampling = (shown.prompt, shown.sampling) if shown else ("", SamplingConfig())
        text = sample_text(model.net, model.vocab, prompt, cfg.sample_length, sampling, unknown="skip", generator=gen)[
            0
        ]
        print(f"sample ({weights} weights, temperature {sampling.temperature}):\n{text}\n")
    if best:
        print(f"checkpoints: {best} (best val loss), {last or '-'} (last)")
    if trainer.loggers:
        print(f"tensorboard: tensorboard --logdir {trainer.loggers[0].log_dir}   (all runs: --logdir outputs)")


def sample(cfg: DictConfig) -> list[str]:
    """Stream one sample to stdout as it is produced, or print ``num_samples`` samples made in one batch."""
    if not cfg.ckpt:
        raise UserError("no checkpoint given; pass ckpt=PATH/TO/best.ckpt.")
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else str(cfg.device).replace("auto", "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise UserError(f"device={cfg.device} is not a device; pass device=cpu, cuda, cuda:N or auto.") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={cfg.device} but no CUDA GPU is available; pass device=cpu.")
    sampling = SamplingConfig(
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p
    )  # checked before the checkpoint is read
    overrides = {"impl": cfg.impl} if cfg.impl else {}
    model = load_checkpoint(cfg.ckpt, map_location=device, **overrides).eval()
    gen = torch.Generator(device).manual_seed(cfg.seed)
    pieces = stream_text(
        model.net,
        model.vocab,
        cfg.prompt,
        cfg.length,
        sampling,
        num_samples=cfg.num_samples,
        unknown=cfg.unknown,
        generator=gen,
    )
    if cfg.num_samples == 1:
        out = []
        for (piece,) in pieces:
            out.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return ["".join(out)]
    texts = ["".join(chunks) for chunks in zip(*pieces, strict=True)]
    for i, text in enumerate(texts):
        print(f"--- sample {i + 1}/{len(texts)} ---\n{text}")
    return texts


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    """``charlm-train [overrides]``: train, test, print a sample; return the metric a sweeper minimises."""
    with reported_user_errors():
        metrics = train(cfg)
    return metrics.get(cfg.optimized_metric)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def generate_main(cfg: DictConfig) -> None:
    """``charlm-generate ckpt=PATH [overrides]``: sample text from a checkpoint."""
    with reported_user_errors():
        sample(cfg)
