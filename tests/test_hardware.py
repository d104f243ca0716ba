"""The hardware probes answer for the class a process runs as, not the CPU's flags: a CPU capped with
``ONEDNN_MAX_CPU_ISA`` acts as the lower class it is capped to, and asking a probe never changes a run."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import charlm.hardware
from charlm.hardware import ISA_CLASSES, default_precision, isa_class, isa_lanes, native_isa_class
from tests.conftest import run_module

AMX = ["avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"]
ZEN4 = ["avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"]
ZEN3 = ["avx2"]


@pytest.mark.parametrize(
    ("flags", "cap", "want"),
    [
        (AMX, None, "amx"),
        (AMX, "AVX512_CORE_BF16", "avx512_bf16"),
        (AMX, "avx512_core", "avx512"),  # oneDNN takes any case
        (AMX, "AVX2", "avx2"),
        (AMX, "AVX2_VNNI_2", "avx2"),  # no class between: the highest class the cap admits
        (AMX, "SSE41", "sse41"),
        (AMX, "ALL", "amx"),
        (AMX, "NOT_AN_ISA", "amx"),  # oneDNN ignores a value it does not know
        (ZEN4, None, "avx512_bf16"),
        (ZEN4, "AVX512_CORE_AMX", "avx512_bf16"),  # a cap never raises a CPU above its own class
        (ZEN3, None, "avx2"),
        (ZEN3, "AVX", "sse41"),
        ([], None, "sse41"),
    ],
)
def test_the_isa_class_is_the_cpus_own_capped_by_onednn_max_cpu_isa(monkeypatch, flags, cap, want):
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert isa_class(flags).name == want
    assert [c.name for c in isa_lanes(flags)] == [c.name for c in ISA_CLASSES][
        [c.name for c in ISA_CLASSES].index(native_isa_class(flags).name) + 1 :
    ]


@pytest.mark.parametrize(("cap", "native", "precision"), [(None, True, "bf16-mixed"), ("AVX512_CORE_BF16", True,
    "bf16-mixed"), ("AVX512_CORE", False, "32-true"), ("AVX2", False, "32-true")])  # fmt: skip
def test_an_amx_cpu_capped_below_bf16_defaults_to_fp32_as_the_lower_class_does(monkeypatch, cap, native, precision):
    monkeypatch.setattr(charlm.hardware, "cpu_flags", lambda: AMX)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert charlm.hardware.cpu_native_bf16() is native
    got, why = default_precision("cpu")
    assert got == precision
    assert native or why == f"ONEDNN_MAX_CPU_ISA={cap} caps the CPU's native bf16 away: bf16 would be emulated"


class _RunningLSTM(torch.nn.Module):
    """Stands in for a fused LSTM whose half-precision kernel runs (any machine can then take that branch)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return x * self.w, None


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_the_lstm_probe_answers_the_same_in_every_grad_mode(monkeypatch, mode):
    """A run first asks in a validation (no grad); its resume first asks in a training step. One answer for both,
    or the two processes train on different kernels."""
    monkeypatch.setattr(torch.nn, "LSTM", _RunningLSTM)
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with context():
        assert charlm.hardware.cpu_lstm_kernel_runs.__wrapped__(torch.bfloat16) is True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_lstm_probe_leaves_the_rng_alone(dtype):
    """A resumed process asks at another step than the run it continues: a draw here would move its dropout."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    charlm.hardware.cpu_lstm_kernel_runs.__wrapped__(dtype)
    assert torch.equal(torch.get_rng_state(), before)


# ---- in the lanes of make test-isa: the process really runs as the class it was started for ----


@pytest.mark.isa
def test_this_process_runs_as_its_lane_and_onednn_dispatches_to_that_class():
    lane = os.environ.get("CHARLM_ISA_LANE")
    here = isa_class()
    if lane is not None:
        assert here.name == lane, f"started for the {lane} lane, but charlm sees {here.name}"
        assert torch.backends.cpu.get_cpu_capability().lower() == {"default": "default"}.get(here.aten, here.aten)
    # oneDNN's own word on the ISA it dispatches to, from a fresh process with this one's environment
    code = "import torch; torch.nn.LSTM(4, 4)(torch.zeros(2, 1, 4))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=os.environ | {"ONEDNN_VERBOSE": "1"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    isa = re.search(r"onednn_verbose,.*info,cpu,isa:(.+)", proc.stdout + proc.stderr)
    assert isa, (proc.stdout + proc.stderr)[-2000:]
    words = {"amx": "AMX", "avx512_bf16": "AVX-512", "avx512": "AVX-512", "avx2": "AVX2", "sse41": "SSE4.1"}
    assert words[here.name] in isa[1], (here.name, isa[1])
    if here.name in ("avx512", "avx2", "sse41"):
        assert "AMX" not in isa[1] and "BF16" not in isa[1].upper().replace(" ", "")


@pytest.mark.isa
def test_charlm_info_names_the_class_this_process_runs_as():
    proc = run_module("charlm.info")
    assert proc.returncode == 0, proc.stderr
    here = isa_class()
    assert f"isa class:  {here.name} (" in proc.stdout
    bf16 = here.name in ("amx", "avx512_bf16")
    assert f"precision:  {'bf16-mixed' if bf16 else '32-true'} by default" in proc.stdout
