"""The layering rules: library <- stage shells <- flows; the library's layer order of
docs/ARCHITECTURE.md; stages stay thin and never import each other."""

from __future__ import annotations

import ast
import graphlib
import re
import subprocess
import sys
from pathlib import Path

from edgesam.config import STAGES

REPO = Path(__file__).resolve().parents[1]
MAX_STAGE_SHELL_LINES = 700  # nine stages: artifacts in, one library call, manifest out
MAX_RUNNER_LINES = 330  # the runner and its CLI; the store's mechanics live in edgesam.store


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_stage_imports_another_stage():
    for stage in STAGES:
        others = {f"pipelines.{s}" for s in STAGES if s != stage}
        imported = imported_modules(REPO / "pipelines" / f"{stage}.py")
        assert not imported & others, f"pipelines/{stage}.py imports {imported & others}"


def test_the_library_and_the_stages_do_not_import_upwards():
    for path in (REPO / "edgesam").rglob("*.py"):
        bad = {m for m in imported_modules(path) if m.split(".")[0] in ("prefect", "pipelines", "flows")}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"
    for path in (REPO / "pipelines").glob("*.py"):
        bad = {m for m in imported_modules(path) if m.split(".")[0] in ("prefect", "flows")}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_stage_shells_stay_thin():
    shells = sum(len((REPO / "pipelines" / f"{s}.py").read_text().splitlines()) for s in STAGES)
    runner = sum(len((REPO / "pipelines" / f).read_text().splitlines()) for f in ("stage.py", "cli.py"))
    assert shells <= MAX_STAGE_SHELL_LINES, f"the stage shells of pipelines/ have {shells} lines"
    assert runner <= MAX_RUNNER_LINES, f"pipelines/stage.py and cli.py have {runner} lines"


def layer_order() -> dict[str, int]:
    """docs/ARCHITECTURE.md's layer table: module prefix -> layer (1 is the base)."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text().split("### Layer order", 1)[1]
    layers = {}
    for number, cells in re.findall(r"^\| (\d+) \| (.+) \|$", text, flags=re.M):
        for name in re.findall(r"`([\w.]+)`", cells):
            layers[name] = int(number)
    return layers


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_imports(path: Path, modules: set[str]) -> set[str]:
    """The library modules `path` imports, at any depth of its code; `from package import name`
    counts as importing the submodule when `name` is one."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found & modules


def layer_of(module: str, layers: dict[str, int]) -> int:
    prefixes = [p for p in layers if module == p or module.startswith(p + ".")]
    assert prefixes, f"{module} is in no layer of docs/ARCHITECTURE.md's layer order"
    return layers[max(prefixes, key=len)]


def test_no_library_import_runs_down_the_layers_or_in_a_cycle():
    layers = layer_order()
    paths = {module_name(p): p for p in (REPO / "edgesam").rglob("*.py")}
    modules = set(paths)
    graph = {m: library_imports(p, modules) - {m} for m, p in paths.items()}
    for module, deps in graph.items():
        if module == "edgesam":
            continue
        for dep in deps:
            if dep in ("edgesam",) or module.startswith(dep + "."):  # a package's __init__
                continue
            assert layer_of(dep, layers) <= layer_of(module, layers), \
                f"{module} (layer {layer_of(module, layers)}) imports {dep} (layer {layer_of(dep, layers)})"
    order = graphlib.TopologicalSorter({m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()})
    order.prepare()  # raises graphlib.CycleError naming the cycle


def test_the_client_imports_neither_torch_nor_pydantic():
    modules = sorted(module_name(p) for p in (REPO / "edgesam" / "client").glob("*.py"))
    script = ("import sys\nsys.modules.update(torch=None, pydantic=None)\n"
              + "".join(f"import {m}\n" for m in modules)
              + "assert not {'torch', 'pydantic', 'edgesam.config'} & {k for k, v in sys.modules.items() if v}\n")
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True)
