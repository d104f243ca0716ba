"""What every benchmark reports: the machine first, then an aligned table, and the same numbers as JSON."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import torch


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (Linux), else whatever ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.now().isoformat(timespec="seconds"),
    }


def describe(info: dict) -> str:
    gpu = f"GPU {info['gpu']}" if info["gpu"] else "no GPU"
    return (
        f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, {gpu} | torch {info['torch']}"
        f" ({info['torch_threads']} threads) | numpy {info['numpy']} | Python {info['python']} | {info['platform']}"
    )


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell: the first left-aligned (names), the rest right-aligned (numbers)."""
    cells = [[str(c) for c in row] for row in (header, *rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
