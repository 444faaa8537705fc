"""Imports go one way: silotune ← tasks ← flows ← ops ← the CLI (checked from the source)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The CLI sits above ops; it lives in flows/ until it moves to a package of its own.
CLI = {ROOT / "flows" / "cli.py"}


def _imported(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def test_nothing_below_ops_imports_ops() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for folder in ("silotune", "tasks", "flows")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path not in CLI
        for line, name in _imported(path)
        if name == "ops" or name.startswith("ops.")
    ]
    assert not found, "\n".join(found)
