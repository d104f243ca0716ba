"""The two commands: ``charlm-train`` (``train.py``) and ``charlm-generate`` (``generate.py``).

Each is a Hydra app over the shipped configs (``charlm.config.CONF_DIR``); add your own config directory with
``--config-dir DIR`` or ``hydra.searchpath=[file://DIR]``. Both turn a ``UserError`` into one line on stderr
and a non-zero exit.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from charlm import Interrupted, UserError, reported_user_errors, user_error_in
from charlm.beam import beam_search, check_beam
from charlm.board import log_hparams
from charlm.callbacks import LastCheckpoint, PreemptionCheckpoint, TextSample
from charlm.checkpoint import required_ckpt, write_atomic
from charlm.checks import choice, whole
from charlm.config import CONF_DIR, REPORTED, build, compose, register
from charlm.console import header, log
from charlm.failed import failed_run_set_aside
from charlm.generation import GenerationConfig, sample_text, stream_text, unescape
from charlm.lightning_errors import settings_refused
from charlm.module import CharLM, load_checkpoint
from charlm.overrides import check_overrides
from charlm.runs import command_line_with_run_overrides, resume_command
from charlm.sweeps import summarize, table


def train(cfg: DictConfig) -> dict[str, float]:
    """Build, fit, test; return the final metrics. Rank 0 logs the header line and the report (``charlm.console``)
    and writes ``metrics.json`` into the run directory; a run that fails before its first checkpoint is set aside
    (``charlm.failed``)."""
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


Format = Literal["text", "jsonl"]  # charlm-generate's output: streamed text | one JSON object per sample


def read_prompt(cfg: DictConfig) -> str:
    """``prompt`` (with its ``\\n``, ``\\t`` and ``\\\\`` escapes decoded) or the UTF-8 text of ``prompt_file``, as it
    is (never both); neither: start after a newline."""
    if cfg.prompt is not None and cfg.prompt_file is not None:
        raise UserError("prompt and prompt_file are both given; pass only one of them.")
    if cfg.prompt_file is None:
        return "" if cfg.prompt is None else unescape(str(cfg.prompt))
    path = Path(str(cfg.prompt_file)).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"prompt_file={str(path)!r} {what}; pass a UTF-8 text file.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"prompt_file={str(path)!r} is not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8."
        ) from None
    except OSError as e:
        raise UserError(f"prompt_file={str(path)!r} cannot be read ({e.strerror}); check its permissions.") from None


def resolve_device(value: object) -> str:
    """``device=`` of charlm-generate and charlm-score as a torch device name; ``auto``: cuda if there is one."""
    device = "cuda" if value == "auto" and torch.cuda.is_available() else str(value).replace("auto", "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise UserError(f"device={value} is not a device; pass device=cpu, cuda, cuda:N or auto.") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={value} but no CUDA GPU is available; pass device=cpu.")
    return device


def sample(cfg: DictConfig) -> list[str]:
    """Print samples from a checkpoint and return them (prompt included).

    ``format=text``: one sample streams to stdout as it is produced; several are printed one per block, each
    after a ``--- sample i/N ---`` line. ``format=jsonl``: one JSON object per sample and line,
    ``{"sample": i, "prompt": ..., "completion": ..., "stopped": true if the stop text ended it}``.
    ``beam=K``: the ``num_samples`` best beams instead, best first (``charlm.beam``), each with its ``logprob``
    and ``score`` (in jsonl, and on its ``--- beam i/N ---`` line)."""
    ckpt = required_ckpt(cfg.ckpt)
    choice("format", cfg.format, Format)
    device = resolve_device(cfg.device)
    threads = cfg.get("threads")
    if threads is not None:
        whole("threads", threads, 1, example="1 (null: torch's default)")
    # checked before the checkpoint is read
    stop = unescape(cfg.stop) if isinstance(cfg.stop, str) else cfg.stop  # 'stop="\\n\\n"': a blank line
    settings = GenerationConfig(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, stop=stop)
    if whole("beam", cfg.beam, 0, example="4 (0: sample)"):
        check_beam(cfg.beam, cfg.num_samples, cfg.length_penalty)
    prompt = read_prompt(cfg)
    overrides = {"impl": cfg.impl} if cfg.impl else {}
    model = load_checkpoint(ckpt, map_location=device, **overrides).eval()
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)  # process-wide: set back when the samples are out
    try:
        return _print_samples(cfg, model, prompt, settings, device)
    finally:
        torch.set_num_threads(default_threads)


def _print_samples(cfg: DictConfig, model: CharLM, prompt: str, settings: GenerationConfig, device: str) -> list[str]:
    if cfg.beam:
        return _print_beams(cfg, model, prompt, settings.stop)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    pieces = stream_text(
        model.net,
        model.vocab,
        prompt,
        cfg.length,
        settings,
        num_samples=cfg.num_samples,
        unknown=cfg.unknown,
        generator=gen,
        quantize=cfg.quantize,
    )
    if cfg.num_samples == 1 and cfg.format == "text":
        out = []
        for (piece,) in pieces:
            out.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return ["".join(out)]
    texts = ["".join(chunks) for chunks in zip(*pieces, strict=True)]
    for i, text in enumerate(texts):
        if cfg.format == "jsonl":
            completion = text[len(prompt) :]
            stopped = bool(settings.stop and completion) and text.endswith(settings.stop)
            record = {"sample": i + 1, "prompt": prompt, "completion": completion, "stopped": stopped}
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(f"--- sample {i + 1}/{len(texts)} ---\n{text}")
    return texts


def _print_beams(cfg: DictConfig, model: CharLM, prompt: str, stop: str | None) -> list[str]:
    beams = beam_search(
        model.net,
        model.vocab,
        prompt,
        cfg.length,
        cfg.beam,
        num_samples=cfg.num_samples,
        stop=stop,
        length_penalty=cfg.length_penalty,
        unknown=cfg.unknown,
        quantize=cfg.quantize,
    )
    for i, b in enumerate(beams):
        if cfg.format == "jsonl":
            record = {"sample": i + 1, "prompt": prompt, "completion": b.completion, "stopped": b.stopped}
            print(json.dumps(record | {"logprob": b.logprob, "score": b.score}, ensure_ascii=False))
        elif len(beams) == 1:
            print(prompt + b.completion)
        else:
            print(f"--- beam {i + 1}/{len(beams)}: logprob {b.logprob:.4f}, score {b.score:.4f} ---")
            print(prompt + b.completion)
    return [prompt + b.completion for b in beams]


_failed_jobs: list[str] = []  # one line for each job of a sweep that failed in this process (Hydra's basic launcher)


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
        _failed_jobs.append(e.sweep_line)
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


@contextmanager
def hydra_errors_reported(config_name: str):
    """Report what Hydra itself would print as a traceback or as advice to follow as one line naming the fix:
    a mistyped setting (Hydra advises ``+key=value``, which adds a key nothing reads: here the closest known key is
    named instead), and the failed jobs of a sweep, whose first error Hydra's basic sweeper re-raises at its end.

    Hydra prints an error inside its ``hydra.main`` and exits; with ``HYDRA_FULL_ERROR=1`` it re-raises it instead,
    so it is set here (not when the user set it: then Hydra reports as it does)."""
    if os.environ.get("HYDRA_FULL_ERROR") is not None:
        yield
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except KeyboardInterrupt:  # Ctrl+C outside training (composing, building the token cache, sampling)
        print(
            "error: stopped by Ctrl+C; nothing half-written is kept (a token cache is only ever moved in whole).",
            file=sys.stderr,
        )
        raise SystemExit(Interrupted.exit_code) from None
    except ConfigCompositionException as e:
        key = unknown_key(e)
        if key is None:  # what Hydra prints for a CompactHydraException
            cause = f"\n{e.__cause__}" if isinstance(e.__cause__, OmegaConfBaseException) else ""
            print(f"{e}{cause}", file=sys.stderr)
            raise SystemExit(1) from None
        known = known_keys(config_name)
        if key in known:  # a setting of the shipped config that this composition lost (e.g. a user's config file)
            line = f"{key} is not a setting of the config these choices compose; check the group choices given"
            print(f"error: {line} (the config: --cfg job).", file=sys.stderr)
            raise SystemExit(UserError.exit_code) from None
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        fix = f"did you mean {close[0]}" if close else "check its spelling"
        print(f"error: {key} is not a setting; {fix}? (all of them: --cfg job)", file=sys.stderr)
        raise SystemExit(UserError.exit_code) from None
    except Exception as e:
        cause = user_error_in(e)
        if cause is None:
            raise
        if getattr(cause, "sweep_dir", None):  # a sweeper that stops on a failed job skips SweepSummary's end
            print(table(summarize(cause.sweep_dir)))
        for line in _failed_jobs or [getattr(cause, "sweep_line", str(cause))]:  # jobs elsewhere: the first
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(cause.exit_code) from None
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


def unknown_key(error: ConfigCompositionException) -> str | None:
    """The dotted key of an override that names no setting (``model.hiden_size=64``), or None for other errors."""
    cause = error.__cause__
    if isinstance(cause, ConfigKeyError) and cause.full_key:
        return str(cause.full_key)
    found = re.match(r"Could not override '([^']+)'", str(error))
    return found.group(1) if found and isinstance(cause, ConfigAttributeError | ConfigKeyError) else None


def known_keys(config_name: str) -> list[str]:
    """Every dotted key of the shipped ``config_name`` config with its defaults, groups' nodes included."""

    def walk(node: object, prefix: str) -> list[str]:
        if not isinstance(node, dict):
            return []
        return [k for key, value in node.items() for k in (f"{prefix}{key}", *walk(value, f"{prefix}{key}."))]

    return walk(OmegaConf.to_container(compose(config_name=config_name)), "")
