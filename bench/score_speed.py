"""Scoring speed: ``charlm.score.score`` (``charlm-score``) in characters per second, one stream and B streams.

    .venv/bin/python -m bench.score_speed                          # 2x512 LSTM, Tiny Shakespeare, 1 / 16 / 64 streams
    .venv/bin/python -m bench.score_speed --ckpt RUN/checkpoints/best.ckpt --text big.txt --streams 1 32

A randomly initialised net of the given shape (speed does not depend on the weights' values) or ``--ckpt``'s; the
text is ``--text``, its first ``--max-chars`` characters. Each setting runs once untimed (kernels' one-time
set-up), then ``--repeats`` times; the table shows the fastest run and the nats per character, whose change with
the number of streams is the cost of the streams' zero-state starts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench import ROOT
from bench.report import table, write_json
from charlm.data.vocab import CharVocab
from charlm.info import describe, machine_info
from charlm.nn.rnn import RNNConfig, RNNStack
from charlm.score import CHUNK, score
from charlm.training.module import load_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cell", default="lstm")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ckpt", type=Path, help="score with this checkpoint instead of a random net")
    p.add_argument("--text", default=str(ROOT / "data/tinyshakespeare.txt"))
    p.add_argument("--max-chars", type=int, default=200_000)
    p.add_argument("--streams", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--chunk", type=int, default=CHUNK, help="tokens per forward pass, all streams together")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's")
    p.add_argument("--json", default="outputs/bench/score_speed.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    text = Path(args.text).read_text(encoding="utf-8")[: args.max_chars]
    if args.ckpt:
        model = load_checkpoint(args.ckpt).eval()
        net, vocab, shape = model.net, model.vocab, str(args.ckpt)
    else:
        vocab = CharVocab.from_text(text)
        torch.manual_seed(0)
        config = RNNConfig(cell=args.cell, num_layers=args.layers, hidden_size=args.hidden)
        net, shape = RNNStack(len(vocab), config).eval(), f"{args.layers}x{args.hidden} {args.cell}"
    info = machine_info()
    print(describe(info))
    print(f"{shape}, vocab {len(vocab)}, {len(text):,} characters of {args.text}, chunk {args.chunk}")
    rows = []
    for streams in args.streams:
        score(net, vocab, text[: 4 * streams + 100], streams=streams, unknown="skip", chunk=args.chunk)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = score(net, vocab, text, streams=streams, unknown="skip", chunk=args.chunk)
            times.append(time.perf_counter() - start)
        best = min(times)
        per_char = result.nats / result.tokens
        rows.append(
            {"streams": streams, "seconds": best, "chars_per_s": result.tokens / best, "nats_per_char": per_char}
        )
        print(f"  {streams} streams: {best:.2f} s", flush=True)
    print()
    print(
        table(
            ["streams", "seconds", "chars/s", "nats per char"],
            [
                [r["streams"], f"{r['seconds']:.2f}", f"{r['chars_per_s']:,.0f}", f"{r['nats_per_char']:.5f}"]
                for r in rows
            ],
        )
    )
    report = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "results": rows}
    print(f"JSON: {write_json(args.json, report)}")


if __name__ == "__main__":
    main()
