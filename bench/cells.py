"""Training speed of the fused torch kernels vs the cell equations of charlm/cells.py (``model.impl``).

    .venv/bin/python -m bench.cells                       # lstm, gru, rnn_tanh at hidden 128, 256, 512
    .venv/bin/python -m bench.cells --cells lstm --hidden 256 --repeats 5

One training step = forward, cross-entropy, backward and an SGD update of a whole ``RNNStack`` (embedding,
``--layers`` layers, decoder) on a ``--batch`` x ``--seq-len`` batch of random characters. The two
implementations share weights and alternate (fused, scratch, fused, ...) so drift in the machine's speed
hits both; each figure is the median over ``--repeats`` timings of ``--steps`` steps. Target: scratch at
least 0.5x fused at hidden 256 on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.report import describe, machine_info, table, write_json
from charlm.model import RNNConfig, RNNStack

TARGET_RATIO_AT_256 = 0.5


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


def measure(cell: str, hidden: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    nets = {
        impl: RNNStack(
            args.vocab, RNNConfig(cell=cell, num_layers=args.layers, hidden_size=hidden, dropout=0.0, impl=impl)
        )
        for impl in ("fused", "scratch")
    }
    nets["scratch"].load_state_dict(nets["fused"].state_dict())
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    y = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    times = {impl: [] for impl in nets}
    for net in nets.values():
        train_steps(net, x, y, 1)  # warm-up: allocator, oneDNN primitive caches
    for _ in range(args.repeats):
        for impl, net in nets.items():
            times[impl].append(train_steps(net, x, y, args.steps))
    chars = args.batch * args.seq_len * args.steps
    speed = {impl: chars / statistics.median(t) for impl, t in times.items()}
    return {
        "cell": cell,
        "hidden": hidden,
        "fused_chars_per_s": speed["fused"],
        "scratch_chars_per_s": speed["scratch"],
        "ratio": speed["scratch"] / speed["fused"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn_tanh"])
    p.add_argument("--hidden", nargs="+", type=int, default=[128, 256, 512])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--steps", type=int, default=3, help="training steps per timing")
    p.add_argument("--repeats", type=int, default=3, help="timings per implementation; the median is reported")
    p.add_argument("--json", default="outputs/bench/cells.json")
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
    at_256 = [r["ratio"] for r in rows if r["hidden"] == 256]
    if at_256:
        met = min(at_256) >= TARGET_RATIO_AT_256
        print(f"\ntarget scratch >= {TARGET_RATIO_AT_256}x fused at hidden 256: {'met' if met else 'MISSED'}"
              f" (lowest {min(at_256):.2f})")  # fmt: skip
    path = write_json(args.json, {"machine": info, "args": vars(args), "results": rows})
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
