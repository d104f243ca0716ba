"""What a run shows and keeps: one header line before the progress bar and no library chatter, warnings that
nobody knows still on stderr, ``train.log`` with the terminal's lines but not the progress bar, ``metrics.json``,
and a failed run's one line."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from tests.conftest import assert_user_error, make_text, run_cli, split_record, tiny_overrides

WARNING = "probe: a warning on nobody's list"
BAR = "━"  # the progress bar's


class Shown(NamedTuple):
    proc: subprocess.CompletedProcess
    out: Path


@pytest.fixture(scope="module")
def shown(tmp_path_factory) -> Shown:
    """``python train.py`` on the tiny corpus with the progress bar on, and a callback that raises an unknown
    warning as training starts."""
    tmp = tmp_path_factory.mktemp("console")
    corpus = tmp / "tiny.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    out = tmp / "run"
    probe = ["+callbacks.warn._target_=tests.probe.WarnAtStart", f"+callbacks.warn.message={WARNING!r}"]
    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=10", "trainer.limit_val_batches=3"]
    args = [*short, "trainer.limit_test_batches=3", "trainer.enable_progress_bar=true", f"hydra.run.dir={out}", *probe]
    proc = run_cli("train.py", *tiny_overrides(corpus, out, *args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Shown(proc, out)


def test_one_header_line_and_no_chatter_before_training(shown):
    lines = shown.proc.stdout.splitlines()
    assert re.fullmatch(
        rf"training lstm 2x32 \([\d.]+ K params\) on tiny \(vocab \d+, [\d,]+ train chars\)"
        rf" \| (32-true|bf16-mixed) \| {re.escape(str(shown.out))}",
        lines[0],
    ), lines[0]
    assert re.match(r"(Sanity Checking|Epoch 0/0) .*━", lines[1]), lines[:20]  # the progress bar: nothing between
    everything = shown.proc.stdout + shown.proc.stderr
    for chatter in ("litlogger", "LeafSpec", "was configured", "GPU available", "Total params", "`Trainer.fit`"):
        assert chatter not in everything, chatter


def test_a_resume_into_its_own_run_directory_shows_no_warning(shown):
    """Lightning warned that the checkpoint directory "exists and is not empty": it is the run's own."""
    last = shown.out / "checkpoints" / "last.ckpt"
    resume = [f"ckpt_path={last}", "~callbacks.warn", "trainer.max_epochs=2", "trainer.enable_progress_bar=false"]
    proc = run_cli("train.py", *resume)  # the record restores the warning probe: dropped
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].endswith(f"| resuming {last}")
    assert torch.load(last, weights_only=True)["epoch"] == 1


def test_an_unknown_warning_still_reaches_stderr_and_train_log(shown):
    warning, source = [line for line in shown.proc.stderr.splitlines() if line.strip()]  # Python's two lines
    assert warning.endswith(f"UserWarning: {WARNING}") and source.strip().startswith("warnings.warn("), warning
    assert WARNING in (shown.out / "train.log").read_text()


def test_train_log_holds_the_terminal_lines_but_not_the_progress_bar(shown):
    log = (shown.out / "train.log").read_text().splitlines()
    stdout = shown.proc.stdout.splitlines()
    report = [line for line in stdout if line.split(":")[0] in ("precision", "train", "val", "test", "checkpoints")]
    assert len(report) == 5, stdout
    assert log[0] == stdout[0] and all(line in log for line in report), log
    assert not any(BAR in line or line.startswith("Epoch") for line in log), log


def test_metrics_json_records_the_returned_metrics_and_the_run(tiny_run):
    record = json.loads((tiny_run.out / "metrics.json").read_text())
    assert record["metrics"] == tiny_run.metrics and {"val/loss", "test/bpc"} <= record["metrics"].keys()
    ckpts = tiny_run.out / "checkpoints"
    assert record["checkpoints"] == {"best": str(ckpts / "best.ckpt"), "last": str(ckpts / "last.ckpt")}
    assert record["precision"] in ("32-true", "bf16-mixed") and record["recipe"] is None
    assert record["global_step"] > 0 and record["wall_time_s"] > 0


def test_a_run_that_fails_in_training_shows_only_its_error_line(corpus, tmp_path):
    out = tmp_path / "nan"
    probe = ["+callbacks.nan._target_=tests.probe.NanLossAt", "+callbacks.nan.step=2", "logger=none"]
    proc = run_cli("train.py", *tiny_overrides(corpus, out, f"hydra.run.dir={out}", *probe))
    line = assert_user_error(proc, "training diverged at step 2", code=3)
    assert proc.stdout.splitlines()[0].startswith("training lstm 2x32")
    _, record = split_record(line)  # it failed before its first checkpoint: its record moved out of the runs
    assert (record / "train.log").read_text().splitlines()[-1] == line and not out.exists()


@pytest.mark.slow
def test_a_data_parallel_run_shows_its_header_once_and_no_warning_about_its_synced_metrics(corpus, tmp_path):
    out = tmp_path / "ddp"
    ddp = ["trainer=ddp_cpu", "trainer.devices=2", "trainer.max_epochs=1", "trainer.limit_train_batches=10"]
    ddp += ["trainer.limit_val_batches=3", "trainer.limit_test_batches=3", "sample_length=0", f"hydra.run.dir={out}"]
    proc = run_cli("train.py", *tiny_overrides(corpus, out, *ddp))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    assert [line for line in proc.stdout.splitlines() if line.startswith("training ")] == [proc.stdout.splitlines()[0]]
    assert json.loads((out / "metrics.json").read_text())["global_step"] > 0
