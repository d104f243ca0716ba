"""Plot validation bits per character against wall-clock time, one line per run, from TensorBoard events.

    .venv/bin/python -m bench.plot_curves --run lstm=outputs/timemachine/<stamp> \\
        --run outputs/timemachine/model=gru/<stamp> --out docs/val_bpc_vs_time.png

A run is ``LABEL=DIR`` (or just ``DIR``, labelled by the last two parts of its path), where DIR is a run directory
of train.py (or, for runs of earlier versions, its ``tb/``). Time counts from the run's first event, so start-up
before the logger opened is not included.
Needs matplotlib: ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import ROOT
from bench.events import RunEvents
from bench.report import plot_time_curves
from charlm import UserError, reported_user_errors

TAG = "val/bpc"


def parse_run(spec: str) -> tuple[str, str]:
    """``LABEL=DIR`` -> (LABEL, DIR); a bare DIR (which may hold ``=`` itself: ``outputs/x/hidden_size=128/...``) is
    labelled with its run's settings and stamp, the last two parts of its path."""
    label, sep, path = spec.partition("=")
    if sep and not Path(spec).expanduser().exists():
        return label, path
    run_dir = Path(spec).resolve()
    run_dir = run_dir.parent if run_dir.name == "tb" else run_dir
    return f"{run_dir.parent.name}/{run_dir.name}", spec


def plot(runs: dict[str, RunEvents], out: Path) -> None:
    curves = {label: (run.seconds(TAG), run.values(TAG)) for label, run in runs.items()}
    plot_time_curves(curves, out, "validation bits per character", "val/bpc against time")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=DIR", help="repeat for more runs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/val_bpc_vs_time.png", help="PNG to write")
    args = parser.parse_args(argv)
    with reported_user_errors():
        runs = {}
        for label, path in map(parse_run, args.run):
            if label in runs:
                raise UserError(f"two runs are labelled {label!r}; give each --run its own LABEL=DIR.")
            runs[label] = RunEvents(path)
            runs[label].scalars(TAG)  # fail before plotting anything if a run never validated
        plot(runs, args.out)
    for label, run in runs.items():
        seconds, values = run.seconds(TAG), run.values(TAG)
        print(
            f"{label}: {len(values)} points, last {values[-1]:.4f} bpc at {seconds[-1]:.0f} s, best {min(values):.4f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
