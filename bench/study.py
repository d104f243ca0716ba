"""An Optuna study's trials as a Markdown table, best first: every trial's parameters, state and value.

    .venv/bin/python -m bench.study --storage sqlite:///$PWD/outputs/optuna/shakespeare_1min.db \\
        --study shakespeare_1min_r1 --out docs/optuna_shakespeare_1min.md

The study is the one a ``hparams_search=...`` sweep wrote with ``hydra.sweeper.storage`` and
``hydra.sweeper.study_name``; its value is the sweep's ``optimized_metric`` (val/loss, nats per character).
Failed trials (a bad config, a diverged run) and trials still marked running (a killed sweep) are listed last.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from charlm import UserError, reported_user_errors


def rows(study) -> tuple[list[str], list[list[str]]]:
    """Header and rows: completed trials by value, then the others by number."""
    trials = sorted(study.trials, key=lambda t: (t.value is None, t.value if t.value is not None else t.number))
    names = sorted({name for t in trials for name in t.params})
    header = ["trial", "state", "val loss", "seconds", *names]
    table = []
    for t in trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        table.append(
            [
                str(t.number),
                t.state.name,
                f"{t.value:.4f}" if t.value is not None else "-",
                f"{seconds:.0f}" if seconds is not None else "-",
                *(str(t.params.get(name, "-")) for name in names),
            ]
        )
    return header, table


def markdown(header: list[str], table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", required=True, help="the sweep's hydra.sweeper.storage URL")
    parser.add_argument("--study", required=True, help="the sweep's hydra.sweeper.study_name")
    parser.add_argument("--out", type=Path, help="also write the table, with a title, to this Markdown file")
    parser.add_argument("--title", default="", help="text above the table in --out")
    args = parser.parse_args(argv)
    with reported_user_errors():
        try:
            import optuna
        except ImportError:
            raise UserError('bench.study needs optuna; pip install -e ".[search]".') from None
        try:
            study = optuna.load_study(study_name=args.study, storage=args.storage)
        except KeyError:
            raise UserError(f"no study {args.study!r} in {args.storage}; check --study and --storage.") from None
        text = markdown(*rows(study))
        states = [t.state.name for t in study.trials]
        summary = ", ".join(f"{states.count(s)} {s.lower()}" for s in sorted(set(states)))
        print(f"{args.study}: {len(states)} trials ({summary})\n\n{text}")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            body = f"{args.title}\n\n" if args.title else ""
            args.out.write_text(f"{body}{len(states)} trials ({summary}).\n\n{text}\n", encoding="utf-8")


if __name__ == "__main__":
    main()
