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
    "charlm.hardware",
    "charlm.vocab",
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
    "charlm.module",
    "charlm.sampling",
    "charlm.callbacks",
    "charlm.slurm",
    "charlm.board",
    "charlm.sweeps",
    "charlm.config",
    "charlm.info",
    "charlm.cli",
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
    code = (
        "import charlm.module, charlm.sampling, charlm.callbacks, charlm.data\n"
        "from omegaconf import OmegaConf\n"
        "from hydra.core.config_store import ConfigStore\n"
        "assert not OmegaConf.has_resolver('charlm_data')\n"
        "assert 'base' not in ConfigStore.instance().repo.get('model', {})\n"
        "import charlm.config\n"
        "assert OmegaConf.has_resolver('charlm_data') and 'base.yaml' in ConfigStore.instance().repo['model']\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
