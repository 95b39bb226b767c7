"""candgen's own import graph, read from the source (every import, at module level or inside a
function), for the tests that keep the layers and the serving boundary."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from candgen.paths import REPO_ROOT

SRC = REPO_ROOT / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """Every candgen module and its file."""
    return {module_name(p): p for p in sorted((SRC / "candgen").rglob("*.py"))}


def _imported(module: str, path: Path) -> Iterator[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target
            # `from candgen.x import y` may name a module y
            yield from (f"{target}.{alias.name}" for alias in node.names)


@cache
def imports(module: str) -> frozenset[str]:
    """What a candgen module imports: candgen modules by full name, others by top-level name."""
    known = modules()
    out = set()
    for name in _imported(module, known[module]):
        if name.startswith("candgen"):
            if name in known:
                out.add(name)
        else:
            out.add(name.partition(".")[0])
    return frozenset(out)


def closure(roots: list[str]) -> set[str]:
    """The candgen modules reachable from ``roots`` (their packages' __init__ included)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        parents = [".".join(parts[:i]) for i in range(1, len(parts))]
        todo.extend(m for m in [*parents, *imports(module)] if m in modules())
    return seen


def third_party(module: str) -> set[str]:
    return {
        name
        for name in imports(module)
        if not name.startswith("candgen") and name not in sys.stdlib_module_names
    }


def package(module: str) -> str:
    """``candgen.serving.steps`` -> ``serving``; a top-level module is its own package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "candgen"
