"""Shared fixtures: a tiny corpus, a private token cache, Hydra configs composed as ``charlm-train`` composes them
(``charlm.config.compose``), and the entry points and benchmarks run as processes."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from omegaconf import DictConfig

from charlm.config import compose
from charlm.nn.rnn import RNNConfig, RNNStack
from charlm.nn.stepper import Stepper

ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist (``make test`` runs a worker per core, at most 4) each worker, and every process it starts, uses
# one torch thread: workers that each took torch's default of a thread per core would oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def make_text(n: int = 6000, seed: int = 0) -> str:
    """Pseudo-English: random words over a small alphabet, so windows rarely repeat and models learn fast."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(40)]
    out = []
    while sum(map(len, out)) < n:
        out.append(rng.choice(words) + rng.choice("  \n, ."))
    return "".join(out)[:n]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


def tiny_overrides(corpus: Path, out: Path, *extra: str) -> list[str]:
    """A model and run small enough to train in a few seconds on 2 CPU cores."""
    return [
        "data=text",
        f"data.path={corpus}",
        "data.batch_size=4",
        "data.seq_len=16",
        "data.eval_batch_size=2",
        "model.hidden_size=32",
        "model.num_layers=2",
        "optim.lr=0.01",
        "trainer=cpu",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        f"paths.output_dir={out}",
        f"paths.cache_dir={out.parent / 'cache'}",
        "sample_length=20",
        *extra,
    ]


class TinyRun(NamedTuple):
    out: Path
    metrics: dict[str, float]
    corpus: Path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    """One finished tiny run (``tiny_overrides``: 2 epochs, TensorBoard, test), shared by every test file: its
    directory, final metrics and corpus. Tests read it or resume from its checkpoints into directories of their
    own; a run pointed at its directory must be refused."""
    from charlm.cli import train

    tmp = tmp_path_factory.mktemp("tiny_run")
    corpus = tmp / "tiny.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    out = tmp / "out"
    return TinyRun(out, train(compose_train(tiny_overrides(corpus, out))), corpus)


def compose_train(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    return compose(overrides, config_name="train", return_hydra_config=return_hydra_config)


def compose_generate(overrides: list[str]) -> DictConfig:
    return compose(overrides, config_name="generate")


def rnn(vocab_size: int, **settings) -> RNNStack:
    """``RNNStack(vocab_size, RNNConfig(**settings))``: RNNConfig's defaults for the settings not given."""
    return RNNStack(vocab_size, RNNConfig(**settings))


def assert_stepper_equals_forward(net: RNNStack, x, s0, atol: float) -> None:
    """One character at a time through ``Stepper`` (generation's path) gives the parallel forward pass's logits at
    every position, and its final state."""
    logits, s_end = net(x, s0)
    step, state, stepped = Stepper(net), s0, []
    for t in range(x.shape[1]):
        out, state = step(x[:, t], state)
        stepped.append(out)
    torch.testing.assert_close(torch.stack(stepped, 1), logits, rtol=0, atol=atol)
    torch.testing.assert_close(state, s_end, rtol=0, atol=atol)


def assert_onnx_step_equals_stepper(onnx_path: str | Path, model, ids: torch.Tensor, state: torch.Tensor) -> None:
    """The exported step model, run by onnxruntime as a user would, gives ``Stepper``'s logits and next state."""
    ort = pytest.importorskip("onnxruntime")
    logits, new_state = ort.InferenceSession(str(onnx_path)).run(None, {"ids": ids.numpy(), "state": state.numpy()})
    want_logits, want_state = Stepper(model.net)(ids, state)
    np.testing.assert_allclose(logits, want_logits.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(new_state, want_state.numpy(), rtol=0, atol=1e-5)


def dropout_search(conf_dir: Path, name: str, sweeper: str) -> None:
    """Write ``conf_dir/hparams_search/<name>.yaml``: an Optuna search over model.dropout in {0.1, 1.5}, where 1.5
    is a bad setting whose trial must fail alone. TPE seeded 0 draws 1.5 then 0.1. ``sweeper``: more lines of
    ``hydra.sweeper`` (YAML indented by four spaces)."""
    (conf_dir / "hparams_search").mkdir(parents=True, exist_ok=True)
    (conf_dir / f"hparams_search/{name}.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /hydra/sweeper: optuna\n"
        "hydra:\n  mode: MULTIRUN\n  sweeper:\n"
        "    sampler: {_target_: optuna.samplers.TPESampler, seed: 0, n_startup_trials: 10}\n"
        f"{sweeper}"
        "    params:\n      model.dropout: choice(0.1, 1.5)\n",
        encoding="utf-8",
    )


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def run_cli(
    script: str, *args: str, cwd: Path | None = None, traceback_ok: bool = False
) -> subprocess.CompletedProcess:
    """Run a script of the checkout (``train.py``, ``generate.py``) as a process, by default from a fresh
    temporary directory, so that runs without ``hydra.run.dir`` leave no outputs/ in the checkout.

    No command of charlm may end in a Python traceback: one in its stderr fails the test, unless the test is a
    deliberate crash (``traceback_ok=True``)."""
    proc = _run([sys.executable, str(ROOT / script), *args], cwd or Path(tempfile.mkdtemp(prefix="charlm-cli-")))
    assert traceback_ok or "Traceback" not in proc.stderr, f"{script} {' '.join(args)}:\n{proc.stderr[-3000:]}"
    return proc


def run_train(out: Path, *args: str) -> subprocess.CompletedProcess:
    """``train.py *args`` as a process, into the run directory ``out`` (``hydra.run.dir``); it must finish with a
    last.ckpt there."""
    proc = run_cli("train.py", *args, f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints/last.ckpt").is_file()
    return proc


def run_module(name: str, *args: str, cwd: Path = ROOT, traceback_ok: bool = False) -> subprocess.CompletedProcess:
    """Run a module as ``python -m NAME`` (the benchmarks: ``bench.quality``, the commands: ``charlm.export``),
    from the checkout by default; a traceback in its stderr fails the test, as ``run_cli``'s does."""
    proc = _run([sys.executable, "-m", name, *args], cwd)
    assert traceback_ok or "Traceback" not in proc.stderr, f"-m {name} {' '.join(args)}:\n{proc.stderr[-3000:]}"
    return proc


def run_python(code: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run Python source in a fresh interpreter (``python -c CODE ARGS``), e.g. to change something before charlm
    is imported."""
    return _run([sys.executable, "-c", code, *args], cwd)


_RECORD = re.compile(r" \(the run's record: (.+)/\)$")


def split_record(line: str) -> tuple[str, Path]:
    """An error line of a run that failed before its first checkpoint, and the record it names at its end
    (``charlm.runs.failed``: where the run's .hydra/ and train.log went), which must exist."""
    found = _RECORD.search(line)
    assert found, f"the error names no record of the run: {line}"
    record = Path(found[1])
    assert (record / ".hydra").is_dir(), record
    return line[: found.start()], record


def assert_user_error(proc: subprocess.CompletedProcess, match: str, code: int = 2, started: bool = False) -> str:
    """A process that failed as a UserError does: exit ``code`` (a Diverged run: 3), no traceback, and one
    ``error: `` line holding ``match``, which is all of stderr; or, once training ``started`` (Lightning logs its
    own lines first), its last line. Returns that line."""
    assert proc.returncode == code, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
    assert (lines[-1:] if started else lines) == errors, proc.stderr[-3000:]
    assert match in errors[0], errors[0]
    return errors[0]
