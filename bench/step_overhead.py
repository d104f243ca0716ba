"""What a training step costs besides the network: the optimiser's update and Lightning's per-step logging.

    .venv/bin/python -m bench.step_overhead                       # 2x128 LSTM, batch 128 x seq_len 16
    .venv/bin/python -m bench.step_overhead --hidden 512 --batch 32 --seq-len 128

Optimiser: AdamW's update of the model's parameters (random gradients) as torch's per-tensor loop, its
``foreach`` kernels and its ``fused`` kernel (what charlm uses on CPU and CUDA), alternating, median of
``--repeats`` timings of ``--updates`` updates each.

Logging: charlm's training run (as ``bench.throughput`` builds it: TBPTT streams, CharLM, Trainer with logger,
checkpointing, LR monitor; no validation) with ``trainer.log_every_n_steps=1``, where every step makes its four
per-step ``self.log`` calls (loss, gradient norm, speed, time left: what every step paid before they were made only
on the steps Lightning writes), against the default of 10; alternating A B A B, each timing ``--steps`` steps. The
time of each ``self.log`` call is measured inside the runs. Small models show the overhead most: a 2x128 LSTM
step at batch 128 x 16 is ~35 ms on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from bench.report import table, write_json
from bench.throughput import StepTimer, compose_run
from charlm.config import build
from charlm.info import describe, machine_info
from charlm.nn.rnn import RNNConfig, RNNStack

ADAMW = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def time_updates(net: torch.nn.Module, kind: str, updates: int) -> float:
    """Seconds per AdamW update of ``net`` with torch's ``kind`` implementation, after 5 untimed ones."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, **ADAMW[kind])
    for _ in range(5):
        opt.step()
    start = time.perf_counter()
    for _ in range(updates):
        opt.step()
    return (time.perf_counter() - start) / updates


class LogClock:
    """Counts and times ``LightningModule.log`` calls while installed (``with LogClock() as clock``)."""

    def __init__(self):
        self.calls, self.seconds, self._log = 0, 0.0, pl.LightningModule.log

    def __enter__(self) -> LogClock:
        log, clock = self._log, self

        def timed(module, *args, **kwargs):
            start = time.perf_counter()
            try:
                return log(module, *args, **kwargs)
            finally:
                clock.calls += 1
                clock.seconds += time.perf_counter() - start

        pl.LightningModule.log = timed
        return self

    def __exit__(self, *exc) -> None:
        pl.LightningModule.log = self._log


def time_run(args: argparse.Namespace, out: Path, log_every: int) -> dict:
    """chars/s of ``args.steps`` charlm training steps that log every ``log_every`` steps, and the log calls' cost."""
    cfg = compose_run(args, out)
    cfg.trainer.log_every_n_steps = log_every
    dm, model, trainer = build(cfg)
    timer = StepTimer(args.warmup, args.steps)
    trainer.callbacks.append(timer)
    with LogClock() as clock:
        trainer.fit(model, datamodule=dm)
    steps = args.warmup + args.steps
    return {
        "log_every_n_steps": log_every,
        "chars_per_s": args.batch * args.seq_len * args.steps / timer.seconds,
        "ms_per_step": 1e3 * timer.seconds / args.steps,
        "log_calls_per_step": clock.calls / steps,
        "ms_per_log_call": 1e3 * clock.seconds / max(1, clock.calls),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cell", default="lstm")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--updates", type=int, default=300, help="timed optimiser updates per timing")
    p.add_argument("--repeats", type=int, default=3, help="timings per optimiser implementation")
    p.add_argument("--steps", type=int, default=200, help="timed training steps per run")
    p.add_argument("--warmup", type=int, default=20, help="untimed training steps before them")
    p.add_argument("--pairs", type=int, default=3, help="A B pairs of training runs")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override for the training runs")
    p.add_argument("--json", default="outputs/bench/step_overhead.json")
    args = p.parse_args()

    info = machine_info()
    print(describe(info))
    print(f"{args.layers}x{args.hidden} {args.cell}, batch {args.batch} x seq_len {args.seq_len}")

    net = RNNStack(66, RNNConfig(cell=args.cell, num_layers=args.layers, hidden_size=args.hidden))
    for param in net.parameters():
        param.grad = torch.randn_like(param)
    timings: dict[str, list[float]] = {kind: [] for kind in ADAMW}
    for _ in range(args.repeats):
        for kind in ADAMW:
            timings[kind].append(time_updates(net, kind, args.updates))
    optim = {kind: statistics.median(ts) for kind, ts in timings.items()}
    params = sum(p.numel() for p in net.parameters())
    print()
    print(f"AdamW update of {params:,} parameters, median of {args.repeats} x {args.updates} updates")
    print(
        table(
            ["implementation", "ms per update", "vs loop"],
            [[kind, f"{1e3 * s:.3f}", f"{optim['loop'] / s:.2f}x"] for kind, s in optim.items()],
        )
    )

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for log_every in (1, 10):
                runs.append(time_run(args, Path(tmp), log_every) | {"pair": i + 1})
                r = runs[-1]
                print(f"  pair {i + 1}, log every {log_every}: {r['chars_per_s']:,.0f} chars/s", flush=True)
    print()
    rows = [[f"pair {r['pair']}", r["log_every_n_steps"], f"{r['ms_per_step']:.2f}", f"{r['chars_per_s']:,.0f}",
             f"{r['log_calls_per_step']:.2f}", f"{r['ms_per_log_call']:.3f}"] for r in runs]  # fmt: skip
    print(table(["run", "log every", "ms/step", "chars/s", "log calls/step", "ms/log call"], rows))
    median = {n: statistics.median(r["ms_per_step"] for r in runs if r["log_every_n_steps"] == n) for n in (1, 10)}
    print(f"median ms/step: logging every step {median[1]:.2f}, every 10 steps {median[10]:.2f}")
    result = {"optimizer_seconds": timings, "optimizer_median_seconds": optim, "runs": runs, "median_ms": median}
    path = write_json(args.json, {"machine": info, "args": vars(args), "results": result})
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
