"""Sampling speed: charlm's generate (cell-equation steps, exact or int8) vs stepping the fused kernel vs re-feeding
the context; and what int8 costs in bits per character on a trained checkpoint.

    .venv/bin/python -m bench.sampling                     # 2x512 LSTM, 1 and 64 streams, 100 / 1k / 10k chars
    .venv/bin/python -m bench.sampling --hidden 256 --lengths 100 1000
    .venv/bin/python -m bench.sampling --ckpt RUN/checkpoints/best.ckpt --text data/tinyshakespeare.txt --tail 0.1

Three samplers, all at ``GenerationConfig``'s default temperature on the same randomly initialised net (speed
does not depend on the weights' values):
- ``charlm``: ``charlm.infer.generation.generate``: the prompt in one pass, then ``charlm.nn.stepper.Stepper``,
  which runs the cell equations with layer 0's input projection precomputed per token, on float32 weights (exact).
- ``charlm int8``: the same with ``quantize="int8"``: weight-only int8 matrices (bf16 activations).
- ``fused step``: the same loop, but each character goes through the fused torch layers as a length-1
  sequence (what generate did before the stepper).
- ``naive``: re-feeds the whole context every step, O(n^2): the sampler of many tutorials.
- with ``--compile``, also ``charlm compiled`` and ``charlm int8 compiled`` (single stream): generate's loop with
  the Stepper's step under ``torch.compile`` (Inductor, C++ on CPU), compiled before the first character. It lost
  on the machines measured, so generate() does not offer it; this row re-checks that on yours.
``--threads N`` sets torch's CPU threads for the whole run (``generate.py threads=N``). Every sampler but the
compiled ones runs once before timing, so one-time kernel set-up in the process is not counted as steps.
The time to the first character (prompt pass, set-up) is reported apart; "ms per step" and chars/s count
every character after it, and must stay flat as the length grows for the first three samplers. Runs whose
estimated cost exceeds the ``--*-budget`` options are skipped (shown as "-").

``--beams``: beam search (``generate.py beam=K``, ``charlm.infer.beam``) for each K, ``--beam-length`` characters after
the prompt: characters of the result per second (each step advances all K beams as one batch).

With ``--ckpt``, the checkpoint's bits per character on ``--text`` (its last ``--tail`` fraction, e.g. the
val split) are computed both ways through the Stepper, one character at a time with the state carried:
int8's target is within 0.01 of float32.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from bench import ROOT
from bench.report import table, write_json
from charlm.data.vocab import CharVocab
from charlm.infer.beam import beam_search
from charlm.infer.generation import GenerationConfig, Stepper, generate, next_token
from charlm.info import describe, machine_info
from charlm.nn.rnn import RNNConfig, RNNStack
from charlm.training.module import load_checkpoint

TARGET_SINGLE_STREAM = 3000.0  # chars/s, 2x512 LSTM, 2 CPU cores, float32
TARGET_INT8 = 6000.0  # chars/s, the same with quantize=int8
TARGET_INT8_BITS = 0.01  # |int8 bpc - float32 bpc| on a trained model
SAMPLING = GenerationConfig()  # temperature 0.8
VOCAB = CharVocab.from_text((ROOT / "data/tinyshakespeare.txt").read_text(encoding="utf-8"))  # 65 characters


# Each sampler yields the ids of every new character, so the harness can time the first one apart.


def run_charlm(net: RNNStack, streams: int, length: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    return generate(net, VOCAB, "The ", length, SAMPLING, num_samples=streams, generator=generator)


def run_int8(net: RNNStack, streams: int, length: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    return generate(net, VOCAB, "The ", length, SAMPLING, num_samples=streams, generator=generator, quantize="int8")


@torch.inference_mode()
def run_fused_step(net: RNNStack, streams: int, length: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    logits, state = net(torch.tensor(VOCAB.encode("The ")).long().expand(streams, -1))
    for _ in range(length):
        ids = next_token(logits[:, -1], SAMPLING.temperature, generator=generator)
        yield ids
        logits, state = net(ids[:, None], state)


@torch.inference_mode()
def run_naive(net: RNNStack, streams: int, length: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    context = torch.tensor(VOCAB.encode("The ")).long().expand(streams, -1)
    for _ in range(length):
        logits, _ = net(context)  # from a zero state, every time
        ids = next_token(logits[:, -1], SAMPLING.temperature, generator=generator)
        yield ids
        context = torch.cat([context, ids[:, None]], dim=1)


def compiled_stepper(net: RNNStack, quantize: str) -> Stepper:
    """A Stepper whose ``advance`` is under ``torch.compile`` (compiled at its first call)."""
    torch._dynamo.reset()  # a fresh compile per run: each Stepper would otherwise count against its cache limit
    step = Stepper(net, quantize)
    step.advance = torch.compile(step.advance, dynamic=False, fullgraph=True)
    return step


def run_compiled(quantize: str):
    """generate()'s loop (prompt pass, then Stepper steps) with ``Stepper.advance`` compiled before the first
    character: for the ``--compile`` rows only."""

    @torch.inference_mode()
    def run(net: RNNStack, streams: int, length: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        logits, state = net(torch.tensor(VOCAB.encode("The ")).long().expand(streams, -1))
        step = compiled_stepper(net, quantize)
        layers, logits = step.split(state), logits[:, -1]
        step.advance(torch.zeros(streams, dtype=torch.long), layers)  # compile now, timed with the first character
        for _ in range(length):
            ids = next_token(logits, SAMPLING.temperature, generator=generator)
            yield ids
            logits, layers = step.advance(ids, layers)

    return run


def timed(steps: Iterator[torch.Tensor]) -> tuple[float, float]:
    """(seconds to the first character: prompt pass and set-up, seconds for all of them)."""
    start = time.perf_counter()
    next(steps)
    first = time.perf_counter() - start
    for _ in steps:
        pass
    return first, time.perf_counter() - start


SAMPLERS = {"charlm": run_charlm, "charlm int8": run_int8, "fused step": run_fused_step, "naive": run_naive}


@torch.inference_mode()
def stepped_bits(model, text: str, quantize: str) -> float:
    """Bits per character of ``model`` on ``text``, one character at a time through the Stepper, state carried."""
    ids = torch.from_numpy(model.vocab.encode(text, unknown="skip").astype("int64"))
    step = Stepper(model.net, quantize)
    layers = step.split(model.net.init_state(1))
    nats = 0.0
    for k in range(len(ids) - 1):
        logits, layers = step.advance(ids[k : k + 1], layers)
        nats -= torch.log_softmax(logits[0].float(), -1)[ids[k + 1]].item()
    return nats / (len(ids) - 1) / math.log(2)


def quality(args: argparse.Namespace) -> dict:
    model = load_checkpoint(args.ckpt).eval()
    text = Path(args.text).read_text(encoding="utf-8")
    text = text[len(text) - round(len(text) * args.tail) :][: args.max_chars]
    bits = {q: stepped_bits(model, text, q) for q in ("none", "int8")}
    gap = bits["int8"] - bits["none"]
    print(f"\n{args.ckpt}: {len(text):,} characters of {args.text} (last {args.tail:.0%}, at most {args.max_chars:,})")
    print(
        table(["weights", "bits per character"], [["float32", f"{bits['none']:.4f}"], ["int8", f"{bits['int8']:.4f}"]])
    )
    verdict = "met" if abs(gap) <= TARGET_INT8_BITS else "MISSED"
    print(f"int8 - float32: {gap:+.4f} bits (target within {TARGET_INT8_BITS}): {verdict}")
    return {"ckpt": str(args.ckpt), "characters": len(text), "bits": bits, "gap": gap}


def affordable(name: str, streams: int, length: int, args: argparse.Namespace) -> bool:
    """Estimated cost in characters pushed through the net, against the sampler's budget."""
    if name == "naive":
        return streams * length * length / 2 <= args.naive_budget
    if name == "fused step":
        return length <= args.fused_step_max_length
    return True


def beams(net: RNNStack, widths: list[int], length: int) -> list[dict]:
    """Beam search's speed per width: characters of the result per second, after one untimed run."""
    rows = []
    for k in widths:
        beam_search(net, VOCAB, "The ", min(length, 20), beam=k)
        start = time.perf_counter()
        beam_search(net, VOCAB, "The ", length, beam=k)
        seconds = time.perf_counter() - start
        rows.append({"beam": k, "length": length, "seconds": seconds, "chars_per_s": length / seconds})
    print()
    print(
        table(
            ["beam", "length", "seconds", "chars/s"],
            [[r["beam"], r["length"], f"{r['seconds']:.2f}", f"{r['chars_per_s']:,.0f}"] for r in rows],
        )
    )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cell", default="lstm")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--streams", nargs="+", type=int, default=[1, 64])
    p.add_argument("--lengths", nargs="+", type=int, default=[100, 1000, 10000])
    p.add_argument("--naive-budget", type=float, default=1e6, help="max streams * length^2 / 2 for naive")
    p.add_argument("--fused-step-max-length", type=int, default=1000)
    p.add_argument("--ckpt", type=Path, help="a trained checkpoint: also compare its bpc with int8 and float32")
    p.add_argument("--text", default=str(ROOT / "data/tinyshakespeare.txt"), help="text for --ckpt's bpc")
    p.add_argument("--tail", type=float, default=0.1, help="the last fraction of --text (0.1: nanoGPT's val split)")
    p.add_argument("--max-chars", type=int, default=20000, help="at most this many characters of it")
    p.add_argument("--compile", action="store_true", help="also time the step under torch.compile (1 stream)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (generate.py threads=N); 0: torch's")
    p.add_argument("--beams", nargs="+", type=int, default=[1, 2, 4, 8], help="beam widths K to time")
    p.add_argument("--beam-length", type=int, default=500, help="characters after the prompt for --beams")
    p.add_argument("--json", default="outputs/bench/sampling.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    samplers = dict(SAMPLERS)
    if args.compile:
        samplers |= {"charlm compiled": run_compiled("none"), "charlm int8 compiled": run_compiled("int8")}

    info = machine_info()
    print(describe(info))
    print(f"{args.layers}x{args.hidden} {args.cell}, vocab {len(VOCAB)}, {SAMPLING}, prompt 'The '")
    torch.manual_seed(0)
    net = RNNStack(len(VOCAB), RNNConfig(cell=args.cell, num_layers=args.layers, hidden_size=args.hidden)).eval()
    for name, fn in samplers.items():  # warm-up: each kernel's one-time set-up in this process is not a step
        if "compiled" not in name:  # (compiling is: it counts in the compiled rows' first character)
            for _ in fn(net, 1, 50, torch.Generator().manual_seed(0)):
                pass
    rows = []
    for name, fn in samplers.items():
        for streams in [1] if "compiled" in name else args.streams:
            for length in args.lengths:
                if not affordable(name, streams, length, args):
                    rows.append({"sampler": name, "streams": streams, "length": length, "seconds": None})
                    continue
                first, seconds = timed(fn(net, streams, length, torch.Generator().manual_seed(0)))
                step = (seconds - first) / max(1, length - 1)  # every character after the first
                rate = {"first_char_ms": 1e3 * first, "ms_per_step": 1e3 * step, "chars_per_s": streams / step}
                rows.append({"sampler": name, "streams": streams, "length": length, "seconds": seconds} | rate)
                print(f"  {name}, {streams} streams, {length} chars: {seconds:.2f} s", flush=True)

    def fmt(r: dict, key: str, spec: str) -> str:
        return "-" if r["seconds"] is None else format(r[key], spec)

    print()
    print(
        table(
            ["sampler", "streams", "length", "first char ms", "ms per step", "chars/s (all streams)"],
            [[r["sampler"], r["streams"], r["length"], fmt(r, "first_char_ms", ".1f"), fmt(r, "ms_per_step", ".3f"),
              fmt(r, "chars_per_s", ",.0f")] for r in rows],
        )
    )  # fmt: skip
    for sampler, target in (("charlm", TARGET_SINGLE_STREAM), ("charlm int8", TARGET_INT8)):
        single = [r for r in rows if r["sampler"] == sampler and r["streams"] == 1 and r["seconds"] is not None]
        if single and args.hidden == 512 and args.layers == 2 and args.cell == "lstm":
            slowest = min(r["chars_per_s"] for r in single)
            flat = max(r["ms_per_step"] for r in single) / min(r["ms_per_step"] for r in single)
            verdict = "met" if slowest >= target else "MISSED"
            print(
                f"\n{sampler}: target >= {target:,.0f} chars/s single stream: {verdict} (slowest length:"
                f" {slowest:,.0f}); time per step, slowest / fastest length: {flat:.2f}"
            )
    report = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "results": rows}
    report["beam"] = beams(net, args.beams, args.beam_length)
    if args.ckpt:
        report["int8_quality"] = quality(args)
    path = write_json(args.json, report)
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
