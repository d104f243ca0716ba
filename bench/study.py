"""An Optuna study's trials as a Markdown table, best first: every trial's parameters, state and value.

    .venv/bin/python -m bench.study --storage sqlite:///$PWD/outputs/optuna/shakespeare_1min.db \\
        --study shakespeare_1min_r1 --out docs/optuna_shakespeare_1min.md

The study is the one a ``hparams_search=...`` sweep wrote with ``hydra.sweeper.storage`` and
``hydra.sweeper.study_name``; its value is the sweep's ``optimized_metric`` (val/loss, nats per character).
Failed trials (a bad config, a diverged run) and trials still marked running (a killed sweep) are listed last.

A second round starts from the first round's best: ``--seed-from ROUND1 --top K`` enqueues the K best completed
trials of ROUND1 (same storage) as the first trials of ``--study`` (created if new), which the sweep then runs
before its own sampler's trials. Parameters the new round does not search are ignored by it:

    .venv/bin/python -m bench.study --storage sqlite:///$PWD/outputs/optuna/shakespeare.db \
        --study shakespeare_5min_r2 --seed-from shakespeare_1min_r1 --top 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

from charlm import UserError, reported_user_errors
from charlm.config import RENAMED


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


def seed(storage: str, study_name: str, source, top: int) -> list[dict]:
    """Enqueue the ``top`` best completed trials of ``source`` into study ``study_name`` (minimising); a setting
    that has moved (``model.lr``: ``optim.lr``) is enqueued under its key of today."""
    import optuna

    done = sorted((t for t in source.trials if t.value is not None), key=lambda t: t.value)[:top]
    if not done:
        raise UserError(f"study {source.study_name!r} has no completed trial to seed from; run its sweep first.")
    target = optuna.create_study(study_name=study_name, storage=storage, direction="minimize", load_if_exists=True)
    params = [{RENAMED.get(k, k): v for k, v in t.params.items()} for t in done]
    for one in params:
        target.enqueue_trial(one)
    return params


def markdown(header: list[str], table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", required=True, help="the sweep's hydra.sweeper.storage URL")
    parser.add_argument("--study", required=True, help="the sweep's hydra.sweeper.study_name")
    parser.add_argument("--out", type=Path, help="also write the table, with a title, to this Markdown file")
    parser.add_argument("--title", default="", help="text above the table in --out")
    parser.add_argument("--seed-from", help="enqueue the best trials of this study (same storage) into --study")
    parser.add_argument("--top", type=int, default=1, help="how many trials --seed-from enqueues")
    args = parser.parse_args(argv)
    with reported_user_errors():
        try:
            import optuna
        except ImportError:
            raise UserError('bench.study needs optuna; pip install -e ".[search]".') from None
        name = args.seed_from or args.study
        try:
            study = optuna.load_study(study_name=name, storage=args.storage)
        except KeyError:
            raise UserError(f"no study {name!r} in {args.storage}; check --study, --seed-from and --storage.") from None
        if args.seed_from:
            for params in seed(args.storage, args.study, study, args.top):
                print(f"{args.study}: enqueued {params}")
            return
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
