"""The house is one-way: each charlm module imports only the ones below it in LAYERS, nothing imports a script,
nothing edits sys.path, and importing the library registers nothing that belongs to the assembly."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# Lowest first: a module may import only modules before it (README, "Architecture").
LAYERS = [
    "charlm",
    "charlm.checks",
    "charlm.lightning_errors",
    "charlm.hardware",
    "charlm.vocab",
    "charlm.chunks",
    "charlm.archives",
    "charlm.corpus",
    "charlm.cache",
    "charlm.batches",
    "charlm.data",
    "charlm.cells",
    "charlm.mincells",
    "charlm.model",
    "charlm.stepper",
    "charlm.optim",
    "charlm.checkpoint",
    "charlm.resume",
    "charlm.finetune",
    "charlm.module",
    "charlm.generation",
    "charlm.beam",
    "charlm.callbacks",
    "charlm.slurm",
    "charlm.runs",
    "charlm.failed",
    "charlm.board",
    "charlm.sweeps",
    "charlm.console",
    "charlm.config",
    "charlm.info",
    "charlm.overrides",
    "charlm.cli",
    "charlm.score",
    "charlm.export",
]
SCRIPTS = {"train", "generate"}
SYS_PATH_EDIT = re.compile(r"sys\.path\s*(\[|=|\.(insert|append|extend)\b)")


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_every_charlm_module_has_a_layer():
    found = {"charlm" if p.stem == "__init__" else f"charlm.{p.stem}" for p in (ROOT / "charlm").glob("*.py")}
    assert found == set(LAYERS)


@pytest.mark.parametrize("module", LAYERS)
def test_modules_import_only_downstream(module):
    path = ROOT / "charlm" / ("__init__.py" if module == "charlm" else f"{module.split('.')[1]}.py")
    below = set(LAYERS[: LAYERS.index(module)])
    ours = {name for name in imported_modules(path) if name == "charlm" or name.startswith("charlm.")}
    assert ours <= below, f"{module} reaches upstream: {sorted(ours - below)}"
    assert not imported_modules(path) & (SCRIPTS | {"tests", "bench"})


def test_no_script_is_imported_and_no_sys_path_is_edited():
    files = [*ROOT.glob("charlm/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("tests/*.py"), ROOT / "train.py"]
    files.append(ROOT / "generate.py")
    for path in files:
        assert not imported_modules(path) & SCRIPTS, f"{path.name} imports a script"
        assert not SYS_PATH_EDIT.search(path.read_text(encoding="utf-8")), f"{path.name} edits sys.path"
    for path in ROOT.glob("charlm/*.py"):
        assert "fmt: skip" not in path.read_text(encoding="utf-8"), f"{path.name} hides positional forwarding"


def test_importing_the_library_registers_no_resolvers_or_configs():
    """Only ``charlm.config.register()`` (which ``compose`` and the apps call) adds the resolvers and config nodes;
    a second call changes nothing."""
    used = {m for path in ROOT.glob("conf/**/*.yaml") for m in re.findall(r"\$\{(charlm_\w+):", path.read_text())}
    assert len(used) >= 8  # charlm_data, _precision, _recipe, _run_id, _run_stamp, _run_name, _run_settings, _run_dir
    code = (
        "import charlm.module, charlm.generation, charlm.callbacks, charlm.data, charlm.config, charlm.cli\n"
        "from omegaconf import OmegaConf\n"
        "from hydra.core.config_store import ConfigStore\n"
        "repo = ConfigStore.instance().repo\n"
        f"names = {sorted(used)!r}\n"
        "assert not [name for name in names if OmegaConf.has_resolver(name)]\n"
        "assert 'base.yaml' not in repo.get('model', {}) and 'generation.yaml' not in repo\n"
        "charlm.config.register()\n"
        "charlm.config.register()\n"
        "assert all(OmegaConf.has_resolver(name) for name in names)\n"
        "assert 'base.yaml' in repo['model'] and 'base.yaml' in repo['data'] and 'generation.yaml' in repo\n"
        "print(charlm.config.compose(['model.hidden_size=8']).model.hidden_size)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["8"]
