"""Benchmark model quality at a fixed wall clock: train each experiment for ``--max-time`` seconds, report val loss.

    .venv/bin/python -m bench.quality --experiment default,shakespeare --max-time 300
    .venv/bin/python -m bench.quality --experiment zaremba_small --max-time 120 --override trainer=cpu

Each experiment runs as ``train.py experiment=NAME trainer.max_time=DD:HH:MM:SS sample_length=0`` (plus every
``--override``) in its own directory under ``--out-dir``; ``default`` is train.py's defaults (The Time Machine).
A run stops at ``--max-time`` or at the experiment's own ``trainer.max_epochs``, whichever comes first (a
cosine schedule anneals over whichever of the two ends the run), and Lightning validates once more when the
time is up. The numbers are read back from the run's TensorBoard events: val loss in nats, bits per
character, and test metrics where the experiment has a test split (evaluated on the best checkpoint).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from bench import ROOT
from bench.events import RunEvents
from bench.report import table, write_json
from charlm import UserError, reported_user_errors
from charlm.config import CONF_DIR
from charlm.info import describe, machine_info

DEFAULT = "default"  # no experiment= override: train.yaml's own defaults


def lightning_time(seconds: int) -> str:
    """Seconds as Lightning's ``max_time`` string ``DD:HH:MM:SS``."""
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    return f"{days:02d}:{h:02d}:{m:02d}:{s:02d}"


def experiments(specs: list[str]) -> list[str]:
    """Flatten repeated and comma-separated ``--experiment`` values, refusing names with no config file."""
    names = [name.strip() for spec in specs for name in spec.split(",") if name.strip()]
    known = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
    for name in names:
        if name != DEFAULT and name not in known:
            raise UserError(f"experiment {name!r} has no conf/experiment/{name}.yaml; use {DEFAULT} or one of {known}.")
    if len(set(names)) != len(names):
        raise UserError(f"--experiment lists a name twice ({names}); give each experiment once.")
    return names


def train(name: str, max_time: int, overrides: list[str], run_dir: Path) -> float:
    """Run train.py for one experiment, its output in ``run_dir/output.log``; return its wall-clock seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "train.py")] + ([f"experiment={name}"] if name != DEFAULT else [])
    cmd += [f"trainer.max_time={lightning_time(max_time)}", f"hydra.run.dir={run_dir}", "sample_length=0"]
    cmd += ["overwrite_run_dir=true"]  # a re-run of the benchmark replaces its own earlier runs
    cmd += ["trainer.enable_progress_bar=false", *overrides]
    log = run_dir / "output.log"
    print(f"{name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        last = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise UserError(f"experiment {name} failed with exit code {proc.returncode} ({last}); see {log}.")
    return seconds


def metrics(name: str, run_dir: Path, wall_seconds: float) -> dict:
    run = RunEvents(run_dir)
    loss, bpc = run.values("val/loss"), run.values("val/bpc")
    result = {
        "experiment": name,
        "run_dir": str(run_dir),
        "wall_seconds": wall_seconds,
        "seconds_to_last_val": run.seconds("val/loss")[-1],  # from the run's first event
        # train/loss is logged at every epoch end, also at the one max_time cuts short
        "epochs": len(run.scalars("train/loss")),
        "steps": run.scalars("train/loss")[-1].step + 1,
        "val_points": len(loss),
        "val_loss_last": loss[-1],
        "val_loss_best": min(loss),
        "val_bpc_last": bpc[-1],
        "val_bpc_best": min(bpc),
        "train_loss_last": run.values("train/loss")[-1],
    }
    for key in ("test/loss", "test/bpc"):
        result[key.replace("/", "_")] = run.values(key)[-1] if run.has(key) else None
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", action="append", required=True, help=f"NAME or A,B; {DEFAULT}: no preset")
    parser.add_argument("--max-time", type=int, default=300, help="training seconds per experiment; default 300")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="Hydra override")
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "outputs/bench/quality" / stamp, help="run dirs")
    parser.add_argument("--json", type=Path, default=ROOT / "outputs/bench/quality.json", help="results file")
    args = parser.parse_args(argv)
    with reported_user_errors():
        names = experiments(args.experiment)
        if args.max_time < 1:
            raise UserError(f"--max-time {args.max_time} must be at least 1 second; e.g. --max-time 300.")
        for name in names:
            if (args.out_dir / name).exists():
                raise UserError(f"{args.out_dir / name} exists already; pass a new --out-dir so runs do not mix.")
        info = machine_info()
        print(describe(info), flush=True)
        runs = []
        for name in names:
            run_dir = args.out_dir / name
            runs.append(metrics(name, run_dir, train(name, args.max_time, args.override, run_dir)))
    print(
        f"\nstopped after {args.max_time} s of training or at max_epochs; the last epoch may be partial;"
        " loss in nats, bpc in bits per character, test on the best checkpoint\n"
    )
    header = [
        *("experiment", "wall s", "epochs", "steps", "val points"),
        *("val loss last", "best", "val bpc last", "best", "test bpc"),
    ]
    rows = [
        [
            r["experiment"],
            f"{r['wall_seconds']:.0f}",
            r["epochs"],
            r["steps"],
            r["val_points"],
            f"{r['val_loss_last']:.4f}",
            f"{r['val_loss_best']:.4f}",
            f"{r['val_bpc_last']:.4f}",
            f"{r['val_bpc_best']:.4f}",
            f"{r['test_bpc']:.4f}" if r["test_bpc"] is not None else "-",
        ]
        for r in runs
    ]
    print(table(header, rows))
    report = {"benchmark": "quality", "machine": info, "max_time_s": args.max_time, "overrides": args.override}
    print(f"json: {write_json(args.json, report | {'runs': runs})}")


if __name__ == "__main__":
    main()
