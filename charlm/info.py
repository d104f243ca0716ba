"""``charlm-info`` (``python -m charlm.info``): what this machine is and what a run picks on it (versions, CPU
and GPU, the default precision and why, the optimizer kernel, threads, the recipe each budget preset resolves to).
Bug reports, Results rows and every benchmark start with this block."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version

import torch
from omegaconf import OmegaConf

from charlm import __version__, hardware
from charlm.config import CONF_DIR
from charlm.training.optim import fused_kernel_allowed


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def budget_recipes(precision: str) -> dict[str, str]:
    """Each shipped experiment that has per-precision recipes -> the recipe a run at ``precision`` uses."""
    out = {}
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        pinned = node.get("recipe")  # an alias that pins one (shakespeare_5min_fp32)
        if pinned in hardware.RECIPES:
            out[path.stem] = pinned
        elif "recipes" in node:
            out[path.stem] = hardware.recipe_for(precision)
    return out


def machine_info() -> dict:
    """The facts ``describe`` prints, as data (the benchmarks also write them into their JSON)."""
    precision, why = hardware.default_precision()
    clip = 1.0  # conf/trainer/default.yaml's gradient_clip_val
    return {
        "charlm": __version__,
        "torch": torch.__version__,
        "lightning": _version("pytorch-lightning"),
        "hydra": _version("hydra-core"),
        "numpy": _version("numpy"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": hardware.cpu_model(),
        "cpu_flags": hardware.cpu_flags(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_class": hardware.describe_isa(),
        "isa_lanes": [c.name for c in hardware.isa_lanes()],
        "cpu_native_bf16": hardware.cpu_native_bf16(),
        "cpu_bf16_lstm_kernel": hardware.cpu_lstm_kernel_runs(torch.bfloat16),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "default_precision": precision,
        "default_precision_why": why,
        "fused_adamw": fused_kernel_allowed(precision, clipping=clip > 0),
        "recipes": budget_recipes(precision),
        "date": datetime.now().isoformat(timespec="seconds"),
    }


def describe(info: dict) -> str:
    """``info`` (``machine_info()``) as the block ``charlm-info`` prints."""
    flags = ", ".join(info["cpu_flags"]) or "none of " + ", ".join(hardware.CPU_FLAGS)
    fused = info["fused_adamw"]
    kernel = (
        "yes (torch's fused kernel)"
        if fused
        else "no: mixed precision with clipping (Lightning clips only gradients it unscaled itself)"
    )
    recipes = ", ".join(f"{name} -> {recipe}" for name, recipe in info["recipes"].items()) or "none"
    lanes = ", ".join(info["isa_lanes"]) or "none"
    lines = [
        f"charlm {info['charlm']} | torch {info['torch']} | lightning {info['lightning']} | hydra {info['hydra']}"
        f" | numpy {info['numpy']} | Python {info['python']}",
        f"platform:   {info['platform']}",
        f"cpu:        {info['cpu']}; {info['logical_cpus']} logical CPUs; flags: {flags};"
        f" torch kernels: {info['cpu_capability']}",
        f"isa class:  {info['isa_class']}; make test-isa also runs the CPU as: {lanes}",
        f"native bf16 on the CPU: {'yes' if info['cpu_native_bf16'] else 'no'}; fused LSTM under bf16-mixed:"
        f" {'its oneDNN kernel' if info['cpu_bf16_lstm_kernel'] else 'in fp32 (oneDNN has no bf16 LSTM kernel here)'}",
        f"gpu:        {info['gpu'] or 'none'}",
        f"precision:  {info['default_precision']} by default ({info['default_precision_why']})",
        f"optimizer:  AdamW, fused kernel in the default run: {kernel}",
        f"threads:    {info['torch_threads']} torch threads",
        f"resume:     bit-identical to the uninterrupted run in every precision, where both run as this isa class"
        f" ({info['isa_class'].split()[0]}) with the same thread count ({info['torch_threads']}):"
        " the kernels depend on both",
        f"recipes:    {recipes} (experiment -> recipe at {info['default_precision']})",
    ]
    return "\n".join(lines)


def main() -> None:
    """``charlm-info``: the block above, for bug reports and results."""
    if len(sys.argv) > 1:
        print("usage: charlm-info  (no arguments): prints this machine's versions, hardware and defaults.")
        raise SystemExit(0 if sys.argv[1] in ("-h", "--help") else 2)
    print(describe(machine_info()))


if __name__ == "__main__":
    main()
