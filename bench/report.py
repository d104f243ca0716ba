"""What every benchmark reports: the machine first (``charlm-info``'s block), then an aligned table, and the same
numbers as JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from charlm import UserError, reported_user_errors


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


def measure_or_run(args: argparse.Namespace, measure: Callable[[], dict], run: Callable[[argparse.Namespace], None]):
    """A benchmark that measures each point in a fresh process: with ``--measure`` (how it starts that process)
    print one measurement as JSON, else run the whole benchmark; a user error is one line either way."""
    with reported_user_errors():
        if args.measure:
            print(json.dumps(measure()))
        else:
            run(args)


def plot_time_curves(curves: dict[str, tuple[list[float], list[float]]], out: Path, ylabel: str, title: str) -> None:
    """One line per label (seconds, values) against wall-clock time, written to ``out`` as a PNG (matplotlib,
    the ``bench`` extra)."""
    try:
        import matplotlib
    except ImportError:
        raise UserError('matplotlib is not installed; run .venv/bin/pip install -e ".[bench]".') from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    for label, (seconds, values) in curves.items():
        ax.plot(seconds, values, marker="o", markersize=3, label=label)
    ax.set_xlabel("wall-clock seconds since the run's first event")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
