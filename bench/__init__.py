"""Benchmark scripts, run as ``.venv/bin/python bench/<name>.py``. A benchmark prints the machine first, then a
table, and writes the same numbers as JSON under outputs/bench/ (report.py); plot_curves.py draws val bpc
against time."""
