"""Issue 30's faults, each driven through the command line: a setting used only at the end of a run is checked
before it trains; Lightning's and torch's own errors for a setting are one line naming it; a symlink loop in a
corpus glob is read once; the error text names what to type; Ctrl+C at any moment exits 130 with one line; a run
without a terminal logs its progress."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, assert_user_error, make_text, run_cli, run_module, split_record, tiny_overrides

QUICK = ("trainer.max_epochs=1", "logger=none", "callbacks=no_logger")


def refused_run(tmp_path: Path, corpus: Path, *extra: str) -> str:
    """Run train.py with ``extra`` into its own run directory; it must be refused before it trains: one line, exit
    2, no traceback, no run directory left (its record under .failed/) and no checkpoint anywhere. Returns the
    line without the record it names."""
    out = tmp_path / "run"
    proc = run_cli("train.py", *tiny_overrides(corpus, out, *QUICK, *extra), f"hydra.run.dir={out}")
    line, _ = split_record(assert_user_error(proc, "error: "))
    assert not out.exists() and not list(tmp_path.rglob("*.ckpt")), line
    return line


@pytest.mark.parametrize(
    "setting, match",
    [
        ("sample_length=-1", "sample_length=-1 must be a whole number >= 0"),
        ("sample_length=abc", "sample_length='abc' must be a whole number >= 0"),
        ("test=maybe", "test='maybe' must be true or false"),
        ("optimized_metric=val/los", "optimized_metric='val/los' is not known; use one of"),
        ("callbacks.text_sample.length=-5", "callbacks.text_sample.length=-5 must be a whole number >= 0"),
    ],
)
def test_settings_used_at_the_end_are_checked_before_training(tmp_path, corpus, setting, match):
    """On 52927c0 these trained the whole run (or up to the first validation) first: ``sample_length=-1`` was
    refused as ``length=-1`` after both checkpoints were written, and a mistyped ``optimized_metric`` was never
    refused (a sweep minimised None)."""
    extra = ["callbacks=default", "logger=tensorboard"] if setting.startswith("callbacks.") else []
    assert match in refused_run(tmp_path, corpus, *extra, setting)


@pytest.mark.parametrize(
    "setting, match",
    [
        # the Trainer's constructor: a ValueError, a MisconfigurationException, a TypeError, a ModuleNotFoundError
        ("trainer.precision=foo", "trainer.precision='foo' is refused by Lightning (Precision 'foo' is invalid)"),
        ("trainer.limit_train_batches=1.5", "trainer.limit_train_batches=1.5 is refused by Lightning"),
        ("trainer.devices=abc", "trainer.devices='abc' is refused by Lightning"),
        ("trainer.accelerator=tpu", "trainer.accelerator='tpu' is refused by Lightning (Requirement 'torch_xla"),
        # fit: Lightning's ValueError once it knows the epoch's length
        ("trainer.val_check_interval=100000", "trainer.val_check_interval=100000 is refused by Lightning"),
        # Lightning divides by these unchecked (a ZeroDivisionError): ours, up front
        ("+trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 must be a whole number >= 1"),
        ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch=0 must be a whole number >= 1"),
        # torch's allocator: the size asked, the memory there is, the settings that size it
        ("model.hidden_size=10000000", "the model's weights asked for 1.4 PiB of memory but "),
    ],
)
def test_lightning_and_torch_errors_are_one_line_naming_the_setting(tmp_path, corpus, setting, match):
    """Each ended in a Python traceback on 52927c0 (exit 1: an InstantiationException over Lightning's error, a
    ValueError from fit, a ZeroDivisionError, torch's DefaultCPUAllocator RuntimeError)."""
    line = refused_run(tmp_path, corpus, setting)
    assert match in line
    if setting.startswith("model."):
        assert "is available; lower model.hidden_size=10000000 or model.num_layers=2." in line


def test_a_group_chosen_twice_is_named(tmp_path, corpus):
    """52927c0: 'model.hidden_size is not a setting; did you mean model.hidden_size?' (without model.hidden_size
    on the line: an omegaconf ConfigAttributeError traceback, Missing key rnn_cfg)."""
    out = tmp_path / "run"
    proc = run_cli("train.py", *tiny_overrides(corpus, out, *QUICK, "model=gru", "model=rnn"))
    assert_user_error(proc, "model= is chosen twice (model=gru, model=rnn); pass one model= choice")
    assert not out.exists()


@pytest.mark.parametrize(
    "prompt, match",
    [
        ("prompt=a(b", "is not an override Hydra can read; quote its value for Hydra inside the shell's quotes:"),
        ("prompt=\udcff\udcfe", "prompt= holds bytes that are not UTF-8 text; pass UTF-8 text, or put the text in"),
    ],
)
def test_an_override_hydra_cannot_parse_says_how_to_pass_it(tiny_run, prompt, match):
    """52927c0: a hydra.errors.OverrideParseException traceback."""
    line = assert_user_error(run_cli("generate.py", f"ckpt={tiny_run.out}/checkpoints/best.ckpt", prompt), match)
    if "(" in prompt:
        assert line.endswith("""'prompt="a(b"'.""")


def test_a_resume_of_a_run_with_a_damaged_record_names_the_file(tmp_path, tiny_run):
    """52927c0: a yaml.parser.ParserError traceback."""
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.out, run)
    (run / ".hydra").mkdir(exist_ok=True)  # the shared run was trained in-process, without a record
    (run / ".hydra/overrides.yaml").write_text("- data=text\n- [broken\n", encoding="utf-8")
    proc = run_cli("train.py", f"ckpt_path={run}/checkpoints/last.ckpt")
    assert_user_error(proc, "/.hydra/overrides.yaml is damaged (")
    assert (run / ".hydra/overrides.yaml").read_text(encoding="utf-8") == "- data=text\n- [broken\n"


def test_an_export_into_a_folder_that_cannot_be_made_is_one_line(tmp_path, tiny_run):
    """52927c0: an OSError (NotADirectoryError) traceback from mkdir, after the export's work."""
    (tmp_path / "file").write_text("x", encoding="utf-8")
    proc = run_module("charlm.export", f"ckpt={tiny_run.out}/checkpoints/best.ckpt", f"out={tmp_path}/file/m.onnx")
    assert_user_error(proc, "which is a file; pass out= in a folder")


def test_a_second_ctrl_c_during_the_save_exits_130_with_the_checkpoint_whole(tmp_path, corpus):
    """The first Ctrl+C (after epoch 1, step 84) asks for a last.ckpt; the second comes while it is written.
    52927c0: a KeyboardInterrupt traceback, exit 1."""
    out = tmp_path / "run"
    probes = [
        "+callbacks.kill._target_=tests.probe.KillAt",
        "+callbacks.kill.step=90",
        "+callbacks.kill.signal=SIGINT",
        "+callbacks.again._target_=tests.probe.KillInSave",
        "+callbacks.again.phase=temp-written",
        "+callbacks.again.signal=SIGINT",
    ]
    args = tiny_overrides(corpus, out, "logger=none", "callbacks=no_logger", *probes)
    proc = run_cli("train.py", *args, f"hydra.run.dir={out}")
    line = assert_user_error(proc, "stopped at once by a second Ctrl+C in step ", code=130, started=True)
    assert "last.ckpt is whole: resume: " in line
    saved = torch.load(out / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 84  # the epoch end's, whole
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_a_run_without_a_terminal_logs_its_progress(tmp_path, corpus):
    """stdout is a pipe here: the plain progress line goes to stdout and train.log every 20 steps (and every
    30 s, which this run is too short to reach reliably: the clock's part is tested in-process below). 52927c0:
    the header, then nothing until the end (no callbacks.progress_log: refused as not a setting)."""
    out = tmp_path / "run"
    every = ("callbacks.progress_log.every_n_steps=40", "callbacks.progress_log.every_s=0")
    args = tiny_overrides(corpus, out, "logger=none", "callbacks=no_logger", *every)
    proc = run_cli("train.py", *args, f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = (out / "train.log").read_text(encoding="utf-8")
    lines = [line for line in logged.splitlines() if line.startswith("epoch ")]
    assert [line.split(" | ")[1] for line in lines] == ["step 40/168", "step 80/168", "step 120/168", "step 160/168"]
    assert "| val loss -" in lines[0] and "| val loss -" not in lines[-1]  # the last val once there is one
    assert lines[0] in proc.stdout


def test_the_progress_line_follows_its_clock(caplog):
    """Every 30 s of the injected clock, whatever the steps; nothing where a progress bar is watched."""
    import logging
    import types

    from charlm.training.callbacks import ProgressLog

    now = [0.0]
    cb = ProgressLog(every_s=30, clock=lambda: now[0], when="always")
    trainer = types.SimpleNamespace(
        progress_bar_callback=None,
        is_global_zero=True,
        global_step=0,
        current_epoch=0,
        estimated_stepping_batches=100,
        callback_metrics={"train/loss_step": torch.tensor(2.5)},
    )
    cb.on_train_start(trainer, None)
    steps = []
    with caplog.at_level(logging.INFO, logger="charlm"):
        for step, t in enumerate([10, 29.9, 30, 31, 59, 60.5, 200], start=1):
            trainer.global_step, now[0] = step, t
            before = len(caplog.records)
            cb.on_train_batch_end(trainer)
            if len(caplog.records) > before:
                steps.append(step)
    assert steps == [3, 6, 7]
    assert caplog.records[0].getMessage().startswith("epoch 0 | step 3/100 | train loss 2.5000 | val loss -")
    never = ProgressLog(when="never", clock=lambda: now[0])
    never.on_train_start(trainer, None)
    assert not never.active


def test_a_glob_through_a_symlink_loop_reads_each_file_once(tmp_path):
    """``books/loop -> .``: a ``**`` glob reaches books/a.txt as books/loop/a.txt, books/loop/loop/a.txt, ...
    52927c0 read each of them (40 times the characters here), silently."""
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text(make_text(3000, seed=1), encoding="utf-8")
    (books / "b.txt").write_text(make_text(3000, seed=2), encoding="utf-8")
    (books / "loop").symlink_to(".")
    short = ("trainer.max_steps=2", "test=false", "sample_length=0")

    def train_chars(pattern: str) -> tuple[int, str]:
        out = tmp_path / pattern.replace("*", "x").replace("/", "_")
        proc = run_cli("train.py", *tiny_overrides(books, out, *QUICK, *short), f"data.path={books}/{pattern}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return int(re.search(r"([\d,]+) train chars", proc.stdout)[1].replace(",", "")), proc.stderr

    looped, said = train_chars("**/*.txt")
    plain, _ = train_chars("*.txt")
    assert looped == plain
    assert re.search(r"skipped \d+ files reached twice through symlinks", said), said


def test_ctrl_c_while_the_token_cache_is_built_exits_130_and_keeps_no_partial_cache(tmp_path):
    """Ctrl+C once the cache's temporary folder exists (tokenizing a 40 MB corpus). 52927c0: a KeyboardInterrupt
    traceback."""
    corpus = tmp_path / "big.txt"
    corpus.write_text(make_text() * 7000, encoding="utf-8")
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train.py"), *tiny_overrides(corpus, out, *QUICK), f"hydra.run.dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not any(p.name.count(".tmp") for p in cache.glob("*")) and proc.poll() is None:
        assert time.monotonic() < deadline, "the cache was never started"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    done = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    assert_user_error(done, "stopped by Ctrl+C", code=130)
    assert not [p for p in cache.glob("*") if ".tmp" in p.name]  # the temporary folder went with it
    assert not list(cache.glob("*/tokens.npy")) or not list(cache.glob("*.tmp*"))
