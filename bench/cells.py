"""Training speed of each cell's whole-sequence form vs its step equations (``model.impl=fused`` vs ``scratch``),
and of the cells with a parallel form (minGRU, minLSTM) against an LSTM with as many parameters.

    .venv/bin/python -m bench.cells                       # lstm, gru, rnn_tanh at hidden 128, 256, 512; then
                                                          # mingru, minlstm vs a 2x512 LSTM at equal parameters
    .venv/bin/python -m bench.cells --cells lstm --hidden 256 --repeats 5
    .venv/bin/python -m bench.cells --cells mingru minlstm   # the min cells' scan (fused) vs their time loop
    .venv/bin/python -m bench.cells --quick               # tiny sizes: checks that it runs, measures nothing

One training step = forward, cross-entropy, backward and an SGD update of a whole ``RNNStack`` (embedding,
``--layers`` layers, decoder) on a ``--batch`` x ``--seq-len`` batch of random characters. The two
implementations share weights and alternate (fused, scratch, fused, ...) so drift in the machine's speed
hits both; each figure is the median over ``--repeats`` timings of ``--steps`` steps. ``fused`` is torch's
kernel, or for a cell without one its parallel form. Target: scratch at least 0.5x fused at hidden 256 on CPU
for the cells with a torch kernel (a parallel cell's scratch is the reference loop of its scan).

Equal parameters (``--match-lstm H``, 0 skips it): a fused ``--layers`` x H LSTM against each of ``--min-cells``
(the cells with a parallel form, run through it) at the hidden size whose whole ``RNNStack`` (embedding =
hidden, layers, decoder) has the parameter count closest to the LSTM's; timed the same way, alternating all of
them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.report import table, write_json
from charlm.info import describe, machine_info
from charlm.nn.cells import CELLS, cells_with
from charlm.nn.rnn import RNNConfig, RNNStack, impls

TARGET_RATIO_AT_256 = 0.5
QUICK = {"hidden": [16], "batch": 4, "seq_len": 8, "steps": 1, "repeats": 1, "match_lstm": 16}


def train_steps(net: RNNStack, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Seconds for ``steps`` full training steps."""
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(steps):
        logits, _ = net(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def median_speeds(nets: dict[str, RNNStack], args: argparse.Namespace) -> dict[str, float]:
    """Training characters/s of each net: the median over ``--repeats`` alternating timings."""
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    y = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    times = {name: [] for name in nets}
    for net in nets.values():
        train_steps(net, x, y, 1)  # warm-up: allocator, oneDNN primitive caches
    for _ in range(args.repeats):
        for name, net in nets.items():
            times[name].append(train_steps(net, x, y, args.steps))
    chars = args.batch * args.seq_len * args.steps
    return {name: chars / statistics.median(t) for name, t in times.items()}


def config(cell: str, hidden: int, args: argparse.Namespace, impl: str = "fused") -> RNNConfig:
    return RNNConfig(cell=cell, num_layers=args.layers, hidden_size=hidden, dropout=0.0, impl=impl)


def param_count(cell: str, hidden: int, args: argparse.Namespace) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return sum(p.numel() for p in RNNStack(args.vocab, config(cell, hidden, args)).parameters())


def matching_hidden(cell: str, target: int, args: argparse.Namespace) -> int:
    """The hidden size whose ``cell`` stack has the parameter count closest to ``target`` (it grows with H)."""
    lo, hi = 1, 1
    while param_count(cell, hi, args) < target:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # param_count(lo) < target <= param_count(hi), once the doubling has run
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if param_count(cell, mid, args) < target else (lo, mid)
    return min((lo, hi), key=lambda h: abs(param_count(cell, h, args) - target))


def measure_equal_params(args: argparse.Namespace) -> list[dict]:
    """A fused LSTM of ``--match-lstm`` units against each min cell at the same parameter count."""
    target = param_count("lstm", args.match_lstm, args)
    hidden = {"lstm": args.match_lstm} | {cell: matching_hidden(cell, target, args) for cell in args.min_cells}
    torch.manual_seed(0)
    nets = {cell: RNNStack(args.vocab, config(cell, h, args)) for cell, h in hidden.items()}
    speed = median_speeds(nets, args)
    return [
        {
            "cell": cell,
            "hidden": h,
            "params": param_count(cell, h, args),
            "chars_per_s": speed[cell],
            "vs_lstm": speed[cell] / speed["lstm"],
        }
        for cell, h in hidden.items()
    ]


def measure(cell: str, hidden: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    nets = {impl: RNNStack(args.vocab, config(cell, hidden, args, impl)) for impl in ("fused", "scratch")}
    nets["scratch"].load_state_dict(nets["fused"].state_dict())
    speed = median_speeds(nets, args)
    return {
        "cell": cell,
        "hidden": hidden,
        "fused_chars_per_s": speed["fused"],
        "scratch_chars_per_s": speed["scratch"],
        "ratio": speed["scratch"] / speed["fused"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timed = [cell for cell in CELLS if "fused" in impls(cell)]  # the cells with a whole-sequence form to time
    p.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn_tanh"], choices=timed)
    p.add_argument("--hidden", nargs="+", type=int, default=[128, 256, 512])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--steps", type=int, default=3, help="training steps per timing")
    p.add_argument("--repeats", type=int, default=3, help="timings per implementation; the median is reported")
    p.add_argument("--match-lstm", type=int, default=512, help="the LSTM hidden size to match; 0: skip that table")
    parallel = cells_with(lambda spec: spec.parallel is not None)
    p.add_argument("--min-cells", nargs="+", default=parallel, choices=parallel)
    p.add_argument("--quick", action="store_true", help=f"tiny sizes, to check that it runs: {QUICK}")
    p.add_argument("--json", default="outputs/bench/cells.json")
    args = p.parse_args()
    if args.quick:  # tiny defaults; what the command line gives still wins
        p.set_defaults(**QUICK)
        args = p.parse_args()

    info = machine_info()
    print(describe(info))
    print(
        f"{args.layers} layers, batch {args.batch} x seq_len {args.seq_len}, vocab {args.vocab}; forward+backward+SGD"
    )
    rows = []
    for cell in args.cells:
        for hidden in args.hidden:
            rows.append(measure(cell, hidden, args))
            r = rows[-1]
            print(
                f"  {cell} {hidden}: fused {r['fused_chars_per_s']:,.0f}, scratch {r['scratch_chars_per_s']:,.0f}",
                flush=True,
            )
    print()
    print(
        table(
            ["cell", "hidden", "fused chars/s", "scratch chars/s", "scratch / fused"],
            [
                [r["cell"], r["hidden"], f"{r['fused_chars_per_s']:,.0f}", f"{r['scratch_chars_per_s']:,.0f}",
                 f"{r['ratio']:.2f}"]
                for r in rows
            ],
        )
    )  # fmt: skip
    at_256 = [r["ratio"] for r in rows if r["hidden"] == 256 and CELLS[r["cell"]].fused is not None]
    if at_256:
        met = min(at_256) >= TARGET_RATIO_AT_256
        print(f"\ntarget scratch >= {TARGET_RATIO_AT_256}x fused at hidden 256: {'met' if met else 'MISSED'}"
              f" (lowest {min(at_256):.2f})")  # fmt: skip
    equal = []
    if args.match_lstm:
        equal = measure_equal_params(args)
        print(f"\nequal parameter count: {args.layers}x{args.match_lstm} LSTM (fused) vs the cells' parallel form\n")
        print(
            table(
                ["cell", "hidden", "params", "chars/s", "vs lstm"],
                [[r["cell"], r["hidden"], f"{r['params']:,}", f"{r['chars_per_s']:,.0f}", f"{r['vs_lstm']:.2f}"]
                 for r in equal],
            )
        )  # fmt: skip
    path = write_json(args.json, {"machine": info, "args": vars(args), "results": rows, "equal_params": equal})
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
