"""charlm.training.checkpoint: what ``ckpt=`` may name."""

from __future__ import annotations

import os

import pytest

from charlm import UserError
from charlm.checks import required_ckpt


def _run(root, name, mtime):
    best = root / name / "checkpoints" / "best.ckpt"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"x")
    os.utime(best, (mtime, mtime))
    return best


def test_a_file_is_taken_as_given(tmp_path):
    assert required_ckpt(str(tmp_path / "a.ckpt")) == tmp_path / "a.ckpt"


def test_a_run_directory_means_its_best_checkpoint(tmp_path):
    best = _run(tmp_path, "2026-12-06_07-00-00", 1_000)
    assert required_ckpt(str(best.parent.parent)) == best


def test_a_folder_of_runs_means_the_best_checkpoint_of_the_run_written_last(tmp_path):
    _run(tmp_path, "b_old", 1_000)
    newest = _run(tmp_path, "a_new", 2_000)  # sorts first by name, last by time
    _run(tmp_path, "c_mid", 1_500)
    assert required_ckpt(str(tmp_path)) == newest


@pytest.mark.parametrize("ckpt", [None, ""])
def test_no_checkpoint_is_one_line(ckpt):
    with pytest.raises(UserError, match="pass ckpt="):
        required_ckpt(ckpt)


def test_a_folder_without_runs_is_one_line(tmp_path):
    with pytest.raises(UserError, match="has a checkpoints/best.ckpt; pass ckpt="):
        required_ckpt(str(tmp_path))
