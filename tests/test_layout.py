"""The layering rules: library <- stage shells <- flows; stages stay thin and never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

from edgesam.config import STAGES

REPO = Path(__file__).resolve().parents[1]
MAX_PIPELINE_LINES = 900


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
    lines = sum(len(p.read_text().splitlines()) for p in (REPO / "pipelines").glob("*.py"))
    assert lines <= MAX_PIPELINE_LINES, f"pipelines/ has {lines} lines"
