"""Benchmark corpus -> token cache: ``charlm.data.cache.load_tokens`` on a built corpus, first run and cached reload.

    .venv/bin/python -m bench.tokenize_speed --mb 100
    .venv/bin/python -m bench.tokenize_speed --mb 100 --archive xz   # also the same text read from a .xz
    .venv/bin/python -m bench.tokenize_speed --quick --archive zst   # 1 MB, once: checks that it runs

The corpus is The Time Machine and Tiny Shakespeare, line by line, with a Chinese, accented-Latin, Greek /
Cyrillic / Hebrew / Arabic or emoji line after every 20th, repeated up to ``--mb`` megabytes (10^6 bytes).
Each measurement runs in a fresh Python process that first imports charlm.data.cache (numpy):
its RSS then is the import baseline. On Linux the process resets its RSS high-water mark to that baseline
(/proc/self/clear_refs), so the peak it reports afterwards (VmHWM) belongs to the ``load_tokens`` call
alone; elsewhere it falls back to ``ru_maxrss``, which also counts the import's transient peak. Targets:
at least 100 MB/s, and a peak RSS above the import baseline of at most twice the corpus size.

``--archive gz|bz2|xz|zst`` also compresses the corpus (fast settings: gzip and bzip2 level 1, xz preset 0,
zstd level 3) and measures its first run from that file: MB/s there counts the uncompressed text, so it
compares with the plain file's first run, decompression included.

(Not ``bench/tokenize.py``: run as a script, that file would shadow the standard library's ``tokenize``,
which torch imports, and break every script in bench/.)
"""

from __future__ import annotations

import argparse
import bz2
import json
import lzma
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from bench import ROOT
from bench.report import measure_or_run, table, write_json
from charlm import UserError
from charlm.info import describe, machine_info

TARGET_MB_S = 100.0
TARGET_MEMORY_RATIO = 2.0  # peak RSS above the import baseline / corpus bytes
NON_ASCII = (
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "Ça ne fait rien, señor: the naïve café's façade, Ærøskøbing, Dvořák, Łódź, Zürich, São Paulo.",
    "🙂 the time machine 🚀 went 🌍 forward ✨ and back 🎉 👩‍💻 🐍 🤖",
    "Ελληνικά γράμματα, русский текст, עברית, العربية.",
)
MEASUREMENTS = {"first_run": "first run (empty cache)", "cached": "cached reload"}
ARCHIVE = "archive"  # the stage that reads the compressed corpus, with --archive
QUICK = {"mb": 1.0, "repeats": 1}  # --quick: checks that it runs, measures nothing worth reporting


def build_corpus(path: Path, n_bytes: int) -> int:
    """Write whole lines of mixed-script UTF-8 to ``path``, at most ``n_bytes``; return the bytes written."""
    lines: list[str] = []
    for name in ("timemachine.txt", "tinyshakespeare.txt"):
        lines += (ROOT / "data" / name).read_text(encoding="utf-8").splitlines(keepends=True)
    mixed = []
    for i, line in enumerate(lines, 1):
        mixed.append(line)
        if i % 20 == 0:
            mixed.append(NON_ASCII[(i // 20) % len(NON_ASCII)] + "\n")
    block = "".join(mixed).encode("utf-8")
    repeats, rest = divmod(n_bytes, len(block))
    tail = block[: block.rfind(b"\n", 0, rest) + 1]  # whole lines only, so no character is cut in half
    with path.open("wb") as f:
        for _ in range(repeats):
            f.write(block)
        f.write(tail)
    return repeats * len(block) + len(tail)


def build_archive(corpus: Path, fmt: str) -> Path:
    """``corpus`` compressed beside it as ``corpus.<fmt>`` (gz, bz2, xz or zst), block by block, with the format's
    fast settings: a gigabyte takes seconds to minutes, not the hour of xz's default."""
    if fmt == "zst":
        import zstandard  # an optional extra: charlm-lightning[zstd]

        compressor = zstandard.ZstdCompressor(write_checksum=True).compressobj()  # the zstd tool's checksum too
    else:
        compressor = {
            "gz": lambda: zlib.compressobj(1, wbits=31),  # wbits 31: gzip's header and trailer
            "bz2": lambda: bz2.BZ2Compressor(1),
            "xz": lambda: lzma.LZMACompressor(preset=0),
        }[fmt]()
    archive = corpus.with_name(f"{corpus.name}.{fmt}")
    with corpus.open("rb") as src, archive.open("wb") as out:
        for block in iter(lambda: src.read(1 << 20), b""):
            out.write(compressor.compress(block))
        out.write(compressor.flush())
    return archive


def _status_bytes(field: str) -> int:
    """A size field (``VmRSS``, ``VmHWM``) of /proc/self/status, in bytes."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


def max_rss() -> int:
    """``ru_maxrss``: the peak RSS of this process's whole life, in bytes (Linux reports KiB, macOS bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def measure(corpus: Path, cache_dir: Path, preprocess: str) -> dict:
    """One ``load_tokens`` call in this fresh process: its seconds, the RSS before it, and its peak RSS."""
    from charlm.data.cache import load_tokens  # here: only the measuring processes need it

    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        clear_refs.write_text("5")  # Linux: VmHWM := VmRSS, so the next VmHWM is the peak of this call alone
        baseline = _status_bytes("VmRSS")
    else:
        baseline = max_rss()
    cached = cache_dir.is_dir() and any(cache_dir.iterdir())
    start = time.perf_counter()
    tokens, vocab = load_tokens(corpus, cache_dir, preprocess=preprocess)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "cache_hit": cached,
        "baseline_rss": baseline,
        "peak_rss": _status_bytes("VmHWM") if clear_refs.exists() else max_rss(),
        "lifetime_max_rss": max_rss(),
        "file_bytes": corpus.stat().st_size,  # what was read from disk: the archive's size for an archive
        "characters": len(tokens),
        "vocab_size": len(vocab),
        "dtype": str(tokens.dtype),
    }


def measure_in_subprocess(corpus: Path, cache_dir: Path, preprocess: str) -> dict:
    cmd = [sys.executable, "-m", "bench.tokenize_speed", "--measure", str(corpus), "--cache-dir", str(cache_dir)]
    proc = subprocess.run([*cmd, "--preprocess", preprocess], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if last.startswith("error: "):  # a UserError of load_tokens: pass its sentence on as it is
            raise UserError(last.removeprefix("error: "))
        raise UserError(f"the measuring process failed with exit code {proc.returncode} ({last}); fix that first.")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict], corpus_bytes: int) -> dict:
    """Median time, worst memory over the repeats, against the targets."""
    seconds = statistics.median(r["seconds"] for r in runs)
    above = max(r["peak_rss"] - r["baseline_rss"] for r in runs)
    return {
        "seconds": seconds,
        "mb_per_s": corpus_bytes / 1e6 / seconds,
        "peak_rss_mb": max(r["peak_rss"] for r in runs) / 1e6,
        "baseline_rss_mb": statistics.median(r["baseline_rss"] for r in runs) / 1e6,
        "above_baseline_mb": above / 1e6,
        "above_baseline_per_corpus": above / corpus_bytes,
        "meets_speed": corpus_bytes / 1e6 / seconds >= TARGET_MB_S,
        "meets_memory": above / corpus_bytes <= TARGET_MEMORY_RATIO,
        "runs": runs,
    }


def run(args: argparse.Namespace) -> None:
    if args.mb <= 0 or args.repeats < 1:
        raise UserError(f"--mb {args.mb} and --repeats {args.repeats} must be positive; e.g. --mb 100 --repeats 3.")
    info = machine_info()
    print(describe(info), flush=True)
    with tempfile.TemporaryDirectory(prefix="charlm-bench-", dir=args.tmp_dir) as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus_bytes = build_corpus(corpus, round(args.mb * 1e6))
        if corpus_bytes == 0:
            raise UserError(f"--mb {args.mb} is smaller than one line of text; use --mb 0.01 or more.")
        archive = build_archive(corpus, args.archive) if args.archive else None
        archive_bytes = archive.stat().st_size if archive else None
        stages = {**MEASUREMENTS, **({ARCHIVE: f"first run from .{args.archive}"} if archive else {})}
        runs: dict[str, list[dict]] = {stage: [] for stage in stages}
        for r in range(args.repeats):
            cache_dir = Path(tmp) / f"cache{r}"  # empty: the first call tokenizes, the second reloads
            for stage in stages:
                source, cache = (archive, Path(tmp) / f"cache{r}-archive") if stage == ARCHIVE else (corpus, cache_dir)
                result = measure_in_subprocess(source, cache, args.preprocess)
                if stage == "cached" and not result["cache_hit"]:
                    raise UserError(
                        "load_tokens left its cache dir empty, so no reload can be measured; fix its cache."
                    )
                runs[stage].append(result)
    first = runs["first_run"][0]
    packed = f", .{args.archive} {archive_bytes / 1e6:.1f} MB" if archive else ""
    print(
        f"corpus: {corpus_bytes / 1e6:.1f} MB{packed}, {first['characters']:,} characters, vocab"
        f" {first['vocab_size']} ({first['dtype']}), data.preprocess={args.preprocess}; median of {args.repeats}"
        " run(s), MB = 10^6 bytes of text\n"
    )
    results = {stage: summarise(stage_runs, corpus_bytes) for stage, stage_runs in runs.items()}
    header = ["load_tokens", "seconds", "MB/s", "peak RSS MB", "import baseline MB", "above baseline MB", "x corpus"]
    rows = [
        [
            stages[stage],
            f"{s['seconds']:.3f}",
            f"{s['mb_per_s']:,.1f}",
            f"{s['peak_rss_mb']:,.0f}",
            f"{s['baseline_rss_mb']:,.0f}",
            f"{s['above_baseline_mb']:,.0f}",
            f"{s['above_baseline_per_corpus']:.2f}",
        ]
        for stage, s in results.items()
    ]
    print(table(header, rows))
    print(f"\ntargets: >= {TARGET_MB_S:.0f} MB/s, peak RSS above baseline <= {TARGET_MEMORY_RATIO:.0f}x corpus")
    verdict = {True: "met", False: "MISSED"}
    for stage, s in results.items():
        print(f"  {stages[stage]}: speed {verdict[s['meets_speed']]}, memory {verdict[s['meets_memory']]}")
    report = {
        "benchmark": "tokenize",
        "machine": info,
        "corpus": {k: first[k] for k in ("characters", "vocab_size", "dtype")}
        | {"bytes": corpus_bytes, "preprocess": args.preprocess, "repeats": args.repeats}
        | ({"archive": args.archive, "archive_bytes": archive_bytes} if archive else {}),
        "targets": {"mb_per_s": TARGET_MB_S, "above_baseline_per_corpus": TARGET_MEMORY_RATIO},
        "results": results,
    }
    print(f"json: {write_json(args.json, report)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size in MB (10^6 bytes); default 100")
    parser.add_argument("--archive", choices=("gz", "bz2", "xz", "zst"), help="also read the corpus from this format")
    parser.add_argument("--quick", action="store_true", help=f"to check that it runs: {QUICK}")
    parser.add_argument("--repeats", type=int, default=3, help="fresh cache dirs to measure; the median is shown")
    parser.add_argument("--preprocess", default="none", help="data.preprocess (none, d2l); default none")
    parser.add_argument("--tmp-dir", default=None, help="where to build the corpus; default the system temp dir")
    parser.add_argument("--json", default=ROOT / "outputs/bench/tokenize.json", help="default outputs/bench/")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: one measurement, JSON out
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:  # tiny defaults; what the command line gives still wins
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    measure_or_run(args, lambda: measure(args.measure, args.cache_dir, args.preprocess), run)


if __name__ == "__main__":
    main()
