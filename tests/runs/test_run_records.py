"""A run's directory is the user's: a refused command changes nothing in it, charlm moves or writes only what it
created in this invocation, and a run whose directory was moved or copied stays whole (issue 30, classes 1 and 2).
All through the command line, as a user meets them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_user_error, make_text, run_cli, tiny_overrides

SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2"]
QUIET = ["trainer.precision=32-true", "logger=none", "callbacks=no_logger", "sample_length=0"]
# best.ckpt by a score that never improves after epoch 0 (tests.probe.RisingScore): a later validation that
# replaced it would be a worse model
RISING = ["+callbacks.rising._target_=tests.probe.RisingScore", "callbacks.model_checkpoint.monitor=probe/score"]


def files(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` (symlinks not followed), by relative path: its bytes and mtime."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = (path.read_bytes(), path.stat().st_mtime_ns)
    return out


def train_cli(tmp: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """A tiny run into ``out`` through train.py, which must finish; its corpus and cache under ``tmp``."""
    corpus = tmp / "tiny.txt"
    if not corpus.exists():
        corpus.write_text(make_text(), encoding="utf-8")
    proc = run_cli("train.py", *tiny_overrides(corpus, out, *SHORT, *QUIET, *extra), f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """One finished tiny run trained through train.py: its directory (.hydra/, train.log, checkpoints/)."""
    tmp = tmp_path_factory.mktemp("cli_run")
    train_cli(tmp, tmp / "run")
    return tmp / "run"


# ---- class 1: a refused command changes nothing ----


def test_a_refused_resume_leaves_the_runs_record_and_log_as_they_were_and_the_run_resumable(cli_run, tmp_path):
    """The refused resume rewrote .hydra/overrides.yaml and config.yaml with its rejected setting, so the next plain
    ``ckpt_path=`` resume restored it and was refused too; and it appended its error line to the run's train.log."""
    run = tmp_path / "run"
    shutil.copytree(cli_run, run, symlinks=True)
    before = files(run)
    assert {".hydra/overrides.yaml", ".hydra/config.yaml", "train.log"} <= set(before)
    ckpt = f"ckpt_path={run}/checkpoints/last.ckpt"
    other = tmp_path / "other.txt"
    other.write_text("xyz " * 2000, encoding="utf-8")  # another corpus: another vocab
    for args, match in (
        (["model.hidden_size=64"], "has model.hidden_size=32 but this run asks for 64"),
        ([f"data.path={other}"], "was trained on a different vocab"),
        (["trainer.val_check_interval=100000"], "is refused by Lightning"),  # refused once it fits
    ):
        assert_user_error(run_cli("train.py", ckpt, *args), match)
        assert files(run) == before, args
    resumed = run_cli("train.py", ckpt)  # as the stop line prints it: the run's own overrides
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]


def _read_only(path: Path) -> None:
    """Make ``path`` read-only for this process: a tmpfs remounted read-only (root ignores file modes), else chmod."""
    if os.geteuid() != 0:
        for p in [path, *path.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        return
    proc = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot remount a tmpfs read-only here ({proc.stderr.decode().strip()})")


def test_a_resume_into_a_read_only_run_directory_is_one_line(tmp_path):
    """The .hydra/ writer's OSError (Read-only file system, Permission denied) was a traceback."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = False
    if os.geteuid() == 0:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()})")
        mounted = True
    try:
        run = disk / "run"
        train_cli(tmp_path, run, f"paths.cache_dir={tmp_path / 'cache'}")
        before = files(run)
        _read_only(disk)
        proc = run_cli("train.py", f"ckpt_path={run}/checkpoints/last.ckpt", "trainer.max_epochs=2")
        line = assert_user_error(proc, "is not writable")
        assert str(run) in line and files(run) == before
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)
        else:
            for p in [disk, *disk.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)


@pytest.mark.parametrize(
    "theirs",
    ["events.out.tfevents.1700000000.otherhost.1.0", "checkpoints/model.pt"],
    ids=["another_tools_tensorboard_events", "a_checkpoints_folder_charlm_did_not_write"],
)
def test_a_refused_run_never_moves_or_writes_the_users_own_files(tmp_path, theirs):
    """A run refused in a folder the user already had was set aside under .failed/ with the user's files (their
    TensorBoard events deleted, their checkpoints/ removed), and wrote its .hydra/ and train.log there first."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    mine = tmp_path / "mine"
    (mine / theirs).parent.mkdir(parents=True, exist_ok=True)
    (mine / theirs).write_bytes(b"the user's own file")
    before = files(mine)
    args = tiny_overrides(corpus, mine, *SHORT, *QUIET, "seed=abc")
    line = assert_user_error(run_cli("train.py", *args, f"hydra.run.dir={mine}"), "seed='abc' must be a whole number")
    assert "record" not in line  # nothing of this run was kept: it wrote nothing
    assert files(mine) == before and sorted(p.name for p in mine.iterdir()) == [Path(theirs).parts[0]]
    assert not (tmp_path / ".failed").exists()


@pytest.mark.parametrize("through", ["its_path", "a_symlink", "its_path_after_a_logged_line"])
def test_a_run_refused_for_another_runs_directory_leaves_its_train_log_as_it_was(cli_run, tmp_path, through):
    """The refused run's FileHandler appended its error line to the other run's train.log (and any line logged
    before the refusal: here the glob corpus's line about files reached twice)."""
    target = cli_run
    if through == "a_symlink":
        target = tmp_path / "link"
        target.symlink_to(cli_run, target_is_directory=True)
    before = files(cli_run)
    books = tmp_path / "books"
    books.mkdir()
    (books / "tiny.txt").write_text(make_text(), encoding="utf-8")
    corpus = books / "tiny.txt"
    if through == "its_path_after_a_logged_line":
        (books / "loop").symlink_to(".")
        corpus = books / "**" / "*.txt"
    args = tiny_overrides(corpus, target, *SHORT, *QUIET, "model.hidden_size=16")
    proc = run_cli("train.py", *args, f"hydra.run.dir={target}")
    assert_user_error(proc, "already holds checkpoints", started=through == "its_path_after_a_logged_line")
    assert through != "its_path_after_a_logged_line" or "reached twice through symlinks" in proc.stderr
    assert files(cli_run) == before
    assert not (tmp_path / ".failed").exists() and not (cli_run.parent / ".failed").exists()


# ---- class 2: a run that moved or was copied stays whole ----


def best_record(run: Path) -> tuple[int, float | None]:
    """The epoch best.ckpt was written at, and the best score its ModelCheckpoint record holds."""
    best = torch.load(run / "checkpoints/best.ckpt", weights_only=True)
    (state,) = [v for k, v in best["callbacks"].items() if k.startswith("ModelCheckpoint")]
    score = state["best_model_score"]
    return best["epoch"], None if score is None else float(score)


def test_a_moved_run_resumed_keeps_its_best_checkpoint(tmp_path):
    """Lightning's ModelCheckpoint dropped its best score for a changed dirpath ("dirpath has changed"), so the next
    validation replaced best.ckpt with a worse model."""
    run = tmp_path / "run"
    train_cli(tmp_path, run, "trainer.max_epochs=2", *RISING)
    assert best_record(run) == (0, 0.0)
    moved = tmp_path / "run2"
    run.rename(moved)  # mv run run2
    proc = run_cli("train.py", f"ckpt_path={moved}/checkpoints/last.ckpt", "trainer.max_epochs=3")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "dirpath has changed" not in proc.stderr
    assert torch.load(moved / "checkpoints/last.ckpt", weights_only=True)["epoch"] == 2  # it trained on
    assert best_record(moved) == (0, 0.0)  # the best model is still best.ckpt


def test_a_copied_run_resumed_uses_its_own_best_checkpoint_once_the_original_is_gone(tmp_path):
    """The copy's ModelCheckpoint kept the original's best_model_path: its test metrics and metrics.json came from
    the original's best.ckpt, and with the original deleted the resume ended in a FileNotFoundError traceback."""
    orig = tmp_path / "orig"
    train_cli(tmp_path, orig)
    copy = tmp_path / "copy"
    shutil.copytree(orig, copy)  # cp -r orig copy
    shutil.rmtree(orig)
    proc = run_cli("train.py", f"ckpt_path={copy}/checkpoints/last.ckpt")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    record = json.loads((copy / "metrics.json").read_text())
    assert Path(record["checkpoints"]["best"]).resolve() == (copy / "checkpoints/best.ckpt").resolve()
    assert "test/loss" in record["metrics"]
