"""Framework overhead and roofline: charlm (CharLM + Lightning Trainer) vs a plain PyTorch loop on the same model.

    .venv/bin/python -m bench.throughput                          # 2x512 LSTM, batch 32 x seq_len 128
    .venv/bin/python -m bench.throughput --hidden 256 --steps 20 --pairs 5

charlm runs as ``train.py`` builds it (``train.build``): the Tiny Shakespeare DataModule with its TBPTT
streams, CharLM with token-weighted metrics and carried state, AdamW, gradient clipping, the TensorBoard
logger, the progress bar, checkpointing, LR monitor; only validation is off (this measures training). The
plain loop trains an identical ``RNNStack`` (same weights, optimizer, clipping, dropout) on the same token
streams sliced from one tensor. The two alternate A B A B in this process; each run times ``--steps``
steps after ``--warmup`` steps, and the ratio of each pair's chars/s is reported with its median.
Target: median ratio >= 0.97 for a 2x512 LSTM at batch 32 x seq_len 128.

Roofline: training FLOPs per character are 6 * G * h * (in + h) per layer (G gate blocks, ``CellSpec.blocks``;
forward 2 FLOPs per multiply-add, backward twice the forward; G = 4 gives the LSTM's 24 h (in + h); a cell
without W_hh drops the h term) plus 6 * h * V for the decoder. The achieved GFLOP/s is set against a measured
fp32 matmul peak of this machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from bench.report import table, write_json
from charlm.config import build, compose
from charlm.hardware import default_precision
from charlm.info import describe, machine_info
from charlm.nn.cells import CELLS
from charlm.nn.rnn import RNNStack
from charlm.training.module import CharLM

TARGET_RATIO = 0.97


class StepTimer(pl.Callback):
    """Wall-clock of training steps ``warmup`` .. ``warmup + steps - 1``, data fetching included."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.start, self.seconds = warmup, steps, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup - 1:
            self.start = time.perf_counter()
        elif batch_idx == self.warmup + self.steps - 1:
            self.seconds = time.perf_counter() - self.start


def compose_run(args: argparse.Namespace, out: Path):
    overrides = [
        "data=tinyshakespeare",
        f"data.batch_size={args.batch}",
        f"data.seq_len={args.seq_len}",
        f"model.cell={args.cell}",
        f"model.num_layers={args.layers}",
        f"model.hidden_size={args.hidden}",
        "trainer=cpu",
        f"trainer.max_steps={args.warmup + args.steps}",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        f"paths.output_dir={out}",
        "overwrite_run_dir=true",  # every pair trains into the same scratch directory
        "sample_length=0",
        *args.override,
    ]
    return compose(overrides)


def run_charlm(cfg, args: argparse.Namespace) -> tuple[float, CharLM, pl.Trainer]:
    dm, model, trainer = build(cfg)
    timer = StepTimer(args.warmup, args.steps)
    trainer.callbacks.append(timer)
    trainer.fit(model, datamodule=dm)
    return args.batch * args.seq_len * args.steps / timer.seconds, model, trainer


def run_plain(cfg, dm, args: argparse.Namespace, model: CharLM, trainer: pl.Trainer) -> float:
    """The loop a careful user would write by hand: streams, carried detached state, clipping; with the charlm
    run's network config, weights, optimiser (class and settings, from the same ``OptimConfig``) and precision
    (Lightning's own precision plugin converts the module and supplies the autocast context)."""
    tokens = torch.from_numpy(dm.parts["train"].astype("int64"))
    n = (len(tokens) - 1) // args.batch
    streams, targets = tokens[: n * args.batch].view(args.batch, n), tokens[1 : n * args.batch + 1].view(args.batch, n)
    precision = trainer.precision_plugin
    net = RNNStack(len(dm.vocab), model.rnn_cfg)
    net.load_state_dict(model.net.state_dict())
    net = precision.convert_module(net).train()
    opt = model.optim_cfg.make_optimizer(net.parameters())
    state, start = None, None
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            start = time.perf_counter()
        j = i * args.seq_len % (n - args.seq_len)
        x, y = streams[:, j : j + args.seq_len], targets[:, j : j + args.seq_len]
        with precision.forward_context():
            logits, state = net(x, state)
        state = state.detach()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.trainer.gradient_clip_val)
        opt.step()
    return args.batch * args.seq_len * args.steps / (time.perf_counter() - start)


def flops_per_char(cell: str, layers: int, hidden: int, embedding: int, vocab: int) -> float:
    spec = CELLS[cell]
    recurrent = hidden if spec.recurrent else 0  # the width W_hh reads
    sizes = [embedding] + [hidden] * (layers - 1)
    return sum(6 * spec.blocks * hidden * (n + recurrent) for n in sizes) + 6 * hidden * vocab


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cell", default="lstm", choices=list(CELLS))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=15, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--pairs", type=int, default=3, help="A B pairs")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override for the charlm run")
    p.add_argument("--json", default="outputs/bench/throughput.json")
    args = p.parse_args()

    info = machine_info()
    print(describe(info))
    print(
        f"{args.layers}x{args.hidden} {args.cell}, batch {args.batch} x seq_len {args.seq_len}, {args.steps} steps/run"
    )
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_run(args, Path(tmp))
        dm = instantiate(cfg.data)
        print(f"precision {cfg.trainer.precision} in both loops (change it with --override trainer.precision=...)")
        for i in range(args.pairs):
            charlm, model, trainer = run_charlm(cfg, args)
            plain = run_plain(cfg, dm, args, model, trainer)
            pairs.append({"charlm_chars_per_s": charlm, "plain_chars_per_s": plain, "ratio": charlm / plain})
            print(f"  pair {i + 1}: charlm {charlm:,.0f} chars/s, plain {plain:,.0f} chars/s", flush=True)
    median = statistics.median(r["ratio"] for r in pairs)
    print()
    rows = [[f"pair {i + 1}", f"{r['charlm_chars_per_s']:,.0f}", f"{r['plain_chars_per_s']:,.0f}", f"{r['ratio']:.3f}"]
            for i, r in enumerate(pairs)]  # fmt: skip
    print(table(["run", "charlm chars/s", "plain loop chars/s", "charlm / plain"], rows))
    verdict = "met" if median >= TARGET_RATIO else "MISSED"
    print(f"median ratio {median:.3f}; target >= {TARGET_RATIO}: {verdict}")

    embedding = cfg.model.embedding_size or args.hidden
    fpc = flops_per_char(args.cell, args.layers, args.hidden, embedding, len(dm.vocab))
    peak = matmul_peak()
    # Emulated bf16 (no AVX512-BF16 / AMX) is ~30x slower than fp32 and would take minutes to time: skip it.
    peak_bf16 = matmul_peak(torch.bfloat16) if default_precision("cpu")[0] == "bf16-mixed" else None
    bf16_row = [f"{peak_bf16:.1f}", f"{100 * peak_bf16 / peak:.0f}%"] if peak_bf16 else ["-", "not native here"]
    achieved = {k: statistics.median(r[f"{k}_chars_per_s"] for r in pairs) * fpc / 1e9 for k in ("charlm", "plain")}
    print()
    print(
        table(
            ["roofline", "GFLOP/s", "% of matmul peak"],
            [[f"{k} training", f"{v:.1f}", f"{100 * v / peak:.0f}%"] for k, v in achieved.items()]
            + [
                ["fp32 matmul 2048^3 (peak)", f"{peak:.1f}", "100%"],
                ["bf16 matmul 2048^3", *bf16_row],
            ],
        )
    )
    print(f"({fpc / 1e6:.2f} MFLOP per training character)")
    result = {
        "pairs": pairs,
        "median_ratio": median,
        "flops_per_char": fpc,
        "matmul_peak_gflops": peak,
        "bf16_matmul_gflops": peak_bf16,
    }
    path = write_json(args.json, {"machine": info, "args": vars(args), "results": result | {"gflops": achieved}})
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
