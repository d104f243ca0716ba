"""Exact resume: a run killed at any step (SIGKILL, SIGTERM, Ctrl+C) and resumed from last.ckpt ends exactly where the
uninterrupted run ends: same weights, same final val loss. Every run is a real ``train.py`` process."""

from __future__ import annotations

import random
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from charlm.cli import train
from tests.conftest import compose_train, make_text, run_cli, tiny_overrides

# 5,400 training characters / (batch 4 x seq_len 16) = 84 steps per epoch.
STEPS_PER_EPOCH = 84
CASES = {
    # TBPTT streams with carried state, dropout, cosine annealed over a (step-driven) wall-clock budget.
    "tbptt-cosine-max_time": [
        "data.batch_order=tbptt",
        "optim.scheduler=cosine",
        "trainer.max_time=00:00:02:30",  # 150 steps at StepClock's 1 s per step: stops inside epoch 2
        "+callbacks.clock._target_=tests.probe.StepClock",
    ],
    # random windows drawn per (seed, epoch, rank), dropout, Zaremba's per-epoch step decay.
    "random-step": ["data.batch_order=random", "optim.scheduler=step", "optim.decay_start=1"],
    # TBPTT with windows of 8 for the first 100 steps (into epoch 1), then 16; warm-up, stable, decay by steps.
    "tbptt-schedule-wsd": ["data.batch_order=tbptt", "data.schedule=[[100,4,8]]", "optim.scheduler=wsd"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "tiny.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


def overrides(corpus: Path, out: Path, *extra: str) -> list[str]:
    return tiny_overrides(
        corpus,
        out,
        "model.dropout=0.3",
        "trainer.max_epochs=2",
        "trainer.deterministic=true",
        "test=false",
        "sample_length=0",
        "logger=none",
        "callbacks=no_logger",
        "callbacks.last_checkpoint.every_n_train_steps=5",
        "callbacks.last_checkpoint.every_n_minutes=0",  # saves by step only: the saved step never depends on the clock
        f"hydra.run.dir={out}",
        *extra,
    )


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)  # trainer.deterministic=true sets it for the whole process


def run(corpus: Path, out: Path, *extra: str) -> dict[str, float]:
    """A run in this process (straight and resumed runs: no interpreter start-up to pay)."""
    return train(compose_train(overrides(corpus, out, *extra)))


def run_killed(corpus: Path, out: Path, *extra: str, expect: int) -> subprocess.CompletedProcess:
    """A ``train.py`` process, for a kill that must not reach this one."""
    proc = run_cli("train.py", *overrides(corpus, out, *extra))
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def final(out: Path) -> tuple[int, dict, float]:
    """(global step, weights, final val loss) from last.ckpt; the val loss is the best-checkpoint callback's latest."""
    ckpt = torch.load(out / "checkpoints/last.ckpt", weights_only=True)
    (val,) = [v["current_score"] for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")]
    return ckpt["global_step"], ckpt["state_dict"], float(val)


def assert_same_end(straight: Path, resumed: Path) -> None:
    step_a, weights_a, val_a = final(straight)
    step_b, weights_b, val_b = final(resumed)
    assert step_a == step_b
    assert val_b == pytest.approx(val_a, abs=1e-6)
    for name, w in weights_a.items():
        assert torch.equal(w, weights_b[name]), name


def kill_and_resume(corpus: Path, tmp: Path, case: list[str], step: int, how: str = "SIGKILL") -> Path:
    """Stop a run at ``step`` by ``how``; resume it from last.ckpt; return the resumed run's directory."""
    killed, resumed = tmp / f"killed-{how}-{step}", tmp / f"resumed-{how}-{step}"
    kill = ["+callbacks.kill._target_=tests.probe.KillAt", f"+callbacks.kill.step={step}"]
    kill.append(f"+callbacks.kill.signal={how}")
    if how == "SIGKILL":
        run_killed(corpus, killed, *case, *kill, expect=-signal.SIGKILL)
        saved_step = torch.load(killed / "checkpoints/last.ckpt", weights_only=True)["global_step"]
        # the last save: every 5 steps and at every epoch end
        assert saved_step == max(step - step % 5, step // STEPS_PER_EPOCH * STEPS_PER_EPOCH)
    else:  # handled in this process: the step in flight finishes, last.ckpt is written, train() exits
        with pytest.raises(SystemExit) as stop:
            run(corpus, killed, *case, *kill)
        assert stop.value.code == {"SIGTERM": 143, "SIGINT": 130}[how]
        assert torch.load(killed / "checkpoints/last.ckpt", weights_only=True)["global_step"] == step + 1
    run(corpus, resumed, *case, f"ckpt_path={killed}/checkpoints/last.ckpt")
    return resumed


@pytest.mark.parametrize(
    ("name", "step"),
    [
        # killed as epoch 1 starts: resumed from the epoch-end save, so the dataloaders and validation run
        # between the save and the next step (they must not touch the RNG that dropout draws from)
        ("tbptt-cosine-max_time", STEPS_PER_EPOCH),
        ("random-step", STEPS_PER_EPOCH + 19),  # inside epoch 1: the skipped windows must be drawn again
        ("tbptt-schedule-wsd", STEPS_PER_EPOCH + 7),  # inside epoch 1 and the schedule's short windows
    ],
)
def test_sigkill_then_resume_ends_exactly_as_the_uninterrupted_run(corpus, tmp_path, name, step):
    straight = tmp_path / "straight"
    run(corpus, straight, *CASES[name])
    assert_same_end(straight, kill_and_resume(corpus, tmp_path, CASES[name], step))


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_sigterm_and_ctrl_c_save_the_current_step_and_resume_exactly(corpus, tmp_path, how):
    """Stopped inside epoch 0: the resume restores the carried TBPTT state and the position in the epoch."""
    case = CASES["tbptt-cosine-max_time"]
    straight = tmp_path / "straight"
    run(corpus, straight, *case)
    assert_same_end(straight, kill_and_resume(corpus, tmp_path, case, 40, how))


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_sigkill_at_three_random_steps_then_resume_ends_exactly(corpus, tmp_path, name):
    straight = tmp_path / "straight"
    run(corpus, straight, *CASES[name])
    last_step = final(straight)[0]
    for step in random.Random(name).sample(range(1, last_step), 3):
        assert_same_end(straight, kill_and_resume(corpus, tmp_path, CASES[name], step))


def test_resume_with_another_number_of_processes_is_refused(corpus, tmp_path):
    """A 1-process checkpoint resumed on 2 gloo ranks: one line naming the fix (each rank owns its streams)."""
    first = tmp_path / "one"
    run(corpus, first, "trainer.max_epochs=1")
    two = ["trainer=ddp_cpu", "trainer.devices=2", f"ckpt_path={first}/checkpoints/last.ckpt"]
    proc = run_killed(corpus, tmp_path / "two", *two, expect=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("written by a run with 1 process(es) but this run has 2" in e for e in errors), proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_run_stopped_by_max_steps_resumes_with_larger_limits_as_the_uninterrupted_run(corpus, tmp_path):
    """Stopped by max_steps inside epoch 0, resumed with max_steps=-1: Lightning had counted the cut epoch as
    done, so the resume skipped the rest of it and both validations (84 steps, no best.ckpt)."""
    case = ["trainer.precision=32-true", "optim.scheduler=none"]  # a schedule over max_steps would differ

    def validations(out: Path) -> list[int]:
        return [int(s) for s in (out / "validations.txt").read_text().split()]

    def record(out: Path) -> list[str]:
        out.mkdir()
        return ["+callbacks.vals._target_=tests.probe.RecordValidations", f"+callbacks.vals.out={out}"]

    straight, stopped, resumed = tmp_path / "straight", tmp_path / "stopped", tmp_path / "resumed"
    run(corpus, straight, *case, *record(straight))
    run(corpus, stopped, *case, "trainer.max_steps=33")  # not a multiple of every_n_train_steps=5
    assert torch.load(stopped / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 33
    run(corpus, resumed, *case, *record(resumed), f"ckpt_path={stopped}/checkpoints/last.ckpt")
    assert validations(straight) == validations(resumed) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert (resumed / "checkpoints/best.ckpt").is_file()
    assert_same_end(straight, resumed)
