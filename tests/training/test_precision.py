"""Every precision a user's hardware can select, on whatever machine runs the suite.

``32-true`` is what a CPU without native bf16 runs; ``bf16-mixed`` what a CPU with AVX512-BF16 / AMX or a bf16 GPU
runs (CPU autocast works on any x86 CPU, emulated where bf16 is not native); ``16-mixed`` with a gradient scaler is
what a GPU without bf16 runs. Lightning maps ``16-mixed`` to bf16 on a CPU, so that lane builds the plugin itself
through ``trainer.plugins``, as a user can. The bf16 hardware probe is forced both ways for the shipped configs."""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

import charlm.hardware
from charlm import Diverged, UserError
from charlm.cli import train
from charlm.hardware import default_precision, recipe_for
from charlm.infer.generation import GenerationConfig, sample_text
from charlm.info import describe, machine_info
from charlm.training.module import load_checkpoint
from charlm.training.optim import fused_kernel_allowed
from tests.conftest import ROOT, compose_train, make_text, run_cli, run_module, split_record, tiny_overrides
from tests.test_train import hparams_entry


def fp16_plugin(init_scale: float = 2.0**16) -> list[str]:
    """A GPU's 16-mixed (fp16 autocast + GradScaler), built for the CPU: Lightning would turn 16-mixed into bf16."""
    plugin = (
        "{_target_:pytorch_lightning.plugins.MixedPrecision,precision:16-mixed,device:cpu,"
        f"scaler:{{_target_:torch.amp.GradScaler,device:cpu,init_scale:{init_scale}}}}}"
    )
    return ["trainer.precision=null", f"+trainer.plugins=[{plugin}]"]


PRECISIONS = {
    "32-true": ["trainer.precision=32-true"],
    "bf16-mixed": ["trainer.precision=bf16-mixed"],
    "16-mixed": fp16_plugin(),
}
TEXT = make_text()
UNIGRAM = -sum(n / len(TEXT) * math.log(n / len(TEXT)) for n in Counter(TEXT).values())  # 2.57 nats; ln V = 2.64
# Each optimizer and each scheduler at least once, each optimizer with two schedules.
OPTIM = [
    ("adamw", "cosine"),
    ("adam", "wsd"),
    ("sgd", "step"),
    ("adamw", "plateau"),
    ("adam", "linear"),
    ("sgd", "none"),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("precision") / "tiny.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


def short(corpus: Path, out: Path, precision: str, *extra: str) -> list[str]:
    """Two epochs of 20 steps with clipping at 0.5: enough for the loss to fall well below ln V."""
    return tiny_overrides(
        corpus,
        out,
        *PRECISIONS[precision],
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=20",
        "trainer.gradient_clip_val=0.5",
        "trainer.limit_val_batches=4",
        "logger=none",
        "callbacks=no_logger",
        "test=false",
        "sample_length=0",
        f"hydra.run.dir={out}",
        *extra,
    )


def saved(out: Path) -> dict:
    return torch.load(out / "checkpoints/last.ckpt", weights_only=True)


def fused_flag(ckpt: dict) -> bool:
    return bool(ckpt["optimizer_states"][0]["param_groups"][0].get("fused"))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(  # each optimizer once in the isa lanes (make test-isa)
    "optimizer, scheduler",
    [pytest.param(*pair, marks=[pytest.mark.isa] if k < 3 else []) for k, pair in enumerate(OPTIM)],
)
def test_a_short_fit_with_clipping_trains_under_every_precision(corpus, tmp_path, precision, optimizer, scheduler):
    extra = [f"optim.optimizer={optimizer}", f"optim.scheduler={scheduler}", "optim.decay_start=1"]
    extra += ["optim.lr=1.0", "optim.momentum=0.9"] if optimizer == "sgd" else ["optim.lr=0.03"]
    metrics = train(compose_train(short(corpus, tmp_path / "r", precision, *extra)))
    assert metrics["val/loss"] < UNIGRAM - 0.05, metrics  # learned context, not just ran
    ckpt = saved(tmp_path / "r")
    assert ckpt["global_step"] == 40
    # the precision the lane asked for is the one that ran: a scaler's state is saved only under 16-mixed
    assert ("MixedPrecision" in ckpt) == (precision == "16-mixed")
    if optimizer != "sgd":  # fused Adam(W) only where Lightning can clip it and no scaler hides its gradients
        assert fused_flag(ckpt) == (precision == "32-true")


@pytest.fixture(scope="module", params=list(PRECISIONS))
def fitted(request, corpus, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(f"fit-{request.param}") / "run"
    train(compose_train(short(corpus, out, request.param)))
    return request.param, out


@pytest.mark.isa
def test_a_checkpoint_of_every_precision_reloads_and_samples(fitted):
    precision, out = fitted
    model = load_checkpoint(out / "checkpoints/best.ckpt").eval()
    assert next(model.parameters()).dtype == torch.float32  # mixed precision keeps fp32 weights
    text = sample_text(model.net, model.vocab, "ab", 40, GenerationConfig(temperature=0))[0]
    assert text.startswith("ab") and len(text) == 42 and set(text) <= set(make_text())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_loss_that_goes_non_finite_stops_every_precision(corpus, tmp_path, precision):
    args = short(
        corpus, tmp_path / "r", precision, "+callbacks.nan._target_=tests.probe.NanLossAt", "+callbacks.nan.step=7"
    )
    with pytest.raises(Diverged, match="training diverged at step 7"):
        train(compose_train(args))


def test_scaler_overflow_steps_are_skipped_not_divergence(corpus, tmp_path):
    """A scale of 2^40 overflows fp16 gradients for the first dozens of steps: the scaler skips them and halves
    its scale; the run trains on."""
    out = tmp_path / "r"
    args = [a for a in short(corpus, out, "16-mixed", "trainer.max_epochs=4") if not a.startswith("+trainer.plugins")]
    metrics = train(compose_train([*args, *fp16_plugin(init_scale=2.0**40)[1:]]))
    ckpt = saved(out)
    overflows = ckpt["callbacks"]["NonFiniteGuard"]["overflows"]
    assert overflows >= 10, overflows
    assert ckpt["MixedPrecision"]["scale"] <= 2.0 ** (40 - overflows)
    assert metrics["val/loss"] < UNIGRAM - 0.05


def test_a_non_finite_loss_under_the_scaler_stops_with_one_line_and_exit_3(corpus, tmp_path):
    args = short(
        corpus, tmp_path / "r", "16-mixed", "+callbacks.nan._target_=tests.probe.NanLossAt", "+callbacks.nan.step=5"
    )
    proc = run_cli("train.py", *args)
    assert proc.returncode == 3, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: training diverged at step 5") and "Traceback" not in proc.stderr


@pytest.mark.isa
@pytest.mark.parametrize("precision", PRECISIONS)
def test_sigkill_then_resume_is_exact_under_every_precision(corpus, tmp_path, precision):
    """Every run a process of its own, as a user's are: the straight run, the killed one, and its resume (which
    starts with a validation the straight run never ran, and asks the hardware probes at another step)."""
    extra = ["trainer.deterministic=true", "callbacks.last_checkpoint.every_n_train_steps=5"]
    extra += ["callbacks.last_checkpoint.every_n_minutes=0", "model.dropout=0.3"]  # dropout: the RNG must resume too
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    straight = run_cli("train.py", *short(corpus, whole, precision, *extra))
    assert straight.returncode == 0, straight.stderr[-2000:]
    kill = ["+callbacks.kill._target_=tests.probe.KillAt", "+callbacks.kill.step=33"]
    killed = run_cli("train.py", *short(corpus, cut, precision, *extra, *kill))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert saved(cut)["global_step"] == 30  # inside epoch 1: the resume's first forward is a training step
    resume = [f"ckpt_path={cut}/checkpoints/last.ckpt", "~callbacks.kill"]  # the run's record restores the probe
    resumed = run_cli("train.py", *short(corpus, cut, precision, *extra, *resume))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = saved(whole), saved(cut)
    assert b["global_step"] == a["global_step"] == 40
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, rtol=0, atol=0, msg=name)
    for state_a, state_b in zip(
        a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(), strict=True
    ):
        for key, value in state_a.items():
            torch.testing.assert_close(state_b[key], value, rtol=0, atol=0, msg=key)


# ---- this machine's own class (and, in make test-isa, each class below it): nothing forced ----


def expected_precision() -> str:
    """What a default run must pick on the class this process runs as (a lane's, under make test-isa)."""
    lane = os.environ.get("CHARLM_ISA_LANE", charlm.hardware.isa_class().name)
    return "bf16-mixed" if lane in ("amx", "avx512_bf16") else "32-true"


@pytest.mark.isa
def test_the_default_config_trains_at_the_precision_of_this_isa_class(tmp_path):
    args = ["debug=fast", "logger=none", "callbacks=no_logger", "sample_length=0", "trainer.enable_progress_bar=false"]
    args += [f"hydra.run.dir={tmp_path}", f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"]
    cfg = compose_train(args)
    assert cfg.trainer.precision == expected_precision()
    metrics = train(cfg)
    assert math.isfinite(metrics["val/loss"])
    assert fused_flag(saved(tmp_path)) == (expected_precision() == "32-true")


@pytest.mark.isa
@pytest.mark.parametrize("experiment", ["shakespeare_1min", "shakespeare_5min"])
def test_budget_presets_pick_the_recipe_of_this_isa_class(experiment):
    cfg = compose_train([f"experiment={experiment}"])
    assert cfg.trainer.precision == expected_precision()
    assert cfg.recipe == ("bf16" if expected_precision() == "bf16-mixed" else "fp32")
    assert cfg.model.hidden_size == cfg.recipes[cfg.recipe].hidden_size


# ---- the hardware probe forced both ways: what a bf16 machine composes runs on any machine ----


@pytest.mark.parametrize("native", [True, False])
def test_the_default_config_trains_with_the_bf16_probe_forced_each_way(tmp_path, monkeypatch, native):
    monkeypatch.setattr(charlm.hardware, "cpu_native_bf16", lambda: native)
    args = ["debug=fast", "logger=none", "callbacks=no_logger", "sample_length=0", "trainer.enable_progress_bar=false"]
    args += [f"hydra.run.dir={tmp_path}", f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"]
    cfg = compose_train(args)
    assert cfg.trainer.precision == ("bf16-mixed" if native else "32-true")
    assert cfg.trainer.gradient_clip_val > 0  # the default clips: the combination that crashed under bf16
    metrics = train(cfg)
    assert math.isfinite(metrics["val/loss"])
    assert fused_flag(saved(tmp_path)) == (not native)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("experiment", ["shakespeare_1min", "shakespeare_5min"])
def test_budget_presets_pick_the_recipe_of_the_resolved_precision(tmp_path, monkeypatch, native, experiment):
    monkeypatch.setattr(charlm.hardware, "cpu_native_bf16", lambda: native)
    args = [f"experiment={experiment}", "debug=fast", "trainer.max_time=null", "logger=none", "callbacks=no_logger"]
    args += ["data.eval_batch_size=8", "sample_length=0", "trainer.enable_progress_bar=false"]
    args += [f"hydra.run.dir={tmp_path}", f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"]
    cfg = compose_train(args)
    recipe = "bf16" if native else "fp32"
    assert cfg.recipe == recipe and cfg.trainer.precision == ("bf16-mixed" if native else "32-true")
    assert cfg.model.hidden_size == cfg.recipes[recipe].hidden_size
    assert cfg.recipes.bf16.hidden_size != cfg.recipes.fp32.hidden_size  # the two recipes really differ
    train(cfg)
    assert saved(tmp_path)["hyper_parameters"]["hidden_size"] == cfg.recipes[recipe].hidden_size
    # 32-true forces the fp32 recipe on any machine; the _fp32 alias is that; an explicit value still wins
    forced = compose_train([f"experiment={experiment}", "trainer.precision=32-true", "optim.lr=0.003"])
    alias = compose_train([f"experiment={experiment}_fp32"])
    assert forced.recipe == alias.recipe == "fp32" and alias.trainer.precision == "32-true"
    assert forced.optim.lr == 0.003 and alias.optim.lr == cfg.recipes.fp32.lr


def test_a_run_prints_and_records_its_precision_and_recipe(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="charlm")
    monkeypatch.setattr(charlm.hardware, "cpu_native_bf16", lambda: False)
    args = ["experiment=shakespeare_1min", "debug=fast", "trainer.max_time=null", "data.eval_batch_size=8"]
    args += ["callbacks=no_logger", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}"]
    args += [f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"]
    train(compose_train(args))
    assert "precision: 32-true, recipe fp32 (of the experiment's bf16, fp32)" in caplog.messages
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert (record["precision"], record["recipe"]) == ("32-true", "fp32")
    assert hparams_entry(tmp_path)["recipe"] == "fp32"


def test_an_unknown_recipe_is_one_line(tmp_path):
    proc = run_cli("train.py", "experiment=shakespeare_1min", "recipe=fp16", f"hydra.run.dir={tmp_path / 'r'}")
    (line,) = proc.stderr.strip().splitlines()
    error, record = split_record(line)
    assert (record / "train.log").read_text().splitlines() == [line]  # the log went along with the record
    assert proc.returncode == 2 and error == (
        "error: recipe='fp16' is not a recipe of this experiment; pass recipe=bf16 or recipe=fp32, or leave recipe"
        " out to pick the one tuned for trainer.precision."
    ), proc.stderr[-2000:]


# ---- the fused-kernel rule, and checkpoints written before it ----


@pytest.mark.parametrize(
    "precision, clipping, scaler, allowed",
    [
        ("32-true", True, False, True),
        ("32-true", False, False, True),
        ("bf16-mixed", False, False, True),
        ("bf16-mixed", True, False, False),
        ("16-mixed", False, None, False),  # Lightning's 16-mixed has a GradScaler
        ("16-mixed", False, True, False),
        ("bf16-true", True, False, True),
    ],
)
def test_fused_adam_runs_only_where_lightning_can_clip_and_no_scaler_hides_gradients(
    precision, clipping, scaler, allowed
):
    assert fused_kernel_allowed(precision, clipping, scaler) is allowed


GOLDEN_FUSED = ROOT / "tests/golden/v0.2.0_fused_adamw.ckpt"  # charlm 0.2.0 (510f4f0), 32-true, fused AdamW, step 30


@pytest.mark.parametrize("precision, fused", [("32-true", True), ("bf16-mixed", False), ("16-mixed", False)])
def test_a_fused_checkpoint_from_0_2_0_resumes_on_its_kernel_or_off_it_where_not_allowed(
    corpus, tmp_path, precision, fused
):
    assert fused_flag(torch.load(GOLDEN_FUSED, weights_only=True))
    arch = ["model.hidden_size=16", "model.num_layers=1", "trainer.max_epochs=2", "trainer.limit_train_batches=1.0"]
    args = short(corpus, tmp_path / "r", precision, *arch, f"ckpt_path={GOLDEN_FUSED}")
    metrics = train(compose_train(args))
    ckpt = saved(tmp_path / "r")
    assert ckpt["global_step"] > 30 and fused_flag(ckpt) is fused
    assert metrics["train/loss"] < math.log(len(set(TEXT)))


# ---- charlm-info ----


@pytest.mark.parametrize("native", [True, False])
def test_charlm_info_says_what_a_default_run_picks_here(monkeypatch, native):
    """On a CPU of each kind, uncapped: an AMX CPU (native bf16) and an AVX2 one. (Forcing only the bf16 probe on an
    AMX CPU made charlm-info blame a cap, 'ONEDNN_MAX_CPU_ISA=None', that was not there.)"""
    flags = ["avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_bf16", "amx_tile"]
    monkeypatch.setattr(charlm.hardware, "cpu_flags", lambda: flags if native else ["avx2"])
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    info = machine_info()
    text = describe(info)
    assert info["default_precision"] == ("bf16-mixed" if native else "32-true")
    assert f"native bf16 on the CPU: {'yes' if native else 'no'}" in text
    assert f"precision:  {info['default_precision']} by default (the CPU has" in text
    assert ("fused kernel in the default run: yes" in text) is (not native)
    recipe = "bf16" if native else "fp32"
    assert f"shakespeare_1min -> {recipe}" in text and f"shakespeare_5min -> {recipe}" in text
    assert "shakespeare_5min_fp32 -> fp32" in text  # the alias pins its recipe
    for name in ("torch", "lightning", "hydra"):
        assert f"{name} {info[name]}" in text and info[name][0].isdigit()
    assert f"threads:    {torch.get_num_threads()} torch threads" in text


@pytest.mark.isa
def test_charlm_info_runs_as_a_module():
    proc = run_module("charlm.info")
    assert proc.returncode == 0 and proc.stdout.startswith("charlm ") and "precision:" in proc.stdout
    assert proc.stdout.strip() == describe(machine_info() | {"date": None}).strip()
    assert run_module("charlm.info", "--bogus").returncode == 2


def test_recipe_and_precision_names():
    assert [recipe_for(p) for p in ("bf16-mixed", "16-mixed", "32-true", 32, "64-true")] == [
        "bf16",
        "bf16",
        "fp32",
        "fp32",
        "fp32",
    ]
    assert default_precision("cpu")[0] in ("bf16-mixed", "32-true")
    with pytest.raises(UserError, match="is not a precision; use 32-true, bf16-mixed or 16-mixed"):
        recipe_for("fp8")
