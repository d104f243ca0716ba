"""The hardware, asked in one place: the CPU's instruction-set class (as capped by ``ONEDNN_MAX_CPU_ISA``), the probes
behind the default precision, and which recipe of a budget preset a precision gets. The suite forces
``cpu_native_bf16`` both ways, and runs its hardware-sensitive tests under every cap below the machine's own class
(``make test-isa``); ``charlm.info`` prints it all."""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from charlm import UserError

# torch's own CPU probes; missing ones (older torch) count as no.
_CPU_BF16_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
CPU_FLAGS = (  # the ones that matter here
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_bf16",
    "amx_bf16",
    "amx_tile",
    "avx512_fp16",
)
RECIPES = ("bf16", "fp32")  # the per-precision recipes of a budget preset (conf/experiment: ``recipes``)

# oneDNN's ISA values as bit sets (dnnl_cpu_isa_t): a cap admits an ISA whose bits it holds all of.
ONEDNN_ISA_BITS = {
    "SSE41": 0x1,
    "AVX": 0x3,
    "AVX2": 0x7,
    "AVX2_VNNI": 0xF,
    "AVX2_VNNI_2": 0x1F,
    "AVX512_CORE": 0x27,
    "AVX512_CORE_VNNI": 0x67,
    "AVX512_CORE_BF16": 0xE7,
    "AVX10_1_512": 0x1EF,
    "AVX512_CORE_FP16": 0x1EF,
    "AVX10_1_512_AMX": 0xFEF,
    "AVX512_CORE_AMX": 0xFEF,
    "AVX10_1_512_AMX_FP16": 0x1FEF,
    "AVX512_CORE_AMX_FP16": 0x1FEF,
    "ALL": ~0,
}


@dataclass(frozen=True)
class IsaClass:
    """A class of CPUs that takes the same kernels: what it needs, and the caps that make a higher CPU act as it."""

    name: str
    """Short name: ``amx``, ``avx512_bf16``, ``avx512``, ``avx2``, ``sse41``."""
    flags: tuple[str, ...]
    """The /proc/cpuinfo flags a CPU of this class has."""
    onednn: str
    """The ``ONEDNN_MAX_CPU_ISA`` value that caps oneDNN's kernels to this class."""
    aten: str
    """The ``ATEN_CPU_CAPABILITY`` value that caps ATen's vectorised kernels to this class."""
    example: str
    """A CPU of this class."""


ISA_CLASSES = (  # highest first
    IsaClass("amx", ("amx_bf16", "amx_tile", "avx512_bf16"), "AVX512_CORE_AMX", "avx512", "Intel Sapphire Rapids"),
    IsaClass("avx512_bf16", ("avx512_bf16", "avx512bw"), "AVX512_CORE_BF16", "avx512", "AMD Zen 4"),
    IsaClass("avx512", ("avx512f", "avx512bw", "avx512vl", "avx512dq"), "AVX512_CORE", "avx512", "Intel Ice Lake"),
    IsaClass("avx2", ("avx2",), "AVX2", "avx2", "AMD Zen 3"),
    IsaClass("sse41", (), "SSE41", "default", "a CPU before AVX"),
)


def native_isa_class(flags: list[str] | None = None) -> IsaClass:
    """The highest class this CPU's flags reach (``flags``: ``cpu_flags()``'s list, for tests)."""
    have = set(cpu_flags() if flags is None else flags)
    if not have and flags is None:  # no /proc/cpuinfo: ask torch
        have = {"avx512_bf16"} if any(getattr(torch.cpu, n, lambda: False)() for n in _CPU_BF16_PROBES) else set()
    return next(c for c in ISA_CLASSES if set(c.flags) <= have)


def onednn_cap() -> str | None:
    """The cap on oneDNN's kernels this process was started with (``ONEDNN_MAX_CPU_ISA``, or its old name
    ``DNNL_MAX_CPU_ISA``), upper-cased; None when there is none."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return value.strip().upper() if value and value.strip() else None


def isa_class(flags: list[str] | None = None) -> IsaClass:
    """The class this process runs as: the CPU's own, or the one ``ONEDNN_MAX_CPU_ISA`` caps it down to. oneDNN
    reads the cap once, when it starts, so a cap set later in the process does not count; neither here nor there."""
    native = native_isa_class(flags)
    cap = onednn_cap()
    if cap is None or cap not in ONEDNN_ISA_BITS:  # oneDNN ignores a value it does not know, and so do we
        return native
    allowed = ONEDNN_ISA_BITS[cap]
    below = ISA_CLASSES[ISA_CLASSES.index(native) :]
    return next(c for c in below if ONEDNN_ISA_BITS[c.onednn] & ~allowed == 0)


def isa_lanes(flags: list[str] | None = None) -> tuple[IsaClass, ...]:
    """The classes below this CPU's own, which the suite runs it as under caps (``make test-isa``); none off x86."""
    if flags is None and platform.machine().lower() not in ("x86_64", "amd64"):
        return ()
    return ISA_CLASSES[ISA_CLASSES.index(native_isa_class(flags)) + 1 :]


def describe_isa() -> str:
    """This process's class in a phrase: ``avx2 (the CPU's own)`` or ``avx2 (ONEDNN_MAX_CPU_ISA=AVX2 caps an amx
    CPU)``."""
    here, native = isa_class(), native_isa_class()
    if here == native:
        return f"{here.name} (the CPU's own)"
    return f"{here.name} (ONEDNN_MAX_CPU_ISA={onednn_cap()} caps an {native.name} CPU)"


def cpu_native_bf16() -> bool:
    """Whether this process computes bf16 natively on the CPU (AVX512-BF16 or AMX), as torch's oneDNN kernels see
    it: the CPU has the instructions and no ``ONEDNN_MAX_CPU_ISA`` caps them away."""
    return isa_class().name in ("amx", "avx512_bf16")


@functools.cache
def cpu_lstm_kernel_runs(dtype: torch.dtype) -> bool:
    """Whether torch's fused CPU LSTM runs under autocast to ``dtype``: oneDNN builds no bf16 or fp16 LSTM kernel
    on some CPUs (torch 2.13 on AVX2 without AVX-512: "could not create a primitive descriptor"), while GRU and
    RNN kernels run on every one. Asked by running a tiny LSTM once, forward and backward, since no flag says.

    The answer must not depend on where a run first asks (a training step, or a validation under no-grad or
    inference mode), and asking must not move the run's RNG: a resumed process asks at another step than the
    run it continues, so either would make the resume end elsewhere."""
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
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
    cap = onednn_cap()
    if cap is not None and native_isa_class().name in ("amx", "avx512_bf16"):
        return "32-true", f"ONEDNN_MAX_CPU_ISA={cap} caps the CPU's native bf16 away: bf16 would be emulated"
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


def resolve_device(value: object) -> str:
    """``device=`` of charlm-generate and charlm-score as a torch device name; ``auto``: cuda if there is one."""
    device = "cuda" if value == "auto" and torch.cuda.is_available() else str(value).replace("auto", "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise UserError(f"device={value} is not a device; pass device=cpu, cuda, cuda:N or auto.") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={value} but no CUDA GPU is available; pass device=cpu.")
    return device
