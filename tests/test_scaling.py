"""Past one machine, on the engines charlm already uses: multi-node DDP launched by torchrun, SLURM's requeue on
preemption, Hydra's joblib and submitit launchers, and Optuna studies shared through a database.

No GPU and no cluster here: gloo on CPU processes stands in for NCCL on GPUs (the same Lightning code path), two
torchrun agents on localhost for two machines, SLURM's environment variables plus a fake ``scontrol`` for a SLURM
job, and ``hydra/launcher=submitit_local`` for ``submitit_slurm``. Every run is a real ``train.py`` (or ``train()``)
on a tiny model. The plugins come with the ``cluster`` and ``search`` extras (``make setup`` installs them); a test
that needs a missing one fails and says so."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml

from charlm import UserError
from charlm.cli import train
from charlm.config import check_trainer
from charlm.training.module import load_checkpoint
from tests.conftest import ROOT, compose_train, dropout_search, make_text, tiny_overrides

JOB = "4242"
SLURM_TASK = {  # what srun sets for the one task of a one-node job (sbatch --nodes=1 --ntasks-per-node=1)
    "SLURM_JOB_ID": JOB,
    "SLURM_JOB_NAME": "charlm",  # not "bash" / "interactive": Lightning treats those as no SLURM
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}
LAUNCHERS = {"joblib": "hydra_plugins.hydra_joblib_launcher", "submitit": "hydra_plugins.hydra_submitit_launcher"}
OPTUNA = "hydra_plugins.hydra_optuna_sweeper"


# ---- probes (callbacks injected with +callbacks.NAME._target_=tests.test_scaling.X) ----


class RecordRank(pl.Callback):
    """Each rank writes ``<out>/<tag>-rank<r>.json``: its pid, the world size and rank the trainer and the datamodule
    see, the first and last global step it trained and the val loss it ended with."""

    def __init__(self, out: str, tag: str = "run"):
        self.out, self.tag, self.first = Path(out), tag, None

    def on_train_start(self, trainer, pl_module):
        (self.out / f"pid-{trainer.global_rank}").write_text(f"{os.getpid()}\n")  # for a fake scontrol to kill

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first is None:
            self.first = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        val = trainer.callback_metrics.get("val/loss")
        record = {
            "pid": os.getpid(),
            "world_size": trainer.world_size,
            "rank": trainer.global_rank,
            "dm": [trainer.datamodule.rank, trainer.datamodule.world_size],
            "first_step": self.first,
            "last_step": trainer.global_step,
            "val_loss": None if val is None else float(val),
        }
        (self.out / f"{self.tag}-rank{trainer.global_rank}.json").write_text(json.dumps(record))


class SignalMidStep(pl.Callback):
    """Send ``signal`` to this process on rank ``rank`` only, between backward and the optimizer step of ``step``:
    the moment a handler that saves at once would save a half-done step, and meet the other rank's collectives."""

    def __init__(self, step: int, rank: int = 0, signal: str = "SIGUSR1"):
        self.step, self.rank, self.signum = step, rank, getattr(signal_module, signal)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)


signal_module = signal


# ---- helpers ----


def require(module: str, extra: str) -> None:
    """Fail, not skip, without a plugin that ``make setup`` (and so CI) installs."""
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed; pip install -e '.[{extra}]' (make setup does).", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any SLURM or torchrun variables (the tests may run inside a job), plus ``extra``."""
    drop = ("SLURM_", "TORCHELASTIC_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return env | {"PYTHONPATH": str(ROOT)} | extra


def start(args: list[str], cwd: Path, env: dict[str, str], module: str | None = None) -> subprocess.Popen:
    """``python train.py ARGS`` (or ``python -m MODULE ARGS``) as a process of its own."""
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, *(["-m", module] if module else [str(ROOT / "train.py")]), *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*procs: subprocess.Popen, timeout: float = 300) -> list[tuple[int, str, str]]:
    """Wait for every process; kill them all if one hangs (a collective that one rank never joins)."""
    out = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        out.append((proc.returncode, stdout, stderr))
    return out


def fake_scontrol(bin_dir: Path, then: str = "") -> Path:
    """An ``scontrol`` that appends the caller's rank (SLURM_PROCID) and its arguments to ``bin_dir/../scontrol.log``,
    then runs the shell line ``then`` (what SLURM does to the job next); ``$DIR`` is the folder of the log."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\nDIR="$(dirname "$0")/.."\necho "$SLURM_PROCID $@" >> "$DIR/scontrol.log"\n{then}\n')
    script.chmod(0o755)
    return bin_dir.parent / "scontrol.log"


def tiny(corpus: Path, *extra: str) -> list[str]:
    """``tiny_overrides`` for a process whose run directory Hydra picks (no ``paths.output_dir``); the token cache
    goes beside the corpus."""
    return [o for o in tiny_overrides(corpus, corpus.parent / "run", *extra) if not o.startswith("paths.output_dir")]


def launched_sweep(corpus: Path, sweep: Path, launcher: str, *points: str) -> list[str]:
    """The arguments of a ``-m`` sweep of one-epoch tiny runs into ``sweep`` through ``hydra/launcher=launcher``,
    over ``points`` (e.g. ``model.hidden_size=8,16``)."""
    args = tiny(corpus, "trainer.max_epochs=1", "trainer.limit_train_batches=10", "test=false", "sample_length=0")
    args = ["-m", *(a for a in args if not a.startswith("model.hidden_size"))]  # options before overrides
    return [*args, f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep}", *points]


def ranks(out: Path, tag: str, n: int = 2) -> list[dict]:
    return [json.loads((out / f"{tag}-rank{r}.json").read_text()) for r in range(n)]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(make_text(8000), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)  # trainer.deterministic=true sets it for the whole process


# ---- 1. multi-node DDP: trainer.num_nodes, torchrun ----


def test_num_nodes_is_a_trainer_setting_checked_before_work(tmp_path):
    cfg = compose_train(["trainer=ddp_cpu", "trainer.num_nodes=2", "trainer.devices=1", f"paths.output_dir={tmp_path}"])
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (2, 1)  # no "+trainer.num_nodes" needed
    for bad, shown in (("0", "0"), ("two", "'two'")):
        with pytest.raises(UserError, match=f"^trainer.num_nodes={shown} must be a whole number >= 1"):
            check_trainer(compose_train([f"trainer.num_nodes={bad}", f"paths.output_dir={tmp_path}"]))


@pytest.mark.slow
def test_two_torchrun_nodes_train_one_run_and_it_resumes_on_one_machine(corpus, tmp_path):
    """Two torchrun agents on localhost (--nnodes 2 --nproc-per-node 1, gloo): each rank reads its own streams, the
    val loss is reduced over both, one set of checkpoints and one TensorBoard directory are written in the shared
    hydra.run.dir, and the run resumes from its last.ckpt in one launch on one machine (two local processes)."""
    run = tmp_path / "run"
    port = str(free_port())
    args = tiny(
        corpus,
        "trainer=ddp_cpu",
        "trainer.num_nodes=2",
        "trainer.devices=1",
        "trainer.max_steps=8",
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=2",
        "test=false",
        "sample_length=0",
        f"hydra.run.dir={run}",
        "+callbacks.batches._target_=tests.probe.RecordBatches",
        f"+callbacks.batches.out={tmp_path}",
        "+callbacks.ranks._target_=tests.test_scaling.RecordRank",
        f"+callbacks.ranks.out={tmp_path}",
    )
    agents = [
        start(
            ["--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr", "127.0.0.1"]
            + ["--master-port", port, str(ROOT / "train.py"), *args],
            tmp_path / f"node{node}",  # each agent in its own directory: nothing may land beside it
            clean_env(),
            module="torch.distributed.run",
        )
        for node in (0, 1)
    ]
    for rc, _, stderr in finish(*agents):
        assert rc == 0, stderr[-3000:]

    first, second = ranks(tmp_path, "run")
    assert [(r["rank"], r["world_size"], r["dm"]) for r in (first, second)] == [(0, 2, [0, 2]), (1, 2, [1, 2])]
    assert first["pid"] != second["pid"] and first["last_step"] == second["last_step"] == 8
    # the val loss is reduced over both ranks' (different) val streams: the same number on both
    assert first["val_loss"] is not None and first["val_loss"] == second["val_loss"]
    # each rank trained on its own contiguous stretches of the train split, disjoint from the other's
    text = corpus.read_text(encoding="utf-8")
    train_text = text[: round(len(text) * 0.9)]
    vocab = load_checkpoint(run / "checkpoints/last.ckpt").vocab
    spans = []
    for rank in (0, 1):
        for row in np.load(tmp_path / f"rank{rank}.npy"):
            start_at = train_text.find(vocab.decode(row))
            assert start_at >= 0
            spans.append((start_at, start_at + len(row), rank))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end, _), (b_start, _, _) in zip(spans, spans[1:], strict=False))
    assert {r for *_, r in spans} == {0, 1}
    # one run: one set of checkpoints, one TensorBoard run (the run directory), nothing beside either agent
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert {p.parent for p in tmp_path.rglob("events.out.tfevents.*")} == {run}
    assert {p.parent for p in tmp_path.rglob("*.ckpt")} == {run / "checkpoints"}
    assert [list(p.iterdir()) for p in (tmp_path / "node0", tmp_path / "node1")] == [[], []]
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 8

    # resume on one machine: the same 2 processes (each owns its streams), launched by Lightning, 8 steps more
    resume = [a for a in args if not a.startswith(("trainer.num_nodes", "trainer.devices", "+callbacks.batches"))]
    resume += [
        "trainer.num_nodes=1",  # the run's own overrides come back with ckpt_path=: set again what changes
        "~callbacks.batches",
        "trainer.devices=2",
        "trainer.max_steps=16",
        f"ckpt_path={run}/checkpoints/last.ckpt",
        "+callbacks.ranks.tag=resumed",
    ]
    ((rc, _, stderr),) = finish(start(resume, tmp_path / "node0", clean_env()))
    assert rc == 0, stderr[-3000:]
    assert [(r["first_step"], r["last_step"]) for r in ranks(tmp_path, "resumed")] == [(8, 16), (8, 16)]
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 16


# ---- 2. SLURM: the job's own run directory, requeue on SIGUSR1, resume ----


def test_a_slurm_job_has_one_run_directory_for_its_tasks_and_its_requeues(tmp_path, monkeypatch):
    def run_dir() -> str:
        return compose_train([f"paths.output_dir={tmp_path}"], return_hydra_config=True).hydra.run.dir

    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    outside = run_dir()
    assert "slurm" not in outside and outside != run_dir()  # a timestamped directory per run
    for name, value in SLURM_TASK.items():
        monkeypatch.setenv(name, value)
    assert run_dir().endswith(f"/slurm-{JOB}")  # every task, every requeue: no date, no pid
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_dir().endswith("/slurm-70_3")
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # salloc's shell: not a job step, a run of its own
    assert "slurm" not in run_dir()


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"SLURM_NNODES": "2"}, "this SLURM job has 2 node(s) but trainer.num_nodes=1; pass trainer.num_nodes=2"),
        ({"SLURM_NTASKS_PER_NODE": "4"}, "runs 4 task(s) per node but trainer.devices=1; pass trainer.devices=4"),
        ({"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": None}, "submit with --nodes=N --ntasks-per-node"),
    ],
)
def test_a_slurm_job_shaped_unlike_the_trainer_is_one_line(tmp_path, monkeypatch, env, match):
    for name, value in (SLURM_TASK | env).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(UserError) as error:
        check_trainer(compose_train([f"paths.output_dir={tmp_path}"]))
    assert match in str(error.value) and len(str(error.value).splitlines()) == 1


def slurm_overrides(corpus: Path, out: Path, *extra: str) -> list[str]:
    """A deterministic run that saves last.ckpt only when stopped (no periodic saves to blur which save is which)."""
    return tiny_overrides(
        corpus,
        out,
        "model.dropout=0.3",
        "trainer.max_steps=40",  # inside epoch 0 (112 steps): no validation, no epoch-end save
        "trainer.deterministic=true",
        "test=false",
        "sample_length=0",
        "logger=none",
        "callbacks=no_logger",
        "callbacks.last_checkpoint.every_n_minutes=0",
        *extra,
    )


def test_sigusr1_under_slurm_saves_at_a_step_boundary_requeues_and_the_requeued_job_resumes_exactly(
    corpus, tmp_path, monkeypatch
):
    """SIGUSR1 (``#SBATCH --signal=USR1@90``) at the start of step 10: the step finishes, last.ckpt is written after
    it, ``scontrol requeue 4242`` runs; SLURM's SIGTERM follows (here the fake scontrol sends it), last.ckpt again,
    exit 143. The requeued job (SLURM_RESTART_COUNT=1), the same command in the same run directory, resumes from
    last.ckpt and ends bit-identical to a run never stopped."""
    straight, out = tmp_path / "straight", tmp_path / "job"
    train(compose_train(slurm_overrides(corpus, straight)))
    for name, value in SLURM_TASK.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    # SLURM answers a requeue with SIGTERM to the job; the fake first keeps what the requeue save left
    log = fake_scontrol(tmp_path / "bin", f'cp {out}/checkpoints/last.ckpt "$DIR/at_requeue.ckpt"; kill -TERM $PPID')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    job = slurm_overrides(corpus, out, "+callbacks.usr1._target_=tests.probe.KillAt", "+callbacks.usr1.step=10")
    job.append("+callbacks.usr1.signal=SIGUSR1")
    with pytest.raises(SystemExit) as stop:
        train(compose_train(job))
    assert stop.value.code == 143
    assert log.read_text() == f"0 requeue {JOB}\n"
    at_requeue = torch.load(tmp_path / "at_requeue.ckpt", weights_only=True)
    assert at_requeue["global_step"] == 11  # after step 10, not inside it
    assert torch.load(out / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 11

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    train(compose_train(job))  # the same command: no ckpt_path, a directory that holds checkpoints
    a, b = (torch.load(d / "checkpoints/last.ckpt", weights_only=True) for d in (straight, out))
    assert a["global_step"] == b["global_step"] == 40
    for name, w in a["state_dict"].items():
        assert torch.equal(w, b["state_dict"][name]), name
    assert log.read_text() == f"0 requeue {JOB}\n"  # step 10 is not trained again: no second signal


@pytest.mark.slow
def test_a_requeued_slurm_job_finds_its_run_directory_and_goes_on(corpus, tmp_path):
    """train.py under SLURM's environment, without hydra.run.dir: SIGUSR1 mid-run, requeue, SIGTERM (exit 143),
    then the same command with SLURM_RESTART_COUNT=1 continues in outputs/<name>/slurm-<job id>."""
    log = fake_scontrol(tmp_path / "bin", "kill -TERM $PPID")
    env = clean_env(**SLURM_TASK, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    args = tiny(
        corpus,
        "trainer.max_steps=30",
        "test=false",
        "sample_length=0",
        "+callbacks.usr1._target_=tests.probe.KillAt",
        "+callbacks.usr1.step=10",
        "+callbacks.usr1.signal=SIGUSR1",
        "+callbacks.ranks._target_=tests.test_scaling.RecordRank",
        f"+callbacks.ranks.out={tmp_path}",
    )
    ((rc, _, stderr),) = finish(start(args, tmp_path / "cwd", env))
    assert rc == 143, stderr[-3000:]
    (run,) = (tmp_path / "cwd/outputs/tiny").glob(f"*/slurm-{JOB}")  # outputs/tiny/<overrides>/slurm-<job>
    assert (
        "stopped by SIGTERM after step 11; resume: " in stderr
        and f"ckpt_path='{run.relative_to(tmp_path / 'cwd')}" in stderr
    )
    assert log.read_text() == f"0 requeue {JOB}\n"

    ((rc, _, stderr),) = finish(
        start([*args, "+callbacks.ranks.tag=requeued"], tmp_path / "cwd", env | {"SLURM_RESTART_COUNT": "1"})
    )
    assert rc == 0, stderr[-3000:]
    assert f"SLURM job {JOB} was requeued: resuming from {run}/checkpoints/last.ckpt" in stderr
    (record,) = ranks(tmp_path, "requeued", 1)
    assert (record["first_step"], record["last_step"]) == (11, 30)
    assert [p.name for p in (tmp_path / "cwd/outputs/tiny").iterdir()] == [f"slurm-{JOB}"]  # one run directory
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 30


@pytest.mark.slow
def test_two_slurm_tasks_requeue_together_when_only_one_got_the_signal_mid_step(corpus, tmp_path):
    """``srun train.py trainer=ddp_cpu trainer.num_nodes=2 trainer.devices=1`` on 2 nodes, 1 task each: SIGUSR1 reaches
    rank 0 alone, between its backward and its optimizer step. Both ranks save last.ckpt together at the next step
    boundary (a save inside the handler would meet rank 1's collectives mid-step), rank 0 alone runs scontrol,
    SLURM kills both tasks (the fake: SIGKILL), and the requeued tasks resume from that save."""
    log = fake_scontrol(tmp_path / "bin", 'kill -KILL $(cat "$DIR"/pid-*)')
    args = tiny(
        corpus,
        "trainer=ddp_cpu",
        "trainer.num_nodes=2",
        "trainer.devices=1",
        "trainer.max_steps=30",
        "test=false",
        "sample_length=0",
        "+callbacks.usr1._target_=tests.test_scaling.SignalMidStep",
        "+callbacks.usr1.step=10",
        "+callbacks.ranks._target_=tests.test_scaling.RecordRank",
        f"+callbacks.ranks.out={tmp_path}",
    )

    def task(rank: int, port: int, tag: str, **extra: str) -> subprocess.Popen:
        """What srun starts on node ``rank`` of a 2-node job, 1 task per node."""
        env = clean_env(**SLURM_TASK, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
        env |= {"SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_PROCID": str(rank), "SLURM_NODEID": str(rank)}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} | extra
        return start([*args, f"+callbacks.ranks.tag={tag}"], tmp_path / "cwd", env)

    port = free_port()
    killed = finish(task(0, port, "run"), task(1, port, "run"))
    assert [rc for rc, *_ in killed] == [-signal.SIGKILL] * 2, killed[0][2][-3000:] + killed[1][2][-3000:]
    assert log.read_text() == f"0 requeue {JOB}\n"  # once, by rank 0
    run = tmp_path / "cwd/outputs/tiny" / f"slurm-{JOB}"
    saved = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] == 11 and len(saved["charlm"]["ranks"]) == 2  # after step 10, both ranks' state

    port = free_port()
    resumed = finish(*(task(rank, port, "requeued", SLURM_RESTART_COUNT="1") for rank in (0, 1)))
    assert [rc for rc, *_ in resumed] == [0, 0], resumed[0][2][-3000:] + resumed[1][2][-3000:]
    assert [(r["first_step"], r["last_step"]) for r in ranks(tmp_path, "requeued")] == [(11, 30), (11, 30)]


# ---- 3. Hydra launchers ----


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_worker_processes_and_a_bad_job_fails_alone(corpus, tmp_path):
    require(LAUNCHERS["joblib"], "cluster")
    sweep = tmp_path / "sweep"
    args = launched_sweep(
        corpus, sweep, "joblib", "hydra.launcher.n_jobs=2", "model.hidden_size=8,16", "model.dropout=0.1,1.5"
    )
    args += ["+callbacks.ranks._target_=tests.test_scaling.RecordRank", "+callbacks.ranks.out=${paths.output_dir}"]
    sweeper = start(args, tmp_path / "cwd", clean_env())
    ((rc, _, stderr),) = finish(sweeper)
    assert rc == 2 and "Traceback" not in stderr  # the sweep ends with the first failed job's line
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    bad = "model.dropout=1.5 must be in [0, 1); e.g. model.dropout=0.2."
    assert errors == [f"error: {bad}"] * 2 + [f"error: sweep job 1 failed: {bad}"], stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert len(jobs) == 4
    good = [j for j in jobs if "model.dropout=0.1" in yaml.safe_load((j / ".hydra/overrides.yaml").read_text())]
    assert len(good) == 2 and all((j / "checkpoints/last.ckpt").is_file() for j in good)
    assert not any((j / "checkpoints").exists() for j in jobs if j not in good)
    for job in jobs:  # each job ran through the joblib launcher, the trained ones in worker processes
        hydra = yaml.safe_load((job / ".hydra/hydra.yaml").read_text())["hydra"]
        assert hydra["launcher"]["_target_"] == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert all(json.loads((j / "run-rank0.json").read_text())["pid"] != sweeper.pid for j in good)


@pytest.mark.slow
def test_submitit_local_launcher_runs_the_job_the_slurm_launcher_would(corpus, tmp_path):
    require(LAUNCHERS["submitit"], "cluster")
    sweep = tmp_path / "sweep"
    args = launched_sweep(corpus, sweep, "submitit_local", "model.hidden_size=8")
    ((rc, _, stderr),) = finish(start(args, tmp_path / "cwd", clean_env()))
    assert rc == 0, stderr[-3000:]
    (job,) = [p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()]
    assert (job / "checkpoints/last.ckpt").is_file() and (job / "checkpoints/best.ckpt").is_file()
    assert load_checkpoint(job / "checkpoints/last.ckpt").hparams["hidden_size"] == 8
    # the job ran as a submitit job: its own process, with submitit's logs and result beside the sweep
    results = list((sweep / ".submitit").rglob("*_result.pkl"))
    assert len(results) == 1 and list((sweep / ".submitit").rglob("*_log.err"))


# ---- 4. Optuna with shared storage ----


@pytest.mark.slow
def test_an_optuna_study_in_shared_storage_goes_on_where_it_stopped_and_records_failed_trials(corpus, tmp_path):
    """The same command twice, with sqlite storage and a study name: one study of 4 trials numbered 0-3; the trials
    whose config is invalid (model.dropout=1.5) are FAIL, the others COMPLETE, and the sweep went on past them.
    A third run into the first run's hydra.sweep.dir: the trial that meets a job directory of the first run fails
    with one line naming the fix, and that directory's checkpoint is untouched."""
    require(OPTUNA, "search")
    import optuna

    db = tmp_path / "studies.db"
    # its first two draws are 1.5, 0.1; the second run, with the same seed, draws them again
    dropout_search(tmp_path / "conf", "shared", "    direction: minimize\n    n_jobs: 1\n    max_failure_rate: 1.0\n")
    args = ["--config-dir", str(tmp_path / "conf"), "hparams_search=shared", "hydra.sweeper.n_trials=2"]
    args += tiny(corpus, "trainer.max_epochs=1", "trainer.limit_train_batches=5", "test=false", "sample_length=0")
    args += [f"hydra.sweeper.storage=sqlite:///{db}", "hydra.sweeper.study_name=shared"]  # as the README says
    for _ in range(2):  # the same command again: the study goes on
        ((rc, _, stderr),) = finish(start(args, tmp_path / "cwd", clean_env()))
        assert rc == 0, stderr[-3000:]
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{db}")
    trials = [(t.number, t.params["model.dropout"], t.state.name) for t in study.trials]
    assert trials == [(0, 1.5, "FAIL"), (1, 0.1, "COMPLETE"), (2, 1.5, "FAIL"), (3, 0.1, "COMPLETE")]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: model.dropout=1.5 must be in [0, 1); e.g. model.dropout=0.2."]

    # run again into the first run's hydra.sweep.dir: job numbers restart at 0, so job 1 meets the first run's job 1
    first = sorted((tmp_path / "cwd/outputs/multirun/tiny").iterdir())[0]
    (done,) = first.glob("1_*/checkpoints/last.ckpt")
    before = done.read_bytes()
    ((rc, _, stderr),) = finish(start([*args, f"hydra.sweep.dir={first}"], tmp_path / "cwd", clean_env()))
    assert rc == 0, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: the sweep job directory")]
    assert len(errors) == 1 and "run the sweep into a new hydra.sweep.dir" in errors[0], stderr[-3000:]
    assert done.read_bytes() == before
    assert optuna.load_study(study_name="shared", storage=f"sqlite:///{db}").trials[5].state.name == "FAIL"
