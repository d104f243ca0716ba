"""Run directories (charlm.runs.dirs): named for the settings, a resume that goes on in its run with its settings, and a
resume command that works as printed. Training itself: tests/test_train.py; refused runs: tests/test_faults.py."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser

from charlm.runs.dirs import command_line_with_run_overrides, resume_command, run_dir
from tests.conftest import ROOT, compose_train


def test_a_run_directory_is_named_for_the_overrides_shortened_where_unambiguous(corpus, tmp_path):
    def run_dir_of(*overrides: str) -> str:
        return run_dir("STAMP", _root_=compose_train(list(overrides), return_hydra_config=True))

    assert run_dir_of() == "outputs/timemachine/STAMP"
    assert run_dir_of("experiment=shakespeare_1min") == "outputs/shakespeare_1min/STAMP"
    mine = ["data=text", f"data.path={corpus}", "optim.lr=0.01", "model.hidden_size=128", "data.seed=3", "model=gru"]
    assert (
        run_dir_of(*mine, f"paths.cache_dir={tmp_path}")
        == "outputs/tiny/data.seed=3,hidden_size=128,lr=0.01,model=gru/STAMP"
    )
    both = run_dir_of("model.lr=0.02", "optim.lr=0.01")  # the same last part (model.lr: optim.lr's old key)
    assert both == "outputs/timemachine/model.lr=0.02,optim.lr=0.01/STAMP"
    assert len(Path(run_dir_of(*(f"model.hidden_size={'1' * 300}",))).parent.name) == 120


def fake_run(root: Path, overrides: list[str]) -> Path:
    """A run directory with a record of ``overrides`` and a (dummy) last.ckpt; returns the checkpoint's path."""
    (root / ".hydra").mkdir(parents=True)
    (root / ".hydra/overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (root / "checkpoints").mkdir()
    (root / "checkpoints/last.ckpt").write_bytes(b"")
    return root / "checkpoints/last.ckpt"


def test_a_resume_command_line_gets_the_runs_overrides_that_it_does_not_set_again(tmp_path):
    ckpt = fake_run(tmp_path / "run", ["model=gru", "model.hidden_size=64", "trainer.max_epochs=2", "ckpt_path=old"])
    argv = ["train.py", "--config-dir", "mine", f"ckpt_path={ckpt}", "trainer.max_epochs=5"]
    restored = ["model=gru", "model.hidden_size=64"]  # before the resume's own: a ~key there deletes a restored one
    assert command_line_with_run_overrides(argv) == [*argv[:3], *restored, *argv[3:]]
    assert command_line_with_run_overrides(["train.py", "model=gru"]) == ["train.py", "model=gru"]  # no resume


def test_the_resume_command_works_as_printed_for_a_run_directory_named_by_its_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "train.py")])
    ckpt = tmp_path / "outputs/tiny/hidden_size=128,lr=0.01/2026-01-01_10-00-00-1-2/checkpoints/last.ckpt"
    command = resume_command(ckpt)
    assert command.endswith(f"\"ckpt_path='{ckpt.relative_to(tmp_path)}'\"")  # quoted for Hydra and the shell
    words = shlex.split(command)
    assert words[:2] == [sys.executable, str(ROOT / "train.py")]
    (override,) = OverridesParser.create().parse_overrides(words[2:])
    assert (override.key_or_group, override.value()) == ("ckpt_path", str(ckpt.relative_to(tmp_path)))


def test_a_resume_goes_on_in_the_run_directory_of_its_checkpoint(tmp_path):
    ckpt = fake_run(tmp_path / "outputs/tiny/hidden_size=64/stamp", ["model.hidden_size=64"])
    resumed = compose_train([f"ckpt_path='{ckpt}'"], return_hydra_config=True)
    assert run_dir("STAMP", _root_=resumed) == str(ckpt.parent.parent)
    assert resumed.model.hidden_size == 64
