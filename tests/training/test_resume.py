"""Exact resume: a run killed at any step (SIGKILL, SIGTERM, Ctrl+C) and resumed from last.ckpt ends exactly where the
uninterrupted run ends: same weights, same final val loss. Every run is a real ``train.py`` process."""

from __future__ import annotations

import importlib
import random
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from charlm import UserError
from charlm.cli import train
from charlm.config import build
from charlm.training.module import CharLM
from charlm.training.resume import CARRIED, DERIVED, NOT_CARRIED, Piece
from tests.conftest import compose_train, make_text, run_cli, tiny_overrides
from tests.training.test_precision import fp16_plugin

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
    # a resume gets the run's overrides back from its record (train.py writes one), the kill probe too
    unkill = ["~callbacks.kill"] if (killed / ".hydra").is_dir() else []
    run(corpus, resumed, *case, f"ckpt_path={killed}/checkpoints/last.ckpt", *unkill)
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


# ---- the resume contract (charlm.training.resume): each piece it carries, lost, makes a resume inexact ----

CONTRACT_STEP = STEPS_PER_EPOCH + 19  # inside epoch 1, after the 20 warm-up steps
CONTRACT_CASES = {
    # TBPTT streams with dropout, cosine over a step-driven max_time, fused AdamW (32-true), and a best.ckpt monitor
    # that never improves after epoch 0; last.ckpt only at epoch ends and stops (each save is an fsync)
    "base": [
        *CASES["tbptt-cosine-max_time"],
        "callbacks.last_checkpoint.every_n_train_steps=0",
        "trainer.precision=32-true",
        "+callbacks.rising._target_=tests.probe.RisingScore",
        "callbacks.model_checkpoint.monitor=probe/score",
    ],
    "16-mixed": [  # a gradient scaler on the CPU, from a scale so large that it overflows and halves at first
        *CASES["tbptt-cosine-max_time"],
        "callbacks.last_checkpoint.every_n_train_steps=0",
        *fp16_plugin(init_scale=2.0**40),
    ],
}
# Two gloo processes (trainer.py processes: DDP re-runs the script): 42 steps an epoch, so a stop inside epoch 1.
PROCESSES = [*CONTRACT_CASES["base"], "trainer=ddp_cpu", "trainer.devices=2"]
STOP_STEP = {"2 processes": STEPS_PER_EPOCH // 2 + 9}
CASE_OF = {"gradient scaler": "16-mixed", "state per rank": "2 processes"}
NEVER_READ = {"numpy RNG", "Python RNG"}  # nothing in charlm draws from them: losing them must change nothing
# Lost, these change only themselves in a run that goes well: the guard's starting loss matters to a blow-up.
ONLY_ITSELF = {"divergence guard"}
PIECES = {piece.name: piece for piece in CARRIED}


def entries(node, key: str) -> list[tuple[dict | list, str | int]]:
    """(container, key) of every entry that ``key`` (charlm.training.resume's notation) names in ``node``."""
    found = [(None, node)]
    for part in key.split("."):
        nxt = []
        for _, value in found:
            if part == "*" and isinstance(value, list):
                nxt += [(value, i) for i in range(len(value))]
            elif part.endswith("*") and isinstance(value, dict):
                nxt += [(value, k) for k in value if k.startswith(part[:-1])]
            elif isinstance(value, dict) and part in value:
                nxt.append((value, part))
        found = [((c, k), c[k]) for c, k in nxt]
    return [where for where, _ in found]


def unseeded_rng(stream: str):
    """A stream's state as a process that never restored it might hold it (rng_states' layout)."""
    if stream == "torch":
        return torch.Generator().get_state()
    if stream == "cuda":
        return []  # set_rng_states then restores no CUDA state
    if stream == "numpy":
        kind, keys, pos, has_gauss, gauss = np.random.RandomState(1).get_state()
        return [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]
    return list(random.Random(1).getstate())


def forgotten(name: str, checkpoint: dict, value):
    """What ``name``'s entry becomes in a checkpoint that does not carry it: removed, or where charlm or Lightning
    need the entry, what a run that never restored the piece would start from."""
    if name == "weights":
        return CharLM(**checkpoint["hyper_parameters"]).state_dict()  # freshly initialised
    if name == "optimizer moments and step counts":
        return {}
    if name == "LR schedule position":
        return []  # no scheduler state to restore
    if name == "epoch cut short by a stop":  # the count reopen_cut_epoch took back
        return {level: counts | {"processed": counts["processed"] + 1} for level, counts in value.items()}
    if name == "carried TBPTT state":
        return None
    if name.endswith(" RNG"):
        return unseeded_rng({"CUDA RNG": "cuda"}.get(name, name.split()[0].lower()))
    if name == "partial train-loss sums":
        return {}
    if name == "state per rank":
        return value[::-1]
    return DROP


DROP = object()


def drop(checkpoint: dict, piece: Piece) -> None:
    where = entries(checkpoint, piece.key)
    assert where, f"{piece.key} is not in the checkpoint"
    for container, key in where:
        value = forgotten(piece.name, checkpoint, container[key])
        if value is DROP:
            del container[key]
        else:
            container[key] = value


def end_state(out: Path, metrics: dict) -> dict:
    """What a resumed run must reproduce: its final metrics and its final last.ckpt, with its directory written as
    <run>. Not the validation batch counts (a stopped run validates where it stops, and a resume sanity-checks), nor
    ModelCheckpoint's current_score (the score of its last save in this process: Lightning does not restore it)."""

    def plain(value):
        if isinstance(value, dict):
            return {plain(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value.replace(str(out), "<run>") if isinstance(value, str) else value

    checkpoint = plain(torch.load(out / "checkpoints/last.ckpt", weights_only=True))
    fit_loop = checkpoint["loops"]["fit_loop"]  # flat keys: "epoch_loop.val_loop.batch_progress", ...
    for key in [k for k in fit_loop if k.startswith("epoch_loop.val_loop.")]:
        del fit_loop[key]
    for container, key in entries(checkpoint, "callbacks.ModelCheckpoint*.current_score"):
        del container[key]
    best = torch.load(out / "checkpoints/best.ckpt", weights_only=True)["global_step"]
    return {"metrics": metrics, "checkpoint": checkpoint, "best.ckpt step": best}


def differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [path]
    return [] if type(a) is type(b) and a == b else [path]


@pytest.fixture(scope="module")
def contract_runs(corpus, tmp_path_factory):
    """case -> (the uninterrupted run's end state, a stop's run directory, its checkpoints' bytes), made once."""
    made = {}

    def get(case: str):
        if case not in made:
            tmp = tmp_path_factory.mktemp(f"contract-{case}")
            straight, stopped = tmp / "straight", tmp / "stopped"
            straight_end = end_state(straight, launch(corpus, straight, case))
            step = STOP_STEP.get(case, CONTRACT_STEP)
            launch(corpus, stopped, case, "+callbacks.stop._target_=tests.probe.StopAt", f"+callbacks.stop.step={step}")
            made[case] = straight_end, stopped, {p.name: p.read_bytes() for p in (stopped / "checkpoints").iterdir()}
        return made[case]

    return get


def resumed_end(corpus: Path, contract_runs, case: str, piece: Piece | None = None) -> tuple[dict, dict]:
    """(the uninterrupted run's end state, the end state of the stopped run resumed in its own directory, as a user
    does, from its last.ckpt without ``piece``)."""
    straight_end, stopped, files = contract_runs(case)
    ckpts = stopped / "checkpoints"
    for p in ckpts.iterdir():
        p.unlink()
    for name, data in files.items():
        (ckpts / name).write_bytes(data)
    if piece is not None:
        checkpoint = torch.load(ckpts / "last.ckpt", weights_only=True)
        drop(checkpoint, piece)
        torch.save(checkpoint, ckpts / "last.ckpt")
    unstop = ["~callbacks.stop"] if (stopped / ".hydra").is_dir() else []  # train.py's record restores the probe
    return straight_end, end_state(stopped, launch(corpus, stopped, case, f"ckpt_path={ckpts}/last.ckpt", *unstop))


def launch(corpus: Path, out: Path, case: str, *extra: str) -> dict[str, float]:
    """A run of ``case``: its metrics, or none for processes of their own."""
    if case == "2 processes":
        run_killed(corpus, out, *PROCESSES, *extra, expect=0)
        return {}
    return run(corpus, out, *CONTRACT_CASES[case], *extra)


@pytest.mark.parametrize("case", CONTRACT_CASES)
def test_a_resume_that_carries_the_whole_contract_is_exact(corpus, contract_runs, case):
    """The check the next test breaks: stopped inside epoch 1 and resumed, the run ends as the uninterrupted one."""
    straight, resumed = resumed_end(corpus, contract_runs, case)
    assert differences(straight, resumed) == []


@pytest.mark.parametrize("name", [p.name for p in CARRIED if p.name not in ("state per rank", "CUDA RNG")])
def test_each_piece_of_the_contract_lost_makes_the_resume_inexact(corpus, contract_runs, name):
    try:
        straight, resumed = resumed_end(corpus, contract_runs, CASE_OF.get(name, "base"), PIECES[name])
    except UserError as e:  # a piece every resumable checkpoint holds, gone: refused before training
        assert PIECES[name].everywhere and f"holds no {name} (a weights-only save)" in str(e)
        return
    found = differences(straight, resumed)
    itself = re.compile(r"\.checkpoint" + "".join(map(key_pattern, PIECES[name].key.split("."))) + r"($|[.\[])")
    elsewhere = [d for d in found if not itself.match(d)]
    assert found, f"the run ends the same without the {name}"
    if name in NEVER_READ | ONLY_ITSELF:  # the entry itself is carried on to the end, and nothing else changes
        assert elsewhere == []
    else:
        assert elsewhere, f"without the {name}, only the {name} itself changes: the contract overstates it"


def key_pattern(part: str) -> str:
    """One part of a charlm.training.resume key as a pattern over the paths ``differences`` reports."""
    if part == "*":
        return r"\[\d+\]"
    return r"\." + re.escape(part[:-1]) + r"[^.\[]*" if part.endswith("*") else r"\." + re.escape(part)


@pytest.mark.slow
def test_each_process_resumes_its_own_part_of_the_contract(corpus, contract_runs):
    """Two processes resumed exactly, then with each other's TBPTT state, RNG states and sums: inexact."""
    straight, resumed = resumed_end(corpus, contract_runs, "2 processes")
    assert differences(straight, resumed) == []
    straight, swapped = resumed_end(corpus, contract_runs, "2 processes", PIECES["state per rank"])
    assert differences(straight, swapped)


def test_the_contract_names_functions_that_exist():
    for piece in CARRIED:
        for dotted in (piece.saved_by, piece.restored_by):
            resolve(dotted)
    for item in (*DERIVED, *NOT_CARRIED):
        if item.computed_by != "checkpoint":
            resolve(item.computed_by)


def resolve(dotted: str):
    """The object an import path names: a module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize(
    ("dropped", "named"),
    [
        (("optimizer_states", "lr_schedulers"), "no optimizer moments and step counts and no LR schedule position"),
        (("loops",), "no loop progress"),
    ],
)
def test_a_weights_only_checkpoint_is_refused_for_a_resume_before_training(tmp_path, tiny_run, dropped, named):
    """The resume contract's ``everywhere`` pieces, checked where a resume starts: a weights-only save (Lightning's
    ``save_weights_only``, or one edited by hand) is refused with one line pointing to init_from, and the same file
    still starts a new run through init_from."""
    checkpoint = torch.load(tiny_run.out / "checkpoints/last.ckpt", weights_only=True)
    for key in dropped:
        del checkpoint[key]
    path = tmp_path / "weights_only.ckpt"
    torch.save(checkpoint, path)
    out = tmp_path / "run"
    cfg = compose_train(tiny_overrides(tiny_run.corpus, out, f"ckpt_path={path}", "logger=none"))
    with pytest.raises(UserError, match=re.escape(f"holds {named} (a weights-only save)")) as e:
        build(cfg)
    assert str(e.value).endswith(f"pass init_from={path} instead to start a new run from its weights.")
    assert not out.exists()
    build(compose_train(tiny_overrides(tiny_run.corpus, out, f"init_from={path}", "logger=none")))
