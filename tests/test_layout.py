"""The package layering and size rules of docs/architecture.md, checked on the source tree."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "clipforge"
# Each package may import only from packages below it; the embedding core sits under every job.
FOUNDATION = {"model", "text", "data", "checkpoint", "loss"}
JOBS = {"train", "evaluate", "finetune", "bind", "search", "serve", "demo", "cli"}
FORBIDDEN = {**{package: JOBS for package in FOUNDATION}, "inference": JOBS,
             "search": {"evaluate", "finetune", "bind"}, "train": {"evaluate", "finetune", "bind"},
             "evaluate": {"finetune", "bind"}, "serve": {"finetune", "bind"}, "bind": {"evaluate", "finetune"}}
MAX_FUNCTION_LINES = 60


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted(SRC.rglob("*.py"))]


def _imported_packages(tree: ast.Module, path: Path) -> set[str]:
    """clipforge sub-packages a module imports, at the top or inside functions, absolute or relative."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = path.relative_to(SRC).parts[: -node.level]
            names = [".".join(("clipforge", *base, node.module or ""))]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        found |= {name.split(".")[1] for name in names if name.startswith("clipforge.") and name.count(".") >= 1}
    return found


def test_packages_import_only_downwards():
    problems = []
    for path, tree in _modules():
        package = path.relative_to(SRC).parts[0]
        bad = _imported_packages(tree, path) & FORBIDDEN.get(package, set())
        problems += [f"{path.relative_to(SRC)} imports clipforge.{name}" for name in sorted(bad)]
    assert problems == []


def test_no_function_is_longer_than_the_limit():
    long = [f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in _modules() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


@pytest.mark.parametrize("source, expected", [
    ("from clipforge.train.optim import x", {"train"}),
    ("import clipforge.evaluate.tasks", {"evaluate"}),
    ("def f():\n    from clipforge.search import y", {"search"}),
    ("from ..serve import app", {"serve"}),
])
def test_import_reader_sees_every_form(source, expected):
    assert _imported_packages(ast.parse(source), SRC / "model" / "clip.py") == expected
