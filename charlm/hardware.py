"""The hardware, asked in one place: the probes behind the default precision, and which recipe of a budget preset a
precision gets. The suite forces ``cpu_native_bf16`` both ways, so what a bf16 machine composes is tested on any
machine; ``charlm.info`` prints it all."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from charlm import UserError

# torch's own CPU probes; missing ones (older torch) count as no.
_CPU_BF16_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")  # the ones that matter here
RECIPES = ("bf16", "fp32")  # the per-precision recipes of a budget preset (conf/experiment: ``recipes``)


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as torch's oneDNN kernels see it."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in _CPU_BF16_PROBES)


@functools.cache
def cpu_lstm_kernel_runs(dtype: torch.dtype) -> bool:
    """Whether torch's fused CPU LSTM runs under autocast to ``dtype``: oneDNN builds no bf16 or fp16 LSTM kernel
    on some CPUs (torch 2.13 on AVX2 without AVX-512: "could not create a primitive descriptor"), while GRU and
    RNN kernels run on every one. Asked by running a tiny LSTM once, forward and backward, since no flag says."""
    lstm = torch.nn.LSTM(2, 2, batch_first=True)
    try:
        with torch.autocast("cpu", dtype=dtype):
            out, _ = lstm(torch.zeros(1, 2, 2))
        out.float().sum().backward()
    except RuntimeError:
        return False
    return True


def default_precision(accelerator: str = "auto") -> tuple[str, str]:
    """(``trainer.precision`` a run gets when it sets none, why). ``bf16-mixed`` where the hardware runs bf16
    natively (a CUDA GPU with bf16, or an x86 CPU with AVX512-BF16 or AMX), else ``32-true``: emulated bf16
    would be slower than fp32."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"the GPU ({torch.cuda.get_device_name(0)}) runs bf16 natively"
        return "32-true", f"the GPU ({torch.cuda.get_device_name(0)}) has no native bf16"
    if cpu_native_bf16():
        return "bf16-mixed", "the CPU has AVX512-BF16 or AMX (native bf16)"
    return "32-true", "the CPU has neither AVX512-BF16 nor AMX: bf16 would be emulated, slower than fp32"


def recipe_for(precision: object) -> str:
    """The recipe of a budget preset that was tuned for ``precision``: ``bf16`` for runs in half precision
    (``bf16-mixed``, ``16-mixed`` and their ``-true`` forms: the fast matrix units), ``fp32`` for the rest."""
    text = str(precision)
    if text.startswith(("bf16", "16")):
        return "bf16"
    if text.startswith(("32", "64")):
        return "fp32"
    raise UserError(f"trainer.precision={text!r} is not a precision; use 32-true, bf16-mixed or 16-mixed.")


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (Linux), else whatever ``platform`` knows."""
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Which of ``CPU_FLAGS`` the kernel reports for this CPU (Linux; empty elsewhere)."""
    for line in _cpuinfo_lines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in CPU_FLAGS if f in have]
    return []


def _cpuinfo_lines() -> list[str]:
    path = Path("/proc/cpuinfo")
    return path.read_text(errors="replace").splitlines() if path.is_file() else []
