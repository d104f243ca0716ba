"""The house is one-way: the one module map (docs/architecture.md) lists every charlm module, package by package,
lowest first; each module imports only the ones above it; nothing imports a script, nothing edits sys.path, and
importing the library registers nothing that belongs to the assembly."""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPTS = {"train", "generate"}
SYS_PATH_EDIT = re.compile(r"sys\.path\s*(\[|=|\.(insert|append|extend)\b)")
MAP_DOC = ROOT / "docs" / "architecture.md"


def module_map() -> list[str]:
    """The dotted modules of docs/architecture.md's module map, in its order (``charlm/data/`` is ``charlm.data``)."""
    text = MAP_DOC.read_text(encoding="utf-8")
    block = text.split("<!-- module map -->", 1)[1].split("```", 2)[1]
    paths = [line.split()[0] for line in block.splitlines() if line.strip()]
    return [p.removesuffix("/").removesuffix(".py").removesuffix("/__init__").replace("/", ".") for p in paths]


def path_of(module: str):
    parts = module.split(".")
    package = ROOT.joinpath(*parts)
    return package / "__init__.py" if package.is_dir() else ROOT.joinpath(*parts[:-1], f"{parts[-1]}.py")


@functools.cache
def tree_modules() -> frozenset[str]:
    found = set()
    for path in (ROOT / "charlm").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return frozenset(found)


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: a relative import; write the module's full name"
            names.add(node.module)
            # `from charlm import hardware` imports the module charlm.hardware
            names |= {f"{node.module}.{alias.name}" for alias in node.names} & tree_modules()
    return names


LAYERS = module_map()


def test_the_module_map_lists_every_module_of_the_tree_once():
    assert len(LAYERS) == len(set(LAYERS)), "a module is listed twice"
    assert set(LAYERS) == tree_modules()


def test_the_module_map_lists_each_package_in_one_block_after_its_folder():
    packages = [m for m in LAYERS if path_of(m).name == "__init__.py" and m != "charlm"]
    assert packages, "the map names no package folder"
    for package in packages:
        members = [i for i, m in enumerate(LAYERS) if m.startswith(f"{package}.")]
        first = LAYERS.index(package)
        assert members == list(range(first + 1, first + 1 + len(members))), f"{package}'s modules are not one block"


@pytest.mark.parametrize("module", LAYERS)
def test_modules_import_only_what_the_map_lists_above_them(module):
    path = path_of(module)
    below = set(LAYERS[: LAYERS.index(module)])
    ours = {name for name in imported_modules(path) if name == "charlm" or name.startswith("charlm.")}
    assert ours <= below, f"{module} reaches upstream: {sorted(ours - below)}"
    assert not imported_modules(path) & (SCRIPTS | {"tests", "bench"})


def test_the_readme_names_each_package_folder_and_points_to_the_map():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    where = readme.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    folders = {m.replace(".", "/") + "/" for m in LAYERS if path_of(m).name == "__init__.py" and m != "charlm"}
    listed = set(re.findall(r"^(charlm/\w+/)", where, flags=re.M))
    assert listed == folders
    assert not re.search(r"\b\w+\.py\b(?<!train\.py)(?<!generate\.py)", where), "a second module map in the README"
    assert "docs/architecture.md" in where


def test_no_script_is_imported_and_no_sys_path_is_edited():
    files = [*ROOT.glob("charlm/**/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("tests/**/*.py"), ROOT / "train.py"]
    files.append(ROOT / "generate.py")
    for path in files:
        assert not imported_modules(path) & SCRIPTS, f"{path.name} imports a script"
        assert not SYS_PATH_EDIT.search(path.read_text(encoding="utf-8")), f"{path.name} edits sys.path"
    for path in ROOT.glob("charlm/**/*.py"):
        assert "fmt: skip" not in path.read_text(encoding="utf-8"), f"{path.name} hides positional forwarding"


def test_importing_the_library_registers_no_resolvers_or_configs():
    """Only ``charlm.config.register()`` (which ``compose`` and the apps call) adds the resolvers and config nodes;
    a second call changes nothing."""
    used = {m for path in ROOT.glob("conf/**/*.yaml") for m in re.findall(r"\$\{(charlm_\w+):", path.read_text())}
    assert len(used) >= 8  # charlm_data, _precision, _recipe, _run_id, _run_stamp, _run_name, _run_settings, _run_dir
    code = (
        "import charlm.training.module, charlm.infer.generation, charlm.training.callbacks\n"
        "import charlm.data.datamodule, charlm.config, charlm.cli\n"
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
