"""Fine-tune versus from scratch: how soon does a Tiny Shakespeare model, fine-tuned onto The Time Machine with
``init_from``, reach the val loss that training from scratch on The Time Machine ends at?

    .venv/bin/python -m bench.finetune                       # trains the source: experiment=shakespeare_5min
    .venv/bin/python -m bench.finetune --source outputs/shakespeare_5min/<run>   # or a .ckpt
    .venv/bin/python -m bench.finetune --quick               # a smoke run of tiny models, under a minute

Both Time Machine runs are ``experiment=shakespeare_5min data=timemachine`` for ``--budget-s`` seconds each
(plus every ``--override``), one from scratch, one with ``init_from=SOURCE``, so they differ in nothing but
their start. Val loss against wall-clock time is read back from each run's TensorBoard events; the table gives
the time at which the fine-tuned run first reaches the scratch run's final val loss (the source's own training
time is not counted in it, and is printed apart), and the plot draws both curves.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

from bench import ROOT
from bench.events import RunEvents
from bench.quality import train
from bench.report import plot_time_curves, table, write_json
from charlm import UserError, reported_user_errors
from charlm.info import describe, machine_info

EXPERIMENT = "shakespeare_5min"
TARGET = ["data=timemachine"]  # the fine-tuning corpus: Time Machine, the experiment's settings otherwise
# --quick: models and budgets small enough for a smoke run; validation every 20 steps, so the curves have points.
QUICK = ["model.hidden_size=32", "model.num_layers=1", "trainer.val_check_interval=20", "trainer.max_epochs=-1"]


def first_reach(seconds: list[float], values: list[float], target: float) -> float | None:
    """The first time at which ``values`` is at or below ``target``; None if it never is."""
    return next((s for s, v in zip(seconds, values, strict=True) if v <= target), None)


def plot(curves: dict[str, tuple[list[float], list[float]]], out: Path) -> None:
    title = "The Time Machine: fine-tuned from Tiny Shakespeare vs from scratch"
    plot_time_curves(curves, out, "validation loss (nats per character)", title)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", help="a run directory or .ckpt to fine-tune; default: train one first")
    parser.add_argument("--source-s", type=int, default=300, help="seconds to train the source; default 300")
    parser.add_argument("--budget-s", type=int, default=300, help="seconds of each Time Machine run; default 300")
    parser.add_argument("--quick", action="store_true", help="tiny models, 10 s runs: a smoke test of the script")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="Hydra override")
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "outputs/bench/finetune" / stamp, help="run dirs")
    parser.add_argument("--json", type=Path, help="results file; default outputs/bench/finetune.json")
    parser.add_argument("--plot", type=Path, help="PNG to write; default docs/finetune_vs_scratch.png")
    args = parser.parse_args(argv)
    if args.quick:
        args.source_s, args.budget_s = min(args.source_s, 10), min(args.budget_s, 10)
    overrides = (QUICK if args.quick else []) + args.override
    # A smoke run replaces neither the published figure nor the results file.
    home = args.out_dir if args.quick else None
    plot_path = args.plot or (home or ROOT / "docs") / "finetune_vs_scratch.png"
    json_path = args.json or (home or ROOT / "outputs/bench") / "finetune.json"
    with reported_user_errors():
        if min(args.source_s, args.budget_s) < 1:
            raise UserError("--source-s and --budget-s must be at least 1 second; e.g. --budget-s 300.")
        if args.out_dir.exists():
            raise UserError(f"{args.out_dir} exists already; pass a new --out-dir so runs do not mix.")
        info = machine_info()
        print(describe(info), flush=True)
        source_s = None
        source = args.source and str(Path(args.source).expanduser().resolve())  # train.py runs from the checkout
        if source is None:
            source_dir = args.out_dir / "source"
            source_s = train(EXPERIMENT, args.source_s, overrides, source_dir)
            source = str(source_dir)
        runs = {"scratch": TARGET, "fine-tuned": [*TARGET, f"init_from={source}"]}
        curves, wall = {}, {}
        for label, extra in runs.items():
            run_dir = args.out_dir / label
            wall[label] = train(EXPERIMENT, args.budget_s, [*overrides, *extra], run_dir)
            events = RunEvents(run_dir)
            curves[label] = (events.seconds("val/loss"), events.values("val/loss"))
        plot(curves, plot_path)
    target = curves["scratch"][1][-1]
    reached = first_reach(*curves["fine-tuned"], target)
    results = {
        label: {
            "wall_seconds": wall[label],
            "val_points": len(values),
            "val_loss_first": values[0],
            "val_loss_last": values[-1],
            "val_loss_best": min(values),
            "seconds_to_scratch_final": first_reach(seconds, values, target),
        }
        for label, (seconds, values) in curves.items()
    }
    print(f"\neach Time Machine run: {args.budget_s} s; val loss in nats per character; source: {source}")
    if source_s is not None:
        print(f"the source took {source_s:.0f} s to train (not counted below)")
    header = ["run", "wall s", "val points", "val loss first", "last", "best", "s to scratch's final"]
    rows = [
        [
            label,
            f"{r['wall_seconds']:.0f}",
            r["val_points"],
            f"{r['val_loss_first']:.4f}",
            f"{r['val_loss_last']:.4f}",
            f"{r['val_loss_best']:.4f}",
            "-" if r["seconds_to_scratch_final"] is None else f"{r['seconds_to_scratch_final']:.0f}",
        ]
        for label, r in results.items()
    ]
    print(table(header, rows))
    when = "never, within its budget" if reached is None else f"after {reached:.0f} s"
    print(f"fine-tuned reaches scratch's final val loss {target:.4f} {when}")
    report = {"benchmark": "finetune", "machine": info, "budget_s": args.budget_s, "overrides": overrides}
    report |= {"source": source, "source_seconds": source_s, "runs": results}
    print(f"plot: {plot_path}\njson: {write_json(json_path, report)}")


if __name__ == "__main__":
    main()
