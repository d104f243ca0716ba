"""Issue 30's faults, each driven through the command line: a setting used only at the end of a run is checked
before it trains; Lightning's and torch's own errors for a setting are one line naming it; a symlink loop in a
corpus glob is read once; the error text names what to type; Ctrl+C at any moment exits 130 with one line; a run
without a terminal logs its progress."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assert_user_error, run_cli, split_record, tiny_overrides

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
