"""Memory against corpus size: tokenize, then train 100 steps, on generated corpora; print each phase's peak RSS.

    .venv/bin/python -m bench.memory                 # 20 MB, 200 MB and 2 GB (about 4.5 GB of free disk)
    .venv/bin/python -m bench.memory --mb 20 200     # other sizes (MB = 10^6 bytes)
    .venv/bin/python -m bench.memory --archive xz --mb 20 1024   # tokenizing from a .xz against the plain text

The corpora are bench.tokenize_speed's mixed-script text (The Time Machine and Tiny Shakespeare with Chinese,
accented, Greek / Cyrillic / Hebrew / Arabic and emoji lines). Each size runs in a fresh process, in two
phases, each with its own RSS high-water mark (Linux: /proc/self/clear_refs, then VmHWM):
- tokenize: ``load_tokens`` into an empty cache (key hash, streaming encode, manifest);
- train: the real ``charlm.cli.train`` on the cached tokens: the default model, 100 optimizer steps, 20 val
  batches, no test, no sample.
Peak RSS counts file pages mapped into the process too (the token memory map): only those the run touches.
Target (issue 10): peak RSS grows by less than 0.1 x the corpus size, i.e. (peak at N MB - peak at the
smallest size) < 0.1 x (N - smallest) MB, for each phase.

``--archive gz|bz2|xz|zst``: the tokenize phase only, of each corpus and of the same text compressed
(bench.tokenize_speed.build_archive: xz at preset 0 builds a gigabyte in minutes), each in a fresh process.
Target: the archive's peak RSS exceeds the plain text's by less than 0.1 x the corpus size, and (with two
sizes or more) grows by less than 0.1 x the corpus growth, as above: memory flat in the archive's size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import ROOT
from bench.report import measure_or_run, table, write_json
from bench.tokenize_speed import _status_bytes, build_archive, build_corpus
from charlm import UserError
from charlm.info import describe, machine_info

TARGET_GROWTH = 0.1  # peak RSS growth / corpus growth
PHASES = ("tokenize", "train")


def _reset_peak() -> int:
    """Set the RSS high-water mark to the current RSS (Linux); return that RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def measure(corpus: Path, work: Path, steps: int) -> dict:
    """Both phases in this fresh process (``steps`` 0: tokenize only): for each, the RSS before it and its peak,
    in bytes."""
    from charlm.data.cache import load_tokens

    result = {}
    before = _reset_peak()
    tokens, vocab = load_tokens(corpus, work / "cache")
    peak, file_bytes = _status_bytes("VmHWM"), corpus.stat().st_size
    result["tokenize"] = {"before": before, "peak": peak, "tokens": len(tokens), "file_bytes": file_bytes}
    del tokens
    if not steps:
        return result
    from charlm.cli import train
    from charlm.config import compose

    cfg = compose(
        [
            f"data.path={corpus}",
            f"paths.cache_dir={work / 'cache'}",
            f"paths.output_dir={work / 'run'}",
            "trainer=cpu",
            "trainer.max_epochs=1",
            f"trainer.max_steps={steps}",
            f"trainer.limit_train_batches={steps}",
            "trainer.limit_val_batches=20",
            "trainer.num_sanity_val_steps=0",
            "trainer.enable_progress_bar=false",
            "logger=none",
            "test=false",
            "sample_length=0",
        ]
    )
    before = _reset_peak()
    train(cfg)
    result["train"] = {"before": before, "peak": _status_bytes("VmHWM"), "steps": steps}
    return result


def measure_in_subprocess(corpus: Path, work: Path, steps: int) -> dict:
    cmd = [sys.executable, "-m", "bench.memory", "--measure", str(corpus), "--work", str(work), "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"the measuring process failed with exit code {proc.returncode} ({last}); fix that first.")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> None:
    if not Path("/proc/self/clear_refs").exists():
        raise UserError("bench.memory reads Linux's /proc/self (clear_refs, VmHWM); run it on Linux.")
    sizes = sorted(args.mb)
    if not sizes or sizes[0] <= 0 or args.steps < 1:
        raise UserError(f"--mb {args.mb} and --steps {args.steps} must be positive; e.g. --mb 20 200 --steps 100.")
    info = machine_info()
    print(describe(info), flush=True)
    if args.archive:
        return run_archive(args, sizes, info)
    results = []
    for mb in sizes:
        with tempfile.TemporaryDirectory(prefix="charlm-memory-", dir=args.tmp_dir) as tmp:
            corpus = Path(tmp) / "corpus.txt"
            corpus_bytes = build_corpus(corpus, round(mb * 1e6))
            measured = measure_in_subprocess(corpus, Path(tmp), args.steps)
        results.append({"bytes": corpus_bytes} | measured)
        print(f"  {corpus_bytes / 1e6:,.0f} MB measured", flush=True)
    base = results[0]
    rows, verdicts = [], []
    for r in results:
        row = [f"{r['bytes'] / 1e6:,.0f}", f"{r['tokenize']['tokens']:,}"]
        for phase in PHASES:
            growth = (r[phase]["peak"] - base[phase]["peak"]) / max(r["bytes"] - base["bytes"], 1)
            row += [f"{r[phase]['peak'] / 1e6:,.0f}", "-" if r is base else f"{growth:.3f}"]
            if r is not base:
                verdicts.append(growth < TARGET_GROWTH)
        rows.append(row)
    header = ["corpus MB", "characters", "tokenize peak RSS MB", "growth / corpus", "train peak RSS MB", "growth"]
    smallest = f"{base['bytes'] / 1e6:,.0f} MB"
    print(f"\n{args.steps} training steps per size; growth = (peak - peak at {smallest}) / corpus growth")
    print(table(header, rows))
    met = "met" if all(verdicts) else "MISSED"
    print(f"\ntarget: peak RSS grows by less than {TARGET_GROWTH} x the corpus size: {met}")
    report = {"benchmark": "memory", "machine": info, "steps": args.steps, "target": TARGET_GROWTH, "results": results}
    print(f"json: {write_json(args.json, report)}")


def run_archive(args: argparse.Namespace, sizes: list[float], info: dict) -> None:
    """The tokenize phase of the plain corpus and of the same text as a ``--archive`` file, size by size."""
    results = []
    for mb in sizes:
        with tempfile.TemporaryDirectory(prefix="charlm-memory-", dir=args.tmp_dir) as tmp:
            corpus = Path(tmp) / "corpus.txt"
            corpus_bytes = build_corpus(corpus, round(mb * 1e6))
            archive = build_archive(corpus, args.archive)
            result = {"bytes": corpus_bytes, "archive_bytes": archive.stat().st_size}
            for name, source in (("plain", corpus), ("archive", archive)):
                (Path(tmp) / name).mkdir()
                result[name] = measure_in_subprocess(source, Path(tmp) / name, 0)["tokenize"]
        results.append(result)
        print(f"  {corpus_bytes / 1e6:,.0f} MB measured", flush=True)
    base, rows, verdicts = results[0], [], []
    for r in results:
        over = (r["archive"]["peak"] - r["plain"]["peak"]) / r["bytes"]
        growth = (r["archive"]["peak"] - base["archive"]["peak"]) / max(r["bytes"] - base["bytes"], 1)
        verdicts += [over < TARGET_GROWTH] + ([growth < TARGET_GROWTH] if r is not base else [])
        rows.append(
            [f"{r['bytes'] / 1e6:,.0f}", f"{r['archive_bytes'] / 1e6:,.1f}", f"{r['plain']['peak'] / 1e6:,.0f}"]
            + [f"{r['archive']['peak'] / 1e6:,.0f}", f"{over:+.3f}", "-" if r is base else f"{growth:.3f}"]
        )
    header = ["corpus MB", f".{args.archive} MB", "plain peak RSS MB", "archive peak RSS MB", "over plain / corpus"]
    print(f"\ntokenize phase; growth = (archive peak - its peak at {base['bytes'] / 1e6:,.0f} MB) / corpus growth")
    print(table([*header, "growth"], rows))
    met = "met" if all(verdicts) else "MISSED"
    print(
        f"\ntarget: the archive's peak RSS is flat, within {TARGET_GROWTH} x the corpus size of the plain text's: {met}"
    )
    report = {"benchmark": "memory", "machine": info, "archive": args.archive, "target": TARGET_GROWTH}
    print(f"json: {write_json(args.json, report | {'results': results})}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", "--size-mb", type=float, nargs="+", default=[20, 200, 2000], help="corpus sizes in MB")
    parser.add_argument("--archive", choices=("gz", "bz2", "xz", "zst"), help="tokenize from this format vs plain")
    parser.add_argument("--steps", type=int, default=100, help="training steps per size; default 100")
    parser.add_argument("--tmp-dir", default=None, help="where to build corpora and caches; default the temp dir")
    parser.add_argument("--json", default=ROOT / "outputs/bench/memory.json", help="default outputs/bench/")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: one size, JSON out
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    measure_or_run(args, lambda: measure(args.measure, args.work, args.steps), run)


if __name__ == "__main__":
    main()
