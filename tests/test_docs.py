"""The README and docs/ say what works: every code block marked runnable runs as written, and the pages hold no
internal references.

A block is marked by an HTML comment on the line before its fence, invisible on GitHub:
``<!-- runnable -->``, or ``<!-- runnable: debug=fast -->`` to append overrides to each ``train.py`` command so
that it finishes in seconds; ``<!-- runnable: slow -->`` puts a block that takes a minute or more behind the
``slow`` marker (``make test-all`` runs it). Bash blocks run line by line in one scratch directory per page, which holds
``train.py``, ``generate.py`` and ``data/`` as the checkout does and starts with one finished default run
(``outputs/timemachine/...``), so the commands that use a run find one. ``.venv/bin/X`` runs this
interpreter's ``X``; a ``tensorboard --logdir D`` line becomes ``tensorboard --inspect --logdir D``, which reads
the event files and exits. Python blocks run in that directory with ``best.ckpt`` linked to the newest run's.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from tests.conftest import ROOT, compose_generate, compose_train

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(
    r"^<!-- runnable(?::(?P<extra>[^>]*))? -->\n```(?P<lang>bash|python)\n(?P<body>.*?)^```", re.M | re.S
)
BIN = Path(sys.executable).parent


def blocks(page: Path) -> list[tuple[int, str, str, str]]:
    """(line number, language, overrides to append, body) of each runnable block of ``page``."""
    text = page.read_text("utf-8")
    return [
        (text.count("\n", 0, m.start()) + 2, m["lang"], (m["extra"] or "").strip(), m["body"])
        for m in BLOCK.finditer(text)
    ]


def commands(body: str, extra: str) -> list[list[str]]:
    """The argument vectors of a bash block: one per line, comments dropped, interpreters mapped to this venv."""
    out = []
    for line in body.splitlines():
        args = shlex.split(line, comments=True)
        if not args:
            continue
        head = args[0].removeprefix(".venv/bin/")
        if head == "python":
            args = [sys.executable, *args[1:]]
        elif head == "tensorboard":
            args = [str(BIN / "tensorboard"), "--inspect", *args[1:]]
        else:
            args = [str(BIN / head), *args[1:]]
        if any(a.endswith("train.py") for a in args[:2]) and extra:
            args += shlex.split(extra)
        out.append(args)
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A directory laid out like the checkout's top level, with one finished default run in outputs/."""
    work = tmp_path_factory.mktemp("docs")
    for name in ("train.py", "generate.py", "data"):
        (work / name).symlink_to(ROOT / name)
    run = subprocess.run(
        [sys.executable, "train.py", "debug=fast"], cwd=work, env=_env(work), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return work


def _env(work: Path) -> dict[str, str]:
    return {**os.environ, "CHARLM_CACHE": str(work / "cache"), "PYTHONPATH": str(ROOT)}


CASES = [
    pytest.param(
        page,
        line,
        lang,
        extra.removeprefix("slow").strip(),
        body,
        id=f"{page.relative_to(ROOT)}:{line}",
        marks=[pytest.mark.slow] if extra.startswith("slow") else [],  # <!-- runnable: slow -->: a minute or more
    )
    for page in PAGES
    for line, lang, extra, body in blocks(page)
]


def test_the_readme_has_runnable_blocks():
    assert sum(1 for p in CASES if p.values[0].name == "README.md") >= 4


@pytest.mark.parametrize(("page", "line", "lang", "extra", "body"), CASES)
def test_runnable_block_runs_as_written(workspace, page, line, lang, extra, body):
    if lang == "python":
        newest = max(workspace.glob("outputs/**/checkpoints/best.ckpt"), key=lambda p: p.stat().st_mtime)
        link = workspace / "best.ckpt"
        link.unlink(missing_ok=True)
        link.symlink_to(newest)
        runs = [[sys.executable, "-c", body]]
    else:
        runs = commands(body, extra)
    for args in runs:
        proc = subprocess.run(args, cwd=workspace, env=_env(workspace), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (
            f"{page.name}:{line}: {shlex.join(args)}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
        )


FENCE = re.compile(r"^```bash\n(?P<body>.*?)^```", re.M | re.S)
SPAN = re.compile(r"(?<!`)`([^`]*\b(?:train|generate)\.py\b[^`]*)`(?!`)")
APPS = {"train.py": compose_train, "charlm-train": compose_train, "generate.py": compose_generate}
APPS["charlm-generate"] = compose_generate


def app_commands(page: Path) -> list[tuple[str, str, list[str]]]:
    """(the line, the app, its overrides) of every ``train.py`` / ``generate.py`` command (or console script) of
    ``page``: in its bash blocks, runnable or not (continued lines joined), and in its text's code spans. Options
    that are not overrides are dropped and placeholders (``<run>``) filled; a sweep's overrides keep their first
    value. Commands with a user's own ``--config-dir`` are left out."""
    text = page.read_text("utf-8")
    lines = [line for block in FENCE.finditer(text) for line in block["body"].replace("\\\n", " ").splitlines()]
    lines += [" ".join(span.split()) for span in SPAN.findall(FENCE.sub("", text))]
    found = []
    for line in lines:
        args = shlex.split(line, comments=True)
        script = next((i for i, a in enumerate(args) if Path(a).name in APPS), None)
        if line.startswith("#") or script is None or "--config-dir" in args:
            continue
        overrides = [re.sub(r"<[\w ]+>", "X", a) for a in args[script + 1 :] if not a.startswith("-") and "=" in a]
        found.append((line.strip(), Path(args[script]).name, overrides))
    return found


def first_point(overrides: list[str]) -> list[str]:
    """A sweep's overrides (``a=1,2``) as its first job gets them (``a=1``)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [
        f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override() else o.input_line
        for o in parsed
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_on_the_page_composes(page):
    """Commands too slow, or needing hardware, to run here (GPUs, SLURM, a full recipe) still name only settings,
    groups and options that exist: each composes as charlm-train / charlm-generate would compose it."""
    for line, app, overrides in app_commands(page):
        try:
            APPS[app](first_point(overrides), **({"return_hydra_config": True} if APPS[app] is compose_train else {}))
        except Exception as e:  # noqa: BLE001 - the page's line is the report
            pytest.fail(f"{page.name}: {line}\n{type(e).__name__}: {e}")


def test_the_pages_hold_commands_of_both_apps():
    assert sum(len(app_commands(p)) for p in PAGES) >= 30
    assert {app for p in PAGES for _, app, _ in app_commands(p)} >= {"train.py", "generate.py"}


INTERNAL = re.compile(
    r"(?<![\w/-])#\d+|\b[Ii]ssues? #?\d+|\bseed \d{3}\b"
)  # a project's own issues; owner/repo#N is fine


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_hold_no_internal_references(page):
    text = page.read_text("utf-8")
    assert not INTERNAL.findall(text), INTERNAL.findall(text)


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text("utf-8").splitlines()
    assert len(lines) <= 220, len(lines)
    headings = [line for line in lines if line.startswith("## ")]
    assert len(headings) == len(set(headings)), headings
    for link in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)", "\n".join(lines)):
        assert (ROOT / link).is_file(), link
