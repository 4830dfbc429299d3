"""The layer rule (docs/architecture.md): cli -> flows -> tasks -> storage / editing, never upward.

The scan reads every import statement of the project's packages with `ast`, including imports inside
functions, so a lazy import cannot hide an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Which project packages each layer may import (itself included).
ALLOWED = {
    "editing": {"editing"},
    "storage": {"storage"},
    "tasks": {"tasks", "storage", "editing"},
    "flows": {"flows", "tasks", "storage", "editing"},
    "cli": {"cli", "flows", "tasks", "storage", "editing"},
}


def project_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.split(".")[0] in ALLOWED]


def upward_imports(layer: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for line, name in project_imports(path):
            top = name.split(".")[0]
            if top in ALLOWED[layer]:
                continue
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_no_module_imports_a_higher_layer(layer):
    assert upward_imports(layer) == []


def test_the_scan_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from flows.refresh import catalogue_refresh\n")
    assert project_imports(module) == [(2, "flows.refresh")]
