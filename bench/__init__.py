"""Benchmark scripts, run from the checkout as ``.venv/bin/python -m bench.<name>``. A benchmark prints the
machine first, then a table, and writes the same numbers as JSON under outputs/bench/ (report.py);
plot_curves.py draws val bpc against time."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: benchmarks read data/ and write outputs/ here
