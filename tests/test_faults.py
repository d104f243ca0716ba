"""Long runs lose nothing: last.ckpt is the latest state, every write is atomic, runs never share a directory,
divergence stops the run at the last finite state, checkpoints carry a format version, and every bad input gets
one line naming the fix."""

from __future__ import annotations

import errno
import math
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from charlm import UserError, __version__, user_error_in
from charlm.cli import sample, train
from charlm.config import build
from charlm.infer.generation import GenerationConfig, sample_text
from charlm.training.callbacks import LastCheckpoint, NonFiniteGuard
from charlm.training.checkpoint import FORMAT, SAVE_PHASES, AtomicCheckpointIO
from charlm.training.module import CharLM, load_checkpoint
from tests.conftest import (
    ROOT,
    assert_user_error,
    compose_generate,
    compose_train,
    make_text,
    run_cli,
    split_record,
    tiny_overrides,
)

GOLDEN = ROOT / "tests/golden/v0.1.0.ckpt"
# What tests/golden/v0.1.0.ckpt (written by charlm 0.1.0, commit 18d7760) samples after "abc " at temperature 0.
GOLDEN_SAMPLE = "abc ddae ddae ddae ddae ddae ddae ddae ddae ddae ddae ddae ddae "


def sha(path: Path) -> bytes:
    return path.read_bytes()


def all_finite(path: Path) -> bool:
    sd = torch.load(path, weights_only=True)["state_dict"]
    return all(torch.isfinite(t).all() for t in sd.values())


# ---- 1. last.ckpt is the latest state ----


def test_last_ckpt_is_the_final_state_when_val_loss_stopped_improving(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    out = tmp_path / "out"
    probe = ["+callbacks.rising._target_=tests.probe.RisingScore", "callbacks.model_checkpoint.monitor=probe/score"]
    overrides = tiny_overrides(corpus, out, "trainer.max_epochs=3", "logger=none", "callbacks=no_logger", "test=false")
    train(compose_train([*overrides, *probe]))
    best = torch.load(out / "checkpoints/best.ckpt", weights_only=True)
    last = torch.load(out / "checkpoints/last.ckpt", weights_only=True)
    assert best["epoch"] == 0 and last["epoch"] == 2 and last["global_step"] == 3 * best["global_step"]


def test_last_ckpt_is_refreshed_inside_an_epoch_by_steps_and_by_the_clock(tmp_path):
    saves = []
    now = [0.0]
    trainer = SimpleNamespace(
        global_step=0,
        strategy=SimpleNamespace(broadcast=lambda x: x),
        save_checkpoint=lambda path, weights_only: saves.append(trainer.global_step),
    )
    cb = LastCheckpoint(str(tmp_path), every_n_train_steps=4, every_n_minutes=1, clock=lambda: now[0])
    cb.on_train_start(trainer, None)
    for step in range(1, 11):
        trainer.global_step = step
        now[0] += 25 if step < 6 else 1  # 25 s per step at first, then 1 s
        cb.on_train_batch_end(trainer)
    assert saves == [3, 4, 8]  # 75 s >= 1 minute at step 3; every 4 steps
    cb.on_train_end(trainer, None)  # a run stopped inside an epoch (max_steps / max_time) saves its final state
    assert saves[-1] == 10


def test_a_run_stopped_by_max_steps_inside_an_epoch_leaves_its_final_step_in_last_ckpt(corpus, tmp_path):
    out = tmp_path / "steps"
    steps = ["trainer.max_steps=100", "trainer.max_epochs=3", "logger=none", "callbacks=no_logger", "test=false"]
    train(compose_train(tiny_overrides(corpus, out, *steps)))  # stops 16 steps into epoch 1
    assert torch.load(out / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 100


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_a_stopped_run_names_the_signal_that_stopped_it_and_no_other(corpus, tmp_path, how):
    """Ctrl+C reaches Lightning as a SIGTERM (PreemptionCheckpoint routes it there), whose signal connector logged
    "Received SIGTERM: 15" just before charlm's "stopped by SIGINT" line."""
    out = tmp_path / "run"
    kill = ["+callbacks.kill._target_=tests.probe.KillAt", "+callbacks.kill.step=3", f"+callbacks.kill.signal={how}"]
    quiet = ["logger=none", "callbacks=no_logger", "test=false", "sample_length=0", f"hydra.run.dir={out}"]
    proc = run_cli("train.py", *tiny_overrides(corpus, out, *quiet, *kill))
    assert proc.returncode == {"SIGINT": 130, "SIGTERM": 143}[how], proc.stderr[-3000:]
    resume = f"{sys.executable} {ROOT / 'train.py'} ckpt_path={out}/checkpoints/last.ckpt"  # as run_cli started it
    stop = f"stopped by {how} after step 4; resume: {resume}"
    assert proc.stderr.strip().splitlines()[-1] == stop, proc.stderr[-3000:]
    other = {"SIGINT": "SIGTERM", "SIGTERM": "SIGINT"}[how]
    assert other not in proc.stdout + proc.stderr and (proc.stdout + proc.stderr).count(how) == 1


# ---- 2. atomic writes ----


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.ones(3)}, target)
    before = target.read_bytes()

    def full_disk(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="no space left to write .*previous file is intact"):
        io.save_checkpoint({"w": torch.zeros(3)}, target)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()})")


def test_a_full_disk_mid_run_stops_with_one_line_and_keeps_the_checkpoints(corpus, tmp_path):
    """A real full disk: the run directory on a 600 KB tmpfs, where a third 240 KB checkpoint cannot be written."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "600k")
    try:
        out = disk / "run"
        args = tiny_overrides(corpus, out, "trainer.max_epochs=3", "logger=none", "callbacks=no_logger")
        args.append("model.tie_weights=false")  # the checkpoint size the tmpfs was sized for
        proc = run_cli("train.py", *args, f"hydra.run.dir={out}", "hydra/job_logging=disabled")
        assert_user_error(proc, "no space left to write", started=True)
        ckpts = sorted((out / "checkpoints").iterdir())
        assert [p.name for p in ckpts] == ["best.ckpt", "last.ckpt"]  # no partial file under any name
        for p in ckpts:
            assert load_checkpoint(p).vocab is not None
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_at_the_first_checkpoint_is_one_line(tmp_path):
    """A 256 KB tmpfs that cannot hold the first checkpoint: torch.save's writer raised a RuntimeError ("unexpected
    pos") with the ENOSPC chained under it, which was a traceback."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "256k")
    try:
        out = disk / "run"
        short = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2"]
        args = tiny_overrides(corpus, out, *short, "trainer.precision=32-true", "logger=none", "callbacks=no_logger")
        args += ["model.tie_weights=false", "model.hidden_size=64"]  # about 800 KB with the optimiser state
        proc = run_cli("train.py", *args, f"hydra.run.dir={out}", "hydra/job_logging=disabled")
        line = assert_user_error(proc, "no space left to write", started=True)
        line, record = split_record(line)
        assert line.endswith("; free disk space.")  # there was no previous file to keep
        # no run directory left to list, and no partial checkpoint in the record (the atomic write itself:
        # test_a_failed_write_leaves_the_previous_checkpoint_intact)
        assert not out.exists() and not list(record.rglob("*.ckpt*"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a tmpfs at /dev/shm")
@pytest.mark.parametrize("phase", SAVE_PHASES)
def test_sigkill_at_each_phase_of_a_save_across_filesystems_leaves_a_whole_checkpoint(
    corpus, tmp_path, monkeypatch, phase
):
    """The run directory on a tmpfs, $TMPDIR on the disk: Lightning's own save moved its temporary file across them,
    a truncate-and-copy that a kill left half-written. Killed at ``phase`` of its second last.ckpt save (step 10),
    the run leaves the whole step-5 checkpoint, or once the new file is in place the whole step-10 one; it resumes
    from it, and its next save removes the killed save's temporary file."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read $TMPDIR
    shm = Path(tempfile.mkdtemp(prefix="charlm-test-", dir="/dev/shm"))
    out = shm / "run"
    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=20", "trainer.limit_val_batches=2", "test=false"]
    short += ["callbacks.last_checkpoint.every_n_train_steps=5", "callbacks.last_checkpoint.every_n_minutes=0"]
    args = tiny_overrides(corpus, out, *short, "logger=none", "callbacks=no_logger", "sample_length=0")
    kill = ["+callbacks.kill._target_=tests.probe.KillInSave", f"+callbacks.kill.phase={phase}"]
    try:
        proc = run_cli("train.py", *args, *kill, f"hydra.run.dir={out}")
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]  # the save went through write_atomic
        last = out / "checkpoints/last.ckpt"
        new = SAVE_PHASES.index(phase) >= SAVE_PHASES.index("replaced")
        load_checkpoint(last)  # whole: a damaged file raises a UserError here
        assert torch.load(last, weights_only=True)["global_step"] == (10 if new else 5)
        train(compose_train([*args, f"ckpt_path={last}", "~callbacks.kill"]))  # the record restores the probe
        assert torch.load(last, weights_only=True)["global_step"] == 20
        assert sorted(p.name for p in last.parent.iterdir()) == ["best.ckpt", "last.ckpt"]
    finally:
        shutil.rmtree(shm)


def test_the_trainer_saves_through_the_atomic_checkpoint_io(corpus, tmp_path):
    _, _, trainer = build(compose_train(tiny_overrides(corpus, tmp_path / "o")))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ---- 3, 4. run directories ----


def test_two_runs_started_at_the_same_moment_get_their_own_directories(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "--cfg", "hydra", "--resolve"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=tmp_path) for _ in range(2)]
    dirs = [next(line for line in p.communicate()[0].splitlines() if line.strip().startswith("dir:")) for p in procs]
    assert dirs[0] != dirs[1]


def test_a_run_into_a_directory_with_checkpoints_is_refused_unless_resuming_or_told_to(tiny_run, tmp_path):
    out, _, corpus = tiny_run
    before = {p.name: sha(p) for p in (out / "checkpoints").iterdir()}
    args = tiny_overrides(corpus, out, "logger=none", "callbacks=no_logger", f"hydra.run.dir={out}")
    assert_user_error(run_cli("train.py", *args), "already holds checkpoints (best.ckpt, last.ckpt)")
    assert {p.name: sha(p) for p in (out / "checkpoints").iterdir()} == before
    copy = tmp_path / "copy"
    (copy / "checkpoints").mkdir(parents=True)
    for name, data in before.items():
        (copy / "checkpoints" / name).write_bytes(data)
    resume = [f"ckpt_path={copy}/checkpoints/last.ckpt", "trainer.max_epochs=3", "test=false"]
    train(compose_train(tiny_overrides(corpus, copy, "logger=none", *resume)))  # resuming in place is allowed
    assert torch.load(copy / "checkpoints/last.ckpt", weights_only=True)["epoch"] == 2
    # told to: a new run from scratch (not a silent resume from the last.ckpt it finds there)
    fresh = ["logger=none", "overwrite_run_dir=true", "test=false", "trainer.max_epochs=1"]
    train(compose_train(tiny_overrides(corpus, copy, *fresh)))
    assert torch.load(copy / "checkpoints/last.ckpt", weights_only=True)["epoch"] == 0


def test_a_refused_run_leaves_the_other_runs_hydra_record_as_it_was(tmp_path):
    """Hydra wrote .hydra/ before the task ran, so a run refused for another run's directory rewrote that run's
    config.yaml and overrides.yaml with its own settings (hidden_size=999)."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    out = tmp_path / "run"
    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "test=false"]
    args = tiny_overrides(corpus, out, *short, "trainer.precision=32-true", "logger=none", "callbacks=no_logger")
    proc = run_cli("train.py", *args, f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = {p.name: sha(p) for p in (out / ".hydra").iterdir()}
    assert sorted(record) == ["config.yaml", "hydra.yaml", "overrides.yaml"]  # an accepted run writes its record
    assert "model.hidden_size=32" in (out / ".hydra/overrides.yaml").read_text()
    refused = run_cli("train.py", *args, "model.hidden_size=999", f"hydra.run.dir={out}")
    assert_user_error(refused, "already holds checkpoints")
    assert {p.name: sha(p) for p in (out / ".hydra").iterdir()} == record


# ---- 8. divergence ----


def test_a_run_that_diverges_stops_with_exit_3_and_keeps_finite_checkpoints(corpus, tmp_path):
    out = tmp_path / "nan"
    args = tiny_overrides(
        corpus,
        out,
        "trainer.max_epochs=2",
        "logger=none",
        "callbacks.last_checkpoint.every_n_train_steps=10",
        "callbacks.last_checkpoint.every_n_minutes=0",  # by step only, however slow the machine
        "+callbacks.nan._target_=tests.probe.NanGradAt",
        "+callbacks.nan.step=95",
        f"hydra.run.dir={out}",
    )
    line = assert_user_error(run_cli("train.py", *args), "training diverged at step 95", code=3, started=True)
    assert "gradient norm nan" in line and "on_nonfinite=skip" in line
    assert "best.ckpt and last.ckpt keep the last good state" in line
    assert torch.load(out / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 90
    assert all_finite(out / "checkpoints/last.ckpt") and all_finite(out / "checkpoints/best.ckpt")


def test_on_nonfinite_skip_drops_the_bad_step_and_counts_it(corpus, tmp_path):
    probe = ["+callbacks.nan._target_=tests.probe.NanGradAt", "+callbacks.nan.step=5", "on_nonfinite=skip"]
    cfg = compose_train(tiny_overrides(corpus, tmp_path / "skip", "logger=none", "test=false", *probe))
    dm, model, trainer = build(cfg)
    trainer.fit(model, datamodule=dm)
    (guard,) = [c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)]
    assert guard.skipped == 1 and math.isfinite(trainer.callback_metrics["val/loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("lr", ["1e6", "100"])
def test_a_finite_blow_up_stops_with_exit_3_before_any_checkpoint(corpus, tmp_path, lr):
    """SGD at a huge rate without clipping: the loss stays finite but climbs far past its start, ln V = 2.64 or the
    first loss (at
    lr 1e6 to about a million nats). The run stops with one line, and says that no checkpoint was written yet."""
    out = tmp_path / "blow"
    args = [
        "optim.optimizer=sgd",
        f"optim.lr={lr}",
        "trainer.gradient_clip_val=0",
        "logger=none",
        f"hydra.run.dir={out}",
    ]
    proc = run_cli("train.py", *tiny_overrides(corpus, out, *args))
    line = assert_user_error(proc, "training diverged at step", code=3, started=True)
    assert re.search(r"nats is over loss_limit=3 x the starting loss 2\.\d\d; no checkpoint was written yet", line), (
        line
    )
    assert "keep the last" not in line and not list(out.glob("checkpoints/*.ckpt"))


@pytest.mark.parametrize("value", ["1", "0.5", "abc", "true"])
def test_a_bad_loss_limit_is_one_line(corpus, tmp_path, value):
    proc = run_cli("train.py", *tiny_overrides(corpus, tmp_path / "r", f"loss_limit={value}"))
    assert_user_error(proc, "must be > 1; e.g. loss_limit=3 (null: off).")


def tiny_vocab() -> dict:
    return {"chars": "abc", "unk": None}


def test_epoch_metrics_do_not_hide_a_nan():
    model = CharLM(tiny_vocab())
    model.nll["val_nll"].update(torch.tensor(1.0), weight=10)
    model.nll["val_nll"].update(torch.tensor(float("nan")), weight=10)
    assert math.isnan(model.nll["val_nll"].compute())


@pytest.mark.parametrize(
    ("hparams", "match"),
    [({"lr": float("nan")}, "optim.lr"), ({"lr": float("inf")}, "optim.lr"), ({"lr": 1e-3, "min_lr": 1e-2}, "min_lr")],
)
def test_non_finite_or_inconsistent_learning_rates_are_refused(hparams, match):
    with pytest.raises(UserError, match=match):
        CharLM(tiny_vocab(), **hparams)


def test_generate_refuses_a_checkpoint_with_non_finite_weights(tiny_run, tmp_path):
    out = tiny_run.out
    ckpt = torch.load(out / "checkpoints/last.ckpt", weights_only=True)
    ckpt["state_dict"]["net.decoder.bias"].fill_(float("nan"))
    torch.save(ckpt, tmp_path / "nan.ckpt")
    assert_user_error(run_cli("generate.py", f"ckpt={tmp_path}/nan.ckpt"), "non-finite weights")


# ---- versioned checkpoints ----


def test_the_golden_v0_1_0_checkpoint_loads_samples_and_resumes(corpus, tmp_path):
    model = load_checkpoint(GOLDEN).eval()
    assert sample_text(model.net, model.vocab, "abc ", 60, GenerationConfig(temperature=0))[0] == GOLDEN_SAMPLE
    (text,) = sample(compose_generate([f"ckpt={GOLDEN}", "prompt='abc '", "length=60", "temperature=0"]))
    assert text == GOLDEN_SAMPLE
    arch = [  # corpus: the same tiny text the golden checkpoint was trained on
        "model.hidden_size=16",
        "model.num_layers=1",
        "model.tie_weights=false",
        "trainer.max_epochs=2",
        "logger=none",
        "test=false",
    ]
    metrics = train(compose_train(tiny_overrides(corpus, tmp_path / "r", *arch, f"ckpt_path={GOLDEN}")))
    assert metrics["val/loss"] < math.log(16)
    resumed = torch.load(tmp_path / "r/checkpoints/last.ckpt", weights_only=True)
    assert resumed["charlm"]["format"] == FORMAT and resumed["charlm"]["version"] == __version__
    # it has no count of the characters trained on: its 84 batches count at the resumed run's 4 x 16
    assert resumed["callbacks"]["Throughput"] == {"chars_seen": resumed["global_step"] * 4 * 16}


def test_a_checkpoint_from_a_newer_format_gets_one_line_naming_both_versions(tiny_run, tmp_path):
    out = tiny_run.out
    ckpt = torch.load(out / "checkpoints/last.ckpt", weights_only=True)
    ckpt["charlm"] |= {"format": FORMAT + 1, "version": "9.0.0"}
    torch.save(ckpt, tmp_path / "future.ckpt")
    proc = run_cli("generate.py", f"ckpt={tmp_path}/future.ckpt")
    assert_user_error(proc, f"charlm 9.0.0 (checkpoint format {FORMAT + 1}), but this is charlm {__version__}")


# ---- 10, 11. one line naming the fix ----


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["data.path={tmp}/nothing/*.txt"], "matches no files; check the pattern, e.g. data.path="),
        (["ckpt_path={tmp}"], "is a directory; pass a .ckpt file"),
        (["ckpt_path={tmp}/text.ckpt"], "is not a checkpoint"),
        (["trainer.max_epochs=abc"], "trainer.max_epochs='abc' must be a whole number"),
        (["trainer.max_time=5min"], "trainer.max_time"),
        (["model.hidden_size=64", "ckpt_path={run}/checkpoints/last.ckpt"], "has model.hidden_size=32"),
        (["model.proj_size=16", "ckpt_path={run}/checkpoints/last.ckpt"], "has model.proj_size=0"),
        (["data.eval_batch_size=500"], "data.eval_batch_size=500"),
        (["optim.lr=nan"], "optim.lr=nan must be positive"),
        (["optim.min_lr=1"], "optim.min_lr=1"),
        (["on_nonfinite=ignore"], "on_nonfinite"),
    ],
)
def test_train_says_what_to_fix_and_writes_nothing(tiny_run, tmp_path, args, match):
    """In-process, so that ten cases cost no interpreter start-ups; test_train runs the CLI path (one line, exit 2)."""
    out, _, corpus = tiny_run
    (tmp_path / "text.ckpt").write_text("the quick brown fox\n", encoding="utf-8")  # text starting with t, u or a
    fresh = tmp_path / "fresh"
    cfg = compose_train(tiny_overrides(corpus, fresh, *[a.format(tmp=tmp_path, run=out) for a in args]))
    with pytest.raises(Exception) as raised:
        train(cfg)
    cause = user_error_in(raised.value)  # Hydra's instantiate wraps what a constructor raises
    assert cause is not None and match in str(cause), repr(raised.value)
    assert not fresh.exists()


def test_generate_says_what_to_fix(tiny_run, tmp_path):
    out = tiny_run.out
    ckpt = out / "checkpoints/best.ckpt"
    cases = [
        ([f"ckpt={ckpt}", "device=foo"], "device=foo is not a device"),
        ([f"ckpt={tmp_path}"], "has a checkpoints/best.ckpt"),
    ]
    for text in ("the end", "uh", "a"):
        (tmp_path / f"{text}.ckpt").write_text(text, encoding="utf-8")
        cases.append(([f"ckpt='{tmp_path}/{text}.ckpt'"], "is not a checkpoint"))
    for args, match in cases:
        with pytest.raises(UserError, match=match):
            sample(compose_generate(args))


def test_resume_with_another_learning_rate_continues_the_schedule_at_the_new_rate(tiny_run, tmp_path):
    """The divergence message says to lower optim.lr and resume: that lower rate must take effect."""
    out, _, corpus = tiny_run
    saved = torch.load(out / "checkpoints/last.ckpt", weights_only=True)
    resume = [f"ckpt_path={out}/checkpoints/last.ckpt", "trainer.max_epochs=3", "logger=none", "test=false"]
    train(compose_train(tiny_overrides(corpus, tmp_path / "r", "optim.lr=0.005", *resume)))
    after = torch.load(tmp_path / "r/checkpoints/last.ckpt", weights_only=True)
    assert saved["lr_schedulers"][0]["base_lrs"] == [0.01] and after["lr_schedulers"][0]["base_lrs"] == [0.005]
    assert after["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 0.005
    assert after["optimizer_states"][0]["param_groups"][0]["lr"] <= 0.005


# ---- issue #22: one line naming the fix, where there was a traceback or wrong advice ----


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["seed=abc"], "seed='abc' must be a whole number"),  # otherwise a ValueError traceback
        (["seed=1.5"], "seed=1.5 must be a whole number"),  # otherwise a crash after training started
        (["trainer=ddp"], "trainer=ddp needs CUDA GPUs but none is visible; use trainer=ddp_cpu"),
        (["trainer.devices=0"], "trainer.devices=0 is not a number of devices; pass trainer.devices=1"),
        (["model.hiden_size=64"], "model.hiden_size is not a setting; did you mean model.hidden_size?"),  # not "+"
        (["data.path=/dev/zero"], "'/dev/zero' is not a regular file or a directory"),  # not "does not exist"
    ],
)
def test_train_cli_refuses_in_one_line_what_was_a_traceback_or_wrong_advice(tmp_path, args, match):
    if args == ["trainer=ddp"] and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    out = tmp_path / "run"
    base = [*tiny_overrides(corpus, out, "trainer.max_epochs=1", "trainer.precision=32-true"), f"hydra.run.dir={out}"]
    line = assert_user_error(run_cli("train.py", *base, *args), match)
    # no run directory, nothing TensorBoard lists; the record of a run that got as far as writing one is named
    assert not out.exists() and not list(tmp_path.rglob("events.out.tfevents.*"))
    record = tmp_path / ".failed" / "run"
    assert (record / ".hydra/overrides.yaml").is_file() == (f"(the run's record: {record}/)" in line)
    assert record.exists() or args == ["model.hiden_size=64"]  # a mistyped key stops Hydra before any directory


def test_a_sweep_with_a_bad_job_ends_with_one_line_per_failed_job(tmp_path):
    """Hydra's basic sweeper re-raised the failed job's error when the sweep ended: a 22-line traceback."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "test=false"]
    args = tiny_overrides(corpus, tmp_path / "unused", *short, "trainer.precision=32-true", "logger=none")
    args = [a for a in args if not a.startswith("paths.output_dir")]  # each job its own directory
    sweep = tmp_path / "sweep"
    proc = run_cli("train.py", "-m", *args, "callbacks=no_logger", f"hydra.sweep.dir={sweep}", "model.dropout=0.1,1.5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    line, _ = split_record(last)
    assert line == "error: sweep job 1 failed: model.dropout=1.5 must be in [0, 1); e.g. model.dropout=0.2.", last
    (good,) = sweep.glob("0_*")
    assert (good / "checkpoints/last.ckpt").is_file()  # the good job trained


def test_a_truncated_checkpoint_is_called_truncated(tmp_path):
    """It was "not a checkpoint (not a torch.save archive)", which sends one looking for the wrong problem."""
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.randn(1000)}, "hyper_parameters": {}}, whole)
    data = whole.read_bytes()
    for keep in (len(data) // 2, len(data) - 10):
        (tmp_path / "cut.ckpt").write_bytes(data[:keep])
        with pytest.raises(UserError, match=r"cut.ckpt' is truncated \("):
            load_checkpoint(tmp_path / "cut.ckpt")
