"""The two commands: ``charlm-train`` (``train.py``) and ``charlm-generate`` (``generate.py``).

Each is a Hydra app over the shipped configs (``charlm.config.CONF_DIR``); add your own config directory with
``--config-dir DIR`` or ``hydra.searchpath=[file://DIR]``. Both turn a ``UserError`` into one line on stderr
and a non-zero exit.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from charlm import Interrupted, UserError, reported_user_errors
from charlm.config import CONF_DIR, REPORTED, build, register
from charlm.infer.beam import beam_search
from charlm.infer.generation import GenerationConfig, sample_text, stream_text
from charlm.infer.options import SampleOptions
from charlm.overrides import check_overrides, failed_jobs, hydra_errors_reported
from charlm.runs.board import log_hparams
from charlm.runs.console import header, log
from charlm.runs.dirs import command_line_with_run_overrides, resume_command
from charlm.runs.failed import failed_run_set_aside
from charlm.training.callbacks import LastCheckpoint, PreemptionCheckpoint, TextSample
from charlm.training.checkpoint import write_atomic
from charlm.training.lightning_errors import settings_refused
from charlm.training.module import CharLM, load_checkpoint


def train(cfg: DictConfig) -> dict[str, float]:
    """Build, fit, test; return the final metrics. Rank 0 logs the header line and the report (``charlm.runs.console``)
    and writes ``metrics.json`` into the run directory; a run that fails before its first checkpoint is set aside
    (``charlm.runs.failed``)."""
    start = time.monotonic()
    with failed_run_set_aside(cfg):
        try:
            dm, model, trainer = build(cfg)
        except KeyboardInterrupt:  # e.g. while the token cache is built: its temporary folder goes, never moved in
            raise Interrupted(
                "stopped by Ctrl+C before training began; nothing was trained and no partial token cache is kept:"
                " run the command again."
            ) from None
        if trainer.is_global_zero:
            log.info(header(cfg, dm, model, trainer))
        try:
            with settings_refused(cfg, "fit"):  # what Lightning refuses once it knows the data (val_check_interval)
                trainer.fit(model, datamodule=dm, ckpt_path=cfg.ckpt_path, weights_only=True)
        except (KeyboardInterrupt, SystemExit) as e:  # SIGTERMException is a SystemExit too
            stop = next((c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)), None)
            if isinstance(e, KeyboardInterrupt) or (stop and stop.at_once):  # a second Ctrl+C (Lightning exits 1)
                last = Path(stop.ckpt_path) if stop else Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
                saved = last.is_file()
                kept = f"{last.name} is whole: resume: {resume_command(last)}" if saved else "nothing was saved"
                step = trainer.global_step + 1
                raise Interrupted(f"stopped at once by a second Ctrl+C in step {step}; {kept}.") from None
            if not isinstance(e, SIGTERMException):
                raise
            # SIGTERM or one Ctrl+C: PreemptionCheckpoint has written last.ckpt
            name = stop.signal if stop else "SIGTERM"
            where = f"; resume: {resume_command(stop.ckpt_path)}" if stop else ""
            log.warning(f"stopped by {name} after step {trainer.global_step}{where}")
            raise SystemExit(130 if name == "SIGINT" else 143) from None
    epoch_metrics = [f"{stage}/{name}" for stage in REPORTED for name in ("loss", "ppl", model.vocab.bits)]
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in epoch_metrics}
    best_cb = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)
    last_cb = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
    best = best_cb.best_model_path if best_cb else ""
    last = str(last_cb.path) if last_cb and last_cb.path.is_file() else ""
    if dm.val_is_cut:  # validation during training saw data.val_chars of the val split: now all of it
        dm.full_val, model.val_name = True, "val_full"
        with settings_refused(cfg, "fit"):
            trainer.validate(model, datamodule=dm, ckpt_path=best or None, weights_only=True, verbose=False)
        metrics |= {k: float(v) for k, v in trainer.callback_metrics.items() if k in epoch_metrics}
    run_test = bool(cfg.test and dm.splits[2] > 0)
    if run_test:
        with settings_refused(cfg, "fit"):
            trainer.test(model, datamodule=dm, ckpt_path=best or None, weights_only=True, verbose=False)
        metrics |= {k: float(v) for k, v in trainer.callback_metrics.items() if k in epoch_metrics}
    log_hparams(cfg, trainer, metrics)
    if trainer.is_global_zero:
        report(cfg, trainer, model, metrics, "best" if run_test and best else "final", best, last)
        record = {
            "metrics": metrics,
            "checkpoints": {"best": best or None, "last": last or None},
            "precision": str(trainer.precision),
            "recipe": cfg.get("recipe"),
            "wall_time_s": round(time.monotonic() - start, 3),
            "global_step": trainer.global_step,
        }
        text = json.dumps(record, indent=2).encode()
        write_atomic(Path(cfg.paths.output_dir) / "metrics.json", lambda f: f.write(text))
    return metrics


def report(
    cfg: DictConfig, trainer: pl.Trainer, model: CharLM, metrics: dict[str, float], weights: str, best: str, last: str
) -> None:
    """The lines after the progress bar: precision, metrics, a sample, where the checkpoints and TensorBoard are."""
    bits = model.vocab.bits
    recipe = f", recipe {cfg.recipe} (of the experiment's {', '.join(cfg.recipes)})" if "recipes" in cfg else ""
    log.info(f"precision: {trainer.precision}{recipe}")
    for stage in REPORTED:
        if f"{stage}/loss" in metrics:
            log.info(
                f"{stage}: loss {metrics[f'{stage}/loss']:.4f} nats | ppl {metrics[f'{stage}/ppl']:.3f}"
                f" | {bits} {metrics[f'{stage}/{bits}']:.4f}"
            )
    if cfg.sample_length:
        model.eval()
        gen = torch.Generator(model.device).manual_seed(cfg.seed)
        # The same prompt and settings as the TensorBoard samples (callbacks.text_sample.*) where there are any.
        shown = next((c for c in trainer.callbacks if isinstance(c, TextSample)), None)
        prompt, settings = (shown.prompt, shown.settings) if shown else ("", GenerationConfig())
        text = sample_text(model.net, model.vocab, prompt, cfg.sample_length, settings, unknown="skip", generator=gen)[
            0
        ]
        log.info(f"sample ({weights} weights, temperature {settings.temperature}):\n{text}\n")
    if best:
        log.info(f"checkpoints: {best} (best val loss), {last or '-'} (last)")
    if trainer.loggers:
        log.info(f"tensorboard: tensorboard --logdir {trainer.loggers[0].save_dir}   (all runs: --logdir outputs)")


def sample(cfg: DictConfig) -> list[str]:
    """Print samples from a checkpoint and return them (prompt included).

    ``format=text``: one sample streams to stdout as it is produced; several are printed one per block, each
    after a ``--- sample i/N ---`` line. ``format=jsonl``: one JSON object per sample and line,
    ``{"sample": i, "prompt": ..., "completion": ..., "stopped": true if the stop text ended it}``.
    ``beam=K``: the ``num_samples`` best beams instead, best first (``charlm.infer.beam``), each with its ``logprob``
    and ``score`` (in jsonl, and on its ``--- beam i/N ---`` line)."""
    opts = SampleOptions.from_config(cfg)  # every option checked, before the checkpoint is read
    prompt = opts.read_prompt()
    overrides = {"impl": opts.impl} if opts.impl else {}
    model = load_checkpoint(opts.ckpt, map_location=opts.device, **overrides).eval()
    default_threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads or default_threads)  # process-wide: set back when the samples are out
    try:
        return _print_samples(opts, model, prompt)
    finally:
        torch.set_num_threads(default_threads)


def _print_samples(opts: SampleOptions, model: CharLM, prompt: str) -> list[str]:
    if opts.beam:
        return _print_beams(opts, model, prompt)
    settings = opts.settings
    gen = torch.Generator(opts.device).manual_seed(opts.seed)
    pieces = stream_text(
        model.net,
        model.vocab,
        prompt,
        opts.length,
        settings,
        num_samples=opts.num_samples,
        unknown=opts.unknown,
        generator=gen,
        quantize=opts.quantize,
    )
    if opts.num_samples == 1 and opts.format == "text":
        out = []
        for (piece,) in pieces:
            out.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return ["".join(out)]
    texts = ["".join(chunks) for chunks in zip(*pieces, strict=True)]
    for i, text in enumerate(texts):
        if opts.format == "jsonl":
            completion = text[len(prompt) :]
            stopped = bool(settings.stop and completion) and text.endswith(settings.stop)
            record = {"sample": i + 1, "prompt": prompt, "completion": completion, "stopped": stopped}
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(f"--- sample {i + 1}/{len(texts)} ---\n{text}")
    return texts


def _print_beams(opts: SampleOptions, model: CharLM, prompt: str) -> list[str]:
    beams = beam_search(
        model.net,
        model.vocab,
        prompt,
        opts.length,
        opts.beam,
        num_samples=opts.num_samples,
        stop=opts.stop,
        length_penalty=opts.length_penalty,
        unknown=opts.unknown,
        quantize=opts.quantize,
    )
    for i, b in enumerate(beams):
        if opts.format == "jsonl":
            record = {"sample": i + 1, "prompt": prompt, "completion": b.completion, "stopped": b.stopped}
            print(json.dumps(record | {"logprob": b.logprob, "score": b.score}, ensure_ascii=False))
        elif len(beams) == 1:
            print(prompt + b.completion)
        else:
            print(f"--- beam {i + 1}/{len(beams)}: logprob {b.logprob:.4f}, score {b.score:.4f} ---")
            print(prompt + b.completion)
    return [prompt + b.completion for b in beams]


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _train_app(cfg: DictConfig) -> float | None:
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    logging.captureWarnings(True)  # warnings through the job's logging too: on stderr and into train.log
    try:
        with reported_user_errors(exit=not multirun, log=log):
            metrics = train(cfg)
    except UserError as e:  # a job of a sweep: Hydra records it (and Optuna the trial) as failed
        # also on the error itself, which a launcher's worker process sends back pickled, __dict__ included
        e.sweep_line = f"sweep job {HydraConfig.get().job.num} failed: {e}"
        e.sweep_dir = HydraConfig.get().sweep.dir
        failed_jobs.append(e.sweep_line)
        raise
    return metrics.get(cfg.optimized_metric)


def train_main() -> None:
    """``charlm-train [overrides]``: train, test, print a sample; return the metric a sweeper minimises.

    In a sweep (``-m``), a job with a bad config or a diverged run fails alone: the sweep goes on, and ends with
    one line per failed job and a non-zero exit when its sweeper gives up on failed jobs (Hydra's basic sweeper
    does, Optuna's below ``max_failure_rate`` does not)."""
    register()
    with hydra_errors_reported("train"):
        check_overrides(sys.argv[1:])
        sys.argv = command_line_with_run_overrides(sys.argv)  # a resume: the run's overrides, where not given again
        _train_app()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def _generate_app(cfg: DictConfig) -> None:
    with reported_user_errors():
        sample(cfg)


def generate_main() -> None:
    """``charlm-generate ckpt=PATH [overrides]``: sample text from a checkpoint."""
    register()
    with hydra_errors_reported("generate"):
        check_overrides(sys.argv[1:])
        _generate_app()
