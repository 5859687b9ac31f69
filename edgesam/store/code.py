"""Code versions of stages: what of the code an artifact depends on.

A stage's version hashes the syntax tree (docstrings dropped) of its module and of every
first-party module it imports, transitively, so that an edit re-keys exactly the stages that
run the edited code, and formatting, comments and docstrings re-key nothing. Third-party
package versions are not part of it: they are pinned by the environment (pyproject.toml and the
lock of the image a cluster runs), and hashing them would re-key every artifact on any
unrelated upgrade; the versions that do change numbers (torch, timm, segment-anything) are
recorded in each manifest's `environment` for audits.
"""

from __future__ import annotations

import ast
import hashlib
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder holding edgesam/ and pipelines/
FIRST_PARTY = ("edgesam", "pipelines")


def _code_digest(path: Path) -> bytes:
    """The module's code as Python runs it: its AST without docstrings, so that comments,
    docstrings and formatting do not change a cache key."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).digest()


def _module_file(name: str, root: Path = REPO_ROOT) -> Path | None:
    """The source of a first-party module (`edgesam.*`, `pipelines.*`) under `root`, else None."""
    if name.split(".")[0] not in FIRST_PARTY:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, name: str, root: Path) -> set[str]:
    """The first-party modules `path` imports anywhere in its code (`from pkg import mod` included;
    a parent package's `__init__` only when imported itself)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    tree.body = [node for node in tree.body if not _is_main_guard(node)]  # a CLI entry point runs nothing here
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(parts + ([module] if module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if _module_file(m, root) is not None}


def _is_main_guard(node: ast.stmt) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def module_closure(name: str, root: Path = REPO_ROOT) -> tuple[str, ...]:
    """`name` and every first-party module it imports, transitively (sorted)."""
    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        path = _module_file(module, root)
        if path is None:
            raise ModuleNotFoundError(f"no first-party module {module!r} under {root}")
        seen.add(module)
        todo.extend(_imports(path, module, root) - seen)
    return tuple(sorted(seen))


def module_digests(module: str, root: Path = REPO_ROOT) -> dict[str, str]:
    """{module: digest of its code} over `module`'s closure (what `plan` compares to say why)."""
    return {name: _code_digest(_module_file(name, root)).hex()[:16] for name in module_closure(module, root)}


def code_version(digests: dict[str, str]) -> str:
    """Version of the code that produces an artifact, from `module_digests` of its stage: an
    edit to a module the stage never imports, or to a comment or docstring, keeps its cache."""
    digest = hashlib.sha256()
    for name, part in sorted(digests.items()):
        digest.update(f"{name} {part}\n".encode())
    return digest.hexdigest()[:16]


def environment() -> dict[str, str]:
    """The package versions that can change numbers, recorded for audits (not in the key)."""
    versions = {"python": platform.python_version()}
    for package in ("torch", "timm", "segment-anything", "numpy", "onnxruntime"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions
